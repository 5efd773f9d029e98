"""Slice and partner choice (pure functions, no network), and the volunteer-facing messages."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from types import SimpleNamespace

import pytest

from peer.swarm import membership as swarm_module
from peer.swarm.join import refresh_until
from peer.swarm.membership import (
    Member,
    Swarm,
    SwarmConfig,
    choose_partners,
    choose_slice,
    rebalance,
    slice_counts,
)
from peer.swarm.reachability import Reachability
from protocol.identity import Identity
from protocol.records import Announcement

pytestmark = pytest.mark.timeout(30)


def peer(pid: str, slice_index: int, endpoint: str = "127.0.0.1:1") -> Announcement:
    return Announcement(peer_id=pid, public_key=b"", run_id="r", endpoint=endpoint, tls_fingerprint="",
                        tls_certificate=b"", slice=slice_index, round=0, tokens_per_second=0.0, loss=0.0,
                        software_version="0", protocol_version="1.0", expires_unix=0.0)  # fmt: skip


def test_new_peer_takes_the_least_covered_slice_ties_at_random() -> None:
    peers = [peer("a", 0), peer("b", 0), peer("c", 1), peer("d", 9)]  # slice 9 is out of range: ignored
    assert slice_counts(peers, 3) == [2, 1, 0]
    assert {choose_slice(peers, 3, random.Random(s)) for s in range(20)} == {2}
    tie = Counter(choose_slice([peer("a", 0)], 3, random.Random(s)) for s in range(200))
    assert set(tie) == {1, 2} and min(tie.values()) > 60


def test_rebalance_moves_exactly_one_peer_off_a_crowded_slice() -> None:
    peers = [peer("a", 0), peer("b", 0), peer("c", 0), peer("d", 1)]
    rng = random.Random(0)
    assert rebalance(peers, "a", 0, 3, rng) == 2  # lowest id of the crowd moves to the empty slice
    assert rebalance(peers, "b", 0, 3, rng) is None and rebalance(peers, "c", 0, 3, rng) is None
    assert rebalance(peers, "d", 1, 3, rng) is None
    assert rebalance([peer("a", 0), peer("b", 1)], "a", 0, 3, rng) is None  # [1, 1, 0] is not badly skewed
    # Simulated refresh rounds converge from everyone-on-one-slice to max - min <= 1, without flapping.
    slices = {f"p{i}": 0 for i in range(7)}
    for _ in range(10):
        view = [peer(pid, s) for pid, s in slices.items()]
        for pid in slices:
            target = rebalance(view, pid, slices[pid], 3, rng)
            if target is not None:
                slices[pid] = target
    counts = slice_counts([peer(p, s) for p, s in slices.items()], 3)
    assert max(counts) - min(counts) <= 1, counts


def test_partners_prefer_missing_slices_and_skip_self_banned_and_client_only() -> None:
    peers = [peer("me", 0), peer("same", 0), peer("one", 1), peer("one-b", 1), peer("two", 2),
             peer("banned", 2), peer("nat", 1, endpoint="")]  # fmt: skip
    for seed in range(30):
        chosen = choose_partners(peers, me="me", own_slice=0, fanout=2, rng=random.Random(seed), avoid={"banned"})
        assert {p.slice for p in chosen} == {1, 2}, chosen
        assert not {"me", "banned", "nat"} & {p.peer_id for p in chosen}
    everyone = choose_partners(peers, me="me", own_slice=0, fanout=10, rng=random.Random(1), avoid={"banned"})
    assert [p.peer_id for p in everyone][-1] == "same" and len(everyone) == 4
    assert choose_partners([peer("me", 0)], me="me", own_slice=0, fanout=2, rng=random.Random(0)) == []


def test_reachability_advice_names_the_port_and_client_only() -> None:
    bad = Reachability(False, via="/ip4/1.2.3.4/tcp/31337/p2p/Qm", detail="unreachable: refused")
    text = bad.advice("198.51.100.4:7000")
    assert "Open TCP port 7000" in text and "--client-only" in text and "--announce" in text
    assert "OK" in Reachability(True, via="x", detail="ok").advice("h:1")
    assert "--client-only" in Reachability(None, via="", detail="no node").advice("h:1")


class FakeDHT:
    """Records the coroutines a Swarm asks the DHT process to run."""

    def __init__(self) -> None:
        self.calls = 0

    def run_coroutine(self, fn: object) -> int:
        self.calls += 1
        return 3


def test_too_few_peers_triggers_a_rate_limited_rebootstrap() -> None:
    from peer.swarm.membership import Swarm, SwarmConfig

    dht = FakeDHT()
    swarm = Swarm(dht, SwarmConfig(swarm="s", initial_peers=("/ip4/1.2.3.4/tcp/1/p2p/Qm",), min_peers=2))
    swarm.maybe_rebootstrap(seen=5)
    assert dht.calls == 0
    swarm.maybe_rebootstrap(seen=1)
    swarm.maybe_rebootstrap(seen=0)  # within rebootstrap_every_s: not again
    assert dht.calls == 1
    swarm._last_rebootstrap -= swarm.config.rebootstrap_every_s
    swarm.maybe_rebootstrap(seen=0)
    assert dht.calls == 2


def test_cli_create_run_prints_the_run_key_last_and_usage_errors_exit_2(tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    from peer.cli.main import main
    from protocol.identity import Identity
    from protocol.manifest import load_json

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    made = runner.invoke(main, ["create-run", "--swarm", "cli", "--preset", "tiny", "--slices", "3",
                                "--key", "owner.key", "--out", "m.json"])  # fmt: skip
    assert made.exit_code == 0, made.output
    run_key = made.output.strip().splitlines()[-1]
    assert run_key == Identity.load(tmp_path / "owner.key").public_key.hex()
    signed = load_json(tmp_path / "m.json", swarm="cli", trusted_key=bytes.fromhex(run_key))
    assert signed.manifest.slices.num_slices == 3 and signed.run_id in made.output
    bad = runner.invoke(main, ["status", "--swarm", "Bad Name", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/Qm"])
    assert bad.exit_code == 2 and "invalid swarm name" in bad.output
    both = runner.invoke(main, ["run", "--swarm", "cli", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/Qm",
                                "--identity", "p.key", "--listen", "127.0.0.1:0", "--client-only"])  # fmt: skip
    assert both.exit_code == 2 and "not both" in both.output
    announce_alone = runner.invoke(main, ["join", "--swarm", "cli", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/Qm",
                                          "--identity", "p.key", "--announce", "203.0.113.7:7000"])  # fmt: skip
    assert announce_alone.exit_code == 2 and "--announce IP:PORT goes with --listen" in announce_alone.output


# ------------------------------------------------------------------- churn: expiry and re-balancing


class RecordDHT:
    """A DHT that keeps every stored record, expired or not: murmur must drop expired announcements itself
    (a node's stale copy or skewed clock can still return them)."""

    def __init__(self) -> None:
        self.records: dict[object, dict[str, SimpleNamespace]] = {}

    def store(self, key: object, value: bytes, expiration_time: float, subkey: str) -> bool:
        self.records.setdefault(key, {})[subkey] = SimpleNamespace(value=value, expiration_time=expiration_time)
        return True

    def get(self, key: object, latest: bool = True) -> SimpleNamespace | None:
        found = self.records.get(key)
        return None if found is None else SimpleNamespace(value=dict(found))


class QuietSwarm(Swarm):
    published = 0

    def publish_manifest(self, signed: object) -> bool:
        self.published += 1  # counted, not stored: the manifest is not what these tests are about
        return True


def members(count: int, num_slices: int, ttl: float = 60.0) -> list[Member]:
    """`count` peers of one run over one RecordDHT, joined one after another (least covered slice)."""
    swarm = QuietSwarm(RecordDHT(), SwarmConfig(swarm="churn", announce_ttl_s=ttl))
    manifest = SimpleNamespace(
        run_id="ab" * 32, manifest=SimpleNamespace(slices=SimpleNamespace(num_slices=num_slices))
    )
    made = []
    for index in range(count):
        member = Member(swarm, Identity.generate(), manifest, endpoint=f"127.0.0.1:{index + 1}", software_version="t")
        member.rng = random.Random(index)
        member.join()
        made.append(member)
    return made


@pytest.fixture
def dht_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The DHT's clock, moved by the test: [seconds since the epoch]."""
    now = [1_800_000_000.0]
    monkeypatch.setattr(swarm_module, "get_dht_time", lambda: now[0])
    return now


def test_the_manifest_is_re_published_a_few_times_per_refresh_whatever_the_swarm_size(dht_clock: list[float]) -> None:
    # every peer storing it at every refresh made the nodes nearest its key take one store per peer per refresh
    for size in (2, 3, 24, 96):
        peers = members(size, 4)
        swarm = peers[0].swarm
        assert isinstance(swarm, QuietSwarm)
        for _ in range(40):
            dht_clock[0] += 20
            for member in peers:
                member.refresh()
        per_refresh = swarm.published / 40
        if size <= swarm_module.MANIFEST_REPUBLISHERS:
            assert per_refresh == size, (size, per_refresh)  # a small swarm stores it at every refresh, as before
        else:
            assert 1.5 <= per_refresh <= 4.5, (size, per_refresh)  # about MANIFEST_REPUBLISHERS, not `size`


def test_dead_peers_expire_and_their_uncovered_slice_is_taken_within_two_refreshes(dht_clock: list[float]) -> None:
    peers = members(6, 3)
    assert slice_counts(peers[-1].swarm.live_peers("ab" * 32), 3) == [2, 2, 2]
    dead = [m for m in peers if m.slice == 2]
    survivors = [m for m in peers if m.slice != 2]
    dht_clock[0] += 30  # within the TTL the dead still count: their slice looks covered
    for member in survivors:
        member.refresh()
    assert {m.slice for m in survivors} == {0, 1} and len(survivors[0].peers) == 6
    dht_clock[0] += 31  # past the dead peers' TTL (the survivors re-announced at +30)
    refreshes = 0
    while 2 not in {m.slice for m in survivors}:
        refreshes += 1
        assert refreshes <= 2, [m.slice for m in survivors]
        for member in survivors:
            member.refresh()
    listed = {p.peer_id for p in survivors[0].swarm.live_peers("ab" * 32)}
    assert listed == {m.identity.peer_id for m in survivors}, "expired announcements are dropped"
    assert not listed & {m.identity.peer_id for m in dead}
    for member in survivors:  # and it settles: nobody flaps once coverage is even
        member.refresh()
    counts = slice_counts(survivors[0].swarm.live_peers("ab" * 32), 3)
    assert max(counts) - min(counts) <= 1 and min(counts) >= 1, counts


@pytest.mark.timeout(60)
def test_the_refresh_loop_re_evaluates_the_slice_as_peers_leave(dht_clock: list[float], capsys) -> None:
    """`refresh_until`, the loop `murmur run` runs (every TTL/3): after both peers of slice 1 died and expired,
    one of the two survivors of slice 0 moves there on its own, and says so on stdout."""
    peers = members(4, 2, ttl=1.5)
    assert sorted(m.slice for m in peers) == [0, 0, 1, 1]
    survivors = [m for m in peers if m.slice == 0]
    dht_clock[0] += 10  # everyone's announcement expired; only the survivors come back

    async def scenario() -> float:
        stop = asyncio.Event()
        loops = [asyncio.create_task(refresh_until(stop, m)) for m in survivors]
        start = time.monotonic()
        while sorted(m.slice for m in survivors) != [0, 1] and time.monotonic() - start < 20:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*loops)
        return time.monotonic() - start

    took = asyncio.run(scenario())
    assert sorted(m.slice for m in survivors) == [0, 1], "the uncovered slice was taken"
    assert took < 4 * survivors[0].swarm.config.refresh_every_s, took
    assert "slice coverage" in capsys.readouterr().out
