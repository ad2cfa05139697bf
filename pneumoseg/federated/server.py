"""Server side of a pneumoseg federated job: FedAvg with a last evaluation round, and the round record.

- :class:`FedAvgThenEvaluate`: FLARE's ``FedAvg``; after the last round every site evaluates the final global
  model once more (a ``validate`` task), so the table has the final model's metrics too.
- :class:`RoundRecorder`: writes ``pneumoseg_rounds.jsonl`` in the job's run folder on the server: per global
  model version its SHA-256, per site and version the metrics the site sent, and what each site's message
  held (its data kind, meta keys, metric names, number of tensors), so that what crossed can be audited.
  ``pneumoseg federated report`` turns it into the table, the plot and the exported bundle.

Model version ``v`` is the global model after ``v`` rounds (``0``: the initial model). In round ``r`` a site
evaluates version ``r`` (what it received) before training on it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.widgets.widget import Widget

from pneumoseg.federated.report import ROUNDS_FILE
from pneumoseg.federated.values import METRIC_NAMES

__all__ = ["ROUNDS_FILE", "FedAvgThenEvaluate", "RoundRecorder", "weights_sha256"]


def weights_sha256(weights: Any) -> str:
    """SHA-256 over a state dict's names, shapes, dtypes and bytes (numpy arrays or CPU tensors)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        array = np.ascontiguousarray(np.asarray(weights[name]))
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class FedAvgThenEvaluate(FedAvg):
    """``FedAvg`` followed by one ``validate`` task that sends the final global model to every site.

    Arguments: those of :class:`nvflare.app_common.workflows.fedavg.FedAvg`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.final_model: FLModel | None = None

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        self.final_model = super().update_model(model, aggr_result)
        return self.final_model

    def run(self) -> None:
        super().run()
        if self.final_model is None or self.abort_signal.triggered:
            return
        version = self.current_round + 1  # the last round FedAvg ran (it may stop early)
        final = FLModel(params_type=ParamsType.FULL, params=self.final_model.params, current_round=version,
                        total_rounds=self.num_rounds)  # fmt: skip
        self.info(f"evaluating the final global model (version {version}) at every site")
        self.send_model_and_wait(task_name=AppConstants.TASK_VALIDATION, data=final)


class RoundRecorder(Widget):
    """Append one JSON line per global model version and per site result to ``<run dir>/pneumoseg_rounds.jsonl``.

    ``values``: the job's values (:class:`~pneumoseg.federated.values.JobValues`), kept with the record so that
    the run folder alone describes the model.

    Lines: ``{"event": "start", "job_id", "values"}``, ``{"event": "global_model", "version", "sha256"}``,
    ``{"event": "site_result", "version", "site", "data_kind", "meta_keys", "metric_names", "metrics",
    "tensors"}`` (``metrics`` keeps the names of :data:`~pneumoseg.federated.values.METRIC_NAMES` with finite
    values; ``metric_names`` lists every name the site sent, so an unexpected one shows).
    """

    def __init__(self, values: dict[str, Any] | None = None, filename: str = ROUNDS_FILE) -> None:
        super().__init__()
        self.values = dict(values or {})
        self.filename = filename
        self.path: Path | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            self.path = Path(run_dir) / self.filename
            self._write({"event": "start", "job_id": str(fl_ctx.get_job_id()), "values": self.values})
        elif event_type == AppEventType.INITIAL_MODEL_LOADED:
            self._global_model(fl_ctx, 0)
        elif event_type == AppEventType.AFTER_SHAREABLE_TO_LEARNABLE:
            self._global_model(fl_ctx, int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND)) + 1)
        elif event_type == AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            self._site_result(fl_ctx)

    def _global_model(self, fl_ctx: FLContext, version: int) -> None:
        learnable = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        weights = learnable.get("weights") if learnable is not None else None
        if weights:
            self._write({"event": "global_model", "version": version, "sha256": weights_sha256(weights)})

    def _site_result(self, fl_ctx: FLContext) -> None:
        peer = fl_ctx.get_peer_context()
        shareable = peer.get_prop(FLContextKey.SHAREABLE) if peer is not None else None
        if shareable is None:
            return
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            self.log_warning(fl_ctx, "a site result that is not a DXO was not recorded")
            return
        sent = dxo.data if dxo.data_kind == DataKind.METRICS else dxo.get_meta_prop(MetaKey.INITIAL_METRICS)
        sent = sent if isinstance(sent, dict) else {}
        metrics = {
            k: float(v)
            for k, v in sent.items()
            if k in METRIC_NAMES and isinstance(v, (int, float)) and math.isfinite(float(v))
        }
        self._write({
            "event": "site_result",
            "version": int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND) or 0),
            "site": peer.get_identity_name(default="?"),
            "data_kind": str(getattr(dxo.data_kind, "value", dxo.data_kind)),
            "meta_keys": sorted(str(k) for k in dxo.meta),
            "metric_names": sorted(str(k) for k in sent),
            "metrics": metrics,
            "tensors": len(dxo.data) if dxo.data_kind != DataKind.METRICS and isinstance(dxo.data, dict) else 0,
        })  # fmt: skip

    def _write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({**record, "time": round(time.time(), 3)}, sort_keys=True) + "\n")
