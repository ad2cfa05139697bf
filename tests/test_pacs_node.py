"""Fault tests of `pneumoseg serve` as a process: kill -9 mid-study, SIGTERM, a destination that is down,
a corrupt instance. The destination is a real Storage SCP of the test (pynetdicom) that records every
instance it receives, duplicates included, so "sent exactly once" is observed where the results arrive."""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pacs_fixtures import (
    NodeProcess,
    RecordingSCP,
    ct_study,
    free_port,
    make_tiny_bundle,
    node_config,
    node_status,
    radiograph_study,
    send_files,
)
from pydicom.uid import generate_uid

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture
def destination():
    scp = RecordingSCP(free_port()).start()
    try:
        yield scp
    finally:
        scp.stop()


@pytest.fixture
def nodes():
    """Node processes started by a test; all killed at its end whatever happened."""
    started: list[NodeProcess] = []
    try:
        yield started
    finally:
        for node in started:
            node.kill()


def _dest(port: int) -> list[dict]:
    return [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}]


def _start(nodes: list[NodeProcess], config: Path) -> NodeProcess:
    """A node on a port of its own choosing (port 0; no race for a port picked in advance): ``node.port``."""
    node = NodeProcess(config)
    nodes.append(node)
    node.port = node.started()["port"]
    return node


def test_kill_9_mid_study_then_restart_processes_and_sends_every_study_exactly_once(
    bundle, destination, nodes, tmp_path
):
    cr = radiograph_study(tmp_path / "cr", n=2)
    ct = ct_study(tmp_path / "ct", slices=6)
    config = node_config(tmp_path, bundle, 0, _dest(destination.port))
    first = _start(nodes, config)
    assert send_files(first.port, cr.files + ct.files) == [0] * 8
    first.wait_for(lambda e: e.get("event") == "study_started", 60, "a study to start")
    first.kill()  # SIGKILL while the study is being processed
    killed_in = {e["study_uid"] for e in first.find(lambda e: e.get("event") == "study_started")}

    second = _start(nodes, config)
    recovered = second.find(lambda e: e.get("event") == "recovered")[0]
    unfinished = killed_in - {e["study_uid"] for e in first.find(lambda e: e.get("event") == "study")}
    assert set(recovered["studies_requeued"]) == unfinished and unfinished
    received = destination.wait_for_count(6, 120)  # SEG + SR for 2 radiographs and 1 CT series
    second.wait_for(lambda e: e.get("event") == "study" and e.get("study_uid") == ct.study_uid, 60, "the CT study")
    status = node_status(config)
    assert status["results"]["pending"] == 0 and status["results"]["sent"] == 6
    assert status["studies"]["done"] == 2
    counts = Counter(destination.sop_uids())
    assert len(counts) == 6 and set(counts.values()) == {1}, counts
    kinds = Counter((str(ds.StudyInstanceUID), str(ds.Modality)) for ds in received)
    expected = {(cr.study_uid, "SEG"): 2, (cr.study_uid, "SR"): 2, (ct.study_uid, "SEG"): 1, (ct.study_uid, "SR"): 1}
    assert kinds == expected
    # a third start finds nothing left to do and sends nothing again
    third = _start(nodes, config)
    assert third.find(lambda e: e.get("event") == "recovered")[0]["studies_requeued"] == []
    assert third.terminate() == 0
    assert len(destination.sop_uids()) == 6


def test_sigterm_finishes_the_study_in_progress_and_keeps_the_rest_queued(bundle, destination, nodes, tmp_path):
    first_study = radiograph_study(tmp_path / "a", n=1, seed=21)
    second_study = radiograph_study(tmp_path / "b", n=1, seed=22)
    config = node_config(tmp_path, bundle, 0, _dest(destination.port))
    node = _start(nodes, config)
    assert send_files(node.port, first_study.files + second_study.files) == [0, 0]
    started = node.wait_for(lambda e: e.get("event") == "study_started", 60, "a study to start")
    node.proc.send_signal(15)
    assert node.proc.wait(timeout=60) == 0
    node.kill()
    done = node.find(lambda e: e.get("event") == "study")
    assert [(e["study_uid"], e["result"]) for e in done] == [(started["study_uid"], "done")]
    assert node.find(lambda e: e.get("event") == "stopped")[0]["queued"] == 1
    assert len(node.find(lambda e: e.get("event") == "study_started")) == 1
    # the next start processes the study that was kept
    again = _start(nodes, config)
    destination.wait_for_count(4, 120)
    again.wait_for(lambda e: e.get("event") == "study", 60, "the kept study")
    assert {e["study_uid"] for e in again.find(lambda e: e.get("event") == "study")} == (
        {first_study.study_uid, second_study.study_uid} - {started["study_uid"]}
    )
    assert len(set(destination.sop_uids())) == 4


def test_destination_down_keeps_results_queued_and_visible_then_delivers_them(bundle, nodes, tmp_path):
    study = radiograph_study(tmp_path / "cr", n=2)
    # the PACS is down: its port is held by a socket that does not listen (connections are refused), so no
    # other program takes it before the PACS comes back
    placeholder = socket.socket()
    placeholder.bind(("127.0.0.1", 0))
    destination_port = placeholder.getsockname()[1]
    config = node_config(tmp_path, bundle, 0, _dest(destination_port))
    node = _start(nodes, config)
    assert send_files(node.port, study.files) == [0, 0]
    node.wait_for(lambda e: e.get("event") == "send" and e.get("result") == "retry" and e.get("attempt") >= 2, 60)
    status = node_status(config)
    assert status["studies"]["done"] == 1
    assert status["results"]["pending"] == 4 and status["results"]["sent"] == 0
    waiting = status["results"]["waiting_by_destination"]["pacs"]
    assert waiting["results"] == 4 and "could not be reached" in waiting["last_error"]
    assert any("could not be reached" in e["message"] for e in status["last_errors"])

    placeholder.close()
    destination = RecordingSCP(destination_port).start()  # the PACS is back
    try:
        received = destination.wait_for_count(4, 60)
    finally:
        destination.stop()
    assert sorted(str(ds.Modality) for ds in received) == ["SEG", "SEG", "SR", "SR"]
    status = node_status(config)
    assert status["results"]["pending"] == 0 and status["results"]["sent"] == 4


def _truncated_copy(source: Path, target: Path) -> Path:
    """Another instance of the same study and series whose pixel data stops half-way."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(target)
    return target


def test_corrupt_instance_gets_a_failure_status_and_a_report_row_and_the_rest_is_processed(
    bundle, destination, nodes, tmp_path
):
    study = radiograph_study(tmp_path / "cr", n=2)
    corrupt = _truncated_copy(study.files[0], tmp_path / "corrupt.dcm")
    config = node_config(tmp_path, bundle, 0, _dest(destination.port))
    node = _start(nodes, config)
    assert send_files(node.port, [study.files[0], corrupt, study.files[1]]) == [0x0000, 0xA900, 0x0000]
    line = node.wait_for(lambda e: e.get("event") == "study", 60, "the study")
    assert (line["result"], line["ok"], line["errors"]) == ("done", 2, 1)
    destination.wait_for_count(4, 60)  # SEG + SR of each good radiograph
    report = next((tmp_path / "state" / "results").glob(f"*/{study.study_uid}/report.json"))
    rows = json.loads(report.read_text())["rows"]
    assert sorted(r["status"] for r in rows) == ["error", "ok", "ok"]
    error = next(r for r in rows if r["status"] == "error")
    assert error["reason"].startswith("refused at receipt: pixel data truncated")
    assert error["series_uid"] == study.series_uids[0]
    status = node_status(config)
    assert status["instances_rejected"] == 1 and status["instances_received"] == 2
    rejected = list((tmp_path / "state" / "rejected" / study.study_uid).iterdir())
    assert len(rejected) == 1  # the bytes as received, kept for inspection
    assert pydicom.dcmread(rejected[0]).SOPInstanceUID == pydicom.dcmread(corrupt).SOPInstanceUID
