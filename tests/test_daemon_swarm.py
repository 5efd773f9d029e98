"""`murmur run` with real processes on loopback: a bootstrap node, the owner and two volunteers (one
client-only, joining late) train the demo's run config on the `micro` preset together, exchange updates over
gRPC, their loss falls, the late joiner starts from a live peer's weights and is at the others' loss level
within a few rounds, `murmur status` (once, and live with a plot) sees their rounds rise, and SIGTERM stops every
process with exit code 0 and nothing left running.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from peer.lab.demo import demo_toml
from peer.lab.harness import MADDR_LINE, Proc, Procs, group_pids, murmur, wait_until
from peer.node.roundline import parse_all

RUN_TOML = demo_toml(slices=2, preset="micro", min_round_s=0.5)
"""The run `murmur demo` trains (swarm "demo", tiny, H=10, fanout 1) at K=2: the swarm a newcomer first sees is
the one checked here, and a change to the demo's settings runs through this test too. Rounds at least 0.5 s
apart: flat out, two `micro` peers took both cores and every process started later (the late joiner,
`murmur status`, the restart) waited for CPU."""
TRAIN_S = 8.0
"""Seconds the three train together after the late join: about 2 rounds a second each."""
LATE_ROUNDS = 3
LATE_MARGIN = 0.15
"""Nats the late joiner's first rounds may be above the others' loss at the same rounds."""


def rounds_of(proc: Proc) -> list[tuple[int, float, int, int, int]]:
    """(round, loss, exchanged, mixed, pushed-to-us) per round line."""
    return [(r.round, r.loss, r.exchanged, r.mixed, r.pushed_to_us) for r in parse_all(proc.lines)]


def start_run(procs: Procs, name: str, maddr: str, *extra: str, ident: str = "") -> Proc:
    args = ["run", "--swarm", "demo", "--initial-peers", maddr, "--identity", f"{ident or name}.id",
            "--announce-ttl", "6", "--checkpoint-dir", f"ckpt-{ident or name}",
            "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", "cpu", "--eval-every", "10", *extra]  # fmt: skip
    env = {"MURMUR_HOME": str(procs.workdir / f"home-{name}"), "OMP_NUM_THREADS": "1"}
    return procs.start(name, murmur(*args), env=env)


def resumed_from(procs: Procs, maddr: str, run_key: str, last_round: int) -> None:
    """Restart the stopped peer1 (same identity and checkpoint dir): it resumes from its checkpoint."""
    assert sorted(p.name for p in (procs.workdir / "ckpt-peer1").glob("round-*"))
    again = start_run(procs, "peer1-again", maddr, "--run-key", run_key, "--listen", "127.0.0.1:0", ident="peer1")
    resumed = int(again.wait_for(r"^resumed from the checkpoint of round (\d+)", timeout=60).group(1))
    assert resumed >= last_round
    again.wait_for(r"^round \d+ .* exchanged 1/1", timeout=30)
    assert again.terminate(timeout=30) == 0, again.logs()


def watched(watching: Proc, owner: Proc, plot: Path) -> None:
    """`murmur status --watch` printed a table a second while the swarm trained, the owner's round rose between
    them, the plot of the swarm's loss is there, and SIGTERM ends the watch with exit code 0. Waited for, not
    timed: on a loaded machine the watch's own start (its DHT) can take most of the training window."""
    owner_id = owner.wait_for(r"^joined swarm demo as ([0-9a-f]{64})")[1]

    def owner_rounds() -> list[int]:
        return [int(line.split()[3]) for line in list(watching.lines) if line.startswith(owner_id[:16])]

    wait_until(lambda: len(set(owner_rounds())) >= 3, 120, "the watch shows the owner's round rise 3 times",
               [watching, owner], fail_on_exit=True)  # fmt: skip
    # ... and serves what it read as Prometheus metrics: the whole swarm from one scrape target
    url = watching.wait_for(r"^metrics at (http://\S+)$", timeout=10)[1]
    swarm = {(s.name, s.labels.get("peer", "")): s for f in text_string_to_metric_families(
        urllib.request.urlopen(url, timeout=10).read().decode()) for s in f.samples}  # fmt: skip
    assert [s.value for (name, _), s in swarm.items() if name == "murmur_swarm_live_peers"] == [3], swarm
    assert swarm["murmur_swarm_peer_round", owner_id[:16]].value >= 1, swarm
    assert swarm["murmur_swarm_peer_round", owner_id[:16]].labels["swarm"] == "demo", swarm
    assert watching.terminate(timeout=30) == 0, watching.logs()
    assert plot.read_bytes()[:4] == b"\x89PNG", plot


@pytest.mark.slow(32)
@pytest.mark.timeout(400)
def test_three_peers_train_together_and_stop_cleanly(procs: Procs, tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text(RUN_TOML)
    made = procs.start("create", murmur("create-run", "--config", "run.toml", "--key", "owner.key",
                                        "--out", "manifest.json"))  # fmt: skip
    boot = procs.start("boot", murmur("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity", "boot.key"))
    maddr = boot.wait_for(MADDR_LINE, timeout=40).group(1)
    assert made.wait_exit() == 0, made.logs()
    run_key = made.lines[-1]

    owner = start_run(procs, "owner", maddr, "--manifest", "manifest.json", "--key", "owner.key",
                      "--listen", "127.0.0.1:0", "--metrics-port", "0")  # fmt: skip
    peer1 = start_run(procs, "peer1", maddr, "--run-key", run_key, "--listen", "127.0.0.1:0")
    for proc in (owner, peer1):
        proc.wait_for(r"^joined swarm demo as [0-9a-f]{64} slice [01]", timeout=60)
    t0 = time.monotonic()
    owner.wait_for(r"^round (1[2-9]|[2-9]\d|\d{3,}) ", timeout=150)  # >= 12 (rounds may skip)
    peer2 = start_run(procs, "peer2", maddr, "--run-key", run_key, "--client-only")
    fetched = int(peer2.wait_for(r"^late join: fetched the weights of round (\d+)", timeout=60).group(1))
    started = {"owner": t0, "peer1": t0, "peer2": time.monotonic()}
    assert fetched >= 5
    peers = [owner, peer1, peer2]
    watching = procs.start("watch", murmur("status", "--swarm", "demo", "--initial-peers", maddr, "--watch",
                                           "--every", "1", "--wait", "0.5", "--plot", "swarm-loss.png",
                                           "--metrics-port", "0"))  # fmt: skip
    time.sleep(TRAIN_S)
    watched(watching, owner, tmp_path / "swarm-loss.png")
    listed = json.loads("\n".join(procs.run("status", murmur("status", "--swarm", "demo", "--initial-peers", maddr,
                                                             "--json", "--wait", "0.5")).lines))  # fmt: skip
    assert len(listed) == 3 and all(p["round"] > 0 and p["loss"] is not None for p in listed), listed
    metrics_url = owner.wait_for(r"^metrics at (http://\S+)").group(1)
    scraped = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    values = {s.name: s for f in text_string_to_metric_families(scraped) for s in f.samples}
    assert values["murmur_round"].value > 10 and values["murmur_sent_bytes_total"].value > 0, scraped
    assert values["murmur_live_peers"].value == 3 and values["murmur_train_loss"].value < 3.5, scraped
    assert values["murmur_round"].labels == {"swarm": "demo", "run": listed[0]["run_id"][:16]}, scraped
    assert values["murmur_peer_info"].labels["peer"] in {p["peer_id"] for p in listed}, scraped
    assert values["murmur_round_duration_seconds_count"].value > 10, scraped

    for proc in (peer1, owner, peer2):
        pgid = proc.pgid
        assert proc.terminate(timeout=30) == 0, proc.logs()
        assert group_pids(pgid) == [], f"{proc.name} left processes behind"
        if proc is peer1:
            stopped = time.monotonic()
            resumed_from(procs, maddr, run_key, last_round=rounds_of(peer1)[-1][0])
    for proc in peers:
        elapsed = stopped - started[proc.name]  # peer1 stopped first; the others ran a little longer
        rounds = rounds_of(proc)
        assert len(rounds) >= 5, proc.logs()
        losses = [loss for _, loss, *_ in rounds]
        if proc is not peer2:  # the late joiner starts from trained weights: it is checked below, against these
            assert sum(losses[-3:]) / 3 < losses[0] - 1.0, (proc.name, losses)
        assert sum(exchanged for _, _, exchanged, _, _ in rounds) >= len(rounds) // 2, proc.logs()
        assert sum(mixed for *_, mixed, _ in rounds) >= len(rounds) // 2, proc.logs()
        print(f"\n{proc.name}: {len(rounds)} rounds in ~{elapsed:.0f}s ({60 * len(rounds) / elapsed:.0f}/min), "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, exchanges "
              f"{sum(r[2] for r in rounds)}, updates mixed {sum(r[3] for r in rounds)}, "
              f"pushed to it {rounds[-1][4]}")  # fmt: skip
    for proc in (owner, peer1):  # the validation loss of the outer weights phi falls too
        evals = [float(m[1]) for line in proc.lines if (m := re.search(r"^eval round \d+ val_loss ([\d.]+)", line))]
        assert len(evals) >= 3 and evals[-1] < evals[0] - 1.0, (proc.name, evals)
        print(f"{proc.name}: val loss every 10 rounds {evals}")
    # The late joiner continued the swarm's rounds from where its donor was, and its first loss is the
    # swarm's (not a fresh model's ~4.5 nats).
    assert rounds_of(peer2)[0][0] == fetched + 1
    assert rounds_of(peer2)[0][1] < rounds_of(owner)[0][1] - 1.0
    # Within a few rounds it is at the others' level: its mean loss over its first LATE_ROUNDS rounds is
    # within LATE_MARGIN of the others' mean loss over the same round numbers (a fresh model starts near 4.5).
    late = rounds_of(peer2)[:LATE_ROUNDS]
    lo, hi = late[0][0], late[-1][0]
    theirs = [loss for p in (owner, peer1) for r, loss, *_ in rounds_of(p) if lo - 1 <= r <= hi + 1]
    mine = sum(loss for _, loss, *_ in late) / len(late)
    print(f"late joiner: rounds {lo}-{hi} mean loss {mine:.3f}; the others over rounds {lo - 1}-{hi + 1}: "
          f"{sum(theirs) / max(1, len(theirs)):.3f} ({len(theirs)} round lines)")  # fmt: skip
    assert len(late) == LATE_ROUNDS and len(theirs) >= 2, (late, theirs)
    assert mine <= sum(theirs) / len(theirs) + LATE_MARGIN, (late, theirs)
    # and it keeps that level: its last rounds are no worse than the others' last rounds (by LATE_MARGIN)
    last_mine = sum(loss for _, loss, *_ in rounds_of(peer2)[-3:]) / 3
    last_theirs = sum(loss for p in (owner, peer1) for _, loss, *_ in rounds_of(p)[-3:]) / 6
    assert last_mine <= last_theirs + LATE_MARGIN, (rounds_of(peer2)[-3:], last_theirs)
    # Nobody dials the client-only peer; the listening peers receive its pushes.
    assert rounds_of(peer2)[-1][4] == 0
    assert rounds_of(owner)[-1][4] + rounds_of(peer1)[-1][4] > 0
    assert boot.terminate(timeout=20) == 0, boot.logs()
