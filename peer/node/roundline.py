"""The daemon's one line per round on stdout, and its parser: one format, one place.

`murmur demo`, the tests and anyone scripting around `murmur run` read these lines; they all go through
`RoundLine.parse`, so changing the format here changes it for every reader at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PATTERN = re.compile(
    r"\bround (?P<round>\d+) loss (?P<loss>[\d.]+|nan|inf) tok/s (?P<tokens_per_s>\d+) slice (?P<slice>\d+) "
    r"exchanged (?P<exchanged>\d+)/(?P<partners>\d+) mixed (?P<mixed>\d+) pushed-to-us (?P<pushed_to_us>\d+) "
    r"stale-dropped (?P<stale_dropped>\d+) (?P<seconds>[\d.]+)s"
)


@dataclass(frozen=True, slots=True)
class RoundLine:
    """What one finished round reports."""

    round: int
    loss: float
    tokens_per_s: float
    slice: int
    exchanged: int
    """Partners this peer reached with its own push-pull."""
    partners: int
    """Partners it tried."""
    mixed: int
    """Partners' updates mixed into this round's outer step."""
    pushed_to_us: int
    """Updates partners pushed to this peer's server so far (cumulative)."""
    stale_dropped: int
    """Updates dropped as stale so far (cumulative)."""
    seconds: float

    def format(self) -> str:
        return (
            f"round {self.round} loss {self.loss:.4f} tok/s {self.tokens_per_s:.0f} slice {self.slice} "
            f"exchanged {self.exchanged}/{self.partners} mixed {self.mixed} pushed-to-us {self.pushed_to_us} "
            f"stale-dropped {self.stale_dropped} {self.seconds:.2f}s"
        )

    @classmethod
    def parse(cls, line: str) -> RoundLine | None:
        """The round line in `line` (anywhere in it: a prefix such as a peer's name is fine), or None."""
        m = PATTERN.search(line)
        if m is None:
            return None
        g = m.groupdict()
        return cls(
            round=int(g["round"]), loss=float(g["loss"]), tokens_per_s=float(g["tokens_per_s"]),
            slice=int(g["slice"]), exchanged=int(g["exchanged"]), partners=int(g["partners"]),
            mixed=int(g["mixed"]), pushed_to_us=int(g["pushed_to_us"]), stale_dropped=int(g["stale_dropped"]),
            seconds=float(g["seconds"]),
        )  # fmt: skip


def parse_all(lines: list[str]) -> list[RoundLine]:
    """Every round line among `lines`, in order."""
    return [r for line in lines if (r := RoundLine.parse(line)) is not None]
