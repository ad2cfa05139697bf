"""Adapters between :class:`~pneumoseg.networks.SCSEUNet`'s two outputs and MONAI's Ignite engines.

How the two outputs travel through MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator`` (both with
``decollate=False``, since a :class:`~pneumoseg.networks.SCSEUNetOutput` cannot be decollated)::

    batch ──MultiTaskPrepareBatch──> image [B,1,H,W], MultiTaskTarget(seg=mask [B,1,H,W], cls=[B,1])
    network(image) ──> SCSEUNetOutput(seg logits, cls logit)          = output["pred"] during the forward
    MultiTaskLoss(pred, target) ──> total (back-propagated; the parts are kept for logging)
    MultiTaskOutputHandler (MODEL_COMPLETED) rewrites engine.state.output into plain tensors:
        "seg_prob"   [B,1,H,W] sigmoid(seg)      "pred_cls"   [B,1] sigmoid(cls)
        "pred"       [B,1,H,W] post-processed binary mask (see pneumoseg.postprocessing)
        "pred_label" [B,1] 1 if pred_cls is at or above the operating threshold
        "label"      [B,1,H,W] truth mask        "label_cls"  [B,1] 1 if the truth mask is not empty
        "loss", "seg_bce", "seg_dice", "cls_bce" floats (trainer)

so every MONAI metric/handler downstream sees ordinary tensors under ordinary keys (the trainer's handler
then decollates them into per-image dicts, MONAI's usual trainer output; evaluators keep them batched).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents, PrepareBatch
from torch import nn

from pneumoseg.losses import FusedMultiTaskLoss, LossTerms, image_label_from_mask
from pneumoseg.networks import SCSEUNetOutput
from pneumoseg.postprocessing import PLAIN, DualOutputPostprocess, at_or_above

__all__ = ["MultiTaskTarget", "MultiTaskPrepareBatch", "MultiTaskLoss", "MultiTaskOutputHandler", "loss_terms"]


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
            (default: :data:`pneumoseg.postprocessing.PLAIN`, threshold 0.5 without gate).
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
        self.postprocess = postprocess if postprocess is not None else DualOutputPostprocess.from_thresholds(PLAIN)
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
            "pred_label": at_or_above(pred_cls, self.operating_threshold).float(),
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
