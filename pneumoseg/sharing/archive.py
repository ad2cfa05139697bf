"""The closed layout of a shared bundle, and bounded reading of a received archive or folder.

A shared bundle is one top-level folder holding only the members of :data:`MEMBERS` (exact lower-case
spelling) and documents under ``reference/configs/`` (:data:`REFERENCE_CONFIG`); nothing else is accepted,
whatever its name or case (``configs/inference.JSON`` is refused like ``configs/inference.json``, and so is
``pneumoseg.py``). Reading is bounded whatever the archive: the member count is read from the zip's end
record before its central directory is parsed, declared sizes are checked before anything is
decompressed, members are streamed in 1 MiB blocks (hashed on the way) and never read past their
declared size, and duplicates are found with a set of normalised names.

    problems, members = read_zip("bundle.zip", staging_dir, ArchiveLimits())
    problems, members = read_folder("imported_bundle", ArchiveLimits())
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ALLOWED_FOLDERS",
    "CHECKSUM_FILE",
    "MEMBERS",
    "REFERENCE_CONFIG",
    "REQUIRED",
    "SIGNATURE_FILE",
    "ArchiveLimits",
    "Member",
    "checksum_manifest",
    "classify",
    "printable",
    "shortened",
    "read_folder",
    "read_zip",
    "write_zip",
]

CHECKSUM_FILE = "checksums.sha256"
"""Checksum manifest at the bundle root, ``sha256sum`` format (``sha256sum -c checksums.sha256`` works)."""
SIGNATURE_FILE = "checksums.sha256.sig"
"""Ed25519 signature of the checksum manifest (:mod:`pneumoseg.sharing.signing`)."""

TEXT, BINARY = "text", "binary"
MEMBERS: Mapping[str, str] = {
    CHECKSUM_FILE: TEXT,
    SIGNATURE_FILE: TEXT,
    "configs/metadata.json": TEXT,
    "models/model_record.json": TEXT,
    "models/model.pt": BINARY,
    "models/model.onnx": BINARY,
    "docs/README.md": TEXT,
    "LICENSE": TEXT,
}
"""Every member a shared bundle may hold (besides reference configs), with its kind (size limit)."""
REQUIRED = (CHECKSUM_FILE, "configs/metadata.json", "models/model_record.json", "models/model.pt")
REFERENCE_CONFIG = re.compile(r"reference/configs/[a-z0-9][a-z0-9_-]{0,63}\.json")
"""The sender's MONAI configs, carried as documents: no receiving command reads them."""
MAX_REFERENCE_CONFIGS = 32
ALLOWED_FOLDERS = frozenset({"configs", "models", "docs", "reference", "reference/configs"})
_TOP_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_BLOCK = 1 << 20
_MiB = 1 << 20

# why some members are refused, for a message that says more than "not in the list"
_REFUSED_KINDS: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r".*\.(ts|pt2|jit|torchscript)", re.I), "TorchScript is code (torch.jit.load runs what it holds)"),
    (re.compile(r"models/.*\.(pth|pt|ckpt|bin|safetensors)", re.I), "the weights travel as models/model.pt"),
    (re.compile(r".*\.(py|pyc|pyw|pth|so|dll|dylib|pyd|sh|bat|exe)", re.I), "a code file"),
    (re.compile(r"configs/.*\.(conf|ini|cfg)", re.I), "a logging configuration is code (fileConfig evaluates it)"),
    (
        re.compile(r"configs/.*\.(json|ya?ml)", re.I),
        "a config the receiving side would run (the sender's configs travel as reference/configs/*.json)",
    ),
)


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what is read from a received bundle (each one refuses the bundle when exceeded).

    Args:
        max_members: files and folders in the archive (the closed layout has 8 files plus at most 32
            reference configs).
        max_member_bytes: uncompressed size of one weights / ONNX file.
        max_total_bytes: uncompressed size of all members together.
        max_text_bytes: uncompressed size of one text member (JSON, Markdown, licence, manifest).
    """

    max_members: int = 64
    max_member_bytes: int = 1024 * _MiB
    max_total_bytes: int = 2048 * _MiB
    max_text_bytes: int = 1 * _MiB

    def member_limit(self, name: str) -> int:
        return self.max_member_bytes if MEMBERS.get(name) == BINARY else self.max_text_bytes


@dataclass(frozen=True)
class Member:
    """A member that was read: canonical ``name`` (relative to the bundle root), its ``size`` and
    ``sha256`` (computed while streaming) and the ``path`` holding its bytes."""

    name: str
    size: int
    sha256: str
    path: Path


# ============================================================================================= names


def classify(name: str) -> str | None:
    """Why ``name`` (relative to the bundle root, POSIX) is not a member of the layout; ``None`` if it is."""
    if name in MEMBERS or REFERENCE_CONFIG.fullmatch(name):
        return None
    folded = name.casefold()
    for allowed in MEMBERS:
        if allowed.casefold() == folded:
            return f"not accepted: spelled differently from {allowed} (only the exact spelling is accepted)"
    if folded.startswith("reference/configs/"):
        return "not accepted: reference configs are named reference/configs/[a-z0-9_-].json (lower case)"
    for pattern, why in _REFUSED_KINDS:
        if pattern.fullmatch(name):
            return f"not accepted: {why}"
    return "not accepted: not part of the closed bundle layout (docs/sharing.md, 'What crosses')"


def _name_problem(name: str) -> str | None:
    if len(name) > 512:
        return "member name longer than 512 characters"
    if "\\" in name:
        return "backslash in member name"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "control character in member name"
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return "absolute member path"
    parts = name.rstrip("/").split("/")
    if ".." in parts:
        return "'..' in member path"
    if any(p in ("", ".") for p in parts):
        return "empty or '.' path component"
    return None


def _fold(name: str) -> str:
    # two names a case-insensitive or normalising file system would merge
    return unicodedata.normalize("NFKC", name).casefold()


def shortened(text: str, limit: int = 120) -> str:
    """At most ``limit`` characters of received text (for messages; :func:`printable` escapes them where
    they are printed)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str, limit: int | None = 120) -> str:
    """Received text safe to print on a terminal: control characters (escape sequences) and bidirectional
    overrides shown escaped (``\\x1b``); at most ``limit`` characters."""
    shown = _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return shown if limit is None or len(shown) <= limit else shown[: limit - 3] + "..."


# =============================================================================================== zip


def _central_directory(f, size: int) -> tuple[int, int]:
    """(member count, central directory bytes) from the zip's end record (zip64 aware), read from the
    file's tail without parsing the central directory itself."""
    tail_size = min(size, 22 + 65535)
    f.seek(size - tail_size)
    tail = f.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        raise ValueError("not a zip archive (no end-of-central-directory record)")
    _, _, _, _, entries, cd_size, _, _ = struct.unpack("<4s4H2LH", tail[at : at + 22])
    if entries == 0xFFFF or cd_size == 0xFFFFFFFF:  # zip64: the locator sits right before the end record
        start = size - tail_size + at - 20
        if start < 0:
            raise ValueError("zip64 archive without its locator")
        f.seek(start)
        locator = f.read(20)
        if locator[:4] != b"PK\x06\x07":
            raise ValueError("zip64 archive without its locator")
        (record_at,) = struct.unpack("<Q", locator[8:16])
        if record_at > size - 56:
            raise ValueError("zip64 end record outside the file")
        f.seek(record_at)
        record = f.read(56)
        if record[:4] != b"PK\x06\x06":
            raise ValueError("zip64 end record not found")
        entries, cd_size = struct.unpack("<QQ", record[32:48])
    return entries, cd_size


def read_zip(
    path: str | os.PathLike, staging: str | os.PathLike, limits: ArchiveLimits
) -> tuple[list[str], dict[str, Member]]:
    """Screen ``path`` and stream its members into ``staging`` (canonical names only; nothing of the
    archive chooses a path). Returns the problems (nothing is read when the structure has any) and the
    members read."""
    path, staging = Path(path), Path(staging)
    try:
        size = path.stat().st_size
        if not path.is_file():
            return [f"{path}: not a regular file"], {}
        max_size = limits.max_total_bytes + limits.max_members * (64 * 1024) + _MiB  # data + headers
        if size > max_size:
            return [f"{path}: {size} bytes, more than an archive within the limits can be ({max_size})"], {}
        with open(path, "rb") as f:
            entries, cd_size = _central_directory(f, size)
    except (OSError, ValueError, struct.error) as err:
        return [f"{path}: {err}"], {}
    if entries > limits.max_members:
        return [f"{entries} members, more than the {limits.max_members} allowed (--max-members)"], {}
    if cd_size > limits.max_members * 4096:
        return [f"central directory of {cd_size} bytes, more than {limits.max_members} members need"], {}
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        return [f"{path}: not a readable zip ({err})"], {}
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.max_members:
            return [f"{len(infos)} members, more than the {limits.max_members} allowed (--max-members)"], {}
        problems, accepted = _screen(infos, limits)
        if problems:
            return problems, {}
        members: dict[str, Member] = {}
        for name, info in accepted.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as src, open(target, "xb") as dst:
                    n_bytes, sha256 = _stream(src, dst, info.file_size)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, ValueError) as err:
                # CRC mismatch, corrupt or truncated deflate stream, more data than declared
                return [f"{shortened(info.filename)}: unreadable ({shortened(str(err))})"], {}
            members[name] = Member(name, n_bytes, sha256, target)
    return [], members


def _screen(infos: list[zipfile.ZipInfo], limits: ArchiveLimits) -> tuple[list[str], dict[str, zipfile.ZipInfo]]:
    """Names, types, layout, duplicates and declared sizes of every member, before any is decompressed."""
    problems: list[str] = []
    seen: set[str] = set()
    tops: set[str] = set()
    accepted: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        raw = info.filename
        shown = shortened(raw)
        problem = _name_problem(raw)
        if problem:
            problems.append(f"{shown}: {problem}")
            continue
        folded = _fold(raw.rstrip("/"))
        if folded in seen:
            problems.append(f"{shown}: duplicate member (names are compared ignoring case)")
            continue
        seen.add(folded)
        top, _, rel = raw.rstrip("/").partition("/")
        tops.add(top)
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0: the writer stored permissions only
        if info.flag_bits & 0x1:
            problems.append(f"{shown}: encrypted member")
        elif info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            problems.append(f"{shown}: compression method {info.compress_type} (stored or deflated only)")
        elif info.is_dir() or kind == stat.S_IFDIR:
            if kind not in (0, stat.S_IFDIR) or (rel and rel not in ALLOWED_FOLDERS):
                problems.append(f"{shown}: folder not part of the bundle layout")
        elif kind not in (0, stat.S_IFREG):
            what = "symbolic link" if kind == stat.S_IFLNK else f"special file (mode {oct(info.external_attr >> 16)})"
            problems.append(f"{shown}: {what}")
        elif not rel:
            problems.append(f"{shown}: file outside the bundle's top-level folder")
        elif why := classify(rel):
            problems.append(f"{shown}: {why}")
        elif info.file_size > limits.member_limit(rel):
            limit = limits.member_limit(rel)
            problems.append(f"{shown}: {info.file_size} bytes uncompressed, more than the {limit} allowed")
        else:
            accepted[rel] = info
            total += info.file_size
    if len(tops) > 1:
        problems.append(f"members in {len(tops)} top-level folders (one, the bundle's name, expected)")
    elif tops and not _TOP_FOLDER.fullmatch(next(iter(tops))):
        problems.append(f"top-level folder {shortened(next(iter(tops)))}: not a plain name")
    if total > limits.max_total_bytes:
        problems.append(f"{total} bytes uncompressed in all, more than the {limits.max_total_bytes} allowed")
    if sum(1 for n in accepted if n.startswith("reference/")) > MAX_REFERENCE_CONFIGS:
        problems.append(f"more than {MAX_REFERENCE_CONFIGS} reference configs")
    return problems, accepted


def _stream(src, dst, declared: int) -> tuple[int, str]:
    """(size, sha256) of ``src``, copied to ``dst`` unless it is ``None``; never past ``declared`` bytes."""
    digest = hashlib.sha256()
    size = 0
    while block := src.read(_BLOCK):
        size += len(block)
        if size > declared:  # zipfile stops at the declared size; a folder file may grow while read
            raise ValueError(f"more data than the {declared} bytes declared")
        digest.update(block)
        if dst is not None:
            dst.write(block)
    return size, digest.hexdigest()


# ============================================================================================ folders


def read_folder(root: str | os.PathLike, limits: ArchiveLimits) -> tuple[list[str], dict[str, Member]]:
    """Screen a bundle folder (e.g. an imported one) with the same layout and limits, hashing each file
    where it is. Symbolic links and special files are refused, never followed."""
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: no such folder"], {}
    problems: list[str] = []
    files: dict[str, int] = {}
    pending = [""]
    entries = 0
    while pending:
        folder = pending.pop()
        with os.scandir(root / folder) as scan:
            for entry in scan:
                entries += 1
                if entries > limits.max_members:
                    return [f"more than {limits.max_members} entries (--max-members)"], {}
                rel = f"{folder}/{entry.name}" if folder else entry.name
                shown = shortened(rel)
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    problems.append(f"{shown}: symbolic link")
                elif stat.S_ISDIR(mode):
                    if rel in ALLOWED_FOLDERS:
                        pending.append(rel)
                    else:
                        problems.append(f"{shown}/: folder not part of the bundle layout")
                elif not stat.S_ISREG(mode):
                    problems.append(f"{shown}: special file (mode {oct(mode)})")
                elif why := classify(rel):
                    problems.append(f"{shown}: {why}")
                else:
                    size = entry.stat(follow_symlinks=False).st_size
                    if size > limits.member_limit(rel):
                        problems.append(f"{shown}: {size} bytes, more than the {limits.member_limit(rel)} allowed")
                    files[rel] = size
    if sum(files.values()) > limits.max_total_bytes:
        problems.append(f"{sum(files.values())} bytes in all, more than the {limits.max_total_bytes} allowed")
    if problems:
        return sorted(problems), {}
    members = {}
    for rel, size in sorted(files.items()):
        try:
            with open(root / rel, "rb") as f:
                read, sha256 = _stream(f, None, size)
        except (OSError, ValueError) as err:  # unreadable, or grew while it was read
            return [f"{rel}: unreadable ({shortened(str(err))})"], {}
        members[rel] = Member(rel, read, sha256, root / rel)
    return [], members


# ============================================================================================ writing


def checksum_manifest(files: Mapping[str, bytes]) -> str:
    """``sha256sum``-format manifest of ``files`` (sorted; the manifest and its signature excluded)."""
    return "".join(
        f"{hashlib.sha256(data).hexdigest()}  {name}\n"
        for name, data in sorted(files.items())
        if name not in (CHECKSUM_FILE, SIGNATURE_FILE)
    )


_FIXED_TIME = (2020, 1, 1, 0, 0, 0)  # identical inputs give an identical archive


def write_zip(files: Mapping[str, bytes], out: str | os.PathLike, top: str) -> Path:
    """Write ``files`` (name -> bytes) under ``top/`` into ``out``: regular files (mode 0644), fixed
    timestamps; weights and ONNX stored (they do not compress), text deflated."""
    out = Path(out)
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in sorted(files.items()):
            info = zipfile.ZipInfo(f"{top}/{name}", _FIXED_TIME)
            info.compress_type = zipfile.ZIP_STORED if MEMBERS.get(name) == BINARY else zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16
            archive.writestr(info, data)
    return out
