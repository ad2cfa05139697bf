"""Tests for pneumoseg.runtime: freed memory kept for reuse, and handed back on request (glibc).

The settings are process-wide, so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pneumoseg.runtime import OPT_OUT_VARIABLE, _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc malloc only")

REPO = Path(__file__).resolve().parents[1]

# allocate, fill and free a 64 MiB tensor (above glibc's largest mmap threshold, 32 MiB) again and again,
# as a network's activations are; report the page faults of the last rounds and the resident size before
# and after release_freed_memory. Warm-up rounds: PyTorch's 64-byte aligned allocations leave the first
# few freed blocks a little too small for the next one of the same size (measured: steady from round 10)
PROBE = """
import json, resource, sys, torch
from pneumoseg.runtime import release_freed_memory, retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

for _ in range(16):
    torch.ones(16 * 2**20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.ones(16 * 2**20).sum()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
held = rss_mib()
release_freed_memory()
print(json.dumps({"applied": applied, "faults": faults, "held_mib": held, "released_mib": rss_mib()}))
"""


def probe(mode: str, **env: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_retained_memory_is_reused_without_page_faults_and_released_on_request() -> None:
    default = probe("default")
    retained = probe("retain")
    assert retained["applied"] is True
    # default: each 64 MiB tensor is a fresh mapping, 16,384 pages faulted in per round
    assert default["faults"] > 4 * 16_000
    assert retained["faults"] < default["faults"] / 10
    # kept resident after the free (that is the reuse), given back by release_freed_memory
    assert retained["held_mib"] - retained["released_mib"] > 48


def test_opt_out_by_environment() -> None:
    out = probe("retain", **{OPT_OUT_VARIABLE: "0"})
    assert out["applied"] is False
    assert out["faults"] > 4 * 16_000


# size the thread pool as a bundle's initialize does, optionally on one CPU only (as `taskset -c 0` would)
THREADS = """
import json, logging, os, sys
if sys.argv[2] == "one-cpu":
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
import torch
from pneumoseg.runtime import available_cpus, configure_cpu_threads
logging.basicConfig(level=logging.WARNING)
n = configure_cpu_threads(None if sys.argv[1] == "auto" else int(sys.argv[1]))
print(json.dumps({"set": n, "torch": torch.get_num_threads(), "cpus": available_cpus()}))
"""


def threads(arg: str, cpus: str = "all", **env: str) -> tuple[dict, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "LOCAL_WORLD_SIZE")}
    result = subprocess.run(
        [sys.executable, "-c", THREADS, arg, cpus],
        capture_output=True,
        text=True,
        check=True,
        env={**base, "PYTHONPATH": str(REPO), **env},
    )
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_thread_pool_follows_the_cpus_the_process_may_use() -> None:
    auto, warning = threads("auto", OMP_WAIT_POLICY="PASSIVE")
    assert auto["set"] == auto["torch"] == auto["cpus"] == len(os.sched_getaffinity(0))
    assert "OMP_WAIT_POLICY" not in warning
    pinned, _ = threads("auto", cpus="one-cpu", OMP_WAIT_POLICY="PASSIVE")
    assert pinned["set"] == pinned["torch"] == pinned["cpus"] == 1
    shared, _ = threads("auto", OMP_WAIT_POLICY="PASSIVE", LOCAL_WORLD_SIZE=str(2 * auto["cpus"]))
    assert shared["torch"] == 1  # torchrun's processes share the node's CPUs, at least one thread each
    assert threads("auto", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")[0]["torch"] == 1  # explicit wins
    assert threads("1", OMP_WAIT_POLICY="PASSIVE")[0]["torch"] == 1


def test_missing_passive_wait_policy_is_named() -> None:
    _, warning = threads("1")
    assert "OMP_WAIT_POLICY is unset, not PASSIVE" in warning


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU flags of Linux")
def test_native_bf16_follows_the_cpu_flags_and_decides_the_inference_precision(monkeypatch) -> None:
    import torch

    from pneumoseg.infer import models
    from pneumoseg.runtime import cpu_has_native_bf16

    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})
    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.precision(cpu, fp32=False) == (torch.bfloat16, True)
    assert models.precision(cpu, fp32=True) == (None, False)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)  # emulated bf16 would be slower than fp32
    assert models.precision(cpu, fp32=False) == (None, False)
