"""One owner per output folder: an exclusive lock, the model guard (``run.json``), no stale temporaries.

* The lock (``fcntl.flock`` on ``OUTPUT_DIR/.pneumoseg-infer.lock``): a run takes it exclusively; a
  second run into the same folder is refused with a clear message instead of deleting the first one's
  temporaries. The shards of one sharded run share the folder (a shared lock, plus an exclusive lock per
  shard, so one shard cannot run twice); an unsharded run excludes them all.
* The model guard fails closed: ``run.json`` names the models whose results the folder holds; a run with
  another model is refused without ``--overwrite``, and so is a folder whose ``run.json`` is missing or
  unreadable while its records name another model.
* Temporaries (``.tmp-*``) left anywhere in the folder by a killed run are removed when a run starts
  alone in it (a shard that is not alone cleans only its own scans' folders, as it writes them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pneumoseg.infer.records import ScanRecords
from pneumoseg.infer.writers import atomic_write, remove_stale_temporaries
from pneumoseg.model_record import TrainedModel

__all__ = ["LOCK_NAME", "RUN_NAME", "OutputFolder", "OutputFolderBusy", "OutputFolderOfAnotherModel"]

LOCK_NAME = ".pneumoseg-infer.lock"
RUN_NAME = "run.json"


class OutputFolderBusy(RuntimeError):
    """Another run holds the output folder (or this shard of it)."""


class OutputFolderOfAnotherModel(FileExistsError):
    """The output folder holds results of a model that is not in this run."""


def _flock(fd: int, shared: bool) -> bool:
    """Try to lock ``fd`` without waiting; False if another process holds a conflicting lock."""
    import fcntl

    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class OutputFolder:
    """The output folder of a run, held from ``__enter__`` to ``__exit__``.

    Args:
        output_dir: OUTPUT_DIR (created if missing).
        num_shards, shard_id: the shard this run processes (1, 0: the whole folder).
    """

    def __init__(self, output_dir: str | os.PathLike, num_shards: int = 1, shard_id: int = 0) -> None:
        self.path = Path(output_dir)
        self.num_shards, self.shard_id = int(num_shards), int(shard_id)
        self.alone = False
        self._fds: list[int] = []

    def __enter__(self) -> OutputFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        folder_lock = self._open(LOCK_NAME)
        if _flock(folder_lock, shared=False):
            self.alone = True
        elif self.num_shards == 1 or not _flock(folder_lock, shared=True):
            self.close()
            raise OutputFolderBusy(
                f"{self.path} is in use by another pneumoseg infer run (it holds {self.path / LOCK_NAME}); "
                "wait for it to finish or choose another OUTPUT_DIR"
            )
        if self.num_shards > 1:
            name = f".pneumoseg-infer.shard-{self.shard_id:03d}-of-{self.num_shards:03d}.lock"
            if not _flock(self._open(name), shared=False):
                self.close()
                raise OutputFolderBusy(f"shard {self.shard_id} of {self.num_shards} is already running in {self.path}")
        if self.alone:
            remove_stale_temporaries(self.path, recursive=True)
            if self.num_shards > 1:  # let the other shards of this run in
                _flock(folder_lock, shared=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _open(self, name: str) -> int:
        fd = os.open(self.path / name, os.O_RDWR | os.O_CREAT, 0o644)
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        """Release the locks (closing the descriptors releases flock locks)."""
        while self._fds:
            os.close(self._fds.pop())

    # ---------------------------------------------------------------------------------------- models
    def _previous_fingerprints(self) -> set[str] | None:
        """The model fingerprints ``run.json`` names, or ``None`` if it is missing or unreadable."""
        try:
            value = json.loads((self.path / RUN_NAME).read_text())
            return {str(m["fingerprint"]) for m in value["models"].values()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def claim_for(self, models: Mapping[str, TrainedModel], records: ScanRecords, overwrite: bool) -> None:
        """Refuse (without ``overwrite``) a folder holding results of a model not in ``models``; then record
        ``models`` in ``run.json``.

        With ``run.json`` missing or unreadable the records themselves are read (fail closed: a deleted
        ``run.json`` must not let another model's results be mixed in)."""
        current = {m.fingerprint for m in models.values()}
        if not overwrite:
            previous = self._previous_fingerprints()
            where = RUN_NAME
            if previous is None:
                previous, where = records.fingerprints(), f"the records under {records.output_dir.name}/scans"
            foreign = sorted(previous - current)
            if foreign:
                raise OutputFolderOfAnotherModel(
                    f"{self.path} holds results of another model or preprocessing (fingerprint {', '.join(foreign)} "
                    f"in {where}; this run: {', '.join(sorted(current))}); use --overwrite or another OUTPUT_DIR"
                )
        run = {
            "models": {
                kind: {"fingerprint": m.fingerprint, "bundle": m.name, "version": m.version}
                for kind, m in sorted(models.items())
            }
        }
        atomic_write(self.path / RUN_NAME, lambda tmp: tmp.write_text(json.dumps(run, indent=1) + "\n"))
