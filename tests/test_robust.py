"""Robust aggregation (peer/core/robust.py): hand-computed centred clipping, rejections, the running norm, and
the outer step from wire updates with a clipper (peer/node/gossip.py)."""

from __future__ import annotations

import math

import pytest
import torch

from peer.config import RunConfig
from peer.core.outer import OuterConfig, gossip_step, initial_state
from peer.core.robust import (
    AUTO_FACTOR,
    PHI_FACTOR,
    Clipper,
    check,
    clip_toward,
    quantile,
    robust_terms,
)
from peer.core.slices import Contribution, Region, parameter_shapes, partition, pseudo_gradient
from peer.node.gossip import compose_outer_step, encode_update
from protocol.codec import CodecConfig, ErrorFeedback, decode
from protocol.errors import Reason
from protocol.updates import ReceivedUpdate

pytestmark = pytest.mark.timeout(240)  # torch work on a loaded 2-core machine

ALL = {"w": Region(0, ((0, 4),))}
"""A one-tensor layout covering all of a 4-vector."""
FIRST_TWO = {"w": Region(0, ((0, 2),))}


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_clip_toward_by_hand() -> None:
    reference = {"w": t(1.0, 1.0, 1.0, 1.0)}
    # diff = (3, 4, 0, 0): norm 5; tau = 0.5 * sqrt(4) = 1, ratio 5 -> diff * (1/5)^2 = (0.12, 0.16, 0, 0),
    # norm tau / ratio = 0.2 (redescending: five times over the bound moves us a fifth of the bound)
    clipped, ratio = clip_toward({"w": t(4.0, 5.0, 1.0, 1.0)}, ALL, reference, tau_rms=0.5)
    assert ratio == pytest.approx(5.0)
    torch.testing.assert_close(clipped["w"], t(1.12, 1.16, 1.0, 1.0))
    # just over the bound: nearly all of it (norm tau / 1.25)
    near, ratio = clip_toward({"w": t(1.75, 2.0, 1.0, 1.0)}, ALL, reference, tau_rms=0.5)
    assert ratio == pytest.approx(1.25)
    assert float((near["w"] - reference["w"]).norm()) == pytest.approx(1 / 1.25)
    # inside the bound: returned as given, not copied
    inside = {"w": t(1.1, 1.0, 1.0, 1.0)}
    same, ratio = clip_toward(inside, ALL, reference, tau_rms=0.5)
    assert same is inside and ratio == pytest.approx(0.1)


def test_clip_toward_uses_the_reference_on_the_packed_coordinates_only() -> None:
    reference = {"w": t(0.0, 0.0, 7.0, 7.0)}
    # packed coordinates 0..1 have reference 0: diff (3, 4) norm 5, tau = 1 * sqrt(2)
    clipped, ratio = clip_toward({"w": t(3.0, 4.0)}, FIRST_TWO, reference, tau_rms=1.0)
    assert ratio == pytest.approx(5 / math.sqrt(2))
    torch.testing.assert_close(clipped["w"], t(3.0, 4.0) * 2 / 25)


def test_check_rejects_non_finite_and_wrong_shapes() -> None:
    shapes = {"w": (4,)}
    assert check({"w": t(1, 2, 3, 4)}, ALL, shapes) is None
    assert check({"w": t(1, float("nan"), 3, 4)}, ALL, shapes) == Reason.NON_FINITE.value
    assert check({"w": t(1, float("inf"), 3, 4)}, ALL, shapes) == Reason.NON_FINITE.value
    assert check({"w": t(1, 2, 3)}, ALL, shapes) == Reason.WRONG_SHAPE.value
    assert check({"w": torch.ones(4, dtype=torch.int64)}, ALL, shapes) == Reason.WRONG_SHAPE.value
    assert check({"v": t(1, 2, 3, 4)}, ALL, shapes) == Reason.WRONG_SHAPE.value


def test_clipper_running_norm_and_auto_percentile() -> None:
    fixed = Clipper(clip=2.0, window=3)
    assert fixed.tau_rms() is None
    for value in (1.0, 3.0, 2.0, 10.0):  # rms of a constant vector is the constant
        fixed.observe({"w": torch.full((4,), value)})
    assert fixed.history == [3.0, 2.0, 10.0]
    assert fixed.tau_rms() == pytest.approx(2.0 * 3.0)  # clip * median of the window
    fixed.observe({"w": t(float("nan"), 1, 1, 1)})  # a non-finite own delta is no honest norm
    assert fixed.history == [3.0, 2.0, 10.0]

    auto = Clipper(clip=0.0, window=5)
    for value in (1.0, 2.0, 3.0, 4.0, 5.0):
        auto.observe({"w": torch.full((2,), value)})
    assert auto.tau_rms() == pytest.approx(AUTO_FACTOR * quantile([1, 2, 3, 4, 5], 0.9))  # 2 * 4.6

    restored = Clipper(clip=2.0, window=3)
    restored.load_state_dict(fixed.state_dict())
    assert restored.history == fixed.history and restored.tau_rms() == fixed.tau_rms()
    with pytest.raises(ValueError):
        restored.load_state_dict({"history": [1.0, float("inf")]})
    with pytest.raises(ValueError):
        restored.load_state_dict({"history": "nope"})
    with pytest.raises(ValueError):
        Clipper(clip=-1.0)


def test_robust_terms_clip_a_far_update_to_the_bound_reject_an_outlier_and_leave_honest_ones() -> None:
    gen = torch.Generator().manual_seed(0)
    phi = {"w": torch.randn(4, generator=gen, dtype=torch.float64)}
    own = Contribution(FIRST_TWO, {"w": t(0.01, -0.02)})
    honest = Contribution(ALL, {"w": t(0.012, -0.018, 0.01, 0.015)})
    far = Contribution(ALL, {"w": honest.tensors["w"] * 5})  # ~2x the bound: clipped
    attack = Contribution(ALL, {"w": honest.tensors["w"] * 1e4})  # thousands of times over: rejected
    poisoned = Contribution(ALL, {"w": t(0.0, float("inf"), 0.0, 0.0)})
    far_weights = Contribution(ALL, {"w": phi["w"] + 0.3})
    outlier_weights = Contribution(ALL, {"w": phi["w"] + 1e3})
    clipper = Clipper(clip=2.0)

    received, weights, report = robust_terms(
        phi, own, [honest, far, attack, poisoned], [far_weights, outlier_weights], clipper
    )

    own_rms = math.sqrt((0.01**2 + 0.02**2) / 2)
    tau = 2.0 * own_rms  # the window holds this round's own norm only
    assert clipper.history == [pytest.approx(own_rms)]
    assert len(received) == 2 and received[0] is honest  # honest: inside the bound, untouched
    reference = t(0.01, -0.02, 0.0, 0.0)
    clipped_diff = received[1].tensors["w"] - reference
    direction = far.tensors["w"] - reference
    ratio = float(direction.norm()) / (tau * 2)  # tau_rms * sqrt(4 coordinates)
    assert 1 < ratio < 10
    assert float(clipped_diff.norm()) == pytest.approx(tau * 2 / ratio)  # shrunk to the bound / ratio
    torch.testing.assert_close(clipped_diff / clipped_diff.norm(), direction / direction.norm())
    assert len(weights) == 1
    weight_diff = weights[0].tensors["w"] - phi["w"]
    weight_ratio = 0.3 * 2 / (PHI_FACTOR * tau * 2)
    assert 1 < weight_ratio < 10
    assert float(weight_diff.norm()) == pytest.approx(PHI_FACTOR * tau * 2 / weight_ratio)
    rejected = {Reason.NON_FINITE.value: 1, Reason.OUTLIER.value: 2}
    assert (report.mixed, report.clipped, report.rejected) == (3, 2, rejected)
    assert report.largest_ratio > 1e3
    assert report.outcomes == {}  # contributions that name no source (the simulator's) report no senders


def test_robust_terms_report_what_happened_to_each_senders_terms() -> None:
    """Partner trust (peer/node/trust.py) needs, per sender, which of its terms were clean, clipped or rejected."""
    phi = {"w": t(0.5, -0.5, 0.25, 0.0)}
    own = Contribution(FIRST_TWO, {"w": t(0.01, -0.02)})
    honest = Contribution(ALL, {"w": t(0.012, -0.018, 0.01, 0.015)}, source="honest")
    patient = Contribution(ALL, {"w": honest.tensors["w"] * 5}, source="patient")
    liar = Contribution(ALL, {"w": honest.tensors["w"] * 1e4}, source="liar")
    weights = [Contribution(ALL, {"w": phi["w"] + 0.3}, source="patient"), Contribution(ALL, dict(phi), "honest")]

    *_, report = robust_terms(phi, own, [honest, patient, liar], weights, Clipper(clip=2.0))

    # deltas are judged; a sender's weights are not (honest weights drift apart in a partition), unless malformed
    assert report.outcomes == {"honest": ["clean"], "patient": ["clipped"], "liar": [Reason.OUTLIER.value]}
    broken = Contribution(ALL, {"w": t(0.0, float("nan"), 0.0, 0.0)}, source="honest")
    *_, report = robust_terms(phi, own, [], [broken], Clipper(clip=2.0))
    assert report.outcomes == {"honest": [Reason.NON_FINITE.value]}


def _setup() -> tuple[RunConfig, dict, list]:
    run = RunConfig.from_dict({"swarm": "unit", "preset": "tiny", "slices": {"num_slices": 2}, "outer": {"clip": 2.0}})
    return run, parameter_shapes(run.model), partition(run.model, run.slices)


def _wire(run: RunConfig, shapes: dict, layouts: list, seed: int, slice_index: int, scale: float = 1.0):
    """A partner's update as the wire hands it over, with its delta scaled by `scale`."""
    base = torch.Generator().manual_seed(0)  # every peer started from the same weights
    gen = torch.Generator().manual_seed(seed)
    phi = {n: torch.randn(s, generator=base) * 0.02 + torch.randn(s, generator=gen) * 3e-4 for n, s in shapes.items()}
    theta = {n: p + torch.randn(p.shape, generator=gen) * 1e-3 for n, p in phi.items()}
    delta = pseudo_gradient(phi, theta, layouts[slice_index])
    delta = Contribution(delta.layout, {n: d * scale for n, d in delta.tensors.items()})
    update, own = encode_update(3, slice_index, delta, phi, layouts, ErrorFeedback(run.codec))
    tensors = {n: decode(e, CodecConfig(name=e.codec)) for n, e in update.tensors.items()}
    return phi, own, ReceivedUpdate(f"{seed:064x}", "r" * 64, 3, slice_index, tensors, b"\0" * 32, 0)


def test_compose_outer_step_reports_and_bounds_a_1e4_scaled_partner() -> None:
    run, shapes, layouts = _setup()
    phi, own, _ = _wire(run, shapes, layouts, 0, 0)
    _, _, honest = _wire(run, shapes, layouts, 1, 1)
    _, _, scaled = _wire(run, shapes, layouts, 2, 1, scale=1e4)
    outer = OuterConfig(rule="noloco", lr=0.5, momentum=0.5, consensus=0.5)

    def step(updates: list[ReceivedUpdate], clipper: Clipper | None) -> tuple[dict, object]:
        p = {n: x.clone() for n, x in phi.items()}
        report = compose_outer_step(p, initial_state(p, outer), own, updates, layouts, outer, clipper)
        return p, report

    plain, plain_report = step([honest], None)
    guarded, report = step([honest], Clipper(run.clip))
    assert (plain_report.mixed, report.mixed, report.rejected) == (2, 2, {})
    moved = sum(float((guarded[n] - phi[n]).norm()) for n in phi)
    same = sum(float((guarded[n] - plain[n]).norm()) for n in phi)
    assert same <= 0.05 * moved  # an honest partner is (nearly) untouched

    attacked, report = step([scaled], Clipper(run.clip))
    assert report.rejected == {Reason.OUTLIER.value: 1}  # the delta; its weights are honest
    assert report.largest_ratio > 100
    unguarded, _ = step([scaled], None)
    shift = lambda p: math.sqrt(sum(float((p[n] - phi[n]).pow(2).sum()) for n in phi))  # noqa: E731
    assert shift(attacked) < 3 * shift(guarded) and shift(unguarded) > 100 * shift(guarded)

    _, _, over = _wire(run, shapes, layouts, 3, 1, scale=8.0)  # over the bound, not an outlier: clipped
    clipped, report = step([over], Clipper(run.clip))
    assert report.clipped == 1 and 2 < report.largest_ratio < 10 and report.rejected == {}
    assert shift(clipped) < 3 * shift(guarded)
    # redescending: the same partner at the bound moves us further than when it is several times over it
    _, _, at_bound = _wire(run, shapes, layouts, 3, 1, scale=2.0)
    nearer, report = step([at_bound], Clipper(run.clip))
    assert 0.9 < report.largest_ratio < 1.5
    assert shift(clipped) < shift(nearer)

    bad = ReceivedUpdate("f" * 64, "r" * 64, 3, 1, {"delta/nope": torch.zeros(3)}, b"\0" * 32, 0)
    _, report = step([honest, bad], Clipper(run.clip))
    assert report.rejected == {Reason.WRONG_SHAPE.value: 1} and report.mixed == 2


def test_gossip_step_with_clipper_matches_plain_gossip_for_honest_terms() -> None:
    phi = {"w": t(1.0, 2.0, 3.0, 4.0)}
    own = Contribution(FIRST_TWO, {"w": t(0.1, 0.1)})
    partner = Contribution({"w": Region(0, ((2, 4),))}, {"w": t(0.12, 0.09)})
    weights = Contribution(ALL, {"w": t(1.05, 2.0, 2.95, 4.0)})
    config = OuterConfig(rule="noloco", lr=0.5, momentum=0.5, consensus=0.5)
    a, b = {"w": phi["w"].clone()}, {"w": phi["w"].clone()}
    assert gossip_step(a, initial_state(a, config), own, [partner], [weights], config) is None
    report = gossip_step(b, initial_state(b, config), own, [partner], [weights], config, Clipper(4.0))
    assert report is not None and (report.mixed, report.clipped, report.rejected) == (2, 0, {})
    torch.testing.assert_close(a["w"], b["w"], rtol=0, atol=0)
