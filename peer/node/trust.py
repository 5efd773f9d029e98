"""Partner trust: a sender whose terms keep being clipped or rejected loses its place (DESIGN.md section 5b).

Self-centred clipping (`peer/core/robust.py`) bounds what one term can do to this peer in one round, and rejects
terms more than 10x over the bound outright. A patient attacker stays just under that: every round it sends
a term ~9x the bound in one fixed direction, which is shrunk (to 1/9 of the bound) and mixed in every time, always
pushing the same way. Honest terms do not do this: over every honest swarm measured (tests/test_adversaries.py,
benchmarks/adversaries.py baselines), not one honest term reached the bound.

So each outer step reports what happened to every partner term (clean, clipped, or rejected with a reason),
and `PartnerTrust` keeps the last `WINDOW` outcomes per sender. A sender with `STRIKES` bad outcomes among
them is reported to the caller, which bans it locally (its pushes are refused at the wire and it is never
picked as a partner) for the ban list's duration; its history then starts afresh, so a sender that comes back
honest after its ban is treated as honest. One clipped term (an honest peer's odd round) never bans.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

WINDOW = 8
"""Outcomes remembered per sender."""
STRIKES = 3
"""Clipped or rejected terms within the window that cost a sender its place."""
CLEAN = "clean"
CLIPPED = "clipped"


@dataclass(slots=True)
class PartnerTrust:
    """Per sender, the outcomes of its last WINDOW terms; `record` says who has just lost trust."""

    window: int = WINDOW
    strikes: int = STRIKES
    history: dict[str, deque[bool]] = field(default_factory=dict)
    """sender -> True per bad term (clipped or rejected), newest last."""

    def record(self, outcomes: Mapping[str, Iterable[str]]) -> dict[str, str]:
        """Add one outer step's outcomes (sender -> its terms' outcomes); returns sender -> why, for each
        sender that now has `strikes` bad terms in its window (its history is cleared: the caller bans it)."""
        lost: dict[str, str] = {}
        for sender, results in outcomes.items():
            seen = self.history.setdefault(sender, deque(maxlen=self.window))
            for outcome in results:
                seen.append(outcome != CLEAN)
            bad = sum(seen)
            if bad >= self.strikes:
                lost[sender] = f"{bad} of its last {len(seen)} terms were clipped or rejected"
                del self.history[sender]
        return lost

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the history of senders not in `keep` (bounded memory)."""
        live = set(keep)
        for sender in [s for s in self.history if s not in live]:
            del self.history[sender]
