"""pneumoseg.engine.checkpoints: atomic checkpoints, and a resume that restores the best metric and early stopping.

The engines are MONAI's (SupervisedTrainer, SupervisedEvaluator, ValidationHandler) around a one-weight network;
the validation score of each epoch is the test's input (set on the evaluator before the handlers read it), so
the epochs that improve and the ones that do not are known in advance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler, stopping_fn_from_metric

from pneumoseg.engine.checkpoints import BestModelSaver, LastCheckpointSaver, ResumeCheckpointLoader, save_atomically
from pneumoseg.engine.handlers import ResumableEarlyStopHandler, StopAtEpoch

# validation score per epoch: best at 2, then no improvement for 3 validations -> early stop after epoch 5 of 6
SCORES = {1: 0.5, 2: 0.7, 3: 0.6, 4: 0.65, 5: 0.4, 6: 0.9}
PATIENCE = 3


def _run(folder: Path, resume: bool = False, stop_epoch: int | None = None, restore: tuple[str, ...] = ()) -> dict:
    """One training process: fresh objects, as a new run of the bundle builds them."""
    torch.manual_seed(0)
    network = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    data = [{"image": torch.ones(1, 1), "label": torch.full((1, 1), 3.0)}]
    best_model = BestModelSaver(str(folder), network, metric_name="val_siim_dice")
    early_stop = ResumableEarlyStopHandler(PATIENCE, stopping_fn_from_metric("val_siim_dice"))
    evaluator = SupervisedEvaluator(device="cpu", val_data_loader=data, network=network)
    evaluator.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_siim_dice=SCORES[e.state.epoch])
    )
    early_stop.attach(evaluator)
    best_model.attach(evaluator)
    state = {"model": network, "optimizer": optimizer, "lr_scheduler": scheduler}
    state.update(best_model=best_model, early_stop=early_stop)
    loaded = {k: v for k, v in state.items() if k in ("model", "optimizer", "lr_scheduler", *restore)}
    last = folder / "checkpoint_last.pt"
    validated: list[int] = []
    evaluator.add_event_handler(Events.COMPLETED, lambda e: validated.append(e.state.epoch))
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=6,
        train_data_loader=data,
        network=network,
        optimizer=optimizer,
        loss_function=torch.nn.MSELoss(),
        train_handlers=[
            ResumeCheckpointLoader(str(last), loaded, enabled=resume),
            ValidationHandler(1, evaluator),
            StopAtEpoch(stop_epoch),
            LastCheckpointSaver(str(folder), state),
        ],
    )
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: scheduler.step())
    early_stop.set_trainer(trainer)
    trainer.run()
    return {"epoch": trainer.state.epoch, "validated": validated, "model": torch.load(folder / "model.pt")}


def test_resume_after_a_validation_restores_best_metric_and_early_stopping(tmp_path: Path):
    straight = _run(tmp_path / "straight")
    assert straight["epoch"] == 5 and straight["validated"] == [1, 2, 3, 4, 5]  # stopped early, not at 6

    first = _run(tmp_path / "resumed", stop_epoch=2)  # an interruption after the best validation so far
    assert first["validated"] == [1, 2]
    saved = torch.load(tmp_path / "resumed/checkpoint_last.pt", weights_only=True)
    assert saved["best_model"] == {"best_metric": 0.7, "best_epoch": 2}
    assert saved["early_stop"] == {"counter": 0, "best_score": 0.7}
    model_at_2 = (tmp_path / "resumed/model.pt").read_bytes()

    resumed = _run(tmp_path / "resumed", resume=True, restore=("best_model", "early_stop"))
    assert resumed["validated"] == [3, 4, 5] and resumed["epoch"] == 5  # early stopping counted on from epoch 2
    assert (tmp_path / "resumed/model.pt").read_bytes() == model_at_2  # worse epochs 3-5 never replaced it
    assert torch.equal(resumed["model"]["weight"], straight["model"]["weight"])
    final = torch.load(tmp_path / "resumed/checkpoint_last.pt", weights_only=True)
    assert final["best_model"] == {"best_metric": 0.7, "best_epoch": 2}
    assert final["early_stop"] == {"counter": 3, "best_score": 0.7}

    # the same resume without the two states (the old behaviour) gets both wrong: the test can tell
    _run(tmp_path / "forgetful", stop_epoch=2)
    forgetful = _run(tmp_path / "forgetful", resume=True)
    assert not torch.equal(forgetful["model"]["weight"], straight["model"]["weight"])  # epoch 3 replaced it
    assert forgetful["epoch"] == 6


def test_a_run_resumed_after_early_stopping_ends_at_once(tmp_path: Path):
    _run(tmp_path)  # early stopping ended it after epoch 5
    again = _run(tmp_path, resume=True, restore=("best_model", "early_stop"))
    assert again["validated"] == [] and again["epoch"] == 5


def test_save_atomically_keeps_the_old_file_whole_when_a_write_fails(tmp_path: Path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    path = tmp_path / "models" / "model.pt"
    save_atomically({"w": torch.ones(3)}, path)
    (path.parent / ".model.pt.stale.tmp").write_bytes(b"half a file from a killed write")
    with pytest.raises(RuntimeError, match="disk full"):
        save_atomically({"w": torch.zeros(3), "x": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temporary file left behind
    save_atomically({"w": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(3))


def test_a_metric_without_a_value_never_wins_but_a_run_always_leaves_a_model(tmp_path: Path):
    """NaN scores (positive-only Dice on a validation split without a positive image): the first model is
    written so the run leaves one, a model.pt of an earlier run in the folder is not kept, a real score wins."""
    from types import SimpleNamespace

    network = torch.nn.Linear(1, 1, bias=False)
    (tmp_path / "model.pt").write_bytes(b"an earlier run's model")
    saver = BestModelSaver(str(tmp_path), network, metric_name="val_siim_dice_positive")

    def validate(epoch: int, score: float, weight: float) -> float:
        torch.nn.init.constant_(network.weight, weight)
        saver(SimpleNamespace(state=SimpleNamespace(epoch=epoch, metrics={"val_siim_dice_positive": score})))
        return float(torch.load(tmp_path / "model.pt", weights_only=True)["weight"])

    assert validate(1, float("nan"), 1.0) == 1.0  # written: the run had no model yet
    assert validate(2, float("nan"), 2.0) == 1.0  # not replaced by another score-less model
    assert saver.state_dict() == {"best_metric": None, "best_epoch": None}
    assert validate(3, 0.1, 3.0) == 3.0  # any real score beats no score
    assert validate(4, float("nan"), 4.0) == 3.0
    assert saver.state_dict() == {"best_metric": 0.1, "best_epoch": 3}
