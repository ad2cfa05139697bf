"""Process-wide settings for CPU throughput: memory (glibc malloc) and threads, fair to other jobs.

Threads. PyTorch's CPU kernels run on OpenMP threads (GNU libgomp in the Linux wheels). By default a thread
that reaches the end of a parallel region spins for a while before it sleeps; when another process takes a
core, the spinning threads burn the CPU that the thread they wait for needs, and a training beside one other
training ran 9x slower instead of 2x. ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep at once. libgomp reads it
when it is loaded (when torch is imported), so it belongs in the environment of the process:
:data:`FAIR_SHARE_ENVIRONMENT` (set by the ``pneumoseg`` commands, the demo's subprocesses, the documented
``monai.bundle`` commands); :func:`configure_cpu_threads` then sizes the thread pool (bundle ``initialize``)
and warns when the policy is missing. Measured in ``benchmarks/shared_machine.py`` (docs/training.md).

Memory (glibc malloc; no-ops elsewhere).

PyTorch's CPU allocator takes every tensor from ``malloc``. By default glibc serves blocks above a
threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps them on free, so a network's large
activations are new pages at every forward pass: the kernel faults in and zeroes each 4 KiB page.
Measured on this project's network (``benchmarks/batch_infer.py``, 2-core CPU, bf16, batch 8, 512 px):
26,800 page faults and 53 ms of kernel time per image, a quarter of its CPU. :func:`retain_freed_memory`
keeps freed blocks in malloc's heap for reuse (as PyTorch's CUDA caching allocator does on GPUs);
:func:`release_freed_memory` hands what is free back to the OS at moments the caller chooses.

Opt out with ``PNEUMOSEG_RETAIN_FREED_MEMORY=0`` (memory then goes back to the OS as soon as it is freed).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

FAIR_SHARE_ENVIRONMENT: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Environment a CPU-heavy pneumoseg process needs before torch is imported (an explicit setting wins)."""

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

OPT_OUT_VARIABLE = "PNEUMOSEG_RETAIN_FREED_MEMORY"


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    # musl and other C libraries lack one or both
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def retain_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Serve all allocations from malloc's heaps and keep freed memory there for reuse.

    ``M_MMAP_MAX = 0``: no block gets its own mapping (glibc still maps one when a heap cannot grow);
    ``M_TRIM_THRESHOLD``: free memory at the top of the heap is returned to the OS only above this many
    bytes. The resident size then stays near the peak of the run; call :func:`release_freed_memory` to
    return it. Process-wide and not undone (glibc's adaptive threshold stays off once set), so call it
    from the program that owns the process: ``pneumoseg infer``, the bundle's training and evaluation.

    Measured (2-core CPU): model-only in ``benchmarks/batch_infer.py`` (bf16, batch 8, 512 px) 8.7 -> 13.2
    images/s; a training step (256 px, fp32, batch 8) 6.1 -> 7.5 images/s. The price is memory: freed blocks
    of very different sizes leave holes a larger block does not fit, and what is kept stays resident.
    Peak resident size of ``pneumoseg infer``: +0.3 GB on radiographs; +0.6 GB on CT volumes of
    512 x 512 x 96 (1.58 -> 2.17 GB; 2.23 GB over 4x as many volumes: it does not creep).

    Returns:
        True if applied; False on a C library without ``mallopt`` or when opted out by the environment.
    """
    if os.environ.get(OPT_OUT_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


def release_freed_memory() -> None:
    """Hand memory that malloc holds free back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Long runs call it now and then: freed memory would otherwise stay resident (retained on purpose by
    :func:`retain_freed_memory`, and in the arenas of threads that allocate large arrays of varying sizes).
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup v2 quota (``cpu.max``, e.g. ``docker --cpus 1.5``), ``None`` without one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, cpusets), capped by a cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        count = min(count, max(1, int(limit)))
    return max(1, count)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). Elsewhere bf16 autocast is emulated and
    slower than fp32, so callers choose fp32 there."""
    import torch

    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()) or bool(
        getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    )


def configure_cpu_threads(num_threads: int | None = None) -> int:
    """Size PyTorch's intra-op thread pool for this process and check the OpenMP wait policy.

    Args:
        num_threads: the number of threads; ``None``: ``OMP_NUM_THREADS`` if the environment sets it (torchrun
            sets 1 per process when it starts several), else the CPUs this process may use
            (:func:`available_cpus`) shared among the processes of a ``torchrun`` node (``LOCAL_WORLD_SIZE``).

    Returns:
        the number of threads set. Logs a warning when ``OMP_WAIT_POLICY`` is not ``PASSIVE`` (it cannot be
        changed once torch is loaded; see the module docstring).
    """
    import torch

    if num_threads is None:
        if os.environ.get("OMP_NUM_THREADS", "").strip():
            num_threads = torch.get_num_threads()  # torch applied it when it was loaded
        else:
            num_threads = available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    num_threads = max(1, int(num_threads))
    torch.set_num_threads(num_threads)
    policy = os.environ.get("OMP_WAIT_POLICY", "").strip().upper()
    if policy != "PASSIVE":
        logger.warning(
            "OMP_WAIT_POLICY is %s, not PASSIVE: beside other busy processes this run can slow down many times "
            "over (OpenMP threads spin while they wait); start it with OMP_WAIT_POLICY=PASSIVE",
            policy or "unset",
        )
    return num_threads
