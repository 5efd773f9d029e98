"""One gossip round's bookkeeping, without sockets: what goes on the wire and how received updates
become the outer step.

The daemon sends, per round, one signed update carrying
- `delta/<param>`: its pseudo-gradient on its own slice (packed, the run's codec, error feedback), and
- `phi/<k>/<param>`: its outer weights on one rotating slice k = round % K (bf16), for the consensus term.

The consensus slice is named in the tensor names, not derived from the header: the header has one
`slice` field (the sender's), and under the `units` cut two slices may pack the same parameter to
different shapes when a dimension does not split evenly, so "phi/<param>" alone would be ambiguous.

`outer_step` is the outer step of the daemon and of the simulator (`peer/lab/sim.py`, `Simulation._gossip`)
alike; only where the partners' terms come from differs (`PartnerTerms`: `terms_from_updates` for the
daemon's signed updates off the network, in process for the simulator). `Inbox` decides which updates are
kept: one per sender (its newest), never one already applied, and none that is stale (see `STALE_ROUNDS`):
stale updates are dropped, not down-weighted, because `gossip_step` weighs every contribution equally and
mixing an old delta at full weight is what staleness hurts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from peer.core.outer import OuterConfig, gossip_step
from peer.core.robust import Clipper, ClipReport
from peer.core.slices import Contribution, Params, SliceLayout, weight_slice
from protocol.codec import CodecConfig, ErrorFeedback, decode, encode
from protocol.errors import Reason
from protocol.logs import get_logger
from protocol.updates import OutgoingUpdate, ReceivedUpdate

log = get_logger(__name__)

DELTA = "delta/"
PHI = "phi/"
WEIGHTS_CODEC = CodecConfig(name="bf16")
"""Codec of the consensus weight slice (the simulator's `weights_codec`)."""
STALE_ROUNDS = 2
"""An update more than this many rounds behind the receiver's round is dropped."""


def consensus_slice(round: int, num_slices: int) -> int:
    """The slice whose outer weights a peer sends in `round` (rotating, as in the simulator)."""
    return round % num_slices


def update_shapes(
    layouts: Sequence[SliceLayout], shapes: Mapping[str, tuple[int, ...]], slice_index: int
) -> dict[str, tuple[int, ...]] | None:
    """The wire policy's table for an update from a peer of `slice_index`: its delta, any phi slice."""
    if not 0 <= slice_index < len(layouts):
        return None
    table = {DELTA + n: r.compact_shape(shapes[n]) for n, r in layouts[slice_index].items()}
    for k, layout in enumerate(layouts):
        table.update({f"{PHI}{k}/{n}": r.compact_shape(shapes[n]) for n, r in layout.items()})
    return table


def encode_update(
    round: int,
    slice_index: int,
    delta: Contribution,
    phi: Params,
    layouts: Sequence[SliceLayout],
    feedback: ErrorFeedback,
) -> tuple[OutgoingUpdate, Contribution]:
    """This round's update, and the delta as partners will decode it (what the sender mixes in too).

    Blocking tensor work: call it from the training thread.
    """
    codec = feedback.config
    encoded, decoded = {}, {}
    for name, tensor in delta.tensors.items():
        enc = feedback.encode(DELTA + name, tensor)
        encoded[DELTA + name] = enc
        decoded[name] = decode(enc, codec).to(tensor.device)
    k = consensus_slice(round, len(layouts))
    for name, tensor in weight_slice(phi, layouts[k]).tensors.items():
        # bf16 bits on the wire whatever phi's dtype; declared float32 (what the wire policy expects of every
        # update tensor), so a bf16 run's weight slice is the same bytes, losslessly
        encoded[f"{PHI}{k}/{name}"] = encode(tensor.float(), WEIGHTS_CODEC)
    update = OutgoingUpdate(round, slice_index, encoded)
    update.digest()  # hashed once here, in the training thread: no exchange of the round waits for it
    return update, Contribution(delta.layout, decoded)


def split_update(
    update: ReceivedUpdate, layouts: Sequence[SliceLayout], device: torch.device | None = None
) -> tuple[Contribution | None, Contribution | None]:
    """(delta, weights) contributions of a validated update; either is None when it carries none.

    The wire already checked names and shapes against `update_shapes`; anything else (a name outside the
    sender's slice, a slice that does not exist) raises ValueError. A weight slice mixing two consensus
    slices is not something an honest peer sends, so only the first slice named is used.
    """
    if not 0 <= update.slice < len(layouts):
        raise ValueError(f"no slice {update.slice}")
    delta_layout = layouts[update.slice]
    delta, phis = {}, {}
    for name, tensor in update.tensors.items():
        if name.startswith(DELTA) and name[len(DELTA) :] in delta_layout:
            delta[name[len(DELTA) :]] = tensor.to(device)
            continue
        k, _, param = name[len(PHI) :].partition("/") if name.startswith(PHI) else ("", "", "")
        if not (k.isdigit() and int(k) < len(layouts) and param in layouts[int(k)]):
            raise ValueError(f"unexpected tensor {name[:80]!r}")
        phis.setdefault(int(k), {})[param] = tensor.to(device)
    delta_c = Contribution({n: delta_layout[n] for n in delta}, delta, update.sender) if delta else None
    if not phis:
        return delta_c, None
    k = min(phis)
    if len(phis) > 1:
        log.info("update from %s carries %d weight slices; using slice %d", update.sender[:16], len(phis), k)
    weights = phis[k]
    return delta_c, Contribution({n: layouts[k][n] for n in weights}, weights, update.sender)


@dataclass(slots=True)
class PartnerTerms:
    """The partners' terms of one outer step, wherever they came from: the seam between the outer step and
    its transport. The daemon gets them from signed updates off the network (`terms_from_updates`); the
    simulator builds them in process from its virtual peers' (codec round-tripped) contributions."""

    deltas: list[Contribution] = field(default_factory=list)
    weights: list[Contribution] = field(default_factory=list)
    unusable: list[str] = field(default_factory=list)
    """Senders whose update could not even be split into terms (counted as WRONG_SHAPE rejections)."""


def terms_from_updates(updates: Sequence[ReceivedUpdate], layouts: Sequence[SliceLayout],
                       device: torch.device) -> PartnerTerms:  # fmt: skip
    """The network's source: each kept update split into its delta and its weight slice."""
    terms = PartnerTerms()
    for update in updates:
        try:
            delta, weight = split_update(update, layouts, device)
        except ValueError as exc:
            log.warning("update from %s not mixed: %s", update.sender[:16], exc)
            terms.unusable.append(update.sender)
            continue
        if delta is not None:
            terms.deltas.append(delta)
        if weight is not None:
            terms.weights.append(weight)
    return terms


def outer_step(phi: Params, state: Params, own: Contribution, terms: PartnerTerms, config: OuterConfig,
               clipper: Clipper | None = None) -> ClipReport:  # fmt: skip
    """The gossip outer step (in place) from this peer's own delta and its partners' terms: the one call
    the daemon and the simulator both make.

    With a `clipper` every partner term is checked and clipped toward our own (`peer/core/robust.py`); the
    report says how many terms were mixed, clipped and rejected (by reason) for the daemon's metrics.
    """
    report = gossip_step(phi, state, own, terms.deltas, terms.weights, config, clipper)
    if report is None:
        report = ClipReport(mixed=len(terms.deltas) + len(terms.weights))
    for sender in terms.unusable:
        report.reject(Reason.WRONG_SHAPE.value, sender)
    if report.clipped or report.rejected:
        log.info("outer step: %d partner terms mixed, %d clipped (largest %.3g x the bound), rejected %s",
                 report.mixed, report.clipped, report.largest_ratio, report.rejected)  # fmt: skip
    return report


def compose_outer_step(
    phi: Params,
    state: Params,
    own: Contribution,
    updates: Sequence[ReceivedUpdate],
    layouts: Sequence[SliceLayout],
    config: OuterConfig,
    clipper: Clipper | None = None,
) -> ClipReport:
    """The daemon's outer step: `outer_step` over the terms of the partners' updates it kept."""
    device = next(iter(phi.values())).device
    return outer_step(phi, state, own, terms_from_updates(updates, layouts, device), config, clipper)


@dataclass(slots=True)
class Inbox:
    """Updates received this round (pushed to our server, or replies to our pushes), until used."""

    pending: dict[str, ReceivedUpdate] = field(default_factory=dict)
    """Newest update per sender."""
    applied: dict[str, int] = field(default_factory=dict)
    """Per sender, the round of the last update mixed into phi (never use one twice)."""
    dropped_stale: int = 0

    def add(self, update: ReceivedUpdate) -> None:
        held = self.pending.get(update.sender)
        if held is None or update.round > held.round:
            self.pending[update.sender] = update

    def take(self, own_round: int) -> list[ReceivedUpdate]:
        """The usable updates for the outer step of `own_round`, emptying the inbox."""
        kept = []
        for sender, update in sorted(self.pending.items()):
            if update.round <= self.applied.get(sender, -1):
                continue  # e.g. a slower partner's reply repeats the update we already mixed in
            if own_round - update.round > STALE_ROUNDS:
                self.dropped_stale += 1
                log.info("dropped a stale update from %s: its round %d, ours %d", sender[:16], update.round, own_round)
                continue
            self.applied[sender] = update.round
            kept.append(update)
        self.pending.clear()
        return kept
