"""The bundle shipped with the installed pneumoseg: the only configs a receiving command ever runs.

A received bundle is data (weights, ONNX, model record, metadata, model card). Whatever the receiving side
runs on it (fine-tuning with ``python -m monai.bundle run training``, the metadata schema verify checks
against) comes from here: the ``bundles/pneumothorax_scse_unet`` folder of the checkout pneumoseg is
installed from (``pip install -e .``, as ``pneumoseg demo`` assumes too), filled with the validated values of
the received record. The sender's configs may travel as documents (``reference/configs/*.json``); verify
compares them with these templates and nothing reads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["installed_bundle", "installed_configs", "installed_metadata_schema"]

BUNDLE_NAME = "pneumothorax_scse_unet"


def installed_bundle() -> Path:
    """The installed pneumoseg's bundle folder (configs, model card, licence); ``FileNotFoundError`` if
    pneumoseg was not installed from a checkout."""
    root = Path(__file__).resolve().parents[2] / "bundles" / BUNDLE_NAME
    if not (root / "configs" / "train.json").is_file():
        raise FileNotFoundError(
            f"{root}: the installed pneumoseg has no bundle templates (install it from a checkout: pip install -e .)"
        )
    return root


def installed_configs() -> Path:
    """``configs/`` of :func:`installed_bundle`."""
    return installed_bundle() / "configs"


def installed_metadata_schema() -> dict[str, Any]:
    """MONAI's metadata schema, the offline copy of this installation (never a received bundle's copy)."""
    return json.loads((installed_configs() / "meta_schema.json").read_text())
