"""Import a received bundle: ``pneumoseg bundle import FILE.zip --into DIR``.

The archive is streamed into a staging folder next to ``DIR`` (canonical member names only), verified there
(:func:`pneumoseg.sharing.verify.check_members`), made read-only (files 0444, folders 0555) and renamed to
``DIR``: the imported folder holds exactly the bytes that were verified, and a refused bundle leaves
nothing behind. The sender's reference configs stay read-only documents; no receiving command reads them.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pneumoseg.sharing.archive import ArchiveLimits, read_zip
from pneumoseg.sharing.signing import TrustedKey
from pneumoseg.sharing.verify import VerifyReport, check_members

__all__ = ["BundleRejected", "import_bundle", "make_read_only", "remove_tree"]


class BundleRejected(ValueError):
    """Verification failed; ``report`` holds the table."""

    def __init__(self, report: VerifyReport) -> None:
        super().__init__(f"{report.source}: verification failed\n{report.table()}")
        self.report = report


def make_read_only(root: str | os.PathLike) -> None:
    """Files 0444, folders 0555 (deepest first, so that every folder can still be listed while walking)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            os.chmod(Path(dirpath, name), 0o444, follow_symlinks=False)
        os.chmod(dirpath, 0o555)


def remove_tree(root: str | os.PathLike) -> None:
    """Delete a folder made read-only by :func:`make_read_only` (folders made writable first; links are
    never followed)."""
    root = Path(root)
    if not root.exists() and not root.is_symlink():
        return
    if root.is_dir() and not root.is_symlink():
        for dirpath, dirnames, _ in os.walk(root):
            os.chmod(dirpath, stat.S_IRWXU)
            for name in dirnames:
                path = Path(dirpath, name)
                if not path.is_symlink():
                    os.chmod(path, stat.S_IRWXU)
        shutil.rmtree(root)
    else:
        root.unlink()


def _is_bundle(path: Path) -> bool:
    return (path / "configs" / "metadata.json").is_file()


def import_bundle(
    archive: str | os.PathLike,
    into: str | os.PathLike,
    overwrite: bool = False,
    trusted_keys: str | os.PathLike | Sequence[TrustedKey] | None = None,
    allow_unsigned: bool = False,
    limits: ArchiveLimits = ArchiveLimits(),
) -> VerifyReport:
    """Verify ``archive`` and write its files, read-only, into ``into`` (the new bundle root).

    Refuses a non-empty ``into`` unless ``overwrite`` and ``into`` is a bundle (has
    ``configs/metadata.json``; never deletes other folders). Raises :class:`BundleRejected` when
    verification fails (nothing is written). ``trusted_keys`` / ``allow_unsigned``: see ``verify_bundle``.
    """
    archive, into = Path(archive), Path(into)
    if archive.is_dir():
        raise ValueError(f"{archive}: import takes the .zip the sender exported (a folder can be verified)")
    if into.exists() and (not into.is_dir() or any(into.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{into} exists and is not empty (use --overwrite to replace a bundle)")
        if not _is_bundle(into):
            raise FileExistsError(f"{into} is not a bundle (no configs/metadata.json); refusing to replace it")
    into.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{into.name}.importing-", dir=into.parent))
    try:
        problems, members = read_zip(archive, staging, limits)
        report = check_members(str(archive), problems, members, trusted_keys, allow_unsigned, limits)
        if not report.ok:
            raise BundleRejected(report)
        make_read_only(staging)
        if into.exists():
            # renamed within its parent: moving a read-only folder to another parent needs write
            # permission on the folder itself (its ".." entry changes)
            old = Path(tempfile.mkdtemp(prefix=f".{into.name}.replaced-", dir=into.parent))
            os.replace(into, old)
            os.replace(staging, into)
            remove_tree(old)
        else:
            os.replace(staging, into)
    finally:
        remove_tree(staging)
    return report
