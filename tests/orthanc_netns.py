"""Run a real Orthanc reachable from 127.0.0.1 only (used by tests/pacs_fixtures.py).

Orthanc 1.10 (Debian bookworm) listens on every interface and has no bind-address setting, so the tests
run it in a private network namespace (``unshare -n``: only a loopback interface) and carry its ports to
the host's loopback through Unix sockets in a test folder; nothing listens beyond 127.0.0.1.

Inside the namespace (this script, ``python orthanc_netns.py ORTHANC CONFIG.json SOCKET_DIR``): loopback up,
Orthanc started with CONFIG.json (HTTP 8042, DICOM 4242), ``SOCKET_DIR/http.sock`` and ``dicom.sock`` lead to
them, and 127.0.0.1:11112 (the node, as Orthanc's modality entry names it) leads to ``SOCKET_DIR/node.sock``,
which the host side forwards to the node. Ends Orthanc on SIGTERM.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

HTTP_PORT, DICOM_PORT, NODE_PORT = 8042, 4242, 11112
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(1 << 16):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def forward(listener: socket.socket, connect: Callable[[], socket.socket]) -> threading.Thread:
    """Accept on ``listener``; pipe each connection both ways to a new ``connect()`` (threads, daemons)."""

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = connect()
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def tcp_listener(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(16)
    return s


def unix_listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(16)
    return s


def tcp_connect(port: int) -> Callable[[], socket.socket]:
    return lambda: socket.create_connection(("127.0.0.1", port), timeout=None)


def unix_connect(path: Path) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        return s

    return connect


def _loopback_up() -> None:
    """``ip link set lo up`` without iproute2 (SIOCSIFFLAGS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, _SIOCGIFFLAGS, struct.pack("16sH", b"lo", 0) + b"\0" * 22)[:18])
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags[1] | _IFF_UP) + b"\0" * 22)


def main(binary: str, config: str, socket_dir: str) -> int:
    folder = Path(socket_dir)
    _loopback_up()
    orthanc = subprocess.Popen([binary, config], stdout=subprocess.DEVNULL)
    signal.signal(signal.SIGTERM, lambda *_: orthanc.terminate())
    forward(unix_listener(folder / "http.sock"), tcp_connect(HTTP_PORT))
    forward(unix_listener(folder / "dicom.sock"), tcp_connect(DICOM_PORT))
    forward(tcp_listener(NODE_PORT), unix_connect(folder / "node.sock"))
    (folder / "ready").write_text(str(os.getpid()))
    code = orthanc.wait()
    return 0 if code in (0, -signal.SIGTERM) else code


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:4]))
