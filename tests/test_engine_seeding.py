"""pneumoseg.engine.seeding: per-epoch re-seeding (exact resume) that leaves the kernel choice alone."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pneumoseg.engine.seeding import EpochSeedHandler, configure_determinism


def test_epoch_seed_handler_repeats_augmentation_per_epoch():
    from monai.transforms import Compose, RandGaussianNoised

    transform = Compose([RandGaussianNoised(keys="x", prob=1.0)])
    handler = EpochSeedHandler(seed=7, transform=transform)
    sample = {"x": torch.zeros(1, 4, 4)}

    def draw(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        handler(SimpleNamespace(state=SimpleNamespace(epoch=epoch)))
        return torch.as_tensor(transform(sample)["x"]), torch.rand(3)

    first, again, other = draw(3), draw(3), draw(4)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_epoch_seeding_keeps_the_kernel_choice_of_the_run():
    """MONAI's set_determinism, called per epoch, switched cuDNN benchmarking off for the whole run."""
    handler = EpochSeedHandler(seed=1)
    saved = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
    )
    try:
        configure_determinism(seed=1, deterministic=False)
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        handler(SimpleNamespace(state=SimpleNamespace(epoch=2)))
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        configure_determinism(seed=1, deterministic=True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=True)
