"""How many TCP connections a process tree holds, read from /proc (Linux), for the swarm-scale test and benchmark.

A murmur peer is three processes: the peer itself (its gRPC server and the clients it dials for exchanges), the
hivemind DHT process, and that process's `p2pd` (libp2p: the DHT's connections to other nodes). A connection is
counted once per socket this tree owns in state ESTABLISHED, so a connection between two peers of the same machine
counts once for each of them, as it would on two machines. The control socket between the DHT process and p2pd is
a Unix socket and is not counted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_ESTABLISHED = "01"
_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process `pid` has open (empty if it is gone or not ours to read)."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(fd_dir / name)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def established_inodes(tables: Iterable[str] = _TABLES) -> dict[str, int]:
    """Inode -> local port of every ESTABLISHED TCP socket of this network namespace."""
    found: dict[str, int] = {}
    for table in tables:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == _ESTABLISHED:
                found[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    return found


@dataclass(frozen=True, slots=True)
class Connections:
    """Established TCP connections of one peer's processes: its p2pd (libp2p, the DHT) and the rest (gRPC)."""

    libp2p: int
    grpc: int

    @property
    def total(self) -> int:
        return self.libp2p + self.grpc


def count_connections(pids: Iterable[int], established: dict[str, int] | None = None) -> Connections:
    """Connections held by the processes `pids` (one peer's tree), split by whether p2pd or another holds them."""
    established = established_inodes() if established is None else established
    libp2p = grpc = 0
    for pid in pids:
        held = sum(1 for inode in socket_inodes(pid) if inode in established)
        if _is_p2pd(pid):
            libp2p += held
        else:
            grpc += held
    return Connections(libp2p=libp2p, grpc=grpc)


def _is_p2pd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "p2pd"
    except OSError:
        return False
