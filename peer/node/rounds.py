"""This peer's round clock, and how far ahead of it anyone may claim to be (DESIGN.md section 5b).

Round numbers work like a Lamport clock: a peer's next round is one past the highest round it has seen, so
peers that started at different times agree on "now" after their first exchange, and "stale" means really
behind. Taken naively, the rule lets one peer set everyone's clock: a single signed update claiming round
2^62 made every honest peer that mixed it jump there (and then die on the number). So a claimed round is
protocol state from a stranger, and it is judged before it is believed:

- The **reference** is what the swarm agrees on now: the lower median of this peer's own clock and the
  newest round each *voter* claimed (in an authenticated update header, or in its signed announcement).
  With a single voter there is no majority to ask: the reference is the higher of its claim and our clock,
  so a peer that fell behind (frozen, or restarted from an old checkpoint) in a swarm of two catches up; one
  liar in a swarm of two can then push clocks ahead, at most `MAX_ROUND_LEAD` rounds a round.
  Voters are the peers the caller trusts to exist (`peer/swarm/admission.py`: they answered at their endpoint or
  completed an exchange), so a flood of made-up identities casts no vote, and one liar among three voters
  cannot move a median.
- A claim more than `MAX_ROUND_LEAD` rounds above the reference is refused (`future_round`). The claim is
  still noted first, so an honest partner that really is ahead (this peer was frozen, or is slow) raises
  the reference as soon as a second voter says the same; one liar never does.
- The clock never jumps by more than `MAX_ROUND_LEAD` in one step, whatever it is shown.
- A peer refused `STRIKES_TO_BAN` times in a row (no admitted claim in between) is reported for a ban by
  `admit`; an honest peer that was briefly ahead of a stale reference gets at most a strike or two, and any
  admitted claim of its clears them. Refusals against one and the same ceiling are one strike: a receiver
  busy in one long round has learnt nothing between them, and a fast honest peer pushing three rounds into
  it must not be banned for the receiver's slowness (it was, in CI). A liar's strikes still add up, one per
  round of the receiver (its clock, and so the ceiling, moves every round).
- An honest peer that every partner refused as too far ahead holds its next round until one of them claims
  a round within the lead of it (`RoundView.hold_for`, `must_wait`), and does not dial a refuser before: those
  receivers are busy in long rounds or see a slower swarm than we do, and pushing more rounds into them only
  earns strikes. Without this, a peer many times faster than the rest (small rounds on a shared CPU, in CI)
  ran on, was refused again and again and was banned by every other peer for ten minutes: an honest
  volunteer shut out. One liar refusing us holds nothing while another partner admits us. (Pacing ahead of
  time, against the median of the claims we hold, was tried first and deadlocked: after a Lamport jump every
  peer's clock is ahead of the round it last announced, so each waited for the others' stale claims.)

Why a bound of 16: honest clocks follow the fastest peer (the max rule), so an honest lead over a receiver
is about the rounds the fastest peer makes during one of the receiver's rounds; 16 tolerates a 16x speed
difference, and a peer that much slower contributes only stale updates anyway. A liar under the bound can
push clocks up by at most 16 rounds a round, which skips data windows and nothing else: the inner learning
rate follows each peer's own step count, not the round number.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

MAX_ROUND_LEAD = 16
"""Rounds a claim may be ahead of the reference; also the most the clock moves in one step."""
STRIKES_TO_BAN = 3
"""Consecutive refused claims after which `admit` asks for the sender to be banned."""
CLAIM_TTL_S = 600.0
"""A voter's claim older than this no longer counts (a peer that left stops voting)."""
MAX_ROUND = 1 << 62
"""No honest round ever gets near this; anything above it is refused outright (the wire carries uint64)."""


def lower_median(values: Iterable[int]) -> int | None:
    """The lower median of `values` (the middle one, or the smaller of the two middle ones); None if empty.

    Lower, not upper: with two votes (ours and one partner's), the partner alone must not set the reference.
    """
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else None


@dataclass(slots=True)
class Verdict:
    """What `RoundView.admit` decided about one claim."""

    admitted: bool
    ban: bool = False
    """The sender just reached STRIKES_TO_BAN consecutive refusals: the caller should ban it."""
    ceiling: int = 0


@dataclass(slots=True)
class RoundView:
    """The Lamport clock of one peer, bounded by the swarm's median (see the module docstring).

    Plain and synchronous, with an injectable clock; the daemon touches it from the event loop only.
    """

    lead: int = MAX_ROUND_LEAD
    clock: int = -1
    """Highest round this peer has taken as its own "now" (-1 before any): its next round is clock + 1."""
    voters: Callable[[], Iterable[str]] = lambda: ()
    """Peer ids whose claims count toward the reference (the admitted peers)."""
    now: Callable[[], float] = time.monotonic
    claims: dict[str, tuple[int, float]] = field(default_factory=dict)
    """peer id -> (its newest claimed round, when it was seen)."""
    strikes: dict[str, int] = field(default_factory=dict)
    struck_at: dict[str, int] = field(default_factory=dict)
    """peer id -> the ceiling its last strike was given against."""
    holders: set[str] = field(default_factory=set)
    """Peers that refused our round as too far ahead (see `hold_for`)."""
    held: bool = False

    def note(self, peer_id: str, round: int) -> None:
        """Remember `peer_id`'s claim (an authenticated header or a verified announcement of it)."""
        held = self.claims.get(peer_id)
        if held is None or round >= held[0] or self.now() - held[1] > CLAIM_TTL_S:
            self.claims[peer_id] = (round, self.now())

    def reference(self) -> int:
        """The lower median of our clock and the voters' live claims (with one voter: the higher of the two);
        never below our clock."""
        cutoff = self.now() - CLAIM_TTL_S
        votes = [self.claims[p][0] for p in set(self.voters()) if p in self.claims and self.claims[p][1] >= cutoff]
        if len(votes) == 1:  # no majority to ask: follow the one other peer (see the module docstring)
            return max(self.clock, votes[0])
        if self.clock >= 0:
            votes.append(self.clock)
        median = lower_median(votes)
        return max(self.clock, -1 if median is None else median)

    def hold_for(self, peer_id: str) -> None:
        """`peer_id` refused our round as too far ahead: leave it be until it is near enough to take our next
        round, and hold our rounds meanwhile unless another partner admits us first."""
        self.holders.add(peer_id)
        self.held = True

    def admitted_by_partner(self) -> None:
        """A partner took our round: the swarm is not uniformly behind us, nothing to wait for."""
        self.held = False

    def holding(self, next_round: int) -> list[str]:
        """The peers that refused us and would refuse `next_round` still: their newest claim plus the lead is
        below it (a receiver's ceiling is at least its own clock plus the lead, and its clock at least what it
        claims). The others are let go, and with one let go the hold ends."""
        for peer_id in list(self.holders):
            if self.claims.get(peer_id, (-1, 0.0))[0] + self.lead >= next_round:
                self.holders.discard(peer_id)
                self.held = False
        return sorted(self.holders)

    def must_wait(self, next_round: int) -> bool:
        """Every partner that answered since the last refusal refused us as too far ahead, and none of them
        would take `next_round` yet."""
        return self.held and bool(self.holding(next_round))

    def ceiling(self) -> int:
        """The highest round anyone may claim now."""
        return min(MAX_ROUND, self.reference() + self.lead)

    def admit(self, peer_id: str, round: int) -> Verdict:
        """Note the claim, then judge it against the ceiling; counts strikes (see the module docstring)."""
        if round <= MAX_ROUND:
            self.note(peer_id, round)
        ceiling = self.ceiling()
        if round <= ceiling:
            self.strikes.pop(peer_id, None)
            self.struck_at.pop(peer_id, None)
            return Verdict(True, ceiling=ceiling)
        if self.struck_at.get(peer_id) == ceiling:  # we learnt nothing since its last strike: the same offence
            return Verdict(False, ceiling=ceiling)
        self.struck_at[peer_id] = ceiling
        strikes = self.strikes.get(peer_id, 0) + 1
        self.strikes[peer_id] = 0 if strikes >= STRIKES_TO_BAN else strikes
        return Verdict(False, ban=strikes >= STRIKES_TO_BAN, ceiling=ceiling)

    def start(self, round: int) -> None:
        """Take `round` as the clock without a jump bound: a resumed checkpoint, or what several donors agree on."""
        self.clock = min(round, MAX_ROUND)

    def advance(self, own_round: int, seen: Iterable[int] = ()) -> int:
        """The clock after round `own_round` landed with updates of rounds `seen` mixed in: the Lamport max,
        moved at most `lead` rounds past the old clock in this one step. Returns the new clock."""
        base = max(self.clock, own_round)
        target = max([base, *seen])
        self.clock = min(MAX_ROUND, max(base, min(target, max(self.clock, 0) + self.lead)))
        return self.clock

    def forget(self, keep: Iterable[str]) -> None:
        """Drop claims and strikes of peers not in `keep` (left the swarm), so the tables stay bounded."""
        live = set(keep)
        for table in (self.claims, self.strikes, self.struck_at):
            for peer in [p for p in table if p not in live]:
                del table[peer]
        self.holders &= live
