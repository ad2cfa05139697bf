"""What the bundle's Ignite engines need around :class:`~pneumoseg.networks.SCSEUNet`.

How the two outputs travel through MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator`` (both with
``decollate=False``, since a :class:`~pneumoseg.networks.SCSEUNetOutput` cannot be decollated)::

    batch ──MultiTaskPrepareBatch──> image [B,1,H,W], MultiTaskTarget(seg=mask [B,1,H,W], cls=[B,1])
    network(image) ──> SCSEUNetOutput(seg logits, cls logit)          = output["pred"] during the forward
    MultiTaskLoss(pred, target) ──> total (back-propagated; the parts are kept for logging)
    MultiTaskOutputHandler (MODEL_COMPLETED) rewrites engine.state.output into plain tensors:
        "seg_prob"   [B,1,H,W] sigmoid(seg)      "pred_cls"   [B,1] sigmoid(cls)
        "pred"       [B,1,H,W] post-processed binary mask (see pneumoseg.postprocessing)
        "pred_label" [B,1] 1 if pred_cls >= operating threshold
        "label"      [B,1,H,W] truth mask        "label_cls"  [B,1] 1 if the truth mask is not empty
        "loss", "seg_bce", "seg_dice", "cls_bce" floats (trainer)

so every MONAI metric/handler downstream sees ordinary tensors under ordinary keys (the trainer's handler
then decollates them into per-image dicts, MONAI's usual trainer output; evaluators keep them batched).
The rest: inferers (CPU bf16 autocast; slice-by-slice CT with the classification head), handlers
(gradient clipping, per-epoch re-seeding for exact resume, the last checkpoint, metric logs, the
post-processing search) and the pre-flight check of a manifest. Training writes the model record
(:class:`ModelRecordWriter`), evaluation's search updates its post-processing. Inference on folders
(``configs/inference.json`` and ``pneumoseg infer``) is :class:`pneumoseg.infer.BatchInferenceRunner`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.handlers import CheckpointLoader
from monai.inferers import Inferer, SimpleInferer, SliceInferer
from torch import nn

from pneumoseg.losses import FusedMultiTaskLoss, LossTerms, image_label_from_mask
from pneumoseg.model_record import ModelRecord
from pneumoseg.networks import SCSEUNetOutput
from pneumoseg.postprocessing import DualOutputPostprocess, PostprocessingSearch

__all__ = [
    "MultiTaskTarget",
    "MultiTaskPrepareBatch",
    "MultiTaskLoss",
    "MultiTaskOutputHandler",
    "loss_terms",
    "AutocastInferer",
    "DualOutputSliceInferer",
    "GradientClipHandler",
    "EpochSeedHandler",
    "LastCheckpointSaver",
    "ResumeCheckpointLoader",
    "StopAtEpoch",
    "default_bundle_root",
    "MetricsLogger",
    "ModelRecordWriter",
    "PostprocessingSearchHandler",
    "check_record",
    "DatalistError",
    "check_datalist",
    "is_main_process",
]

logger = logging.getLogger(__name__)


def is_main_process() -> bool:
    """True unless this is a DDP rank other than 0 (rank 0 alone writes checkpoints and logs)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ------------------------------------------------------------------------------------------ batches & loss


class MultiTaskTarget(NamedTuple):
    """Targets mirroring :class:`SCSEUNetOutput`: ``seg`` ``[B, 1, *S]`` mask, ``cls`` ``[B, 1]`` image label."""

    seg: torch.Tensor
    cls: torch.Tensor


class MultiTaskPrepareBatch(PrepareBatch):
    """``batch -> (image, MultiTaskTarget(mask, image label derived from the mask))``.

    The image label is derived here, from the (augmented, resized) mask the network is trained on, so
    that a pneumothorax cropped away by augmentation does not leave a positive image label behind.
    Without ``label_key`` in the batch (inference) the target is ``None``.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label") -> None:
        self.image_key = image_key
        self.label_key = label_key

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, MultiTaskTarget | None]:
        image = torch.as_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        if self.label_key not in batchdata:
            return image, None
        mask = torch.as_tensor(batchdata[self.label_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        return image, MultiTaskTarget(mask, image_label_from_mask(mask))


class MultiTaskLoss(nn.Module):
    """Adapter of :class:`~pneumoseg.losses.FusedMultiTaskLoss` to the engines' ``loss(pred, target)``.

    ``pred``: :class:`SCSEUNetOutput`; ``target``: :class:`MultiTaskTarget` (or a bare mask ``[B, 1, *S]``).
    Returns the total; ``last_terms`` keeps the :class:`LossTerms` of the last call for logging.
    Extra keyword arguments configure the fused loss.
    """

    def __init__(self, loss: FusedMultiTaskLoss | None = None, **loss_kwargs: Any) -> None:
        super().__init__()
        self.loss = loss if loss is not None else FusedMultiTaskLoss(**loss_kwargs)
        self.last_terms: LossTerms | None = None

    def forward(self, pred: SCSEUNetOutput, target: MultiTaskTarget | torch.Tensor) -> torch.Tensor:
        if not isinstance(pred, SCSEUNetOutput):
            raise TypeError(f"MultiTaskLoss expects the network's SCSEUNetOutput, got {type(pred).__name__}")
        if isinstance(target, MultiTaskTarget):
            terms = self.loss(pred.seg, pred.cls, target.seg, target.cls)
        else:
            terms = self.loss(pred.seg, pred.cls, target)
        self.last_terms = terms
        return terms.total


class MultiTaskOutputHandler:
    """Rewrite ``engine.state.output`` into the plain tensors listed in the module docstring.

    Args:
        postprocess: turns one image's ``seg_prob [1, *S]`` and ``pred_cls`` into the binary mask
            (default: threshold 0.5, no gate).
        operating_threshold: image-level decision threshold for ``pred_label`` (sensitivity/specificity).
        loss_function: the :class:`MultiTaskLoss` whose last terms are logged (trainer only).
        decollate: finally split the output into a list of per-image dicts (scalars such as the loss
            replicated), the form MONAI's trainer handlers expect by default (e.g. the MLflow handler that
            ``--tracking mlflow`` adds reads ``from_engine(["loss"], first=True)``). Used for the trainer;
            evaluators keep batched tensors for the metrics.
    """

    def __init__(
        self,
        postprocess: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        operating_threshold: float = 0.5,
        loss_function: MultiTaskLoss | None = None,
        decollate: bool = False,
    ) -> None:
        self.postprocess = postprocess if postprocess is not None else DualOutputPostprocess(0.0, 0.5, 0, 0.5)
        self.operating_threshold = operating_threshold
        self.loss_function = loss_function
        self.decollate = decollate

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        pred = output.get("pred")
        if not isinstance(pred, SCSEUNetOutput):
            raise TypeError(
                f"expected the network's SCSEUNetOutput under output['pred'], got {type(pred).__name__}; "
                "is the engine's inferer returning a single tensor (SegmentationView) or decollate=True?"
            )
        with torch.no_grad():
            seg_prob = torch.sigmoid(pred.seg.detach().float())
            pred_cls = torch.sigmoid(pred.cls.detach().float()).reshape(-1, 1)
            mask = torch.stack([self.postprocess(p, c) for p, c in zip(seg_prob, pred_cls)])
        new = {
            "image": output.get("image"),
            "seg_prob": seg_prob,
            "pred_cls": pred_cls,
            "pred": mask,
            "pred_label": (pred_cls >= self.operating_threshold).float(),
        }
        target = output.get("label")
        if isinstance(target, MultiTaskTarget):
            new["label"] = target.seg.float()
            new["label_cls"] = target.cls.float()
        if "loss" in output:
            new["loss"] = output["loss"].detach()
        if self.loss_function is not None and self.loss_function.last_terms is not None:
            terms = self.loss_function.last_terms
            new.update(seg_bce=float(terms.seg_bce), seg_dice=float(terms.seg_dice), cls_bce=float(terms.cls_bce))
        if self.decollate:
            from monai.data import decollate_batch

            new = decollate_batch(new, detach=True)
        engine.state.output = new


def loss_terms(output: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """StatsHandler/TensorBoard ``output_transform``: the total loss and its parts as floats (from the
    first item of a decollated output)."""
    if isinstance(output, Sequence) and not isinstance(output, Mapping):
        output = output[0]
    return {k: float(output[k]) for k in ("loss", "seg_bce", "seg_dice", "cls_bce") if k in output}


# ---------------------------------------------------------------------------------------------- inferers


class AutocastInferer(SimpleInferer):
    """``SimpleInferer`` under ``torch.autocast`` (e.g. opt-in bf16 on CPU, which the engines' ``amp`` does
    not cover: MONAI autocasts on CUDA only). Disabled, it is exactly ``SimpleInferer``."""

    def __init__(self, enabled: bool = False, device_type: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.enabled = enabled
        self.device_type = device_type
        self.dtype = dtype

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        context = torch.autocast(self.device_type, dtype=self.dtype) if self.enabled else contextlib.nullcontext()
        with context:
            out = network(inputs, *args, **kwargs)
        if isinstance(out, SCSEUNetOutput):  # downstream sigmoid/metrics in fp32
            return SCSEUNetOutput(out.seg.float(), out.cls.float())
        return out


class _SegmentationCapture(nn.Module):
    """Segmentation view that also records every call's image logits (used inside SliceInferer)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.cls_logits: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        self.cls_logits.append(out.cls.detach())
        return out.seg


class DualOutputSliceInferer(Inferer):
    """2D network over a 3D volume ``[B, C, I, J, K]`` slice by slice along K (MONAI ``SliceInferer`` over
    the segmentation output); returns ``SCSEUNetOutput(seg=[B, 1, I, J, K], cls=[B, 1])`` where the volume's
    image logit is the maximum over its slices (a pneumothorax anywhere makes the volume positive).

    ``roi_size``: in-plane window ``(I, J)``; ``-1`` takes the full extent (one window per slice).
    A 2D input ``[B, C, H, W]`` is passed straight to the network.
    """

    def __init__(self, roi_size: Sequence[int] = (-1, -1), sw_batch_size: int = 8, **kwargs: Any) -> None:
        super().__init__()
        self.roi_size = tuple(roi_size)
        self.sw_batch_size = sw_batch_size
        self.kwargs = kwargs

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if inputs.dim() == 4:
            return network(inputs)
        capture = _SegmentationCapture(network)
        inferer = SliceInferer(
            roi_size=self.roi_size, sw_batch_size=self.sw_batch_size, spatial_dim=2, progress=False, **self.kwargs
        )
        seg = inferer(inputs, capture)
        # SliceInferer walks the volumes of the batch in order, each in sw_batch_size chunks of slices
        cls = torch.cat(capture.cls_logits).reshape(inputs.shape[0], -1).amax(dim=1, keepdim=True)
        return SCSEUNetOutput(torch.as_tensor(seg), cls)


# ---------------------------------------------------------------------------------------------- handlers


class GradientClipHandler:
    """Clip the gradient norm after the backward pass (unscaling first under CUDA AMP)."""

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0) -> None:
        self.max_norm = max_norm
        self.norm_type = norm_type

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.max_norm is None or self.max_norm <= 0:
            return
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)  # step() then skips its own unscale
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm, self.norm_type)


class EpochSeedHandler:
    """Re-seed every random source at the start of each epoch from ``(seed, epoch)``.

    Epoch e then draws the same shuffling, augmentation, dropout and DataLoader worker seeds whether the
    run went straight through or was resumed from a checkpoint at the end of epoch e - 1: the global RNGs
    (python, numpy, torch: shuffling, dropout, MONAI's worker seeds) via ``set_determinism``, and the
    transforms' own ``RandomState`` via ``Compose.set_random_state``. Fires before the epoch's DataLoader
    iterator is created (Ignite creates it after EPOCH_STARTED).
    """

    def __init__(self, seed: int = 0, transform: Any = None) -> None:
        self.seed = int(seed)
        self.transform = transform

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def epoch_seed(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + epoch) % (2**31)

    def __call__(self, engine: Engine) -> None:
        from monai.utils import set_determinism

        seed = self.epoch_seed(engine.state.epoch)
        # use_deterministic_algorithms is left to the caller (configs' initialize): None keeps it unchanged
        set_determinism(seed=seed, use_deterministic_algorithms=None)
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=seed)


class LastCheckpointSaver:
    """Write ``save_dir/filename`` (one fixed name, overwritten atomically) at every ``interval`` epochs
    and at completion, holding ``save_dict`` (model, optimizer, lr_scheduler, trainer, ...).

    Ignite's ``Checkpoint`` does the saving (one file; ``DiskSaver`` writes atomically and on rank 0
    only); MONAI's ``CheckpointSaver`` can't keep a fixed file name for interval saves, and a resume
    needs a path known in advance. Load it with ``CheckpointLoader(load_path, load_dict=save_dict)``.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        filename: str = "checkpoint_last.pt",
        interval: int = 1,
        engine_key: str | None = "trainer",
    ) -> None:
        self.save_dir = save_dir
        self.save_dict = dict(save_dict)
        self.filename = filename
        self.interval = interval
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        from ignite.handlers import Checkpoint, DiskSaver

        if self.engine_key:  # the engine adds itself: a config can't reference the trainer from its own handlers
            self.save_dict[self.engine_key] = engine
        stem, ext = os.path.splitext(self.filename)
        self._checkpoint = Checkpoint(
            self.save_dict,
            DiskSaver(self.save_dir, require_empty=False, create_dir=True),
            filename_prefix=stem,
            filename_pattern="{filename_prefix}.{ext}",
            n_saved=None,  # same name every time; nothing to delete
        )
        self._checkpoint.ext = ext.lstrip(".") or "pt"
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self._checkpoint)
        engine.add_event_handler(Events.COMPLETED, self._save_final)

    def _save_final(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval:
            self._checkpoint(engine)


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI ``CheckpointLoader`` that also restores the engine it is attached to (under ``engine_key``),
    since a bundle config can't reference the trainer from the trainer's own handler list.

    ``enabled=False`` makes it a no-op (rather than ``_disabled_`` in the config, which would drop it from
    the handler list and shift the positions the multi-GPU config slices by).
    """

    def __init__(
        self, load_path: str, load_dict: dict, engine_key: str | None = "trainer", enabled: bool = True, **kwargs: Any
    ) -> None:
        if enabled and not Path(load_path).is_file():
            raise FileNotFoundError(f"resume: checkpoint {load_path} not found (train without resume first)")
        super().__init__(load_path, dict(load_dict), **kwargs)
        self.engine_key = engine_key
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        if self.engine_key:
            self.load_dict[self.engine_key] = engine
        super().attach(engine)


class MetricsLogger:
    """Write the engine's metrics as JSON when it completes.

    Args:
        filepath: a JSON-lines history (``append=True``: one line per validation, with the trainer's
            epoch and iteration) or a single JSON report (``append=False``).
        trainer: the trainer, whose iteration tags each line (optional: during training the evaluator's
            epoch is the trainer's, since ``ValidationHandler`` runs it with the trainer's epoch).
        print_metrics: also print the metrics to stdout (``evaluate.json``).
        extra: values added to every record (e.g. the checkpoint evaluated).
    """

    def __init__(
        self,
        filepath: str,
        trainer: Engine | None = None,
        append: bool = True,
        print_metrics: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.filepath = Path(filepath)
        self.trainer = trainer
        self.append = append
        self.print_metrics = print_metrics
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_main_process():
            return
        record: dict[str, Any] = dict(self.extra)
        record["epoch"] = engine.state.epoch
        if self.trainer is not None:
            record["iteration"] = self.trainer.state.iteration
        record.update({k: _as_number(v) for k, v in engine.state.metrics.items()})
        self.filepath.parent.mkdir(parents=True, exist_ok=True)
        if self.append:
            with self.filepath.open("a") as f:
                f.write(json.dumps(record) + "\n")
        else:
            self.filepath.write_text(json.dumps(record, indent=1) + "\n")
        if self.print_metrics:
            print(json.dumps(record, indent=1), flush=True)


def _as_number(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    elif isinstance(value, (np.ndarray, np.generic)):  # e.g. ROCAUC gives numpy.float32, which json refuses
        value = value.item() if np.size(value) == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    return value


class ModelRecordWriter:
    """Write the model record (``models/model_record.json``) when the engine starts (rank 0): the weights
    the run will save are then never without the record of how they must be fed.

    Args:
        record: the record (``ModelRecord.for_training(@network_def, @image_kind, @image_size, ...)``).
        path: where to write it (beside the weights).
    """

    def __init__(self, record: ModelRecord, path: str) -> None:
        self.record = record
        self.path = path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if is_main_process():
            self.record.write(self.path)
            logger.info("model record written: %s", self.path)


def check_record(record: ModelRecord, image_kind: str, image_size: int) -> None:
    """For ``evaluate.json``: the image kind and input size it was given must be the record's (they are read
    from it; an explicit ``--image_size`` that disagrees is refused, never silently used)."""
    preprocessing = record.preprocessing.get(image_kind)
    if preprocessing is None:
        raise ValueError(f"the model record has no {image_kind} preprocessing: the model was trained on {record.kinds}")
    if int(image_size) != preprocessing.image_size:
        raise ValueError(
            f"image_size {image_size} conflicts with the model record ({image_kind} trained at "
            f"{preprocessing.image_size}); leave --image_size out: evaluation reads it from the record"
        )


class PostprocessingSearchHandler:
    """Collect post-processing statistics during evaluation; at completion search the parameters, record
    ``siim_dice_before`` / ``siim_dice_after`` (and the values) in ``engine.state.metrics`` and write them
    into the model record's ``postprocessing`` (``record_file``: the one home of the thresholds inference
    uses).

    Args:
        record_file: the model record to update (``models/model_record.json``); ``None``: metrics only.
        grid: optional grid override per parameter (see :data:`pneumoseg.postprocessing.DEFAULT_GRID`).
        baseline: parameters the "before" Dice is computed with (default plain 0.5 thresholding); its
            ``top``/``bottom`` are added to the grid if missing.
        enabled: ``False`` makes the handler a no-op (keeps handler list positions stable, see
            :class:`ResumeCheckpointLoader`).
    """

    def __init__(
        self,
        record_file: str | None = None,
        grid: Mapping[str, Sequence[float]] | None = None,
        baseline: Mapping[str, float] | None = None,
        enabled: bool = True,
    ) -> None:
        from pneumoseg.postprocessing import DEFAULT_GRID, PostprocessingParams

        self.enabled = enabled
        self.record_file = record_file
        self.baseline = PostprocessingParams(**(baseline or {}))
        merged = {k: list((grid or {}).get(k, DEFAULT_GRID[k])) for k in DEFAULT_GRID}
        for name in ("t_cls", "top", "min_area", "bottom"):
            value = getattr(self.baseline, name)
            if value not in merged[name]:
                merged[name] = sorted([*merged[name], value])
        self.search = PostprocessingSearch(merged)

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, lambda _: self.search.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.COMPLETED, self._finish)

    def _update(self, engine: Engine) -> None:
        out = engine.state.output
        self.search.update(out["seg_prob"], out["pred_cls"], out["label"])

    def _finish(self, engine: Engine) -> None:
        stats = self.search.gather()
        params, best, summary = self.search.search(stats)
        before = self.search.dice(stats, self.baseline)
        engine.state.metrics.update(
            siim_dice_before=before,
            siim_dice_after=best,
            pp_t_cls=params.t_cls,
            pp_top=params.top,
            pp_min_area=params.min_area,
            pp_bottom=params.bottom,
            pp_images=summary["images"],
        )
        logger.info("post-processing search: %s, SIIM Dice %.4f -> %.4f", params, before, best)
        if self.record_file and is_main_process():
            ModelRecord.read(self.record_file).with_postprocessing(params, "validation search").write(self.record_file)


# ------------------------------------------------------------------------------------- pre-flight checks


class DatalistError(ValueError):
    """A manifest cannot be used: names the manifest, split and offending entries."""


def _image_shape(path: Path) -> tuple[int, ...]:
    """Spatial shape from the header only: DICOM ``(Rows, Columns)``, NIfTI its shape, others ``(H, W)``."""
    name = path.name.lower()
    if path.is_dir():  # a DICOM series: count is not a shape we can compare; only existence is checked
        return ()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        shape = tuple(int(s) for s in nib.load(str(path)).shape)
        while len(shape) > 2 and shape[-1] == 1:
            shape = shape[:-1]
        return shape
    if name.endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")):
        from PIL import Image

        with Image.open(path) as im:
            return (im.height, im.width)
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
    return (int(ds.Rows), int(ds.Columns))


def check_datalist(
    manifest: str | os.PathLike,
    split: str = "training",
    data_root: str | os.PathLike | None = None,
    check_sizes: bool = True,
    allow_empty: bool = False,
    max_listed: int = 10,
) -> list[dict[str, Any]]:
    """Load one split of a manifest with absolute paths, after checking it from file headers only.

    Checks: the manifest and split exist; the split is not empty (unless ``allow_empty``); every image
    (and ``label`` file) exists; SIIM ``label_rle`` rows are valid and fit the image's Rows x Columns; a
    ``label`` file has the image's shape. ``data_root`` overrides the manifest's own ``data_root``.

    Raises:
        DatalistError: listing up to ``max_listed`` offending entries as
            ``<manifest>[<split>][<index>] <image>: <problem>``.
    """
    from monai.data import load_decathlon_datalist

    from pneumoseg.data.manifest import manifest_base_dir
    from pneumoseg.data.rle import validate_siim_rle

    manifest = Path(manifest)
    if not manifest.is_file():
        raise DatalistError(f"manifest not found: {manifest}")
    try:
        raw = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise DatalistError(f"{manifest}: not valid JSON ({err})") from None
    if split not in raw:
        raise DatalistError(
            f"{manifest}: no split {split!r} (has {sorted(k for k, v in raw.items() if isinstance(v, list))})"
        )
    if not raw[split] and not allow_empty:
        raise DatalistError(f"{manifest}: split {split!r} is empty; nothing to train or validate on")
    base = Path(data_root) if data_root else manifest_base_dir(manifest)
    entries = load_decathlon_datalist(str(manifest), is_segmentation=True, data_list_key=split, base_dir=str(base))
    problems: list[str] = []
    for index, entry in enumerate(entries):
        where = f"{manifest}[{split}][{index}] {raw[split][index].get('image', '?')}"
        image = Path(str(entry.get("image", "")))
        if "image" not in entry:
            problems.append(f"{where}: no 'image' key")
            continue
        if not image.exists():
            problems.append(f"{where}: image file not found ({image})")
            continue
        label = entry.get("label")
        if label is not None and not Path(str(label)).exists():
            problems.append(f"{where}: label file not found ({label})")
            continue
        if not check_sizes or ("label_rle" not in entry and label is None):
            continue
        try:
            shape = _image_shape(image)
        except Exception as err:  # noqa: BLE001 - any unreadable header is reported with its entry
            problems.append(f"{where}: unreadable image header ({type(err).__name__}: {err})")
            continue
        if "label_rle" in entry:
            if len(shape) != 2:
                problems.append(f"{where}: label_rle needs a 2D image, image shape is {shape}")
                continue
            try:
                validate_siim_rle(entry["label_rle"], shape[0], shape[1])
            except ValueError as err:
                problems.append(f"{where}: label_rle does not fit the {shape[0]}x{shape[1]} image ({err})")
        elif shape:
            try:
                label_shape = _image_shape(Path(str(label)))
            except Exception as err:  # noqa: BLE001
                problems.append(f"{where}: unreadable label header ({type(err).__name__}: {err})")
                continue
            if label_shape != shape:
                problems.append(f"{where}: image shape {shape} != label shape {label_shape} ({label})")
        if len(problems) >= max_listed:
            break
    if problems:
        more = f" (stopped after the first {max_listed})" if len(problems) >= max_listed else ""
        raise DatalistError(f"{len(problems)} bad manifest entries{more}:\n  " + "\n  ".join(problems))
    return entries


class StopAtEpoch:
    """Terminate the trainer cleanly after epoch ``epoch`` (``None``: never), e.g. to fit a time slot;
    the last checkpoint is written first (attach after :class:`LastCheckpointSaver`) and a later run with
    ``resume`` continues at the next epoch with the same schedule, as if never stopped."""

    def __init__(self, epoch: int | None = None) -> None:
        self.epoch = epoch

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if (
            self.epoch is not None
            and engine.state.epoch >= int(self.epoch)
            and engine.state.epoch < engine.state.max_epochs
        ):
            logger.info("stopping after epoch %d as requested (stop_epoch)", engine.state.epoch)
            engine.terminate()


BUNDLE_NAME = "pneumothorax_scse_unet"


def default_bundle_root() -> str:
    """``"."`` when run from the bundle folder; otherwise the folder holding the ``configs`` folder of the
    first ``--config_file`` on the command line (``python -m monai.bundle run ... --config_file
    path/to/bundle/configs/train.json``), so the commands also work from elsewhere without
    ``--bundle_root`` (which always wins, being an override of this value)."""
    import ast
    import sys

    if Path("configs", "train.json").is_file() or Path("configs", "inference.json").is_file():
        return "."
    argv = list(sys.argv)
    value = None
    for i, arg in enumerate(argv):
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
    if value:
        try:
            parsed = ast.literal_eval(value) if value.lstrip().startswith(("[", "(")) else value
        except (ValueError, SyntaxError):
            parsed = value
        first = Path(str(parsed[0] if isinstance(parsed, (list, tuple)) else parsed))
        folder = first.resolve().parent
        return str(folder.parent if folder.name == "configs" else folder)
    return "."
