"""The outer-step formulas of DESIGN.md section 3, checked on hand-computed small tensors."""

from __future__ import annotations

import pytest
import torch

from peer.core.outer import (
    CoordinateMean,
    OuterConfig,
    consensus_distance,
    consensus_pull,
    gasloc_step,
    gossip_step,
    initial_state,
    nesterov_step,
    noloco_step,
)
from peer.core.slices import Contribution, Region, pseudo_gradient

pytestmark = pytest.mark.timeout(30)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_nesterov_step_by_hand() -> None:
    phi, m = {"w": t(1.0, 2.0)}, {"w": t(0.5, 0.0)}
    nesterov_step(phi, m, {"w": t(0.1, -0.2)}, lr=0.7, mu=0.9)
    # m = 0.9*0.5 + 0.1 = 0.55 and 0.9*0 - 0.2 = -0.2
    assert torch.allclose(m["w"], t(0.55, -0.2))
    # phi = 1 - 0.7*(0.9*0.55 + 0.1) = 0.5835; 2 - 0.7*(0.9*-0.2 - 0.2) = 2.266
    assert torch.allclose(phi["w"], t(0.5835, 2.266))


def test_noloco_step_by_hand() -> None:
    phi, m = {"w": t(1.0)}, {"w": t(0.2)}
    config = OuterConfig(rule="noloco", lr=0.7, momentum=0.5, consensus=0.7)
    noloco_step(phi, m, delta={"w": t(0.1)}, pull={"w": t(0.3)}, config=config)
    # m = 0.5*0.2 - 0.7*0.1 + 0.7*0.3 = 0.24; phi = 1 + 0.24
    assert torch.allclose(m["w"], t(0.24))
    assert torch.allclose(phi["w"], t(1.24))


def test_gasloc_step_by_hand() -> None:
    phi, y_prev = {"w": t(1.0)}, {"w": t(0.9)}
    config = OuterConfig(rule="gasloc", lr=0.7, momentum=0.5, consensus=1.0)
    gasloc_step(phi, y_prev, delta={"w": t(0.1)}, pull={"w": t(0.2)}, config=config)
    # y = 1 - 0.07 = 0.93; phi = 0.93 + 1.0*0.2 + 0.5*(0.93 - 0.9) = 1.145
    assert torch.allclose(phi["w"], t(1.145))
    assert torch.allclose(y_prev["w"], t(0.93))


def test_coordinate_mean_averages_over_covering_updates_only() -> None:
    like = {"w": torch.zeros(4, 2, dtype=torch.float64)}
    mean = CoordinateMean(like)
    rows_01, rows_13 = Region(0, ((0, 2),)), Region(0, ((1, 3),))
    mean.add(Contribution({"w": rows_01}, {"w": torch.full((2, 2), 2.0, dtype=torch.float64)}))
    mean.add(Contribution({"w": rows_13}, {"w": torch.full((2, 2), 4.0, dtype=torch.float64)}))
    # row 0: only the first (2); row 1: both (3); row 2: only the second (4); row 3: nobody (0)
    assert torch.allclose(mean.mean()["w"][:, 0], t(2.0, 3.0, 4.0, 0.0))
    assert torch.equal(mean.covered()["w"][:, 1], t(1.0, 1.0, 1.0, 0.0))


def test_pseudo_gradient_is_phi_minus_theta_on_the_slice() -> None:
    phi = {"a": t(1.0, 2.0, 3.0), "b": t(5.0)}
    theta = {"a": t(0.5, 2.5, 3.0), "b": t(4.0)}
    delta = pseudo_gradient(phi, theta, {"a": Region(0, ((0, 2),))})
    assert set(delta.tensors) == {"a"}
    assert torch.allclose(delta.tensors["a"], t(0.5, -0.5))


def test_consensus_pull_moves_half_way_to_one_partner() -> None:
    phi = {"w": t(1.0, 1.0, 1.0)}
    partner = Contribution({"w": Region(0, ((0, 2),))}, {"w": t(3.0, 0.0)})
    pull = consensus_pull(phi, [partner])
    # group mean minus own: (1+3)/2 - 1 = 1; (1+0)/2 - 1 = -0.5; not sent: 0
    assert torch.allclose(pull["w"], t(1.0, -0.5, 0.0))


def test_gasloc_on_a_complete_graph_without_momentum_is_diloco_without_momentum() -> None:
    torch.manual_seed(0)
    phi0 = {"w": torch.randn(6, dtype=torch.float64)}
    deltas = [torch.randn(6, dtype=torch.float64) for _ in range(4)]
    whole = {"w": Region(0, ((0, 6),))}
    contributions = [Contribution(whole, {"w": d}) for d in deltas]
    config = OuterConfig(rule="gasloc", lr=0.7, momentum=0.0, consensus=1.0)
    phi = {"w": phi0["w"].clone()}
    weights = [Contribution(whole, {"w": phi0["w"].clone()}) for _ in range(3)]
    gossip_step(phi, initial_state(phi, config), contributions[0], contributions[1:], weights, config)
    expected = phi0["w"] - 0.7 * torch.stack(deltas).mean(0)
    assert torch.allclose(phi["w"], expected)


def test_noloco_pairs_keep_the_pair_mean_of_weights() -> None:
    """With equal deltas, a NoLoCo pair's consensus terms cancel: the pair mean moves by progress only."""
    config = OuterConfig(rule="noloco", lr=0.5, momentum=0.0, consensus=0.7)
    whole = {"w": Region(0, ((0, 3),))}
    a, b = {"w": t(1.0, 2.0, 3.0)}, {"w": t(3.0, 2.0, 1.0)}
    delta = Contribution(whole, {"w": t(0.2, 0.2, 0.2)})
    share_a, share_b = Contribution(whole, {"w": a["w"].clone()}), Contribution(whole, {"w": b["w"].clone()})
    gossip_step(a, initial_state(a, config), delta, [delta], [share_b], config)
    gossip_step(b, initial_state(b, config), delta, [delta], [share_a], config)
    assert torch.allclose((a["w"] + b["w"]) / 2, t(1.9, 1.9, 1.9))
    assert consensus_distance([a, b]) < consensus_distance([{"w": t(1.0, 2.0, 3.0)}, {"w": t(3.0, 2.0, 1.0)}])


def test_outer_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="momentum"):
        OuterConfig(momentum=1.0)
    with pytest.raises(ValueError, match="rule"):
        OuterConfig(rule="adam")
