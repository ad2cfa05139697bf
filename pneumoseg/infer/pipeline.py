"""The loader -> model -> writer pipeline of a run::

    DataLoader workers (ScanDataset: decode + preprocess, items in the order they finish)
      -> main process: radiographs batched, CT volumes slice-batched (DualOutputSliceInferer), per model
      -> one writer thread (ScanOutputs.finish: post-processing, inversion, files, record) -> rows

* a worker that dies (a crash inside a decoder) costs the scan it was reading: that scan becomes an error
  row, the loader is restarted on the scans not done yet, and the run goes on;
* a stop request (``stop``: set on SIGINT / SIGTERM by the program that owns the process) ends the run
  after the writes in flight; what finished is reported;
* ``strict``: the first error row stops the run (writes not started are cancelled).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from pneumoseg.infer.dataset import ScanDataset, stable_reason, worker_init
from pneumoseg.infer.discovery import Scan
from pneumoseg.infer.outputs import ScanOutputs
from pneumoseg.runtime import release_freed_memory

__all__ = ["InferencePipeline", "RunStopped", "StopRequest"]

logger = logging.getLogger(__name__)

# scans between returns of freed memory to the OS (pneumoseg.runtime.release_freed_memory). Rare: each return
# makes the next forward pass fault its activations in again (every 32 scans cost 5% scans/s), and the
# resident size measured flat without any (100 vs 400 scans, benchmarks/batch_infer.py)
TRIM_EVERY = 1024
_WORKER_DIED = re.compile(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\)")
WORKER_DIED_REASON = "the worker process reading this scan died (a crash while decoding or preprocessing it)"


class RunStopped(Exception):
    """Raised inside the loop to end it: the message says why (strict error, signal)."""


class StopRequest(threading.Event):
    """Set (by a signal handler) to end the run after the writes in flight; ``reason`` says why."""

    reason = ""

    def request(self, reason: str) -> None:
        self.reason = reason
        self.set()


def _worker_died(error: BaseException) -> bool:
    """torch's error for a DataLoader worker that died (raised where the main thread happens to be: torch's
    SIGCHLD handler raises it)."""
    return isinstance(error, RuntimeError) and _WORKER_DIED.search(str(error)) is not None


def _identity(item: Any) -> Any:
    return item


class InferencePipeline:
    """Runs ``dataset``'s scans through the models and ``outputs``; rows go to ``on_row``.

    Args:
        dataset: the run's scans (:class:`~pneumoseg.infer.dataset.ScanDataset`).
        networks: ``{image kind: network}`` called as ``network(x [B, 1, S, S]) -> (seg, cls)`` logits
            (:class:`~pneumoseg.infer.models.PrecisionWrapper`).
        outputs: writes each scan (:class:`~pneumoseg.infer.outputs.ScanOutputs`).
        device: where the networks run.
        batch_size: radiographs per forward pass; CT slices per forward pass.
        workers: DataLoader worker processes (0: decode in the main process).
        stop: set by a signal handler: finish the writes in flight, then stop.
        strict: stop at the first error row.
        progress: a tqdm bar on stderr.
    """

    def __init__(
        self,
        dataset: ScanDataset,
        networks: Mapping[str, torch.nn.Module],
        outputs: ScanOutputs,
        device: torch.device,
        batch_size: int = 8,
        workers: int = 2,
        stop: StopRequest | None = None,
        strict: bool = False,
        progress: bool = False,
    ) -> None:
        self.dataset, self.networks, self.outputs = dataset, dict(networks), outputs
        self.device, self.batch_size, self.workers = device, max(1, batch_size), max(0, workers)
        self.stop = stop or StopRequest()
        self.strict, self.progress = strict, progress

    # -------------------------------------------------------------------------------------------- run
    def run(self, on_row: Callable[[Scan, dict[str, Any]], None]) -> str:
        """Process every scan of the dataset; returns why the run stopped early ("" if it did not)."""
        scans = self.dataset.scans
        done: set[int] = set()  # submitted to the writer (their rows will come)
        bar = self._bar(len(scans))
        writer = _Writer(on_row, self.outputs, self.strict, bar)
        # tensors from the workers by named shared-memory files ("file_system"), not by file descriptors:
        # passing a descriptor needs the worker's resource-sharer thread, hence its GIL, which OpenJPEG holds
        # while decoding (the main process waited 1.8 s instead of 5.3 s for items over 200 scans).
        # torch_shm_manager unlinks the files if a process dies. Restored afterwards (a process-wide setting)
        sharing_strategy = torch.multiprocessing.get_sharing_strategy()
        if self.workers:
            torch.multiprocessing.set_sharing_strategy("file_system")
        stopped = ""
        try:
            for _restart in range(len(scans) + 2):  # a loader restarts after a worker died: bounded
                remaining = [i for i in range(len(scans)) if i not in done]
                try:
                    self._pass(remaining, done, writer)
                    break
                except RunStopped as e:
                    stopped = str(e)
                    break
                except RuntimeError as e:
                    if not _worker_died(e):
                        raise
                    if self.stop.is_set():  # a signal to the process group reached the workers too
                        stopped = self._stop_reason()
                        break
                    for index in self._culprits(str(e)):
                        done.add(index)
                        scan = scans[index]
                        logger.warning("%s: %s", scan.source, WORKER_DIED_REASON)
                        writer.submit(scan, functools.partial(self.outputs.error_row, scan, WORKER_DIED_REASON, 0.0))
            else:
                raise RuntimeError("DataLoader workers kept dying; giving up")
            stopped = stopped or writer.collect(0)
        finally:
            writer.close(cancel_pending=bool(stopped) and not self.stop.is_set())
            release_freed_memory()  # what the run kept for reuse goes back when it ends
            torch.multiprocessing.set_sharing_strategy(sharing_strategy)
            if bar is not None:
                bar.close()
        return stopped or writer.stopped

    def _stop_reason(self) -> str:
        why = self.stop.reason or "a stop request"
        return f"interrupted by {why}: writes in flight finished, the rest not processed"

    def _culprits(self, message: str) -> list[int]:
        """The scans the dead workers were reading (from the pids torch names and what each worker said it
        was reading)."""
        pids = {int(p) for p in _WORKER_DIED.search(message).group(1).replace(",", " ").split()}
        return [
            int(self.dataset.in_flight[slot])
            for slot in range(len(self.dataset.worker_pids))
            if self.dataset.worker_pids[slot] in pids and self.dataset.in_flight[slot] >= 0
        ]

    def _loader(self, indices: list[int]) -> torch.utils.data.DataLoader:
        # torch's DataLoader with batch_size=None: items are whole scans of mixed kinds, batched here (2D) or
        # slice-wise (3D); MONAI's DataLoader would only add collation and seeding, both unused.
        # in_order=False: a worker busy in a decoder that holds its GIL (OpenJPEG: ~140 ms per 1024-px image)
        # cannot hand over the items it has finished; the model takes the other workers' instead of waiting.
        # Rows are keyed by scan, so the order of arrival changes nothing in the outputs.
        init = functools.partial(worker_init, parent=os.getpid(), worker_pids=self.dataset.worker_pids)
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            sampler=indices,
            num_workers=self.workers,
            collate_fn=_identity,
            worker_init_fn=init if self.workers else None,
            prefetch_factor=max(2, 2 * self.batch_size // max(1, self.workers)) if self.workers else None,
            persistent_workers=False,
            in_order=False,
        )

    def _pass(self, indices: list[int], done: set[int], writer: _Writer) -> None:
        """One loader over ``indices``; raises RunStopped to stop, RuntimeError if a worker died."""
        scans = self.dataset.scans
        batch: list[dict[str, Any]] = []
        for slot in range(len(self.dataset.in_flight)):  # nothing of an earlier loader's workers is in flight
            self.dataset.in_flight[slot] = -1
        iterator = iter(self._loader(indices))
        try:
            for item in iterator:
                scan = scans[item["index"]]
                if "error" in item:
                    call = functools.partial(self.outputs.error_row, scan, item["error"], item["seconds"])
                    writer.submit(scan, call)
                    done.add(item["index"])
                elif scan.is_volume:
                    self._volume(scan, item, writer)
                    done.add(item["index"])
                else:
                    batch.append(item)
                    if len(batch) >= self.batch_size:
                        self._radiographs(batch, writer)
                        done.update(b["index"] for b in batch)
                        batch.clear()
                if self.stop.is_set():
                    raise RunStopped(self._stop_reason())
            self._radiographs(batch, writer)
            done.update(b["index"] for b in batch)
        finally:
            del iterator  # shuts the workers down

    # ---------------------------------------------------------------------------------------- forward
    def _radiographs(self, batch: list[dict[str, Any]], writer: _Writer) -> None:
        if not batch:
            return
        from pneumoseg.model_record import RADIOGRAPH

        scans = [self.dataset.scans[b["index"]] for b in batch]
        t0 = time.perf_counter()
        try:
            x = torch.stack([torch.as_tensor(b["image"]) for b in batch]).to(self.device)
            with torch.inference_mode():
                out = self.networks[RADIOGRAPH](x)
            seg, cls = torch.sigmoid(out.seg).cpu(), torch.sigmoid(out.cls).reshape(-1).cpu()
        except Exception as e:  # e.g. out of memory: these scans error, the run goes on
            if _worker_died(e):  # not the model's failure: the loader restarts, these scans are redone
                raise
            logger.exception("forward pass failed")
            for scan, b in zip(scans, batch):
                message = f"forward pass failed ({type(e).__name__})"
                writer.submit(scan, functools.partial(self.outputs.error_row, scan, message, b["seconds"]))
            return
        share = (time.perf_counter() - t0) / len(batch)
        for i, (scan, b) in enumerate(zip(scans, batch)):
            call = functools.partial(self.outputs.finish, scan, b, seg[i], float(cls[i]), b["seconds"] + share)
            writer.submit(scan, call)

    def _volume(self, scan: Scan, item: dict[str, Any], writer: _Writer) -> None:
        from pneumoseg.engine.inferers import DualOutputSliceInferer
        from pneumoseg.model_record import CT

        t0 = time.perf_counter()
        try:
            x = torch.as_tensor(item["image"])[None].to(self.device)
            with torch.inference_mode():
                out = DualOutputSliceInferer(roi_size=(-1, -1), sw_batch_size=self.batch_size)(x, self.networks[CT])
            seg, cls = torch.sigmoid(out.seg[0]).cpu(), float(torch.sigmoid(out.cls).reshape(-1)[0])
        except Exception as e:  # e.g. out of memory on a huge series
            if _worker_died(e):
                raise
            logger.exception("%s: forward pass failed", scan.source)
            message = f"forward pass failed ({type(e).__name__})"
            writer.submit(scan, functools.partial(self.outputs.error_row, scan, message, item["seconds"]))
            return
        seconds = item["seconds"] + time.perf_counter() - t0
        writer.submit(scan, functools.partial(self.outputs.finish, scan, item, seg, cls, seconds))

    def _bar(self, total: int) -> Any:
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, unit="scan", desc="pneumoseg infer", dynamic_ncols=True, file=sys.stderr)


class _Writer:
    """One writer thread: post-processing and file writing overlap the next forward pass (numpy, zlib, PIL
    and pydicom release the GIL for the heavy parts); a bounded queue of pending scans keeps memory flat."""

    def __init__(
        self,
        on_row: Callable[[Scan, dict[str, Any]], None],
        outputs: ScanOutputs,
        strict: bool,
        bar: Any,
        depth: int = 16,
    ) -> None:
        self.on_row, self.outputs, self.strict, self.bar, self.depth = on_row, outputs, strict, bar, depth
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pneumoseg-writer")
        self.pending: collections.deque[tuple[Scan, concurrent.futures.Future]] = collections.deque()
        self.rows = 0
        self.stopped = ""

    def submit(self, scan: Scan, call: Callable[[], dict[str, Any]]) -> None:
        self.pending.append((scan, self.executor.submit(call)))
        message = self.collect(self.depth)
        if message:
            raise RunStopped(message)

    def collect(self, limit: int) -> str:
        """Hand finished rows over until at most ``limit`` are pending; a message if --strict must stop."""
        while len(self.pending) > limit:
            # popped after its row is handed over: torch's SIGCHLD handler may raise anywhere in this thread
            scan, future = self.pending[0]
            try:
                row = future.result()
            except concurrent.futures.CancelledError:
                self.pending.popleft()
                continue
            except Exception as e:  # writing failed: the scan's error, not the run's
                logger.exception("%s: writing outputs failed", scan.source)
                message = f"{type(e).__name__} while writing the outputs: {stable_reason(str(e))}"
                row = self.outputs.error_row(scan, message, 0.0)
            self.on_row(scan, row)
            self.pending.popleft()
            self.rows += 1
            if self.rows % TRIM_EVERY == 0:
                release_freed_memory()
            if self.bar is not None:
                self.bar.update(1)
            if row["status"] == "error" and self.strict and not self.stopped:
                self.stopped = f"--strict: stopped at {scan.source}: {row['reason']}"
                return self.stopped
        return ""

    def close(self, cancel_pending: bool) -> None:
        """Finish (or, ``cancel_pending``, drop the not yet started) pending writes and end the thread."""
        if cancel_pending:
            for _, future in self.pending:
                future.cancel()
        self.collect(0)
        self.executor.shutdown(wait=True)
