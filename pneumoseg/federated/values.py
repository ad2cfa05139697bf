"""What a federated job may tell a site, what a site keeps to itself, and what a site may send back.

Three closed vocabularies, each checked against a JSON schema (no unknown key anywhere):

- :class:`JobValues`: the numbers the server provisions (rounds, local epochs, learning rate, input size, the
  network's keyword arguments from the closed registry of :mod:`pneumoseg.model_record`). Never code, never a
  path: a site runs the training configs shipped with its own installed pneumoseg, filled with these values.
- :class:`SiteConfig`: the site-local file naming the manifest, the data root and a work folder. It never
  leaves the site; the job does not even name it (the client finds it through
  :data:`SITE_CONFIG_ENV`).
- :data:`METRIC_NAMES`: the only metric names a site sends, each a finite number measured on the site's
  validation split, beside the weights.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pneumoseg.model_record import NETWORKS

__all__ = [
    "METRIC_NAMES",
    "BUNDLE_METRICS",
    "SITE_CONFIG_ENV",
    "MAX_CONFIG_BYTES",
    "FederatedConfigError",
    "JobValues",
    "SiteConfig",
    "site_metrics",
]

SITE_CONFIG_ENV = "PNEUMOSEG_FEDERATED_SITE_CONFIG"
"""Environment variable holding the path of the site-local config (``{site}`` is replaced by the site's
FLARE name, so that one machine can play several sites in a simulation)."""
MAX_CONFIG_BYTES = 64 * 1024

BUNDLE_METRICS: Mapping[str, str] = {
    "siim_dice": "val_siim_dice",
    "positive_dice": "val_siim_dice_positive",
    "auc": "val_auc",
    "sensitivity": "val_sensitivity",
    "specificity": "val_specificity",
}
"""Metric a site sends -> the name the bundle's evaluator gives it (``validate#key_metric`` and
``validate#additional_metrics`` of ``train.json``)."""
METRIC_NAMES: tuple[str, ...] = tuple(BUNDLE_METRICS)
"""The closed list of metric names a site may send (SIIM Dice, positive-only Dice, image-level AUC,
sensitivity and specificity at the operating threshold), all on its validation split."""


class FederatedConfigError(ValueError):
    """Job values or a site config that cannot be used; the message names the source."""


def _check(schema: Mapping[str, Any], value: Any, source: str) -> None:
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.absolute_path))
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise FederatedConfigError(f"{source}: {where}: {errors[0].message[:200]}{more}")


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise FederatedConfigError(f"{path}: larger than a {what} can be ({MAX_CONFIG_BYTES} bytes)")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:
        raise FederatedConfigError(f"{path}: not valid JSON ({type(err).__name__})") from None


# ============================================================================================ job values

_INT = {"type": "integer"}


def _job_schema() -> dict[str, Any]:
    network_kwargs = NETWORKS["SCSEUNet"].kwargs_schema
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["rounds", "local_epochs", "learning_rate", "image_size"],
        "properties": {
            "rounds": {**_INT, "minimum": 1, "maximum": 10_000},
            "local_epochs": {**_INT, "minimum": 1, "maximum": 1_000},
            "learning_rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "warmup_epochs": {**_INT, "minimum": 0, "maximum": 1_000},
            "image_size": {**_INT, "minimum": 32, "maximum": 4096},
            "operating_threshold": {"type": "number", "minimum": 0, "maximum": 1},
            "seed": {**_INT, "minimum": 0, "maximum": 2**31 - 1},
            "network": {"type": "object", "additionalProperties": False, "properties": dict(network_kwargs)},
        },
    }


JOB_SCHEMA: Mapping[str, Any] = _job_schema()
"""Closed JSON schema of :class:`JobValues` (numbers, booleans and the registry network's arguments)."""


@dataclass(frozen=True)
class JobValues:
    """The values a federated job provisions to every site.

    Args:
        rounds: federated rounds (the learning-rate schedule spans ``rounds * local_epochs`` epochs).
        local_epochs: epochs each site trains per round.
        learning_rate: peak learning rate of the bundle's optimizer.
        warmup_epochs: linear warm-up of the schedule, in epochs.
        image_size: radiograph input size (every site trains and validates at this size).
        operating_threshold: image probability at which a scan is called positive.
        seed: seed of each site's training (shuffling, augmentation).
        network: keyword arguments of the registry's ``SCSEUNet`` (e.g. ``decoder_channels``).
    """

    rounds: int
    local_epochs: int
    learning_rate: float
    image_size: int
    warmup_epochs: int = 1
    operating_threshold: float = 0.5
    seed: int = 0
    network: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(JOB_SCHEMA, self.to_dict(), "federated job values")

    @property
    def total_epochs(self) -> int:
        """Epochs each site trains over the whole job."""
        return self.rounds * self.local_epochs

    def to_dict(self) -> dict[str, Any]:
        value = asdict(self)
        value["network"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(self.network).items()}
        return value

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, value: Any, source: str = "federated job values") -> JobValues:
        _check(JOB_SCHEMA, value, source)
        return cls(**value)

    @classmethod
    def from_json(cls, text: str, source: str = "federated job values") -> JobValues:
        if len(text) > MAX_CONFIG_BYTES:
            raise FederatedConfigError(f"{source}: longer than job values can be")
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise FederatedConfigError(f"{source}: not valid JSON ({type(err).__name__})") from None
        return cls.from_dict(value, source)


# =========================================================================================== site config

SITE_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["manifest", "work_dir"],
    "properties": {
        "manifest": {"type": "string", "minLength": 1, "maxLength": 4096},
        "data_root": {"type": ["string", "null"], "maxLength": 4096},
        "work_dir": {"type": "string", "minLength": 1, "maxLength": 4096},
        "train_split": {"type": "string", "minLength": 1, "maxLength": 64},
        "val_split": {"type": "string", "minLength": 1, "maxLength": 64},
        "batch_size": {**_INT, "minimum": 1, "maximum": 4096},
        "val_batch_size": {**_INT, "minimum": 1, "maximum": 4096},
        "num_workers": {**_INT, "minimum": 0, "maximum": 256},
        "cache_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "cpu_bf16": {"type": "boolean"},
    },
}
"""Closed JSON schema of a site-local config."""


@dataclass(frozen=True)
class SiteConfig:
    """A site's own settings, read from a file that stays at the site (see :data:`SITE_CONFIG_ENV`).

    Args:
        manifest: the site's manifest (MONAI datalist JSON of ``pneumoseg manifest``).
        work_dir: where the site's training writes its checkpoints, logs and metrics.
        data_root: folder the manifest's paths are relative to (default: the manifest's own).
        train_split, val_split: manifest splits to train and validate on.
        batch_size, val_batch_size, num_workers, cache_rate, cpu_bf16: the machine's share of the work
            (the bundle's ``train.json`` keys of the same names).

    Relative paths are relative to the config file's folder.
    """

    manifest: str
    work_dir: str
    data_root: str | None = None
    train_split: str = "training"
    val_split: str = "validation"
    batch_size: int = 8
    val_batch_size: int = 8
    num_workers: int = 2
    cache_rate: float = 0.0
    cpu_bf16: bool = False

    def __post_init__(self) -> None:
        _check(SITE_SCHEMA, asdict(self), "site config")

    def write(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> SiteConfig:
        path = Path(path)
        value = _read_json(path, "site config")
        _check(SITE_SCHEMA, value, str(path))
        base = path.resolve().parent
        for key in ("manifest", "work_dir", "data_root"):
            if value.get(key):
                value[key] = str(base / value[key])
        return cls(**value)

    @classmethod
    def for_site(cls, site: str, environ: Mapping[str, str] | None = None) -> SiteConfig:
        """The config of FLARE site ``site``: the file named by :data:`SITE_CONFIG_ENV`."""
        environ = os.environ if environ is None else environ
        template = environ.get(SITE_CONFIG_ENV)
        if not template:
            raise FederatedConfigError(
                f"{SITE_CONFIG_ENV} is not set: point it at this site's config (manifest, data root, work folder) "
                "before starting the FLARE client (see docs/federated.md)"
            )
        return cls.read(template.replace("{site}", site))


# =============================================================================================== metrics


def site_metrics(bundle_metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics a site sends: :data:`METRIC_NAMES` taken from the bundle evaluator's metrics, finite
    numbers only (a metric that cannot be measured, e.g. positive Dice without positives, is left out)."""
    out = {}
    for name, source in BUNDLE_METRICS.items():
        value = bundle_metrics.get(source)
        if isinstance(value, bool) or value is None:
            continue
        try:  # python, numpy or one-element torch numbers
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[name] = number
    return out
