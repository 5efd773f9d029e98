"""Local bans and replay protection: the memory a server keeps about the peers that talk to it.

Both are plain, synchronous, in-memory objects touched only from the event loop, with an injectable
clock so tests need no sleeping. Neither is shared across processes: a ban is one peer's local
decision (DESIGN.md section 4), and a restart forgets it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from protocol.logs import get_logger

log = get_logger(__name__)


class BanList:
    """Peer ids refused until a deadline. Each ban lasts `duration_s` unless given its own; bans never shorten.

    At most `max_entries` bans are kept (each needs a signature from an announced key, but a sybil could
    announce many): past it, the ban that ends soonest is dropped first.
    """

    def __init__(
        self, duration_s: float = 600.0, clock: Callable[[], float] = time.monotonic, max_entries: int = 100_000
    ) -> None:
        if duration_s < 0:
            raise ValueError("duration_s must be >= 0")
        self.duration_s = duration_s
        self.max_entries = max_entries
        self._clock = clock
        self._until: dict[str, float] = {}

    def ban(self, peer_id: str, reason: str, duration_s: float | None = None) -> None:
        """Refuse `peer_id` for `duration_s` (default: the list's) from now; extends a running ban, never shortens."""
        seconds = self.duration_s if duration_s is None else duration_s
        until = self._clock() + seconds
        if until > self._until.get(peer_id, float("-inf")):
            self._until[peer_id] = until
        if len(self._until) > self.max_entries:
            self._forget_soonest()
        log.warning("banned peer %s for %.0f s: %s", peer_id, seconds, reason)

    def _forget_soonest(self) -> None:
        now = self._clock()
        for peer in [p for p, until in self._until.items() if until <= now]:
            del self._until[peer]
        while len(self._until) > self.max_entries:
            del self._until[min(self._until, key=self._until.__getitem__)]

    def entries(self) -> int:
        """Bans held, expired ones not yet forgotten included (bounded by `max_entries`)."""
        return len(self._until)

    def is_banned(self, peer_id: str) -> bool:
        """True while `peer_id`'s ban runs; expired bans are forgotten on the way."""
        until = self._until.get(peer_id)
        if until is None:
            return False
        if self._clock() >= until:
            del self._until[peer_id]
            return False
        return True

    def banned(self) -> list[str]:
        """The peer ids banned right now."""
        return [peer for peer in list(self._until) if self.is_banned(peer)]


class ReplayGuard:
    """Per (peer, slice) the highest round accepted; an update must carry a higher one.

    `claim` records the round as soon as a header is accepted (before its payload arrives), so two
    concurrent streams of the same update cannot both pass. Memory is bounded by `max_entries`: the
    oldest-inserted keys are dropped first (a dropped peer could replay one old round once, which
    still has to pass the signature check for this recipient).
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._highest: dict[tuple[str, int], int] = {}
        self._max_entries = max_entries

    def claim(self, peer_id: str, slice_index: int, round: int) -> bool:
        """True, and remember the round, when it is newer than any seen for (peer, slice)."""
        key = (peer_id, slice_index)
        seen = self._highest.get(key)
        if seen is not None and round <= seen:
            return False
        self._highest.pop(key, None)
        self._highest[key] = round
        while len(self._highest) > self._max_entries:
            del self._highest[next(iter(self._highest))]
        return True

    def release(self, peer_id: str, slice_index: int, round: int, previous: int | None) -> None:
        """Undo `claim` of `round` (its transfer died before delivery), restoring `previous`."""
        key = (peer_id, slice_index)
        if self._highest.get(key) != round:
            return  # a newer round was claimed meanwhile; keep it
        if previous is None:
            del self._highest[key]
        else:
            self._highest[key] = previous

    def highest(self, peer_id: str, slice_index: int) -> int | None:
        """The highest round accepted from (peer, slice), or None."""
        return self._highest.get((peer_id, slice_index))
