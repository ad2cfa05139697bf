"""SIIM-ACR run-length encoding of pneumothorax masks, the SIIM CSV files, and MONAI decode transforms.

The SIIM-ACR Pneumothorax challenge encodes a mask ``[H, W]`` (H = DICOM Rows, W = Columns) as runs over
the *column-major* flattening (flat index = col * H + row, i.e. the transposed image read row by row), and
the runs are *relative*: the first number is the absolute 0-based start of the first run, each later
"start" is the gap since the end of the previous run; tokens are pairs ``(start-or-gap, length)``.
Example: in a 1024 x 1024 mask the pixels (row 0, col 0), (row 1, col 0), (row 0, col 1) encode to
``"0 2 1022 1"``. An empty mask is ``"-1"``; an image with several pneumothoraces has one CSV row per
instance, and its mask is their union.

A conventional *absolute* RLE (every start absolute, optionally 1-based, as in other Kaggle challenges) is
available with ``encoding="absolute"``; it is never guessed from the data.

``DecodeSIIMRLE`` / ``DecodeSIIMRLEd`` are created on first access (PEP 562 module ``__getattr__``) so that
importing the codec does not import MONAI/torch (several seconds), e.g. for ``pneumoseg synth --help``.
"""

from __future__ import annotations

import copy
import csv
import re
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "EMPTY_RLE",
    "Encoding",
    "encode_siim_rle",
    "decode_siim_rle",
    "validate_siim_rle",
    "read_siim_csv",
    "write_siim_csv",
    "DecodeSIIMRLE",  # noqa: F822 (created lazily by __getattr__ below)
    "DecodeSIIMRLEd",  # noqa: F822
]

EMPTY_RLE = "-1"
Encoding = Literal["siim-relative", "absolute"]
_ENCODINGS = ("siim-relative", "absolute")
_INT_TOKEN = re.compile(r"^[+-]?\d+$")


def _check_encoding(encoding: str, one_based: bool) -> None:
    if encoding not in _ENCODINGS:
        raise ValueError(f"unknown RLE encoding {encoding!r}; expected one of {_ENCODINGS}")
    if one_based and encoding != "absolute":
        # SIIM's relative format is defined 0-based; a 1-based variant would be a different format
        raise ValueError("one_based=True only applies to encoding='absolute'")


def encode_siim_rle(mask: np.ndarray, encoding: Encoding = "siim-relative", one_based: bool = False) -> str:
    """Encode a binary mask as an RLE string.

    Args:
        mask: ``[H, W]`` (or ``[1, H, W]``) array; nonzero = foreground.
        encoding: ``"siim-relative"`` (challenge format) or ``"absolute"`` (absolute starts).
        one_based: absolute starts counted from 1 (only with ``encoding="absolute"``).

    Returns:
        Space-separated ``start-or-gap length`` pairs over the column-major flattening, or ``"-1"`` if
        the mask is empty. Unlike the challenge's reference ``mask2rle``, a run that touches the last
        pixel is kept.
    """
    _check_encoding(encoding, one_based)
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W] or [1, H, W], got shape {mask.shape}")
    flat = mask.astype(bool).ravel(order="F")  # column-major: flat index = col * H + row
    # padding with background on both sides makes every run have a rising and a falling edge,
    # including runs at pixel 0 and at the last pixel
    edges = np.diff(np.concatenate(([False], flat, [False])).view(np.int8))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    if starts.size == 0:
        return EMPTY_RLE
    lengths = ends - starts
    if encoding == "siim-relative":
        firsts = starts.copy()
        firsts[1:] = starts[1:] - ends[:-1]
    else:
        firsts = starts + int(one_based)
    return " ".join(map(str, np.stack([firsts, lengths], axis=1).ravel().tolist()))


def _parse_tokens(rle: str) -> np.ndarray:
    tokens = rle.split()
    try:
        values = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next((i, t) for i, t in enumerate(tokens) if not _INT_TOKEN.match(t) or len(t) > 18)
        raise ValueError(f"token {bad[0]} ({bad[1]!r}) is not an integer") from None
    if values.size % 2:
        raise ValueError(f"odd number of tokens ({values.size}); expected (start, length) pairs")
    negative = np.flatnonzero(values < 0)
    if negative.size:
        raise ValueError(f"negative number {values[negative[0]]} at token {negative[0]}")
    return values


def _decode_one(rle: str, n_pixels: int, encoding: str, one_based: bool) -> tuple[np.ndarray, np.ndarray]:
    """Return (starts, ends) as 0-based absolute flat indices, validated against ``n_pixels``."""
    values = _parse_tokens(rle)
    firsts, lengths = values[0::2], values[1::2]
    if encoding == "siim-relative":
        # start_i = sum of gaps up to i + sum of lengths before i
        starts = np.cumsum(firsts) + np.concatenate(([0], np.cumsum(lengths)[:-1]))
    else:
        if one_based and firsts.size and firsts.min() < 1:
            raise ValueError(f"start 0 at token {2 * int(np.argmin(firsts))} in a 1-based RLE")
        starts = firsts - int(one_based)
    ends = starts + lengths
    if ends.size:
        last = int(np.argmax(ends))
        if ends[last] > n_pixels:
            raise ValueError(
                f"run {last} (tokens {2 * last}-{2 * last + 1}) ends at flat pixel {int(ends[last])}, "
                f"past the end of the image ({n_pixels} pixels) by {int(ends[last]) - n_pixels} pixels"
            )
    return starts, ends


def _iter_runs(
    rle: str | Sequence[str], height: int, width: int, encoding: str, one_based: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield validated 0-based absolute (starts, ends) per non-empty RLE row."""
    _check_encoding(encoding, one_based)
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    for i, row in enumerate([rle] if isinstance(rle, str) else list(rle)):
        if not isinstance(row, str):
            raise ValueError(f"RLE row {i}: expected a string, got {type(row).__name__}")
        text = row.strip()
        if text == EMPTY_RLE:
            continue
        if not text:
            raise ValueError(f"RLE row {i}: blank string (an empty mask is written {EMPTY_RLE!r})")
        try:
            yield _decode_one(text, height * width, encoding, one_based)
        except ValueError as err:
            raise ValueError(f"RLE row {i} ({height}x{width} image): {err}") from None


def decode_siim_rle(
    rle: str | Sequence[str],
    height: int,
    width: int,
    encoding: Encoding = "siim-relative",
    one_based: bool = False,
) -> np.ndarray:
    """Decode one RLE string or several (one per pneumothorax instance) to a mask.

    Args:
        rle: an RLE string, or a sequence of them (their union is returned); ``"-1"`` is empty.
        height: image rows H.
        width: image columns W.
        encoding: ``"siim-relative"`` (challenge format) or ``"absolute"``.
        one_based: absolute starts counted from 1 (only with ``encoding="absolute"``).

    Returns:
        Bool mask ``[H, W]``.

    Raises:
        ValueError: naming the row and the problem (blank string, non-integer token, odd token count,
            negative number, run past the end of the image and by how much).
    """
    height, width = int(height), int(width)
    # +1 difference array: +1 at each start, -1 at each end; a cumulative sum > 0 marks foreground,
    # which also handles overlapping runs (union) without a Python loop over pixels
    delta = np.zeros(max(height * width, 0) + 1, dtype=np.int32)
    for starts, ends in _iter_runs(rle, height, width, encoding, one_based):
        np.add.at(delta, starts, 1)
        np.add.at(delta, ends, -1)
    flat = np.cumsum(delta[:-1]) > 0
    return flat.reshape((height, width), order="F")


def validate_siim_rle(
    rle: str | Sequence[str],
    height: int,
    width: int,
    encoding: Encoding = "siim-relative",
    one_based: bool = False,
) -> int:
    """Check RLE row(s) against an ``H x W`` image like :func:`decode_siim_rle`, without building the mask
    (manifests check thousands of 1024^2 images).

    Returns:
        Total run length over all rows (overlapping runs counted per run); > 0 iff the mask is non-empty.

    Raises:
        ValueError: as :func:`decode_siim_rle`.
    """
    total = 0
    for starts, ends in _iter_runs(rle, height, width, encoding, one_based):
        total += int((ends - starts).sum())
    return total


# ---------------------------------------------------------------------------------------------- CSV

_HEADER = ("ImageId", "EncodedPixels")
CsvStyle = Literal["stage1", "stage2"]


def read_siim_csv(path: str | Path) -> dict[str, list[str]]:
    """Read a SIIM RLE CSV (stage-1 ``ImageId, EncodedPixels`` with leading spaces, or stage-2
    ``ImageId,EncodedPixels``).

    Returns:
        ImageId -> list of RLE rows (stripped), in file order; ``["-1"]`` for an image without
        pneumothorax. Duplicate rows are kept (they are separate instances or harmless repeats).

    Raises:
        ValueError: naming the file and line for a wrong header or a row without exactly two fields.
    """
    path = Path(path)
    rows: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != _HEADER:
            raise ValueError(f"{path}: expected header 'ImageId,EncodedPixels', got {header!r}")
        for fields in reader:
            if not fields or all(not x.strip() for x in fields):
                continue  # trailing blank line
            if len(fields) != 2:
                raise ValueError(f"{path}:{reader.line_num}: expected 2 fields, got {len(fields)}: {fields!r}")
            image_id, rle = fields[0].strip(), fields[1].strip()
            if not image_id:
                raise ValueError(f"{path}:{reader.line_num}: empty ImageId")
            rows.setdefault(image_id, []).append(rle)
    return rows


def write_siim_csv(path: str | Path, rows: Mapping[str, Sequence[str]], style: CsvStyle = "stage1") -> None:
    """Write ImageId -> RLE rows as a SIIM CSV, one line per RLE row (write ``["-1"]`` for empty).

    ``style="stage1"`` writes ``ImageId, EncodedPixels`` and ``id, rle`` with the leading space of the
    challenge's stage-1 ``train-rle.csv``; ``style="stage2"`` writes ``stage_2_train.csv`` style without.
    """
    if style not in ("stage1", "stage2"):
        raise ValueError(f"unknown SIIM CSV style {style!r}; expected 'stage1' or 'stage2'")
    sep = ", " if style == "stage1" else ","
    lines = [sep.join(_HEADER)]
    for image_id, rles in rows.items():
        if isinstance(rles, str):
            raise ValueError(f"{path}: rows[{image_id!r}] must be a list of RLE strings, not a string")
        if not rles:
            raise ValueError(f"{path}: rows[{image_id!r}] is empty; write ['-1'] for an empty mask")
        for rle in rles:
            # written by hand rather than with csv.writer, which cannot produce the stage-1 leading space
            if any(c in str(image_id) + rle for c in ',"\n\r'):
                raise ValueError(f"{path}: ImageId {image_id!r} or its RLE contains a comma, quote or newline")
            lines.append(f"{image_id}{sep}{rle.strip()}")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------- MONAI transforms

_LAZY: dict[str, type] = {}


def _build_transforms() -> None:
    import torch
    from monai.config import KeysCollection
    from monai.data import MetaTensor
    from monai.transforms import MapTransform, Transform

    class DecodeSIIMRLE(Transform):
        """Decode SIIM RLE row(s) to a float mask ``[1, H, W]`` (union of rows; ``"-1"`` = empty).

        Args:
            encoding: ``"siim-relative"`` or ``"absolute"``, see :func:`decode_siim_rle`.
            one_based: absolute starts counted from 1.
            dtype: output dtype.
        """

        def __init__(
            self, encoding: Encoding = "siim-relative", one_based: bool = False, dtype: Any = torch.float32
        ) -> None:
            _check_encoding(encoding, one_based)
            self.encoding = encoding
            self.one_based = one_based
            self.dtype = dtype

        def __call__(self, rle: str | Sequence[str], spatial_shape: Sequence[int]) -> torch.Tensor:
            """``spatial_shape`` is ``(H, W)``; returns a ``[1, H, W]`` tensor."""
            height, width = (int(s) for s in spatial_shape[-2:])
            mask = decode_siim_rle(rle, height, width, encoding=self.encoding, one_based=self.one_based)
            return torch.as_tensor(mask[None]).to(self.dtype)

    class DecodeSIIMRLEd(MapTransform):
        """Dictionary version of :class:`DecodeSIIMRLE`: the size comes from the loaded image.

        Args:
            keys: key(s) holding RLE rows (a string or list of strings), e.g. ``"label_rle"``.
            ref_key: key of the loaded image ``[C, H, W]`` whose H, W (and meta/affine) the mask takes.
            output_key: key(s) to write the ``[1, H, W]`` MetaTensor mask to, one per key.
            allow_missing_keys: don't raise if a key is absent.
        """

        def __init__(
            self,
            keys: KeysCollection = "label_rle",
            ref_key: str = "image",
            output_key: str | Sequence[str] = "label",
            encoding: Encoding = "siim-relative",
            one_based: bool = False,
            dtype: Any = torch.float32,
            allow_missing_keys: bool = False,
        ) -> None:
            super().__init__(keys, allow_missing_keys)
            self.ref_key = ref_key
            out = [output_key] if isinstance(output_key, str) else list(output_key)
            if len(out) != len(self.keys):
                raise ValueError(f"{len(self.keys)} keys but {len(out)} output keys")
            self.output_key = dict(zip(self.keys, out, strict=True))
            self.decoder = DecodeSIIMRLE(encoding=encoding, one_based=one_based, dtype=dtype)

        def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
            d = dict(data)
            ref = d[self.ref_key]
            for key in self.key_iterator(d):
                try:
                    mask = self.decoder(d[key], ref.shape[-2:])
                except ValueError as err:
                    source = ref.meta.get("filename_or_obj", "?") if isinstance(ref, MetaTensor) else "?"
                    raise ValueError(f"{key!r} of image {source}: {err}") from None
                if isinstance(ref, MetaTensor):
                    meta = copy.deepcopy(dict(ref.meta))
                    meta["affine"] = ref.affine.clone()
                    d[self.output_key[key]] = MetaTensor(mask, meta=meta)
                else:
                    d[self.output_key[key]] = MetaTensor(mask)
            return d

    for cls in (DecodeSIIMRLE, DecodeSIIMRLEd):
        # as if defined at module level, so that pickle (DataLoader workers) finds them by name
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
        _LAZY[cls.__name__] = cls


def __getattr__(name: str) -> type:
    if name in ("DecodeSIIMRLE", "DecodeSIIMRLEd"):
        if not _LAZY:
            _build_transforms()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
