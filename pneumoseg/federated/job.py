"""Write the NVFlare job: ``pneumoseg federated job --bundle DIR --sites a,b --rounds R --local-epochs E --out J``.

The job is configuration only: ``meta.json`` and one app (``app/config/config_fed_server.json`` and
``config_fed_client.json``) deployed to the server and the named sites, with no ``custom/`` folder. Every class
it names is part of the installed nvflare or pneumoseg (:data:`SERVER_CLASSES`, :data:`CLIENT_CLASSES`: the
``class_allow_list`` entries each site and the server need). The server runs FedAvg with model persistence
(``PTFileModelPersistor``: ``FL_global_model.pt`` in the server's app folder) and records the rounds
(:class:`~pneumoseg.federated.server.RoundRecorder`); a site builds
:class:`~pneumoseg.federated.executor.BundleClientExecutor` from the job's values only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pneumoseg.federated.values import FederatedConfigError, JobValues

__all__ = [
    "APP",
    "CLIENT_CLASSES",
    "SERVER_CLASSES",
    "SITE_NAME",
    "bundle_network",
    "write_job",
]

APP = "app"
CONTROLLER = "pneumoseg.federated.server.FedAvgThenEvaluate"
RECORDER = "pneumoseg.federated.server.RoundRecorder"
PERSISTOR = "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor"
NETWORK = "pneumoseg.networks.SCSEUNet"
EXECUTOR = "pneumoseg.federated.executor.BundleClientExecutor"
SERVER_CLASSES: tuple[str, ...] = (CONTROLLER, RECORDER, PERSISTOR, NETWORK)
"""Classes the server builds for a pneumoseg job (its ``class_allow_list`` must hold them)."""
CLIENT_CLASSES: tuple[str, ...] = (EXECUTOR,)
"""The one class a site builds for a pneumoseg job (its ``class_allow_list`` needs nothing else)."""
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
"""FLARE participant names (no ``@``, no spaces, not ``server``)."""


def bundle_network(bundle: str | os.PathLike) -> tuple[dict[str, Any], int | None]:
    """The network arguments and radiograph input size of a bundle, read as data: its model record if it
    has one (``models/model_record.json``), else ``configs/train.json``'s ``network_def`` (literal values
    only) and ``image_size``."""
    from pneumoseg.model_record import NETWORKS, RECORD_FILE, ModelRecord

    root = Path(bundle)
    record_path = root / "models" / RECORD_FILE
    if record_path.is_file():
        record = ModelRecord.read(record_path)
        radiograph = record.radiograph
        return dict(record.network.kwargs), radiograph.image_size if radiograph else None
    train = root / "configs" / "train.json"
    if not train.is_file():
        raise FileNotFoundError(f"{root}: neither models/{RECORD_FILE} nor configs/train.json (not a bundle?)")
    config = json.loads(train.read_text())
    allowed = NETWORKS["SCSEUNet"].kwargs_schema
    network = {
        k: v for k, v in dict(config.get("network_def", {})).items()
        if k in allowed and not (isinstance(v, str) and v.startswith(("$", "@", "%")))
    }  # fmt: skip
    size = config.get("image_size")
    return network, size if isinstance(size, int) and not isinstance(size, bool) else None


def _check_sites(sites: Sequence[str]) -> list[str]:
    sites = list(sites)
    if len(sites) < 1:
        raise FederatedConfigError("a federated job needs at least one site")
    bad = [s for s in sites if not SITE_NAME.match(s) or s.lower() == "server"]
    if bad:
        raise FederatedConfigError(f"site names must be FLARE participant names (letters, digits, -_.): {bad}")
    if len(set(sites)) != len(sites):
        raise FederatedConfigError(f"a site is named twice: {sites}")
    return sites


def server_config(values: JobValues, n_sites: int, initial_weights: str | None = None) -> dict[str, Any]:
    """``config_fed_server.json``: FedAvg (+ final evaluation), the model persistor, the round recorder."""
    persistor_args: dict[str, Any] = {"model": {"path": NETWORK, "args": values.to_dict()["network"]}}
    if initial_weights:
        persistor_args["source_ckpt_file_full_name"] = initial_weights
    return {
        "format_version": 2,
        "workflows": [
            {
                "id": "controller",
                "path": CONTROLLER,
                "args": {"num_clients": n_sites, "num_rounds": values.rounds, "persistor_id": "persistor"},
            }
        ],
        "components": [
            {"id": "persistor", "path": PERSISTOR, "args": persistor_args},
            {"id": "round_recorder", "path": RECORDER, "args": {"values": values.to_dict()}},
        ],
        "task_data_filters": [],
        "task_result_filters": [],
    }


def client_config(values: JobValues) -> dict[str, Any]:
    """``config_fed_client.json``: one executor, built from the job's values only."""
    return {
        "format_version": 2,
        "executors": [{"tasks": ["train", "validate"], "executor": {"path": EXECUTOR, "args": values.to_dict()}}],
        "components": [],
        "task_data_filters": [],
        "task_result_filters": [],
    }


def write_job(
    out: str | os.PathLike,
    sites: Sequence[str],
    values: JobValues,
    name: str = "pneumoseg-fedavg",
    initial_weights: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the job folder ``out`` (``meta.json`` + ``app/config/*.json``); returns ``out``.

    ``initial_weights``: a state dict file as the *server* sees it, to start from (default: the network's
    random initialisation on the server).
    """
    sites = _check_sites(sites)
    if not SITE_NAME.match(name):
        raise FederatedConfigError(f"job name {name!r}: letters, digits and -_. only")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (overwrite and (out / "meta.json").is_file()):
            raise FileExistsError(f"{out} exists and is not an empty folder (use --overwrite to replace a job)")
        shutil.rmtree(out)
    config_dir = out / APP / "config"
    config_dir.mkdir(parents=True)
    meta = {"name": name, "resource_spec": {}, "min_clients": len(sites), "deploy_map": {APP: ["server", *sites]}}
    (out / "meta.json").write_text(json.dumps(meta, indent=4) + "\n")
    server = server_config(values, len(sites), initial_weights)
    (config_dir / "config_fed_server.json").write_text(json.dumps(server, indent=4) + "\n")
    (config_dir / "config_fed_client.json").write_text(json.dumps(client_config(values), indent=4) + "\n")
    return out
