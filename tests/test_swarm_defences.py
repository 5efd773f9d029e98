"""One stranger must not stop the swarm (issue 12, items 1 and 6), with real processes on loopback, in one swarm.

Three honest `murmur run` peers train next to a `future-round` liar (benchmarks/adversary_peers.py: every update it
sends, and its announcement, claims a round 2^62 ahead). Before peer/node/rounds.py such a peer stopped a swarm of
three within a minute: every honest peer that mixed one of its updates jumped its clock to 2^62 and died on the
number. Here the honest peers refuse its updates (`future_round`), ban it after a few, keep training, and their
rounds (and the checkpoints named after them) stay small.

Then a `sybil` process keeps SYBILS validly signed announcements of made-up peers (fresh keys, loopback endpoints
where nothing listens) in the swarm's DHT key, and a genuine newcomer joins. Measured before peer/swarm/admission.py:
~200 fakes cut the share of honest rounds that reached any partner from 85% to 15%. Now only peers that answered a
probe at their endpoint (or exchanged) get partner slots, so the share stays up, and the newcomer, probed like any
new announcement, is dialled within a few rounds.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from functools import partial

import pytest

from benchmarks.adversary_peers import FUTURE_ROUND, SYBILS, counters
from benchmarks.adversary_peers import SCRIPT as ADVERSARY_SCRIPT
from peer.lab.harness import MADDR_LINE, Proc, Procs, murmur, run_toml, wait_until
from peer.node.roundline import RoundLine, parse_all

WARMUP_ROUNDS = 3
"""Rounds each honest peer makes before the measured phases (peers that join after it are probed first)."""
PHASE_ROUNDS = 6
"""Rounds per honest peer measured before the flood and during it."""
watch = partial(wait_until, fail_on_exit=True)
"""Every wait here fails at once when a process exits: none of them should."""
LISTED = re.compile(r"^peers: (\d+) live")
MIN_SHARE = 0.8
NEWCOMER_ROUNDS = 5
"""A genuine newcomer must have been dialled by an honest peer within this many of its own rounds."""


def _peer(procs: Procs, name: str, maddr: str, run_key: str, argv0: list[str], *extra: str) -> Proc:
    who = ["--manifest", "manifest.json", "--key", "owner.key"] if name == "owner" else ["--run-key", run_key]
    reach = [] if "--client-only" in extra else ["--listen", "127.0.0.1:0"]
    args = ["--swarm", "defences", "--initial-peers", maddr, "--identity", f"{name}.id", "--announce-ttl", "15",
            "--host-maddrs", "/ip4/127.0.0.1/tcp/0", *reach, "--device", "cpu", "--eval-every", "0", *who,
            *extra]  # fmt: skip
    env = {"MURMUR_HOME": str(procs.workdir / f"home-{name}"), "OMP_NUM_THREADS": "1", "MURMUR_LOG_LEVEL": "INFO"}
    return procs.start(name, [*argv0, *args], env=env)


def _most_listed(proc: Proc) -> bool:
    """Whether `proc` has printed a peer list with at least 90% of the SYBILS fakes in it."""
    return any((m := LISTED.match(line)) and int(m[1]) >= 0.9 * SYBILS for line in proc.lines)


def _share(lines: list[RoundLine]) -> float:
    return sum(1 for r in lines if r.exchanged > 0) / max(1, len(lines))


def _metrics(proc: Proc) -> dict[str, float]:
    return counters(proc.wait_for(r"^metrics at (http://\S+/metrics)$", timeout=120).group(1))


@pytest.mark.slow(80)
@pytest.mark.timeout(900)
def test_a_liar_about_rounds_and_a_flood_of_fake_peers_do_not_stop_the_swarm(procs: Procs) -> None:
    (procs.workdir / "run.toml").write_text(run_toml("defences", clip=0.0, exchange_timeout_s=5, min_round_s=2.0))
    made = procs.start("create", murmur("create-run", "--config", "run.toml", "--key", "owner.key",
                                        "--out", "manifest.json"))  # fmt: skip
    boot = procs.start("boot", murmur("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity", "boot.key"))
    maddr = boot.wait_for(MADDR_LINE, timeout=120).group(1)
    assert made.wait_exit(120) == 0, made.logs()
    run_key = made.lines[-1]
    honest = [_peer(procs, name, maddr, run_key, murmur("run"), "--metrics-port", "0", "--checkpoint-dir",
                    f"ckpt-{name}", "--checkpoint-every", "5") for name in ("owner", "peer1", "peer2")]  # fmt: skip
    liar = _peer(procs, "liar", maddr, run_key, [sys.executable, ADVERSARY_SCRIPT, "future-round"])
    everyone = [*honest, liar, boot]
    liar_id = liar.wait_for(r"^joined swarm defences as ([0-9a-f]{64})", timeout=300).group(1)

    def rounds_everywhere(n: int, start: dict[str, int]) -> Callable[[], bool]:
        return lambda: all(len(parse_all(p.lines)) >= start.get(p.name, 0) + n for p in honest)

    def banned_the_liar(proc: Proc) -> bool:
        return f"banned peer {liar_id}" in proc.stderr_path.read_text()

    watch(rounds_everywhere(WARMUP_ROUNDS, {}), 300, "the warm-up rounds", everyone)
    warm = {p.name: len(parse_all(p.lines)) for p in honest}
    watch(rounds_everywhere(PHASE_ROUNDS, warm), 300, "rounds before the flood", everyone)
    before = {p.name: parse_all(p.lines)[warm[p.name] :] for p in honest}
    watch(lambda: all(banned_the_liar(p) for p in honest), 300, "every honest peer bans the liar", everyone)

    sybil = _peer(procs, "sybil", maddr, run_key, [sys.executable, ADVERSARY_SCRIPT, "sybil"], "--client-only")
    everyone.append(sybil)
    # the honest peers re-read the peer list every TTL/3 (5 s here) and print it when it changes; the phase starts
    # once each of them lists most of the fakes (a few of 200 stores may fail on a loaded machine)
    for proc in honest:
        watch(lambda p=proc: _most_listed(p), 300, f"{proc.name} lists the fakes", everyone)
    flood = {p.name: len(parse_all(p.lines)) for p in honest}
    watch(rounds_everywhere(PHASE_ROUNDS, flood), 300, "rounds during the flood", everyone)
    during = {p.name: parse_all(p.lines)[flood[p.name] :] for p in honest}

    newcomer = _peer(procs, "newcomer", maddr, run_key, murmur("run"))
    everyone.append(newcomer)
    watch(lambda: any(r.pushed_to_us > 0 for r in parse_all(newcomer.lines)), 300, "the newcomer dialled", everyone)
    waited = next(i for i, r in enumerate(parse_all(newcomer.lines)) if r.pushed_to_us > 0)

    share_before = _share([r for lines in before.values() for r in lines])
    share_during = _share([r for lines in during.values() for r in lines])
    print(f"\nshare of honest rounds that reached a partner: before the flood {share_before:.2f} "
          f"({sum(map(len, before.values()))} rounds), during it {share_during:.2f} "
          f"({sum(map(len, during.values()))} rounds); the newcomer was dialled after {waited} rounds")  # fmt: skip
    assert share_during >= MIN_SHARE, during
    assert waited <= NEWCOMER_ROUNDS, newcomer.logs()
    for proc in honest:  # the liar's rounds were refused and it was banned; the honest clocks stayed sane
        seen = _metrics(proc)
        rounds = [r.round for r in parse_all(proc.lines)]
        saved = [int(d.name.removeprefix("round-")) for d in (procs.workdir / f"ckpt-{proc.name}").glob("round-*")]
        print(f"{proc.name}: rounds {rounds[0]}..{rounds[-1]}, checkpoints {sorted(saved)}, counters {seen}")
        assert seen.get("rejected:future_round", 0) > 0, seen
        assert max(rounds) < 1000 and rounds == sorted(rounds), rounds
        assert saved and max(saved) < FUTURE_ROUND, saved
    for proc in [*honest, newcomer]:
        assert proc.terminate(timeout=60) == 0, proc.logs()
