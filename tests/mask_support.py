"""Masks shared by the tests of the loss adapters and the post-processing."""

from __future__ import annotations

import torch


def box_masks(seed: int = 0, b: int = 4, size: int = 16) -> torch.Tensor:
    """``[b, 1, size, size]`` masks: odd images hold a random box (positive), even ones are empty."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(b, 1, size, size)
    for i in range(b):
        if i % 2:
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            masks[i, 0, y : y + size // 3, x : x + size // 3] = 1
    return masks
