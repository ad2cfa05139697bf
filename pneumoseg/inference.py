"""Batch inference on a folder of scans: ``pneumoseg infer INPUT_DIR OUTPUT_DIR --bundle DIR``.

One implementation behind the CLI and the bundle (``{"_target_": "pneumoseg.inference.BatchInferenceRunner",
...}`` then ``"$@runner.run()"``)::

    discover (pneumoseg.discovery)  ->  shard  ->  skip scans whose record verifies
        -> DataLoader workers: decode + preprocess (radiograph / CT chains of pneumoseg.data.transforms)
        -> main process: model (loaded once), radiographs batched, CT slices batched (DualOutputSliceInferer)
        -> writer thread: post-processing (bundle thresholds), inversion to the source geometry, metrics,
           mask / SEG / overlay files (atomic), then the per-scan record (written last)
    -> report rows rebuilt from the records, sorted by scan_id -> report.csv / report.json

Resume: a scan is done when ``OUTPUT_DIR/scans/<scan_id>/record.json`` exists, was made by the same model
and post-processing from the same input files (relative path, size, mtime), lists every requested format
and every listed file still has its recorded size and sha256. Anything else is redone, so a run killed at
any point (even SIGKILL) and started again ends with the outputs and report rows of an uninterrupted run.
``--overwrite`` redoes every scan.
Outputs of a different model in ``OUTPUT_DIR`` are never mixed in: the run refuses without ``--overwrite``.

Image-level probability: radiographs: ``sigmoid`` of the classification head; CT: the maximum over the
axial slices (a pneumothorax on any slice makes the volume positive), as ``DualOutputSliceInferer``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumoseg.discovery import Scan, discover_scans, shard_scans
from pneumoseg.report import (
    find_shard_reports,
    merge_reports,
    shard_report_name,
    summarize,
    summary_line,
    write_report,
)
from pneumoseg.runtime import release_freed_memory, retain_freed_memory
from pneumoseg.writers import (
    atomic_write,
    file_digest,
    remove_stale_temporaries,
    write_dicom_seg,
    write_mask_nifti,
    write_mask_png,
    write_overlay_png,
)

__all__ = [
    "FORMATS",
    "BundleModel",
    "load_bundle_model",
    "select_device",
    "BatchInferenceRunner",
    "exit_on_error",
    "add_subcommand",
    "run",
]

logger = logging.getLogger(__name__)

FORMATS = ("nifti", "seg", "png", "overlay")
"""``nifti``: mask of volumes / NIfTI inputs; ``png``: mask of radiographs; ``seg``: DICOM SEG (DICOM
inputs); ``overlay``: preview PNG."""
RECORD_NAME = "record.json"
RUN_NAME = "run.json"
SCANS_DIR = "scans"
RECORD_VERSION = 1
MIN_SIZE = 8  # smaller images (per axis) are reported as wrong dimensions, not fed to the model
# scans between returns of freed memory to the OS (pneumoseg.runtime.release_freed_memory). Rare: each return
# makes the next forward pass fault its activations in again (every 32 scans cost 5% scans/s), and the
# resident size measured flat without any (100 vs 400 scans, benchmarks/batch_infer.py)
TRIM_EVERY = 1024
PERCENTILES = (0.5, 99.5)  # display window of radiograph overlays (same as the preprocessing)


# ================================================================================================ the model


@dataclass
class BundleModel:
    """What inference needs from a bundle: the network (eval mode, on its device) and its settings."""

    network: nn.Module
    image_size: int
    ct_image_size: int
    params_file: str | None
    name: str
    version: str
    fingerprint: str  # sha256 of the weights + post-processing + image size: identifies the outputs


def _sha256(path: Path) -> str:
    return file_digest(path)["sha256"] if path.is_file() else ""


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict from ``torch.load`` output: the dict itself, ``{"model": sd}`` (MONAI
    checkpoints) or ``{"state_dict": sd}``; a DDP ``module.`` prefix is stripped."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict (or {{'model': state_dict}})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_bundle_model(
    bundle_root: str | os.PathLike,
    device: torch.device | str = "cpu",
    config_file: str = "configs/inference.json",
    network: nn.Module | None = None,
    network_def: nn.Module | None = None,
    image_size: int | None = None,
) -> BundleModel:
    """Build the network from the bundle config's ``network_def`` (``monai.bundle.ConfigParser``) and load
    ``models/model.pt`` (``torch.load(weights_only=True)``); read ``image_size`` (and ``ct_image_size``,
    default ``image_size``) from the config, the
    name/version from ``configs/metadata.json`` and the thresholds file ``configs/postprocessing.json``.

    ``network``: use this module (already trained / initialised) instead of ``network_def`` + weights.
    ``network_def`` / ``image_size``: the architecture and model size already parsed by the caller (e.g.
    ``configs/inference.json`` run through ``monai.bundle``, command-line overrides included) instead of
    re-reading them from ``config_file``; the bundle's weights are loaded into ``network_def``.
    """
    from monai.bundle import ConfigParser

    root = Path(bundle_root)
    config_path = root / config_file
    if not config_path.is_file():
        raise FileNotFoundError(f"bundle config not found: {config_path}")
    parser = ConfigParser()
    parser.read_config(str(config_path))
    parser["bundle_root"] = str(root)
    image_size = int(image_size if image_size is not None else parser.get("image_size", 512))
    # optional: CT slices at another size than radiographs (inference.json uses image_size for both)
    ct_image_size = int(parser.get("ct_image_size", image_size))
    meta_path = root / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    weights = root / "models" / "model.pt"
    if network is None:
        if network_def is not None:
            network = network_def
        elif "network_def" not in parser:
            raise KeyError(f"{config_path}: no 'network_def'")
        else:
            network = parser.get_parsed_content("network_def")
        if not weights.is_file():
            raise FileNotFoundError(f"bundle weights not found: {weights} (train the bundle first)")
        state = _state_dict(torch.load(weights, map_location="cpu", weights_only=True), weights)
        try:
            network.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{weights} does not fit network_def of {config_path}: {e}") from e
        weight_hash = _sha256(weights)
    else:
        h = hashlib.sha256()
        for k, v in sorted(network.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        weight_hash = h.hexdigest()
    params_file = root / "configs" / "postprocessing.json"
    from pneumoseg.postprocessing import load_postprocessing_params

    params = load_postprocessing_params(params_file if params_file.is_file() else None)
    fingerprint = hashlib.sha256(
        json.dumps([weight_hash, repr(params), image_size, ct_image_size]).encode()
    ).hexdigest()[:16]
    network = network.to(device).eval()
    return BundleModel(
        network=network,
        image_size=image_size,
        ct_image_size=ct_image_size,
        params_file=str(params_file) if params_file.is_file() else None,
        name=str(meta.get("name", root.name)),
        version=str(meta.get("version", "0")),
        fingerprint=fingerprint,
    )


def select_device(device: str = "auto") -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` if CUDA is available (torchrun sets LOCAL_RANK), else CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available")
    return dev


def _precision(device: torch.device, fp32: bool) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, channels_last): bf16 + channels_last on CPUs with native bf16
    (AVX512-BF16 / AMX; emulated bf16 would be slower than fp32), fp16 AMP on GPUs."""
    if fp32:
        return None, False
    if device.type == "cuda":
        return torch.float16, True
    native_bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()) or bool(
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return (torch.bfloat16, True) if native_bf16 else (None, False)


class _PrecisionWrapper(nn.Module):
    """Network call under autocast / channels_last, with float32 outputs (downstream maths in fp32)."""

    def __init__(self, network: nn.Module, device: torch.device, dtype: torch.dtype | None, channels_last: bool):
        super().__init__()
        self.network = network
        self.device_type = device.type
        self.dtype = dtype
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> Any:
        from pneumoseg.networks import SCSEUNetOutput

        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(self.device_type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        with ctx:
            out = self.network(x)
        return SCSEUNetOutput(out.seg.float(), out.cls.float())


# ============================================================================================ loading (workers)


def _identity(item: Any) -> Any:
    return item


def _display_uint8(image: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Display values -> uint8 by the given range (default: the 0.5 / 99.5 percentiles)."""
    if lo is None or hi is None:
        # every 4th pixel per axis: plenty for a display window, 16x cheaper than the full image
        lo, hi = (float(v) for v in np.percentile(image[..., ::4, ::4], PERCENTILES))
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return ((image - lo) * scale).clip(0, 255).astype(np.uint8)


class ScanDataset(torch.utils.data.Dataset):
    """Decode + preprocess one scan per item (runs in DataLoader workers).

    Item: ``{"index", "image": tensor [1, S, S] or [1, S, S, K] (model input), "image_meta" and
    "image_ops" (its MetaTensor's meta and applied operations, for inversion), "display": uint8 tensor
    [H, W] or [I, J, K] (overlay background), "headers": pydicom datasets of the DICOM sources (SEG),
    "spacing", "affine", "shape", "seconds"}``, or
    ``{"index", "error": message, "seconds"}`` when the scan cannot be read (the run goes on).
    """

    def __init__(
        self,
        scans: Sequence[Scan],
        image_size: int,
        need_headers: bool,
        input_dir: str = "",
        ct_image_size: int | None = None,
    ) -> None:
        from pneumoseg.data.transforms import ct_inference_transforms, radiograph_inference_transforms

        self.scans = list(scans)
        self.need_headers = need_headers
        self._nifti: Callable | None = None
        self.input_prefix = os.path.join(os.fspath(input_dir), "") if input_dir else ""
        # the project's chains without their first step (the loader): the scan's reader is chosen here
        # (a frame of a multi-frame file, the files of one series), the rest stays MONAI and invertible
        from monai.transforms import Compose

        self.chain_2d = Compose(list(radiograph_inference_transforms(image_size).transforms[1:]))
        self.chain_3d = Compose(list(ct_inference_transforms(ct_image_size or image_size).transforms[1:]))

    def __len__(self) -> int:
        return len(self.scans)

    def _load(self, scan: Scan) -> tuple[Any, list[Any]]:
        """(image, SEG source headers: pydicom datasets without pixel data, ``[]`` if not needed)."""
        import pydicom

        from pneumoseg.data.readers import (
            ImageReadError,
            LoadNifti,
            LoadRadiograph,
            radiograph_from_dataset,
            read_dicom_header,
        )
        from pneumoseg.data.series import LoadDicomSeries

        headers: list[Any] = []
        if scan.kind in ("radiograph", "image"):
            if scan.kind == "radiograph":
                # one parse for the pixels and the SEG's header (a deflated file would be inflated twice)
                ds = read_dicom_header(scan.files[0])
                img = radiograph_from_dataset(ds, scan.files[0], scan.frame)
                if self.need_headers:
                    del ds.PixelData  # the SEG needs no pixels, and they would be pickled to the main process
                    headers = [ds]
            else:
                img = LoadRadiograph(frame=scan.frame)(scan.files[0])
            if img.dim() != 3 or img.shape[0] != 1 or min(img.shape[1:]) < MIN_SIZE:
                raise ImageReadError(
                    f"{scan.source}: expected a 2D image of at least {MIN_SIZE} px, got {tuple(img.shape[1:])}"
                )
            return img, headers
        if scan.kind == "series":
            img = LoadDicomSeries()(scan.files)
            if self.need_headers:
                headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in self._slice_order(scan)]
        else:
            if self._nifti is None:  # once per process: MONAI's LoadImage builds all its readers
                self._nifti = LoadNifti()
            img = self._nifti(scan.files[0])
        if img.dim() != 4 or img.shape[0] != 1 or min(img.shape[1:3]) < MIN_SIZE:
            raise ImageReadError(
                f"{scan.source}: expected a single-channel 3D volume [1, I, J, K] with I, J >= {MIN_SIZE}, "
                f"got {list(img.shape)}"
            )
        return img, headers

    @staticmethod
    def _slice_order(scan: Scan) -> list[str]:
        """The series' files in the order of the volume's K axis: as the series reader sorted them (along the
        normal, duplicates dropped), from the public ``find_dicom_series`` on the series' folder."""
        from pneumoseg.data.series import find_dicom_series

        parent = os.path.commonpath([os.path.dirname(f) for f in scan.files])
        found = [s for s in find_dicom_series(parent) if s.series_uid == scan.series_uid and s.error is None]
        return [os.fspath(f) for f in found[0].files] if found else list(scan.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scan = self.scans[index]
        start = time.perf_counter()
        try:
            img, headers = self._load(scan)
            meta = img.meta
            spacing = [float(s) for s in np.asarray(meta.get("spacing", [1.0] * (img.dim() - 1)))]
            spacing_missing = bool(meta.get("spacing_missing", False))
            affine = np.asarray(img.affine, dtype=np.float64)
            shape = list(img.shape[1:])
            array = img.as_tensor()[0].numpy()
            if scan.is_volume:
                from pneumoseg.data.transforms import LUNG_WINDOW

                display = _display_uint8(array, *LUNG_WINDOW)
            else:
                display = _display_uint8(array)
            # a tensor travels to the main process in shared memory; a numpy array would be pickled
            # through the DataLoader's pipe (1 MB per 1024-px image, 64 KB at a time)
            display = torch.from_numpy(display)
            warnings = [str(w) for w in meta.get("series_warnings", [])]
            image = (self.chain_3d if scan.is_volume else self.chain_2d)({"image": img})["image"]
            return {
                "index": index,
                # the MetaTensor in parts: every tensor crosses to the main process as a shared-memory file
                # of its own (a round trip to torch_shm_manager), and its meta holds two 4x4 affines
                "image": image.as_tensor(),
                "image_meta": {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in image.meta.items()},
                "image_ops": list(image.applied_operations),
                "display": display,
                "headers": headers,
                "spacing": spacing,
                "spacing_missing": spacing_missing,
                "affine": affine,
                "shape": shape,
                "warnings": warnings,
                "seconds": time.perf_counter() - start,
            }
        except Exception as e:  # any failure is this scan's error row; the run goes on
            # paths relative to INPUT_DIR, as everywhere in the report (rows must not depend on its spelling)
            message = str(e).replace(self.input_prefix, "") if self.input_prefix else str(e)
            if scan.source not in message:
                message = f"{scan.source}: {message}"
            return {"index": index, "error": f"{type(e).__name__}: {message}", "seconds": time.perf_counter() - start}


# ================================================================================================ the runner


def _quiet_optional_codecs() -> None:
    """Silence MONAI's notice that the optional GPU codec nvImageCodec is absent (printed for every reader
    it builds, also in each worker): pydicom's own decoders are what this pipeline uses, on purpose."""
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


def _parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    items = [f.strip().lower() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    unknown = sorted(set(items) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown output format(s) {unknown}; choose from {','.join(FORMATS)}")
    return tuple(f for f in FORMATS if f in items)


def _distributed_shard() -> tuple[int, int] | None:
    """(num_shards, shard_id) from torchrun's WORLD_SIZE / RANK, if set."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        return world, int(os.environ.get("RANK", "0") or 0)
    return None


class BatchInferenceRunner:
    """Segment every scan under ``input_dir`` into ``output_dir``; :meth:`run` returns the exit code.

    All arguments are JSON-friendly, so a bundle config can build it with ``_target_``. A program that
    owns its process should call :func:`pneumoseg.runtime.retain_freed_memory` first, as ``pneumoseg infer``
    and the bundle's ``inference.json`` do (on CPU, forward passes ~50% faster; process-wide, hence not
    done here):

    Args:
        bundle_root: bundle folder (``configs/inference.json`` ``network_def`` + ``image_size``,
            ``models/model.pt``, ``configs/postprocessing.json``, ``configs/metadata.json``).
        input_dir: folder of scans (searched recursively; never modified).
        output_dir: where ``scans/<scan_id>/...``, ``report.csv`` and ``report.json`` go.
        formats: comma-separated subset of ``nifti,seg,png,overlay`` (or a list).
        device: ``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda:N``.
        batch_size: radiographs per forward pass; CT slices per forward pass.
        workers: DataLoader worker processes decoding / preprocessing (0: in the main process).
        fp32: force full precision (default: bf16 autocast + channels_last on CPUs with native bf16,
            fp16 AMP on GPUs).
        overwrite: redo every scan, replacing existing outputs (default: keep verified outputs, refuse
            outputs of another model).
        strict: stop at the first scan that errors (exit code 1).
        chest_only: skip scans whose header is not a chest / not a trained modality (default: warn only).
        num_shards, shard_id: process every ``num_shards``-th scan starting at ``shard_id`` (``None``:
            from torchrun's WORLD_SIZE / RANK, else 1 / 0); the shards' reports merge automatically when
            the last one finishes in the same ``output_dir``.
        progress: show a tqdm progress bar (scans/s, ETA).
        config_file: bundle config holding ``network_def`` / ``image_size``, relative to ``bundle_root``.
        network: an ``nn.Module`` to use instead of the bundle's ``network_def`` + weights (Python API).
        network_def, image_size: architecture (untrained; the bundle's ``models/model.pt`` is loaded into
            it) and model input size, as parsed by ``configs/inference.json`` with its overrides; ``None``:
            read from ``config_file``.
    """

    def __init__(
        self,
        bundle_root: str,
        input_dir: str,
        output_dir: str,
        formats: str | Sequence[str] = "nifti,seg,png,overlay",
        device: str = "auto",
        batch_size: int = 8,
        workers: int = 2,
        fp32: bool = False,
        overwrite: bool = False,
        strict: bool = False,
        chest_only: bool = False,
        num_shards: int | None = None,
        shard_id: int | None = None,
        progress: bool = True,
        config_file: str = "configs/inference.json",
        network: nn.Module | None = None,
        network_def: nn.Module | None = None,
        image_size: int | None = None,
    ) -> None:
        self.bundle_root = Path(bundle_root)
        self.input_dir = Path(input_dir)
        self.output_dir = Path(output_dir)
        self.formats = _parse_formats(formats)
        self.device = select_device(device)
        self.batch_size = max(1, int(batch_size))
        self.workers = max(0, int(workers))
        self.fp32 = bool(fp32)
        self.overwrite = bool(overwrite)
        self.strict = bool(strict)
        self.chest_only = bool(chest_only)
        if num_shards is None and shard_id is None:
            num_shards, shard_id = _distributed_shard() or (1, 0)
        self.num_shards = int(num_shards or 1)
        self.shard_id = int(shard_id or 0)
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id {self.shard_id} not in [0, {self.num_shards})")
        self.progress = progress
        self.config_file = config_file
        self._network = network
        self._network_def = network_def
        self._image_size = image_size
        self.model: BundleModel | None = None

    # ------------------------------------------------------------------------------------------ records
    def scan_dir(self, scan: Scan) -> Path:
        return self.output_dir / SCANS_DIR / scan.scan_id

    def _formats_for(self, scan: Scan) -> tuple[str, ...]:
        """The requested formats that apply to ``scan`` (mask PNG for 2D, NIfTI for volumes, SEG for DICOM)."""
        out = []
        for f in self.formats:
            if f == "png" and scan.is_volume or f == "nifti" and not scan.is_volume:
                continue
            if f == "seg" and scan.kind not in ("radiograph", "series"):
                continue
            out.append(f)
        return tuple(out)

    def _load_record(self, scan: Scan) -> dict[str, Any] | None:
        """The scan's record if it is complete and verified for this model and these formats, else None."""
        path = self.scan_dir(scan) / RECORD_NAME
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        assert self.model is not None
        if (
            record.get("version") != RECORD_VERSION
            or record.get("fingerprint") != self.model.fingerprint
            or record.get("row", {}).get("status") != "ok"
            or not set(self._formats_for(scan)) <= set(record.get("formats", []))
            or record.get("inputs") != self._input_signature(scan)
        ):
            return None
        for name, digest in record.get("outputs", {}).items():
            file = self.scan_dir(scan) / name
            try:
                if file.stat().st_size != digest["size"] or file_digest(file)["sha256"] != digest["sha256"]:
                    return None
            except OSError:
                return None
        return record

    def _input_signature(self, scan: Scan) -> list[list[Any]]:
        """``[[path relative to INPUT_DIR, size, mtime_ns], ...]`` of the scan's files: a record made from
        other or changed inputs (same relative path, e.g. another INPUT_DIR into the same OUTPUT_DIR) is
        not reused."""
        signature = []
        for f in scan.files:
            try:
                st = os.stat(f)
                signature.append([os.path.relpath(f, self.input_dir), st.st_size, st.st_mtime_ns])
            except OSError:
                signature.append([os.path.relpath(f, self.input_dir), -1, -1])
        return signature

    def _write_record(self, scan: Scan, row: dict[str, Any], outputs: Sequence[Path], formats: Sequence[str]) -> None:
        folder = self.scan_dir(scan)
        assert self.model is not None
        record = {
            "version": RECORD_VERSION,
            "fingerprint": self.model.fingerprint,
            "formats": list(formats),
            "inputs": self._input_signature(scan),
            "row": row,
            "outputs": {p.name: file_digest(p) for p in outputs},
        }
        atomic_write(folder / RECORD_NAME, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))

    def _check_run_file(self) -> None:
        """Refuse (without ``overwrite``) an output folder holding another model's results."""
        assert self.model is not None
        path = self.output_dir / RUN_NAME
        current = {"fingerprint": self.model.fingerprint, "bundle": self.model.name, "version": self.model.version}
        if path.is_file() and not self.overwrite:
            try:
                previous = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                previous = {}
            if previous.get("fingerprint") not in (None, current["fingerprint"]):
                raise FileExistsError(
                    f"{self.output_dir} holds results of another model or post-processing "
                    f"({previous.get('bundle')} {previous.get('version')}, fingerprint {previous.get('fingerprint')} "
                    f"!= {current['fingerprint']}); use --overwrite or another OUTPUT_DIR"
                )
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(current, indent=1) + "\n"))

    # ------------------------------------------------------------------------------------------- rows
    def _base_row(self, scan: Scan) -> dict[str, Any]:
        return {
            "scan_id": scan.scan_id,
            "input": scan.source,
            "kind": scan.kind,
            "series_uid": scan.series_uid,
            "modality": scan.modality,
            "body_part": scan.body_part,
            "status": scan.status,
            "reason": scan.reason,
            "warnings": "; ".join(scan.warnings),
        }

    def _error_row(self, scan: Scan, message: str, seconds: float) -> dict[str, Any]:
        return {**self._base_row(scan), "status": "error", "reason": message, "seconds": round(seconds, 3)}

    # ----------------------------------------------------------------------------------------- finish
    def _finish(self, scan: Scan, item: dict[str, Any], seg_prob: torch.Tensor, cls_prob: float, seconds: float):
        """Post-process, invert to the source geometry, measure, write outputs and the record; the row."""
        from scipy import ndimage

        from pneumoseg.data.transforms import invert_prediction_transforms, invert_radiograph_mask

        start = time.perf_counter()
        assert self.model is not None
        mask_small = self._postprocess(seg_prob, cls_prob)
        from monai.data import MetaTensor

        image = MetaTensor(item["image"], meta=item["image_meta"], applied_operations=item["image_ops"])
        chain = self._dataset.chain_3d if scan.is_volume else self._dataset.chain_2d
        mask = None
        if not bool(mask_small.any()):  # most scans: the inverse of an empty mask is empty, ~5 ms saved
            mask = np.zeros(item["shape"], dtype=bool)
        elif not scan.is_volume:
            mask = invert_radiograph_mask(mask_small, image, threshold=0.5)
        if mask is None:
            inverted = invert_prediction_transforms(chain, sigmoid=False, threshold=0.5)(
                {"image": image, "pred": MetaTensor(mask_small, meta=dict(image.meta))}
            )["pred"]
            mask = torch.as_tensor(inverted)[0].cpu().numpy() > 0.5
        if list(mask.shape) != list(item["shape"]):
            raise RuntimeError(f"{scan.source}: inverted mask {mask.shape} != source {item['shape']}")
        spacing = item["spacing"]
        n = int(mask.sum())
        structure = np.ones((3,) * mask.ndim, bool)
        components = int(ndimage.label(mask, structure=structure)[1]) if n else 0
        warnings = list(scan.warnings) + list(item.get("warnings", []))
        row = {
            **self._base_row(scan),
            "probability": round(float(cls_prob), 6),
            "positive": "yes" if n > 0 else "no",
            "mask_pixels": n,
            "components": components,
            "status": "ok",
        }
        if scan.is_volume:
            row["volume_ml"] = round(n * float(np.prod(spacing)) / 1000.0, 3)
        elif item["spacing_missing"]:
            seg_note = "; SEG written with 1 mm" if "seg" in self._formats_for(scan) else ""
            warnings.append(f"no pixel spacing: area_mm2 not reported{seg_note}")
        else:
            row["area_mm2"] = round(n * spacing[0] * spacing[1], 2)
        folder = self.scan_dir(scan)
        remove_stale_temporaries(folder)
        formats = self._formats_for(scan)
        outputs: list[Path] = []
        for fmt in formats:
            if fmt == "png":
                outputs.append(write_mask_png(folder / "mask.png", mask))
                row["mask"] = self._rel(outputs[-1])
            elif fmt == "nifti":
                outputs.append(write_mask_nifti(folder / "mask.nii.gz", mask, item["affine"]))
                row["mask"] = self._rel(outputs[-1])
            elif fmt == "seg":
                if scan.is_volume:
                    frames, headers = self._seg_frames(mask, item)
                else:
                    frames, headers = mask[None], item["headers"]
                outputs.append(
                    write_dicom_seg(
                        folder / "seg.dcm",
                        headers,
                        frames,
                        self.model.name,
                        self.model.version,
                        uid_seed=f"{scan.scan_id}|{self.model.fingerprint}",
                        source_frame=scan.frame,
                    )
                )
                row["seg"] = self._rel(outputs[-1])
            elif fmt == "overlay":
                background, overlay_mask, caption = self._overlay_view(scan, item["display"].numpy(), mask)
                outputs.append(write_overlay_png(folder / "overlay.png", background, overlay_mask, cls_prob, caption))
                row["overlay"] = self._rel(outputs[-1])
        row["warnings"] = "; ".join(warnings)
        row["seconds"] = round(seconds + time.perf_counter() - start, 3)
        self._write_record(scan, row, outputs, formats)
        return row

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.output_dir).as_posix()

    @staticmethod
    def _seg_frames(mask: np.ndarray, item: dict[str, Any]) -> tuple[np.ndarray, list[Any]]:
        """Volume mask ``[I, J, K]`` -> SEG frames ``[K', Rows, Columns]`` aligned with the source slices.

        ``item["headers"]`` are in the reader's slice order (:meth:`ScanDataset._slice_order`): layer k is on
        ``headers[k]``. If their count differs (should not happen), each layer takes the header nearest to
        its position (affine origin of the layer vs. ImagePositionPatient). Returns frames and headers.
        """
        headers = item["headers"]
        frames = np.ascontiguousarray(mask.transpose(2, 1, 0))  # [I, J, K] -> [K, J = Rows, I = Columns]
        if len(headers) == mask.shape[2]:
            return frames, list(headers)
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ item["affine"]  # RAS -> LPS (DICOM patient frame)
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
        chosen = []
        for k in range(mask.shape[2]):
            origin = (lps @ np.array([0.0, 0.0, k, 1.0]))[:3]
            chosen.append(int(np.argmin(np.linalg.norm(positions - origin, axis=1))))
        return frames, [headers[i] for i in chosen]

    @staticmethod
    def _overlay_view(scan: Scan, display: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
        """2D: as is. Volumes: the axial slice with the largest mask area (the middle one if empty),
        transposed to ``[J, I]`` so that it looks like the DICOM slice (rows = J)."""
        if not scan.is_volume:
            return display, mask, ""
        areas = mask.sum(axis=(0, 1))
        k = int(np.argmax(areas)) if areas.max() > 0 else mask.shape[2] // 2
        return display[:, :, k].T, mask[:, :, k].T, f"slice {k + 1}/{mask.shape[2]}"

    # ---------------------------------------------------------------------------------------- forward
    def _forward_2d(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([torch.as_tensor(i).as_subclass(torch.Tensor) for i in images]).to(self.device)
        with torch.inference_mode():
            out = self._wrapped(x)
        return torch.sigmoid(out.seg).cpu(), torch.sigmoid(out.cls).reshape(-1).cpu()

    def _forward_3d(self, volume: torch.Tensor) -> tuple[torch.Tensor, float]:
        from pneumoseg.workflows import DualOutputSliceInferer

        x = torch.as_tensor(volume).as_subclass(torch.Tensor)[None].to(self.device)
        with torch.inference_mode():
            out = DualOutputSliceInferer(roi_size=(-1, -1), sw_batch_size=self.batch_size)(x, self._wrapped)
        return torch.sigmoid(out.seg[0]).cpu(), float(torch.sigmoid(out.cls).reshape(-1)[0])

    # -------------------------------------------------------------------------------------------- run
    def run(self) -> int:
        """Process the shard; write records and the report; 0 if no scan errored, 1 otherwise."""
        started = time.perf_counter()
        _quiet_optional_codecs()
        if not self.input_dir.is_dir():
            raise FileNotFoundError(f"input folder not found: {self.input_dir}")
        if self.output_dir.resolve().is_relative_to(self.input_dir.resolve()):
            # the outputs would be found as inputs by the next run
            raise ValueError(f"OUTPUT_DIR {self.output_dir} must not be inside INPUT_DIR {self.input_dir}")
        if self.model is None:
            self.model = load_bundle_model(
                self.bundle_root, self.device, self.config_file, self._network, self._network_def, self._image_size
            )
        all_scans = discover_scans(self.input_dir, chest_only=self.chest_only)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._check_run_file()
        if not all_scans:
            print(f"pneumoseg infer: no files found in {self.input_dir}", file=sys.stderr)
        scans = shard_scans(all_scans, self.num_shards, self.shard_id)

        rows: dict[str, dict[str, Any]] = {}
        todo: list[Scan] = []
        for scan in scans:
            if scan.status != "pending":
                rows[scan.scan_id] = self._base_row(scan)
                continue
            record = None if self.overwrite else self._load_record(scan)
            if record is not None:
                rows[scan.scan_id] = record["row"]
            else:
                todo.append(scan)
        reused = len([s for s in scans if s.status == "pending"]) - len(todo)
        if reused:
            logger.info("%d scan(s) already done (verified records), %d to process", reused, len(todo))
        broken = next((s for s in scans if s.status == "error"), None)
        if self.strict and broken is not None:  # unreadable at discovery: stop before any work
            stopped = f"--strict: stopped at {broken.source}: {broken.reason}"
            print(stopped, file=sys.stderr)
            todo = []
        else:
            stopped = self._process(todo, rows)
        elapsed = time.perf_counter() - started
        summary = summarize(list(rows.values()), elapsed, len(todo))
        summary["reused"] = reused
        summary["model"] = self.model.fingerprint
        if stopped:
            summary["stopped_early"] = stopped
        if self.num_shards == 1:
            write_report(self.output_dir, rows.values(), summary)
            print(summary_line(summary) + f"; report: {self.output_dir / 'report.csv'}")
        else:
            name = shard_report_name(self.shard_id, self.num_shards)
            write_report(self.output_dir, rows.values(), summary, name=name)
            print(f"shard {self.shard_id}/{self.num_shards}: " + summary_line(summary))
            if len(find_shard_reports([self.output_dir], self.num_shards)) == self.num_shards:
                try:
                    _, merged = merge_reports(self.output_dir, num_shards=self.num_shards)
                    print("all shards done: " + summary_line(merged) + f"; report: {self.output_dir / 'report.csv'}")
                except Exception as e:  # another rank merging at the same moment, or a stale shard report
                    logger.warning("could not merge shard reports yet (%s); run --merge-reports", e)
        return 1 if any(r.get("status") == "error" for r in rows.values()) else 0

    def _process(self, todo: list[Scan], rows: dict[str, dict[str, Any]]) -> str:
        """Run the model over ``todo``, filling ``rows``; returns a message if stopped early (strict)."""
        if not todo:
            return ""
        assert self.model is not None
        dtype, channels_last = _precision(self.device, self.fp32)
        network = self.model.network
        if channels_last:
            network = network.to(memory_format=torch.channels_last)
        from pneumoseg.postprocessing import DualOutputPostprocess

        self._postprocess = DualOutputPostprocess(params_file=self.model.params_file)
        self._wrapped = _PrecisionWrapper(network, self.device, dtype, channels_last)
        self._dataset = ScanDataset(
            todo,
            self.model.image_size,
            need_headers="seg" in self.formats,
            input_dir=os.fspath(self.input_dir),
            ct_image_size=self.model.ct_image_size,
        )
        # torch's DataLoader with batch_size=None: items are whole scans of mixed kinds, batched here (2D) or
        # slice-wise (3D); MONAI's DataLoader would only add collation and seeding, both unused.
        # in_order=False: a worker busy in a decoder that holds its GIL (OpenJPEG: ~140 ms per 1024-px
        # image) cannot hand over the items it has finished; the model takes the other workers' instead of
        # waiting. Rows are keyed by scan, so the order of arrival changes nothing in the outputs.
        loader = torch.utils.data.DataLoader(
            self._dataset,
            batch_size=None,
            shuffle=False,
            num_workers=self.workers,
            collate_fn=_identity,
            prefetch_factor=max(2, 2 * self.batch_size // max(1, self.workers)) if self.workers else None,
            persistent_workers=False,
            in_order=False,
        )
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), unit="scan", desc="pneumoseg infer", dynamic_ncols=True, file=sys.stderr)
        # one writer thread: post-processing + file writing overlap the next forward pass (numpy, zlib,
        # PIL and pydicom release the GIL for the heavy parts); a bounded queue keeps memory flat
        writer = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        pending: list[tuple[Scan, concurrent.futures.Future]] = []
        stop = ""

        def collect(limit: int) -> str:
            while len(pending) > limit:
                scan, future = pending.pop(0)
                try:
                    row = future.result()
                except Exception as e:  # writing failed: the scan's error, not the run's
                    logger.exception("%s: writing outputs failed", scan.source)
                    row = self._error_row(scan, f"{type(e).__name__}: {scan.source}: {e}", 0.0)
                rows[scan.scan_id] = row
                if len(rows) % TRIM_EVERY == 0:
                    release_freed_memory()
                if bar is not None:
                    bar.update(1)
                if row["status"] == "error" and self.strict:
                    return f"--strict: stopped at {scan.source}: {row['reason']}"
            return ""

        def submit(scan: Scan, fn: Callable[[], dict[str, Any]]) -> str:
            pending.append((scan, writer.submit(fn)))
            return collect(2 * self.batch_size)

        batch: list[dict[str, Any]] = []

        def flush() -> str:
            if not batch:
                return ""
            t0 = time.perf_counter()
            message = ""
            try:
                seg, cls = self._forward_2d([b["image"] for b in batch])
            except Exception as e:  # e.g. out of memory: these scans error, the run goes on
                logger.exception("forward pass failed")
                for b in batch:
                    scan, error = todo[b["index"]], f"forward pass failed ({type(e).__name__}: {e})"
                    message = message or submit(scan, lambda s=scan, m=error, t=b["seconds"]: self._error_row(s, m, t))
                batch.clear()
                return message
            share = (time.perf_counter() - t0) / len(batch)
            for i, b in enumerate(batch):
                scan = todo[b["index"]]
                message = message or submit(
                    scan, lambda s=scan, b=b, i=i: self._finish(s, b, seg[i], float(cls[i]), b["seconds"] + share)
                )
            batch.clear()
            return message

        # tensors from the workers by named shared-memory files ("file_system"), not by file descriptors:
        # passing a descriptor needs the worker's resource-sharer thread, hence its GIL, which OpenJPEG
        # holds while decoding (with in_order=False and the display as a tensor, the main process waited
        # 1.8 s instead of 5.3 s for items over 200 scans). torch_shm_manager unlinks the files if a
        # process dies. Restored afterwards (a process-wide setting)
        sharing_strategy = torch.multiprocessing.get_sharing_strategy()
        if self.workers:
            torch.multiprocessing.set_sharing_strategy("file_system")
        try:
            for item in loader:
                scan = todo[item["index"]]
                if "error" in item:
                    stop = submit(scan, lambda s=scan, it=item: self._error_row(s, it["error"], it["seconds"]))
                elif scan.is_volume:
                    t0 = time.perf_counter()
                    try:
                        seg, cls = self._forward_3d(item["image"])
                    except Exception as e:  # e.g. out of memory on a huge series
                        logger.exception("%s: forward pass failed", scan.source)
                        error = f"forward pass failed ({type(e).__name__}: {e})"
                        stop = submit(scan, lambda s=scan, m=error, t=item["seconds"]: self._error_row(s, m, t))
                    else:
                        seconds = item["seconds"] + time.perf_counter() - t0
                        stop = submit(
                            scan, lambda s=scan, it=item, sg=seg, c=cls, t=seconds: self._finish(s, it, sg, c, t)
                        )
                else:
                    batch.append(item)
                    if len(batch) >= self.batch_size:
                        stop = flush()
                if stop:
                    break
            if not stop:
                stop = flush() or collect(0)
        finally:
            if stop:
                for _, future in pending:
                    future.cancel()
            else:
                collect(0)
            writer.shutdown(wait=True)
            release_freed_memory()  # what the run kept for reuse goes back when it ends
            torch.multiprocessing.set_sharing_strategy(sharing_strategy)
            if bar is not None:
                bar.close()
        if stop:
            print(stop, file=sys.stderr)
        return stop


# ================================================================================================ the CLI


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pneumoseg infer``."""
    p = subparsers.add_parser(
        "infer",
        help="segment every scan in a folder (masks, DICOM SEG, overlays, report)",
        description="Batch inference with a trained bundle on a folder of chest radiographs (DICOM CR/DX, "
        "PNG/JPEG) and CT (DICOM series, NIfTI), searched recursively. Writes OUTPUT_DIR/scans/<scan_id>/"
        "{mask.png|mask.nii.gz, seg.dcm, overlay.png, record.json} and OUTPUT_DIR/report.{csv,json}. "
        "Re-running skips scans whose outputs are complete and verified. Exit code 0 if no scan errored, "
        "1 if some did, 2 on a usage error. See docs/inference.md.",
    )
    p.add_argument("input_dir", nargs="?", metavar="INPUT_DIR", help="folder of scans (never modified)")
    p.add_argument("output_dir", nargs="?", metavar="OUTPUT_DIR", help="folder for outputs and the report")
    p.add_argument(
        "--bundle",
        metavar="DIR",
        help="bundle folder: configs/inference.json (network_def, image_size), "
        "models/model.pt, configs/postprocessing.json (thresholds), configs/metadata.json (name, version)",
    )
    p.add_argument(
        "--model",
        metavar="FILE",
        help="an exported model of the bundle (models/model.ts TorchScript or models/model.onnx, from "
        "`pneumoseg bundle export`) instead of network_def + model.pt: no training code needed",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu or cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, default=8, help="radiographs / CT slices per forward pass (default: 8)")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="DataLoader worker processes decoding and preprocessing while the model runs (0: none; default: 2)",
    )
    p.add_argument(
        "--formats",
        default=",".join(FORMATS),
        help="comma-separated outputs: nifti (mask of volumes / NIfTI inputs), png (mask of radiographs), "
        "seg (DICOM SEG of DICOM inputs), overlay (preview PNG); default: all",
    )
    p.add_argument("--overwrite", action="store_true", help="redo every scan and replace existing outputs")
    p.add_argument("--strict", action="store_true", help="stop at the first scan that errors (exit code 1)")
    p.add_argument(
        "--fp32",
        action="store_true",
        help="full precision (default: bf16 autocast + channels_last on CPUs with native bf16, AMP on GPUs)",
    )
    p.add_argument(
        "--chest-only",
        action="store_true",
        help="skip scans whose header says they are not a chest or not a trained modality (default: warn in the row)",
    )
    p.add_argument(
        "--num-shards",
        type=int,
        default=None,
        help="split the sorted scan list into K shards (default: WORLD_SIZE under torchrun, else 1)",
    )
    p.add_argument(
        "--shard-id", type=int, default=None, help="shard to process, 0..K-1 (default: RANK under torchrun, else 0)"
    )
    p.add_argument(
        "--merge-reports",
        nargs="+",
        metavar="DIR",
        help="instead of inferring: merge the shard reports found in the first DIR and any further DIRs into "
        "DIR/report.{csv,json}",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    p.set_defaults(func=run)


def exit_on_error(exit_code: int) -> int:
    """For ``configs/inference.json``: make ``python -m monai.bundle run`` exit with the runner's code
    (1 when some scan errored), as ``pneumoseg infer`` does."""
    if exit_code:
        raise SystemExit(exit_code)
    return exit_code


def _exported_model(path: str, device: str) -> nn.Module:
    from pneumoseg.sharing.model import ExportedModel

    return ExportedModel.load(path, device=select_device(device))


def run(args: argparse.Namespace) -> int:
    """``pneumoseg infer``: returns the exit code (0 ok, 1 some scan errored, 2 usage / setup error)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.merge_reports:
        from pneumoseg.report import ReportMergeError

        try:
            _, summary = merge_reports(args.merge_reports[0], args.merge_reports[1:])
        except ReportMergeError as e:
            print(f"pneumoseg infer --merge-reports: {e}", file=sys.stderr)
            return 2
        print(summary_line(summary) + f"; report: {Path(args.merge_reports[0]) / 'report.csv'}")
        return 0
    if not args.input_dir or not args.output_dir or not args.bundle:
        print("pneumoseg infer: INPUT_DIR, OUTPUT_DIR and --bundle are required (or --merge-reports)", file=sys.stderr)
        return 2
    if (args.num_shards is None) != (args.shard_id is None):
        print("pneumoseg infer: give both --num-shards and --shard-id", file=sys.stderr)
        return 2
    # this program owns the process: the forward passes reuse their activations' memory instead of
    # faulting in fresh pages each time (process-wide, so not done by BatchInferenceRunner itself)
    retain_freed_memory()
    try:
        runner = BatchInferenceRunner(
            bundle_root=args.bundle,
            input_dir=args.input_dir,
            output_dir=args.output_dir,
            formats=args.formats,
            device=args.device,
            batch_size=args.batch_size,
            workers=args.workers,
            fp32=args.fp32,
            overwrite=args.overwrite,
            strict=args.strict,
            chest_only=args.chest_only,
            num_shards=args.num_shards,
            shard_id=args.shard_id,
            progress=not args.no_progress,
            network=_exported_model(args.model, args.device) if args.model else None,
        )
        return runner.run()
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"pneumoseg infer: {e}", file=sys.stderr)
        return 2
