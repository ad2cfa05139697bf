"""Process hygiene of ``pneumoseg infer`` (pneumoseg.infer.pipeline, dataset, cli): DataLoader workers die with
the main process, a worker crash costs its scan alone, SIGTERM / SIGINT stop after the writes in flight with a
report of what finished, and the exit codes say what happened."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, tiny_bundle

from pneumoseg.data import phantoms
from pneumoseg.infer import EXIT_FAILED, EXIT_SCAN_ERRORS, BatchInferenceRunner

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough radiographs that a run with workers is still going when it is killed."""
    root = tmp_path_factory.mktemp("inputs")
    for i, case in enumerate(phantoms.plan_radiographs(48, seed=8, size=96)):
        image, _ = phantoms.draw_radiograph_case(case, 8, 96)
        phantoms.write_radiograph_dicom(root / f"r{i:02d}.dcm", image, case)
    return root


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet is dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start(bundle: Path, inputs: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "pneumoseg", "infer", str(inputs), str(out), "--bundle", str(bundle),
               "--device", "cpu", "--fp32", "--workers", "2", "--batch-size", "1", "--formats", "png,seg,overlay",
               "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_records(proc: subprocess.Popen, out: Path, n: int, timeout: float = 120) -> set[int]:
    """Wait until ``n`` scans are done while the run is still going; the run's worker processes."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        if len(list((out / "scans").rglob("record.json"))) >= n and len(workers) >= 2:
            return workers
        time.sleep(0.01)
    raise AssertionError(f"the run ended (code {proc.poll()}) or stalled before {n} scans were done")


@pytest.mark.slow
def test_killing_the_main_process_leaves_no_worker_alive(bundle, inputs, tmp_path):
    out = tmp_path / "out"
    proc = _start(bundle, inputs, out)
    workers = _wait_for_records(proc, out, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 5
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.05)
    assert not [p for p in workers if _alive(p)], "DataLoader workers outlived the killed run"
    # and the folder is free for the next run, which completes it
    resumed = subprocess.run(proc.args, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "report.json").read_text())["summary"]["ok"] == 48


@pytest.mark.slow
def test_sigterm_stops_after_the_writes_in_flight_and_reports_what_finished(bundle, inputs, tmp_path):
    out = tmp_path / "out"
    proc = _start(bundle, inputs, out)
    workers = _wait_for_records(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_FAILED, stderr
    assert "SIGTERM" in stderr and "Traceback" not in stderr
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["interrupted"] == "SIGTERM"
    done = {p.parent.relative_to(out / "scans").as_posix() for p in (out / "scans").rglob("record.json")}
    assert {r["scan_id"] for r in report["rows"]} == done and 2 <= len(done) < 48  # exactly what finished
    assert not list(out.rglob(".tmp-*"))
    time.sleep(0.5)
    assert not [p for p in workers if _alive(p)]


def test_a_worker_that_crashes_costs_its_scan_alone(bundle, inputs, tmp_path, monkeypatch):
    """A native crash while decoding (SIGSEGV in a worker): that scan is an error row, the run goes on with
    fresh workers and ends with exit code 1."""
    import pneumoseg.data.readers as readers

    real = readers.radiograph_from_dataset

    def crash_on_r05(ds, path, frame=None):
        if Path(path).name == "r05.dcm":
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(ds, path, frame)

    monkeypatch.setattr(readers, "radiograph_from_dataset", crash_on_r05)  # inherited by the forked workers
    subset = tmp_path / "in"
    subset.mkdir()
    for i in range(10):
        os.link(inputs / f"r{i:02d}.dcm", subset / f"r{i:02d}.dcm")
    out = tmp_path / "out"
    runner = BatchInferenceRunner(str(bundle), str(subset), str(out), device="cpu", workers=2, batch_size=2, fp32=True,
                                  progress=False, formats="png")  # fmt: skip
    assert runner.run() == EXIT_SCAN_ERRORS
    rows = {r["scan_id"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert rows["r05.dcm"]["status"] == "error" and "worker process reading this scan died" in rows["r05.dcm"]["reason"]
    assert all(r["status"] == "ok" for sid, r in rows.items() if sid != "r05.dcm") and len(rows) == 10
