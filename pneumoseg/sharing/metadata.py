"""A received ``configs/metadata.json``, read as data: bounded JSON, MONAI's metadata schema (this
installation's copy), and no text MONAI would treat as code.

The receiving side never gives a received metadata file to MONAI. A bundle derived from a received one for
fine-tuning does carry its metadata (name, changelog) into a folder that ``python -m monai.bundle run`` reads
with ``--meta_file``, and MONAI evaluates ``$`` expressions, ``@`` references and ``%`` macros found there
when a config or a workflow property reaches them (``@_meta_#...``). So a metadata file whose text looks like
any of them, or holds a key MONAI treats specially (``_target_``, ``_requires_``, ...), is refused: metadata
is plain text and numbers.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MAX_METADATA_BYTES", "metadata_problems", "read_json", "read_metadata", "sender_metrics"]

MAX_METADATA_BYTES = 1024 * 1024
MAX_DEPTH = 32
_MONAI_SYNTAX = ("$", "@", "%")
_SPECIAL_KEY = re.compile(r"_\w*_")


def read_json(path: str | os.PathLike, max_bytes: int = MAX_METADATA_BYTES) -> Any:
    """Parse a JSON file of at most ``max_bytes``; ``ValueError`` naming the file otherwise."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path.name}: {size} bytes, more than the {max_bytes} allowed")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{path.name}: not valid JSON ({type(err).__name__})") from None


def _syntax_problems(value: Any, where: str, depth: int = 0) -> list[str]:
    if depth > MAX_DEPTH:
        return [f"{where}: nested deeper than {MAX_DEPTH} levels"]
    problems = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if _SPECIAL_KEY.fullmatch(key):
                problems.append(f"{where}/{key}: a key MONAI interprets ({key}); metadata is plain data")
            elif key.startswith(_MONAI_SYNTAX):
                problems.append(f"{where}: key {key[:40]!r} looks like MONAI syntax; metadata is plain data")
            problems += _syntax_problems(item, f"{where}/{key}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            problems += _syntax_problems(item, f"{where}/{i}", depth + 1)
    elif isinstance(value, str) and value.startswith(_MONAI_SYNTAX):
        kind = {"$": "an expression", "@": "a reference", "%": "a macro"}[value[0]]
        problems.append(f"{where}: text starting with {value[0]!r} is {kind} to MONAI; metadata is plain data")
    return problems


def metadata_problems(value: Any, schema: Mapping[str, Any] | None = None) -> list[str]:
    """Why ``value`` is not acceptable metadata: MONAI's schema (default: this installation's copy), a
    changelog entry for the version, and nothing MONAI would evaluate, resolve or instantiate."""
    import jsonschema

    from pneumoseg.sharing.templates import installed_metadata_schema

    if not isinstance(value, Mapping):
        return ["not a JSON object"]
    problems = _syntax_problems(value, "metadata.json")
    if problems:
        return problems[:10]
    schema = schema if schema is not None else installed_metadata_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    for error in sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.absolute_path)))[:10]:
        where = "/".join(map(str, error.absolute_path)) or "(top level)"
        problems.append(f"{where}: {error.message[:200]}")
    version, changelog = value.get("version"), value.get("changelog")
    if isinstance(version, str) and isinstance(changelog, Mapping) and version not in changelog:
        problems.append(f"version {version[:40]!r} has no changelog entry")
    for key in ("name", "version"):
        if not isinstance(value.get(key), str) or not value.get(key):
            problems.append(f"{key}: missing")
    return problems


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A validated metadata file (:func:`metadata_problems`); ``ValueError`` naming the first problems."""
    value = read_json(path)
    problems = metadata_problems(value)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems[:3]))
    return dict(value)


def sender_metrics(meta: Mapping[str, Any]) -> dict[str, float]:
    """The numeric ``eval_metrics`` the sender reported (anything else is dropped)."""
    metrics = meta.get("eval_metrics")
    if not isinstance(metrics, Mapping):
        return {}
    return {
        str(k)[:64]: float(v)
        for k, v in list(metrics.items())[:100]
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
