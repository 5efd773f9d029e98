"""The outer step: turn this round's pseudo-gradients (own and received) into new outer weights.

Notation follows DESIGN.md section 3. A peer holds outer weights `phi` (the full model) and
outer `momentum`; after H inner steps its trained copy is `theta`, and its pseudo-gradient is
`delta = phi - theta` on the coordinates of its slice.

- DiLoCo / all-reduce PPU (`nesterov_step`): `m = mu*m + delta; phi = phi - eta*(mu*m + delta)`,
  with `delta` averaged per coordinate over the peers that cover it (`CoordinateMean`).
- NoLoCo (`noloco_step`): `m = beta*m - alpha*dbar + alpha*(phibar - phi); phi = phi + m`,
  with `dbar` = the group's mean delta and `phibar - phi` = the group's mean weight difference
  on the coordinates whose weights were exchanged this round.
- GASLoC (`gasloc_step`): `y = phi - eta*dbar;
  phi = y + alpha*sum_j lambda_ij*(phi_j - phi) + gamma*(y - y_prev)` (gamma=0: plain gossip).

Received updates cover only their sender's slice, so every mean is per coordinate, over the
updates that cover it; coordinates nobody covered get no progress term (momentum and consensus
still apply). The simulator and the daemon call these same functions; only where the
`Contribution`s come from differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from peer.core.robust import Clipper, ClipReport, robust_terms
from peer.core.slices import Contribution, Params


@dataclass(frozen=True, kw_only=True, slots=True)
class OuterConfig:
    """Outer optimiser settings; per method, since DiLoCo's 0.7/0.9 is unstable for PPU."""

    rule: Literal["nesterov", "noloco", "gasloc"] = "noloco"
    lr: float = 0.7
    """eta (Nesterov, GASLoC's progress step) or alpha (NoLoCo)."""
    momentum: float = 0.5
    """mu (Nesterov), beta (NoLoCo) or gamma (GASLoC)."""
    consensus: float = 0.5
    """Weight of the pull toward partners' weights: NoLoCo's alpha on (phibar - phi), GASLoC's alpha."""

    def __post_init__(self) -> None:
        if self.rule not in ("nesterov", "noloco", "gasloc"):
            raise ValueError(f"unknown outer rule {self.rule!r}")
        if not 0 < self.lr <= 2:
            raise ValueError(f"outer lr must be in (0, 2], got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"outer momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.consensus <= 1:
            raise ValueError(f"consensus weight must be in [0, 1], got {self.consensus}")


METHODS = ("ddp", "diloco", "ppu", "gossip-ppu", "gossip-ppu-noloco", "gossip-ppu-gasloc")
"""Everything the simulator compares; the daemon runs "gossip-ppu"."""

# Outer settings per method, from `python -m benchmarks.long_horizon` (tiny, 8 peers, K=4 units, int8, H=20;
# benchmarks/README "Long horizon"). With the coordinates outside a slice frozen, the K slices each fit the
# same error and their sum overshoots, so PPU needed a small outer step (16 rounds: lr 0.25 -> 2.270, 0.4 ->
# 2.367; DiLoCo 2.086). With InnerConfig.rest_step 0.3 (the rest moves by sign steps, never sent) the slices
# add up and PPU takes DiLoCo's step: lr 0.7 -> 2.053. Gossip-PPU (fanout 2, the daemon's) with rest_step 0.3:
# lr 0.7 -> 2.337, 0.4 -> 2.364 (40 rounds: 1.773, 1.782); 0.4 is the default all the same: when the daemon
# still applied each whole outer step one round late (overlap), a 3-peer daemon swarm's validation loss turned
# up after 30 rounds at 0.7 (tests/test_daemon_swarm: 3.81 -> 2.83 -> 2.99). DiLoCo keeps 0.7/0.5 (10-round
# sweep: 0.7/0.9 lost, 2.63 vs 2.40).
DEFAULT_OUTER: dict[str, OuterConfig] = {
    "diloco": OuterConfig(rule="nesterov", lr=0.7, momentum=0.5),
    "ppu": OuterConfig(rule="nesterov", lr=0.7, momentum=0.5),
    "gossip-ppu-noloco": OuterConfig(rule="noloco", lr=0.4, momentum=0.5, consensus=0.5),
    "gossip-ppu-gasloc": OuterConfig(rule="gasloc", lr=0.5, momentum=0.5, consensus=0.5),
}
DEFAULT_OUTER["gossip-ppu"] = DEFAULT_OUTER["gossip-ppu-noloco"]


class CoordinateMean:
    """Running per-coordinate mean of contributions that each cover part of the model (PPU's m[i])."""

    def __init__(self, like: Params) -> None:
        # at least fp32 whatever phi's dtype: a bf16 run's deltas are fp32 and are averaged as such
        self.total = {name: torch.zeros_like(t, dtype=accumulating(t)) for name, t in like.items()}
        self.count = {name: torch.zeros_like(t, dtype=accumulating(t)) for name, t in like.items()}

    def add(self, contribution: Contribution, weight: float = 1.0) -> None:
        for name, region in contribution.layout.items():
            packed = contribution.tensors[name]
            region.scatter_(self.total[name], packed * weight, add=True)
            region.scatter_(self.count[name], torch.full_like(packed, weight), add=True)

    def mean(self) -> Params:
        """Mean where covered, 0 where nobody contributed."""
        return {name: total / self.count[name].clamp(min=1e-12) for name, total in self.total.items()}

    def covered(self) -> Params:
        return {name: (count > 0).to(count.dtype) for name, count in self.count.items()}


def consensus_pull(phi: Params, partners: list[Contribution]) -> Params:
    """mean_j(phi_j) - phi over the group (self included) on each coordinate some partner sent.

    With one partner j covering a coordinate this is (phi_j - phi)/2: each side moves half-way when
    the weight is 1.
    """
    diffs = CoordinateMean(phi)
    for contribution in partners:
        diffs.add(Contribution(contribution.layout, _minus_own(contribution, phi)))
    pull = diffs.mean()
    # self contributes a zero difference wherever a partner contributed: mean over (count + 1)
    return {name: pull[name] * diffs.count[name] / (diffs.count[name] + 1) for name in pull}


def _minus_own(contribution: Contribution, phi: Params) -> Params:
    return {
        name: contribution.tensors[name] - region.extract(phi[name]) for name, region in contribution.layout.items()
    }


@torch.no_grad()
def nesterov_step(phi: Params, momentum: Params, delta: Params, lr: float, mu: float) -> None:
    """DiLoCo's outer step, in place: m = mu*m + delta; phi = phi - lr*(mu*m + delta)."""
    for name, p in phi.items():
        m = momentum[name].mul_(mu).add_(delta[name])
        p.sub_(lr * (mu * m + delta[name]))


@torch.no_grad()
def noloco_step(phi: Params, momentum: Params, delta: Params, pull: Params, config: OuterConfig) -> None:
    """NoLoCo, in place: m = beta*m - alpha*dbar + alpha_c*(phibar - phi); phi = phi + m."""
    for name, p in phi.items():
        m = momentum[name].mul_(config.momentum)
        m.add_(delta[name], alpha=-config.lr).add_(pull[name], alpha=config.consensus)
        p.add_(m)


@torch.no_grad()
def gasloc_step(phi: Params, y_prev: Params, delta: Params, pull: Params, config: OuterConfig) -> None:
    """GASLoC, in place: y = phi - eta*dbar; phi = y + alpha*pull + gamma*(y - y_prev); y_prev = y.

    `pull` is sum_j lambda_ij*(phi_j - phi) with lambda = 1/|group|, as `consensus_pull` returns.
    """
    for name, p in phi.items():
        y = p - config.lr * delta[name]
        step = y + config.consensus * pull[name] + config.momentum * (y - y_prev[name])
        y_prev[name].copy_(y)
        p.copy_(step)


def gossip_step(
    phi: Params,
    state: Params,
    own: Contribution,
    received: list[Contribution],
    weights: list[Contribution],
    config: OuterConfig,
    clipper: Clipper | None = None,
) -> ClipReport | None:
    """One peer's gossip outer step from its own delta, partners' deltas and partners' weight slices.

    `state` is the rule's per-peer buffer: NoLoCo's momentum or GASLoC's previous y (initialise it
    to zeros for NoLoCo and to phi for GASLoC; `initial_state` does that). With a `clipper`, partner
    terms are first checked and clipped toward this peer's own (`peer/core/robust.py`), and the report of
    what happened to them is returned; without one they are mixed as given (None).
    """
    report = None
    if clipper is not None:
        received, weights, report = robust_terms(phi, own, received, weights, clipper)
    progress = CoordinateMean(phi)
    for contribution in (own, *received):
        progress.add(contribution)
    delta = progress.mean()
    pull = consensus_pull(phi, weights)
    if config.rule == "noloco":
        noloco_step(phi, state, delta, pull, config)
    elif config.rule == "gasloc":
        gasloc_step(phi, state, delta, pull, config)
    else:
        raise ValueError(f"gossip_step needs the noloco or gasloc rule, not {config.rule!r}")
    return report


def initial_state(phi: Params, config: OuterConfig) -> Params:
    """The rule's buffer at the start of a run: momentum zeros, or GASLoC's y_prev = phi; fp32 (and on phi's
    device) whatever phi's dtype, so a bf16 phi's outer step still accumulates its momentum in fp32 and rounds
    once, when it adds the step to phi."""
    if config.rule == "gasloc":
        return {name: t.to(accumulating(t), copy=True) for name, t in phi.items()}
    return {name: torch.zeros_like(t, dtype=accumulating(t)) for name, t in phi.items()}


def accumulating(tensor: torch.Tensor) -> torch.dtype:
    """The dtype outer buffers of `tensor` are kept in: its own, but never below float32 (a bf16 phi)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def consensus_distance(phis: list[Params]) -> float:
    """Mean over peers of ||phi_k - mean(phi)|| / ||mean(phi)||, over all parameters."""
    names = list(phis[0])
    flat = [torch.cat([p[n].flatten().float() for n in names]) for p in phis]
    center = torch.stack(flat).mean(0)
    norm = float(center.norm()) or 1.0
    return float(sum(float((f - center).norm()) for f in flat) / len(flat) / norm)
