"""The bounded Lamport clock (peer/node/rounds.py): claims from the future are refused, the clock never jumps far,
one liar cannot move the reference, and an honest peer that is really ahead is believed once others agree."""

from __future__ import annotations

from peer.node.rounds import CLAIM_TTL_S, MAX_ROUND, MAX_ROUND_LEAD, STRIKES_TO_BAN, RoundView, lower_median


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def view(voters: set[str], clock: int = 10) -> tuple[RoundView, Clock]:
    now = Clock()
    v = RoundView(voters=lambda: voters, now=now)
    v.start(clock)
    return v, now


def test_lower_median() -> None:
    assert lower_median([]) is None
    assert lower_median([5]) == 5
    assert lower_median([7, 3]) == 3  # two votes: the smaller, so one partner alone never sets it
    assert lower_median([1, 9, 5]) == 5
    assert lower_median([4, 1, 3, 2]) == 2


def test_a_round_from_the_future_is_refused_and_the_clock_stays() -> None:
    v, _ = view({"a", "b", "liar"})
    for peer in ("a", "b"):
        assert v.admit(peer, 11).admitted
    verdict = v.admit("liar", 2**62)
    assert not verdict.admitted and verdict.ceiling == 11 + MAX_ROUND_LEAD
    assert v.advance(11, [11]) == 11  # nothing from the liar was mixed: the clock follows the honest rounds


def test_the_wire_maximum_is_refused_whatever_the_votes() -> None:
    v, _ = view(set())
    assert not v.admit("x", 2**64 - 1).admitted
    assert v.ceiling() <= MAX_ROUND


def test_an_honest_lead_is_believed_once_a_second_voter_agrees() -> None:
    """A peer frozen for 30 s (SIGSTOP) wakes at round 10 while the swarm is at 40."""
    v, _ = view({"a", "b", "c"})
    for peer in ("a", "b", "c"):
        v.note(peer, 10)  # what they announced before the freeze
    assert not v.admit("a", 40).admitted  # alone, a's claim is no more than a liar's
    assert not v.admit("b", 40).admitted  # [10, 10, 40, 40]: the lower median is still 10
    assert v.admit("c", 40).admitted  # three of four votes at 40
    assert v.admit("a", 41).admitted and v.admit("b", 41).admitted
    assert v.strikes == {}  # admitted claims cleared the strikes: nobody is banned for having been ahead


def test_repeated_offences_ask_for_a_ban() -> None:
    v, _ = view({"a", "b", "liar"})
    v.note("a", 10)
    v.note("b", 10)
    verdicts = [v.admit("liar", 2**62) for _ in range(STRIKES_TO_BAN)]
    assert [x.ban for x in verdicts] == [False] * (STRIKES_TO_BAN - 1) + [True]
    assert not any(x.admitted for x in verdicts)


def test_the_clock_never_jumps_more_than_the_lead() -> None:
    v, _ = view({"a"}, clock=10)
    assert v.advance(11, [10_000]) == 10 + MAX_ROUND_LEAD
    assert v.advance(27, [10_000]) == 10 + 2 * MAX_ROUND_LEAD
    assert v.advance(v.clock + 1, []) == 10 + 2 * MAX_ROUND_LEAD + 1  # an ordinary round: one step


def test_a_first_round_starts_from_nothing() -> None:
    v = RoundView()
    assert v.clock == -1 and v.reference() == -1 and v.ceiling() == MAX_ROUND_LEAD - 1
    assert v.advance(0, [3]) == 3


def test_a_newcomer_without_a_clock_follows_the_voters() -> None:
    """A late joiner has no clock yet: the voters alone set the reference (one liar among them cannot)."""
    v = RoundView(voters=lambda: {"a", "b", "liar"})
    v.note("a", 500)
    v.note("b", 502)
    v.note("liar", 2**62)
    assert v.reference() == 502
    assert v.admit("a", 505).admitted and not v.admit("liar", 2**62).admitted


def test_only_voters_count_and_old_claims_expire() -> None:
    v, now = view({"a"}, clock=10)
    for sybil in range(200):  # claims of peers that never answered at their endpoint: no votes
        v.note(f"sybil{sybil}", 2**62)
    v.note("a", 10)
    assert v.reference() == 10
    v.note("a", 40)
    assert v.reference() == 40  # one voter: no majority to ask, it is followed
    now.t += CLAIM_TTL_S + 1
    assert v.reference() == 10  # a's claim expired: only our clock votes
    v.forget(["a"])
    assert set(v.claims) == {"a"}


def test_start_clamps_a_resumed_round_to_what_the_wire_carries() -> None:
    v = RoundView()
    v.start(2**64)
    assert v.clock == MAX_ROUND
    assert v.advance(v.clock + 1, [2**64]) == MAX_ROUND  # and it stays there instead of overflowing the wire


def test_in_a_swarm_of_two_the_peer_behind_follows_the_other() -> None:
    """Restarted from round 10 (or frozen there) while the one other peer is at 100: with no majority to ask,
    it follows the other peer, catching up at most MAX_ROUND_LEAD rounds a round."""
    v = RoundView(voters=lambda: {"a"})
    v.start(10)
    v.note("a", 100)
    assert v.reference() == 100 and v.admit("a", 101).admitted
    assert v.advance(11, [101]) == 10 + MAX_ROUND_LEAD
    assert v.admit("a", 102).admitted and v.strikes == {}
