"""Helpers of the PACS node tests (tests/test_pacs*.py): a tiny bundle, phantom studies, a node process,
a recording Storage SCP (the destination) and a real Orthanc.

Everything listens on 127.0.0.1 and is stopped by the fixture that started it (killed if it does not stop).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pneumoseg.data import phantoms

REPO = Path(__file__).resolve().parents[1]
REAL_BUNDLE = REPO / "bundles" / "pneumothorax_scse_unet"
PYTHON = sys.executable
SIZE = 64
NETWORK_ARGS = {"decoder_channels": [16, 8, 8, 4, 4], "head_channels": 4, "cls_dropout": 0.0}


# ================================================================================================ the bundle


def make_tiny_bundle(root: Path, seed: int = 0) -> Path:
    """A bundle as training leaves it (metadata, weights, model record) with a tiny network at 64 px, random
    weights pushed to confident outputs (masks neither empty nor full), trained on radiographs and CT."""
    from pneumoseg.model_record import CTPreprocessing, ModelRecord
    from pneumoseg.networks import SCSEUNet

    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    shutil.copy(REAL_BUNDLE / "configs" / "metadata.json", root / "configs" / "metadata.json")
    torch.manual_seed(seed)
    net = SCSEUNet(**NETWORK_ARGS)
    with torch.no_grad():
        final = [m for m in net.seg_head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        final.weight.mul_(50.0)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    record = ModelRecord.for_training(net, "radiograph", SIZE)
    record = dataclasses.replace(record, preprocessing={**record.preprocessing, "ct": CTPreprocessing(image_size=SIZE)})
    record.write(root / "models" / "model_record.json")
    return root


# ============================================================================================ the studies


@dataclasses.dataclass
class Study:
    """Phantom files of one study and their UIDs."""

    study_uid: str
    files: list[Path]
    series_uids: list[str]


def radiograph_study(folder: Path, n: int = 2, seed: int = 3, index: int = 0) -> Study:
    """``n`` CR phantoms (96 px) of one study, one series each (as CR modalities send them)."""
    cases = phantoms.plan_radiographs(n + index, seed=seed, size=96)[index:]
    study_uid = cases[0].study_uid
    files, series = [], []
    for i, case in enumerate(cases):
        case = dataclasses.replace(
            case,
            study_uid=study_uid,
            patient_id=cases[0].patient_id,
            transfer_syntax="explicit",
            spacing_tag="PixelSpacing",
        )
        image, _ = phantoms.draw_radiograph_case(case, seed, 96)
        files.append(phantoms.write_radiograph_dicom(folder / f"cr{i}.dcm", image, case))
        series.append(case.series_uid)
    return Study(study_uid, files, series)


def ct_study(folder: Path, slices: int = 6, seed: int = 3, index: int = 0) -> Study:
    """One CT phantom series (64 x 64 x ``slices``)."""
    case = phantoms.plan_ct(index + 1, seed=seed)[index]
    hu, _, spacing = phantoms.draw_ct_case(case, seed, SIZE, slices)
    files = phantoms.write_ct_dicom_series(folder, hu, spacing, case, seed=seed)
    return Study(case.study_uid, files, [case.series_uid])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send_files(port: int, files: list[Path], calling_ae: str = "MODALITY", called_ae: str = "PNEUMOSEG") -> list[int]:
    """C-STORE ``files`` to the node (a modality's role); the status of each."""
    from pynetdicom import AE

    from pneumoseg.pacs.scp import TRANSFER_SYNTAXES
    from pneumoseg.pacs.spool import ACCEPTED_SOP_CLASSES

    ae = AE(ae_title=calling_ae)
    for sop_class in ACCEPTED_SOP_CLASSES:
        ae.add_requested_context(sop_class, TRANSFER_SYNTAXES[:2])
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established, f"association to the node on port {port} failed"
    statuses = []
    try:
        for f in files:
            status = assoc.send_c_store(Path(f))
            statuses.append(int(status.Status) if status and "Status" in status else -1)
    finally:
        assoc.release()
    return statuses


# ============================================================================================= the node


class NodeProcess:
    """``python -m pneumoseg serve --config CONFIG`` with its JSON log lines collected."""

    def __init__(self, config: Path, *extra: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "pneumoseg", "serve", "--config", str(config), *extra],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.events: list[dict[str, Any]] = []
        self.port = 0  # the port it listens on, from its "started" line
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    pass

    def find(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if predicate(e)]

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find(predicate)
            if found:
                return found[0]
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"node: no {what or 'such event'} within {timeout} s; log:\n" + self.log()[-6000:])

    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def started(self, timeout: float = 90) -> dict:
        line = self.wait_for(lambda e: e.get("event") == "started", timeout, "start")
        self.port = int(line["port"])
        return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=5)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.kill()
        return code


def write_config(path: Path, **sections: dict[str, Any]) -> Path:
    """A node.toml from ``{section: {key: value}}`` (``destinations``: a list of tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    lines = []
    for name, table in sections.items():
        if name == "destinations":
            for d in table:
                lines += ["[[destinations]]", *(f"{k} = {value(v)}" for k, v in d.items()), ""]
            continue
        lines += [f"[{name}]", *(f"{k} = {value(v)}" for k, v in table.items()), ""]
    path.write_text("\n".join(lines))
    return path


def node_config(
    tmp: Path, bundle: Path, port: int, destinations: list[dict], results: dict | None = None, **node: Any
) -> Path:
    """A test node: quiet time 1 s, fast retries, runner without worker processes."""
    return write_config(
        tmp / "node.toml",
        node={"ae_title": "PNEUMOSEG", "port": port, "state_dir": str(tmp / "state"), "quiet_seconds": 1.0, **node},
        inference={"bundles": [str(bundle)], "device": "cpu", "workers": 0, "batch_size": 4},
        results=results or {},
        send={"initial_backoff_seconds": 0.25, "max_backoff_seconds": 1.0, "timeout_seconds": 10.0},
        destinations=destinations,
    )


def node_status(config: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [PYTHON, "-m", "pneumoseg", "serve", "status", "--config", str(config), "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# ============================================================================ a destination that records


class RecordingSCP:
    """A Storage SCP (pynetdicom) that keeps every instance it is sent, in order (duplicates included)."""

    def __init__(self, port: int, ae_title: str = "PACS", status: int = 0x0000) -> None:
        self.port = port
        self.ae_title = ae_title
        self.status = status  # what it answers (a failure status: a destination that refuses)
        self.received: list[Any] = []
        self._server: Any = None
        self._lock = threading.Lock()

    def start(self) -> RecordingSCP:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import (
            ComprehensiveSRStorage,
            SecondaryCaptureImageStorage,
            SegmentationStorage,
        )

        ae = AE(ae_title=self.ae_title)
        for sop_class in (SegmentationStorage, ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            ae.add_supported_context(sop_class)

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            with self._lock:
                self.received.append(ds)
            return self.status

        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def sop_uids(self) -> list[str]:
        with self._lock:
            return [str(ds.SOPInstanceUID) for ds in self.received]

    def wait_for_count(self, n: int, timeout: float = 60) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.received) >= n:
                    return list(self.received)
            time.sleep(0.05)
        raise AssertionError(f"destination received {len(self.received)} of {n} results in {timeout} s")


# =================================================================================== a real Orthanc


ORTHANC_NETNS = Path(__file__).with_name("orthanc_netns.py")
DICOMWEB_PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so*")


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if os.path.exists(p)), None)


def dicomweb_plugin() -> str | None:
    import glob

    for pattern in DICOMWEB_PLUGINS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


class Orthanc:
    """Orthanc in a loopback-only network namespace (tests/orthanc_netns.py), its HTTP and DICOM ports
    forwarded to free ports on 127.0.0.1 here; its modality ``pneumoseg`` (AE PNEUMOSEG) reaches
    ``127.0.0.1:node_port`` here. Own temporary config and storage; stopped by :meth:`stop`."""

    AE_TITLE = "ORTHANC"

    def __init__(self, root: Path) -> None:
        import tempfile

        self.root = root
        self.node_port = 0
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.sockets = Path(tempfile.mkdtemp(prefix="orthanc-", dir="/tmp"))  # Unix socket paths are short
        self._listeners: list[socket.socket] = []
        self.proc: subprocess.Popen | None = None
        self.plugin = dicomweb_plugin()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60) -> Orthanc:
        from orthanc_netns import DICOM_PORT, HTTP_PORT, NODE_PORT, forward, tcp_listener, unix_connect, unix_listener

        config = {
            "Name": "pneumoseg-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": HTTP_PORT,
            "DicomPort": DICOM_PORT,
            "DicomAet": self.AE_TITLE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {"pneumoseg": ["PNEUMOSEG", "127.0.0.1", NODE_PORT]},
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "SaveJobs": False,
            "Plugins": [self.plugin] if self.plugin else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        }
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        self.proc = subprocess.Popen(
            ["unshare", "-n", PYTHON, str(ORTHANC_NETNS), orthanc_binary() or "Orthanc", str(path), str(self.sockets)],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "orthanc.log", "wb"), start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not (self.sockets / "ready").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start: {(self.root / 'orthanc.log').read_text()[-3000:]}")
            time.sleep(0.05)
        for port, sock in ((self.http_port, "http.sock"), (self.dicom_port, "dicom.sock")):
            self._listeners.append(tcp_listener(port))
            forward(self._listeners[-1], unix_connect(self.sockets / sock))
        self._listeners.append(unix_listener(self.sockets / "node.sock"))
        forward(self._listeners[-1], lambda: socket.create_connection(("127.0.0.1", self.node_port)))
        while True:
            try:
                self.get("/system")
                return self
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.root / "orthanc.log").read_text()[-3000:]
                    raise RuntimeError(f"Orthanc REST not up: {log}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        for s in self._listeners:
            s.close()
        self._listeners.clear()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the helper and Orthanc (its own session)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=20)
        shutil.rmtree(self.sockets, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ REST
    def get(self, path: str) -> Any:
        import requests

        response = requests.get(self.url + path, timeout=30)
        response.raise_for_status()
        return response.json() if "json" in response.headers.get("content-type", "") else response.content

    def post(self, path: str, data: Any) -> Any:
        import requests

        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        response = requests.post(self.url + path, data=body, timeout=120)
        response.raise_for_status()
        return response.json()

    def upload(self, files: list[Path]) -> list[str]:
        """POST each file to /instances; the Orthanc IDs of their studies (unique, in order)."""
        studies: list[str] = []
        for f in files:
            study = self.post("/instances", Path(f).read_bytes())["ParentStudy"]
            if study not in studies:
                studies.append(study)
        return studies

    def instances_of_modality(self, modality: str) -> list[bytes]:
        """The files of every instance of the series of ``modality`` (e.g. SEG, SR)."""
        series = self.post("/tools/find", {"Level": "Series", "Query": {"Modality": modality}})
        out = []
        for s in series:
            for instance in self.get(f"/series/{s}/instances"):
                out.append(self.get(f"/instances/{instance['ID']}/file"))
        return out
