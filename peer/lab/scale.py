"""A swarm that grows on loopback: how long each new peer takes to see everyone, and how many connections one peer
holds, at each size. For tests/test_swarm_scale.py and benchmarks/swarm_connections.py.

The peers are light members (peer/cli/member.py: the whole join sequence, announcement refreshes, reachability,
but no training), so 32 or 64 of them fit on a 2-core machine: what grows with the swarm is the DHT and the
announcement list, which members exercise exactly as training peers do. One bootstrap node; the owner publishes the
manifest; members join in waves up to each size. A member has "found its partners" once its live list holds every
peer of the swarm (partners are drawn from that list, peer/swarm/membership.py).
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass

from peer.lab.connections import count_connections, established_inodes
from peer.lab.harness import MADDR_LINE, Proc, Procs, group_pids, member, murmur, wait_until

SWARM = "scale"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
_LIVE = re.compile(r"^peers: (\d+) live")
SAMPLES = 5
"""Connections are counted SAMPLES times over one refresh period (TTL / 3); a peer's figure is their median."""


@dataclass(frozen=True, slots=True)
class SizeResult:
    """One size of the swarm: how fast its newest members saw everyone, and the connections each peer held."""

    peers: int
    see_all_s: list[float]
    """For each member started in this wave: seconds from its start until its live list held every peer."""
    libp2p: list[int]
    grpc: list[int]
    """Established TCP connections per peer (all peers of the swarm at this size), by p2pd and by the rest: each
    peer's median over SAMPLES counts."""

    def row(self) -> dict[str, float | int]:
        totals = [a + b for a, b in zip(self.libp2p, self.grpc, strict=True)]
        return {
            "peers": self.peers,
            "see_all_s_median": round(statistics.median(self.see_all_s), 2),
            "see_all_s_max": round(max(self.see_all_s), 2),
            "connections_median": statistics.median(totals),
            "connections_max": max(totals),
            "libp2p_max": max(self.libp2p),
            "grpc_max": max(self.grpc),
        }


def _live(proc: Proc) -> int:
    counts = [int(m.group(1)) for line in proc.lines[-20:] if (m := _LIVE.match(line))]
    return counts[-1] if counts else 0


class GrowingSwarm:
    """A bootstrap node, the owner (a member that publishes the manifest) and members added by `grow_to`."""

    def __init__(self, procs: Procs, *, ttl_s: float = 15.0, slices: int = 4) -> None:
        self.procs, self.ttl_s = procs, ttl_s
        made = procs.run("create", murmur("create-run", "--swarm", SWARM, "--preset", "micro", "--slices", str(slices),
                                          "--key", "owner.key", "--out", "manifest.json"))  # fmt: skip
        if made.popen.returncode != 0:
            raise AssertionError(made.logs())
        self.run_key = made.lines[-1]
        boot = procs.start("boot", murmur("bootstrap", "--host-maddrs", LOOPBACK, "--identity", "boot.key"))
        self.maddr = boot.wait_for(MADDR_LINE, timeout=60).group(1)
        self.peers: list[Proc] = [self._member("owner", "--manifest", "manifest.json", "--key", "owner.key")]

    def _member(self, name: str, *extra: str) -> Proc:
        args = ["--swarm", SWARM, "--initial-peers", self.maddr, "--identity", f"{name}.id", "--listen", "127.0.0.1:0",
                "--announce-ttl", str(self.ttl_s), *extra]  # fmt: skip
        if not extra:
            args += ["--run-key", self.run_key]
        return self.procs.start(name, member(*args), env={"MURMUR_HOME": str(self.procs.workdir / f"home-{name}")})

    def grow_to(self, size: int, *, timeout_s: float = 240.0, settle_s: float = 0.0) -> SizeResult:
        """Start members until the swarm has `size` peers, wait until every peer sees all of them, let the swarm
        run `settle_s` more (refreshes, so connections reach their steady state), then count connections."""
        began = time.monotonic()
        wave = [self._member(f"m{len(self.peers) + i}") for i in range(size - len(self.peers))]
        started = {p.name: time.monotonic() for p in wave}
        seen: dict[str, float] = {}

        def everyone_sees_all() -> bool:
            for p in wave:
                if p.name not in seen and _live(p) >= size:
                    seen[p.name] = time.monotonic() - started[p.name]
            return len(seen) == len(wave) and all(_live(p) >= size for p in self.peers)

        self.peers += wave
        wait_until(everyone_sees_all, max(1.0, timeout_s - (time.monotonic() - began)),
                   f"all {size} peers see each other", self.peers, fail_on_exit=True)  # fmt: skip
        time.sleep(settle_s)
        samples = []  # a peer's count rises at each refresh and falls as idle connections close: sample a while
        for i in range(SAMPLES):
            if i:
                time.sleep(self.ttl_s / 3 / (SAMPLES - 1))
            established = established_inodes()
            samples.append([count_connections(group_pids(p.pgid), established) for p in self.peers])
        per_peer = list(zip(*samples, strict=True))
        return SizeResult(size, [seen[p.name] for p in wave],
                          [round(statistics.median(c.libp2p for c in peer)) for peer in per_peer],
                          [round(statistics.median(c.grpc for c in peer)) for peer in per_peer])  # fmt: skip
