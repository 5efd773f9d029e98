"""A late join with real processes on loopback, for tests/test_latejoin.py and benchmarks/adversaries.py.

A bootstrap node and three donors (`murmur run`; any of them may be an adversary of benchmarks/adversary_peers.py)
train until each has served a snapshot (they take one every SNAPSHOT_EVERY rounds, and the Lamport rule may
skip a round, so each donor's round lines are watched for a multiple of it); then a newcomer joins and
late-joins from them. What it did is read back from its log (`LateJoin`), and what the donors' snapshots were
worth from theirs: every donor evaluates phi (`--eval-every SNAPSHOT_EVERY`) right after taking a snapshot,
so its eval line of round r is the validation loss of exactly the weights it serves as round r.
"""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass

from benchmarks.adversary_peers import SCRIPT as ADVERSARY_SCRIPT
from peer.lab.harness import MADDR_LINE, Proc, Procs, murmur, run_toml, wait_until
from peer.node.latejoin import SNAPSHOT_EVERY
from peer.node.roundline import PATTERN as ROUND_LINE
from peer.node.roundline import parse_all

"""Tiny, K=2, H=5: a round takes seconds. The exchange timeout is also each state download's deadline."""
START = re.compile(r"^late join: fetched the weights of round (\d+) from (\d+) donor\(s\): (.*?); (.*)$")
DONOR = re.compile(r"([0-9a-f]{16}) \(round (\d+)\)")
HELD_OUT = re.compile(r"^late join: held-out loss of the adopted weights ([^;\s]+)")


@dataclass(slots=True)
class Donors:
    """One swarm's bootstrap address and run key, and its donors by name (the first is the run's owner)."""

    tag: str
    maddr: str
    run_key: str
    procs: dict[str, Proc]
    kinds: dict[str, str | None]
    """Donor name -> its adversary kind, None when honest."""
    ids: dict[str, str]
    """Donor name -> peer id (filled by `wait_for_snapshots`)."""


@dataclass(frozen=True, slots=True)
class LateJoin:
    """What a newcomer's log says its late join did."""

    round: int
    """The round its clock took (the lower median of the donors' rounds)."""
    served: dict[str, int]
    """Donor peer-id prefix (16 hex) -> the round of the snapshot it served."""
    rule: str
    held_out: float
    """Validation loss of the weights it adopted, right after adopting them."""


def _run_args(tag: str, ident: str, maddr: str, run_key: str, *extra: str) -> list[str]:
    who = ["--manifest", f"{tag}-manifest.json", "--key", f"{tag}-owner.key"] if not run_key else ["--run-key", run_key]
    return ["run", "--swarm", tag, "--initial-peers", maddr, "--identity", ident, "--announce-ttl", "6",
            "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--listen", "127.0.0.1:0", "--device", "cpu",
            *who, *extra]  # fmt: skip


def _env(procs: Procs, tag: str, name: str) -> dict[str, str]:
    return {"MURMUR_HOME": str(procs.workdir / f"home-{tag}-{name}"), "OMP_NUM_THREADS": "1",
            "MURMUR_LOG_LEVEL": "INFO"}  # fmt: skip


def start_donors(procs: Procs, tag: str, kinds: dict[str, str | None], *, preset: str = "tiny",
                 min_round_s: float | None = None) -> Donors:  # fmt: skip
    """A bootstrap node, a signed run (rounds at least `min_round_s` apart), and one `murmur run` per donor name
    (the first publishes the manifest).

    Identity files are `<name>.id` in the work dir, shared by swarms of other tags: a baseline and an attacked
    swarm then train on the same data streams."""
    (procs.workdir / f"{tag}.toml").write_text(run_toml(tag, preset=preset, min_round_s=min_round_s))
    made = procs.start(f"{tag}-create", murmur("create-run", "--config", f"{tag}.toml", "--key", f"{tag}-owner.key",
                                               "--out", f"{tag}-manifest.json"))  # fmt: skip
    boot = procs.start(f"{tag}-boot", murmur("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                                             "--identity", f"{tag}-boot.key"))  # fmt: skip
    maddr = boot.wait_for(MADDR_LINE, timeout=120).group(1)
    assert made.wait_exit(120) == 0, made.logs()
    run_key = made.lines[-1]
    started = {}
    for i, (name, kind) in enumerate(kinds.items()):
        args = _run_args(tag, f"{name}.id", maddr, run_key if i else "", "--eval-every", str(SNAPSHOT_EVERY))
        argv = murmur(*args) if kind is None else [sys.executable, ADVERSARY_SCRIPT, kind, *args[1:]]  # it adds `run`
        started[name] = procs.start(f"{tag}-{name}", argv, env=_env(procs, tag, name))
    return Donors(tag, maddr, run_key, started, dict(kinds), {})


def snapshot_rounds(proc: Proc) -> list[int]:
    """Rounds this donor landed that it took a snapshot of (multiples of SNAPSHOT_EVERY)."""
    return [r.round for r in parse_all(proc.lines) if r.round > 0 and r.round % SNAPSHOT_EVERY == 0]


def wait_for_snapshots(swarms: list[Donors], timeout: float) -> None:
    """Until every donor of every swarm has joined and landed a snapshot round; fails with the logs."""
    everyone = [p for s in swarms for p in s.procs.values()]
    deadline = time.monotonic() + timeout
    for swarm in swarms:
        for name, proc in swarm.procs.items():
            left = max(1.0, deadline - time.monotonic())
            swarm.ids[name] = proc.wait_for(r"^joined swarm \S+ as ([0-9a-f]{64})", timeout=left).group(1)
    wait_until(lambda: all(snapshot_rounds(p) for p in everyone), max(1.0, deadline - time.monotonic()),
               "every donor landed a snapshot round", everyone, fail_on_exit=True)  # fmt: skip


def start_newcomer(procs: Procs, swarm: Donors, name: str = "newcomer") -> Proc:
    """A fresh peer (its own identity, `<name>.id`) that joins the trained swarm and so late-joins."""
    args = _run_args(swarm.tag, f"{name}.id", swarm.maddr, swarm.run_key)
    return procs.start(f"{swarm.tag}-{name}", murmur(*args), env=_env(procs, swarm.tag, name))


def late_join_of(newcomer: Proc, timeout: float) -> LateJoin:
    """Its late join, once both of its lines are out (fails with its log otherwise)."""
    start = START.match(newcomer.wait_for(START.pattern, timeout=timeout).group(0))
    held_out = float(newcomer.wait_for(HELD_OUT.pattern, timeout=60).group(1))
    assert start is not None
    served = {prefix: int(r) for prefix, r in DONOR.findall(start.group(3))}
    assert len(served) == int(start.group(2)), start.group(0)
    return LateJoin(int(start.group(1)), served, start.group(4), held_out)


def served_losses(swarm: Donors, join: LateJoin, honest_only: bool = True) -> dict[str, float]:
    """Donor name -> the validation loss of the snapshot it served `join` (its eval line of that round).

    Honest donors only by default: a poisoned donor's eval line is of its true phi, not of what it served."""
    out = {}
    for name, proc in swarm.procs.items():
        r = join.served.get(swarm.ids[name][:16])
        if r is None or (honest_only and swarm.kinds[name] is not None):
            continue
        out[name] = float(proc.wait_for(rf"^eval round {r} val_loss ([\d.]+)$", timeout=60).group(1))
    return out


def first_round(newcomer: Proc, timeout: float) -> tuple[int, float]:
    """(round, training loss) of the newcomer's first round line."""
    newcomer.wait_for(ROUND_LINE.pattern, timeout=timeout)
    first = parse_all(newcomer.lines)[0]
    return first.round, first.loss if math.isfinite(first.loss) else math.inf
