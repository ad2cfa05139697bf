"""The scans of a run as a torch ``Dataset``: decode + preprocess one scan per item, in DataLoader workers.

Each scan is read by the project's readers (a radiograph, one frame of a multi-frame file, the files of
one series, a NIfTI or PNG) and fed through the inference chain its model's record describes
(:mod:`pneumoseg.data.transforms`: radiographs resized and percentile-scaled; volumes brought to the
record's orientation, windowed and resized in-plane). The chains are built here, before the workers
start, so that the main process can invert the very same transforms (MONAI matches a recorded operation
to the transform object that applied it).

Workers are the run's: they die with the main process (``prctl(PR_SET_PDEATHSIG)`` on Linux, a watcher
thread elsewhere), ignore SIGINT (the main process decides when to stop and finishes what is in flight),
and say which scan each is reading, so a worker that crashes costs that scan alone (:mod:`.pipeline`).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pneumoseg.data.transforms import (
    ct_inference_transforms,
    orientation_with_last,
    radiograph_inference_transforms,
    slice_orientation,
)
from pneumoseg.infer.discovery import Scan
from pneumoseg.model_record import CT, RADIOGRAPH, CTPreprocessing, ModelRecord, RadiographPreprocessing

__all__ = ["MIN_SIZE", "ScanDataset", "stable_reason", "worker_init"]

MIN_SIZE = 8  # smaller images (per axis) are reported as wrong dimensions, not fed to the model
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_PR_SET_PDEATHSIG = 1


def stable_reason(message: str, input_prefix: str = "") -> str:
    """An error message fit for a report: paths relative to INPUT_DIR, no object addresses (identical runs
    give identical rows), one line, bounded."""
    if input_prefix:
        message = message.replace(input_prefix, "")
    message = _ADDRESS.sub("", message).replace("\n", " ")
    return message[:1000]


def _display_uint8(image: np.ndarray, lo: float | None = None, hi: float | None = None, percentiles=(0.5, 99.5)):
    """Display values -> uint8 by the given range (default: the percentiles of the image)."""
    if lo is None or hi is None:
        # every 4th pixel per axis: plenty for a display window, 16x cheaper than the full image
        lo, hi = (float(v) for v in np.percentile(image[..., ::4, ::4], percentiles))
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return ((image - lo) * scale).clip(0, 255).astype(np.uint8)


# ============================================================================================ the workers


def _exit_with_parent(parent: int) -> None:
    """Make this process end when ``parent`` does: SIGKILL on parent death (Linux), else a watcher thread.

    Without it, workers of a killed run stay blocked on their result queue (whose other end the sibling
    workers keep open) forever, each holding its memory and shared-memory segments."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def worker_init(worker_id: int, parent: int, worker_pids: Any) -> None:
    """DataLoader ``worker_init_fn`` (with ``functools.partial(parent=os.getpid(), worker_pids=...)``)."""
    worker_pids[worker_id] = os.getpid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process stops the run after in-flight writes
    _exit_with_parent(parent)


# ============================================================================================ the dataset


class ScanDataset(torch.utils.data.Dataset):
    """Decode + preprocess one scan per item (runs in DataLoader workers).

    Item: ``{"index", "image": tensor [1, S, S] or [1, S, S, K] (model input), "image_meta" and
    "image_ops" (its MetaTensor's meta and applied operations, for inversion), "display": uint8 tensor
    [H, W] or [I, J, K] (overlay background), "headers": pydicom datasets of the DICOM sources without
    pixels (SEG; a series: in the volume's K order), "spacing", "spacing_missing", "affine", "shape",
    "warnings", "seconds"}``, or ``{"index", "error": message, "seconds"}`` when the scan cannot be read
    (the run goes on).

    Args:
        scans: the scans to read; ``index`` refers to this list.
        records: ``{image kind: model record}``: each scan is preprocessed as its kind's model was trained.
        need_headers: keep the DICOM headers (a SEG will be written).
        input_dir: INPUT_DIR, removed from error messages (paths in the report are relative to it).
        workers: DataLoader workers (sizes the shared table of what each worker is reading).
    """

    def __init__(
        self,
        scans: Sequence[Scan],
        records: Mapping[str, ModelRecord],
        need_headers: bool,
        input_dir: str = "",
        workers: int = 0,
    ) -> None:
        self.scans = list(scans)
        self.need_headers = need_headers
        self.input_prefix = os.path.join(os.fspath(input_dir), "") if input_dir else ""
        self.radiograph: RadiographPreprocessing | None = (
            records[RADIOGRAPH].radiograph if RADIOGRAPH in records else None
        )
        self.ct: CTPreprocessing | None = records[CT].ct if CT in records else None
        self._chains: dict[Any, Any] = {}
        if self.radiograph is not None:
            pp = self.radiograph
            self._chains[RADIOGRAPH] = radiograph_inference_transforms(
                pp.image_size, pp.lower_percentile, pp.upper_percentile, load=False
            )
        if self.ct is not None:  # one chain per orientation a volume can be brought to (slice_orientation)
            ct = self.ct
            for axcodes in {orientation_with_last(ct.orientation, code) for code in "RAS"}:
                self._chains[(CT, axcodes)] = ct_inference_transforms(ct.image_size, ct.window, axcodes, load=False)
        # which scan each worker is reading (-1: none) and the workers' pids: a worker that dies costs that
        # scan only. Shared memory, created before the workers start
        context = multiprocessing.get_context()
        self.in_flight = context.RawArray("q", [-1] * max(1, workers))
        self.worker_pids = context.RawArray("q", [0] * max(1, workers))
        self._nifti: Any = None

    def __len__(self) -> int:
        return len(self.scans)

    def chain(self, scan: Scan, affine: Any = None, shape: Sequence[int] = ()) -> Any:
        """The inference chain of ``scan`` (volumes: by their geometry, :func:`slice_orientation`)."""
        if not scan.is_volume:
            return self._chains[RADIOGRAPH]
        assert self.ct is not None
        return self._chains[(CT, slice_orientation(affine, shape, self.ct.orientation))]

    # ---------------------------------------------------------------------------------------- reading
    def _load(self, scan: Scan) -> tuple[Any, list[Any]]:
        """(image, SEG source headers: pydicom datasets without pixel data, ``[]`` if not needed)."""
        from pneumoseg.data.dicom import ImageReadError, read_dicom
        from pneumoseg.data.readers import LoadNifti, radiograph_from_dataset, read_image_file
        from pneumoseg.data.series import LoadDicomSeries, load_dicom_series

        headers: list[Any] = []
        if scan.kind == "radiograph":
            # one parse for the pixels and the SEG's header (a deflated file would be inflated twice)
            ds = read_dicom(scan.files[0])
            img = radiograph_from_dataset(ds, scan.files[0], scan.frame)
            if self.need_headers:
                del ds.PixelData  # the SEG needs no pixels, and they would be pickled to the main process
                headers = [ds]
        elif scan.kind == "image":
            img = read_image_file(scan.files[0])
        elif scan.kind == "series":
            loader = LoadDicomSeries(series_uid=scan.series_uid)
            series = loader.select(_group(scan.files), scan.source)
            img = load_dicom_series(series, where=scan.source, headers=headers if self.need_headers else None)
        else:
            if self._nifti is None:  # once per process: MONAI's LoadImage builds all its readers
                self._nifti = LoadNifti()
            img = self._nifti(scan.files[0])
        if not scan.is_volume:
            if img.dim() != 3 or img.shape[0] != 1 or min(img.shape[1:]) < MIN_SIZE:
                raise ImageReadError(
                    f"{scan.source}: expected a 2D image of at least {MIN_SIZE} px, got {tuple(img.shape[1:])}"
                )
        elif img.dim() != 4 or img.shape[0] != 1 or sorted(img.shape[1:])[1] < MIN_SIZE:
            raise ImageReadError(
                f"{scan.source}: expected a single-channel 3D volume [1, I, J, K] with two axes of at least "
                f"{MIN_SIZE} voxels, got {list(img.shape)}"
            )
        return img, headers

    def _warnings(self, scan: Scan, img: Any) -> list[str]:
        warnings = [str(w) for w in img.meta.get("series_warnings", [])]
        if scan.kind == "nifti" and 1 in tuple(img.shape[1:]):
            warnings.append("a single slice: processed as a one-slice volume")
        return warnings

    def __getitem__(self, index: int) -> dict[str, Any]:
        scan = self.scans[index]
        info = torch.utils.data.get_worker_info()
        slot = info.id if info is not None else 0
        self.in_flight[slot] = index
        start = time.perf_counter()
        try:
            return self._item(index, scan, start)
        except Exception as e:  # any failure is this scan's error row; the run goes on
            # paths relative to INPUT_DIR, as everywhere in the report (rows must not depend on its spelling)
            message = stable_reason(str(e), self.input_prefix)
            if scan.source not in message:
                message = f"{scan.source}: {message}"
            return {"index": index, "error": f"{type(e).__name__}: {message}", "seconds": time.perf_counter() - start}
        finally:
            self.in_flight[slot] = -1

    def _item(self, index: int, scan: Scan, start: float) -> dict[str, Any]:
        img, headers = self._load(scan)
        meta = img.meta
        spacing = [float(s) for s in np.asarray(meta.get("spacing", [1.0] * (img.dim() - 1)))]
        affine = np.asarray(img.affine, dtype=np.float64)
        shape = list(img.shape[1:])
        array = img.as_tensor()[0].numpy()
        if scan.is_volume:
            assert self.ct is not None
            display = _display_uint8(array, *self.ct.window)
        else:
            assert self.radiograph is not None
            display = _display_uint8(
                array, percentiles=(self.radiograph.lower_percentile, self.radiograph.upper_percentile)
            )
        warnings = self._warnings(scan, img)
        image = self.chain(scan, affine, shape)({"image": img})["image"]
        return {
            "index": index,
            # the MetaTensor in parts: every tensor crosses to the main process as a shared-memory file of its
            # own (a round trip to torch_shm_manager), and its meta holds two 4x4 affines
            "image": image.as_tensor(),
            "image_meta": {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in image.meta.items()},
            "image_ops": list(image.applied_operations),
            # a tensor travels to the main process in shared memory; a numpy array would be pickled through
            # the DataLoader's pipe (1 MB per 1024-px image, 64 KB at a time)
            "display": torch.from_numpy(display),
            "headers": headers,
            "slice_sop_uids": list(meta.get("slice_sop_uids", [])),
            "spacing": spacing,
            "spacing_missing": bool(meta.get("spacing_missing", False)),
            "affine": affine,
            "shape": shape,
            "warnings": warnings,
            "seconds": time.perf_counter() - start,
        }


def _group(files: Sequence[str]) -> list[Any]:
    """The series among ``files`` (the scan's files as discovery grouped them; localizers already out)."""
    from pathlib import Path

    from pneumoseg.data.series import group_series

    return group_series([Path(f) for f in files])
