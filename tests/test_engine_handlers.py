"""pneumoseg.engine.handlers: metric logs (the early stopping state: test_engine_checkpoints.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pneumoseg.engine.handlers import MetricsLogger


def test_metrics_logger_writes_json_for_numpy_torch_and_nan(tmp_path: Path):
    metrics = {"auc": np.float32(0.75), "dice": torch.tensor(0.5), "nan": float("nan"), "n": 3}
    engine = SimpleNamespace(state=SimpleNamespace(epoch=2, metrics=metrics))
    logger = MetricsLogger(str(tmp_path / "history.jsonl"))
    logger(engine)
    logger(engine)
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert lines == [{"epoch": 2, "auc": 0.75, "dice": 0.5, "nan": None, "n": 3}] * 2


def _train_on(values: list[float], max_skipped_in_a_row: int = 20) -> tuple[torch.nn.Module, object]:
    """A one-weight network trained by MONAI's SupervisedTrainer on inputs ``values`` (loss = w * x, so the
    gradient is the input: an inf input is an inf gradient)."""
    from monai.engines import SupervisedTrainer

    from pneumoseg.engine.handlers import GradientClipHandler

    network = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(network.weight, 1.0)
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[{"image": torch.full((1, 1), v), "label": torch.zeros(1, 1)} for v in values],
        network=network,
        optimizer=torch.optim.AdamW(network.parameters(), lr=0.1, weight_decay=0.5),
        loss_function=lambda pred, label: pred.sum(),
        train_handlers=[GradientClipHandler(max_norm=1.0, max_skipped_in_a_row=max_skipped_in_a_row)],
    )
    trainer.run()
    return network, trainer


def test_non_finite_gradients_skip_the_step_instead_of_poisoning_the_weights():
    network, trainer = _train_on([1.0, float("inf"), float("nan"), 1.0])
    assert trainer.state.skipped_steps == 2
    assert torch.isfinite(network.weight).all()
    two_good_steps, _ = _train_on([1.0, 1.0])
    assert torch.equal(network.weight, two_good_steps.weight)  # the skipped steps changed nothing, decay included

    _, clean = _train_on([1.0])
    assert getattr(clean.state, "skipped_steps", 0) == 0


def test_non_finite_gradients_in_a_row_end_the_run():
    import pytest

    with pytest.raises(RuntimeError, match="not finite for 3 steps in a row"):
        _train_on([1.0, float("inf"), float("inf"), float("inf"), 1.0], max_skipped_in_a_row=3)
    network, trainer = _train_on([float("inf"), float("inf"), 1.0, float("inf"), float("inf")], max_skipped_in_a_row=3)
    assert trainer.state.skipped_steps == 4 and torch.isfinite(network.weight).all()
