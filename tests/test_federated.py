"""Federated training on NVIDIA FLARE: a real simulator run (2 synthetic hospitals, 2 rounds, 64 px, a tiny
decoder), then what crossed to the server, the per-round record, and the exported global bundle through the
public CLIs; plus the closed vocabularies (job values, site config) and the sites' class allow-list.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pydicom
import pytest

pytest.importorskip("nvflare")

from pneumoseg.federated.executor import CLIENT_MODULE, BundleClientExecutor, trainer_command  # noqa: E402
from pneumoseg.federated.job import CLIENT_CLASSES, SERVER_CLASSES, write_job  # noqa: E402
from pneumoseg.federated.report import RoundsLog  # noqa: E402
from pneumoseg.federated.simulate import SimulationConfig, simulate, simulator_resources  # noqa: E402
from pneumoseg.federated.values import (  # noqa: E402
    METRIC_NAMES,
    SITE_CONFIG_ENV,
    FederatedConfigError,
    JobValues,
    SiteConfig,
)

PYTHON = sys.executable
DECODER = [16, 8, 8, 4, 4]
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory):
    from pneumoseg.sharing.signing import generate_key

    keys = tmp_path_factory.mktemp("keys")
    key, public, _ = generate_key(keys / "federation_server")
    (keys / "trusted").mkdir()
    (keys / "trusted" / public.name).write_bytes(public.read_bytes())  # what a receiving hospital pins
    config = SimulationConfig(
        out_dir=tmp_path_factory.mktemp("federation"), sites=2, rounds=2, local_epochs=1, images_per_site=20,
        image_size=64, learning_rate=1e-3, warmup_epochs=0, batch_size=4, network={"decoder_channels": DECODER},
        onnx=False, signing_key=key,
    )  # fmt: skip
    result = simulate(config)
    result.trusted_keys = keys / "trusted"
    return result


def _manifest_strings(site) -> set[str]:
    """Everything of a site's manifest that must stay there: paths, file names, patient hashes, data root."""
    manifest = json.loads(site.manifest.read_text())
    strings = {str(site.root.resolve()), str(site.manifest.resolve()), str(site.config.resolve())}
    for split in ("training", "validation", "test"):
        for row in manifest.get(split, []):
            strings |= {row["image"], Path(row["image"]).name, Path(row["image"]).stem, row["patient_hash"]}
    return strings


def _files(root: Path):
    return [p for p in root.rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------------------ simulation
def test_sites_differ_like_hospitals(sim):
    a, b = sim.sites
    first = lambda site: pydicom.dcmread(next((site.root / "data").rglob("*.dcm")))  # noqa: E731
    ds_a, ds_b = first(a), first(b)
    assert (ds_a.Modality, ds_a.PhotometricInterpretation, ds_a.Rows) == ("CR", "MONOCHROME1", 128)
    assert (ds_b.Modality, ds_b.file_meta.TransferSyntaxUID, ds_b.Rows) == ("DX", "1.2.840.10008.1.2.4.90", 64)
    assert ds_b.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"


def test_global_model_changes_every_round_and_every_site_reports_every_round(sim):
    log = sim.results.log
    assert log.job_id == "simulate_job"
    assert sorted(log.global_models) == [0, 1, 2]
    digests = [log.global_models[v] for v in range(3)]
    assert len(set(digests)) == 3, "the global model did not change in some round"
    assert log.sites == ["site-a", "site-b"]
    for version in (0, 1, 2):  # 0, 1: evaluated before training in rounds 0, 1; 2: the final evaluation
        for site in log.sites:
            assert set(log.metrics[version][site]) >= {"siim_dice", "auc"}, (version, site)
            assert all(0.0 <= v <= 1.0 for v in log.metrics[version][site].values())
    assert log.values == sim.results.values.to_dict()


def test_only_weights_and_closed_metrics_cross_to_the_server(sim):
    import torch

    tensors = len(torch.load(sim.results.bundle / "models" / "model.pt", weights_only=True))
    results = sim.results.log.site_results
    assert len(results) == 2 * 3
    for result in results:  # what each site's message held, as the server received it
        assert set(result["metric_names"]) <= set(METRIC_NAMES), result
        if result["version"] < 2:
            assert result["data_kind"] == "WEIGHTS" and result["tensors"] == tensors
            assert set(result["meta_keys"]) == {"NUM_STEPS_CURRENT_ROUND", "initial_metrics"}
        else:
            assert result["data_kind"] == "METRICS" and result["tensors"] == 0 and result["meta_keys"] == []

    secrets = set().union(*(_manifest_strings(s) for s in sim.sites))
    server_side = _files(sim.workspace / "server") + _files(sim.job)
    with zipfile.ZipFile(sim.results.archive) as archive:
        shipped = b"".join(archive.read(n) for n in archive.namelist())
    for path in server_side:
        data = path.read_bytes()
        leaked = [s for s in secrets if s.encode() in data]
        assert not leaked, f"{path} holds {leaked[:3]}"
    assert not [s for s in secrets if s.encode() in shipped]


def test_report_table_and_plot(sim):
    report = sim.results.report
    rows = report["csv"].read_text().splitlines()
    assert rows[0] == "version,site," + ",".join(METRIC_NAMES)
    assert len(rows) == 1 + 3 * 2
    assert "| 2 | site-b |" in report["markdown"].read_text()
    assert report["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exported_global_bundle_verifies_and_infers(sim, tmp_path: Path):
    from pneumoseg.model_record import ModelRecord

    bundle = sim.results.bundle
    record = ModelRecord.read(bundle / "models" / "model_record.json")
    assert list(record.network.kwargs["decoder_channels"]) == DECODER and record.radiograph.image_size == 64
    card = (bundle / "docs" / "README.md").read_text()
    assert "## Federated training" in card and "`simulate_job`" in card and "after round 2 of 2" in card
    for site, metrics in sim.results.log.final_metrics().items():
        assert f"| {site} | {metrics['siim_dice']:.3f} |" in card
    import torch

    from pneumoseg.model_record import load_state_dict

    exported = torch.load(bundle / "models" / "model.pt", weights_only=True)
    aggregated = load_state_dict(sim.run_dir / "app_server" / "FL_global_model.pt")
    assert exported.keys() == aggregated.keys()
    assert all(torch.equal(exported[k], aggregated[k].to(exported[k].dtype)) for k in exported)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    trusted = ["--trusted-keys", str(sim.trusted_keys)]
    verify = subprocess.run([PYTHON, "-m", "pneumoseg", "bundle", "verify", str(sim.results.archive), *trusted],
                            capture_output=True, text=True, env=env)  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "federation_server" in verify.stdout  # verify names the signer
    received = tmp_path / "received"
    imported = subprocess.run([PYTHON, "-m", "pneumoseg", "bundle", "import", str(sim.results.archive), "--into",
                               str(received), *trusted], capture_output=True, text=True, env=env)  # fmt: skip
    assert imported.returncode == 0, imported.stdout + imported.stderr
    scans = tmp_path / "scans"
    scans.mkdir()
    site = sim.sites[1]
    for i, row in enumerate(json.loads(site.manifest.read_text())["test"][:2]):
        (scans / f"scan{i}.dcm").write_bytes((site.manifest.parent / "data" / row["image"]).read_bytes())
    out = tmp_path / "inference"
    infer = subprocess.run([PYTHON, "-m", "pneumoseg", "infer", str(scans), str(out), "--bundle", str(received),
                            "--no-progress"], capture_output=True, text=True, env=env)  # fmt: skip
    assert infer.returncode == 0, infer.stdout + infer.stderr
    report = (out / "report.csv").read_text().splitlines()
    assert len(report) == 3 and all(",ok," in line for line in report[1:])


# ------------------------------------------------------------------------------------- closed vocabularies
def test_job_values_are_numbers_of_a_closed_schema():
    values = JobValues(
        rounds=2, local_epochs=1, learning_rate=1e-3, image_size=64, network={"decoder_channels": DECODER}
    )
    assert JobValues.from_json(values.to_json()) == values
    for bad in (
        {**values.to_dict(), "train_script": "custom/train.py"},  # unknown key
        {**values.to_dict(), "learning_rate": "$__import__('os').system('id')"},  # code where a number goes
        {**values.to_dict(), "network": {"norm": "$import os"}},  # network argument outside its enum
        {**values.to_dict(), "network": {"pretrained_path": "/etc/passwd"}},  # a path: not a registry argument
        {**values.to_dict(), "rounds": 0},
    ):
        with pytest.raises(FederatedConfigError):
            JobValues.from_dict(bad)


def test_the_site_executor_launches_only_the_installed_trainer_with_validated_values():
    executor = BundleClientExecutor(rounds=2, local_epochs=1, learning_rate=1e-3, image_size=64,
                                    network={"decoder_channels": DECODER})  # fmt: skip
    command = trainer_command(executor.values)
    assert command[:4] == [sys.executable, "-u", "-m", CLIENT_MODULE] and command[4] == "--values"
    assert JobValues.from_json(command[5]) == executor.values
    with pytest.raises(TypeError):  # a job cannot hand the site a command line
        BundleClientExecutor(rounds=2, local_epochs=1, learning_rate=1e-3, image_size=64, command="rm -rf /")
    with pytest.raises(FederatedConfigError):
        BundleClientExecutor(rounds=2, local_epochs=1, learning_rate=7.0, image_size=64)


def test_job_is_configuration_only_and_names_installed_classes(tmp_path: Path):
    values = JobValues(rounds=3, local_epochs=2, learning_rate=1e-3, image_size=64)
    job = write_job(tmp_path / "job", ["site-a", "site-b"], values)
    files = sorted(p.relative_to(job).as_posix() for p in _files(job))
    assert files == ["app/config/config_fed_client.json", "app/config/config_fed_server.json", "meta.json"]
    assert json.loads((job / "meta.json").read_text())["deploy_map"] == {"app": ["server", "site-a", "site-b"]}
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    server = (job / "app" / "config" / "config_fed_server.json").read_text()
    assert [e["executor"]["path"] for e in client["executors"]] == list(CLIENT_CLASSES)
    assert JobValues.from_dict(client["executors"][0]["executor"]["args"]) == values
    paths = {p for p in SERVER_CLASSES if f'"{p}"' in server}
    assert paths == set(SERVER_CLASSES) and server.count('"path"') == len(SERVER_CLASSES)
    with pytest.raises(FederatedConfigError):
        write_job(tmp_path / "bad", ["site a"], values)


def test_site_config_is_found_by_site_name_and_closed(tmp_path: Path):
    SiteConfig(manifest="m.json", work_dir="work").write(tmp_path / "site-a" / "site.json")
    env = {SITE_CONFIG_ENV: str(tmp_path / "{site}" / "site.json")}
    config = SiteConfig.for_site("site-a", env)
    assert config.manifest == str(tmp_path / "site-a" / "m.json")
    with pytest.raises(FederatedConfigError, match=SITE_CONFIG_ENV):
        SiteConfig.for_site("site-a", {})
    (tmp_path / "x.json").write_text(json.dumps({"manifest": "m", "work_dir": "w", "command": "id"}))
    with pytest.raises(FederatedConfigError):
        SiteConfig.read(tmp_path / "x.json")


def test_a_site_refuses_a_job_naming_a_class_outside_its_allow_list(tmp_path: Path):
    """A job whose client config runs FLARE's generic executor with a command of its own never runs it."""
    values = JobValues(rounds=1, local_epochs=1, learning_rate=1e-3, image_size=64)
    job = write_job(tmp_path / "job", ["site-a"], values)
    marker = tmp_path / "payload_ran"
    hostile = {"format_version": 2, "executors": [{"tasks": ["*"], "executor": {
        "path": "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor",
        "args": {"execution_mode": "external_process", "command": ["touch", str(marker)]}}}]}  # fmt: skip
    (job / "app" / "config" / "config_fed_client.json").write_text(json.dumps(hostile))
    workspace = tmp_path / "ws"
    simulator_resources(workspace)
    command = [PYTHON, "-m", "nvflare.cli", "simulator", str(job), "-w", str(workspace), "-c", "site-a"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert "not in allow_list" in run.stdout + run.stderr
    assert not marker.exists()


def test_rounds_log_ignores_metrics_outside_the_closed_list(tmp_path: Path):
    lines = [
        {"event": "start", "job_id": "j1", "values": {"rounds": 1}},
        {"event": "global_model", "version": 0, "sha256": "a"},
        {"event": "site_result", "version": 0, "site": "s1", "metrics": {"auc": 0.5, "patient": 1.0}},
    ]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    log = RoundsLog.read(tmp_path / "r.jsonl")
    assert log.metrics == {0: {"s1": {"auc": 0.5}}} and log.job_id == "j1"
    assert log.csv_text().splitlines()[1] == "0,s1,,,0.5000,,"


def test_report_cli_publishes_from_the_server_run_folder(sim, tmp_path: Path):
    from pneumoseg.cli import main as cli_main

    assert cli_main(["federated", "report", str(sim.run_dir), "--out", str(tmp_path), "--no-onnx"]) == 0
    assert (tmp_path / "report" / "rounds.md").read_text() == sim.results.report["markdown"].read_text()
    assert (tmp_path / "global_bundle.zip").is_file()
    assert cli_main(["federated", "report", str(tmp_path), "--out", str(tmp_path / "again")]) == 1  # no record
