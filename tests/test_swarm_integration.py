"""Joining a swarm by name, with real processes on loopback.

Two bootstrap nodes that know each other; an owner creates and publishes a manifest; three peers join
by swarm name and initial peers alone (pinning the owner key on first use); everyone sees everyone,
slices spread over K=3, `murmur status` lists them (JSON and table), a killed peer leaves the list
after its TTL, and SIGTERM stops every process with exit code 0 and no p2pd left behind.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from peer.lab.harness import MADDR_LINE, Proc, Procs, group_pids, member, murmur, wait_until

TTL = 6.0
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def start_bootstrap(procs: Procs, name: str, *initial: str) -> tuple[Proc, str]:
    args = ["bootstrap", "--host-maddrs", LOOPBACK, "--identity", f"{name}.key", "--addrs-file", f"{name}.addrs"]
    for maddr in initial:
        args += ["--initial-peers", maddr]
    node = procs.start(name, murmur(*args))
    return node, node.wait_for(MADDR_LINE, timeout=40).group(1)


def start_peer(procs: Procs, name: str, initial: list[str], *extra: str) -> Proc:
    args = ["--swarm", "loop", "--identity", f"{name}.id", "--listen", "127.0.0.1:0", "--announce-ttl", str(TTL),
            *extra]  # fmt: skip
    for maddr in initial:
        args += ["--initial-peers", maddr]
    return procs.start(name, member(*args), env={"MURMUR_HOME": str(procs.workdir / f"home-{name}")})


def live_counts(proc: Proc) -> list[int]:
    return [int(m.group(1)) for line in proc.lines if (m := re.search(r"^peers: (\d+) live", line))]


def status_json(procs: Procs, maddr: str, name: str) -> list[dict]:
    run = procs.run(name, murmur("status", "--swarm", "loop", "--initial-peers", maddr, "--json", "--wait", "0.5"))
    assert run.popen.returncode == 0, run.logs()
    return json.loads("\n".join(run.lines))


@pytest.mark.slow(24)
@pytest.mark.timeout(150)
def test_three_peers_join_by_name_and_a_killed_one_expires(procs: Procs, tmp_path: Path) -> None:
    made = procs.start("create", murmur("create-run", "--swarm", "loop", "--preset", "tiny", "--slices", "3",
                                        "--key", "owner.key", "--out", "manifest.json"))  # fmt: skip
    b1, m1 = start_bootstrap(procs, "boot1")
    b2, m2 = start_bootstrap(procs, "boot2", m1)
    assert (tmp_path / "boot1.addrs").read_text().split() == [m1]
    assert made.wait_exit() == 0, made.logs()
    run_key = made.lines[-1]
    assert re.fullmatch(r"[0-9a-f]{64}", run_key)

    # The owner publishes while the peers start; they wait for the manifest to appear.
    # Peers 1 and 2 know only boot1, peer 3 only boot2: they meet because the bootstrap nodes know each other.
    t0 = time.monotonic()
    owner = start_peer(procs, "owner", [m1, m2], "--manifest", "manifest.json", "--key", "owner.key")
    peers = [start_peer(procs, f"peer{i}", [m1] if i < 3 else [m2]) for i in (1, 2, 3)]
    owner.wait_for(r"^joined swarm loop", timeout=40)
    for peer in peers:
        assert peer.wait_for(r"^run ([0-9a-f]{64}) by owner ([0-9a-f]{64})", timeout=40).group(2) == run_key
        assert peer.wait_for(r"^reachability: OK", timeout=20)
        peer.wait_for(r"^joined swarm loop as [0-9a-f]{64} slice [0-2] endpoint 127\.0\.0\.1:\d+", timeout=20)
    joined = time.monotonic() - t0
    members = [owner, *peers]
    seen = wait_until(lambda: all(live_counts(p)[-1:] == [4] for p in members), 20, "all 4 peers seen", members)
    print(f"\nowner + three peers joined in {joined:.1f}s (process start incl.); all saw all 4 {seen:.1f}s later")
    for peer in peers:  # pinned on first use
        assert json.loads((tmp_path / f"home-{peer.name}" / "pins.json").read_text()) == {"loop": run_key}

    def current_slice(proc: Proc) -> int:
        return [int(m.group(1)) for line in proc.lines if (m := re.search(r"(?:slice|mine) (\d+)", line))][-1]

    covered = lambda: sorted({current_slice(p) for p in members}) == [0, 1, 2]  # noqa: E731
    spread_s = wait_until(covered, 30, "slices spread", members)
    print(f"slices cover K=3 {spread_s:.1f}s after everyone saw everyone")
    table = procs.start("status-table", murmur("status", "--swarm", "loop", "--initial-peers", m1, "--wait", "0.5"))
    listed = status_json(procs, m1, "status-json")
    assert len(listed) == 4
    for entry in listed:
        assert {"peer_id", "endpoint", "slice", "round", "tokens_per_s", "loss", "version"} <= set(entry)
        assert re.fullmatch(r"127\.0\.0\.1:\d+", entry["endpoint"]) and entry["version"]
    assert {e["slice"] for e in listed} == {0, 1, 2}
    assert table.wait_exit() == 0, table.logs()
    assert "4 live peer(s)" in table.lines[0] and "endpoint" in table.lines[1] and len(table.lines) == 6

    victim = peers[2]
    victim_id = victim.wait_for(r"as ([0-9a-f]{64})").group(1)
    victim.kill()
    t_kill = time.monotonic()
    marks = {p.name: len(p.lines) for p in members[:3]}
    gone = wait_until(lambda: all(live_counts(p)[-1:] == [3] and len(p.lines) > marks[p.name] for p in members[:3]),
                      TTL + 15, "the killed peer to expire", members)  # fmt: skip
    print(f"killed peer left every list {gone:.1f}s after SIGKILL (TTL {TTL:.0f}s, refresh every {TTL / 3:.0f}s)")
    assert gone <= TTL + TTL / 3 + 3
    assert victim_id not in {p["peer_id"] for p in status_json(procs, m2, "status-after")}
    assert time.monotonic() - t_kill > 1

    for proc in [*members[:3], b1, b2]:
        pgid = proc.pgid
        assert proc.terminate(timeout=20) == 0, proc.logs()
        assert group_pids(pgid) == [], f"{proc.name} left processes behind (p2pd?)"
