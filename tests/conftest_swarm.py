"""The "faults" swarm that the fault and churn tests share: a bootstrap node, a signed run, and `murmur run` peers
on loopback, each on one core with its own home; and what to read from their output.

Imported explicitly by tests/test_daemon_faults.py and tests/test_churn.py (not an autouse conftest).
"""

from __future__ import annotations

import re

from peer.lab.harness import MADDR_LINE, Proc, Procs, murmur, run_toml
from peer.node.roundline import parse_all

JOINED = r"^joined swarm faults as ([0-9a-f]{64}) slice [01]"
EVAL = re.compile(r"^eval round (\d+) val_loss ([\d.]+)$")


def rounds_of(proc: Proc, start: int = 0) -> list[int]:
    """Round numbers of the round lines from stdout line `start` on."""
    return [r.round for r in parse_all(proc.lines[start:])]


def start_swarm(procs: Procs, preset: str = "tiny", min_round_s: float | None = None) -> tuple[str, str]:
    """A bootstrap node and a signed run of `preset`, rounds at least `min_round_s` apart; its multiaddr, run key."""
    # two partners a round, whichever way four peers split over two slices (2+2 or 3+1)
    config = run_toml("faults", preset=preset, fanout=2, exchange_timeout_s=3, min_round_s=min_round_s)
    (procs.workdir / "run.toml").write_text(config)
    made = procs.start("create", murmur("create-run", "--config", "run.toml", "--key", "owner.key",
                                        "--out", "manifest.json"))  # fmt: skip
    boot = procs.start("boot", murmur("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity", "boot.key"))
    maddr = boot.wait_for(MADDR_LINE, timeout=60).group(1)
    assert made.wait_exit(60) == 0, made.logs()
    return maddr, made.lines[-1]


def start_peer(procs: Procs, name: str, maddr: str, *extra: str, ident: str = "") -> Proc:
    """`murmur run` on one core with its own home; the owner publishes the manifest, others bring `--run-key`."""
    ident = ident or name
    who = ["--manifest", "manifest.json", "--key", "owner.key"] if ident == "owner" else []
    args = ["run", "--swarm", "faults", "--initial-peers", maddr, "--identity", f"{ident}.id", "--announce-ttl", "6",
            "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--listen", "127.0.0.1:0", "--device", "cpu",
            "--eval-every", "0", *who, *extra]  # fmt: skip
    env = {"MURMUR_HOME": str(procs.workdir / f"home-{ident}"), "OMP_NUM_THREADS": "1", "MURMUR_LOG_LEVEL": "INFO"}
    return procs.start(name, murmur(*args), env=env)


def evals_of(proc: Proc) -> list[tuple[int, float]]:
    """(round, val_loss) of each `--eval-every` line: the validation loss of the peer's outer weights phi."""
    return [(int(m[1]), float(m[2])) for line in proc.lines if (m := EVAL.match(line))]
