"""Sharing bundles: export -> verify -> import -> same outputs; tampering and hostile configs fail verify
without anything being run; unsafe archives are refused; site evaluation and derive for fine-tuning.

One tiny bundle (the real configs, decoder [32,16,16,8,8], 64 px, random weights) is exported once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_siim_manifest

from pneumoseg.cli import main as cli_main
from pneumoseg.networks import SCSEUNet, SCSEUNetOutput
from pneumoseg.sharing.export import REMOVED_PATH, BundleRejected, export_bundle, import_bundle
from pneumoseg.sharing.model import ExportedModel
from pneumoseg.sharing.verify import (
    CHECKSUM_FILE,
    check_expression,
    check_logging_conf,
    checksum_manifest,
    verify_bundle,
)

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "pneumothorax_scse_unet"
DECODER = [32, 16, 16, 8, 8]
SECRET = "/data/hospital_a/secret_manifest.json"

pytestmark = pytest.mark.slow


def _tiny_bundle(dest: Path, weights: bool = True) -> Path:
    shutil.copytree(BUNDLE, dest, ignore=shutil.ignore_patterns("*.pt", "eval", "predictions", ".gitkeep"))
    for name in ("train.json", "inference.json"):
        path = dest / "configs" / name
        config = json.loads(path.read_text())
        config["network_def"]["decoder_channels"] = DECODER
        config["image_size"] = 64
        path.write_text(json.dumps(config, indent=4))
    if weights:
        torch.manual_seed(0)
        torch.save(SCSEUNet(decoder_channels=DECODER).state_dict(), dest / "models" / "model.pt")
    return dest


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained-looking bundle with things that must not leave the hospital next to it."""
    root = _tiny_bundle(tmp_path_factory.mktemp("sender") / "pneumothorax_scse_unet")
    (root / "eval").mkdir()
    metrics = {"checkpoint": "/data/hospital_a/models/model.pt", "manifest": SECRET, "split": "validation",
               "val_siim_dice": 0.8125, "val_auc": 0.9375, "val_sensitivity": 0.75}  # fmt: skip
    (root / "eval" / "metrics.json").write_text(json.dumps(metrics))
    (root / "eval" / "metrics_history.jsonl").write_text(json.dumps({"image": "patient_1.dcm"}) + "\n")
    (root / "manifest.json").write_text(json.dumps({"training": [{"image": "p1.dcm", "patient_hash": "abc"}]}))
    (root / "models" / "checkpoint_last.pt").write_bytes(b"optimizer state")
    pp = json.loads((root / "configs" / "postprocessing.json").read_text())
    (root / "configs" / "postprocessing.json").write_text(json.dumps({**pp, "t_cls": 0.25, "min_area": 10}))
    return root


@pytest.fixture(scope="module")
def exported(source: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("outbox") / "bundle.zip"
    return out, export_bundle(source, out)


@pytest.fixture(scope="module")
def received(exported, tmp_path_factory: pytest.TempPathFactory) -> Path:
    into = tmp_path_factory.mktemp("receiver") / "received"
    report = import_bundle(exported[0], into)
    assert report.ok
    return into


# ----------------------------------------------------------------------------------------------- export
def test_export_contains_only_the_include_list_and_no_patient_paths(exported, source: Path):
    out, summary = exported
    with zipfile.ZipFile(out) as archive:
        names = {n.split("/", 1)[1] for n in archive.namelist()}
        blob = b"".join(archive.read(n) for n in archive.namelist() if not n.endswith((".pt", ".ts", ".onnx")))
    configs = {p.relative_to(source).as_posix() for p in (source / "configs").glob("*.json")}
    assert names == configs | {"configs/logging.conf", "docs/README.md", "LICENSE", "models/model.pt",
                               "models/model.ts", "models/model.onnx", CHECKSUM_FILE}  # fmt: skip
    assert b"hospital_a" not in blob and b"patient_1" not in blob and b"patient_hash" not in blob
    inference = json.loads(zipfile.ZipFile(out).read("pneumothorax_scse_unet/configs/inference.json"))
    assert inference["input_dir"] == REMOVED_PATH
    assert any("input_dir" in r for r in summary.removed_paths)
    assert any("dataset_dir" in r for r in summary.removed_paths)
    assert max(summary.max_prob_diff.values()) <= 1e-3


def test_export_model_card_has_metrics_thresholds_and_changelog(exported):
    out, _ = exported
    with zipfile.ZipFile(out) as archive:
        card = archive.read("pneumothorax_scse_unet/docs/README.md").decode()
        meta = json.loads(archive.read("pneumothorax_scse_unet/configs/metadata.json"))
    assert f"## Release {meta['version']}" in card
    assert "| val_siim_dice | 0.8125 |" in card and "| val_auc | 0.9375 |" in card
    assert "post-processing `t_cls`: 0.25" in card and "post-processing `min_area`: 10" in card
    assert "`operating_threshold` (image probability, sensitivity / specificity): 0.5" in card
    assert meta["changelog"][meta["version"]] in card
    assert meta["eval_metrics"]["val_siim_dice"] == 0.8125


def test_export_refuses_a_datalist_among_configs(tmp_path: Path):
    root = _tiny_bundle(tmp_path / "b")
    (root / "configs" / "extra.json").write_text(json.dumps({"validation": [{"image": "a.dcm", "label": "a.png"}]}))
    with pytest.raises(ValueError, match="extra.json"):
        export_bundle(root, tmp_path / "out.zip")
    assert not (tmp_path / "out.zip").exists()


# ------------------------------------------------------------------------------- verify, import, outputs
def test_exported_zip_verifies(exported):
    report = verify_bundle(exported[0])
    assert report.ok, report.table()
    passed = {c.check for c in report.checks if c.status == "PASS"}
    assert {"archive", "checksums", "metadata", "code", "logging", "weights", "torchscript", "onnx", "shapes"} <= passed
    assert any(row[3] == "$@network_def.to(@device)" and row[4] == "ok" for row in report.listing)


def test_received_bundle_outputs_equal_the_source_checkpoint(received: Path, source: Path):
    network = SCSEUNet(decoder_channels=DECODER)
    network.load_state_dict(torch.load(source / "models" / "model.pt", weights_only=True))
    network.eval()
    ts = ExportedModel.load(received / "models" / "model.ts")
    ort = ExportedModel.load(received / "models" / "model.onnx")
    generator = torch.Generator().manual_seed(1)
    for shape in [(3, 1, 128, 64), (2, 1, 70, 90)]:  # the second is padded inside the model
        x = torch.rand(*shape, generator=generator)
        with torch.no_grad():
            ref = network(x)
            for model, tolerance in ((ts, 1e-4), (ort, 1e-3)):
                out = model(x)
                assert isinstance(out, SCSEUNetOutput)
                assert out.seg.shape == ref.seg.shape and out.cls.shape == ref.cls.shape == (shape[0], 1)
                diff = max(float((torch.sigmoid(out.seg) - torch.sigmoid(ref.seg)).abs().max()),
                           float((torch.sigmoid(out.cls) - torch.sigmoid(ref.cls)).abs().max()))  # fmt: skip
                assert diff <= tolerance, (model.kind, shape, diff)


def test_import_refuses_an_existing_bundle_without_overwrite(exported, tmp_path: Path):
    into = tmp_path / "bundle"
    into.mkdir()
    (into / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        import_bundle(exported[0], into)
    with pytest.raises(FileExistsError, match="not a bundle"):
        import_bundle(exported[0], into, overwrite=True)  # never deletes a folder that is not a bundle
    assert (into / "notes.txt").read_text() == "mine"
    (into / "configs").mkdir()
    (into / "configs" / "metadata.json").write_text("{}")
    assert cli_main(["bundle", "import", str(exported[0]), "--into", str(into)]) == 1
    assert cli_main(["bundle", "import", str(exported[0]), "--into", str(into), "--overwrite"]) == 0
    assert not (into / "notes.txt").exists() and verify_bundle(into).ok


def test_one_changed_byte_in_the_weights_fails_verify(received: Path, tmp_path: Path):
    copy = shutil.copytree(received, tmp_path / "tampered")
    weights = copy / "models" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    report = verify_bundle(copy)
    failed = [c for c in report.checks if c.status == "FAIL"]
    assert [c.detail for c in failed] == ["models/model.pt: SHA-256 differs from checksums.sha256"]
    assert cli_main(["bundle", "verify", str(copy)]) == 1


# ------------------------------------------------------------------------------------- hostile configs
def _config_bundle(dest: Path, extra: dict) -> Path:
    """Configs only (no weights) plus a fresh checksum manifest, so that only the code checks can fail."""
    root = _tiny_bundle(dest, weights=False)
    (root / "configs" / "site.json").write_text(json.dumps(extra, indent=4))
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    (root / CHECKSUM_FILE).write_text(checksum_manifest(files))
    return root


HOSTILE = {
    "__import__": {"hook": "$__import__('os').system('touch {marker}')"},
    "target-os.system": {"hook": {"_target_": "os.system", "command": "touch {marker}"}},
    "eval-in-list": {"steps": ["$print('ok')", ["$eval(\"__import__('os').system('touch {marker}')\")"]]},
    "torch.load": {"hook": "$torch.load('{marker}')"},
    "module-attribute": {"hook": "$pneumoseg.networks.os.system('touch {marker}')"},
    "import": {"imports": ["$import subprocess"], "hook": "$subprocess.run(['touch', '{marker}'])"},
}


def _hostile(extra: dict, marker: Path) -> dict:
    return json.loads(json.dumps(extra).replace("{marker}", str(marker)))


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_config_fails_verify(name: str, tmp_path: Path):
    marker = tmp_path / "marker"
    root = _config_bundle(tmp_path / "b", _hostile(HOSTILE[name], marker))
    report = verify_bundle(root)
    failed = [c for c in report.checks if c.status == "FAIL"]
    assert failed and {c.subject for c in failed} == {"configs/site.json"}, report.table()
    assert not marker.exists()


def test_hostile_configs_are_never_run_by_the_cli(tmp_path: Path):
    """`pneumoseg bundle verify` in a fresh process: exit code 1; with --trust the findings are only downgraded
    to SKIP, and still nothing runs."""
    marker = tmp_path / "marker"
    hooks = {f"{name}_{key}": value for name, extra in HOSTILE.items() for key, value in extra.items()}
    root = _config_bundle(tmp_path / "b", _hostile(hooks, marker))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "pneumoseg", "bundle", "verify", str(root), "--list"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "configs/site.json" in result.stdout and "RESULT: FAIL" in result.stdout
    assert "name '__import__' is not allowed" in result.stdout  # the listing names every finding
    trusted = verify_bundle(root, trust=True)
    assert trusted.ok and [c.subject for c in trusted.checks if c.status == "SKIP"] == ["configs/site.json"]
    assert not marker.exists()


def test_python_files_in_a_bundle_fail_verify(tmp_path: Path):
    """A module next to the configs would shadow the real package when MONAI runs from the bundle folder."""
    root = _config_bundle(tmp_path / "b", {"x": 1})
    (root / "pneumoseg.py").write_text("import os; os.system('touch marker')\n")
    (root / "models" / "helper.py").write_text("")
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    (root / CHECKSUM_FILE).write_text(checksum_manifest(files))
    failed = [c.detail for c in verify_bundle(root).checks if c.status == "FAIL"]
    assert failed == [
        "models/helper.py: unexpected file type in models/",
        "pneumoseg.py: not part of the bundle layout (configs/, models/, docs/, LICENSE)",
    ]


@pytest.mark.parametrize(
    "expression",
    ["@network_def.to(@device)", "torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
     "os.environ['LOCAL_RANK']", "monai.handlers.stopping_fn_from_metric('val_siim_dice')", "not @resume",
     "[i * 2 for i in range(3)]", "torch.load(@path, weights_only=True)", "import torch.distributed as dist",
     "$from monai.handlers import from_engine"[1:]],
)  # fmt: skip
def test_allowed_expressions(expression: str):
    assert check_expression(expression, {"os": "os"}) == []


@pytest.mark.parametrize(
    "expression",
    ["open('/etc/passwd').read()", "getattr(torch, 'load')('x')", "@net.__class__.__subclasses__()",
     "(lambda: 0).__globals__", "'{0.__class__}'.format(@x)", "'{0.gi_frame}'.format(@x)", "os.system('x')",
     "os.environ.update(A='1')", "np.load(@f, allow_pickle=True)", "monai.bundle.download('x')",
     "monai.utils.optional_import('os')", "torch.hub.load('a', 'b')", "pneumoseg.workflows.Path('x')",
     "import os; os.system('x')", "exec('1')", "(lambda t: t.load('x'))(torch)", "[m.hub for m in [torch]]",
     "(lambda f: f('x'))(torch.load)", "monai.data.NumpyReader(allow_pickle=True)", "pneumoseg.demo.run(@args)",
     "monai.data.PersistentDataset(@d, @t, 'cache', weights_only=False)", "pneumoseg.cli.main(['demo'])",
     "compile('1', 'x', 'exec')", "type(@x)", "torch._C"],
)  # fmt: skip
def test_blocked_expressions(expression: str):
    assert check_expression(expression, {"os": "os"})


def test_logging_conf_screening():
    assert check_logging_conf((BUNDLE / "configs" / "logging.conf").read_text()) == []
    base = (BUNDLE / "configs" / "logging.conf").read_text()
    for bad in ("class=handlers.SocketHandler", "args=(__import__('os').system('x'),)",
                "args=('/var/log/x.log', 'a')", "class=mypackage.Handler"):  # fmt: skip
        key = bad.split("=")[0]
        text = "\n".join(bad if line.startswith(key + "=") else line for line in base.splitlines())
        assert check_logging_conf(text), bad


# ---------------------------------------------------------------------------------------------- archives
def _zip(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize(
    "members,symlink,problem",
    [
        ({"b/configs/metadata.json": b"{}", "b/../x": b"x"}, None, "'..' in member path"),
        ({"b/configs/metadata.json": b"{}", "/tmp/abs_x": b"x"}, None, "absolute member path"),
        ({"b/configs/metadata.json": b"{}"}, "b/models/model.pt", "symbolic link"),
        ({"b/configs/metadata.json": b"{}", "b//x": b"x"}, None, "empty or '.' path component"),
        ({"b/configs/metadata.json": b"{}", "b/configs/METADATA.json": b"{}"}, None, "duplicate member"),
    ],
    ids=["dotdot", "absolute", "symlink", "empty-component", "case-duplicate"],
)
def test_unsafe_archive_is_rejected_and_nothing_is_written(members, symlink, problem, tmp_path: Path):
    archive = _zip(tmp_path / "evil.zip", members, symlink)
    report = verify_bundle(archive)
    assert not report.ok and any(problem in c.detail for c in report.checks if c.check == "archive")
    into = tmp_path / "inbox" / "bundle"
    with pytest.raises(BundleRejected):
        import_bundle(archive, into)
    assert not into.exists() and not (tmp_path / "inbox" / "x").exists() and not Path("/tmp/abs_x").exists()


# ------------------------------------------------------------------------------------ evaluate / derive
@pytest.fixture(scope="module")
def site_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_siim_manifest(
        tmp_path_factory.mktemp("site"), 10, seed=5, val_fraction=0.0, test_fraction=0.6, salt="site"
    )


@pytest.mark.parametrize("model", ["torchscript", "onnx"])
def test_bundle_evaluate_writes_report_and_calibration_plot(received: Path, site_manifest: Path, tmp_path: Path,
                                                            model: str):  # fmt: skip
    # onnx: the default report folder, next to the bundle (the received bundle stays as verified)
    out = tmp_path / "report" if model == "torchscript" else received.parent / f"{received.name}_site_validation"
    where = ["--out", str(out)] if model == "torchscript" else []
    code = cli_main(["bundle", "evaluate", "--bundle", str(received), "--manifest", str(site_manifest),
                     "--split", "test", "--model", model, *where])  # fmt: skip
    assert code == 0
    report = json.loads((out / "site_validation.json").read_text())
    n = len(json.loads(site_manifest.read_text())["test"])
    assert report["data"]["images"] == n and report["bundle"]["model"].startswith("model.")
    assert sum(b["count"] for b in report["calibration"]["bins"]) == n
    assert 0.0 <= report["siim_dice"] <= 1.0
    sender = report["at_sender_threshold"]
    assert sender["threshold"] == 0.5 and sender["tp"] + sender["fp"] + sender["tn"] + sender["fn"] == n
    assert report["sender_reported"]["val_siim_dice"] == 0.8125
    assert "| SIIM Dice |" in (out / "site_validation.md").read_text()
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_youden_threshold_and_rates():
    from pneumoseg.sharing.evaluate import calibration_bins, rates_at, youden_threshold

    prob = np.array([0.1, 0.2, 0.35, 0.4, 0.8, 0.9])
    truth = np.array([False, False, False, True, True, True])
    t = youden_threshold(prob, truth)
    assert t == 0.4
    assert rates_at(prob, truth, t)["sensitivity"] == rates_at(prob, truth, t)["specificity"] == 1.0
    assert rates_at(prob, truth, 0.5)["sensitivity"] == pytest.approx(2 / 3)
    assert youden_threshold(prob, np.ones(6, bool)) is None
    rows, ece = calibration_bins(np.array([0.05, 0.95]), np.array([False, True]))
    assert ece == pytest.approx(0.05) and [r["count"] for r in rows if r["count"]] == [1, 1]


def test_derive_bumps_version_and_finetune_starts_from_received_weights(received: Path, tmp_path: Path):
    from types import SimpleNamespace

    from monai.bundle import ConfigParser

    derived = tmp_path / "derived"
    assert cli_main(["bundle", "derive", "--from", str(received), "--into", str(derived), "--note", "site B"]) == 0
    meta = json.loads((derived / "configs" / "metadata.json").read_text())
    parent = json.loads((received / "configs" / "metadata.json").read_text())
    assert meta["version"] == "0.1.1" and parent["version"] == "0.1.0"
    assert meta["changelog"]["0.1.1"].startswith("site B; derived from Pneumothorax scSE U-Net 0.1.0")
    assert meta["derived_from"]["version"] == "0.1.0" and set(parent["changelog"]) < set(meta["changelog"])
    report = verify_bundle(derived)
    assert all(c.status == "PASS" for c in report.checks if c.check in ("code", "metadata", "weights")), report.table()
    # the fine-tuning overlay loads the parent weights into train.json's network (weights_only CheckpointLoader)
    parser = ConfigParser()
    parser.read_config([str(derived / "configs" / "train.json"), str(derived / "configs" / "finetune.json")])
    parser.update({"bundle_root": str(derived), "device": "$torch.device('cpu')"})
    assert parser["initialize"][-1] == "$@parent_weights(@train#trainer)"
    loader = parser.get_parsed_content("parent_weights")
    engine = SimpleNamespace(state=SimpleNamespace(max_epochs=None, epoch=0), logger=__import__("logging").getLogger())
    loader(engine)
    network = parser.get_parsed_content("network")
    parent_state = torch.load(received / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(v, parent_state[k]) for k, v in network.state_dict().items())
    assert cli_main(["bundle", "derive", "--from", str(received), "--into", str(derived)]) == 1  # exists


def test_cli_help_explains_every_action():
    for action in ("export", "verify", "import", "evaluate", "derive"):
        result = subprocess.run([sys.executable, "-m", "pneumoseg", "bundle", action, "--help"], capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0 and "usage: pneumoseg bundle " + action in result.stdout


def test_batch_inference_runner_runs_the_exported_models(received: Path, site_manifest: Path, tmp_path: Path):
    """The received TorchScript / ONNX models through ``pneumoseg infer``'s runner (``network=``) give the
    source checkpoint's probabilities (fp32: no bf16 autocast on either side)."""
    from pneumoseg.inference import BatchInferenceRunner

    network = SCSEUNet(decoder_channels=DECODER)
    network.load_state_dict(torch.load(received / "models" / "model.pt", weights_only=True))
    images = site_manifest.parent / "dicom-images-train"
    probabilities = {}
    for name, model in (("checkpoint", network), ("model.ts", ExportedModel.load(received / "models/model.ts")),
                        ("model.onnx", ExportedModel.load(received / "models/model.onnx"))):  # fmt: skip
        out = tmp_path / name
        runner = BatchInferenceRunner(str(received), str(images), str(out), formats="png", device="cpu", batch_size=4,
                                      workers=0, fp32=True, progress=False, network=model)  # fmt: skip
        assert runner.run() == 0
        rows = json.loads((out / "report.json").read_text())["rows"]
        probabilities[name] = {r["scan_id"]: float(r["probability"]) for r in rows}
    reference = probabilities.pop("checkpoint")
    assert len(reference) == 10
    for name, tolerance in (("model.ts", 1e-4), ("model.onnx", 1e-3)):
        assert probabilities[name].keys() == reference.keys()
        assert max(abs(probabilities[name][k] - reference[k]) for k in reference) <= tolerance, name
    # the same through the command line: `pneumoseg infer ... --model models/model.onnx`
    from pneumoseg.cli import main

    out = tmp_path / "cli"
    argv = ["infer", str(images), str(out), "--bundle", str(received), "--model", str(received / "models/model.onnx"),
            "--formats", "png", "--device", "cpu", "--workers", "0", "--fp32", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert {r["scan_id"]: float(r["probability"]) for r in rows} == pytest.approx(probabilities["model.onnx"], abs=1e-6)


def test_zip_members_without_file_type_bits_are_regular_files(tmp_path: Path):
    """Python's ``writestr`` and many zip tools store permissions only; that is not a special file."""
    from pneumoseg.sharing.verify import check_archive

    archive = _zip(tmp_path / "plain.zip", {"b/configs/metadata.json": b"{}", "b/docs/README.md": b"# x"})
    problems, bundle = check_archive(archive)
    assert problems == [] and sorted(bundle.files) == ["configs/metadata.json", "docs/README.md"]


class _Payload:
    """Pickles as a call of ``os.system``: what a hostile "checkpoint" looks like."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_weights_with_code_in_the_pickle_fail_and_never_run(tmp_path: Path):
    from pneumoseg.sharing.verify import check_weights

    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    torch.save({"conv.weight": torch.zeros(1), "x": _Payload(f"touch {marker}")}, path)
    problems, state = check_weights("models/model.pt", path.read_bytes())
    assert state is None and any("system" in p for p in problems), problems
    assert not marker.exists()


def test_pickle_and_full_load_arguments_in_configs_fail(tmp_path: Path):
    root = _config_bundle(tmp_path / "b", {"reader": {"_target_": "NumpyReader", "allow_pickle": True},
                                           "cache": {"_target_": "PersistentDataset", "data": [], "transform": None,
                                                     "cache_dir": "cache", "weights_only": False}})  # fmt: skip
    failed = [c.detail for c in verify_bundle(root).checks if c.status == "FAIL"]
    assert len(failed) == 2 and "allow_pickle" in failed[0] and "weights_only" in failed[1], failed


def test_trust_loads_and_runs_torchscript(received: Path):
    report = verify_bundle(received, trust=True)
    row = next(c for c in report.checks if c.check == "torchscript")
    assert report.ok and row.status == "PASS" and row.detail.startswith("--trust: loaded")


def test_missing_onnx_gives_a_clear_message(received: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for module in ("onnx", "onnxruntime"):
        monkeypatch.setitem(sys.modules, module, None)  # `import onnx` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'pneumoseg\[onnx\]' \(or export TorchScript only"):
        export_bundle(received, tmp_path / "out.zip")
    with pytest.raises(ImportError, match=r"pneumoseg\[onnx\]"):
        ExportedModel.load(received / "models" / "model.onnx")
    report = verify_bundle(received)
    row = next(c for c in report.checks if c.check == "onnx")
    assert report.ok and row.status == "SKIP" and "pneumoseg[onnx]" in row.detail
