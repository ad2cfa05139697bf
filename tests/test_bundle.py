"""The bundle's literal commands, run as subprocesses on tiny synthetic phantoms (64 px, CPU).

One training run is shared (module fixture) by the training, evaluation and inference tests; the
resume test trains three more short runs. A small decoder keeps every run at a few seconds per epoch.
The resume logic itself (best metric, early stopping, a worse epoch after a resume) is tested with scripted
validation scores in test_engine_checkpoints.py; here, that the configs wire it and that a resumed run is the
straight run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import synthetic_siim_manifest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "pneumothorax_scse_unet"
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# trained at 64 px (not the default 512): evaluation and inference must read it from the model record
SMALL = ["--image_size", "64", "--num_workers", "0", "--network_def#decoder_channels", "[16,8,8,8,8]"]
TRAIN = [*SMALL, "--batch_size", "4", "--val_batch_size", "4", "--cache_rate", "1.0"]
EVALUATE = ["--num_workers", "0"]  # image size and network come from models/model_record.json

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    result.output = result.stdout + result.stderr  # type: ignore[attr-defined]
    return result


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.output[-4000:]
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = synthetic_siim_manifest(
        tmp_path_factory.mktemp("phantoms"), 16, seed=3, val_fraction=0.25, test_fraction=0.0
    )
    manifest = json.loads(path.read_text())
    assert manifest["training"] and manifest["validation"]
    return path


def _bundle_copy(where: Path) -> Path:
    """A private copy of the bundle (configs, no weights), so tests never write into the repository."""
    dest = where / "pneumothorax_scse_unet"
    shutil.copytree(BUNDLE, dest, ignore=shutil.ignore_patterns("*.pt", "eval", "predictions"))
    return dest


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """`run training` for 2 epochs, launched from the repository root (so with --bundle_root)."""
    bundle = _bundle_copy(tmp_path_factory.mktemp("trained"))
    result = _run(
        [PYTHON, "-m", "monai.bundle", "run", "training",
         "--meta_file", str(bundle / "configs/metadata.json"), "--config_file", str(bundle / "configs/train.json"),
         "--bundle_root", str(bundle), "--datalist", str(data), "--num_epochs", "2", *TRAIN],
        cwd=REPO,
    )  # fmt: skip
    return bundle, _ok(result)


def test_train_two_epochs_writes_model_checkpoint_and_metrics(trained):
    from monai.handlers import CheckpointLoader
    from monai.utils import set_determinism

    from pneumoseg.networks import SCSEUNet

    bundle, result = trained
    manifest = json.loads(Path(result.args[result.args.index("--datalist") + 1]).read_text())
    n_train, n_val = len(manifest["training"]), len(manifest["validation"])
    assert f"training images: {n_train} | validation images: {n_val}" in result.output
    assert "val_siim_dice" in result.output  # StatsHandler logged the validation metrics
    # the record of how the model must be fed, written when training started
    from pneumoseg.model_record import ModelRecord, load_trained_model

    record = ModelRecord.read(bundle / "models/model_record.json")
    assert record.kinds == ("radiograph",) and record.radiograph.image_size == 64
    assert record.network.kwargs["decoder_channels"] == (16, 8, 8, 8, 8)
    assert record.postprocessing.t_cls == record.operating_threshold == 0.5  # safe before evaluate has run
    assert tuple(load_trained_model(bundle).network.init_kwargs["decoder_channels"]) == (16, 8, 8, 8, 8)
    # best-metric model: a plain state dict, readable with weights_only=True and by CheckpointLoader
    state = torch.load(bundle / "models/model.pt", weights_only=True)
    network = SCSEUNet(decoder_channels=(16, 8, 8, 8, 8))
    network.load_state_dict(state)
    set_determinism(0)
    fresh = SCSEUNet(decoder_channels=(16, 8, 8, 8, 8))
    CheckpointLoader(str(bundle / "models/model.pt"), {"model": fresh})(SimpleEngine())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), network.state_dict().values()))
    # last checkpoint: everything needed to resume, the best metric and early stopping included
    last = torch.load(bundle / "models/checkpoint_last.pt", weights_only=True)
    assert set(last) == {"model", "optimizer", "lr_scheduler", "trainer", "best_model", "early_stop"}
    assert last["trainer"]["epoch_length"] == n_train // 4  # batch 4, drop_last
    assert last["trainer"]["iteration"] == 2 * (n_train // 4)
    history = [json.loads(line) for line in (bundle / "eval/metrics_history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert any(e.get("has_pneumothorax") for e in manifest["validation"])  # positive-only Dice has a value
    scores = [h["val_siim_dice_positive"] for h in history]  # the selection metric
    best = {"best_metric": pytest.approx(max(scores)), "best_epoch": 1 + scores.index(max(scores))}
    assert last["best_model"] == best  # a later equal score does not replace the first model to reach it
    assert last["early_stop"]["best_score"] == pytest.approx(max(scores))
    assert last["early_stop"]["counter"] == (1 if scores[1] <= scores[0] + 1e-4 else 0)  # min_delta 1e-4
    assert {"val_siim_dice", "val_siim_dice_positive", "val_auc", "val_sensitivity", "val_specificity"} <= set(
        history[-1]
    )
    assert 0.0 <= history[-1]["val_siim_dice"] <= 1.0
    assert list((bundle / "eval").glob("events.out.tfevents.*"))  # TensorBoard


class SimpleEngine:
    """Just enough of an Ignite engine for ``CheckpointLoader.__call__``."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.state = SimpleNamespace(max_epochs=None, epoch=0)
        self.logger = __import__("logging").getLogger("test")


def test_resume_after_a_validation_matches_straight_run(tmp_path: Path, data: Path):
    """Stopped after epoch 2 (validated at 1 and 2), resumed: the same validations, best model and states."""
    bundle = _bundle_copy(tmp_path)
    common = [PYTHON, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--datalist", str(data),
              "--num_epochs", "3", "--val_interval", "1", *TRAIN]  # fmt: skip
    _ok(_run([*common, "--bundle_root", str(tmp_path / "straight")], cwd=bundle))
    stopped = _ok(_run([*common, "--bundle_root", str(tmp_path / "resumed"), "--stop_epoch", "2"], cwd=bundle))
    assert "stopping after epoch 2" in stopped.output
    resumed = _ok(_run([*common, "--bundle_root", str(tmp_path / "resumed"), "--resume", "True"], cwd=bundle))
    assert "Epoch: 1/3" not in resumed.output and "Epoch: 3/3" in resumed.output  # went on at epoch 3

    def history(run: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / run / "eval/metrics_history.jsonl").read_text().splitlines()]

    straight, again = history("straight"), history("resumed")
    assert [h["epoch"] for h in straight] == [h["epoch"] for h in again] == [1, 2, 3]
    for a_line, b_line in zip(straight, again):
        for key in ("val_siim_dice", "val_siim_dice_positive", "val_auc"):
            if a_line[key] is None:
                assert b_line[key] is None
            else:
                assert abs(a_line[key] - b_line[key]) <= 1e-6, key

    def max_difference(a: dict, b: dict) -> float:
        assert a.keys() == b.keys()
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)

    a = torch.load(tmp_path / "straight/models/checkpoint_last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed/models/checkpoint_last.pt", weights_only=True)
    assert a["trainer"] == b["trainer"]
    assert max_difference(a["model"], b["model"]) <= 1e-6
    # the best metric and the early-stopping state went through the interruption: model.pt is the same model
    assert b["best_model"]["best_epoch"] == a["best_model"]["best_epoch"]
    assert b["best_model"]["best_metric"] == pytest.approx(a["best_model"]["best_metric"], abs=1e-6)
    assert b["early_stop"]["counter"] == a["early_stop"]["counter"]
    best_a = torch.load(tmp_path / "straight/models/model.pt", weights_only=True)
    best_b = torch.load(tmp_path / "resumed/models/model.pt", weights_only=True)
    assert max_difference(best_a, best_b) <= 1e-6


def test_evaluate_prints_and_saves_metrics_and_postprocessing(trained, data: Path):
    bundle, _ = trained
    evaluate = [
        PYTHON,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['configs/train.json','configs/evaluate.json']",
        "--dataset_dir",
        str(data.parent),
        *EVALUATE,
    ]  # fmt: skip  (dataset_dir/manifest.json)
    refused = _run([*evaluate, "--image_size", "128"], cwd=bundle)  # conflicts with the record: never silent
    assert refused.returncode != 0 and "image_size 128 conflicts with the model record" in refused.output
    result = _ok(_run(evaluate, cwd=bundle))
    report = json.loads((bundle / "eval/metrics.json").read_text())
    assert '"siim_dice_after"' in result.output  # printed
    assert report["split"] == "validation" and report["checkpoint"].endswith("model.pt")
    for key in ("val_siim_dice", "val_siim_dice_positive", "val_auc", "val_sensitivity", "val_specificity"):
        assert key in report
    # "before" is the plain 0.5 threshold = the evaluator's own SIIM Dice; the search can only improve on it
    assert report["siim_dice_before"] == pytest.approx(report["val_siim_dice"], abs=1e-6)
    assert report["siim_dice_after"] >= report["siim_dice_before"] - 1e-9
    # the thresholds' one home is the model record, which inference reads
    from pneumoseg.model_record import ModelRecord

    record = ModelRecord.read(bundle / "models/model_record.json")
    assert (record.postprocessing.t_cls, record.postprocessing.top, record.postprocessing.min_area,
            record.postprocessing.bottom) == (report["pp_t_cls"], report["pp_top"], report["pp_min_area"],
                                               report["pp_bottom"])  # fmt: skip
    assert record.training["postprocessing_source"] == "validation search"
    assert report["pp_images"] == len(json.loads(data.read_text())["validation"])
    assert not (bundle / "configs/postprocessing.json").exists()

    # any other split is measured with the validation-tuned values the record holds, never tuned on itself
    tuned = (bundle / "models/model_record.json").read_bytes()
    refused = _run([*evaluate, "--eval_split", "training", "--search_postprocessing", "True"], cwd=bundle)
    assert refused.returncode != 0 and "tuned on the validation split ('validation') only" in refused.output
    other = bundle / "eval/metrics_training.json"
    _ok(_run([*evaluate, "--eval_split", "training", "--metrics_file", str(other)], cwd=bundle))
    measured = json.loads(other.read_text())
    assert measured["split"] == "training" and "siim_dice_after" not in measured  # no search
    assert measured["postprocessing"] == dataclasses.asdict(record.postprocessing)
    assert measured["postprocessing_source"] == "validation search"
    assert (bundle / "models/model_record.json").read_bytes() == tuned  # the record is left as it was
    assert json.loads((bundle / "eval/metrics.json").read_text()) == report  # the validation report too


def test_inference_writes_masks_for_a_folder(trained, tmp_path: Path):
    from PIL import Image

    from pneumoseg.data.phantoms import synthesize

    bundle, _ = trained
    synthesize(tmp_path / "new", radiographs=3, size=96, ct=0, seed=11, workers=1)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for dcm in (tmp_path / "new").rglob("*.dcm"):
        shutil.copy(dcm, inputs / dcm.name)
    out = tmp_path / "masks"
    _ok(
        _run(
            [PYTHON, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
             "--input_dir", str(inputs), "--output_dir", str(out), "--num_workers", "0"],
            cwd=bundle,
        )
    )  # fmt: skip
    # one implementation behind both: configs/inference.json runs pneumoseg.infer.BatchInferenceRunner
    masks = sorted(out.glob("scans/*/mask.png"))
    assert len(masks) == 3
    assert all(Image.open(m).size == (96, 96) for m in masks)  # back at the source size, not the 64 px model input
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)
    assert all((out / r["seg"]).is_file() and (out / r["overlay"]).is_file() for r in rows)


def test_evaluate_and_infer_give_the_same_probabilities_and_masks(trained, data: Path, tmp_path: Path):
    """Trained at 64 px (not the default 512): evaluation (evaluate.json's evaluator) and `pneumoseg infer
    --bundle` read one model record, so the same images give the same probabilities and masks (fp32)."""
    import numpy as np
    from ignite.engine import Events
    from monai.bundle import ConfigParser
    from PIL import Image

    from pneumoseg.cli import main

    bundle, _ = trained
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs/train.json"), str(bundle / "configs/evaluate.json")])
    parser.update({"bundle_root": str(bundle), "dataset_dir": str(data.parent), "num_workers": 0,
                   "search_postprocessing": False, "val_batch_size": 4, "cache_rate": 0.0})  # fmt: skip
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluated: dict[str, tuple[float, np.ndarray]] = {}

    def collect(engine) -> None:
        names = engine.state.batch["image"].meta["filename_or_obj"]
        for name, p, mask in zip(names, engine.state.output["pred_cls"], engine.state.output["pred"]):
            evaluated[Path(name).name] = (float(p), mask[0].numpy() > 0.5)

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, collect)
    evaluator.run()
    images = tmp_path / "validation"
    images.mkdir()
    for entry in json.loads(data.read_text())["validation"]:
        shutil.copy(data.parent / entry["image"], images / Path(entry["image"]).name)
    out = tmp_path / "inferred"
    argv = ["infer", str(images), str(out), "--bundle", str(bundle), "--fp32", "--workers", "0", "--formats", "png",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    rows = {r["scan_id"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert sorted(rows) == sorted(evaluated) and len(rows) >= 2
    for name, (probability, mask) in evaluated.items():
        assert abs(float(rows[name]["probability"]) - probability) <= 1e-5, name
        assert np.array_equal(np.asarray(Image.open(out / rows[name]["mask"])) > 0, mask), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_train_one_epoch_and_evaluate(tmp_path: Path, data: Path):
    bundle = _bundle_copy(tmp_path)
    torchrun = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "monai.bundle", "run"]
    result = _ok(
        _run(
            [*torchrun, "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
             "--datalist", str(data), "--num_epochs", "1", *SMALL, "--batch_size", "2", "--val_batch_size", "2"],
            cwd=bundle,
        )
    )  # fmt: skip
    assert "rank 0 of 2" in result.output and "rank 1 of 2" in result.output
    assert sorted(p.name for p in (bundle / "models").glob("*.pt")) == ["checkpoint_last.pt", "model.pt"]
    last = torch.load(bundle / "models/checkpoint_last.pt", weights_only=True)
    n_train = len(json.loads(data.read_text())["training"])
    assert last["trainer"]["iteration"] == n_train // 2 // 2  # per rank: half the images, batch 2
    assert not any(k.startswith("module.") for k in last["model"])  # DDP unwrapped
    assert last["best_model"]["best_epoch"] == 1
    assert len((bundle / "eval/metrics_history.jsonl").read_text().splitlines()) == 1  # rank 0 alone
    assert len({p.name.split(".")[3] for p in (bundle / "eval").glob("events.out.tfevents.*")}) == 1  # one pid
    assert result.output.count("Epoch[1] Metrics --") == 1  # rank 0 alone logs (StatsHandler disabled elsewhere)

    evaluated = _ok(
        _run(
            [*torchrun, "--config_file",
             "['configs/train.json','configs/evaluate.json','configs/multi_gpu_evaluate.json']",
             "--datalist", str(data), "--num_workers", "0", "--val_batch_size", "2"],
            cwd=bundle,
        )
    )  # fmt: skip
    assert "rank 1 of 2" in evaluated.output
    report = json.loads((bundle / "eval/metrics.json").read_text())
    # every rank's validation images in the search and the metrics (all-gathered), one report from rank 0
    assert report["pp_images"] == len(json.loads(data.read_text())["validation"])
    assert report["siim_dice_before"] == pytest.approx(report["val_siim_dice"], abs=1e-6)


def test_verify_metadata_offline_and_verify_net_in_out(tmp_path: Path):
    bundle = _bundle_copy(tmp_path)
    verify = [PYTHON, "-m", "monai.bundle", "verify_metadata", "--filepath", "configs/meta_schema.json"]
    assert (
        "metadata is verified with no error"
        in _ok(_run([*verify, "--meta_file", "configs/metadata.json"], bundle)).output
    )
    broken = json.loads((bundle / "configs/metadata.json").read_text())
    del broken["network_data_format"]["inputs"]["image"]["num_channels"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    assert _run([*verify, "--meta_file", str(tmp_path / "broken.json")], bundle).returncode != 0
    result = _ok(
        _run(
            [PYTHON, "-m", "monai.bundle", "verify_net_in_out", "network_seg", "--meta_file", "configs/metadata.json",
             "--config_file", "configs/train.json", *SMALL[:2]],
            cwd=bundle,
        )
    )  # fmt: skip
    assert "data shape of network is verified with no error" in result.output


def test_broken_manifest_fails_before_training_naming_the_entry(tmp_path: Path, data: Path):
    manifest = json.loads(data.read_text())
    manifest["data_root"] = str(data.parent)
    manifest["training"][1]["image"] = "dicom-images-train/nowhere/missing.dcm"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(manifest))
    bundle = _bundle_copy(tmp_path)
    result = _run(
        [PYTHON, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--datalist", str(broken), *TRAIN],
        cwd=bundle,
    )
    assert result.returncode != 0
    assert f"{broken}[training][1] dicom-images-train/nowhere/missing.dcm: image file not found" in result.output
    assert "Engine run" not in result.output  # failed in initialize, before any engine started


def test_ct_trains_on_axial_slices_and_infers_a_3d_mask(tmp_path: Path):
    import nibabel as nib
    import numpy as np

    from pneumoseg.data.manifest import build_nifti_manifest, write_manifest
    from pneumoseg.data.phantoms import synthesize

    synthesize(tmp_path / "ct", radiographs=0, ct=3, ct_size=32, ct_slices=6, seed=5, workers=1)
    images = tmp_path / "ct/ct-nifti/images"
    manifest, summary = build_nifti_manifest(
        images, tmp_path / "ct/ct-nifti/labels", tmp_path / "ct", salt="test", val_fraction=0.34,
        test_fraction=0.0, folds=0, progress=False,
    )  # fmt: skip
    write_manifest(manifest, tmp_path / "ct/manifest.json", summary)
    bundle = _bundle_copy(tmp_path)
    _ok(
        _run(
            [PYTHON, "-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/ct.json']",
             "--datalist", str(tmp_path / "ct/manifest.json"), "--num_epochs", "1", "--ct_slices_per_volume", "2",
             *SMALL, "--batch_size", "2", "--cache_rate", "1.0"],
            cwd=bundle,
        )
    )  # fmt: skip
    assert (bundle / "models/model.pt").is_file()
    from monai.bundle import ConfigParser

    from pneumoseg.model_record import ModelRecord

    # one selection metric, positive-only Dice, for radiographs and CT, unless overridden
    for configs, override in ((["train.json"], {}), (["train.json", "ct.json"], {"selection_metric": "val_siim_dice"})):
        parser = ConfigParser()
        parser.read_config([str(bundle / "configs" / c) for c in [*configs, "average_top_k.json"]])
        parser.update({"bundle_root": str(tmp_path / "unused"), **override})
        metric = override.get("selection_metric", "val_siim_dice_positive")
        assert parser.get_parsed_content("validate#best_model").metric_name == metric
        assert parser.get_parsed_content("top_k_averager#metric_name") == metric
    record = ModelRecord.read(bundle / "models/model_record.json")
    assert record.kinds == ("ct",) and record.ct.image_size == 64 and record.ct.orientation == "RAS"
    out = tmp_path / "ct_masks"
    _ok(
        _run(
            [PYTHON, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
             "--input_dir", str(images), "--output_dir", str(out), "--num_workers", "0"],
            cwd=bundle,
        )
    )  # fmt: skip
    with open(out / "report.csv", newline="") as f:
        rows = {Path(r["input"]).name: r for r in csv.DictReader(f)}
    assert len(rows) == 3
    for source in sorted(images.glob("*.nii.gz")):
        image = nib.load(str(source))
        mask = nib.load(str(out / rows[source.name]["mask"]))
        assert mask.shape == image.shape  # back on the source grid (the model saw 64 x 64 slices)
        assert np.allclose(mask.affine, image.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
