"""The models of a run: loaded from bundles as data, routed by image kind, run at the chosen precision.

A bundle's model is its record + weights (:func:`pneumoseg.model_record.load_trained_model`): nothing of
the bundle is imported or executed and its configs are not read, so a bundle received from another
hospital is data. The record says which image kinds the model was trained on; each kind goes to the one
model trained on it (:func:`load_models`), and everything the model must be fed with (input size,
intensity percentiles, CT window and orientation) and the thresholds come from that record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pneumoseg.model_record import (
    CT,
    RADIOGRAPH,
    RECORD_FILE,
    ModelRecord,
    TrainedModel,
    bundle_identity,
    load_trained_model,
)
from pneumoseg.runtime import cpu_has_native_bf16

__all__ = [
    "DEFAULT_WEIGHTS",
    "FLIP_DIMS",
    "FlipTTA",
    "MeanEnsemble",
    "ModelSetError",
    "PrecisionWrapper",
    "load_ensemble",
    "load_models",
    "with_flip_tta",
    "precision",
    "route_models",
    "run_fingerprint",
    "select_device",
]


class ModelSetError(ValueError):
    """The given bundles cannot make one run (two models for one kind, ``--model`` with several bundles)."""


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


DEFAULT_WEIGHTS = "models/model.pt"
"""A bundle's weights, relative to the bundle folder."""

FLIP_DIMS = {RADIOGRAPH: -1, CT: -2}
"""The left-right axis of a network input ``[B, 1, S, S]`` per image kind: a radiograph's columns (W), a CT
slice's first axis (I; slices are in array order, the model's training flips that axis too)."""


def _mean_probability_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The logit of the mean probability (in fp32; probabilities clamped to [1e-7, 1 - 1e-7])."""
    probability = torch.stack([torch.sigmoid(t.float()) for t in logits]).mean(0)
    return torch.logit(probability, eps=1e-7)


class FlipTTA(nn.Module):
    """Horizontal-flip test-time augmentation of a dual-output network: the input and its left-right mirror go
    through the network as one batch; the mirrored segmentation is flipped back and the two probabilities
    averaged (image probability too). Returns logits, like the network.

    ``forward(x [B, 1, S, S]) -> SCSEUNetOutput(seg [B, 1, S, S], cls [B, 1])``; ``dim``: the left-right axis
    (:data:`FLIP_DIMS`). A flip-equivariant network (``f(flip x) = flip f(x)``) gives exactly its own output.
    """

    def __init__(self, network: nn.Module, dim: int = -1) -> None:
        super().__init__()
        self.network = network
        self.dim = dim

    def forward(self, x: torch.Tensor) -> Any:
        from pneumoseg.networks import SCSEUNetOutput

        out = self.network(torch.cat([x, torch.flip(x, (self.dim,))]))
        seg, cls = out[0], out[1]
        b = x.shape[0]
        seg_mean = _mean_probability_logits([seg[:b], torch.flip(seg[b:], (self.dim,))])
        return SCSEUNetOutput(seg_mean, _mean_probability_logits([cls[:b], cls[b:]]))


class MeanEnsemble(nn.Module):
    """Several dual-output networks fed the same input; their probabilities are averaged (segmentation and
    image level), returned as logits. ``forward(x [B, 1, S, S]) -> SCSEUNetOutput(seg, cls)``."""

    def __init__(self, networks: Sequence[nn.Module]) -> None:
        super().__init__()
        if not networks:
            raise ValueError("an ensemble needs at least one network")
        self.members = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> Any:
        from pneumoseg.networks import SCSEUNetOutput

        outs = [member(x) for member in self.members]
        return SCSEUNetOutput(
            _mean_probability_logits([o[0] for o in outs]), _mean_probability_logits([o[1] for o in outs])
        )


def _derived_fingerprint(parts: Sequence[str]) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def load_ensemble(
    bundle: str | os.PathLike, weights: Sequence[str], device: torch.device | str = "cpu"
) -> TrainedModel:
    """The bundle's record with several weight files (e.g. fold models, ``models/fold_0.pt`` ...; relative to
    the bundle) averaged by :class:`MeanEnsemble`; one file is the plain model. All files must fit the network
    the record names. The fingerprint covers every file and the record."""
    if not weights:
        raise ModelSetError("no weight files given")
    members = [load_trained_model(bundle, device, weights=w) for w in weights]
    if len(members) == 1:
        return members[0]
    first = members[0]
    sha = hashlib.sha256("|".join(m.weights_sha256 for m in members).encode()).hexdigest()
    network = MeanEnsemble([m.network for m in members]).eval()
    return dataclasses.replace(
        first, network=network, weights_sha256=sha, fingerprint=_derived_fingerprint([sha, first.record.digest()])
    )


def with_flip_tta(models: Mapping[str, TrainedModel]) -> dict[str, TrainedModel]:
    """``{kind: model}`` whose networks run with :class:`FlipTTA` along that kind's left-right axis; the
    fingerprints change with it (outputs made with TTA are not those made without)."""
    return {
        kind: dataclasses.replace(
            model,
            network=FlipTTA(model.network, FLIP_DIMS[kind]),
            fingerprint=_derived_fingerprint([model.fingerprint, "flip-tta"]),
        )
        for kind, model in models.items()
    }


def load_models(
    bundles: Sequence[str | os.PathLike],
    device: torch.device | str = "cpu",
    exported: str | os.PathLike | None = None,
    trust: bool = False,
    weights: Sequence[str] | None = None,
) -> dict[str, TrainedModel]:
    """``{image kind: model}`` of the bundles' trained models, each kind from the one bundle trained on it.

    Args:
        bundles: bundle folders (``models/model_record.json`` + ``models/model.pt`` each).
        exported: an exported ONNX / TorchScript file of the (single) bundle to run instead of its
            ``model.pt`` (``pneumoseg.sharing.model.ExportedModel``); the record still comes from the bundle.
        trust: passed to ``ExportedModel.load``: TorchScript is code, loaded only when trusted.
        weights: weight files relative to each bundle instead of ``models/model.pt``; several are averaged
            (:func:`load_ensemble`: fold models, or top-k checkpoints kept apart).

    Raises :class:`ModelSetError` when two bundles were trained on one kind, or ``exported`` is given with
    other than one bundle; ``FileNotFoundError`` / ``ModelRecordError`` for a missing or invalid record or
    weights (the message names the file).
    """
    if not bundles:
        raise ModelSetError("no --bundle given")
    if exported is not None and len(bundles) != 1:
        raise ModelSetError("--model runs the exported model of one bundle: give exactly one --bundle")
    if exported is not None and weights:
        raise ModelSetError("--model and --weights exclude each other")
    loaded = {
        os.fspath(bundle): _load_exported(bundle, exported, device, trust)
        if exported
        else load_ensemble(bundle, list(weights or [DEFAULT_WEIGHTS]), device)
        for bundle in bundles
    }
    return route_models(loaded)


def route_models(models: Mapping[str, TrainedModel] | Sequence[TrainedModel]) -> dict[str, TrainedModel]:
    """``{image kind: model}`` from models named by where they come from (or a list): each kind of a model's
    record goes to it; a kind two models were trained on raises :class:`ModelSetError`."""
    named = dict(models) if isinstance(models, Mapping) else {f"{m.name} (#{i + 1})": m for i, m in enumerate(models)}
    routed: dict[str, TrainedModel] = {}
    owner: dict[str, str] = {}
    for name, model in named.items():
        for kind in model.record.kinds:
            if routed.get(kind) is model:  # already routed (a {kind: model} mapping names a model per kind)
                continue
            if kind in routed:
                raise ModelSetError(
                    f"two models trained on {kind}: {owner[kind]} and {name}; give one --bundle per image kind"
                )
            routed[kind], owner[kind] = model, name
    return routed


def _load_exported(
    bundle: str | os.PathLike, path: str | os.PathLike, device: torch.device | str, trust: bool
) -> TrainedModel:
    """The bundle's record with an exported network; its fingerprint covers the exported file + record."""
    from pneumoseg.sharing.model import ExportedModel

    record = ModelRecord.read(os.path.join(bundle, "models", RECORD_FILE))
    kwargs: dict[str, Any] = {"device": torch.device(device) if isinstance(device, str) else device}
    if "trust" in inspect.signature(ExportedModel.load).parameters:  # the TorchScript guard of pneumoseg.sharing
        kwargs["trust"] = trust
    network = ExportedModel.load(path, **kwargs)
    name, version = bundle_identity(bundle)
    fingerprint = hashlib.sha256(f"{network.sha256}|{record.digest()}".encode()).hexdigest()[:16]
    return TrainedModel(network, record, name, version, network.sha256, fingerprint)


def precision(device: torch.device, fp32: bool) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, channels_last): bf16 + channels_last on CPUs with native bf16
    (AVX512-BF16 / AMX; emulated bf16 would be slower than fp32), fp16 AMP on GPUs."""
    if fp32:
        return None, False
    if device.type == "cuda":
        return torch.float16, True
    return (torch.bfloat16, True) if cpu_has_native_bf16() else (None, False)


class PrecisionWrapper(nn.Module):
    """Network call under autocast / channels_last, with float32 outputs (downstream maths in fp32).

    ``forward(x [B, 1, S, S]) -> SCSEUNetOutput(seg [B, 1, S, S], cls [B, 1])`` logits.
    """

    def __init__(self, network: nn.Module, device: torch.device, fp32: bool) -> None:
        super().__init__()
        self.dtype, self.channels_last = precision(device, fp32)
        self.network = network.to(memory_format=torch.channels_last) if self.channels_last else network
        self.device_type = device.type

    def forward(self, x: torch.Tensor) -> Any:
        from pneumoseg.networks import SCSEUNetOutput

        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(self.device_type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        with ctx:
            out = self.network(x)
        return SCSEUNetOutput(out.seg.float(), out.cls.float())


def run_fingerprint(models: Mapping[str, TrainedModel]) -> str:
    """One string naming every model of a run: ``"ct:<fp>+radiograph:<fp>"`` (report summaries, merges)."""
    return "+".join(f"{kind}:{models[kind].fingerprint}" for kind in sorted(models))
