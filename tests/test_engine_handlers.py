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
