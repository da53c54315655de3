"""Publish a distribution store atomically: write it whole into a fresh folder, then swap a symlink.

A published store ``DIR/<name>`` is a relative symlink to a version folder beside it::

    DIR/<name>  ->  .<name>.20261201T091500.123456Z-k3j9x2   complete, verified, never written again

A build writes into a fresh ``.<name>.partial-*`` folder that no reader knows of. Once the
store in it is complete and verifies, the folder is renamed to a version name, synced to disk,
and the symlink is replaced in one ``rename(2)``. A reader that opens ``DIR/<name>`` therefore
sees the previous store or the new one, whole, and the files of a version it opened are never
rewritten or truncated (so a memory map of them never faults with SIGBUS). Names that start
with ``.`` are skipped by the gateway's ``--store-dir`` scan.

The previous ``keep`` versions stay on disk (to roll back: point the symlink at one); older
ones are removed. Removing a version folder cannot disturb a reader that still maps its files:
the data lives until the last mapping goes.

When ``DIR/<name>`` is a plain folder (a store written before this scheme), it is exchanged
with the symlink in one ``renameat2(RENAME_EXCHANGE)``; where the file system lacks that call
(NFS), the folder is renamed aside first, which leaves ``DIR/<name>`` missing for the
microseconds between two renames.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from explainserve.anomaly.store import load_store

log = logging.getLogger(__name__)

VERSION_TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"
RENAME_EXCHANGE = 2  # linux/fs.h


def version_pattern(name: str) -> re.Pattern:
    """Names of the published version folders of store ``name`` (not of partial builds)."""
    return re.compile(rf"\.{re.escape(name)}\.\d{{8}}T\d{{6}}\.\d{{6}}Z-[0-9a-z]+")


def version_name(name: str) -> str:
    """A new version folder name for store ``name``: the UTC time, then a random tag; later
    versions sort after earlier ones."""
    stamp = datetime.now(timezone.utc).strftime(VERSION_TIME_FORMAT)
    return f".{name}.{stamp}-{secrets.token_hex(4)}"


@contextmanager
def publishing(out: str | os.PathLike, *, keep: int = 1) -> Iterator[Path]:
    """Yield a fresh, empty folder to write a store into; publish it at ``out`` on success.

    Parameters
    ----------
    out : path-like
        Where the store is published: a symlink (created, or replaced atomically) in an
        existing or new parent folder.
    keep : int
        Previous versions kept beside the new one, >= 0.

    Yields
    ------
    Path
        The folder to write the store into; it is removed if the block raises.

    Raises
    ------
    StoreError
        The folder does not hold a complete store that verifies; ``out`` is left as it was.
    ValueError
        ``keep`` is negative, or ``out`` is a plain file.

    Examples
    --------
    >>> with publishing("stores/my_model") as folder:     # doctest: +SKIP
    ...     build_store(batches, folder, meta)
    ...     save_calibration(load_store(folder), calibration)
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0 previous versions, got {keep}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a store folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)  # readable by a server running as another user of the same group
    try:
        yield staging
        load_store(staging)  # complete and verified, or refused before anyone sees it
        version = out.parent / version_name(out.name)
        os.rename(staging, version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _sync_folder(version)
    _point(out, version)
    _retire(out, version, keep)
    log.info("published store %s -> %s", out, version.name)


def _sync_folder(folder: Path) -> None:
    """Flush the folder's files and the folder itself to disk before the store is published."""
    for entry in folder.iterdir():
        descriptor = os.open(entry, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    for path in (folder, folder.parent):
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _point(out: Path, version: Path) -> None:
    """Make ``out`` a symlink to ``version`` in one rename."""
    link = out.parent / f".{out.name}.link-{secrets.token_hex(4)}"
    os.symlink(version.name, link)
    if out.is_symlink() or not out.exists():
        os.replace(link, out)
        return
    # a plain store folder from before: swap it with the link, then give it a version name
    old = out.parent / version_name(out.name)
    if _exchange(link, out):
        os.rename(link, old)
    else:
        log.warning("%s: this file system cannot exchange two names atomically; the store is missing "
                    "between two renames", out)
        os.rename(out, old)
        os.replace(link, out)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two names in one ``renameat2(RENAME_EXCHANGE)``; False where it is not supported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd = -100  # AT_FDCWD
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(second))


def _retire(out: Path, current: Path, keep: int) -> None:
    """Remove the version folders of ``out`` but ``current`` and the ``keep`` latest others."""
    pattern = version_pattern(out.name)
    others = sorted(entry for entry in out.parent.iterdir()
                    if pattern.fullmatch(entry.name) and entry.name != current.name and not entry.is_symlink())
    for entry in others[:max(len(others) - keep, 0)]:
        shutil.rmtree(entry, ignore_errors=True)
