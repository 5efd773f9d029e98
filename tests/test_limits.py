"""Rate and size limits (protocol/limits.py): who is refused, who is banned, and that memory stays bounded.

The server-level tests swap in a `Limiter` with tight limits (and, where time matters, a fake clock);
the flood test counts the server's payload buffers and traces Python allocations while a crowd of
authenticated peers push at once.
"""

from __future__ import annotations

import asyncio
import tracemalloc

import grpc
import pytest
from conftest_wire import (
    CLIENT_ID,
    SERVER_ID,
    STRANGER_ID,
    Wire,
    pinned_channel,
    push_frames,
    run,
    serving,
    unary,
    until,
    update_frames,
)

from protocol import PROTOCOL_MAJOR
from protocol._generated import murmur_pb2 as pb
from protocol.bans import BanList
from protocol.errors import RateLimited, Reason
from protocol.identity import Identity
from protocol.limits import Limiter, Limits, RateBuckets, address_of, largest_stream_bytes
from protocol.service import PeerServer, ServerConfig
from protocol.updates import MAX_MESSAGE_BYTES

S = grpc.StatusCode
INFO = pb.InfoRequest(protocol_major=PROTOCOL_MAJOR).SerializeToString()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.timeout(10)
def test_buckets_refill_per_minute_and_forget_the_least_recent_keys() -> None:
    clock = Clock()
    buckets = RateBuckets(capacity=3, max_keys=2, clock=clock)
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]
    clock.now += 20  # a third of a minute: one token back
    assert buckets.take("a") and not buckets.take("a")
    assert not buckets.take("a", 5), "more than a bucket holds is never allowed"
    buckets.take("b")
    buckets.take("c")
    assert len(buckets) == 2, "bounded: 'a' was the least recently seen and is forgotten"
    assert buckets.take("a") and buckets.take("a") and buckets.take("a"), "a forgotten key starts full"


@pytest.mark.timeout(10)
def test_addresses_limits_and_bans_are_well_formed_and_bounded() -> None:
    assert address_of("ipv4:127.0.0.1:51234") == "127.0.0.1"
    assert address_of("ipv6:[::1]:51234") == "::1" == address_of("ipv6:%5B::1%5D:51234")
    assert address_of("unix:/tmp/sock") == "unix:/tmp/sock"
    limits = Limits.for_run(stream_bytes=10_000, min_round_s=0.5)
    assert limits.exchanges_per_minute_per_peer == 240 and limits.bytes_per_minute_per_peer == 240 * 10_000
    assert limits.max_inflight_bytes == 40_000 and limits.calls_per_minute_per_address > 8 * 240
    with pytest.raises(ValueError):
        Limits(max_inflight_bytes=0)
    with pytest.raises(ValueError):
        Limits.for_run(stream_bytes=1, min_round_s=0)
    clock = Clock()
    bans = BanList(duration_s=600, clock=clock, max_entries=3)
    bans.ban("short", "over_limit", duration_s=10)
    for peer in ("p1", "p2", "p3"):
        bans.ban(peer, "garbage")
    assert bans.entries() == 3 and not bans.is_banned("short"), "the ban ending soonest goes first"
    clock.now += 599
    assert bans.banned() == ["p1", "p2", "p3"]
    bans.ban("p1", "again", duration_s=1)
    clock.now += 2
    assert bans.is_banned("p1") is False, "a per-ban duration is measured from the new ban"


@pytest.mark.timeout(10)
def test_reservations_are_given_back_however_the_block_ends() -> None:
    limiter = Limiter(Limits(max_inflight_bytes=100, max_streams_per_peer=1))
    with limiter.reserve("a", 60):
        with pytest.raises(RateLimited) as busy:
            with limiter.reserve("b", 50):
                pass
        assert busy.value.reason is Reason.RATE_LIMITED
        with pytest.raises(RateLimited) as second:
            with limiter.reserve("a", 1):
                pass
        assert second.value.reason is Reason.RATE_LIMITED
    with pytest.raises(RuntimeError):
        with limiter.reserve("b", 100):
            raise RuntimeError("the stream died")
    assert (limiter.inflight_bytes, limiter.peak_inflight_bytes, limiter.tracked()) == (0, 100, 0)

    async def cancelled_mid_decode() -> tuple[int, int]:
        """The stream's task is cancelled while a worker still decodes its buffer: the bytes stay reserved."""
        decoding = asyncio.get_running_loop().create_future()
        with limiter.reserve("a", 70) as reservation:
            reservation.release_when_done(decoding)
        held = limiter.inflight_bytes
        decoding.set_exception(ValueError("non-finite"))  # retrieved by the reservation, not left unobserved
        await asyncio.sleep(0)
        return held, limiter.inflight_bytes

    assert run(cancelled_mid_decode) == (70, 0)


@pytest.mark.timeout(10)
def test_default_limits_come_from_the_policy_largest_update() -> None:
    wire = Wire(shapes={"delta/w": (64, 64), "phi/w": (64, 64)})
    wire.codec = type(wire.codec)(name="fp32")
    assert largest_stream_bytes(wire.policy()) == 2 * 64 * 64 * 4
    server = PeerServer(identity=SERVER_ID, policy=wire.policy(), on_update=wire.on_update,
                        config=ServerConfig(min_round_s=1.0))  # fmt: skip
    assert server.limiter.limits == Limits.for_run(stream_bytes=2 * 64 * 64 * 4, min_round_s=1.0)
    assert server.limiter.limits.exchanges_per_minute_per_peer == 120
    assert server.limiter.limits.max_inflight_bytes == 4 * largest_stream_bytes(wire.policy())


def _tight(server, clock: Clock | None = None, **limits: float) -> None:
    server.limiter = Limiter(Limits(**limits), clock or Clock())


@pytest.mark.timeout(60)
def test_an_address_over_its_calls_is_refused_until_its_bucket_refills_and_nobody_is_banned() -> None:
    wire = Wire()
    clock = Clock()

    async def scenario():
        async with serving(wire) as server:
            _tight(server, clock, calls_per_minute_per_address=5)
            channel = pinned_channel(server)
            try:
                flood = [await unary(channel, "Info", INFO) for _ in range(8)]
                pushed = await push_frames(channel, update_frames(wire.update(1)))
                clock.now += 60
                later = await push_frames(channel, update_frames(wire.update(2)))
            finally:
                await channel.close()
            return flood, pushed, later, server

    flood, pushed, later, server = run(scenario)
    assert [o.code for o in flood] == [S.OK] * 5 + [S.RESOURCE_EXHAUSTED] * 3
    assert {o.reason for o in flood[5:]} == {"over_limit"}
    # The push is refused when its call starts, before the server reads its first frame, so that frame's write can
    # race the refusal: grpc.aio then reports a local INTERNAL instead of the server's status (grpc/grpc#36066;
    # seen once in a fresh clone's `make test` under load). The server's count below is what proves the refusal.
    assert (pushed.code, pushed.reason) == (S.RESOURCE_EXHAUSTED, "over_limit") or pushed.write_raced, pushed
    assert later.code is S.OK, later.details
    assert server.rejections == {Reason.OVER_LIMIT: 4} and server.bans.banned() == []
    assert [u.round for u in wire.received] == [2]


@pytest.mark.timeout(60)
def test_a_proven_peer_over_its_exchanges_or_bytes_is_refused_and_banned_for_a_while() -> None:
    wire = Wire()
    total = sum(len(e.payload) for e in wire.update(1).tensors.values())
    clock = Clock()

    async def scenario():
        async with serving(wire, bans=BanList(600, clock=clock)) as server:
            channel = pinned_channel(server)
            try:
                _tight(server, clock, exchanges_per_minute_per_peer=3, over_limit_ban_s=30)
                by_count = [await push_frames(channel, update_frames(wire.update(r))) for r in range(1, 5)]
                banned = await push_frames(channel, update_frames(wire.update(5)))
                clock.now += 31
                _tight(server, clock, bytes_per_minute_per_peer=total * 3 // 2)
                by_bytes = [await push_frames(channel, update_frames(wire.update(r))) for r in (6, 7)]
            finally:
                await channel.close()
            return by_count, banned, by_bytes, server

    by_count, banned, by_bytes, server = run(scenario)
    assert [o.code for o in by_count] == [S.OK] * 3 + [S.RESOURCE_EXHAUSTED]
    assert by_count[-1].reason == "over_limit" and "exchanges a minute" in by_count[-1].details
    assert (banned.code, banned.reason) == (S.PERMISSION_DENIED, "banned")
    assert [o.code for o in by_bytes] == [S.OK, S.RESOURCE_EXHAUSTED] and "bytes a minute" in by_bytes[1].details
    assert server.rejections == {Reason.OVER_LIMIT: 2, Reason.BANNED: 1}
    assert [u.round for u in wire.received] == [1, 2, 3, 6], "nothing over a limit is delivered"


@pytest.mark.timeout(60)
def test_a_flood_in_an_honest_peers_name_never_gets_it_banned() -> None:
    """Headers that claim CLIENT_ID but are signed by someone else: refused unauthenticated, and neither
    counted against CLIENT_ID's per-peer limits nor a ban of it."""
    wire = Wire()
    forged = update_frames(wire.update(1), sender=STRANGER_ID)
    header = pb.UpdateFrame.FromString(forged[0])
    header.header.sender = CLIENT_ID.peer_id  # the victim's id, the stranger's signature
    forged = [header.SerializeToString(), *forged[1:]]

    async def scenario():
        async with serving(wire) as server:
            _tight(server, calls_per_minute_per_address=100, exchanges_per_minute_per_peer=2)
            channel = pinned_channel(server)
            try:
                flood = [await push_frames(channel, forged) for _ in range(10)]
                honest = [await push_frames(channel, update_frames(wire.update(r))) for r in (1, 2)]
            finally:
                await channel.close()
            return flood, honest, server

    flood, honest, server = run(scenario)
    assert {(o.code, o.reason) for o in flood} == {(S.UNAUTHENTICATED, "bad_signature")}
    assert [o.code for o in honest] == [S.OK, S.OK] and server.bans.banned() == []


@pytest.mark.slow(12)  # two floods that wait out the exchange timeout (6 s)
@pytest.mark.timeout(120)
def test_a_flood_of_concurrent_pushes_keeps_payload_memory_under_the_cap() -> None:
    """16 authenticated peers push ~1 MiB each at once and stall before finishing: with a cap of three
    updates, at most three buffers exist (counted and traced); the rest are refused RATE_LIMITED, nobody is
    banned, and everything is given back. Without the cap the same flood holds every buffer at once."""
    crowd = [Identity.generate() for _ in range(16)]
    wire = Wire(shapes={"delta/w": (1024, 1024)})
    wire.keys.update({i.peer_id: i.public_key for i in crowd})
    streams = [update_frames(wire.update(1), sender=i) for i in crowd]
    one = sum(len(e.payload) for e in wire.update(1).tensors.values())
    reply = wire.update(1001)  # one reply shared by every partner of a round, as the daemon's `reply_for` does


    def flood(cap: int) -> tuple[list, object, int]:
        async def scenario():
            config = ServerConfig(exchange_timeout_s=6.0)
            async with serving(wire, config=config, reply_for=lambda _r, _s: reply) as server:
                _tight(server, max_inflight_bytes=cap)
                channel = pinned_channel(server)
                try:
                    tracemalloc.start()
                    outcomes = await asyncio.gather(*(push_frames(channel, s, half_close=False) for s in streams))
                    peak = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
                    await channel.close()
                return list(outcomes), server, peak

        return run(scenario)

    outcomes, server, peak = flood(3 * one)
    codes = sorted((o.code.name, o.reason) for o in outcomes)
    assert codes == [("DEADLINE_EXCEEDED", "timeout")] * 3 + [("RESOURCE_EXHAUSTED", "rate_limited")] * 13, codes
    assert server.limiter.peak_inflight_bytes == 3 * one
    assert (server.limiter.inflight_bytes, server.limiter._streams) == (0, {}), "all given back"
    assert server.bans.banned() == [] and wire.received == []
    open_outcomes, open_server, open_peak = flood(1 << 40)
    assert open_server.limiter.peak_inflight_bytes == 16 * one
    print(f"\nflood of 16 x {one} B: traced peak {peak / 2**20:.1f} MiB with a cap of 3, "
          f"{open_peak / 2**20:.1f} MiB without")  # fmt: skip
    # Three buffers; per admitted stream at most a chunk being parsed, its copy and the one before, and (full
    # duplex: the reply streams while the push lands) one serialised reply frame being written.
    assert peak < 3 * one + 3 * (3 << 20) + 3 * MAX_MESSAGE_BYTES, "payload buffers plus the chunks in transit"
    assert open_peak > 16 * one, "without the cap, every stream's buffer at once"


@pytest.mark.timeout(60)
def test_one_peer_holds_at_most_two_streams_at_once_and_is_not_banned_for_a_third() -> None:
    wire = Wire()

    async def scenario():
        async with serving(wire, config=ServerConfig(exchange_timeout_s=4.0)) as server:
            channel = pinned_channel(server)
            try:
                stalled = []
                for r in (1, 2, 3):  # in order: on a loaded machine round 3 could claim first and 1, 2 read as replays
                    stalled.append(asyncio.ensure_future(
                        push_frames(channel, update_frames(wire.update(r)), half_close=False)))  # fmt: skip
                    if r < 3:
                        await until(lambda n=r: sum(server.limiter._streams.values()) == n, timeout=20.0)
                outcomes = await asyncio.gather(*stalled)
                after = await push_frames(channel, update_frames(wire.update(4)))
            finally:
                await channel.close()
            return outcomes, after, server

    outcomes, after, server = run(scenario)
    codes = sorted((o.code.name, o.reason) for o in outcomes)
    assert codes == [("DEADLINE_EXCEEDED", "timeout")] * 2 + [("RESOURCE_EXHAUSTED", "rate_limited")], codes
    assert after.code is S.OK and server.bans.banned() == [] and [u.round for u in wire.received] == [4]
    assert server.limiter.tracked() == 3, "one entry per table for the one address / peer, no stream left"
