"""Ignite handlers of the training loop: gradient clipping, early stopping that survives a resume, stopping
after a given epoch, and the metric logs."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping
from monai.engines.utils import IterationEvents

from pneumoseg.engine.distributed import is_main_process

__all__ = ["GradientClipHandler", "ResumableEarlyStopHandler", "StopAtEpoch", "MetricsLogger"]

logger = logging.getLogger(__name__)


class GradientClipHandler:
    """Clip the gradient norm after the backward pass (unscaling first under CUDA AMP), and skip the
    optimizer step whose gradients are not finite.

    Under CUDA AMP the ``GradScaler`` skips such a step itself. Without one (fp32, CPU bf16) nothing else
    would: clipping by an infinite norm turns the gradients into NaN weights and the run goes on, learning
    nothing. A skipped step drops the gradients (``grad = None``: PyTorch optimizers then leave the weights
    alone, weight decay included), is logged with its iteration and counted in ``engine.state.skipped_steps``;
    ``max_skipped_in_a_row`` skips in a row end the run with an error, since every later step would be lost
    too. (Seen here: torch 2.13's CPU bf16 ``conv3d`` weight gradient is garbage, 1e34 or NaN, for 512
    channels at 2x2x2.)

    Args:
        max_norm: the largest gradient norm; ``None`` or <= 0: no clipping (non-finite steps still skipped).
        norm_type: the norm's p.
        max_skipped_in_a_row: consecutive non-finite steps that end the run.
    """

    def __init__(self, max_norm: float | None = 1.0, norm_type: float = 2.0, max_skipped_in_a_row: int = 20) -> None:
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.max_skipped_in_a_row = int(max_skipped_in_a_row)
        self._in_a_row = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        scaled = bool(getattr(engine, "amp", False) and scaler is not None)
        clipping = self.max_norm is not None and self.max_norm > 0
        if scaled and clipping:
            scaler.unscale_(engine.optimizer)  # step() then skips its own unscale
        elif scaled:
            return  # the scaler finds and skips non-finite steps
        max_norm = self.max_norm if clipping else math.inf
        norm = torch.nn.utils.clip_grad_norm_(engine.network.parameters(), max_norm, self.norm_type)
        if scaled or bool(torch.isfinite(norm)):
            self._in_a_row = 0
            return
        engine.optimizer.zero_grad(set_to_none=True)
        engine.state.skipped_steps = getattr(engine.state, "skipped_steps", 0) + 1
        self._in_a_row += 1
        logger.warning(
            "iteration %d: gradient norm %s, optimizer step skipped (%d in a row)",
            engine.state.iteration, float(norm), self._in_a_row,
        )  # fmt: skip
        if self._in_a_row >= self.max_skipped_in_a_row:
            raise RuntimeError(
                f"the gradients were not finite for {self._in_a_row} steps in a row (iteration"
                f" {engine.state.iteration}); the data, the learning rate or the precision is at fault: try"
                " fp32 (--cpu_bf16 false, --amp false)"
            )


class ResumableEarlyStopHandler:
    """Stop the trainer when the evaluator's score has not improved by more than ``min_delta`` for
    ``patience`` validations; the counter and the best score are checkpointed (:meth:`state_dict`).

    MONAI's ``EarlyStopHandler`` takes the same arguments but keeps its Ignite ``EarlyStopping`` private, so
    its state could not go into the last checkpoint: a resumed run started counting from zero. Attach to the
    evaluator; call :meth:`set_trainer` before the run (``initialize``), as with MONAI's. A run resumed after
    early stopping had already stopped it ends at once.

    Args:
        patience: validations without improvement before stopping.
        score_function: ``evaluator -> float``, higher is better
            (e.g. ``monai.handlers.stopping_fn_from_metric("val_siim_dice")``).
        trainer: the trainer to stop (or :meth:`set_trainer` later).
        min_delta: an increase of at most this much is no improvement.
    """

    def __init__(
        self,
        patience: int,
        score_function: Callable[[Engine], float],
        trainer: Engine | None = None,
        min_delta: float = 0.0,
    ) -> None:
        self.patience = int(patience)
        self.score_function = score_function
        self.min_delta = float(min_delta)
        self.stopper: EarlyStopping | None = None
        if trainer is not None:
            self.set_trainer(trainer)

    def set_trainer(self, trainer: Engine) -> None:
        self.stopper = EarlyStopping(self.patience, self.score_function, trainer, threshold=self.min_delta)
        trainer.add_event_handler(Events.STARTED, self._stop_if_exhausted)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self._require_trainer()(engine)

    def _stop_if_exhausted(self, trainer: Engine) -> None:
        stopper = self._require_trainer()
        if stopper.counter >= stopper.patience:
            logger.info("early stopping had stopped this run (%d validations without improvement)", stopper.counter)
            trainer.terminate()

    def _require_trainer(self) -> EarlyStopping:
        if self.stopper is None:
            raise RuntimeError("ResumableEarlyStopHandler: call set_trainer(trainer) before the run")
        return self.stopper

    def state_dict(self) -> dict[str, Any]:
        stopper = self._require_trainer()
        return {"counter": stopper.counter, "best_score": stopper.best_score}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        stopper = self._require_trainer()
        stopper.counter = int(state["counter"])
        stopper.best_score = None if state["best_score"] is None else float(state["best_score"])


class StopAtEpoch:
    """Terminate the trainer cleanly after epoch ``epoch`` (``None``: never), e.g. to fit a time slot. The
    epoch's handlers all run first (Ignite stops after the event), the last checkpoint included, and a later
    run with ``resume`` continues at the next epoch with the same schedule, as if never stopped."""

    def __init__(self, epoch: int | None = None) -> None:
        self.epoch = epoch

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if (
            self.epoch is not None
            and engine.state.epoch >= int(self.epoch)
            and engine.state.epoch < engine.state.max_epochs
        ):
            logger.info("stopping after epoch %d as requested (stop_epoch)", engine.state.epoch)
            engine.terminate()


class MetricsLogger:
    """Write the engine's metrics as JSON when it completes (rank 0).

    Args:
        filepath: a JSON-lines history (``append=True``: one line per validation, with the trainer's
            epoch and iteration) or a single JSON report (``append=False``).
        trainer: the trainer, whose iteration tags each line (optional: during training the evaluator's
            epoch is the trainer's, since ``ValidationHandler`` runs it with the trainer's epoch).
        print_metrics: also print the metrics to stdout (``evaluate.json``).
        extra: values added to every record (e.g. the checkpoint evaluated).
    """

    def __init__(
        self,
        filepath: str,
        trainer: Engine | None = None,
        append: bool = True,
        print_metrics: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.filepath = Path(filepath)
        self.trainer = trainer
        self.append = append
        self.print_metrics = print_metrics
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_main_process():
            return
        record: dict[str, Any] = dict(self.extra)
        record["epoch"] = engine.state.epoch
        if self.trainer is not None:
            record["iteration"] = self.trainer.state.iteration
        record.update({k: _as_number(v) for k, v in engine.state.metrics.items()})
        self.filepath.parent.mkdir(parents=True, exist_ok=True)
        if self.append:
            with self.filepath.open("a") as f:
                f.write(json.dumps(record) + "\n")
        else:
            self.filepath.write_text(json.dumps(record, indent=1) + "\n")
        if self.print_metrics:
            print(json.dumps(record, indent=1), flush=True)


def _as_number(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    elif isinstance(value, (np.ndarray, np.generic)):  # e.g. ROCAUC gives numpy.float32, which json refuses
        value = value.item() if np.size(value) == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    return value
