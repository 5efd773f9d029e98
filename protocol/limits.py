"""Per-peer rate and size limits of a PeerServer, and the in-flight memory budget: what a flood costs us.

What a server admits (all figures per server; `Limits.for_run` derives them from the run, see there):

    limit                            keyed by           over it
    calls_per_minute_per_address     remote IP          OVER_LIMIT, not banned (the address may be shared)
      (Info, Exchange, FetchState; checked first, before anything is parsed)
    exchanges_per_minute_per_peer    proven peer id     OVER_LIMIT, peer banned for `over_limit_ban_s`
    bytes_per_minute_per_peer        proven peer id     OVER_LIMIT, peer banned for `over_limit_ban_s`
      (charged with the header's announced payload total, before any buffer is allocated)
    max_streams_per_peer             proven peer id     RATE_LIMITED, not banned (retry later)
      (concurrent Exchange streams holding a payload buffer)
    max_inflight_bytes               the whole server   RATE_LIMITED, not banned (the server is busy)
      (payload buffers allocated at once, over all streams)

OVER_LIMIT and RATE_LIMITED both travel as RESOURCE_EXHAUSTED with `murmur-reason` saying which.
A "per minute" limit is a token bucket: one minute's allowance available at once, refilled continuously,
so a peer never gets more than twice the allowance in any 60 s.

Why keyed like this: until an Exchange header's signature checks, its claimed sender proves nothing, so
everything before that point is limited by the caller's address, never by the claimed id (otherwise
anyone could get an honest peer banned by flooding in its name). Several honest peers can share one
address (NAT, a lab, loopback in tests), so an address over its limit is only refused until its bucket
refills, never banned. After the signature checks, the id is the sender's own: exceeding its limits is
its own doing, and it is banned like any other misbehaviour.

Memory: every table here is bounded (`max_tracked` keys, least recently used dropped first; a dropped
key starts again with a full bucket), and payload buffers never exceed `max_inflight_bytes` in total,
so whatever arrives, a server holds at most that much payload plus grpc's own per-message buffers
(`max_concurrent_rpcs` x one chunk).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

from protocol.codec import payload_size
from protocol.errors import RateLimited, Reason
from protocol.updates import WirePolicy

DEFAULT_MIN_ROUND_S = 0.25
"""The shortest round an honest peer plausibly makes (tiny models on a GPU); sets the per-peer rates."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """A server's limits; see the module docstring for what each one refuses and how."""

    calls_per_minute_per_address: int = 4800
    exchanges_per_minute_per_peer: int = 480
    bytes_per_minute_per_peer: int = 480 << 26
    max_streams_per_peer: int = 2
    max_inflight_bytes: int = 1 << 30
    over_limit_ban_s: float = 120.0
    max_tracked: int = 10_000
    """Addresses and peer ids remembered per table; the least recently seen are forgotten first."""

    def __post_init__(self) -> None:
        for name in ("calls_per_minute_per_address", "exchanges_per_minute_per_peer", "bytes_per_minute_per_peer",
                     "max_streams_per_peer", "max_inflight_bytes", "max_tracked"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.over_limit_ban_s < 0:
            raise ValueError("over_limit_ban_s must be >= 0")

    @classmethod
    def for_run(cls, *, stream_bytes: int, min_round_s: float = DEFAULT_MIN_ROUND_S) -> Limits:
        """Limits that no honest peer of a run reaches, and that bound a flood.

        `stream_bytes` is the most payload one Exchange may announce (the wire's cap from the manifest's
        shapes). An honest peer pushes to a given server at most once per round, so at most
        60 / `min_round_s` times a minute; the limits allow twice that (Lamport jumps, retries after a
        failed transfer). An address may hide several peers (NAT), so it gets eight peers' worth of calls
        plus Info probes. Four full streams may be buffered at once: concurrent partners of one round.
        """
        if stream_bytes < 1 or min_round_s <= 0:
            raise ValueError("stream_bytes must be >= 1 and min_round_s > 0")
        exchanges = 2 * math.ceil(60 / min_round_s)
        return cls(
            calls_per_minute_per_address=8 * exchanges + 600,
            exchanges_per_minute_per_peer=exchanges,
            bytes_per_minute_per_peer=exchanges * stream_bytes,
            max_inflight_bytes=4 * stream_bytes,
        )


class RateBuckets:
    """Token buckets by key: `capacity` tokens each, refilled at `capacity` per minute; at most `max_keys` kept."""

    def __init__(self, capacity: float, max_keys: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(capacity)
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        """key -> (tokens, time of last update), least recently used first."""

    def take(self, key: str, amount: float = 1.0) -> bool:
        """Spend `amount` tokens of `key`'s bucket; False (and nothing spent) when it holds fewer."""
        now = self._clock()
        tokens, then = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.capacity / 60.0)
        allowed = tokens >= amount
        self._buckets[key] = (tokens - amount if allowed else tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)


def address_of(grpc_peer: str) -> str:
    """The IP of a grpc `context.peer()` string ("ipv4:1.2.3.4:5", "ipv6:[::1]:5", url-encoded or not)."""
    kind, _, rest = unquote(grpc_peer).partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].strip("[]") or rest
    return grpc_peer  # unix sockets and the like: the whole string


class Limiter:
    """The limits' state in one server: buckets, buffers in flight. Touched only from the event loop."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._calls = RateBuckets(limits.calls_per_minute_per_address, limits.max_tracked, clock)
        self._exchanges = RateBuckets(limits.exchanges_per_minute_per_peer, limits.max_tracked, clock)
        self._bytes = RateBuckets(limits.bytes_per_minute_per_peer, limits.max_tracked, clock)
        self._streams: dict[str, int] = {}
        self.inflight_bytes = 0
        self.peak_inflight_bytes = 0
        """The most payload bytes ever buffered at once: what the flood tests check against the cap."""

    def admit_call(self, address: str) -> None:
        """Charge one call to `address`; RateLimited(OVER_LIMIT) when its bucket is empty (never a ban)."""
        if not self._calls.take(address):
            raise RateLimited(
                Reason.OVER_LIMIT, f"more than {self.limits.calls_per_minute_per_address} calls a minute from {address}"
            )

    def admit_exchange(self, peer_id: str, payload_bytes: int) -> None:
        """Charge one exchange and its announced bytes to a proven `peer_id`; RateLimited(OVER_LIMIT) if over."""
        if not self._exchanges.take(peer_id):
            raise RateLimited(
                Reason.OVER_LIMIT, f"more than {self.limits.exchanges_per_minute_per_peer} exchanges a minute"
            )
        if not self._bytes.take(peer_id, payload_bytes):
            raise RateLimited(
                Reason.OVER_LIMIT, f"more than {self.limits.bytes_per_minute_per_peer} payload bytes a minute"
            )

    def reserve(self, peer_id: str, payload_bytes: int) -> Reservation:
        """Hold `payload_bytes` of the in-flight budget and one of `peer_id`'s streams: `with limiter.reserve(...)`.

        Raises RateLimited(RATE_LIMITED) instead when either is used up: the server is busy, which is
        nobody's fault (no ban), and the sender may retry.
        """
        streams = self._streams.get(peer_id, 0)
        if streams >= self.limits.max_streams_per_peer:
            raise RateLimited(Reason.RATE_LIMITED, f"{streams} exchanges of this peer already in progress")
        if self.inflight_bytes + payload_bytes > self.limits.max_inflight_bytes:
            raise RateLimited(
                Reason.RATE_LIMITED,
                f"busy: {self.inflight_bytes} of {self.limits.max_inflight_bytes} payload bytes in flight",
            )
        self._streams[peer_id] = streams + 1
        self.inflight_bytes += payload_bytes
        self.peak_inflight_bytes = max(self.peak_inflight_bytes, self.inflight_bytes)
        return Reservation(self, peer_id, payload_bytes)

    def _release(self, peer_id: str, payload_bytes: int) -> None:
        self.inflight_bytes -= payload_bytes
        left = self._streams[peer_id] - 1
        if left:
            self._streams[peer_id] = left
        else:
            del self._streams[peer_id]

    def tracked(self) -> int:
        """Entries held in all tables (bounded by 3 x max_tracked plus the streams in progress)."""
        return len(self._calls) + len(self._exchanges) + len(self._bytes) + len(self._streams)


class Reservation:
    """Budget held by one stream; given back when its `with` block ends, or later (`release_when_done`)."""

    def __init__(self, limiter: Limiter, peer_id: str, payload_bytes: int) -> None:
        self._limiter = limiter
        self._peer_id = peer_id
        self._bytes = payload_bytes
        self._held = True
        self._deferred = False

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._deferred:
            self.release()

    def release(self) -> None:
        """Give the budget back (once; later calls do nothing)."""
        if self._held:
            self._held = False
            self._limiter._release(self._peer_id, self._bytes)

    def release_when_done(self, work: asyncio.Future) -> None:
        """Keep the budget until `work` ends, even past the `with` block: a worker thread still holding the
        buffer when its caller is cancelled must not make room for more buffers than the cap allows."""
        self._deferred = True
        work.add_done_callback(self._work_done)

    def _work_done(self, work: asyncio.Future) -> None:
        if not work.cancelled():
            work.exception()  # retrieved here: whoever awaited it may be gone
        self.release()


MAX_SLICES_PROBED = 4096


def largest_stream_bytes(policy: WirePolicy) -> int:
    """The most payload one Exchange may announce under `policy`: every tensor of the largest slice's table,
    each in the largest accepted codec (slices are numbered from 0 up to the first that does not exist)."""
    codecs = [c for c in (policy.codec_for(n) for n in {policy.codec.name, *policy.accepted_codecs}) if c]
    largest = 0
    for index in range(MAX_SLICES_PROBED):
        table = policy.expected_shapes(index)
        if table is None:
            break
        largest = max(largest, sum(max(payload_size(tuple(s), c) for c in codecs) for s in table.values()))
    return max(largest, 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardLimits:
    """What serving dataset files (FetchShard, protocol/shard_service.py) may cost one peer.

    A caller of FetchShard proves nothing about itself (no signature: any volunteer may fetch the run's public
    data), so its budget is keyed by address, like calls: `bytes_per_minute_per_address` of file bytes (a token
    bucket, one minute's worth at once; over it the stream is cut with OVER_LIMIT and the caller resumes later or
    elsewhere, never banned), at most `max_streams` streams at once over all callers (RATE_LIMITED beyond), and
    `timeout_s` for one stream. The default, 256 MiB a minute (about 4.5 MB/s) per address, serves a newcomer its
    first shards within seconds but keeps one caller from making a volunteer upload more than ~370 GB a day."""

    bytes_per_minute_per_address: int = 256 << 20
    max_streams: int = 4
    timeout_s: float = 600.0
    max_tracked: int = 10_000

    def __post_init__(self) -> None:
        if self.bytes_per_minute_per_address < 1 << 20:
            raise ValueError("bytes_per_minute_per_address must be at least one chunk (1 MiB)")
        if self.max_streams < 1 or self.max_tracked < 1 or self.timeout_s <= 0:
            raise ValueError("max_streams and max_tracked must be >= 1 and timeout_s > 0")


class ByteBudget:
    """Shard bytes per address (`ShardLimits.bytes_per_minute_per_address`): `RateBuckets` charged per chunk."""

    def __init__(self, limits: ShardLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._buckets = RateBuckets(limits.bytes_per_minute_per_address, limits.max_tracked, clock)

    def charge(self, address: str, nbytes: int) -> None:
        """Spend `nbytes` of `address`'s budget; RateLimited(OVER_LIMIT) when it holds fewer (nothing spent)."""
        if not self._buckets.take(address, nbytes):
            raise RateLimited(Reason.OVER_LIMIT, f"more than {self.limits.bytes_per_minute_per_address} dataset "
                                                 f"bytes a minute to {address}; resume later or elsewhere")  # fmt: skip
