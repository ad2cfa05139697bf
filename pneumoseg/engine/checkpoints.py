"""Checkpoints of a training run, written so that an interruption at any moment loses nothing.

- :class:`BestModelSaver` (on the evaluator): ``models/model.pt``, the network's weights at the best key
  metric so far, replaced only by a strictly better validation;
- :class:`LastCheckpointSaver` (on the trainer): ``models/checkpoint_last.pt``, everything a resume needs:
  network, optimizer, learning-rate schedule, trainer (epoch, iteration), the best-model saver's best metric
  and the early-stopping state (:class:`~pneumoseg.engine.handlers.ResumableEarlyStopHandler`);
- :class:`ResumeCheckpointLoader`: restores all of it when the trainer starts.

Both savers write a temporary file beside the target and rename it over the target (:func:`save_atomically`):
the old file stays whole until the new one is complete. MONAI's ``CheckpointSaver`` is not used for them:
with a fixed file name it deletes the old file first and writes the new one in place (a kill in between
leaves no ``model.pt`` or half of one), and it cannot hand its best-metric state to another checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader
from torch import nn

from pneumoseg.engine.distributed import is_main_process
from pneumoseg.engine.flags import as_flag

__all__ = ["save_atomically", "BestModelSaver", "LastCheckpointSaver", "ResumeCheckpointLoader"]

logger = logging.getLogger(__name__)


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only set it; Linux reports it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def save_atomically(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file in the same folder, flushed to disk and renamed
    over ``path``: a reader or a crash sees the old file or the new one, never a part. Temporary files left by
    an earlier, interrupted write of the same target are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    for stale in path.parent.glob(f"{prefix}*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the weights from the user's group
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:
        pass
    return path


def _unwrap(obj: Any) -> Any:
    """The module inside DDP / DataParallel (checkpoints hold the plain network's names)."""
    return obj.module if isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else obj


class BestModelSaver:
    """Save the network's state dict to ``save_dir/filename`` when the evaluator's key metric is higher than
    at every earlier validation of the run (equal is not better: the first model to reach a score is kept).

    Attach to the evaluator. Its state (:meth:`state_dict`: best metric and the epoch it was reached at) goes
    into the last checkpoint, so a resumed run replaces ``model.pt`` only with a model better than every one
    before the interruption. Every rank keeps the state (metrics are all-gathered), rank 0 alone writes.
    A metric without a value (NaN: e.g. positive-only Dice on a validation split without a positive image)
    never counts as best; the model is still written if the run has none yet, so that a run always leaves a
    ``model.pt``, and the first real score replaces it.

    Args:
        save_dir: the folder of the weights (``models``).
        network: the network whose weights are saved (DDP unwrapped).
        filename: ``model.pt``, a plain state dict (``torch.load(weights_only=True)``).
        metric_name: the metric compared (default: the evaluator's key metric).
    """

    def __init__(
        self, save_dir: str, network: nn.Module, filename: str = "model.pt", metric_name: str | None = None
    ) -> None:
        self.path = Path(save_dir) / filename
        self.network = network
        self.metric_name = metric_name
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self._written = False  # by this process: a model.pt of an earlier run in the same folder does not count

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _save(self) -> None:
        self._written = True
        if is_main_process():
            save_atomically(_unwrap(self.network).state_dict(), self.path)

    def __call__(self, engine: Engine) -> None:
        name = self.metric_name or engine.state.key_metric_name
        score = float(engine.state.metrics[name])
        if not math.isfinite(score):
            first = self.best_metric is None and not self._written
            logger.warning("%s is %s at epoch %d: %s %s", name, score, engine.state.epoch, self.path.name,
                           "written (the run has no model yet)" if first else "not replaced")  # fmt: skip
            if first:
                self._save()
            return
        if self.best_metric is not None and score <= self.best_metric:
            return
        self.best_metric, self.best_epoch = score, int(engine.state.epoch)
        self._save()
        if is_main_process():
            logger.info("%s %.4f at epoch %d: saved %s", name, score, self.best_epoch, self.path)

    def state_dict(self) -> dict[str, Any]:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_metric = None if state["best_metric"] is None else float(state["best_metric"])
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])


class LastCheckpointSaver:
    """Write ``save_dir/filename`` (one fixed name, replaced atomically) at every ``interval`` epochs and at
    completion, holding the state dicts of ``save_dict`` (model, optimizer, lr_scheduler, the best-model
    saver, early stopping, ...) and of the trainer it is attached to (under ``engine_key``: a config can't
    reference the trainer from the trainer's own handler list). Rank 0 alone writes.

    Load it with :class:`ResumeCheckpointLoader` (or MONAI's ``CheckpointLoader(load_path, load_dict=...)``).
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        filename: str = "checkpoint_last.pt",
        interval: int = 1,
        engine_key: str | None = "trainer",
    ) -> None:
        self.path = Path(save_dir) / filename
        self.save_dict = dict(save_dict)
        self.interval = int(interval)
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        if self.engine_key:
            self.save_dict[self.engine_key] = engine
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self._save_final)

    def __call__(self, engine: Engine) -> None:
        if is_main_process():
            save_atomically({k: _unwrap(obj).state_dict() for k, obj in self.save_dict.items()}, self.path)

    def _save_final(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval:
            self(engine)


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI ``CheckpointLoader`` that also restores the engine it is attached to (under ``engine_key``),
    since a bundle config can't reference the trainer from the trainer's own handler list.

    ``enabled``: ``False`` makes it a no-op, so the config's ``resume`` flag switches it (``True`` requires the
    checkpoint to exist).
    """

    def __init__(
        self, load_path: str, load_dict: dict, engine_key: str | None = "trainer", enabled: bool = True, **kwargs: Any
    ) -> None:
        enabled = as_flag(enabled, "resume")
        if enabled and not Path(load_path).is_file():
            raise FileNotFoundError(f"resume: checkpoint {load_path} not found (train without resume first)")
        super().__init__(load_path, dict(load_dict), **kwargs)
        self.engine_key = engine_key
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        if self.engine_key:
            self.load_dict[self.engine_key] = engine
        super().attach(engine)
