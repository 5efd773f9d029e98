"""Which announced peers have earned a place in partner choice (DESIGN.md section 5b: Sybils).

An announcement costs nothing: anyone can make an Ed25519 key, sign "I am a peer at host:port" and store it
in the swarm's DHT key. Measured before this module: one process that published ~200 such announcements
(fresh keys, endpoints where nothing listens) cut the share of honest rounds that reached any partner from
85% to 15%, because partners were drawn from every announcement. So an announcement alone earns nothing;
a peer is *admitted* once it has shown that something real stands behind it:

- **proven**: it completed an exchange with us, either way (we reached it and it replied, or it pushed us
  an update that passed every check of the wire); or
- **probed**: it answered an `Info` call at its announced endpoint, over TLS pinned to the certificate its
  signed announcement names, with its own peer id and our run id. A fake pointing at nothing fails at once
  (or after `PROBE_TIMEOUT_S`); a fake pointing at an honest peer's endpoint fails the TLS pin.

Probes are cheap (one small RPC), run in the background with bounded concurrency (`PROBES_AT_ONCE`), and a
peer that failed one waits before it is tried again, doubling up to `MAX_BACKOFF_S`, so a flood of fakes
costs a few connection attempts a round rather than partner slots. A genuine newcomer is probed within a
round or two of its first announcement (new announcements are probed before old failures are retried), and
becomes proven anyway as soon as it pushes to us. Client-only peers cannot be probed; they are admitted by
pushing to us (we never dial them anyway).

Admission also decides who votes on the round clock (`peer/node/rounds.py`) and whose announcements count for
slice coverage and late-join donors: a thousand fake announcements then cast no vote and skew no choice.

This is a cost bar, not an identity check: an attacker who runs a real server per identity is admitted, and
what it sends then meets the wire's checks, clipping and partner trust (`peer/node/trust.py`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from protocol.records import Announcement

PROBE_TIMEOUT_S = 5.0
"""One probe's deadline: a dead address on the internet hangs until it, a closed port refuses at once."""
PROBES_AT_ONCE = 8
"""Probes in flight at once (per peer)."""
ADMITTED_FOR_S = 900.0
"""How long a proof or a successful probe keeps a peer admitted without a new one."""
FIRST_BACKOFF_S = 10.0
MAX_BACKOFF_S = 1800.0
"""A failed probe is retried after FIRST_BACKOFF_S, doubling per consecutive failure up to MAX_BACKOFF_S."""


@dataclass(slots=True)
class _Record:
    admitted_until: float = 0.0
    failures: int = 0
    retry_at: float = 0.0
    probing: bool = False


@dataclass(slots=True)
class Admission:
    """Per peer id: admitted until when, or how long until it may be probed again. Event-loop only."""

    now: Callable[[], float] = time.monotonic
    records: dict[str, _Record] = field(default_factory=dict)

    def _record(self, peer_id: str) -> _Record:
        return self.records.setdefault(peer_id, _Record())

    def prove(self, peer_id: str) -> None:
        """`peer_id` completed an exchange with us (either direction): admitted, failures forgotten."""
        record = self._record(peer_id)
        record.admitted_until = self.now() + ADMITTED_FOR_S
        record.failures, record.retry_at = 0, 0.0

    def is_admitted(self, peer_id: str) -> bool:
        record = self.records.get(peer_id)
        return record is not None and record.admitted_until > self.now()

    def admitted(self, peers: Iterable[Announcement]) -> list[Announcement]:
        """The admitted ones among `peers`, in their order."""
        return [p for p in peers if self.is_admitted(p.peer_id)]

    def admitted_ids(self) -> list[str]:
        now = self.now()
        return [p for p, r in self.records.items() if r.admitted_until > now]

    def to_probe(self, peers: Sequence[Announcement], *, me: str, limit: int, rng: random.Random) -> list[Announcement]:
        """Up to `limit` peers to probe now: not admitted, reachable (an endpoint), not waiting out a failure,
        not already being probed. Never-probed peers first (newcomers are found fast), in random order."""
        now = self.now()
        fresh, retry = [], []
        for peer in peers:
            record = self.records.get(peer.peer_id)
            if peer.peer_id == me or peer.client_only:
                continue
            if record is None:
                fresh.append(peer)
            elif not record.probing and record.admitted_until <= now and record.retry_at <= now:
                retry.append(peer)
        rng.shuffle(fresh)
        rng.shuffle(retry)
        chosen = (fresh + retry)[: max(0, limit)]
        for peer in chosen:
            self._record(peer.peer_id).probing = True
        return chosen

    def probed(self, peer_id: str, ok: bool) -> None:
        """The outcome of a probe started by `to_probe`."""
        record = self._record(peer_id)
        record.probing = False
        if ok:
            record.admitted_until = max(record.admitted_until, self.now() + ADMITTED_FOR_S)
            record.failures, record.retry_at = 0, 0.0
            return
        record.failures += 1
        record.retry_at = self.now() + min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (record.failures - 1))

    def probing(self) -> int:
        return sum(1 for r in self.records.values() if r.probing)

    def forget(self, keep: Iterable[str]) -> None:
        """Drop records of peers no longer announced (bounded memory), except those being probed."""
        live = set(keep)
        for peer in [p for p, r in self.records.items() if p not in live and not r.probing]:
            del self.records[peer]
