"""Sharing bundles as data: export -> sign -> verify -> import -> the same outputs as the source checkpoint;
signatures that say why they fail; read-only imports; site evaluation and derive from the record.

One tiny bundle (decoder [16,8,8,4,4], 64 px, random weights) is exported once per module. The attack
suite is in test_sharing_attacks.py.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_siim_manifest
from sharing_support import (
    RECORD_BASED_INFER,
    SECRET,
    SIZE,
    members,
    pack,
    sender_bundle,
    source_network,
)

from pneumoseg.cli import main as cli_main
from pneumoseg.model_record import ModelRecord, load_state_dict, load_trained_model
from pneumoseg.networks import SCSEUNetOutput
from pneumoseg.sharing.archive import CHECKSUM_FILE, SIGNATURE_FILE
from pneumoseg.sharing.export import REMOVED_PATH, export_bundle
from pneumoseg.sharing.model import ExportedModel
from pneumoseg.sharing.receive import BundleRejected, import_bundle
from pneumoseg.sharing.signing import generate_key
from pneumoseg.sharing.templates import installed_configs
from pneumoseg.sharing.verify import verify_bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sender's key (pinned by the receiver as hospital_a.pub) and a key nobody pinned."""
    root = tmp_path_factory.mktemp("keys")
    sender, sender_pub, _ = generate_key(root / "sender" / "signing_key")
    intruder, _, _ = generate_key(root / "intruder" / "signing_key")
    trusted = root / "trusted"
    trusted.mkdir()
    shutil.copyfile(sender_pub, trusted / "hospital_a.pub")
    return {"sender": sender, "intruder": intruder, "trusted": trusted}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sender_bundle(tmp_path_factory.mktemp("sender") / "pneumothorax_scse_unet")


@pytest.fixture(scope="module")
def exported(source: Path, keys, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("outbox") / "bundle.zip"
    return out, export_bundle(source, out, sign=keys["sender"])


@pytest.fixture(scope="module")
def received(exported, keys, tmp_path_factory: pytest.TempPathFactory) -> Path:
    into = tmp_path_factory.mktemp("receiver") / "received"
    assert import_bundle(exported[0], into, trusted_keys=keys["trusted"]).ok
    return into


@pytest.fixture(scope="module")
def site_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_siim_manifest(
        tmp_path_factory.mktemp("site"), 8, seed=5, val_fraction=0.0, test_fraction=0.75, salt="site"
    )


# ----------------------------------------------------------------------------------------------- export
def test_export_holds_data_only_and_no_patient_paths(exported, source: Path):
    out, summary = exported
    files = members(out)
    configs = {f"reference/configs/{p.name}" for p in (source / "configs").glob("*.json")} - {
        "reference/configs/metadata.json", "reference/configs/meta_schema.json"}  # fmt: skip
    assert set(files) == configs | {
        "configs/metadata.json", "models/model.pt", "models/model_record.json", "models/model.onnx",
        "docs/README.md", "LICENSE", CHECKSUM_FILE, SIGNATURE_FILE}  # fmt: skip
    text = b"".join(d for n, d in files.items() if not n.startswith("models/model."))
    assert SECRET.encode() not in text and b"hospital_a" not in text
    assert b"patient_1" not in text and b"patient_hash" not in text
    assert json.loads(files["reference/configs/inference.json"])["input_dir"] == REMOVED_PATH
    assert any("dataset_dir" in r for r in summary.removed_paths)
    # the weights travel as a plain state dict (the sender's {"model": sd} unwrapped), equal to the source
    state = torch.load(__import__("io").BytesIO(files["models/model.pt"]), weights_only=True)
    original = torch.load(source / "models" / "model.pt", weights_only=True)["model"]
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    assert ModelRecord.from_dict(json.loads(files["models/model_record.json"])) == ModelRecord.read(
        source / "models" / "model_record.json"
    )
    assert summary.onnx_max_prob_diff is not None and summary.onnx_max_prob_diff <= 1e-3


def test_export_model_card_has_metrics_thresholds_and_changelog(exported):
    files = members(exported[0])
    card, meta = files["docs/README.md"].decode(), json.loads(files["configs/metadata.json"])
    assert f"## Release {meta['version']}" in card and meta["changelog"][meta["version"]] in card
    assert "| val_siim_dice | 0.8125 |" in card and "| val_auc | 0.9375 |" in card
    assert "operating threshold (image probability; sensitivity / specificity are reported at it): 0.4" in card
    assert "post-processing (validation search): `t_cls` 0.35, `top` 0.6, `min_area` 5, `bottom` 0.45" in card
    assert "radiograph: 64 x 64 px, intensity percentiles 1.0 / 99.0" in card
    assert meta["eval_metrics"]["val_siim_dice"] == 0.8125


def test_export_refuses_what_must_not_be_sent(source: Path, tmp_path: Path):
    bundle = shutil.copytree(source, tmp_path / "b")
    (bundle / "models" / "model_record.json").unlink()
    with pytest.raises(FileNotFoundError, match="no model record.*Training writes it beside the weights"):
        export_bundle(bundle, tmp_path / "out.zip", onnx=False)
    ModelRecord.read(source / "models" / "model_record.json").write(bundle / "models" / "model_record.json")
    (bundle / "configs" / "extra.json").write_text(json.dumps({"validation": [{"image": "a.dcm", "label": "a.png"}]}))
    with pytest.raises(ValueError, match="extra.json: holds image/label rows"):
        export_bundle(bundle, tmp_path / "out.zip", onnx=False)
    (bundle / "configs" / "extra.json").unlink()
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    (bundle / "configs" / "metadata.json").write_text(json.dumps({**meta, "description": "$print(1)"}))
    with pytest.raises(ValueError, match="description: text starting with '\\$' is an expression"):
        export_bundle(bundle, tmp_path / "out.zip", onnx=False)
    assert not (tmp_path / "out.zip").exists() and not (tmp_path / "out.zip.partial").exists()


# ---------------------------------------------------------------------------------- verify, signatures
def test_signed_bundle_verifies_and_names_the_signer(exported, keys, capsys):
    report = verify_bundle(exported[0], trusted_keys=keys["trusted"])
    assert report.ok, report.table()
    assert report.signer.startswith("hospital_a (ed25519 sha256:")
    passed = {c.check for c in report.checks if c.status == "PASS"}
    assert passed == {"archive", "checksums", "signature", "record", "weights", "onnx", "metadata", "text"}
    notes = {c.subject: c.detail for c in report.checks if c.status == "NOTE"}
    assert set(notes) == {n for n in members(exported[0]) if n.startswith("reference/")}
    # the sender's inference.json differs from the installed one: the value it added, the path export removed
    differences = report.differences["reference/configs/inference.json"]
    assert 'sender_note: (absent) -> "tuned at hospital A"' in differences
    assert any(d.startswith("input_dir: ") and d.endswith(f'-> "{REMOVED_PATH}"') for d in differences)
    assert (
        f"{len(differences)} values differ from the installed configs/inference.json"
        in notes["reference/configs/inference.json"]
    )
    assert cli_main(["bundle", "verify", str(exported[0]), "--trusted-keys", str(keys["trusted"]), "--diff"]) == 0
    out = capsys.readouterr().out
    assert "signer: hospital_a (ed25519 sha256:" in out and "RESULT: PASS" in out and "sender_note: (absent)" in out


def _signature_row(report) -> str:
    return next(c.detail for c in report.checks if c.check == "signature" and c.status in ("FAIL", "NOTE"))


def test_signature_failures_each_say_which(exported, keys, tmp_path: Path):
    files = members(exported[0])
    trusted = keys["trusted"]
    # a file changed and its line in the manifest updated: the checksums agree, the signature does not
    tampered = {**files, "docs/README.md": files["docs/README.md"] + b"\nAlso great on CT.\n"}
    manifest = files[CHECKSUM_FILE].decode().splitlines()
    from hashlib import sha256

    readme_hash = sha256(tampered["docs/README.md"]).hexdigest()
    new_manifest = "".join(f"{readme_hash}  docs/README.md\n" if line.endswith("  docs/README.md") else line + "\n"
                           for line in manifest).encode()  # fmt: skip
    tampered[CHECKSUM_FILE] = new_manifest
    report = verify_bundle(pack(tampered, tmp_path / "tampered.zip", manifest=False), trusted_keys=trusted)
    assert not report.ok and report.signer is None
    assert "does not match checksums.sha256 (the manifest or the signature was changed" in _signature_row(report)
    assert report.stopped and not any(c.check == "weights" for c in report.checks)  # nothing read further
    # signed by a key the receiver never pinned
    report = verify_bundle(pack(files, tmp_path / "intruder.zip", key=keys["intruder"]), trusted_keys=trusted)
    assert not report.ok and "signed by an unknown key (ed25519 sha256:" in _signature_row(report)
    assert f"not among the trusted keys in {trusted}" in _signature_row(report)
    # unsigned: refused unless --allow-unsigned, which turns it into a NOTE
    unsigned = pack(files, tmp_path / "unsigned.zip")
    report = verify_bundle(unsigned, trusted_keys=trusted)
    assert not report.ok and _signature_row(report).startswith("unsigned bundle (no checksums.sha256.sig)")
    assert "--allow-unsigned" in _signature_row(report)
    report = verify_bundle(unsigned, trusted_keys=trusted, allow_unsigned=True)
    assert report.ok and "accepted because of --allow-unsigned" in _signature_row(report)
    # a changed file without a changed manifest: the checksums say which
    changed = pack({**files, "docs/README.md": tampered["docs/README.md"]}, tmp_path / "changed.zip", manifest=False)
    report = verify_bundle(changed, trusted_keys=trusted, allow_unsigned=True)
    assert [c.detail for c in report.checks if c.status == "FAIL"] == [
        "docs/README.md: SHA-256 differs from checksums.sha256"
    ]
    # allow-unsigned never accepts a signature that does not match a pinned key
    report = verify_bundle(tmp_path / "tampered.zip", trusted_keys=trusted, allow_unsigned=True)
    assert not report.ok and "does not match" in _signature_row(report)
    # the command line: exit code 1 and the reason on the table
    assert cli_main(["bundle", "verify", str(unsigned), "--trusted-keys", str(trusted)]) == 1
    into = ["--into", str(tmp_path / "in"), "--trusted-keys", str(trusted)]
    assert cli_main(["bundle", "import", str(unsigned), *into]) == 1
    assert not (tmp_path / "in").exists()


def test_changed_byte_in_an_imported_folder_fails_verify(received: Path, keys, tmp_path: Path):
    copy = shutil.copytree(received, tmp_path / "tampered")
    weights = copy / "models" / "model.pt"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    report = verify_bundle(copy, trusted_keys=keys["trusted"])
    assert [c.detail for c in report.checks if c.status == "FAIL"] == [
        "models/model.pt: SHA-256 differs from checksums.sha256"
    ]


# --------------------------------------------------------------------------------------------- import
def test_import_is_read_only_and_replaces_only_bundles(received: Path, exported, keys, tmp_path: Path):
    for path in [received, *received.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o555 if path.is_dir() else 0o444), path
    assert (received / "reference" / "configs" / "train.json").is_file()  # documents, kept read-only
    into = tmp_path / "bundle"
    into.mkdir()
    (into / "notes.txt").write_text("mine")
    archive, trusted = str(exported[0]), str(keys["trusted"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        import_bundle(archive, into, trusted_keys=trusted)
    with pytest.raises(FileExistsError, match="not a bundle"):
        import_bundle(archive, into, overwrite=True, trusted_keys=trusted)  # never deletes what is not a bundle
    assert (into / "notes.txt").read_text() == "mine"
    shutil.rmtree(into)
    assert cli_main(["bundle", "import", archive, "--into", str(into), "--trusted-keys", trusted]) == 0
    assert cli_main(["bundle", "import", archive, "--into", str(into), "--trusted-keys", trusted]) == 1
    assert cli_main(["bundle", "import", archive, "--into", str(into), "--trusted-keys", trusted, "--overwrite"]) == 0
    assert verify_bundle(into, trusted_keys=trusted).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging or replaced folder left


def test_rejected_archive_leaves_nothing(tmp_path: Path, exported, keys):
    files = members(exported[0])
    broken = pack({**files, "models/model.ts": b"PK"}, tmp_path / "inbox" / "broken.zip", key=keys["sender"])
    with pytest.raises(BundleRejected) as rejected:
        import_bundle(broken, tmp_path / "inbox" / "bundle", trusted_keys=keys["trusted"])
    assert "models/model.ts: not accepted: TorchScript is code" in rejected.value.report.table()
    assert sorted(p.name for p in (tmp_path / "inbox").iterdir()) == ["broken.zip"]


# -------------------------------------------------------------------------------------------- outputs
def test_received_model_computes_what_the_source_checkpoint_computes(received: Path, source: Path):
    network = source_network(source)
    trained = load_trained_model(received)
    onnx = ExportedModel.load(received / "models" / "model.onnx")
    generator = torch.Generator().manual_seed(1)
    for shape in [(3, 1, 128, 64), (2, 1, 70, 90)]:  # the second is padded inside the model
        x = torch.rand(*shape, generator=generator)
        with torch.no_grad():
            ref = network(x)
            for model, tolerance in ((trained.network, 1e-4), (onnx, 1e-3)):
                out = model(x)
                assert isinstance(out, SCSEUNetOutput) and out.cls.shape == (shape[0], 1)
                diff = max(float((torch.sigmoid(out.seg) - torch.sigmoid(ref.seg)).abs().max()),
                           float((torch.sigmoid(out.cls) - torch.sigmoid(ref.cls)).abs().max()))  # fmt: skip
                assert diff <= tolerance, (shape, diff)


@pytest.mark.skipif(not RECORD_BASED_INFER, reason="needs the record-based `pneumoseg infer` (issue 13)")
def test_pneumoseg_infer_on_the_received_bundle_equals_the_source(received, source, site_manifest, tmp_path):
    """export -> sign -> verify -> import -> `pneumoseg infer --bundle` (state dict, and ONNX Runtime via
    --model) gives the source checkpoint's probabilities."""
    images = site_manifest.parent / "dicom-images-train"
    common = ["--formats", "png", "--device", "cpu", "--workers", "0", "--fp32", "--no-progress"]
    runs = {
        "source": ["--bundle", str(source)],
        "received": ["--bundle", str(received)],
        "onnx": ["--bundle", str(received), "--model", str(received / "models" / "model.onnx")],
    }
    probabilities = {}
    for name, args in runs.items():
        assert cli_main(["infer", str(images), str(tmp_path / name), *args, *common]) == 0, name
        rows = json.loads((tmp_path / name / "report.json").read_text())["rows"]
        probabilities[name] = {r["scan_id"]: float(r["probability"]) for r in rows}
    reference = probabilities.pop("source")
    assert len(reference) == 8
    for name, tolerance in (("received", 1e-4), ("onnx", 1e-3)):
        assert probabilities[name].keys() == reference.keys()
        assert max(abs(probabilities[name][k] - reference[k]) for k in reference) <= tolerance, name


def test_exported_model_refuses_torchscript_unless_trusted(tmp_path: Path):
    from torch import nn

    class Dual(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x.mean(dim=(1, 2, 3)).unsqueeze(1)

    path = tmp_path / "model.ts"
    torch.jit.script(Dual()).save(str(path))
    with pytest.raises(ValueError, match="refused: TorchScript is code"):
        ExportedModel.load(path)
    out = ExportedModel.load(path, trust=True)(torch.ones(1, 1, 8, 8))
    assert out.seg.shape == (1, 1, 8, 8) and float(out.cls) == 1.0


def test_missing_onnx_fails_the_check(received: Path, keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for module in ("onnx", "onnxruntime"):
        monkeypatch.setitem(sys.modules, module, None)  # `import onnx` now raises ImportError
    report = verify_bundle(received, trusted_keys=keys["trusted"])
    row = next(c for c in report.checks if c.check == "onnx")
    assert not report.ok and row.status == "FAIL" and "pip install 'pneumoseg[onnx]'" in row.detail
    with pytest.raises(ImportError, match=r"pneumoseg\[onnx\]"):
        ExportedModel.load(received / "models" / "model.onnx")
    with pytest.raises(ImportError, match="--no-onnx"):
        export_bundle(received, tmp_path / "out.zip")


# ------------------------------------------------------------------------------------ evaluate / derive
def test_bundle_evaluate_runs_the_record(received: Path, site_manifest: Path, tmp_path: Path):
    reports = {}
    for model in ("state_dict", "onnx"):
        out = tmp_path / model
        argv = ["bundle", "evaluate", "--bundle", str(received), "--manifest", str(site_manifest), "--out", str(out)]
        assert cli_main([*argv, "--model", model]) == 0
        reports[model] = json.loads((out / "site_validation.json").read_text())
        assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "| SIIM Dice |" in (out / "site_validation.md").read_text()
    report = reports["state_dict"]
    n = len(json.loads(site_manifest.read_text())["test"])
    assert report["data"]["images"] == n and report["data"]["image_size"] == SIZE
    assert report["data"]["intensity_percentiles"] == [1.0, 99.0]
    assert report["bundle"]["model"] == "model.pt" and reports["onnx"]["bundle"]["model"] == "model.onnx"
    # the record's thresholds, not defaults
    assert report["at_sender_threshold"]["threshold"] == 0.4
    assert report["postprocessing"] == {"t_cls": 0.35, "top": 0.6, "min_area": 5, "bottom": 0.45}
    assert report["sender_reported"]["val_siim_dice"] == 0.8125
    # the same model either way: the calibration bins hold the same images
    counts = {model: [b["count"] for b in r["calibration"]["bins"]] for model, r in reports.items()}
    assert counts["state_dict"] == counts["onnx"]
    base = ["bundle", "evaluate", "--bundle", str(received), "--manifest", str(site_manifest)]
    base += ["--out", str(tmp_path / "x")]
    assert cli_main([*base, "--image_size", "128"]) == 1  # not the size the model was trained at
    assert cli_main([*base, "--model", "torchscript"]) == 1  # code: only with --trust (and none was sent)
    assert not (tmp_path / "x").exists()
    assert not any(p.name.endswith("_site_validation") for p in received.parent.iterdir())


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


def test_derive_uses_installed_configs_and_the_parent_weights(received: Path, tmp_path: Path):
    from types import SimpleNamespace

    from monai.bundle import ConfigParser, verify_metadata

    derived = tmp_path / "derived"
    assert cli_main(["bundle", "derive", "--from", str(received), "--into", str(derived), "--note", "site B"]) == 0
    # configs: the installed ones, byte for byte (never the received documents), plus the generated overlay
    for path in installed_configs().glob("*"):
        if path.name not in ("metadata.json", "postprocessing.json"):
            assert (derived / "configs" / path.name).read_bytes() == path.read_bytes(), path.name
    assert not (derived / "reference").exists()
    record = ModelRecord.read(received / "models" / "model_record.json")
    overlay = json.loads((derived / "configs" / "finetune.json").read_text())
    assert overlay["image_size"] == SIZE and overlay["network_def#decoder_channels"] == [16, 8, 8, 4, 4]
    assert overlay["operating_threshold"] == 0.4 and overlay["train#preprocessing#transforms#0#lower"] == 1.0
    assert overlay["validate#preprocessing#transforms#0#upper"] == 99.0
    assert json.loads((derived / "configs" / "postprocessing.json").read_text())["t_cls"] == 0.35
    assert ModelRecord.read(derived / "models" / "parent_record.json") == record
    # metadata: new version, changelog naming the parent, MONAI's schema
    meta = json.loads((derived / "configs" / "metadata.json").read_text())
    parent = json.loads((received / "configs" / "metadata.json").read_text())
    digest = next(line.split()[0] for line in (received / CHECKSUM_FILE).read_text().splitlines()
                  if line.endswith("models/model.pt"))  # fmt: skip
    assert meta["version"] == "0.1.1" and parent["version"] == "0.1.0"
    parent_text = f"Pneumothorax scSE U-Net 0.1.0 (models/model.pt sha256 {digest})"
    assert meta["changelog"]["0.1.1"] == f"site B; derived from {parent_text}"
    assert meta["derived_from"] == {"name": parent["name"], "version": "0.1.0", "weights_sha256": digest}
    configs = derived / "configs"
    verify_metadata(meta_file=str(configs / "metadata.json"), filepath=str(configs / "meta_schema.json"))
    # the overlay loads the parent weights into train.json's network (the one-epoch run: test_sharing_attacks)
    parser = ConfigParser()
    parser.read_config([str(derived / "configs" / "train.json"), str(derived / "configs" / "finetune.json")])
    parser.update({"bundle_root": str(derived), "device": "$torch.device('cpu')"})
    assert parser["initialize"][-1] == "$@parent_weights(@train#trainer)"
    engine = SimpleNamespace(state=SimpleNamespace(max_epochs=None, epoch=0), logger=__import__("logging").getLogger())
    parser.get_parsed_content("parent_weights")(engine)
    network = parser.get_parsed_content("network")
    parent_state = load_state_dict(received / "models" / "model.pt")
    assert network.state_dict().keys() == parent_state.keys()
    assert all(torch.equal(v, parent_state[k]) for k, v in network.state_dict().items())
    assert cli_main(["bundle", "derive", "--from", str(received), "--into", str(derived)]) == 1  # exists
    assert cli_main(["bundle", "derive", "--from", str(received), "--into", str(tmp_path / "d2"), "--note", "$x"]) == 1


def test_keygen(tmp_path: Path, capsys):
    key = tmp_path / "keys" / "hospital_a"
    assert cli_main(["bundle", "keygen", "--out", str(key)]) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and b"PUBLIC KEY" in Path(f"{key}.pub").read_bytes()
    assert "key fingerprint: ed25519 sha256:" in capsys.readouterr().out
    assert cli_main(["bundle", "keygen", "--out", str(key)]) == 1  # never replaced silently


def test_cli_help_explains_every_action():
    for action in ("keygen", "export", "verify", "import", "evaluate", "derive"):
        result = subprocess.run([sys.executable, "-m", "pneumoseg", "bundle", action, "--help"], capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0 and "usage: pneumoseg bundle " + action in result.stdout


def test_bundle_record_writes_the_record_of_a_bundle_trained_without_one(tmp_path: Path, capsys):
    from pneumoseg.cli import main
    from pneumoseg.model_record import ModelRecord, load_trained_model
    from pneumoseg.networks import SCSEUNet

    kwargs = {"decoder_channels": [16, 8, 8, 4, 4], "head_channels": 4}
    (tmp_path / "models").mkdir()
    torch.save({"model": SCSEUNet(**kwargs).state_dict()}, tmp_path / "models" / "model.pt")
    args = ["bundle", "record", "--bundle", str(tmp_path), "--image-size", "128"]
    # weights that do not fit the declared network: refused, nothing written
    assert main(args) == 1
    assert "does not fit" in capsys.readouterr().err
    assert not (tmp_path / "models" / "model_record.json").exists()
    assert main([*args, "--network-kwargs", json.dumps(kwargs)]) == 0
    record = ModelRecord.read(tmp_path / "models" / "model_record.json")
    assert record.kinds == ("radiograph",) and record.radiograph.image_size == 128
    assert record.postprocessing.t_cls == record.operating_threshold  # safe defaults until evaluation tunes them
    assert load_trained_model(tmp_path).record == record
    assert main([*args, "--network-kwargs", json.dumps(kwargs)]) == 1  # exists: --overwrite to replace
