"""One owner per output folder (pneumoseg.infer.folder, records): the lock, the model guard failing closed,
stale temporaries anywhere, and a scan that turns into an error losing its old outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_bundle

from pneumoseg.cli import main
from pneumoseg.data import phantoms
from pneumoseg.infer import BatchInferenceRunner
from pneumoseg.infer.folder import OutputFolder, OutputFolderBusy, OutputFolderOfAnotherModel


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    for i, case in enumerate(phantoms.plan_radiographs(3, seed=4, size=64)):
        image, _ = phantoms.draw_radiograph_case(case, 4, 64)
        phantoms.write_radiograph_dicom(root / f"r{i}.dcm", image, case)
    return root


def _run(bundle: Path, inputs: Path, out: Path, **kwargs) -> int:
    args = dict(device="cpu", workers=0, fp32=True, progress=False, formats="png,seg")
    return BatchInferenceRunner(str(bundle), str(inputs), str(out), **{**args, **kwargs}).run()


def test_a_second_run_into_a_folder_in_use_is_refused(bundle, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    with OutputFolder(out):  # another run holds the folder
        with pytest.raises(OutputFolderBusy, match="in use by another pneumoseg infer run"):
            _run(bundle, inputs, out)
        argv = ["infer", str(inputs), str(out), "--bundle", str(bundle), "--device", "cpu", "--no-progress"]
        assert main(argv) == 2 and "in use by another pneumoseg infer run" in capsys.readouterr().err
    assert not (out / "scans").exists()  # nothing of the refused runs was written
    assert _run(bundle, inputs, out) == 0  # free again


def test_shards_of_one_run_share_the_folder_and_exclude_an_unsharded_run(tmp_path):
    out = tmp_path / "out"
    with OutputFolder(out, 2, 0) as first:
        assert first.alone
        with OutputFolder(out, 2, 1) as second:
            assert not second.alone
        with pytest.raises(OutputFolderBusy, match="shard 0 of 2 is already running"):
            OutputFolder(out, 2, 0).__enter__()
        with pytest.raises(OutputFolderBusy, match="in use"):
            OutputFolder(out).__enter__()


def test_model_guard_fails_closed(bundle, inputs, tmp_path):
    out = tmp_path / "out"
    assert _run(bundle, inputs, out) == 0
    other = tiny_bundle(tmp_path / "other", seed=1)
    with pytest.raises(OutputFolderOfAnotherModel, match="another model"):
        _run(other, inputs, out)
    (out / "run.json").unlink()  # deleting run.json does not let another model in: the records say whose
    with pytest.raises(OutputFolderOfAnotherModel, match="records"):
        _run(other, inputs, out)
    (out / "run.json").write_text("{not json")  # nor does an unreadable one
    with pytest.raises(OutputFolderOfAnotherModel):
        _run(other, inputs, out)
    assert _run(bundle, inputs, out) == 0  # the same model may go on
    assert _run(other, inputs, out, overwrite=True) == 0
    fingerprints = {json.loads(p.read_text())["fingerprint"] for p in (out / "scans").rglob("record.json")}
    assert len(fingerprints) == 1  # no mix


def test_stale_temporaries_anywhere_are_removed_at_start(bundle, inputs, tmp_path):
    out = tmp_path / "out"
    assert _run(bundle, inputs, out) == 0
    stale = [out / ".tmp-999-run.json", out / ".tmp-999-report.json", out / "scans" / "r0.dcm" / ".tmp-999-mask.png",
             out / "scans" / "gone" / "deeper" / ".tmp-1-seg.dcm"]  # fmt: skip
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    assert _run(bundle, inputs, out) == 0
    assert not any(p.exists() for p in stale) and not list(out.rglob(".tmp-*"))


def test_a_scan_that_turns_into_an_error_loses_its_outputs(bundle, inputs, tmp_path):
    import shutil

    folder = tmp_path / "in"
    shutil.copytree(inputs, folder)
    out = tmp_path / "out"
    assert _run(bundle, folder, out) == 0
    assert (out / "scans" / "r1.dcm" / "seg.dcm").is_file()
    data = (folder / "r1.dcm").read_bytes()
    (folder / "r1.dcm").write_bytes(data[: len(data) // 2])  # truncated since
    assert _run(bundle, folder, out) == 1
    rows = {r["scan_id"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert rows["r1.dcm"]["status"] == "error"
    assert sorted(p.name for p in (out / "scans" / "r1.dcm").iterdir()) == []  # record and outputs gone
    assert (out / "scans" / "r0.dcm" / "record.json").is_file()  # the others keep theirs
    (folder / "r1.dcm").write_text("not a DICOM any more")  # broken at discovery this time
    (out / "scans" / "r1.dcm" / "mask.png").write_bytes(b"old")
    assert _run(bundle, folder, out) == 1
    assert not (out / "scans" / "r1.dcm" / "mask.png").exists()
