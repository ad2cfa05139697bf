"""``pneumoseg federated simulate``: the whole federation on one machine with FLARE's simulator.

1. synthetic hospitals (:mod:`pneumoseg.federated.sites`), each with its manifest and site-local config;
2. the job (:func:`~pneumoseg.federated.job.write_job`), exactly what a real deployment submits;
3. ``nvflare simulator`` on it, in a workspace whose ``local/resources.json`` allows only the job's classes
   (enforced, as on a provisioned site), each site finding its own config through
   :data:`~pneumoseg.federated.values.SITE_CONFIG_ENV`;
4. from the server's run folder: the per-round table and plot, the global bundle and its sharing archive
   (:func:`~pneumoseg.federated.export.publish`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumoseg.federated.export import JobResults, publish
from pneumoseg.federated.job import CLIENT_CLASSES, SERVER_CLASSES, write_job
from pneumoseg.federated.sites import SyntheticSite, make_sites
from pneumoseg.federated.values import SITE_CONFIG_ENV, JobValues

__all__ = ["SimulationConfig", "Simulation", "SIMULATOR_JOB_ID", "simulator_resources", "run_simulator", "simulate"]

SIMULATOR_JOB_ID = "simulate_job"
"""The job id (and run folder name) FLARE's simulator gives the job."""


@dataclass
class SimulationConfig:
    """Every default of ``pneumoseg federated simulate`` lives here; the CLI only exposes them."""

    out_dir: Path = Path("federated_simulation")
    sites: int = 3
    rounds: int = 3
    local_epochs: int = 1
    images_per_site: int = 60
    image_size: int = 128
    learning_rate: float = 1e-3
    warmup_epochs: int = 0
    batch_size: int = 8
    num_workers: int = 0
    seed: int = 0
    network: dict[str, Any] = field(default_factory=dict)
    onnx: bool = True
    signing_key: Path | None = None
    initial_weights: Path | None = None

    def values(self) -> JobValues:
        return JobValues(
            rounds=self.rounds,
            local_epochs=self.local_epochs,
            learning_rate=self.learning_rate,
            image_size=self.image_size,
            warmup_epochs=self.warmup_epochs,
            seed=self.seed,
            network=dict(self.network),
        )


@dataclass
class Simulation:
    """A finished simulation: its sites, job folder, simulator workspace, server run folder and results."""

    sites: list[SyntheticSite]
    job: Path
    workspace: Path
    run_dir: Path
    results: JobResults
    seconds: float


def simulator_resources(workspace: Path) -> Path:
    """``WORKSPACE/local/resources.json`` (copied by the simulator to every participant): only the job's classes
    may be built, enforced (one file for server and sites, as the simulator shares it)."""
    path = workspace / "local" / "resources.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    resources = {
        "format_version": 2,
        "class_list_enforcement_mode": "enforce",
        "class_allow_list": [*SERVER_CLASSES, *CLIENT_CLASSES],
    }
    path.write_text(json.dumps(resources, indent=1) + "\n")
    return path


def run_simulator(job: Path, workspace: Path, sites: list[str], site_config: str, log_file: Path) -> Path:
    """Run ``nvflare simulator`` on ``job`` for ``sites`` (in parallel); returns the server's run folder.

    ``site_config``: the value of :data:`SITE_CONFIG_ENV` (with ``{site}``). The sites share the cores: each
    trainer gets ``cores // sites`` threads and waits passively, so they do not spin against each other.
    """
    try:
        import nvflare  # noqa: F401
    except ImportError:
        raise RuntimeError("NVIDIA FLARE is not installed: pip install 'pneumoseg[federated]'") from None
    simulator_resources(workspace)
    env = dict(os.environ)
    env[SITE_CONFIG_ENV] = site_config
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(sites))))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = [sys.executable, "-m", "nvflare.cli", "simulator", str(job), "-w", str(workspace),
               "-c", ",".join(sites), "-t", str(len(sites))]  # fmt: skip
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as log:
        result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    run_dir = workspace / "server" / SIMULATOR_JOB_ID
    if result.returncode != 0 or not (run_dir / "app_server" / "FL_global_model.pt").is_file():
        raise RuntimeError(f"the FLARE simulator failed (exit code {result.returncode}); see {log_file}")
    return run_dir


def simulate(config: SimulationConfig) -> Simulation:
    """Generate the sites, write the job, run the simulator and publish the results under ``config.out_dir``."""
    start = time.perf_counter()
    out = config.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    values = config.values()
    sites = make_sites(out / "sites", config.sites, config.images_per_site, config.image_size, config.seed,
                       batch_size=config.batch_size, num_workers=config.num_workers)  # fmt: skip
    names = [s.name for s in sites]
    initial = str(Path(config.initial_weights).resolve()) if config.initial_weights else None
    job = write_job(out / "job", names, values, initial_weights=initial, overwrite=True)
    workspace = out / "workspace"
    run_dir = run_simulator(job, workspace, names, str(out / "sites" / "{site}" / "site.json"), out / "simulator.log")
    results = publish(run_dir, out, {s.name: s.profile.label for s in sites}, config.signing_key, onnx=config.onnx,
                      overwrite=True)  # fmt: skip
    return Simulation(sites, job, workspace, run_dir, results, time.perf_counter() - start)
