"""The final global model as a bundle, then as a sharing archive.

:func:`write_global_bundle` writes a bundle folder in the model-record form: ``models/model.pt`` (the global
weights as a plain state dict of the registry network) and ``models/model_record.json``
(:meth:`ModelRecord.for_training`), the installed bundle's configs, licence and model card with a
"Federated training" section (job id, rounds, sites, each site's metrics per round), and ``eval/metrics.json``
(the mean over sites of the final model's validation metrics, what the sharing export puts on the card).

:func:`export_signed_bundle` is the one place that hands the folder to :mod:`pneumoseg.sharing`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from pneumoseg.federated.client import INSTALLED_BUNDLE
from pneumoseg.federated.report import RoundsLog
from pneumoseg.federated.values import BUNDLE_METRICS, METRIC_NAMES, JobValues

__all__ = [
    "GLOBAL_WEIGHTS",
    "JobResults",
    "write_global_bundle",
    "export_signed_bundle",
    "model_card_section",
    "publish",
]

COPIED = ("configs", "docs", "LICENSE")


def model_card_section(log: RoundsLog, values: JobValues, site_labels: Mapping[str, str] | None = None) -> str:
    """The model card's "Federated training" section: job, rounds, sites, each site's metrics per round."""
    final = log.final_metrics()
    labels = dict(site_labels or {})
    lines = [
        "",
        "## Federated training",
        "",
        f"- NVIDIA FLARE job `{log.job_id}`, FedAvg over {len(log.sites)} sites: "
        + ", ".join(f"`{s}`" + (f" ({labels[s]})" if s in labels else "") for s in log.sites),
        f"- global model after round {log.final_version} of {values.rounds}; {values.local_epochs} local "
        f"epoch(s) per round, peak learning rate {values.learning_rate:g}, {values.image_size} px radiographs",
        f"- global model SHA-256 (weights as aggregated): `{log.global_models.get(log.final_version, '?')}`",
        "- images never left the sites: each site sent weights and the metrics below, measured on its own "
        "validation split",
        "",
        "Final global model, each site's validation split:",
        "",
        "| site | " + " | ".join(METRIC_NAMES) + " |",
        "| --- | " + " | ".join("---" for _ in METRIC_NAMES) + " |",
        *[
            f"| {site} | "
            + " | ".join(f"{final[site][m]:.3f}" if m in final.get(site, {}) else "" for m in METRIC_NAMES)
            + " |"
            for site in log.sites
        ],
        "",
        "Per round (version 0 is the initial model):",
        "",
        log.markdown(),
    ]
    return "\n".join(lines)


def _mean_over_sites(final: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    out = {}
    for name, bundle_name in BUNDLE_METRICS.items():
        values = [m[name] for m in final.values() if name in m]
        if values:
            out[bundle_name] = sum(values) / len(values)
    return out


def write_global_bundle(
    out: str | os.PathLike,
    weights: str | os.PathLike,
    values: JobValues,
    log: RoundsLog,
    site_labels: Mapping[str, str] | None = None,
    template: str | os.PathLike = INSTALLED_BUNDLE,
    overwrite: bool = False,
) -> Path:
    """Write the bundle folder of the global model ``weights`` (the server's ``FL_global_model.pt``)."""
    import torch

    from pneumoseg.model_record import RECORD_FILE, load_state_dict

    out, template = Path(out), Path(template)
    if out.exists():
        if not (overwrite and (out / "configs" / "metadata.json").is_file()):
            raise FileExistsError(f"{out} exists (use --overwrite to replace a bundle)")
        shutil.rmtree(out)
    for name in COPIED:
        source = template / name
        if source.is_dir():
            shutil.copytree(source, out / name)
        elif source.is_file():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, out / name)
    from pneumoseg.federated.client import job_record

    record = job_record(values)
    network = record.network.build()
    # strict: every tensor of the network from the aggregate (FedAvg averages BN counters to float; copied back)
    network.load_state_dict(load_state_dict(weights), strict=True)
    (out / "models").mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), out / "models" / "model.pt")
    record.write(out / "models" / RECORD_FILE)

    meta_path = out / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    version = f"{meta.get('version', '0.1.0')}+fl.{log.job_id}"[:64]
    meta["version"] = version
    meta["changelog"] = {
        version: f"federated training (NVIDIA FLARE job {log.job_id}, FedAvg, {log.final_version} rounds over "
        f"sites {', '.join(log.sites)})",
        **meta.get("changelog", {}),
    }
    meta_path.write_text(json.dumps(meta, indent=4) + "\n")

    card = out / "docs" / "README.md"
    card.parent.mkdir(parents=True, exist_ok=True)
    text = card.read_text() if card.is_file() else f"# {meta.get('name', 'pneumoseg bundle')}\n"
    card.write_text(text.rstrip("\n") + "\n" + model_card_section(log, values, site_labels))

    final = log.final_metrics()
    metrics = {"split": "validation (each site's own; mean over sites)", **_mean_over_sites(final)}
    (out / "eval").mkdir(exist_ok=True)
    (out / "eval" / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return out


def export_signed_bundle(
    bundle: str | os.PathLike,
    out: str | os.PathLike,
    signing_key: str | os.PathLike | None = None,
    onnx: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export ``bundle`` as a sharing archive ``out`` (.zip) with :mod:`pneumoseg.sharing`, signed with
    ``signing_key`` (an Ed25519 private key of ``pneumoseg bundle keygen``; unsigned without one: receivers
    then need ``--allow-unsigned``). The only call into the sharing package."""
    from pneumoseg.sharing.export import export_bundle

    export_bundle(bundle, out, sign=signing_key, onnx=onnx, overwrite=overwrite)
    return Path(out)


GLOBAL_WEIGHTS = Path("app_server") / "FL_global_model.pt"
"""Where the server's ``PTFileModelPersistor`` keeps the global model, relative to the job's run folder."""


@dataclasses.dataclass
class JobResults:
    """What :func:`publish` wrote: the round record, the report files, the bundle folder and the archive."""

    log: RoundsLog
    values: JobValues
    report: Mapping[str, Path]
    bundle: Path
    archive: Path | None


def publish(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    site_labels: Mapping[str, str] | None = None,
    signing_key: str | os.PathLike | None = None,
    onnx: bool = True,
    archive: bool = True,
    overwrite: bool = False,
) -> JobResults:
    """From a finished job's run folder on the server (``pneumoseg_rounds.jsonl`` + the global weights):
    ``OUT/report/rounds.{csv,md,png}``, ``OUT/global_bundle/`` and ``OUT/global_bundle.zip``."""
    from pneumoseg.federated.report import ROUNDS_FILE, write_report

    run_dir, out = Path(run_dir), Path(out_dir)
    log = RoundsLog.read(run_dir / ROUNDS_FILE)
    if log.values is None:
        raise ValueError(f"{run_dir / ROUNDS_FILE}: the job's values are missing (not a pneumoseg job?)")
    values = JobValues.from_dict(log.values, str(run_dir / ROUNDS_FILE))
    report = write_report(log, out / "report")
    bundle = write_global_bundle(out / "global_bundle", run_dir / GLOBAL_WEIGHTS, values, log, site_labels,
                                 overwrite=overwrite)  # fmt: skip
    zip_path = None
    if archive:
        zip_path = export_signed_bundle(bundle, out / "global_bundle.zip", signing_key, onnx=onnx, overwrite=overwrite)
    return JobResults(log, values, report, bundle, zip_path)
