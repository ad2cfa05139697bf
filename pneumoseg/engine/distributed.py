"""Which process of a (possibly distributed) run this is: rank 0 alone writes files."""

from __future__ import annotations

import torch

__all__ = ["is_main_process"]


def is_main_process() -> bool:
    """True unless this is a DDP rank other than 0 (rank 0 alone writes checkpoints, records and logs)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
