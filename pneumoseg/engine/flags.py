"""Boolean config values as the command line delivers them."""

from __future__ import annotations

from typing import Any

__all__ = ["as_flag"]

_WORDS = {"true": True, "false": False}


def as_flag(value: Any, name: str) -> bool:
    """``value`` as a bool: ``True`` / ``False``, or the words ``true`` / ``false`` in any case.

    ``python -m monai.bundle run --resume false`` hands the configs the *string* ``"false"`` (``fire`` parses
    Python literals only), which Python would take as true; anything else raises, naming the option.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _WORDS:
        return _WORDS[value.strip().lower()]
    raise ValueError(f"{name} must be True or False, got {value!r}")
