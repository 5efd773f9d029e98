"""`protocol/files.py`: a file is replaced whole, with the mode asked for, and a failed write leaves nothing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from protocol import files
from protocol.files import atomic_write

pytestmark = pytest.mark.timeout(10)


def test_a_new_file_gets_its_folder_the_bytes_and_the_mode(tmp_path: Path) -> None:
    key = tmp_path / "deep" / "er" / "peer.key"
    atomic_write(key, b"secret", mode=0o600, fsync=True)
    assert key.read_bytes() == b"secret" and stat.S_IMODE(key.stat().st_mode) == 0o600
    atomic_write(key, b"new", mode=0o600)
    assert key.read_bytes() == b"new" and sorted(p.name for p in key.parent.iterdir()) == ["peer.key"]


def test_without_a_mode_the_umask_decides(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "pins.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "pins.json").stat().st_mode) == 0o640


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "addrs.txt"
    atomic_write(target, b"old\n")

    def refuse(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"new\n")
    assert target.read_bytes() == b"old\n" and [p.name for p in tmp_path.iterdir()] == ["addrs.txt"]
