"""End-to-end tests of ``pneumoseg infer`` (pneumoseg.inference) on a mixed folder built in tmp_path.

The bundle is the real one's configs with a small ``network_def`` (narrow decoder) at 64 px and a randomly
initialised ``models/model.pt``: what matters here is the plumbing (discovery, batching, geometry, files,
report, resume, shards), not the predictions. The segmentation head's bias is pushed so that masks are
neither empty nor full and no pixel sits near the threshold (so results do not hinge on float noise).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumoseg.data import phantoms
from pneumoseg.inference import BatchInferenceRunner
from pneumoseg.networks import SCSEUNet
from pneumoseg.report import REPORT_COLUMNS

REPO = Path(__file__).resolve().parents[1]
REAL_BUNDLE = REPO / "bundles" / "pneumothorax_scse_unet"
SIZE = 64
NETWORK_ARGS = {"decoder_channels": [16, 16, 8, 8, 8], "head_channels": 8, "cls_dropout": 0.0}


# ============================================================================================== fixtures


def make_tiny_bundle(root: Path, seed: int = 0) -> Path:
    """Copy the real bundle's configs, shrink ``network_def`` and ``image_size``, save a random model."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    for name in ("inference.json", "metadata.json", "postprocessing.json"):
        shutil.copy(REAL_BUNDLE / "configs" / name, root / "configs" / name)
    config = json.loads((root / "configs" / "inference.json").read_text())
    config["network_def"].update(NETWORK_ARGS)
    config["image_size"] = SIZE
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=1))
    torch.manual_seed(seed)
    net = SCSEUNet(**{k: v for k, v in config["network_def"].items() if k != "_target_"})
    with torch.no_grad():  # confident outputs: far from the 0.5 threshold, a mix of 0 and 1
        final = [m for m in net.seg_head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        final.weight.mul_(50.0)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def _radiograph(folder: Path, rel: str, case: phantoms.RadiographCase, seed: int = 3) -> Path:
    image, _ = phantoms.draw_radiograph_case(case, seed, 96)
    return phantoms.write_radiograph_dicom(folder / rel, image, case)


def make_mixed_folder(root: Path) -> dict[str, str]:
    """The acceptance folder; returns ``{scan_id: expected status}`` (and writes nothing else)."""
    cases = phantoms.plan_radiographs(5, seed=3, size=96)
    cases[0] = dataclasses.replace(cases[0], photometric="MONOCHROME1", transfer_syntax="explicit")
    cases[1] = dataclasses.replace(cases[1], photometric="MONOCHROME2", transfer_syntax="rle")
    cases[2] = dataclasses.replace(cases[2], transfer_syntax="jpeg2000", spacing_tag=None)
    expected = {}
    _radiograph(root, "cr/mono1.dcm", cases[0])
    _radiograph(root, "cr/rle.dcm", cases[1])
    _radiograph(root, "cr/j2k.dcm", cases[2])
    # the same file name in two folders (different images)
    _radiograph(root, "siteA/img.dcm", cases[3])
    _radiograph(root, "siteB/img.dcm", cases[4])
    expected.update({k: "ok" for k in ("cr/mono1.dcm", "cr/rle.dcm", "cr/j2k.dcm", "siteA/img.dcm", "siteB/img.dcm")})

    hand_case = dataclasses.replace(cases[3], sop_uid=generate_uid(), series_uid=generate_uid())
    hand = _radiograph(root, "cr/hand.dcm", hand_case)
    ds = pydicom.dcmread(hand)
    ds.BodyPartExamined = "HAND"
    ds.save_as(hand)
    expected["cr/hand.dcm"] = "ok"  # with a warning (skipped with chest_only)
    _multiframe(root / "cr" / "frames.dcm", [phantoms.draw_radiograph_case(c, 5, 96)[0] for c in cases[:2]])
    expected.update({"cr/frames.dcm@frame0000": "ok", "cr/frames.dcm@frame0001": "ok"})

    ct = phantoms.plan_ct(2, seed=3)
    hu, mask, spacing = phantoms.draw_ct_case(ct[0], 3, SIZE, 6)
    phantoms.write_ct_dicom_series(root / "ct" / "case0", hu, spacing, ct[0], seed=3)
    expected[f"ct/case0/series-{ct[0].series_uid}"] = "ok"
    hu1, mask1, spacing1 = phantoms.draw_ct_case(ct[1], 3, SIZE, 5)
    label = root / "nifti" / "label.nii.gz"  # written by the helper, not part of the folder
    phantoms.write_ct_nifti(root / "nifti" / "vol.nii.gz", label, hu1, mask1, spacing1)
    label.unlink()
    expected["nifti/vol.nii.gz"] = "ok"

    png_image, _ = phantoms.draw_radiograph_case(cases[0], 4, 80)
    (root / "png").mkdir()
    Image.fromarray((png_image >> 4).clip(0, 255).astype(np.uint8)).save(root / "png" / "export.png")
    expected["png/export.png"] = "ok"

    (root / "junk").mkdir()
    noise = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    (root / "junk" / "corrupt.dcm").write_bytes(noise)
    expected["junk/corrupt.dcm"] = "error"
    full = (root / "cr" / "mono1.dcm").read_bytes()
    (root / "junk" / "truncated.dcm").write_bytes(full[: len(full) * 2 // 3])
    expected["junk/truncated.dcm"] = "error"
    (root / "junk" / "notes.txt").write_text("exported by PACS\n")
    expected["junk/notes.txt"] = "skipped"
    _write_sr(root / "junk" / "report_sr.dcm")
    expected["junk/report_sr.dcm"] = "skipped"
    nib.save(nib.Nifti1Image(np.zeros((SIZE, SIZE), np.int16), np.eye(4)), str(root / "junk" / "flat.nii.gz"))
    expected["junk/flat.nii.gz"] = "error"  # wrong dimensions: a 2D NIfTI is not a CT volume
    mpeg = pydicom.dcmread(root / "cr" / "rle.dcm")
    mpeg.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder installed
    mpeg.PixelData = encapsulate([b"\x00" * 256])
    mpeg.save_as(root / "junk" / "mpeg2.dcm")
    expected["junk/mpeg2.dcm"] = "error"
    nan = np.zeros((SIZE, SIZE, 3), np.float32)
    nan[3, 3, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(root / "junk" / "nan.nii.gz"))
    expected["junk/nan.nii.gz"] = "error"
    return expected


def _multiframe(path: Path, frames: list[np.ndarray]) -> None:
    """A 2-frame DX file (e.g. two exposures), uncompressed."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray for presentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.PatientID, ds.PatientName = "MF", "Multi^Frame"
    ds.PixelSpacing = [0.5, 0.5]
    ds.set_pixel_data(np.stack(frames).astype(np.uint16), "MONOCHROME2", 16)
    ds.save_as(path, enforce_file_format=True)


def _write_sr(path: Path) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("inputs")
    return root, make_mixed_folder(root)


def _runner(bundle: Path, inputs: Path, out: Path, **kwargs) -> BatchInferenceRunner:
    args = dict(formats="nifti,seg,png,overlay", device="cpu", batch_size=3, workers=0, fp32=True, progress=False)
    args.update(kwargs)
    return BatchInferenceRunner(str(bundle), str(inputs), str(out), **args)


def _rows(out: Path, name: str = "report") -> list[dict]:
    return json.loads((out / f"{name}.json").read_text())["rows"]


def _strip(rows: list[dict]) -> list[dict]:
    """Rows without the timing column (a measurement, not a result)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def reference(bundle: Path, mixed, tmp_path_factory) -> tuple[Path, int]:
    """One uninterrupted run over the mixed folder (shared by several tests, never modified by them)."""
    inputs, _ = mixed
    out = tmp_path_factory.mktemp("reference")
    code = _runner(bundle, inputs, out).run()
    return out, code


def _tree_digest(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _outputs(out: Path) -> dict[str, object]:
    """Decoded content of every output (masks as arrays, SEG as pixels): comparable across runs (PNG and
    gzip headers, SEG dates and times are not)."""
    content: dict[str, object] = {}
    for p in sorted((out / "scans").rglob("*")):
        if not p.is_file():
            continue
        key = str(p.relative_to(out))
        if p.name.endswith(".png"):
            content[key] = np.asarray(Image.open(p)).tobytes()
        elif p.name.endswith(".nii.gz"):
            img = nib.load(str(p))
            content[key] = (np.asarray(img.dataobj).tobytes(), img.affine.round(6).tobytes())
        elif p.name == "seg.dcm":
            content[key] = pydicom.dcmread(p).PixelData
        elif p.name == "record.json":
            record = json.loads(p.read_text())
            content[key] = sorted(record["outputs"]), record["formats"], record["fingerprint"]
        else:
            content[key] = p.name  # unexpected files still count
    return content


def _same_rows(a: list[dict], b: list[dict]) -> None:
    """Equal rows (timing aside); probabilities to 2e-6 (batch composition changes float rounding)."""
    a, b = _strip(a), _strip(b)
    assert [r["scan_id"] for r in a] == [r["scan_id"] for r in b]
    for x, y in zip(a, b):
        px, py = x.pop("probability"), y.pop("probability")
        assert x == y
        assert (px == py == "") or abs(float(px) - float(py)) <= 2e-6


# ================================================================================================= tests


def test_mixed_folder_rows_and_outputs(reference, mixed):
    out, code = reference
    inputs, expected = mixed
    rows = _rows(out)
    assert code == 1  # corrupt, truncated and NaN inputs errored; everything else went on
    assert {r["scan_id"]: r["status"] for r in rows} == expected
    assert [r["scan_id"] for r in rows] == sorted(expected)
    assert list(rows[0]) == list(REPORT_COLUMNS)
    by_id = {r["scan_id"]: r for r in rows}
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert (summary["ok"], summary["skipped"], summary["error"]) == (
        sum(v == "ok" for v in expected.values()),
        sum(v == "skipped" for v in expected.values()),
        sum(v == "error" for v in expected.values()),
    )
    # CSV == JSON
    import csv

    with (out / "report.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["scan_id"] for r in csv_rows] == [r["scan_id"] for r in rows]
    assert [r["status"] for r in csv_rows] == [r["status"] for r in rows]

    # reasons name the problem
    assert "corrupt or truncated" in by_id["junk/corrupt.dcm"]["reason"]
    assert "truncated.dcm" in by_id["junk/truncated.dcm"]["reason"]
    assert "NaN" in by_id["junk/nan.nii.gz"]["reason"]
    assert "3D volume" in by_id["junk/flat.nii.gz"]["reason"]
    assert "1.2.840.10008.1.2.4.100" in by_id["junk/mpeg2.dcm"]["reason"]
    assert "SR" in by_id["junk/report_sr.dcm"]["reason"]
    assert "not a DICOM" in by_id["junk/notes.txt"]["reason"]
    assert "HAND" in by_id["cr/hand.dcm"]["warnings"]
    assert "no pixel spacing" in by_id["cr/j2k.dcm"]["warnings"] and by_id["cr/j2k.dcm"]["area_mm2"] == ""

    # outputs: exactly the files of each ok scan, nothing for the others; same names never collide
    for sid, status in expected.items():
        folder = out / "scans" / sid
        files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        row = by_id[sid]
        if status != "ok":
            assert files == [] and row["mask"] == row["seg"] == row["overlay"] == ""
            continue
        kind = row["kind"]
        want = {"radiograph": ["mask.png", "overlay.png", "record.json", "seg.dcm"],
                "image": ["mask.png", "overlay.png", "record.json"],
                "series": ["mask.nii.gz", "overlay.png", "record.json", "seg.dcm"],
                "nifti": ["mask.nii.gz", "overlay.png", "record.json"]}[kind]
        assert files == want, sid
        assert row["positive"] in ("yes", "no") and 0.0 <= float(row["probability"]) <= 1.0
        assert row["mask"] and (out / row["mask"]).is_file()
    assert by_id["siteA/img.dcm"]["probability"] != by_id["siteB/img.dcm"]["probability"]
    assert not list(out.rglob(".tmp-*"))
    assert str(inputs) not in (out / "report.json").read_text()  # paths relative to INPUT_DIR


def test_masks_in_source_geometry(reference, mixed):
    out, _ = reference
    inputs, _ = mixed
    rows = {r["scan_id"]: r for r in _rows(out)}
    for sid in ("cr/mono1.dcm", "cr/j2k.dcm", "siteA/img.dcm"):
        ds = pydicom.dcmread(inputs / sid, stop_before_pixels=True)
        mask = np.asarray(Image.open(out / rows[sid]["mask"]))
        assert mask.shape == (ds.Rows, ds.Columns)
        assert set(np.unique(mask)) <= {0, 255}
        assert int((mask > 0).sum()) == rows[sid]["mask_pixels"]
        if sid != "cr/j2k.dcm":
            spacing = [float(v) for v in (ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"))]
            assert rows[sid]["area_mm2"] == pytest.approx(rows[sid]["mask_pixels"] * spacing[0] * spacing[1], rel=1e-4)
    png = np.asarray(Image.open(out / rows["png/export.png"]["mask"]))
    assert png.shape == np.asarray(Image.open(inputs / "png/export.png")).shape
    # NIfTI input: same shape and affine as the input
    src = nib.load(str(inputs / "nifti/vol.nii.gz"))
    mask = nib.load(str(out / rows["nifti/vol.nii.gz"]["mask"]))
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine, atol=1e-4)
    voxel_ml = float(np.prod(src.header.get_zooms())) / 1000
    row = rows["nifti/vol.nii.gz"]
    assert row["volume_ml"] == pytest.approx(row["mask_pixels"] * voxel_ml, rel=1e-3)
    # DICOM CT series: the mask NIfTI has the reader's geometry (= the NIfTI export's convention)
    from pneumoseg.data.series import LoadDicomSeries

    sid = next(s for s in rows if s.startswith("ct/"))
    volume = LoadDicomSeries()(str(inputs / "ct" / "case0"))
    mask = nib.load(str(out / rows[sid]["mask"]))
    assert mask.shape == tuple(volume.shape[1:])
    assert np.allclose(mask.affine, np.asarray(volume.affine), atol=1e-4)


def test_seg_reads_back_equal_to_mask(reference, mixed):
    out, _ = reference
    inputs, _ = mixed
    rows = {r["scan_id"]: r for r in _rows(out)}
    metadata = json.loads((REAL_BUNDLE / "configs" / "metadata.json").read_text())
    checked = 0
    for sid, row in rows.items():
        if not row["seg"]:
            continue
        seg = hd.seg.segread(out / row["seg"])
        desc = seg.SegmentSequence[0]
        assert seg.SegmentationType == "BINARY"
        assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "36118008"
        assert desc.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        algorithm = desc.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (metadata["name"], metadata["version"])
        if row["kind"] == "series":
            mask = np.asarray(nib.load(str(out / row["mask"])).dataobj) > 0  # [I, J, K]
            # order the SEG frames by the position of their source slices
            files = sorted((inputs / row["input"]).glob("*.dcm"))
            headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
            headers.sort(key=lambda h: float(h.ImagePositionPatient[2]))
            pixels = seg.get_pixels_by_source_instance([h.SOPInstanceUID for h in headers], segment_numbers=[1])
            assert np.array_equal(pixels[..., 0].astype(bool), mask.transpose(2, 1, 0))
        else:
            mask = np.asarray(Image.open(out / row["mask"])) > 0
            source = pydicom.dcmread(inputs / row["input"].split("@")[0], stop_before_pixels=True)
            if "@frame" in sid:
                frame = int(sid.rsplit("@frame", 1)[1]) + 1
                pixels = seg.get_pixels_by_source_frame(
                    source.SOPInstanceUID, source_frame_numbers=[frame], segment_numbers=[1]
                )
            else:
                pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])
            assert np.array_equal(pixels[0, ..., 0].astype(bool), mask), sid
            spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
            assert all(float(v) > 0 for v in spacing)  # sanitised when the source has none
        checked += 1
    assert checked == sum(1 for r in rows.values() if r["status"] == "ok" and r["kind"] in ("radiograph", "series"))
    assert checked >= 8


def test_rerun_reuses_verified_outputs_and_overwrite_redoes(bundle, mixed, tmp_path):
    inputs, _ = mixed
    small = tmp_path / "in"
    shutil.copytree(inputs / "cr", small / "cr")
    inputs_before = _tree_digest(small)
    out = tmp_path / "out"
    assert _runner(bundle, small, out).run() == 0
    first = _tree_digest(out / "scans")
    rows = _rows(out)
    # a plain re-run: nothing is redone, no output touched
    assert _runner(bundle, small, out).run() == 0
    assert _tree_digest(out / "scans") == first
    assert json.loads((out / "report.json").read_text())["summary"]["reused"] == len(rows)
    _same_rows(_rows(out), rows)
    # a damaged output (same size, other bytes) is detected by its checksum and only that scan is redone
    damaged = out / "scans" / "cr" / "rle.dcm" / "mask.png"
    data = bytearray(damaged.read_bytes())
    data[-20] ^= 0xFF
    damaged.write_bytes(bytes(data))
    time.sleep(0.01)
    assert _runner(bundle, small, out).run() == 0
    now = _tree_digest(out / "scans")
    changed = {k for k in now if now[k] != first.get(k)}
    assert changed and all(k.startswith("cr/rle.dcm/") for k in changed)
    _same_rows(_rows(out), rows)
    # a changed input (here only its mtime) is redone too: records are tied to the input files
    source = small / "cr" / "mono1.dcm"
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    inputs_before = _tree_digest(small)
    assert _runner(bundle, small, out).run() == 0
    later = _tree_digest(out / "scans")
    changed = {k for k in later if later[k] != now.get(k)}
    assert changed and all(k.startswith("cr/mono1.dcm/") for k in changed)
    now = later
    # --overwrite redoes everything
    assert _runner(bundle, small, out, overwrite=True).run() == 0
    again = _tree_digest(out / "scans")
    assert all(again[k][1] != now[k][1] for k in now if k.endswith("record.json"))
    assert json.loads((out / "report.json").read_text())["summary"]["reused"] == 0
    # another model's outputs are not mixed in without --overwrite
    other = make_tiny_bundle(tmp_path / "other_bundle", seed=1)
    with pytest.raises(FileExistsError, match="another model"):
        _runner(other, small, out).run()
    assert _runner(other, small, out, overwrite=True).run() == 0
    assert _tree_digest(small) == inputs_before  # inputs are never modified


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(bundle, mixed, reference, tmp_path):
    inputs, _ = mixed
    before = _tree_digest(inputs)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pneumoseg", "infer", str(inputs), str(out), "--bundle", str(bundle),
               "--device", "cpu", "--fp32", "--workers", "0", "--batch-size", "3", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "scans").rglob("record.json"))) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = len(list((out / "scans").rglob("record.json")))
    assert 2 <= done_before < sum(1 for r in _rows(reference[0]) if r["status"] == "ok")
    assert not (out / "report.json").exists()

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 1, resumed.stderr  # the broken inputs still error
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["reused"] >= done_before
    _same_rows(_rows(out), _rows(reference[0]))
    assert _outputs(out) == _outputs(reference[0])
    assert not list(out.rglob(".tmp-*"))
    assert _tree_digest(inputs) == before


def test_two_shards_merge_to_the_unsharded_report(bundle, mixed, reference, tmp_path):
    inputs, _ = mixed
    out = tmp_path / "out"
    # shard 1 decodes in two DataLoader worker processes: the same results as in-process decoding
    codes = [_runner(bundle, inputs, out, num_shards=2, shard_id=i, workers=2 * i).run() for i in (0, 1)]
    assert codes == [1, 1]  # each shard has some of the broken inputs (round-robin over the sorted list)
    shard_rows = [_rows(out, f"report.shard-{i:03d}-of-002") for i in (0, 1)]
    assert not {r["scan_id"] for r in shard_rows[0]} & {r["scan_id"] for r in shard_rows[1]}
    _same_rows(_rows(out), _rows(reference[0]))  # merged automatically when the last shard finished
    assert _outputs(out) == _outputs(reference[0])

    # separate machines: shards in separate folders, merged with the CLI
    from pneumoseg.cli import main

    parts = [tmp_path / "part0", tmp_path / "part1"]
    for i, part in enumerate(parts):  # as if each shard had run on its own machine
        part.mkdir()
        for suffix in (".json", ".csv"):
            name = f"report.shard-{i:03d}-of-002{suffix}"
            shutil.copy(out / name, part / name)
    merged = tmp_path / "merged"
    merged.mkdir()
    assert main(["infer", "--merge-reports", str(merged), *map(str, parts)]) == 0
    _same_rows(_rows(merged), _rows(reference[0]))
    assert main(["infer", "--merge-reports", str(tmp_path / "merged2"), str(parts[0])]) == 2  # shard 1 missing


def test_strict_stops_and_chest_only_skips(bundle, mixed, tmp_path, capsys):
    inputs, expected = mixed
    out = tmp_path / "strict"
    assert _runner(bundle, inputs, out, strict=True).run() == 1
    assert "--strict: stopped at junk/corrupt.dcm" in capsys.readouterr().err
    assert not any(r["status"] == "ok" for r in _rows(out))

    small = tmp_path / "in"
    shutil.copytree(inputs / "cr", small / "cr")
    out = tmp_path / "chest"
    assert _runner(bundle, small, out, chest_only=True, formats="png").run() == 0
    rows = {r["scan_id"]: r for r in _rows(out)}
    assert rows["cr/hand.dcm"]["status"] == "skipped" and "HAND" in rows["cr/hand.dcm"]["reason"]
    assert rows["cr/mono1.dcm"]["status"] == "ok" and rows["cr/mono1.dcm"]["seg"] == ""
    assert sorted(p.name for p in (out / "scans" / "cr" / "mono1.dcm").iterdir()) == ["mask.png", "record.json"]


def test_empty_folder_and_cli(bundle, tmp_path, capsys):
    from pneumoseg.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    code = main(["infer", str(empty), str(out), "--bundle", str(bundle), "--device", "cpu", "--no-progress"])
    assert code == 0
    assert "no files found" in capsys.readouterr().err
    assert _rows(out) == []
    assert main(["infer", str(tmp_path / "missing"), str(out), "--bundle", str(bundle)]) == 2
    # the same runner from a bundle config (what configs/inference.json does with _target_)
    from monai.bundle import ConfigParser

    parser = ConfigParser({
        "runner": {"_target_": "pneumoseg.inference.BatchInferenceRunner", "bundle_root": str(bundle),
                   "input_dir": str(empty), "output_dir": str(tmp_path / "from_config"), "device": "cpu",
                   "progress": False},
        "run": "$@runner.run()",
    })
    assert parser.get_parsed_content("run") == 0
    assert (tmp_path / "from_config" / "report.json").is_file()
    assert main(["infer", str(empty), str(out), "--bundle", str(tmp_path / "no_bundle")]) == 2
    assert main(["infer", str(empty), str(out), "--bundle", str(bundle), "--formats", "nifti,jpeg"]) == 2


def test_help_explains_every_option(capsys):
    from pneumoseg.cli import build_parser

    parser = build_parser(only="infer")
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    infer = sub.choices["infer"]
    for action in infer._actions:
        assert action.help, action.option_strings or action.dest
    for option in ("--bundle", "--device", "--batch-size", "--workers", "--formats", "--overwrite", "--strict",
                   "--fp32", "--num-shards", "--shard-id", "--merge-reports", "--chest-only"):
        assert option in infer.format_help()


def test_seg_of_a_series_with_a_gap_and_a_duplicate(bundle, tmp_path):
    """Layer k of the mask is on the k-th slice the reader kept (sorted, duplicate dropped, gap stacked)."""
    case = phantoms.plan_ct(1, seed=7)[0]
    hu, _, spacing = phantoms.draw_ct_case(case, 7, SIZE, 7)
    folder = tmp_path / "in" / "ct"
    files = phantoms.write_ct_dicom_series(folder, hu, spacing, case, seed=7)
    files[3].unlink()  # a gap
    duplicate = pydicom.dcmread(files[5])
    duplicate.SOPInstanceUID = generate_uid()
    duplicate.InstanceNumber = 99
    duplicate.save_as(folder / "slice_dup.dcm")
    out = tmp_path / "out"
    assert _runner(bundle, tmp_path / "in", out, formats="nifti,seg").run() == 0
    (row,) = _rows(out)
    assert "missing slice" in row["warnings"] and "duplicate" in row["warnings"]
    mask = np.asarray(nib.load(str(out / row["mask"])).dataobj) > 0
    assert mask.shape[2] == 6
    kept = [pydicom.dcmread(f, stop_before_pixels=True) for f in files if f.exists()]
    kept.sort(key=lambda h: float(h.ImagePositionPatient[2]))
    seg = hd.seg.segread(out / row["seg"])
    pixels = seg.get_pixels_by_source_instance([h.SOPInstanceUID for h in kept], segment_numbers=[1])
    assert np.array_equal(pixels[..., 0].astype(bool), mask.transpose(2, 1, 0))
    assert mask.any() and not mask.all()


def test_infer_waits_passively_unless_the_user_chose(monkeypatch, tmp_path):
    # set before torch loads OpenMP in `pneumoseg infer` processes; a user's own setting is kept
    import os

    from pneumoseg.cli import main

    args = ["infer", str(tmp_path / "missing"), str(tmp_path / "out"), "--bundle", str(tmp_path)]
    monkeypatch.setenv("OMP_WAIT_POLICY", "")  # records the original state: main()'s setting is undone after the test
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert main(args) == 2
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(args) == 2
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_negative_scans_get_empty_outputs_in_source_geometry(bundle, tmp_path):
    """A classification threshold no image reaches: every mask is empty (no inversion is run for it), yet
    every output is written, in the source geometry, and the SEG reads back as "nothing found"."""
    negative = tmp_path / "bundle"
    shutil.copytree(bundle, negative)
    params = json.loads((negative / "configs" / "postprocessing.json").read_text())
    (negative / "configs" / "postprocessing.json").write_text(json.dumps({**params, "t_cls": 1.01}))
    inputs = tmp_path / "in"
    case = phantoms.plan_radiographs(1, seed=5, size=96)[0]
    _radiograph(inputs, "cr/a.dcm", case)
    ct = phantoms.plan_ct(1, seed=5)[0]
    hu, _, spacing = phantoms.draw_ct_case(ct, 5, SIZE, 5)
    phantoms.write_ct_dicom_series(inputs / "ct", hu, spacing, ct, seed=5)
    out = tmp_path / "out"
    assert _runner(negative, inputs, out).run() == 0
    rows = {r["kind"]: r for r in _rows(out)}
    assert set(rows) == {"radiograph", "series"}
    for row in rows.values():
        assert (row["status"], row["positive"], row["mask_pixels"], row["components"]) == ("ok", "no", 0, 0)
        assert (out / row["overlay"]).is_file()
    source = pydicom.dcmread(inputs / "cr/a.dcm", stop_before_pixels=True)
    mask = np.asarray(Image.open(out / rows["radiograph"]["mask"]))
    assert mask.shape == (source.Rows, source.Columns) and not mask.any()
    volume = nib.load(str(out / rows["series"]["mask"]))
    assert volume.shape == (SIZE, SIZE, 5) and not np.asarray(volume.dataobj).any()
    assert rows["series"]["volume_ml"] == 0.0
    seg = hd.seg.segread(out / rows["radiograph"]["seg"])
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])
    assert pixels.shape[1:3] == (source.Rows, source.Columns) and not pixels.any()
