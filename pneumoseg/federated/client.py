"""The site's trainer: FLARE's Client API around the bundle's own training and evaluation configs.

``python -m pneumoseg.federated.client --values JSON`` is what :class:`~pneumoseg.federated.executor.
BundleClientExecutor` launches at each site, from the site's installed pneumoseg. Per task it

1. receives the global model (``flare.receive()``),
2. evaluates it on the site's validation split through the installed bundle's ``evaluate.json``,
3. for a ``train`` task, trains it ``local_epochs`` epochs on the site's training split through the installed
   bundle's ``train.json``,
4. sends back the weights, the closed list of metrics (:data:`~pneumoseg.federated.values.METRIC_NAMES`) and
   the number of training iterations FedAvg weighs the site by (:func:`outgoing_update`) — nothing else.

The configs are read from the installed pneumoseg (:data:`INSTALLED_BUNDLE`), never from the job; the job's
values (:class:`~pneumoseg.federated.values.JobValues`, validated again here) and the site-local
:class:`~pneumoseg.federated.values.SiteConfig` fill them as overrides.

Why MONAI's ``MonaiAlgo`` inside FLARE's Client API: the Client API is FLARE's supported way to run a trainer
(``ClientAPIExecutor`` launches it as its own process, so a crashing DataLoader or a CUDA fault cannot take the
FLARE client job down), and ``MonaiAlgo`` is MONAI's maintained adapter from a bundle's ``train.json`` /
``evaluate.json`` to federated rounds (weights in and out, the trainer kept across rounds so the optimizer and
the learning-rate schedule continue, checkpoint loaders disabled). FLARE's own ``MonaiAlgo`` executor lives in a
separate package written for older FLARE versions; a bundle run through ``ConfigParser`` by hand would restate
what ``MonaiAlgo`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pneumoseg.federated.values import JobValues, SiteConfig, site_metrics

__all__ = [
    "INSTALLED_BUNDLE",
    "bundle_overrides",
    "evaluation_overrides",
    "job_record",
    "BundleSite",
    "outgoing_update",
    "main",
]

INSTALLED_BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "pneumothorax_scse_unet"
"""The bundle shipped with this pneumoseg: its ``configs/train.json`` and ``configs/evaluate.json`` are the only
configs a site runs."""

TRAIN_CONFIGS = ["configs/train.json"]
EVALUATE_CONFIGS = ["configs/train.json", "configs/evaluate.json"]
_NEVER = 10**9  # an epoch interval that never comes


def bundle_overrides(values: JobValues, site: SiteConfig, bundle_root: Path = INSTALLED_BUNDLE) -> dict[str, Any]:
    """The bundle config values a site's federated training runs with (``ConfigWorkflow`` overrides).

    Outputs go to the site's work folder (never into the installed bundle); the learning-rate schedule spans
    the whole job (``rounds * local_epochs`` epochs), since the trainer lives across rounds; validation runs
    once per round on the received global model (``evaluate.json``), not inside local training, and its
    post-processing is the record's default (the gate at the operating threshold), so the per-round numbers
    are what the exported model does before a site tunes its thresholds.
    """
    work = Path(site.work_dir)
    overrides: dict[str, Any] = {
        "bundle_root": str(bundle_root),
        "ckpt_dir": str(work / "models"),
        "output_dir": str(work / "eval"),
        "datalist": site.manifest,
        "data_root": site.data_root,
        "train_split": site.train_split,
        "val_split": site.val_split,
        "eval_split": site.val_split,
        "image_size": values.image_size,
        "num_epochs": values.total_epochs,
        "warmup_epochs": values.warmup_epochs,
        "learning_rate": values.learning_rate,
        "operating_threshold": values.operating_threshold,
        "seed": values.seed,
        "batch_size": site.batch_size,
        "val_batch_size": site.val_batch_size,
        "num_workers": site.num_workers,
        "cache_rate": site.cache_rate,
        "cpu_bf16": site.cpu_bf16,
        "val_interval": _NEVER,
        "early_stop_patience": _NEVER,
        "search_postprocessing": False,
    }
    for key, value in values.network.items():
        overrides[f"network_def#{key}"] = list(value) if isinstance(value, (list, tuple)) else value
    return overrides


def evaluation_overrides(training: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`bundle_overrides` for ``evaluate.json``, which reads the network and the input size from the model
    record (:func:`job_record`), never from overrides."""
    return {k: v for k, v in training.items() if k != "image_size" and not k.startswith("network_def#")}


def job_record(values: JobValues) -> Any:
    """The model record of the job's network at the job's input size, with the record's default
    post-processing (the gate at the operating threshold): what evaluation feeds the global model with."""
    from pneumoseg.model_record import RADIOGRAPH, ModelRecord, NetworkSpec

    network = NetworkSpec("SCSEUNet", values.network).build()
    return ModelRecord.for_training(network, RADIOGRAPH, values.image_size, values.operating_threshold)


class BundleSite:
    """One site's evaluation and training of the installed bundle with MONAI's ``MonaiAlgo``.

    Args:
        values: the job's values.
        site: this site's local config.
        site_name: the site's FLARE name (for logs).
        bundle_root: the installed bundle (tests may point at a copy).
    """

    def __init__(self, values: JobValues, site: SiteConfig, site_name: str, bundle_root: Path = INSTALLED_BUNDLE):
        from monai.fl.client import MonaiAlgo
        from monai.fl.utils.constants import ExtraItems

        work = Path(site.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        from pneumoseg.model_record import RECORD_FILE

        # evaluation of the first global model comes before any training writes the record
        job_record(values).write(work / "models" / RECORD_FILE)
        overrides = bundle_overrides(values, site, bundle_root)
        self.algo = MonaiAlgo(
            bundle_root=str(bundle_root),
            local_epochs=values.local_epochs,
            send_weight_diff=False,
            config_train_filename=TRAIN_CONFIGS,
            train_kwargs=dict(overrides),
            config_evaluate_filename=EVALUATE_CONFIGS,
            eval_kwargs=evaluation_overrides(overrides),
        )
        with warnings.catch_warnings():
            # MonaiAlgo warns that it executes configs provisioned by the FL system; these are the installed
            # pneumoseg's own configs (bundle_root is absolute, so the app folder the server fills is not used)
            warnings.filterwarnings("ignore", message="executing the bundle config under")
            self.algo.initialize(extra={ExtraItems.CLIENT_NAME: site_name, ExtraItems.LOGGING_FILE: False})

    def evaluate(self, params: Mapping[str, Any]) -> dict[str, float]:
        """The site's metrics of the model ``params`` on its validation split (closed list, finite values)."""
        from monai.fl.utils.exchange_object import ExchangeObject

        result = self.algo.evaluate(ExchangeObject(weights=dict(params)))
        return site_metrics(result.metrics or {})

    def train(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        """Train from ``params`` for the job's local epochs; the new weights (CPU) and the iterations run."""
        from monai.fl.utils.constants import FlStatistics
        from monai.fl.utils.exchange_object import ExchangeObject

        self.algo.train(ExchangeObject(weights=dict(params)))
        local = self.algo.get_weights()
        return dict(local.weights), int(local.statistics[FlStatistics.NUM_EXECUTED_ITERATIONS])


def outgoing_update(weights: Mapping[str, Any] | None, metrics: Mapping[str, float], steps: int | None = None):
    """What a site sends the server: the weights (a state dict; ``None`` for an evaluation task), the metrics
    of :data:`~pneumoseg.federated.values.METRIC_NAMES` and the iterations FedAvg weighs the site by."""
    from nvflare.apis.fl_constant import FLMetaKey
    from nvflare.client import FLModel, ParamsType

    if weights is None:
        return FLModel(metrics=dict(metrics))
    meta = {} if steps is None else {FLMetaKey.NUM_STEPS_CURRENT_ROUND: int(steps)}
    return FLModel(params_type=ParamsType.FULL, params=dict(weights), metrics=dict(metrics), meta=meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pneumoseg.federated.client",
        description="pneumoseg's FLARE Client API trainer (launched by the FLARE client, not by hand).",
    )
    parser.add_argument("--values", required=True, help="the job's values as JSON (closed schema)")
    args = parser.parse_args(argv)
    values = JobValues.from_json(args.values, "job values from the server")

    import nvflare.client as flare

    from pneumoseg.runtime import retain_freed_memory

    retain_freed_memory()  # this process is the site's trainer: forward passes reuse their activations' memory
    flare.init()
    site_name = flare.get_site_name()
    site = SiteConfig.for_site(site_name)
    # one folder per job: two jobs at a site never overwrite each other's checkpoints and logs
    site = dataclasses.replace(site, work_dir=str(Path(site.work_dir) / flare.get_job_id()))
    trainer = BundleSite(values, site, site_name)
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        metrics = trainer.evaluate(received.params)
        print(f"{site_name}: global model of round {received.current_round}: {metrics}", flush=True)
        if flare.is_train():
            weights, steps = trainer.train(received.params)
            flare.send(outgoing_update(weights, metrics, steps))
        else:
            flare.send(outgoing_update(None, metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
