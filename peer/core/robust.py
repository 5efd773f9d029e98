"""Robust aggregation: how far one partner's update may move this peer (DESIGN.md section 3).

Self-centred clipping (ClippedGossip, He, Karimireddy & Jaggi, arXiv 2202.01545), made redescending: a
partner term is shrunk toward this peer's own reference before it is mixed,

    delta_j -> delta_i + shrink(delta_j - delta_i, tau)      phi_j -> phi_i + shrink(phi_j - phi_i, tau)

with shrink(x, tau) = x within the bound and x * (tau / ||x||)^2 beyond it: a term r times over the bound
enters at tau / r, not at tau as plain clipping, x * min(1, tau / ||x||), would let it. On coordinates
outside this peer's slice its own delta is 0 (it did not train them), so there the rule is plain norm
shrinking of the partner's delta. "Clipped" below and in the metrics means shrunk.

The rule, and why:
- One norm per update (all tensors of the contribution together), not per tensor: the guarantee of
  centred clipping is on the whole message; a per-tensor bound would need an own norm for every tensor,
  and under the `blocks` cut a peer has none for the layers of other slices; and clipping tensors one by
  one bends an honest update's direction where a single scale keeps it.
- The bound is an RMS (norm / sqrt(coordinates)) times sqrt(the contribution's coordinates), so one
  reference serves slices of different sizes (uneven `units` splits, `blocks` slices with embeddings).
- The reference is this peer's own delta RMS, never a partner's: nothing a partner sends can loosen the
  bound. `Clipper` keeps the last `WINDOW` own values; the running norm is their median (one odd own
  round does not move it), and tau = clip * median. With clip = 0 (the manifest's "automatic"),
  tau = `AUTO_FACTOR` * the `AUTO_QUANTILE` quantile of the window: the spread of own norms widens the
  bound where training is noisy.
- Weight differences use the same reference times `PHI_FACTOR`: honest peers' outer weights differ by a
  few rounds of progress (measured with the simulator, see `PHI_FACTOR`), more than one delta.
- A term more than `OUTLIER_RATIO` times the bound away is rejected (`OUTLIER`), not clipped: clipped, it
  would still enter at the full bound in the sender's chosen direction, round after round (measured: a
  peer scaling its updates by 1e4 got 2 of 4 terms into every outer step of the peers it reached, and
  their validation loss rose by up to 0.7 nats over a few rounds). Honest terms stay below ~1.5x the
  bound (daemon logs, tests/test_adversaries.py), so a factor of 10 is disagreement no honest peer has.
- Why redescending between 1 and `OUTLIER_RATIO`: a patient attacker (benchmarks/adversary_peers.py `sub-outlier`)
  sends terms ~8x over the bound in one fixed direction. Plainly clipped, each entered at the full bound,
  and its weight slice, pulled in with NoLoCo's consensus weight (0.5) under a bound `PHI_FACTOR` (4)
  times wider, could move a peer's weights by 2 delta bounds a round, the same way every time, until
  partner trust banned the sender after 3 such terms: one honest peer of four ended 0.64 nats above the
  other three in one CI run (tests/test_adversaries.py, 3.92 against 3.26-3.29). Shrunk to tau / r, such
  a term moves us r times less, while an honest term just over the bound (r ~ 1-1.5) keeps nearly all of
  its weight. The largest move any term can make is still tau, made by a term exactly at the bound; such
  a term is not clipped, so partner trust never sees it: the residual risk, as before, is an attacker that
  stays inside the bound.
Non-finite or wrong-shaped contributions are rejected outright (`check`); the wire already refuses
them before decoding (protocol/updates.py), this guards the simulator and anything handed in directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch

from peer.core.slices import Contribution, Params, SliceLayout
from protocol.errors import Reason

WINDOW = 16
"""Own delta norms kept for the running reference (rounds)."""
AUTO_QUANTILE = 0.9
AUTO_FACTOR = 2.0
"""clip = 0: tau = AUTO_FACTOR * the AUTO_QUANTILE quantile of own delta RMS over the window."""
PHI_FACTOR = 4.0
"""Weight differences may be this many times the delta bound (honest ones measured at <= ~2.5x own RMS)."""
OUTLIER_RATIO = 10.0
"""A term this many times over its bound is rejected as an outlier instead of clipped."""


@dataclass(slots=True)
class ClipReport:
    """What one outer step did with the partners' contributions (counted into metrics by the daemon)."""

    mixed: int = 0
    """Contributions (deltas and weight slices) that entered the step, clipped or not."""
    clipped: int = 0
    """Of those, how many were over the bound and shrunk (to tau / ratio, `clip_toward`)."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Refused contributions by reason (the values of `Reason.NON_FINITE`, `WRONG_SHAPE`, `OUTLIER`): the labels
    of the same rejection counter the wire's refusals go to."""
    largest_ratio: float = 0.0
    """Largest ||partner - own|| / tau seen this step (> 1: clipped)."""
    outcomes: dict[str, list[str]] = field(default_factory=dict)
    """Per sender (contributions that name their `source`): "clean", "clipped" or the rejection reason of each of
    its delta terms, and of any malformed term, for partner trust (`peer/node/trust.py`; see `robust_terms`)."""

    def reject(self, reason: str, source: str | None = None) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.outcome(source, reason)

    def outcome(self, source: str | None, what: str) -> None:
        if source is not None:
            self.outcomes.setdefault(source, []).append(what)


def check(tensors: Params, layout: SliceLayout, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why a partner's packed tensors cannot be mixed (`Reason.WRONG_SHAPE` or `NON_FINITE`, as its value), or None
    when they can.

    `layout` is the slice the contribution claims; `shapes` the full parameter shapes.
    """
    if set(tensors) - set(layout):
        return Reason.WRONG_SHAPE.value
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(layout[name].compact_shape(shapes[name])):
            return Reason.WRONG_SHAPE.value
        if not tensor.is_floating_point():
            return Reason.WRONG_SHAPE.value
    for tensor in tensors.values():
        if not bool(torch.isfinite(tensor).all()):
            return Reason.NON_FINITE.value
    return None


def rms(tensors: Iterable[torch.Tensor]) -> float:
    """sqrt(mean of squares) over every coordinate of `tensors` (0 for none)."""
    total, count = 0.0, 0
    for t in tensors:
        total += float(t.detach().float().pow(2).sum())
        count += t.numel()
    return math.sqrt(total / count) if count else 0.0


def clip_toward(tensors: Params, layout: SliceLayout, reference: Params, tau_rms: float) -> tuple[Params, float]:
    """reference + shrink(tensors - reference, tau) on the layout's coordinates, and ratio = ||diff|| / tau.

    shrink(x, tau) = x within the bound (ratio <= 1), else x * (tau / ||x||)^2: norm tau / ratio.

    `reference` is full-size (indexed by the layout's regions); tau = tau_rms * sqrt(coordinates).
    Unclipped tensors are returned as given (no copy).
    """
    own = {name: layout[name].extract(reference[name]).to(t.dtype) for name, t in tensors.items()}
    diff = {name: t - own[name] for name, t in tensors.items()}
    coords = sum(t.numel() for t in diff.values())
    norm = rms(diff.values()) * math.sqrt(coords)
    tau = tau_rms * math.sqrt(coords)
    ratio = norm / tau if tau > 0 else (0.0 if norm == 0 else math.inf)
    if ratio <= 1.0:
        return tensors, ratio
    # redescending: a term `ratio` times over the bound enters at tau / ratio (0 when tau is 0: it collapses
    # onto our own), so the further out, the less it moves us (see the module docstring)
    scale = (tau / norm) ** 2
    return {name: own[name] + diff[name] * scale for name in tensors}, ratio


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of `values` (linear interpolation, like numpy's default)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class Clipper:
    """The running norm of this peer's own deltas, and the bound it sets on partners' terms.

    Its state is plain floats (`state_dict`), saved with the peer's checkpoint so that a resumed peer
    clips as before instead of starting without a reference.
    """

    def __init__(self, clip: float, window: int = WINDOW) -> None:
        if not (clip >= 0 and math.isfinite(clip)):
            raise ValueError(f"clip must be a finite number >= 0, got {clip}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.clip, self.window = clip, window
        self.history: list[float] = []
        """Own delta RMS of the last `window` rounds, oldest first."""

    def observe(self, own: Params) -> None:
        """Record this round's own (decoded) delta; a non-finite one is ignored (it is no honest norm)."""
        value = rms(own.values())
        if math.isfinite(value):
            self.history = [*self.history, value][-self.window :]

    def tau_rms(self) -> float | None:
        """The bound on a partner delta's RMS distance from ours; None before any own delta was seen."""
        if not self.history:
            return None
        if self.clip > 0:
            return self.clip * quantile(self.history, 0.5)
        return AUTO_FACTOR * quantile(self.history, AUTO_QUANTILE)

    def state_dict(self) -> dict[str, object]:
        return {"clip": self.clip, "window": self.window, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore `state_dict`'s values; bad values raise ValueError (a checkpoint is outside input)."""
        history = state.get("history")
        if not isinstance(history, list) or not all(isinstance(v, (int, float)) for v in history):
            raise ValueError("clipper state: history must be a list of numbers")
        values = [float(v) for v in history]
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError("clipper state: history values must be finite and >= 0")
        self.history = values[-self.window :]


def robust_terms(
    phi: Params,
    own: Contribution,
    received: list[Contribution],
    weights: list[Contribution],
    clipper: Clipper,
) -> tuple[list[Contribution], list[Contribution], ClipReport]:
    """The partners' deltas and weight slices as they may enter the outer step: checked, then clipped.

    Records `own` in the clipper first, so the bound of this round already knows this round's norm.
    """
    report = ClipReport()
    clipper.observe(own.tensors)
    tau = clipper.tau_rms()
    shapes = {name: tuple(t.shape) for name, t in phi.items()}
    own_full = {name: torch.zeros_like(t) for name, t in phi.items()}
    for name, region in own.layout.items():
        region.scatter_(own_full[name], own.tensors[name].to(own_full[name].dtype))
    kept: tuple[list[Contribution], list[Contribution]] = ([], [])
    # Partner trust judges senders by their deltas only: a delta is one round of progress, as large for an honest
    # peer whatever happened before, while honest weights drift apart in a partition and are clipped or refused
    # after it through no fault of their sender (which must not then be banned, or the swarm would never heal).
    groups = ((kept[0], received, own_full, 1.0, True), (kept[1], weights, phi, PHI_FACTOR, False))
    for out, terms, reference, factor, judged in groups:
        for term in terms:
            reason = check(term.tensors, term.layout, shapes)
            if reason is not None:
                report.reject(reason, term.source)  # malformed: never honest, whichever kind of term
                continue
            tensors, ratio = term.tensors, 0.0
            if tau is not None:
                tensors, ratio = clip_toward(tensors, term.layout, reference, tau * factor)
                report.largest_ratio = max(report.largest_ratio, ratio)
                if ratio > OUTLIER_RATIO:
                    report.reject(Reason.OUTLIER.value, term.source if judged else None)
                    continue
                report.clipped += ratio > 1.0
            if judged:
                report.outcome(term.source, "clipped" if ratio > 1.0 else "clean")
            report.mixed += 1
            out.append(term if tensors is term.tensors else replace(term, tensors=tensors))
    return kept[0], kept[1], report
