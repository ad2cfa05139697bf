"""The PACS node's parts without a model: settings, the spool's checks, the queue's state machine and its
"sent once" key, association checks of the real Storage SCP, the sender's retries, the status report."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pacs_fixtures import RecordingSCP, free_port, radiograph_study, send_files, write_config
from pydicom.uid import generate_uid

from pneumoseg.pacs.config import ConfigError, Destination, SendSettings, load_config, parse_destination
from pneumoseg.pacs.queue import NodeQueue, ResultToSend
from pneumoseg.pacs.scp import StorageSCP
from pneumoseg.pacs.sender import DimseStore, Sender
from pneumoseg.pacs.spool import Rejected, Spool, Stored, check_instance
from pneumoseg.pacs.status import format_status, node_status

# ============================================================================================== settings


def test_config_file_then_command_line_overrides(tmp_path):
    path = write_config(
        tmp_path / "node.toml",
        node={"ae_title": "AI_NODE", "port": 104, "state_dir": "state", "allowed_ae_titles": ["PACS1", "PACS2"]},
        results={"secondary_capture": True},
        destinations=[{"name": "pacs", "ae_title": "PACS1", "host": "10.1.2.3", "port": 4242}],
    )
    config = load_config(path, {"node.port": 11112, "node.quiet_seconds": None})
    assert config.node.ae_title == "AI_NODE" and config.node.port == 11112  # the override wins
    assert config.node.quiet_seconds == 30.0  # None: not overridden, the default's one home
    assert config.node.allowed_ae_titles == ("PACS1", "PACS2")
    assert config.state_dir == tmp_path / "state"  # relative to the config file
    assert config.results_dir == tmp_path / "state" / "results"
    assert config.results.secondary_capture and config.results.seg and config.results.sr
    assert config.destinations == (Destination("pacs", "PACS1", "10.1.2.3", 4242),)
    override = load_config(path, {"destinations": [parse_destination("ORTHANC@127.0.0.1:4242")]})
    assert override.destinations == (Destination("ORTHANC", "ORTHANC", "127.0.0.1", 4242),)


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"node": {"prot": 104}}, "node: unknown key(s) ['prot']"),
        ({"node": {"port": "104"}}, "node.port: expected int"),
        ({"node": {"ae_title": "A_TITLE_LONGER_THAN_16"}}, "node.ae_title"),
        ({"nodes": {"port": 104}}, "unknown section(s) ['nodes']"),
        ({"destinations": [{"name": "x", "ae_title": "X", "host": "h"}]}, "missing key(s) ['port']"),
        ({"node": {"allowed_hosts": ["not-an-address"]}}, "node.allowed_hosts"),
    ],
)
def test_config_errors_name_the_file_and_the_key(tmp_path, sections, message):
    path = write_config(tmp_path / "node.toml", **sections)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and message in str(err.value)


# ================================================================================================ spool


def test_spool_keeps_a_good_instance_durably_and_refuses_broken_ones(tmp_path):
    study = radiograph_study(tmp_path / "in", n=1)
    good = study.files[0].read_bytes()
    spool = Spool(tmp_path / "state")
    stored = spool.store(good)
    assert isinstance(stored, Stored) and stored.modality == "CR"
    assert stored.path == spool.spool_dir / study.study_uid / study.series_uids[0] / f"{stored.sop_uid}.dcm"
    assert stored.path.read_bytes() == good and spool.remove_temporaries() == 0

    ds = pydicom.dcmread(study.files[0])
    ds.PixelData = ds.PixelData[:100]
    truncated = tmp_path / "truncated.dcm"
    ds.save_as(truncated)
    ds = pydicom.dcmread(study.files[0])
    ds.SeriesInstanceUID = "../../etc"  # UIDs name folders: nothing else may reach a path
    traversal = tmp_path / "traversal.dcm"
    ds.save_as(traversal)
    cases = {
        truncated: ("pixel data truncated (100 of", 0xA900),
        traversal: ("SeriesInstanceUID missing or not a valid UID", 0xA900),
    }
    for path, (reason, status) in cases.items():
        _, why, code = check_instance(path.read_bytes())
        assert why.startswith(reason) and code == status
        refused = spool.store(path.read_bytes())
        assert isinstance(refused, Rejected) and refused.reason == why and refused.path.is_file()
    _, why, code = check_instance(good[: len(good) // 3])  # cut inside the header
    assert code in (0xA900, 0xC210) and why
    assert check_instance(b"exported by PACS, not DICOM")[1:] == ("unreadable data set (InvalidDicomError)", 0xC210)
    assert [p.name for p in spool.spool_dir.rglob("*.dcm")] == [stored.path.name]  # refused ones stay out


# ================================================================================================ queue


def _result(series: str, sop: str, destination: str = "pacs") -> ResultToSend:
    return ResultToSend(series, "fp1", destination, sop, "1.2.3", "seg", "/nowhere/seg.dcm")


def test_queue_study_life_cycle_survives_reopening_and_never_queues_a_result_twice(tmp_path):
    db = tmp_path / "queue.sqlite3"
    queue = NodeQueue(db)
    queue.record_instance("1.2.3", "1.2.3.1", "1.2.3.1.1", "CR", now=100.0)
    queue.record_instance("1.2.3", "1.2.3.1", "1.2.3.1.2", "CR", now=101.0)
    assert queue.promote_quiet_studies(5.0, now=105.0) == []  # the quiet time restarts with each instance
    assert queue.promote_quiet_studies(5.0, now=106.0) == ["1.2.3"]
    claim = queue.claim_study()
    assert claim is not None and claim.attempts == 1 and queue.claim_study() is None

    # kill -9 while processing: a new connection (a new process) finds it and queues it again
    queue.close()
    queue = NodeQueue(db)
    assert queue.study("1.2.3")["state"] == "processing"
    assert queue.recover(max_attempts=3) == ["1.2.3"]
    claim = queue.claim_study()
    state, new = queue.finish_study(claim, seconds=1.0, results=[_result("1.2.3.1", "9.1"), _result("1.2.3.1", "9.2")])
    assert (state, new) == ("done", 2)
    assert queue.study("1.2.3")["instances"] == 2

    # a late instance: the study is processed again, its results already queued are not queued again
    queue.record_instance("1.2.3", "1.2.3.2", "1.2.3.2.1", "CR", now=200.0)
    queue.promote_quiet_studies(5.0, now=210.0)
    claim = queue.claim_study()
    results = [_result("1.2.3.1", "9.1"), _result("1.2.3.1", "9.2"), _result("1.2.3.2", "9.3")]
    assert queue.finish_study(claim, results=results) == ("done", 1)
    assert [s["sop_uid"] for s in queue.sends()] == ["9.1", "9.2", "9.3"]

    # an instance arriving while the study is processed keeps it receiving (processed once more later)
    queue.record_instance("1.2.3", "1.2.3.2", "1.2.3.2.2", "CR", now=300.0)
    queue.promote_quiet_studies(5.0, now=310.0)
    claim = queue.claim_study()
    queue.record_instance("1.2.3", "1.2.3.2", "1.2.3.2.3", "CR", now=311.0)
    assert queue.finish_study(claim)[0] == "receiving"


def test_queue_fails_a_study_interrupted_max_attempts_times(tmp_path):
    queue = NodeQueue(tmp_path / "queue.sqlite3")
    queue.record_instance("1.2.3", "1.2.3.1", "1.2.3.1.1", "CT", now=0.0)
    for _ in range(2):
        queue.promote_quiet_studies(0.0)
        assert queue.claim_study() is not None
        queue.recover(max_attempts=2)
    study = queue.study("1.2.3")
    assert study["state"] == "failed" and "interrupted 2 times" in study["error"]


# ======================================================================================= Storage SCP


@pytest.fixture
def scp(tmp_path):
    """The node's Storage SCP alone (no model), accepting ORTHANC from 127.0.0.1 only."""
    from pneumoseg.pacs.config import NodeSettings

    settings = NodeSettings(port=free_port(), allowed_ae_titles=("ORTHANC",), allowed_hosts=("127.0.0.1",))
    queue = NodeQueue(tmp_path / "state" / "queue.sqlite3")
    server = StorageSCP(settings, Spool(tmp_path / "state"), queue)
    server.start()
    try:
        yield server, queue
    finally:
        server.stop()


def _associate(port: int, calling: str):
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae.associate("127.0.0.1", port, ae_title="PNEUMOSEG")


def test_scp_rejects_calling_ae_titles_not_allowed_and_answers_echo(scp, tmp_path):
    server, queue = scp
    assoc = _associate(server.port, "INTRUDER")
    assert assoc.is_rejected and not assoc.is_established
    assoc = _associate(server.port, "ORTHANC")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert any("INTRUDER@127.0.0.1 rejected: calling AE title not allowed" in e["message"] for e in queue.last_errors())
    with pytest.raises(AssertionError, match="association"):
        send_files(server.port, radiograph_study(tmp_path / "in", n=1).files, calling_ae="INTRUDER")
    assert queue.studies() == []  # nothing of a refused association reached the spool


def test_scp_rejects_peers_outside_the_allowed_hosts(tmp_path):
    from pneumoseg.pacs.config import NodeSettings

    settings = NodeSettings(port=free_port(), allowed_hosts=("10.0.0.0/8",))
    queue = NodeQueue(tmp_path / "queue.sqlite3")
    server = StorageSCP(settings, Spool(tmp_path), queue)
    server.start()
    try:
        assoc = _associate(server.port, "ANY")
        assert assoc.is_rejected
    finally:
        server.stop()
    assert "peer address not allowed" in queue.last_errors()[0]["message"]


def test_scp_stores_before_answering_and_refuses_a_corrupt_instance(scp, tmp_path):
    server, queue = scp
    study = radiograph_study(tmp_path / "in", n=2)
    ds = pydicom.dcmread(study.files[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PixelData = ds.PixelData[:64]
    ds.save_as(tmp_path / "corrupt.dcm")
    statuses = send_files(server.port, [study.files[0], tmp_path / "corrupt.dcm", study.files[1]], "ORTHANC")
    assert statuses == [0x0000, 0xA900, 0x0000]
    spooled = sorted(p.name for p in (tmp_path / "state" / "spool" / study.study_uid).rglob("*.dcm"))
    sops = sorted(f"{pydicom.dcmread(f).SOPInstanceUID}.dcm" for f in study.files)
    assert spooled == sops
    assert queue.study(study.study_uid)["instances"] == 2
    (rejection,) = queue.rejections(study.study_uid)
    assert rejection["sop_uid"] == ds.SOPInstanceUID and rejection["reason"].startswith("pixel data truncated")


# ============================================================================================= sender


def _queued_seg(tmp_path: Path, queue: NodeQueue) -> str:
    """A real SEG (the runner's writer, on a phantom's header) queued for destination ``pacs``; its UID."""
    import numpy as np

    from pneumoseg.infer.writers import write_dicom_seg

    study = radiograph_study(tmp_path / "in", n=1)
    header = pydicom.dcmread(study.files[0], stop_before_pixels=True)
    mask = np.zeros((1, header.Rows, header.Columns), bool)
    mask[0, 10:20, 10:30] = True
    path = tmp_path / "seg.dcm"
    write_dicom_seg(path, [header], mask, "test", "1", uid_seed="seg")
    sop = str(pydicom.dcmread(path).SOPInstanceUID)
    queue.record_instance(study.study_uid, study.series_uids[0], str(header.SOPInstanceUID), "CR")
    queue.promote_quiet_studies(0.0)
    result = ResultToSend(study.series_uids[0], "fp", "pacs", sop, study.study_uid, "seg", str(path))
    queue.finish_study(queue.claim_study(), results=[result])
    return sop


def test_sender_backs_off_while_the_destination_is_down_then_delivers_once(tmp_path):
    queue = NodeQueue(tmp_path / "queue.sqlite3")
    sop = _queued_seg(tmp_path, queue)
    port = free_port()
    destination = Destination("pacs", "PACS", "127.0.0.1", port)
    sender = Sender(queue, {"pacs": lambda: DimseStore(destination, "PNEUMOSEG", 5.0)}, SendSettings(0.3, 0.6, 3))
    assert sender.send_due() == 0
    (pending,) = queue.sends()
    assert (
        pending["state"] == "pending" and pending["attempts"] == 1 and "could not be reached" in pending["last_error"]
    )
    assert pending["next_attempt"] > time.time()  # backing off: not tried again before then
    assert sender.send_due() == 0 and queue.sends()[0]["attempts"] == 1
    recorder = RecordingSCP(port).start()  # the destination is back
    try:
        time.sleep(max(0.0, pending["next_attempt"] - time.time()) + 0.05)
        assert sender.send_due() == 1
        assert sender.send_due() == 0  # sent: never again
        assert recorder.sop_uids() == [sop]
    finally:
        recorder.stop()
    assert queue.sends()[0]["state"] == "sent" and queue.sends()[0]["attempts"] == 2


def test_sender_gives_up_after_max_attempts_of_a_refusing_destination(tmp_path):
    queue = NodeQueue(tmp_path / "queue.sqlite3")
    sop = _queued_seg(tmp_path, queue)
    recorder = RecordingSCP(free_port(), status=0xA700).start()  # "out of resources", every time
    destination = Destination("pacs", "PACS", "127.0.0.1", recorder.port)
    sender = Sender(queue, {"pacs": lambda: DimseStore(destination, "PNEUMOSEG", 5.0)}, SendSettings(0.05, 0.05, 2))
    try:
        assert sender.send_due() == 0
        time.sleep(0.1)
        assert sender.send_due() == 0
    finally:
        recorder.stop()
    (send,) = queue.sends()
    assert (send["state"], send["attempts"], send["last_error"]) == ("failed", 2, "C-STORE status 0xA700")
    assert recorder.sop_uids() == [sop, sop]
    assert node_status(queue)["results"]["failed"] == 1


def test_status_reports_depths_waiting_results_errors_and_throughput(tmp_path):
    queue = NodeQueue(tmp_path / "queue.sqlite3")
    for study in ("1.1", "1.2", "1.3"):
        queue.record_instance(study, study + ".1", study + ".1.1", "CR")
    queue.promote_quiet_studies(0.0)
    queue.finish_study(queue.claim_study(), seconds=2.0, results=[_result("1.1.1", "9.1"), _result("1.1.1", "9.2")])
    queue.mark_sent(queue.sends()[0]["id"])
    queue.mark_send_failed(queue.sends()[1]["id"], "PACS@10.1.2.3:104 could not be reached", time.time() + 60)
    queue.claim_study()
    status = node_status(queue)
    assert status["studies"] == {"receiving": 0, "queued": 1, "processing": 1, "done": 1, "failed": 0}
    assert status["results"]["pending"] == 1 and status["results"]["sent"] == 1
    assert status["results"]["waiting_by_destination"]["pacs"]["last_error"].endswith("could not be reached")
    assert status["throughput_last_hour"] == {"studies": 1, "mean_seconds_per_study": 2.0, "results_sent": 1}
    text = format_status(status)
    assert "studies: 0 receiving, 1 queued, 1 processing, 1 done, 0 failed" in text
    assert "results: 1 waiting (pacs: 1, oldest" in text and "could not be reached" in text
    # read-only while the node writes (a second connection)
    assert node_status(NodeQueue(tmp_path / "queue.sqlite3", readonly=True))["studies"] == status["studies"]


def test_serve_status_without_state_is_a_usage_error(tmp_path, capsys):
    from pneumoseg.cli import main

    assert main(["serve", "status", "--state-dir", str(tmp_path / "none")]) == 2
    assert "no node state here" in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
