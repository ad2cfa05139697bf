"""The node against a real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``; `.ci/run` installs them).

Orthanc runs with its own temporary config and storage in a loopback-only network namespace, its ports
forwarded to 127.0.0.1 (tests/orthanc_netns.py). Without the Orthanc binary these tests are skipped, except
under CI (``CI`` set), where a missing Orthanc is a failure.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pacs_fixtures import (
    PYTHON,
    REPO,
    NodeProcess,
    Orthanc,
    ct_study,
    make_tiny_bundle,
    node_config,
    orthanc_binary,
    radiograph_study,
    write_config,
)
from PIL import Image

pytestmark = pytest.mark.slow
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _require(what: str, present: bool) -> None:
    if not present:
        message = f"{what} is not installed (apt-get install -y orthanc orthanc-dicomweb; .ci/run does it)"
        if IN_CI:
            pytest.fail(f"CI: {message}")
        pytest.skip(message)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    _require("Orthanc", orthanc_binary() is not None)
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _seg_pixels(seg: hd.seg.Segmentation, source_uids: list[str]) -> np.ndarray:
    """Segment 1 of ``seg`` on each source instance, ``[n, rows, columns]`` bool."""
    return seg.get_pixels_by_source_instance(source_uids, segment_numbers=[1])[..., 0].astype(bool)


def _numeric(dataset, code: str) -> list[float]:
    """The values of the SR's NUM content items named ``code``, anywhere in its content tree."""
    out = []
    for item in dataset.get("ContentSequence", []):
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == code:
            out.append(float(item.MeasuredValueSequence[0].NumericValue))
        out += _numeric(item, code)
    return out


def test_orthanc_sends_studies_and_gets_seg_and_sr_equal_to_pneumoseg_infer(orthanc, bundle, tmp_path):
    """Orthanc C-STOREs a radiograph study and a CT series to the node (REST /modalities/.../store); the SEG
    and SR of every scan come back into Orthanc; each SEG read back with highdicom equals the SEG and the mask
    of `pneumoseg infer` on the same files."""
    inputs = tmp_path / "inputs"
    cr = radiograph_study(inputs / "cr", n=2)
    ct = ct_study(inputs / "ct", slices=6)
    destination = {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
    config = node_config(
        tmp_path, bundle, 0, [destination], results={"secondary_capture": True}, allowed_ae_titles=["ORTHANC"]
    )
    node = NodeProcess(config)
    try:
        orthanc.node_port = node.started()["port"]  # where Orthanc's modality "pneumoseg" leads
        study_ids = orthanc.upload(cr.files + ct.files)
        stored = orthanc.post("/modalities/pneumoseg/store", {"Resources": study_ids, "Synchronous": True})
        assert stored["InstancesCount"] == 8 and stored["FailedInstancesCount"] == 0
        segs = _wait(lambda: len(orthanc.instances_of_modality("SEG")) >= 3 and orthanc.instances_of_modality("SEG"),
                     120, "3 SEGs in Orthanc")  # fmt: skip
        srs = _wait(lambda: len(orthanc.instances_of_modality("SR")) >= 3 and orthanc.instances_of_modality("SR"),
                    60, "3 SRs in Orthanc")  # fmt: skip
        captures = _wait(lambda: len(orthanc.instances_of_modality("OT")) >= 3 and orthanc.instances_of_modality("OT"),
                         60, "3 Secondary Captures in Orthanc")  # fmt: skip
        association = node.find(lambda e: e.get("event") == "association" and e.get("stored"))
        assert association and association[0]["calling_ae"] == "ORTHANC"
        log = node.log()
        for path in cr.files + ct.files:  # no patient data in the logs
            source = pydicom.dcmread(path, stop_before_pixels=True)
            assert str(source.PatientID) not in log and str(source.PatientName) not in log
    finally:
        node.kill()

    # the same files through `pneumoseg infer`
    reference = tmp_path / "infer"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [PYTHON, "-m", "pneumoseg", "infer", str(inputs), str(reference), "--bundle", str(bundle), "--device", "cpu",
         "--workers", "0", "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {r["input"]: r for r in json.loads((reference / "report.json").read_text())["rows"]}

    back = [hd.seg.segread(io.BytesIO(data)) for data in segs]
    by_source = {}
    for seg in back:
        uids = [str(ref[2]) for ref in seg.get_source_image_uids()]
        by_source[frozenset(uids)] = seg
    assert len(back) == 3
    non_empty = 0
    for i, path in enumerate(cr.files):
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        pixels = _seg_pixels(by_source[frozenset([sop])], [sop])[0]
        mask = np.asarray(Image.open(reference / rows[f"cr/cr{i}.dcm"]["mask"])) > 0
        infer_seg = hd.seg.segread(reference / rows[f"cr/cr{i}.dcm"]["seg"])
        np.testing.assert_array_equal(pixels, mask)
        np.testing.assert_array_equal(pixels, _seg_pixels(infer_seg, [sop])[0])
        non_empty += int(pixels.any())
    slices = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct.files]
    ct_row = next(r for r in rows.values() if r["kind"] == "series")
    ct_back = _seg_pixels(by_source[frozenset(slices)], slices)
    np.testing.assert_array_equal(ct_back, _seg_pixels(hd.seg.segread(reference / ct_row["seg"]), slices))
    assert int(ct_back.sum()) == ct_row["mask_pixels"]
    assert non_empty + int(ct_back.any()) >= 1, "every mask is empty: the comparison would prove little"

    # the Secondary Captures: the overlay pictures, RGB, in the source's study
    for data in captures:
        sc = pydicom.dcmread(io.BytesIO(data))
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.PhotometricInterpretation == "RGB"
        assert sc.StudyInstanceUID in (cr.study_uid, ct.study_uid)

    # the SRs: one per scan, in the source's study, with the probability and the finding of the report row
    assert len(srs) == 3
    probabilities = sorted(round(r["probability"], 4) for r in rows.values())
    found = []
    for data in srs:
        sr = pydicom.dcmread(io.BytesIO(data))
        assert sr.StudyInstanceUID in (cr.study_uid, ct.study_uid)
        (probability,) = _numeric(sr, "PTX-PROB")
        found.append(round(probability, 4))
    assert sorted(found) == probabilities


def test_dicomweb_mode_pulls_new_studies_and_stores_results_with_stow(orthanc, bundle, tmp_path):
    """`--dicomweb URL`: studies already on the server are left alone, a study uploaded afterwards is pulled
    (QIDO-RS + WADO-RS), processed, and its SEG and SR stored back (STOW-RS)."""
    _require("Orthanc's DICOMweb plugin (orthanc-dicomweb)", "dicom-web" in orthanc.get("/plugins"))
    inputs = tmp_path / "inputs"
    before = radiograph_study(inputs / "before", n=1, seed=11)
    orthanc.upload(before.files)
    config = write_config(
        tmp_path / "node.toml",
        node={"port": 0, "state_dir": str(tmp_path / "state"), "quiet_seconds": 0.5},
        inference={"bundles": [str(bundle)], "device": "cpu", "workers": 0},
        dicomweb={"url": orthanc.url + "/dicom-web", "poll_seconds": 0.5, "lookback_days": 0},  # phantoms: 2020
    )
    node = NodeProcess(config)
    try:
        node.started()
        node.wait_for(lambda e: e.get("event") == "dicomweb_baseline", 30, "the first poll")
        new = radiograph_study(inputs / "new", n=1, seed=12)
        orthanc.upload(new.files)
        sent = node.wait_for(
            lambda e: e.get("event") == "send" and e.get("result") == "sent" and e.get("kind") == "sr", 120, "STOW"
        )
        assert sent["study_uid"] == new.study_uid and sent["destination"] == "dicomweb"
        _wait(lambda: node.find(lambda e: e.get("event") == "send" and e.get("kind") == "seg"), 30, "the SEG")
        studies = {e["study_uid"] for e in node.find(lambda e: e.get("event") == "study_started")}
        assert studies == {new.study_uid}  # the study that was there before is not processed
        time.sleep(1.5)  # polls after the STOW: the node's own SEG/SR series are not pulled back
        assert not node.find(lambda e: e.get("event") == "instance_rejected")
    finally:
        node.kill()
    series = orthanc.post(
        "/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": new.study_uid}, "Expand": True}
    )
    assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["CR", "SEG", "SR"]


def test_dicomweb_poll_lists_only_recent_studies_and_skips_other_sop_classes(orthanc, tmp_path):
    """The poller alone (no model): a study of today is pulled, one of 2020 is outside ``lookback_days``."""
    import datetime

    from pneumoseg.pacs.config import DicomWebSettings
    from pneumoseg.pacs.dicomweb import DicomWebPoller
    from pneumoseg.pacs.queue import NodeQueue
    from pneumoseg.pacs.spool import Spool

    _require("Orthanc's DICOMweb plugin (orthanc-dicomweb)", "dicom-web" in orthanc.get("/plugins"))
    old = radiograph_study(tmp_path / "old", n=1, seed=31)
    recent = radiograph_study(tmp_path / "recent", n=2, seed=32)
    for path in recent.files:
        ds = pydicom.dcmread(path)
        ds.StudyDate = f"{datetime.date.today():%Y%m%d}"
        ds.save_as(path)
    orthanc.upload(old.files + recent.files)
    queue = NodeQueue(tmp_path / "state" / "queue.sqlite3")
    settings = DicomWebSettings(url=orthanc.url + "/dicom-web", lookback_days=2, pull_existing=True)
    poller = DicomWebPoller(settings, Spool(tmp_path / "state"), queue)
    assert poller.poll() == 2
    assert [s["study_uid"] for s in queue.studies()] == [recent.study_uid]
    assert poller.poll() == 0  # nothing new: the study's count is unchanged
