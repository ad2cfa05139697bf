"""The model record: what a trained model is and how it must be fed (``models/model_record.json``).

Training writes the record beside the weights, evaluation adds the post-processing thresholds it tuned, and
every consumer reads it: evaluation, ``pneumoseg infer``, export, site evaluation, fine-tuning and the demo.
It is the one home of everything inference must repeat (torchvision binds ``Weights.transforms()`` to its
weights for the same reason): the image kinds the model was trained on, the network, the input size per
kind, the intensity scaling, the CT window and orientation, the operating threshold and the post-processing.

A record is plain data checked against a closed schema (:data:`RECORD_SCHEMA`): a record received from
another hospital is read, never evaluated. The network is named from a closed registry (:data:`NETWORKS`)
with typed, range-checked keyword arguments, and its weights are a state dict read with
``torch.load(weights_only=True)`` (or safetensors)::

    record = ModelRecord.read("bundle/models/model_record.json")
    model = load_trained_model("bundle")          # network (eval mode) + record + fingerprint
    record.kinds                                  # ("radiograph",) for a radiograph-only model

``{"format": "pneumoseg.model_record", "version": 1, "network": {"name": "SCSEUNet", "kwargs": {...}},
"preprocessing": {"radiograph": {...}, "ct": {...}}, "operating_threshold": 0.5, "postprocessing": {...}}``
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AXCODES",
    "CT",
    "IMAGE_KINDS",
    "MAX_RECORD_BYTES",
    "MAX_WEIGHTS_BYTES",
    "NETWORKS",
    "RADIOGRAPH",
    "RECORD_FILE",
    "RECORD_SCHEMA",
    "CTPreprocessing",
    "ModelRecord",
    "ModelRecordError",
    "NetworkSpec",
    "PostprocessingThresholds",
    "RadiographPreprocessing",
    "TrainedModel",
    "bundle_identity",
    "build_network",
    "describe_network",
    "load_state_dict",
    "load_trained_model",
    "unwrap_state_dict",
]

RECORD_FILE = "model_record.json"
"""File name of the record, in the bundle's ``models/`` folder beside ``model.pt``."""
RECORD_FORMAT = "pneumoseg.model_record"
RECORD_VERSION = 1
MAX_RECORD_BYTES = 64 * 1024
"""A record is a few hundred bytes; anything larger is refused before it is parsed."""
MAX_WEIGHTS_BYTES = 2 * 1024**3
"""Weights files larger than this are refused before they are read (SCSEUNet's are ~100 MB)."""

RADIOGRAPH, CT = "radiograph", "ct"
IMAGE_KINDS = (RADIOGRAPH, CT)
"""Kinds of image a model can be trained on: ``radiograph`` (DICOM CR/DX/DR, PNG/JPEG; one 2D image),
``ct`` (DICOM CT series or NIfTI volume, inferred slice by slice)."""


class ModelRecordError(ValueError):
    """A record, network description or weights file that cannot be used; the message names the file."""


# =========================================================================================== the parts


@dataclass(frozen=True)
class RadiographPreprocessing:
    """How radiographs were fed to the model: resized to ``image_size`` x ``image_size`` (area averaging),
    then the ``lower`` / ``upper`` intensity percentiles mapped to 0 / 1, clipped."""

    image_size: int = 512
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5


@dataclass(frozen=True)
class CTPreprocessing:
    """How CT volumes were fed to the model: brought to ``orientation`` (MONAI axis codes), the HU
    ``window`` mapped to 0 / 1, clipped, each axial slice resized in-plane to ``image_size``."""

    image_size: int = 256
    window: tuple[float, float] = (-1350.0, 150.0)  # lung window W1500 / L-600
    orientation: str = "RAS"


@dataclass(frozen=True)
class PostprocessingThresholds:
    """Probabilities -> mask (see :mod:`pneumoseg.postprocessing`): the image gate ``t_cls`` and the SIIM
    triplet ``top`` / ``min_area`` / ``bottom``. Defaults gate at the default operating threshold, so a
    model whose thresholds were never tuned does not call every image positive."""

    t_cls: float = 0.5
    top: float = 0.5
    min_area: int = 0
    bottom: float = 0.5


@dataclass(frozen=True)
class NetworkSpec:
    """A network of the closed registry :data:`NETWORKS` and its keyword arguments."""

    name: str = "SCSEUNet"
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # one form for sequences (tuples), so a spec read from JSON equals the one it was written from
        object.__setattr__(self, "kwargs", {k: tuple(v) if isinstance(v, list) else v for k, v in self.kwargs.items()})

    def build(self) -> Any:
        """The untrained ``nn.Module`` (random weights)."""
        return build_network(self)


# ============================================================================================ registry


@dataclass(frozen=True)
class NetworkType:
    """A class the record may name: how to build it and the schema of its keyword arguments."""

    factory: Callable[[], type]
    kwargs_schema: Mapping[str, Any]
    required: tuple[str, ...] = ()


def _scseunet() -> type:
    from pneumoseg.networks import SCSEUNet

    return SCSEUNet


_INT = {"type": "integer"}
NETWORKS: Mapping[str, NetworkType] = {
    "SCSEUNet": NetworkType(
        factory=_scseunet,
        # every argument of SCSEUNet but pretrained_path (a local file of the sender's; the weights are in the
        # state dict). Ranges bound the memory a declared network can take before its weights are checked.
        kwargs_schema={
            "spatial_dims": {"enum": [2]},  # inference is 2D (CT slice by slice)
            "in_channels": {"enum": [1]},  # the pipelines feed one channel
            "out_channels": {"enum": [1]},  # one class: pneumothorax
            "decoder_channels": {
                "type": "array",
                "items": {**_INT, "minimum": 1, "maximum": 1024},
                "minItems": 5,
                "maxItems": 5,
            },
            "reduction": {**_INT, "minimum": 1, "maximum": 256},
            "head_channels": {**_INT, "minimum": 1, "maximum": 1024},
            "hypercolumn": {"type": "boolean"},
            "cls_dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
            "norm": {"enum": ["batch", "instance"]},
            "upsample_mode": {"enum": ["nearest", "bilinear"]},
            "pad_input": {"type": "boolean"},
            "encoder_scse": {"type": "boolean"},
        },
    ),
}
"""The closed registry of networks a record may name (``name`` -> class and keyword-argument schema)."""


def _network_schema() -> dict[str, Any]:
    """``{"name": one of NETWORKS, "kwargs": that network's closed keyword-argument schema}``."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "kwargs"],
        "properties": {"name": {"enum": sorted(NETWORKS)}, "kwargs": {"type": "object"}},
        "allOf": [
            {
                "if": {"properties": {"name": {"const": name}}},
                "then": {
                    "properties": {
                        "kwargs": {
                            "additionalProperties": False,
                            "required": list(entry.required),
                            "properties": dict(entry.kwargs_schema),
                        }
                    }
                },
            }
            for name, entry in NETWORKS.items()
        ],
    }


_PROBABILITY = {"type": "number", "minimum": 0, "maximum": 1}
AXCODES = sorted("".join(c) for axes in itertools.permutations(("LR", "AP", "SI")) for c in itertools.product(*axes))
"""The 48 orientation codes of MONAI's ``Orientation`` (``"RAS"``, ``"LPS"``, ...)."""
_SIZE = {**_INT, "minimum": 32, "maximum": 4096}
_HU = {"type": "number", "minimum": -4096, "maximum": 65535}
RECORD_SCHEMA: Mapping[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["format", "version", "network", "preprocessing", "operating_threshold", "postprocessing"],
    "properties": {
        "format": {"const": RECORD_FORMAT},
        "version": {"const": RECORD_VERSION},
        "network": _network_schema(),
        "preprocessing": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "properties": {
                RADIOGRAPH: {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["image_size", "lower_percentile", "upper_percentile"],
                    "properties": {
                        "image_size": _SIZE,
                        "lower_percentile": {"type": "number", "minimum": 0, "maximum": 100},
                        "upper_percentile": {"type": "number", "minimum": 0, "maximum": 100},
                    },
                },
                CT: {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["image_size", "window", "orientation"],
                    "properties": {
                        "image_size": _SIZE,
                        "window": {"type": "array", "items": _HU, "minItems": 2, "maxItems": 2},
                        "orientation": {"enum": AXCODES},
                    },
                },
            },
        },
        "operating_threshold": _PROBABILITY,
        "postprocessing": {
            "type": "object",
            "additionalProperties": False,
            "required": ["t_cls", "top", "min_area", "bottom"],
            "properties": {
                "t_cls": _PROBABILITY,
                "top": _PROBABILITY,
                "min_area": {**_INT, "minimum": 0, "maximum": 100_000_000},
                "bottom": _PROBABILITY,
            },
        },
        # provenance the training adds; free text is bounded, never interpreted
        "training": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "pneumoseg_version": {"type": "string", "maxLength": 64},
                "postprocessing_source": {"enum": ["default", "validation search", "set by hand"]},
            },
        },
    },
}
"""JSON schema of a record (draft 2020-12): closed (no unknown keys anywhere), typed and range-checked."""


# ============================================================================================= the record


@dataclass(frozen=True)
class ModelRecord:
    """Everything inference must repeat of a trained model. Read with :meth:`read` / :meth:`from_dict`
    (validated), write with :meth:`write`; frozen: change it with :func:`dataclasses.replace`.

    Args:
        network: the architecture (:class:`NetworkSpec`).
        preprocessing: per image kind the model was trained on (``"radiograph"`` / ``"ct"``).
        operating_threshold: image probability at which a scan is called positive (sensitivity /
            specificity are reported at it).
        postprocessing: the thresholds turning probabilities into a mask.
        training: provenance (``pneumoseg_version``, ``postprocessing_source``).
    """

    network: NetworkSpec = field(default_factory=NetworkSpec)
    preprocessing: Mapping[str, RadiographPreprocessing | CTPreprocessing] = field(
        default_factory=lambda: {RADIOGRAPH: RadiographPreprocessing()}
    )
    operating_threshold: float = 0.5
    postprocessing: PostprocessingThresholds = field(default_factory=PostprocessingThresholds)
    training: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # validated whichever way it was made (from a file, a config or Python)
        _validate(self.to_dict(), "model record")
        radiograph, ct = self.radiograph, self.ct
        if radiograph is not None and not radiograph.lower_percentile < radiograph.upper_percentile:
            raise ModelRecordError("model record: preprocessing/radiograph: lower_percentile >= upper_percentile")
        if ct is not None and not ct.window[0] < ct.window[1]:
            raise ModelRecordError("model record: preprocessing/ct/window: the lower bound is not below the upper")

    # ------------------------------------------------------------------------------------ accessors
    @property
    def kinds(self) -> tuple[str, ...]:
        """The image kinds the model was trained on, in :data:`IMAGE_KINDS` order."""
        return tuple(k for k in IMAGE_KINDS if k in self.preprocessing)

    @property
    def radiograph(self) -> RadiographPreprocessing | None:
        return self.preprocessing.get(RADIOGRAPH)  # type: ignore[return-value]

    @property
    def ct(self) -> CTPreprocessing | None:
        return self.preprocessing.get(CT)  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "version": RECORD_VERSION,
            "network": {"name": self.network.name, "kwargs": _plain(dict(self.network.kwargs))},
            "preprocessing": {k: _plain(dataclasses.asdict(v)) for k, v in self.preprocessing.items()},
            "operating_threshold": self.operating_threshold,
            "postprocessing": dataclasses.asdict(self.postprocessing),
            **({"training": dict(self.training)} if self.training else {}),
        }

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): equal records give equal bytes."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, value: Any, source: str = "model record") -> ModelRecord:
        """A record from parsed JSON; :class:`ModelRecordError` naming ``source`` if it breaks the schema."""
        _validate(value, source)
        kinds = {RADIOGRAPH: RadiographPreprocessing, CT: CTPreprocessing}
        preprocessing = {}
        for kind, values in value["preprocessing"].items():
            if kind == CT:
                values = {**values, "window": tuple(float(v) for v in values["window"])}
            preprocessing[kind] = kinds[kind](**values)
        network = value["network"]
        return cls(
            network=NetworkSpec(network["name"], network["kwargs"]),
            preprocessing=preprocessing,
            operating_threshold=float(value["operating_threshold"]),
            postprocessing=PostprocessingThresholds(**value["postprocessing"]),
            training=dict(value.get("training", {})),
        )

    @classmethod
    def read(cls, path: str | os.PathLike) -> ModelRecord:
        """Read and validate a record file (at most :data:`MAX_RECORD_BYTES`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no model record (training writes it beside the weights; a bundle trained before "
                "pneumoseg 0.2 has none: train it again or write one with "
                "`pneumoseg bundle record --bundle DIR --image-size N`)"
            )
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise ModelRecordError(f"{path}: {path.stat().st_size} bytes, more than a record can be")
        try:
            value = json.loads(path.read_bytes())
        except (ValueError, RecursionError) as err:
            raise ModelRecordError(f"{path}: not valid JSON ({type(err).__name__})") from None
        return cls.from_dict(value, str(path))

    def write(self, path: str | os.PathLike) -> Path:
        """Write the canonical JSON atomically (a reader never sees half a record)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def digest(self) -> str:
        """SHA-256 of :meth:`to_json`: identifies what the record makes inference do."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    # ------------------------------------------------------------------------------------ for configs
    @classmethod
    def for_training(
        cls,
        network: Any,
        image_kind: str = RADIOGRAPH,
        image_size: int = 512,
        operating_threshold: float = 0.5,
        **preprocessing: Any,
    ) -> ModelRecord:
        """The record a training run writes, from a bundle config's values: ``network`` is the network
        module (``@network_def``, described by :func:`describe_network`), ``image_kind`` the kind trained
        on; ``preprocessing`` the kind's other fields (e.g. ``window`` for CT); post-processing defaults gate
        at ``operating_threshold``."""
        kinds = {RADIOGRAPH: RadiographPreprocessing, CT: CTPreprocessing}
        if image_kind not in kinds:
            raise ModelRecordError(f"image_kind {image_kind!r}: expected one of {list(kinds)}")
        if "window" in preprocessing:
            preprocessing["window"] = tuple(float(v) for v in preprocessing["window"])
        from pneumoseg import __version__

        return cls(
            network=describe_network(network),
            preprocessing={image_kind: kinds[image_kind](image_size=int(image_size), **preprocessing)},
            operating_threshold=float(operating_threshold),
            postprocessing=PostprocessingThresholds(t_cls=float(operating_threshold)),
            training={"pneumoseg_version": __version__, "postprocessing_source": "default"},
        )

    def with_postprocessing(self, thresholds: Any, source: str = "validation search") -> ModelRecord:
        """A copy with new post-processing (any object with ``t_cls``, ``top``, ``min_area``, ``bottom``)."""
        values = PostprocessingThresholds(
            float(thresholds.t_cls), float(thresholds.top), int(thresholds.min_area), float(thresholds.bottom)
        )
        return dataclasses.replace(
            self, postprocessing=values, training={**self.training, "postprocessing_source": source}
        )


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively (JSON's form, the form the schema checks)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _validate(value: Any, source: str) -> None:
    _validate_against(RECORD_SCHEMA, value, source)


def _validate_against(schema: Mapping[str, Any], value: Any, source: str) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ModelRecordError(f"{source}: {where}: {first.message[:200]}{more}")


# ============================================================================================ networks


def build_network(spec: NetworkSpec) -> Any:
    """Instantiate a registry network with validated keyword arguments (random weights)."""
    entry = NETWORKS.get(spec.name)
    if entry is None:
        raise ModelRecordError(f"network {spec.name!r} is not one of {sorted(NETWORKS)}")
    _validate_against(
        _network_schema(), {"name": spec.name, "kwargs": _plain(dict(spec.kwargs))}, f"network {spec.name}"
    )
    return entry.factory()(**dict(spec.kwargs))


def describe_network(network: Any) -> NetworkSpec:
    """The :class:`NetworkSpec` of a registry network instance, from its ``init_kwargs`` (the
    constructor arguments it keeps; ``pretrained_path`` is dropped: the weights carry what it loaded)."""
    name = type(network).__name__
    kwargs = getattr(network, "init_kwargs", None)
    if name not in NETWORKS or not isinstance(kwargs, Mapping):
        raise ModelRecordError(f"{name}: not a network of the registry {sorted(NETWORKS)}")
    allowed = NETWORKS[name].kwargs_schema
    return NetworkSpec(name, {k: v for k, v in kwargs.items() if k in allowed})


# ============================================================================================= weights


def unwrap_state_dict(obj: Any, source: str = "weights") -> dict[str, Any]:
    """A plain state dict from what a checkpoint holds: the dict itself, ``{"model": sd}`` (MONAI's
    ``CheckpointSaver``) or ``{"state_dict": sd}``; a DDP ``module.`` prefix is stripped. The one
    unwrapper of the project."""
    import torch

    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelRecordError(f"{source}: not a state dict (or {{'model': state_dict}})")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def load_state_dict(path: str | os.PathLike, max_bytes: int = MAX_WEIGHTS_BYTES) -> dict[str, Any]:
    """Read weights without running code: ``torch.load(weights_only=True)`` (``.pt`` / ``.pth``) or
    safetensors (``.safetensors``), at most ``max_bytes``; unwrapped by :func:`unwrap_state_dict`."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path} (train the bundle first)")
    size = path.stat().st_size
    if size > max_bytes:
        raise ModelRecordError(f"{path}: {size} bytes, more than the {max_bytes} allowed for weights")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return unwrap_state_dict(load_file(str(path)), str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for anything but tensors and containers
        raise ModelRecordError(f"{path}: not a weights-only checkpoint ({type(err).__name__})") from None
    return unwrap_state_dict(obj, str(path))


# ======================================================================================= trained model


@dataclass
class TrainedModel:
    """A network with its trained weights (eval mode), its record and identity.

    ``fingerprint`` (16 hex) identifies what inference outputs depend on: the weights and the record.
    """

    network: Any
    record: ModelRecord
    name: str
    version: str
    weights_sha256: str
    fingerprint: str


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _name_and_version(bundle: Path) -> tuple[str, str]:
    """Name and version from ``configs/metadata.json``, read as data (bounded; strings only)."""
    meta_path = bundle / "configs" / "metadata.json"
    try:
        if meta_path.stat().st_size <= 1024 * 1024:
            meta = json.loads(meta_path.read_bytes())
            name, version = meta.get("name"), meta.get("version")
            if isinstance(name, str) and isinstance(version, str):
                return name[:128], version[:64]
    except (OSError, ValueError, AttributeError, RecursionError):
        pass
    return bundle.resolve().name, "0"


def bundle_identity(bundle: str | os.PathLike) -> tuple[str, str]:
    """(name, version) of a bundle from ``configs/metadata.json``, read as data (bounded, strings only);
    the folder's name and ``"0"`` when it has none."""
    return _name_and_version(Path(bundle))


def load_trained_model(
    bundle: str | os.PathLike,
    device: Any = "cpu",
    weights: str = "models/model.pt",
    record: ModelRecord | None = None,
) -> TrainedModel:
    """The bundle's trained network from data only: ``models/model_record.json`` (validated) names the
    network, ``weights`` (relative to ``bundle``) is loaded strictly into it. Nothing of the bundle is
    executed or imported; its configs are not read. ``record``: use this record instead of the file."""
    import torch

    root = Path(bundle)
    record = record or ModelRecord.read(root / "models" / RECORD_FILE)
    weights_path = root / weights
    state = load_state_dict(weights_path)
    network = record.network.build()
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0:2]
        raise ModelRecordError(f"{weights_path} does not fit the network of the record: {' '.join(first)}") from None
    name, version = _name_and_version(root)
    weights_sha = _file_sha256(weights_path)
    fingerprint = hashlib.sha256(f"{weights_sha}|{record.digest()}".encode()).hexdigest()[:16]
    network = network.to(torch.device(device) if isinstance(device, str) else device).eval()
    return TrainedModel(network, record, name, version, weights_sha, fingerprint)
