"""Weight averaging: the mean of state dicts, and the top-k validation checkpoints of a run kept and averaged."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from pneumoseg.engine.averaging import TopKAverager, average_state_dicts


def test_average_of_state_dicts():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(2), "h": torch.tensor([1.0], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(7), "h": torch.tensor([2.0], dtype=torch.bfloat16)}
    mean = average_state_dicts([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and int(mean["n"]) == 7
    assert mean["h"].dtype == torch.bfloat16 and float(mean["h"]) == 1.5
    with pytest.raises(ValueError, match="keys"):
        average_state_dicts([a, {"w": a["w"]}])
    with pytest.raises(ValueError, match="shapes"):
        average_state_dicts([a, {**b, "w": torch.zeros(3)}])


def _validate(averager: TopKAverager, network: torch.nn.Module, epoch: int, score: float, value: float) -> None:
    with torch.no_grad():
        network.weight.fill_(value)
    trainer = SimpleNamespace(state=SimpleNamespace(epoch=epoch))
    averager.epoch_engine = trainer
    averager(SimpleNamespace(state=SimpleNamespace(metrics={"val_siim_dice": score})))


def test_top_k_keeps_the_best_validations_and_their_average_survives_a_restart(tmp_path):
    network = torch.nn.Linear(2, 1, bias=False)
    averager = TopKAverager(tmp_path / "top_k", network, k=2, average_path=tmp_path / "avg.pt")
    for epoch, score, value in ((1, 0.5, 1.0), (2, 0.7, 2.0), (3, 0.6, 3.0)):
        _validate(averager, network, epoch, score, value)
    assert sorted(p.name for p in (tmp_path / "top_k").glob("*.pt")) == ["epoch_0002.pt", "epoch_0003.pt"]
    assert torch.equal(torch.load(tmp_path / "avg.pt")["weight"], torch.full((1, 2), 2.5))
    # a resumed run reads the list back: a worse validation changes nothing, a better one displaces the worst
    resumed = TopKAverager(tmp_path / "top_k", network, k=2, average_path=tmp_path / "avg.pt")
    _validate(resumed, network, 4, 0.55, 9.0)
    assert torch.equal(torch.load(tmp_path / "avg.pt")["weight"], torch.full((1, 2), 2.5))
    _validate(resumed, network, 5, 0.8, 6.0)
    kept = json.loads((tmp_path / "top_k" / "top_k.json").read_text())
    assert [e["epoch"] for e in kept] == [5, 2]
    assert sorted(p.name for p in (tmp_path / "top_k").glob("*.pt")) == ["epoch_0002.pt", "epoch_0005.pt"]
    assert torch.equal(torch.load(tmp_path / "avg.pt")["weight"], torch.full((1, 2), 4.0))


def test_a_validation_without_a_score_ranks_below_every_scored_one(tmp_path):
    """NaN (e.g. positive-only Dice on a split without a positive image) is kept only while slots are free."""
    network = torch.nn.Linear(2, 1, bias=False)
    averager = TopKAverager(tmp_path / "top_k", network, k=2, average_path=tmp_path / "avg.pt")
    for epoch, score, value in ((1, float("nan"), 1.0), (2, 0.1, 2.0), (3, 0.2, 4.0)):
        _validate(averager, network, epoch, score, value)
    listing = (tmp_path / "top_k" / "top_k.json").read_text()
    assert [e["epoch"] for e in json.loads(listing)] == [3, 2] and "NaN" not in listing
    assert torch.equal(torch.load(tmp_path / "avg.pt")["weight"], torch.full((1, 2), 3.0))
