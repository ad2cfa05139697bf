"""The bundle's ``average_top_k.json`` overlay, by its literal command: the k best validations kept, averaged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import synthetic_siim_manifest

from pneumoseg.engine.averaging import average_state_dicts
from pneumoseg.model_record import load_trained_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_top_k_overlay_keeps_the_best_validations_and_their_average_loads(tmp_path: Path):
    manifest = synthetic_siim_manifest(tmp_path / "data", 12, seed=4, val_fraction=0.25, test_fraction=0.0)
    bundle = tmp_path / "bundle"
    shutil.copytree(REPO / "bundles" / "pneumothorax_scse_unet" / "configs", bundle / "configs")
    configs = str([str(bundle / "configs" / "train.json"), str(bundle / "configs" / "average_top_k.json")])
    command = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", configs, "--bundle_root", str(bundle),
        "--datalist", str(manifest), "--num_epochs", "3", "--average_top_k", "2", "--image_size", "64",
        "--num_workers", "0", "--network_def#decoder_channels", "[16,8,8,8,8]", "--batch_size", "4",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    history = [json.loads(line) for line in (bundle / "eval" / "metrics_history.jsonl").read_text().splitlines()]
    kept = json.loads((bundle / "models" / "top_k" / "top_k.json").read_text())
    scores = sorted((h["val_siim_dice_positive"] for h in history), reverse=True)  # the selection metric
    assert [round(e["score"], 6) for e in kept] == [round(s, 6) for s in scores[:2]]
    files = sorted(p.name for p in (bundle / "models" / "top_k").glob("*.pt"))
    assert files == sorted(e["file"] for e in kept)
    states = [torch.load(bundle / "models" / "top_k" / f, weights_only=True) for f in files]
    averaged = torch.load(bundle / "models" / "model_top_k_average.pt", weights_only=True)
    for key, value in average_state_dicts(states).items():
        torch.testing.assert_close(averaged[key], value)
    model = load_trained_model(bundle, weights="models/model_top_k_average.pt")  # strict, into the record's network
    assert model.record.network.kwargs["decoder_channels"] == (16, 8, 8, 8, 8)
