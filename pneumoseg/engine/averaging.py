"""Averaging of trained weights: the top-k validation checkpoints of one run, or any state dicts.

Averaging the weights of the k best validation epochs (a cheap cousin of stochastic weight averaging that
the top SIIM-ACR solutions used) smooths the noise of checkpoint selection; the result is one ordinary
state dict, so inference needs nothing new: ship it as ``models/model.pt`` or run it with
``pneumoseg infer --weights``. Batch-norm running statistics are averaged like the weights (the epochs are
close, so their statistics are too); integer buffers (``num_batches_tracked``) take the largest value.

The bundle turns it on with the ``configs/average_top_k.json`` overlay (``--average_top_k K``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pneumoseg.engine.checkpoints import save_atomically
from pneumoseg.engine.distributed import is_main_process

__all__ = ["average_state_dicts", "TopKAverager"]

logger = logging.getLogger(__name__)


def average_state_dicts(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts with identical keys and shapes (floating tensors, in fp32 and
    back to their dtype); integer tensors take the maximum."""
    if not states:
        raise ValueError("nothing to average")
    keys = list(states[0])
    for i, state in enumerate(states[1:], 1):
        if list(state) != keys:
            raise ValueError(f"state dict {i} has other keys than state dict 0")
    averaged: dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = [s[key] for s in states]
        if any(t.shape != tensors[0].shape for t in tensors):
            raise ValueError(f"{key}: shapes differ {[tuple(t.shape) for t in tensors]}")
        if tensors[0].is_floating_point():
            averaged[key] = torch.stack([t.float() for t in tensors]).mean(0).to(tensors[0].dtype)
        else:
            averaged[key] = torch.stack(tensors).amax(0)
    return averaged


class TopKAverager:
    """Keep the weights of the ``k`` best validations of a run and their average (an Ignite handler).

    Attach it to the validation engine. After each validation whose ``metric_name`` (higher is better)
    enters the top ``k``, the network's state dict is written to ``save_dir/epoch_<E>.pt`` (the one it
    displaces is deleted), the list to ``save_dir/top_k.json`` and the average of the kept ones to
    ``average_path`` — all atomically, so a run stopped at any moment leaves a consistent set, and a resumed
    run continues from the files (the list is read back at start).

    Args:
        save_dir: folder of the kept checkpoints (``models/top_k``).
        network: the trained network (its ``state_dict`` is saved; a DDP ``module.`` prefix is dropped).
        k: how many validations to keep and average (``k < 1``: the handler does nothing).
        metric_name: the validation metric ranking them.
        average_path: where the average goes (``models/model_top_k_average.pt``).
        epoch_engine: the engine whose ``state.epoch`` names the checkpoints (the trainer; default: the
            engine attached to, whose own epoch counter the evaluator resets).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        network: torch.nn.Module,
        k: int = 3,
        metric_name: str = "val_siim_dice",
        average_path: str | os.PathLike | None = None,
        epoch_engine: Any = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.network = network
        self.k = int(k)
        self.metric_name = metric_name
        self.average_path = Path(average_path) if average_path else self.save_dir.parent / "model_top_k_average.pt"
        self.epoch_engine = epoch_engine
        self.kept: list[dict[str, Any]] = self._read_list()

    def _read_list(self) -> list[dict[str, Any]]:
        listing = self.save_dir / "top_k.json"
        if not listing.is_file():
            return []
        kept = json.loads(listing.read_text())
        return [entry for entry in kept if (self.save_dir / entry["file"]).is_file()]

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if self.k >= 1:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        score = float(engine.state.metrics[self.metric_name])
        epoch = int((self.epoch_engine or engine).state.epoch)
        entry = {"file": f"epoch_{epoch:04d}.pt", "epoch": epoch, "score": score if math.isfinite(score) else None}
        ranked = sorted(  # a validation without a score (None: NaN) ranks below every scored one
            [e for e in self.kept if e["epoch"] != epoch] + [entry],
            key=lambda e: math.inf if e["score"] is None else -e["score"],
        )
        if entry not in ranked[: self.k] or not is_main_process():
            return
        state = {k.removeprefix("module."): v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
        save_atomically(state, self.save_dir / entry["file"])
        dropped = [e for e in ranked[self.k :] if e["file"] != entry["file"]]
        self.kept = ranked[: self.k]
        (self.save_dir / "top_k.json.tmp").write_text(json.dumps(self.kept, indent=1) + "\n")
        os.replace(self.save_dir / "top_k.json.tmp", self.save_dir / "top_k.json")
        for old in dropped:
            (self.save_dir / old["file"]).unlink(missing_ok=True)
        states = [torch.load(self.save_dir / e["file"], map_location="cpu", weights_only=True) for e in self.kept]
        save_atomically(average_state_dicts(states), self.average_path)
        logger.info("top-%d average of epochs %s -> %s", self.k, [e["epoch"] for e in self.kept], self.average_path)
