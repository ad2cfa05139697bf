"""Seeds and kernel choice: once per run (:func:`configure_determinism`) and per epoch (:class:`EpochSeedHandler`)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from pneumoseg.engine.flags import as_flag

__all__ = ["configure_determinism", "seed_random_sources", "EpochSeedHandler"]


def seed_random_sources(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices); nothing else changes."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_determinism(seed: int, deterministic: bool = True) -> None:
    """Seed the run and choose its kernels, once, in ``initialize``.

    Args:
        seed: seeds the global generators and MONAI's global seed (which transforms built afterwards take).
        deterministic: ``True``: reproducible kernels (cuDNN deterministic, no benchmarking; PyTorch's
            deterministic algorithms, warning where an operation has none). ``False``: cuDNN benchmarking
            (the fastest kernels for the input sizes seen), results may vary in the last bits between runs.
    """
    from monai.utils import set_determinism

    deterministic = as_flag(deterministic, "deterministic")
    # MONAI's set_determinism seeds everything but also forces cuDNN deterministic without benchmarking
    set_determinism(seed=int(seed))
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


class EpochSeedHandler:
    """Re-seed every random source at the start of each epoch from ``(seed, epoch)``.

    Epoch e then draws the same shuffling, augmentation, dropout and DataLoader worker seeds whether the
    run went straight through or was resumed from a checkpoint at the end of epoch e - 1: the global
    generators (python, numpy, torch: shuffling, dropout, the workers' seeds) and the transforms' own
    ``RandomState`` via ``Compose.set_random_state``. Fires before the epoch's DataLoader iterator is created
    (Ignite creates it after EPOCH_STARTED). The kernel choice of :func:`configure_determinism` is left alone
    (MONAI's ``set_determinism`` would switch cuDNN benchmarking off at every epoch).
    """

    def __init__(self, seed: int = 0, transform: Any = None) -> None:
        self.seed = int(seed)
        self.transform = transform

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def epoch_seed(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + epoch) % (2**31)

    def __call__(self, engine: Engine) -> None:
        seed = self.epoch_seed(engine.state.epoch)
        seed_random_sources(seed)
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=seed)
