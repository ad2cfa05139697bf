"""The models of a run (pneumoseg.infer.models): loaded from records as data, each image kind routed to the
model trained on it, the record deciding how scans are fed."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_bundle

from pneumoseg.cli import main
from pneumoseg.data import phantoms
from pneumoseg.infer import BatchInferenceRunner
from pneumoseg.infer.models import FlipTTA, MeanEnsemble, ModelSetError, load_models, with_flip_tta
from pneumoseg.networks import SCSEUNetOutput


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One radiograph and one CT volume (NIfTI)."""
    root = tmp_path_factory.mktemp("inputs")
    case = phantoms.plan_radiographs(1, seed=6, size=96)[0]
    image, _ = phantoms.draw_radiograph_case(case, 6, 96)
    phantoms.write_radiograph_dicom(root / "cr.dcm", image, case)
    ct = phantoms.plan_ct(1, seed=6)[0]
    hu, mask, spacing = phantoms.draw_ct_case(ct, 6, 48, 4)
    phantoms.write_ct_nifti(root / "ct.nii.gz", root.parent / "label_not_an_input.nii.gz", hu, mask, spacing)
    return root


def _rows(out: Path) -> dict[str, dict]:
    return {r["scan_id"]: r for r in json.loads((out / "report.json").read_text())["rows"]}


def _run(bundles, inputs: Path, out: Path) -> int:
    return BatchInferenceRunner(bundles, str(inputs), str(out), device="cpu", workers=0, fp32=True, progress=False,
                                formats="png,nifti").run()  # fmt: skip


def test_each_kind_goes_to_the_model_trained_on_it(inputs, tmp_path):
    radiograph = tiny_bundle(tmp_path / "rad", kinds=("radiograph",))
    ct = tiny_bundle(tmp_path / "ct", kinds=("ct",), image_size=32, seed=1)
    out = tmp_path / "both"
    assert _run([str(radiograph), str(ct)], inputs, out) == 0
    rows = _rows(out)
    assert rows["cr.dcm"]["status"] == rows["ct.nii.gz"]["status"] == "ok"
    records = {sid: json.loads((out / "scans" / sid / "record.json").read_text()) for sid in rows}
    models = load_models([radiograph, ct])
    assert records["cr.dcm"]["fingerprint"] == models["radiograph"].fingerprint
    assert records["ct.nii.gz"]["fingerprint"] == models["ct"].fingerprint
    assert set(json.loads((out / "run.json").read_text())["models"]) == {"radiograph", "ct"}
    # a radiograph model alone: the CT volume is a skipped row saying why, and loses its outputs
    only = tmp_path / "only_radiographs"
    assert _run(str(radiograph), inputs, only) == 0
    row = _rows(only)["ct.nii.gz"]
    assert row["status"] == "skipped" and row["reason"] == "model not trained on ct images (no --bundle for ct)"
    assert _run([str(radiograph), str(ct)], inputs, only) == 0  # adding the CT model is allowed
    assert (only / "scans" / "ct.nii.gz" / "mask.nii.gz").is_file()
    with pytest.raises(Exception, match="another model"):  # dropping it again would mix: refused
        _run(str(radiograph), inputs, only)


def test_two_models_of_one_kind_or_a_model_file_with_two_bundles_are_usage_errors(inputs, tmp_path, capsys):
    a = tiny_bundle(tmp_path / "a", kinds=("radiograph", "ct"))
    b = tiny_bundle(tmp_path / "b", kinds=("radiograph",), seed=2)
    with pytest.raises(ModelSetError, match="two models trained on radiograph"):
        load_models([a, b])
    base = ["infer", str(inputs), str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    assert main([*base, "--bundle", str(a), "--bundle", str(b)]) == 2
    assert "one --bundle per image kind" in capsys.readouterr().err
    assert main([*base, "--bundle", str(a), "--bundle", str(b), "--model", str(tmp_path / "m.onnx")]) == 2
    assert "exactly one --bundle" in capsys.readouterr().err


def test_the_record_decides_how_scans_are_fed(inputs, tmp_path):
    """The input size, percentiles and CT window come from the record: a model trained at 128 px is fed
    128 px, without any option."""
    from pneumoseg.infer.dataset import ScanDataset
    from pneumoseg.infer.discovery import discover_scans
    from pneumoseg.model_record import ModelRecord

    bundle = tiny_bundle(tmp_path / "b", kinds=("radiograph", "ct"), image_size=128)
    record = ModelRecord.read(bundle / "models" / "model_record.json")
    scans = discover_scans(inputs)
    dataset = ScanDataset(scans, {kind: record for kind in record.kinds}, need_headers=False)
    items = {scan.kind: dataset[i] for i, scan in enumerate(scans)}
    assert tuple(items["radiograph"]["image"].shape) == (1, 128, 128)
    assert tuple(items["nifti"]["image"].shape)[:3] == (1, 128, 128)
    lo, hi = record.ct.window  # air outside the body, -1000 HU, through the record's window
    assert float(items["nifti"]["image"][0, 0, 0, 0]) == pytest.approx((-1000 - lo) / (hi - lo), abs=0.02)


def test_a_bundle_is_read_as_data_never_run(inputs, tmp_path):
    """Configs of a received bundle are never parsed: an expression in its inference.json does not run, the
    bundle is not put on sys.path, the working directory stays."""
    bundle = tiny_bundle(tmp_path / "received")
    marker = tmp_path / "MARKER"
    hostile = {"network_def": f"$__import__('pathlib').Path({str(marker)!r}).touch()",
               "runner": {"_target_": "os.system", "command": f"touch {marker}"}}  # fmt: skip
    (bundle / "configs" / "inference.json").write_text(json.dumps(hostile))
    (bundle / "configs" / "train.json").write_text(json.dumps(hostile))
    (bundle / "pneumoseg").mkdir()
    (bundle / "pneumoseg" / "__init__.py").write_text(f"open({str(marker)!r}, 'w')\n")
    cwd, path = os.getcwd(), list(sys.path)
    argv = ["infer", str(inputs), str(tmp_path / "out"), "--bundle", str(bundle), "--device", "cpu", "--no-progress",
            "--workers", "0", "--formats", "png"]  # fmt: skip
    assert main(argv) == 0
    assert not marker.exists() and os.getcwd() == cwd and sys.path == path


def test_routing_accepts_its_own_output(tmp_path):
    from pneumoseg.infer.models import route_models

    models = load_models([tiny_bundle(tmp_path / "both", kinds=("radiograph", "ct"))])
    assert route_models(models) == models and models["radiograph"] is models["ct"]
    assert route_models(list({id(m): m for m in models.values()}.values())) == models


# ---------------------------------------------------------------------------------------- TTA, ensembles


class _Recorder(torch.nn.Module):
    """seg logit = 40 (x - 0.5) (flip-equivariant: elementwise), image logit from the brightest pixel; keeps
    the batches it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> SCSEUNetOutput:
        self.seen.append(x.detach().clone())
        return SCSEUNetOutput(40.0 * (x - 0.5), 40.0 * (x.amax(dim=(1, 2, 3)) - 0.5)[:, None])


class _Ramp(torch.nn.Module):
    """Not flip-equivariant: seg logit = a ramp along the last axis, image logit = mean of the input."""

    def forward(self, x: torch.Tensor) -> SCSEUNetOutput:
        ramp = torch.linspace(-3, 2, x.shape[-1]).expand_as(x)
        return SCSEUNetOutput(ramp + x, x.mean(dim=(1, 2, 3))[:, None])


def test_flip_tta_averages_the_mirrored_probabilities():
    x = torch.rand(2, 1, 8, 6)
    for dim in (-1, -2):
        out = FlipTTA(_Ramp(), dim)(x)
        plain, mirrored = _Ramp()(x), _Ramp()(torch.flip(x, (dim,)))
        expected = (torch.sigmoid(plain.seg) + torch.flip(torch.sigmoid(mirrored.seg), (dim,))) / 2
        torch.testing.assert_close(torch.sigmoid(out.seg), expected)
        torch.testing.assert_close(torch.sigmoid(out.cls), (torch.sigmoid(plain.cls) + torch.sigmoid(mirrored.cls)) / 2)
    equivariant = _Recorder()
    out = FlipTTA(equivariant, -1)(x)
    # = no TTA (in probabilities: logits of saturated probabilities are clamped)
    torch.testing.assert_close(torch.sigmoid(out.seg), torch.sigmoid(equivariant(x).seg))
    assert equivariant.seen[0].shape[0] == 4  # the input and its mirror in one batch
    torch.testing.assert_close(equivariant.seen[0][2:], torch.flip(x, (-1,)))


def test_mean_ensemble_averages_probabilities_and_one_member_is_itself():
    x = torch.rand(2, 1, 8, 8)
    a, b = _Ramp(), _Recorder()
    out = MeanEnsemble([a, b])(x)
    torch.testing.assert_close(torch.sigmoid(out.seg), (torch.sigmoid(a(x).seg) + torch.sigmoid(b(x).seg)) / 2)
    torch.testing.assert_close(torch.sigmoid(MeanEnsemble([a])(x).seg), torch.sigmoid(a(x).seg))


def test_tta_runs_through_the_runner_on_each_kinds_left_right_axis(inputs, tmp_path):
    from test_infer_geometry import oracle_model

    base = oracle_model()
    recorder = _Recorder()
    model = dataclasses.replace(base, network=recorder)
    plain_out, tta_out = tmp_path / "plain", tmp_path / "tta"
    for out, tta in ((plain_out, False), (tta_out, True)):
        runner = BatchInferenceRunner(input_dir=str(inputs), output_dir=str(out), device="cpu", workers=0, fp32=True,
                                      progress=False, models=[model], tta=tta, formats="png,nifti")  # fmt: skip
        assert runner.run() == 0
    # an equivariant network: the same masks, under another fingerprint (outputs made with TTA are not reused)
    assert (plain_out / "scans" / "cr.dcm" / "mask.png").read_bytes() == (
        tta_out / "scans" / "cr.dcm" / "mask.png"
    ).read_bytes()
    plain_mask = nib.load(plain_out / "scans" / "ct.nii.gz" / "mask.nii.gz").get_fdata()
    assert np.array_equal(plain_mask, nib.load(tta_out / "scans" / "ct.nii.gz" / "mask.nii.gz").get_fdata())
    fingerprints = {
        json.loads((o / "scans" / "cr.dcm" / "record.json").read_text())["fingerprint"] for o in (plain_out, tta_out)
    }
    assert len(fingerprints) == 2 and with_flip_tta({"radiograph": model})["radiograph"].fingerprint in fingerprints
    # with TTA every batch held its mirror: radiographs along W, CT slices along I (dim -2)
    tta_batches = recorder.seen[len(recorder.seen) // 2 :]
    radiograph = next(b for b in tta_batches if b.shape[0] == 2 and not torch.equal(b[0], b[1]))
    torch.testing.assert_close(radiograph[1], torch.flip(radiograph[0], (-1,)))
    ct_batch = max(tta_batches, key=len)  # the volume's 4 slices and their mirrors
    half = ct_batch.shape[0] // 2
    torch.testing.assert_close(ct_batch[half:], torch.flip(ct_batch[:half], (-2,)))


def test_an_ensemble_of_weight_files_is_one_model_with_its_own_fingerprint(inputs, tmp_path):
    bundle = tiny_bundle(tmp_path / "bundle")
    shutil.copy(bundle / "models" / "model.pt", bundle / "models" / "fold_1.pt")
    single = load_models([bundle])["radiograph"]
    ensemble = load_models([bundle], weights=["models/model.pt", "models/fold_1.pt"])["radiograph"]
    assert isinstance(ensemble.network, MeanEnsemble) and len(ensemble.network.members) == 2
    assert ensemble.fingerprint != single.fingerprint
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():  # identical members: the ensemble is the member
        torch.testing.assert_close(torch.sigmoid(ensemble.network(x).seg), torch.sigmoid(single.network(x).seg))
    out = tmp_path / "out"
    argv = ["infer", str(inputs), str(out), "--bundle", str(bundle), "--device", "cpu", "--no-progress", "--workers",
            "0", "--formats", "png", "--fp32", "--weights", "models/model.pt", "models/fold_1.pt", "--tta"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / "scans" / "cr.dcm" / "record.json").read_text())
    assert record["fingerprint"] == with_flip_tta({"radiograph": ensemble})["radiograph"].fingerprint
    with pytest.raises(FileNotFoundError, match="fold_9"):
        load_models([bundle], weights=["models/model.pt", "models/fold_9.pt"])
