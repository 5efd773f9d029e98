"""Replacing a small file in one step, for every file murmur writes that someone else may read meanwhile.

Keys, pin files, a bootstrap node's address file and result JSON are written through `atomic_write`: the
bytes go to a hidden sibling first (same folder, so the same filesystem, so `os.replace` is atomic) and
then take the file's name, so a reader or a crash sees the old file or the new one, never half of either.
Checkpoints are folders and have their own rename (peer/node/checkpoint.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, mode: int | None = None, fsync: bool = False) -> None:
    """Replace `path` with `data` atomically, creating its folder if needed.

    `mode` None creates the file as `open()` would (0o666 less the umask); a mode is set exactly, whatever the
    umask (a key must be 0o600). `fsync` flushes the bytes to disk before the rename, for files a power cut
    must not empty (keys); files that are rewritten often or can be remade skip it. The temporary name
    carries the pid, so two processes writing the same file never share one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(fd, mode)
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # best effort: the write's own error is the one to report
            tmp.unlink()
        raise


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's metadata and bytes to disk (a folder: the names renamed into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


HASH_CHUNK = 4 * 2**20
"""Bytes read at a time when hashing a file: large enough to be fast, small enough to never matter in memory."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read a chunk at a time (checkpoints, dataset shards)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def replace_directory(tmp: Path, final: Path) -> None:
    """Rename the finished folder `tmp` to `final`, replacing a folder already there (`os.replace` cannot replace
    a non-empty one): the old one is moved aside first and dropped after, so `final` is never half written."""
    if final.exists():
        aside = final.with_name(f".old-{final.name}-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
