"""The attack suite: a received bundle is data, never code.

Each class of payload that once ran through `bundle verify` and a receiving command (issue 12) is built
here, signed with a key the receiver trusts (the worst case: a trusted sender turned hostile, or its key
stolen). Controls prove each payload is live: MONAI's ConfigParser, logging.config.fileConfig,
torch.jit.load, pickle and ONNX Runtime do run it. Then:

- verify refuses the bundle and import writes nothing, or verify reports the content as documents that
  nothing executes (NOTE rows) and import keeps them read-only;
- one receiving pass runs every receiving command on the imported bundle and on folders holding every
  refused payload in place (as if someone unzipped them by hand): `bundle evaluate`, `bundle derive` + a
  one-epoch fine-tune (`python -m monai.bundle run training`), `infer --model`, `infer --bundle`. No
  marker file appears, nothing is written outside each command's output folder, nothing hangs.
- archives built to exhaust the receiver (100,000 members, zip bombs) are refused within seconds and
  bounded memory.
"""

from __future__ import annotations

import faulthandler
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_siim_manifest
from sharing_support import RECORD_BASED_INFER, TOP, members, pack, sender_bundle, tree

from pneumoseg.cli import main as cli_main
from pneumoseg.model_record import ModelRecord
from pneumoseg.sharing.archive import ArchiveLimits
from pneumoseg.sharing.export import export_bundle
from pneumoseg.sharing.receive import BundleRejected, import_bundle
from pneumoseg.sharing.signing import generate_key
from pneumoseg.sharing.verify import verify_bundle

pytestmark = pytest.mark.slow

# ===================================================================================== the payloads
# "{M}" is the folder a payload's marker file goes to: the markers folder in the suite, a scratch folder in
# the controls that prove the payload is live.

DOCUMENTS = {
    # `$` expressions and `_target_` that reach a module object by reference
    "reference/configs/inference.json": {
        "m": "$import os",
        "hook": "$@m.system('touch {M}/by_reference')",
        "fn": "$lambda **kw: __import__('os').system('touch {M}/target_reference')",
        "network_def": {"_target_": "@fn"},
        "run": ["$@hook", "$@network_def"],
    },
    # MONAI rewrites every '#' to '::': Python's ast sees a comment, MONAI evaluates a slice step
    "reference/configs/train.json": {
        "initialize": ["$[0][0#(__import__('os').system('touch {M}/hash_rewrite') or 1)\n]"],
    },
    # functions of allow-listed modules that write any path
    "reference/configs/evaluate.json": {
        "imports": ["$import numpy", "$import torch"],
        "tofile": "$numpy.zeros(1).tofile('{M}/numpy_tofile')",
        "mmap": "$torch.from_file('{M}/torch_from_file', shared=True, size=1)",
    },
    # a `%` macro pulling an expression from another file of the bundle
    "reference/configs/macro.json": {"net": "%reference/configs/payload.json#hook"},
    "reference/configs/payload.json": {"hook": "$__import__('os').system('touch {M}/macro')"},
    # resource exhaustion
    "reference/configs/hang.json": {"forever": "$sum(range(10**13))"},
}
DOCUMENT_MARKERS = {"by_reference", "target_reference", "hash_rewrite", "numpy_tofile", "torch_from_file", "macro"}

METADATA_HOOKS = {
    "description": "$__import__('os').system('touch {M}/metadata')",
    "intended_use": "@_meta_#description",
}
LOGGING_CONF = """[loggers]
keys=root
[handlers]
keys=file
[formatters]
keys=code
[logger_root]
level=INFO
handlers=file
[handler_file]
class=FileHandler
level=INFO
formatter=code
args=('pneumoseg.py', 'w')
[formatter_code]
format=import os; os.system('touch {M}/logging_conf')  # %(message)s
"""


def _fill(value, markers: Path):
    return json.loads(json.dumps(value).replace("{M}", str(markers)))


def _json(value, markers: Path) -> bytes:
    return (json.dumps(_fill(value, markers), indent=1) + "\n").encode()


class _System:
    """Pickles as a call of ``os.system``: what a hostile "checkpoint" looks like."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _pickled_weights(markers: Path) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"conv.weight": torch.zeros(1), "x": _System(f"touch {markers}/pickle")}, buffer)
    return buffer.getvalue()


def _torchscript_hook(markers: Path) -> bytes:
    """TorchScript whose ``__setstate__`` (run by ``torch.jit.load``) creates a file (a shared mapping)."""
    import io

    class Hook(torch.nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.path = path
            self.n = 0

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x.mean(dim=(1, 2, 3)).unsqueeze(1)

        @torch.jit.export
        def __getstate__(self) -> tuple[str, int, bool]:
            return (self.path, self.n, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[str, int, bool]) -> None:
            self.path = state[0]
            self.training = state[2]
            self.n = int(torch.from_file(self.path, shared=True, size=8).numel())

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(Hook(str(markers / "torchscript"))), buffer)
    return buffer.getvalue()


def _onnx_external(where: str) -> bytes:
    """A graph of the exported model's interface whose 4-value constant lives in ``secret.bin``: in a
    ``Constant`` node's attribute (``where="attribute"``) or in an ``If`` subgraph's initializer."""
    from onnx import TensorProto, helper

    secret = TensorProto(name="secret", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "secret.bin"), ("offset", "0"), ("length", "16")):
        secret.external_data.add(key=key, value=value)
    nodes = [helper.make_node("Identity", ["image"], ["seg"])]
    if where == "attribute":
        nodes.append(helper.make_node("Constant", [], ["c"], value=secret))
    else:
        then = helper.make_graph([], "then", [], [helper.make_tensor_value_info("secret", TensorProto.FLOAT, [4])],
                                 initializer=[secret])  # fmt: skip
        zero = helper.make_tensor("zero", TensorProto.FLOAT, [4], [0.0] * 4)
        other = helper.make_graph([helper.make_node("Constant", [], ["z"], value=zero)], "else", [],
                                  [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])])  # fmt: skip
        true = helper.make_tensor("true", TensorProto.BOOL, [], [True])
        nodes += [helper.make_node("Constant", [], ["cond"], value=true),
                  helper.make_node("If", ["cond"], ["c"], then_branch=then, else_branch=other)]  # fmt: skip
    nodes.append(helper.make_node("Reshape", ["c", "shape"], ["cls"]))
    graph = helper.make_graph(
        nodes, "payload",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, "height", "width"])],
        [helper.make_tensor_value_info("seg", TensorProto.FLOAT, ["batch", 1, "height", "width"]),
         helper.make_tensor_value_info("cls", TensorProto.FLOAT, [1, 4])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [1, 4])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


SECRET = np.array([1.5, 2.5, 3.5, 4.5], np.float32)


def refused_payloads(markers: Path) -> dict[str, tuple[dict[str, bytes], str]]:
    """Bundles verify must refuse: case -> (members added or replaced, what the failing row says)."""
    return {
        "config-the-receiver-would-run": (
            {"configs/inference.json": _json(DOCUMENTS["reference/configs/inference.json"], markers)},
            "configs/inference.json: not accepted: a config the receiving side would run",
        ),
        "metadata-hooks": (None, "text starting with '$' is an expression to MONAI"),  # filled in below
        "schema-hook": (
            {"configs/meta_schema.json": _json({"type": "object", "x": METADATA_HOOKS["description"]}, markers)},
            "configs/meta_schema.json: not accepted",
        ),
        "upper-case-extension": (
            {"reference/configs/evil.JSON": _json(DOCUMENTS["reference/configs/inference.json"], markers)},
            "reference/configs/evil.JSON: not accepted: reference configs are named",
        ),
        "upper-case-name": (
            {"configs/Metadata.JSON": _json(METADATA_HOOKS, markers)},
            "configs/Metadata.JSON: not accepted: spelled differently from configs/metadata.json",
        ),
        "logging-conf": (
            {"configs/logging.conf": LOGGING_CONF.replace("{M}", str(markers)).encode()},
            "configs/logging.conf: not accepted: a logging configuration is code",
        ),
        "python-files": (
            {
                "pneumoseg.py": f"import os; os.system('touch {markers}/python_file')\n".encode(),
                "models/evil.pth": f"import os; os.system('touch {markers}/pth')\n".encode(),
            },
            "pneumoseg.py: not accepted: a code file",
        ),  # fmt: skip
        "torchscript-hook": (
            {"models/model.ts": _torchscript_hook(markers)},
            "models/model.ts: not accepted: TorchScript is code",
        ),
        "onnx-external-data-in-attribute": (
            {"models/model.onnx": _onnx_external("attribute")},
            "graph node 'Constant' attribute 'value': tensor 'secret' keeps its data in an external file",
        ),
        "onnx-external-data-in-subgraph": (
            {"models/model.onnx": _onnx_external("subgraph")},
            "attribute 'then_branch' subgraph initializer: tensor 'secret' keeps its data in an external file",
        ),
        "pickle-in-weights": (
            {"models/model.pt": _pickled_weights(markers)},
            "models/model.pt: not a weights-only checkpoint (UnpicklingError)",
        ),
    }


# ======================================================================================== fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """Keys (the hostile sender's key is pinned), an honest export (no ONNX: faster) and a markers folder."""
    root = tmp_path_factory.mktemp("attacks")
    key, public, _ = generate_key(root / "keys" / "hospital_a")
    trusted = root / "trusted"
    trusted.mkdir()
    shutil.copyfile(public, trusted / "hospital_a.pub")
    source = sender_bundle(root / "sender" / TOP)
    honest = export_bundle(source, root / "honest.zip", sign=key, onnx=False, reference_configs=False)
    markers = root / "markers"
    markers.mkdir()
    base = members(Path(honest.out))
    meta = json.loads(base["configs/metadata.json"])
    payloads = refused_payloads(markers)
    payloads["metadata-hooks"] = ({"configs/metadata.json": _json({**meta, **METADATA_HOOKS}, markers)},
                                  payloads["metadata-hooks"][1])  # fmt: skip
    return {"root": root, "key": key, "trusted": trusted, "base": base, "markers": markers, "payloads": payloads}


@pytest.fixture(scope="module")
def site_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_siim_manifest(
        tmp_path_factory.mktemp("attack_site"), 8, seed=7, val_fraction=0.25, test_fraction=0.25, salt="attack"
    )


# ======================================================================================== controls


def test_the_payloads_are_live(world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run every payload the way MONAI, logging, TorchScript, pickle and ONNX Runtime would: each leaves its
    marker (so the suite's "no marker" means something)."""
    from monai.bundle import ConfigParser

    scratch = tmp_path / "scratch"
    (scratch / "reference" / "configs").mkdir(parents=True)
    for name, value in DOCUMENTS.items():
        (scratch / name).write_bytes(_json(value, scratch))
    monkeypatch.chdir(scratch)  # a `%` macro's path is relative to the working folder
    for name, ids in (("inference", ["run"]), ("train", ["initialize"]), ("evaluate", ["tofile", "mmap"]),
                      ("macro", ["net"])):  # fmt: skip
        parser = ConfigParser()
        parser.read_config(str(scratch / "reference" / "configs" / f"{name}.json"))
        for id_ in ids:
            parser.get_parsed_content(id_)
    meta = ConfigParser()
    meta.read_meta(_fill(METADATA_HOOKS, scratch))
    meta.get_parsed_content("_meta_#intended_use")
    torch.jit.load(__import__("io").BytesIO(_torchscript_hook(scratch)))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(__import__("io").BytesIO(_pickled_weights(scratch)), weights_only=True)
    torch.load(__import__("io").BytesIO(_pickled_weights(scratch)), weights_only=False)
    made = {p.name for p in scratch.iterdir() if p.is_file()}
    assert made == DOCUMENT_MARKERS | {"metadata", "torchscript", "pickle"}
    # logging.conf: fileConfig writes pneumoseg.py into the working folder; `python -c/-m` there imports it
    (scratch / "logging.conf").write_text(LOGGING_CONF.replace("{M}", str(scratch)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    log = "import logging, logging.config; logging.config.fileConfig('logging.conf'); logging.getLogger().info('x')"
    subprocess.run([sys.executable, "-c", log], cwd=scratch, env=env, check=True, timeout=60)
    subprocess.run([sys.executable, "-c", "import pneumoseg"], cwd=scratch, env=env, check=True, timeout=60)
    assert (scratch / "logging_conf").exists()
    # ONNX: Runtime reads the external file relative to the working folder (subgraph) or the model's folder
    import onnxruntime as ort

    SECRET.tofile(scratch / "secret.bin")
    image = {"image": np.zeros((1, 1, 4, 4), np.float32)}
    subgraph = ort.InferenceSession(_onnx_external("subgraph"), providers=["CPUExecutionProvider"])
    assert subgraph.run(None, image)[1].tolist() == [SECRET.tolist()]
    (scratch / "model.onnx").write_bytes(_onnx_external("attribute"))
    attribute = ort.InferenceSession(str(scratch / "model.onnx"), providers=["CPUExecutionProvider"])
    assert attribute.run(None, image)[1].tolist() == [SECRET.tolist()]


# ================================================================================ verify and import


@pytest.mark.parametrize(
    "case",
    [
        "config-the-receiver-would-run", "metadata-hooks", "schema-hook", "upper-case-extension", "upper-case-name",
        "logging-conf", "python-files", "torchscript-hook", "onnx-external-data-in-attribute",
        "onnx-external-data-in-subgraph", "pickle-in-weights",
    ],
)  # fmt: skip
def test_refused_payload(case: str, world, tmp_path: Path):
    added, reason = world["payloads"][case]
    archive = pack({**world["base"], **added}, tmp_path / "inbox" / "bundle.zip", key=world["key"])
    report = verify_bundle(archive, trusted_keys=world["trusted"])
    failed = [c.detail for c in report.checks if c.status == "FAIL"]
    assert not report.ok and any(reason in f for f in failed), report.table()
    with pytest.raises(BundleRejected):
        import_bundle(archive, tmp_path / "inbox" / "received", trusted_keys=world["trusted"])
    assert sorted(p.name for p in (tmp_path / "inbox").iterdir()) == ["bundle.zip"]  # nothing written
    assert not any(world["markers"].iterdir())


def test_documents_are_reported_and_never_run(world, tmp_path: Path):
    """The sender's configs, payloads and all, are accepted as documents: NOTE rows that say nothing runs
    them, with how they differ from the installed templates."""
    documents = {name: _json(value, world["markers"]) for name, value in DOCUMENTS.items()}
    archive = pack({**world["base"], **documents}, tmp_path / "documents.zip", key=world["key"])
    report = verify_bundle(archive, trusted_keys=world["trusted"])
    assert report.ok, report.table()
    notes = {c.subject: c.detail for c in report.checks if c.status == "NOTE"}
    assert set(notes) == set(DOCUMENTS)
    assert all(detail.startswith("document only, nothing runs it") for detail in notes.values())
    assert "(5 $-expressions, 1 _target_)" in notes["reference/configs/inference.json"]
    assert "values differ from the installed configs/train.json" in notes["reference/configs/train.json"]
    assert notes["reference/configs/hang.json"].endswith("no installed config of that name")
    assert not any(world["markers"].iterdir())


def test_received_text_cannot_drive_the_terminal(world, tmp_path: Path):
    """Names and values verify prints come from the sender: escape sequences are shown escaped."""
    meta = json.loads(world["base"]["configs/metadata.json"])
    escape = "\x1b]0;owned\x07\x1b[2J\u202e"
    files = {
        **world["base"],
        "configs/metadata.json": json.dumps({**meta, "name": f"Lung{escape}"}).encode(),
        "reference/configs/train.json": json.dumps({f"key{escape}": f"value{escape}"}).encode(),
    }
    report = verify_bundle(pack(files, tmp_path / "escape.zip", key=world["key"]), trusted_keys=world["trusted"])
    table = report.table(differences=True)
    assert report.ok and "\x1b" not in table and "\u202e" not in table and "\x07" not in table
    assert "name: Lung\\x1b]0;owned\\x07\\x1b[2J\\u202e" in table and "key\\x1b]0;owned" in table


@pytest.mark.parametrize(
    "files,reason",
    [
        ({f"{TOP}/configs/metadata.json": b"{}", f"{TOP}/../x": b"x"}, "'..' in member path"),
        ({f"{TOP}/configs/metadata.json": b"{}", "/tmp/abs_x": b"x"}, "absolute member path"),
        ({f"{TOP}/configs/metadata.json": b"{}", f"{TOP}//x": b"x"}, "empty or '.' path component"),
        ({f"{TOP}/configs/metadata.json": b"{}", f"{TOP}/CONFIGS/metadata.json": b"{}"}, "duplicate member"),
        ({f"{TOP}/configs/metadata.json": b"{}", "other/LICENSE": b"x"}, "top-level folders"),
        ({f"{TOP}/configs/metadata.json": b"{}", f"{TOP}/models/model.pt": None}, "symbolic link"),
    ],
    ids=["dotdot", "absolute", "empty-component", "case-duplicate", "two-tops", "symlink"],
)
def test_unsafe_archive_structure_is_refused(files, reason, tmp_path: Path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in files.items():
            if data is None:
                info = zipfile.ZipInfo(name)
                info.external_attr = (0o120777) << 16  # a symbolic link to /etc/passwd
                z.writestr(info, "/etc/passwd")
            else:
                z.writestr(name, data)
    report = verify_bundle(archive, allow_unsigned=True)
    assert not report.ok and any(reason in c.detail for c in report.checks if c.check == "archive"), report.table()
    with pytest.raises(BundleRejected):
        import_bundle(archive, tmp_path / "inbox" / "bundle", allow_unsigned=True)
    assert not (tmp_path / "inbox" / "bundle").exists() and not Path("/tmp/abs_x").exists()


# ============================================================================= resource exhaustion


def _refused_quickly(archive: Path, reason: str) -> None:
    """Verify refuses ``archive`` naming ``reason``, in a few seconds and under 64 MiB of Python memory."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        report = verify_bundle(archive, allow_unsigned=True)
        elapsed, (_, peak) = time.perf_counter() - start, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not report.ok and any(reason in c.detail for c in report.checks), report.table()
    assert elapsed < 5 and peak < 64 * 2**20, (elapsed, peak)


def test_an_archive_of_100000_members_is_refused(tmp_path: Path):
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(100_000):
            z.writestr(f"{TOP}/reference/configs/c{i}.json", b"")
    _refused_quickly(archive, "100000 members, more than the 64 allowed")
    # the same central directory behind an end record that claims 10 members
    data = bytearray(archive.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    data[end + 8 : end + 12] = struct.pack("<2H", 10, 10)
    lying = tmp_path / "lying.zip"
    lying.write_bytes(bytes(data))
    _refused_quickly(lying, "more than 64 members need")


def _deflated_zeros(mib: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``mib`` MiB of zeros (one 1 MiB block compressed once, repeated) and its CRC."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(bytes(1 << 20), crc)
    return block * mib + compressor.flush(), crc


def _raw_zip(path: Path, name: str, stream: bytes, crc: int, declared: int) -> Path:
    """One deflated member written byte by byte (zipfile cannot write a stream it did not compress)."""
    encoded = name.encode()
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 33, crc, len(stream), declared, len(encoded), 0)
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 33, crc, len(stream), declared,
                          len(encoded), 0, 0, 0, 0, 0o100644 << 16, 0) + encoded  # fmt: skip
    body = local + encoded + stream
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(body), 0)
    path.write_bytes(body + central + end)
    return path


def test_zip_bombs_are_refused(tmp_path: Path):
    stream, crc = _deflated_zeros(1536)  # 1.5 GiB of zeros in 1.6 MB
    assert len(stream) < 2 * 2**20
    inflated = zlib.decompressobj(-15).decompress(stream[: len(stream) // 128], 32 << 20)
    assert len(inflated) >= 8 << 20 and inflated == bytes(len(inflated))  # it really inflates to zeros
    honest = _raw_zip(tmp_path / "bomb.zip", f"{TOP}/models/model.pt", stream, crc, 1536 << 20)
    with zipfile.ZipFile(honest) as z:  # a well-formed archive
        assert z.getinfo(f"{TOP}/models/model.pt").file_size == 1536 << 20
    _refused_quickly(honest, "1610612736 bytes uncompressed, more than the 1073741824 allowed")
    # the same stream behind a declared size of 1000 bytes: never inflated past the declaration
    lying = _raw_zip(tmp_path / "lying.zip", f"{TOP}/models/model_record.json", stream, crc, 1000)
    _refused_quickly(lying, "unreadable")
    # smaller limits are honoured too
    limits = ArchiveLimits(max_member_bytes=2**20)
    report = verify_bundle(honest, allow_unsigned=True, limits=limits)
    assert any("more than the 1048576 allowed" in c.detail for c in report.checks)


# ==================================================================================== receiving pass


def test_receiving_commands_leave_no_trace(world, site_manifest: Path, tmp_path_factory, monkeypatch):
    """Import, then every receiving command, on the documents bundle and on hand-unzipped folders holding
    every refused payload: no marker, nothing outside each command's output folder, no hang."""
    faulthandler.dump_traceback_later(600, exit=True)  # a hang fails the run instead of stalling it
    try:
        _receiving_pass(world, site_manifest, tmp_path_factory.mktemp("receiving"), monkeypatch)
    finally:
        faulthandler.cancel_dump_traceback_later()


def _receiving_pass(world, site_manifest: Path, root: Path, monkeypatch) -> None:
    markers, base_tmp = world["markers"], world["root"].parent
    work = root / "work"  # the working folder of every command: stays empty
    work.mkdir()
    monkeypatch.chdir(work)
    documents = {name: _json(value, markers) for name, value in DOCUMENTS.items()}
    archive = pack({**world["base"], **documents}, root / "documents.zip", key=world["key"])
    imported = root / "imported"
    # hand-unzipped: every refused payload in place of (or beside) the honest files
    handmade = root / "handmade"
    for name, data in world["base"].items():
        (handmade / name).parent.mkdir(parents=True, exist_ok=True)
        (handmade / name).write_bytes(data)
    for case, (added, _) in world["payloads"].items():
        if case.startswith("onnx-external-data-in-attribute") or case == "pickle-in-weights":
            continue  # one ONNX model per folder (the subgraph one is placed); the pickle gets its own folder
        for name, data in added.items():
            (handmade / name).parent.mkdir(parents=True, exist_ok=True)
            (handmade / name).write_bytes(data)
    pickled = shutil.copytree(handmade, root / "pickled")
    (pickled / "models" / "model.pt").write_bytes(world["payloads"]["pickle-in-weights"][0]["models/model.pt"])
    for folder in (handmade, pickled):
        SECRET.tofile(folder / "secret.bin")
    images = site_manifest.parent / "dicom-images-train"

    def run(argv: list[str], ok: bool, output: Path | None = None) -> None:
        before = tree(base_tmp)
        code = cli_main(argv) if argv[0] != "-m" else subprocess.run([sys.executable, *argv], timeout=300).returncode
        assert (code == 0) == ok, (argv, code)
        written = tree(base_tmp) - before
        allowed = [str(output)] if output else []
        assert all(any(p == a or p.startswith(a + os.sep) for a in allowed) for p in written), (argv, written)
        assert not any(markers.iterdir()), (argv, sorted(p.name for p in markers.iterdir()))
        assert not any(work.iterdir()), (argv, sorted(p.name for p in work.iterdir()))

    trusted = str(world["trusted"])
    run(["bundle", "import", str(archive), "--into", str(imported), "--trusted-keys", trusted], True, imported)
    run(["bundle", "verify", str(imported), "--trusted-keys", trusted, "--diff"], True)
    for folder in (handmade, pickled):
        run(["bundle", "verify", str(folder), "--trusted-keys", trusted], False)
    evaluate = ["bundle", "evaluate", "--manifest", str(site_manifest), "--split", "test"]
    run([*evaluate, "--bundle", str(imported), "--out", str(root / "e1")], True, root / "e1")
    run([*evaluate, "--bundle", str(handmade), "--out", str(root / "e2")], True, root / "e2")  # data only
    run([*evaluate, "--bundle", str(handmade), "--out", str(root / "e3"), "--model", "onnx"], False)
    run([*evaluate, "--bundle", str(handmade), "--out", str(root / "e4"), "--model", "torchscript"], False)
    run([*evaluate, "--bundle", str(pickled), "--out", str(root / "e5")], False)
    infer = ["infer", str(images), "--formats", "png", "--device", "cpu", "--workers", "0", "--no-progress"]
    for model in ("model.ts", "model.onnx"):
        run([infer[0], infer[1], str(root / f"i_{model}"), *infer[2:], "--bundle", str(handmade),
             "--model", str(handmade / "models" / model)], False, root / f"i_{model}")  # fmt: skip
    if RECORD_BASED_INFER:
        for name, folder, ok in (("i1", imported, True), ("i2", handmade, True), ("i3", pickled, False)):
            run([infer[0], infer[1], str(root / name), *infer[2:], "--bundle", str(folder)], ok, root / name)
    derived = root / "derived"
    run(["bundle", "derive", "--from", str(handmade), "--into", str(root / "d0")], False)
    run(["bundle", "derive", "--from", str(imported), "--into", str(derived), "--note", "site B"], True, derived)
    configs = [str(derived / "configs" / c) for c in ("train.json", "finetune.json")]
    training = ["--num_epochs", "1", "--batch_size", "2", "--val_batch_size", "2", "--num_workers", "0"]
    run(["-m", "monai.bundle", "run", "training", "--meta_file", str(derived / "configs" / "metadata.json"),
         "--config_file", str(configs), "--bundle_root", str(derived), "--datalist", str(site_manifest),
         *training], True, derived)  # fmt: skip
    assert (derived / "models" / "model.pt").is_file()  # the one-epoch fine-tune ran and saved its model
    written = derived / "models" / "model_record.json"  # by the installed train.json, where it writes one
    if written.is_file():
        parent = ModelRecord.read(derived / "models" / "parent_record.json")
        record = ModelRecord.read(written)
        assert (record.network, record.preprocessing) == (parent.network, parent.preprocessing)
    assert verify_bundle(imported, trusted_keys=trusted).ok  # the imported bundle is unchanged
