"""A volunteer joins with one line (issue 18, item 1), with real processes on loopback, in a fresh home directory:

    murmur run --swarm demo --initial-peers MADDR --run-key KEY

and nothing else. The peer makes its identity in the data directory, learns the address to announce from the
bootstrap node (its connection comes from 127.0.0.1 here), is found reachable there, trains with the owner, and
saves checkpoints in the data directory by default; after SIGTERM they are there. The same line without
--run-key (the key is pinned now) keeps the identity and resumes from them, and a second peer started with the
same line while it runs is refused in one line: one identity, one running peer.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from peer.lab.demo import demo_toml
from peer.lab.harness import MADDR_LINE, Proc, Procs, murmur, wait_until
from peer.node.roundline import parse_all

RUN_TOML = demo_toml(slices=2, preset="micro", min_round_s=0.5)


def fresh_home(home: Path) -> dict[str, str]:
    """The environment of a user whose home is `home`, with no murmur or XDG data directory set."""
    return {"HOME": str(home), "MURMUR_HOME": "", "XDG_DATA_HOME": "", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow(8)
@pytest.mark.timeout(300)
def test_one_line_joins_trains_and_keeps_identity_and_checkpoints_in_the_data_directory(procs: Procs) -> None:
    (procs.workdir / "run.toml").write_text(RUN_TOML)
    made = procs.start("create", murmur("create-run", "--config", "run.toml", "--key", "owner.key"))
    boot = procs.start("boot", murmur("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity", "boot.key",
                                      "--metrics-port", "0"))  # fmt: skip
    maddr = boot.wait_for(MADDR_LINE, timeout=60).group(1)
    boot_metrics = boot.wait_for(r"^metrics at (http://\S+)$", timeout=30)[1]
    assert made.wait_exit(60) == 0, made.logs()
    run_key = made.lines[-1]
    owner = procs.start("owner", murmur(
        "run", "--swarm", "demo", "--initial-peers", maddr, "--manifest", "manifest.json", "--key", "owner.key",
        "--identity", "owner.id", "--listen", "127.0.0.1:0", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
        "--device", "cpu", "--eval-every", "0", "--no-checkpoints",
    ), env={"MURMUR_HOME": str(procs.workdir / "home-owner"), "OMP_NUM_THREADS": "1"})  # fmt: skip
    owner.wait_for(r"^joined swarm demo", timeout=120)

    home = procs.workdir / "volunteer-home"
    data = home / ".local" / "share" / "murmur"
    one_line = murmur("run", "--swarm", "demo", "--initial-peers", maddr)
    volunteer = procs.start("volunteer", [*one_line, "--run-key", run_key], env=fresh_home(home))
    volunteer.wait_for(rf"^identity {re.escape(str(data / 'identity.key'))} \(new\): peer [0-9a-f]{{16}}$", 60)
    volunteer.wait_for(r"^endpoint: \S+ sees this peer at 127\.0\.0\.1; serving on port \d+", timeout=120)
    volunteer.wait_for(r"^reachability: OK", timeout=60)
    peer_id = volunteer.wait_for(r"^joined swarm demo as ([0-9a-f]{64}) slice \d endpoint 127\.0\.0\.1:\d+$", 60)[1]
    checkpoints = data / "checkpoints" / "demo" / peer_id[:16]
    volunteer.wait_for(rf"^checkpoints in {re.escape(str(checkpoints))}, every 10 rounds", timeout=60)
    volunteer.wait_for(r"^round \d+ .* exchanged 1/1", timeout=120)  # it trains with the owner
    seen = bootstrap_sees(boot_metrics, boot)  # what the bootstrap node's Prometheus would see of this
    assert seen["murmur_bootstrap_requests_total/observed_address"] >= 1, seen
    assert seen["murmur_bootstrap_requests_total/reachability"] >= 1, seen
    assert seen["murmur_bootstrap_dht_routing_peers"] >= 1 and seen["murmur_bootstrap_p2p_connected_peers"] >= 1, seen
    assert volunteer.terminate(timeout=60) == 0, volunteer.logs()
    saved = sorted(int(d.name.removeprefix("round-")) for d in checkpoints.glob("round-*"))
    assert saved, f"no checkpoint in {checkpoints}: {sorted(p.name for p in data.rglob('*'))}"
    assert json.loads((data / "pins.json").read_text()) == {"demo": run_key}
    print(f"\ncheckpoints after SIGTERM in {checkpoints}: rounds {saved}")

    again = procs.start("again", one_line, env=fresh_home(home))  # no --run-key: pinned
    again.wait_for(r"^identity \S+ \(kept\)", timeout=60)
    resumed = int(again.wait_for(r"^resumed from the checkpoint of round (\d+)", timeout=120)[1])
    assert resumed == saved[-1]
    twin = procs.start("twin", one_line, env=fresh_home(home))
    assert twin.wait_exit(120) == 1, twin.logs()
    assert "is in use by another murmur peer" in twin.stderr_path.read_text(), twin.logs()
    assert "Traceback" not in twin.stderr_path.read_text(), twin.logs()
    again.wait_for(r"^round \d+ ", timeout=120)
    assert [r.round for r in parse_all(again.lines)][0] > resumed
    for proc in (again, owner):
        assert proc.terminate(timeout=60) == 0, proc.logs()


def bootstrap_sees(url: str, boot: Proc) -> dict[str, float]:
    """The bootstrap node's metrics (name/handler or name), once its DHT sample counts both training peers."""
    values: dict[str, float] = {}

    def two_announced() -> bool:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                values["/".join([s.name, *s.labels.values()]) if family.name.startswith("murmur") else s.name] = s.value
        return sum(v for k, v in values.items() if k.startswith("murmur_bootstrap_announced_peers/")) >= 2

    wait_until(two_announced, 60, "the bootstrap node's metrics count the two announced peers", [boot])
    return values
