"""What `benchmarks.long_horizon` runs: a `Variant` per simulation, the runner, and the diagnostic simulations.

A variant is a method plus everything that differs from the issue's setting (tiny, 8 peers, 40 rounds of
H=20, batch 8, K=4 `units`, int8, the method's DEFAULT_OUTER). Its `key()` names only what differs, so a
cached result stays valid when a new field with a default is added.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import torch

from peer.core.data import load_corpus
from peer.core.inner import InnerConfig, SliceOptimizer, _Owned
from peer.core.model import PRESETS
from peer.core.outer import CoordinateMean, OuterConfig, gossip_step
from peer.core.slices import (
    Contribution,
    Params,
    Region,
    SliceConfig,
    SliceLayout,
    full_layout,
    head_parameters,
    partition,
)
from peer.lab.sim import DEFAULT_OUTER, SimConfig, Simulation, evaluate
from protocol.codec import CodecConfig

GLOBAL_BATCH = 64
"""Sequences per inner step, all peers together: 8 peers x batch 8, or 16 peers x batch 4."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Variant:
    """One simulation; fields left at their default are the issue's setting."""

    method: str
    peers: int = 8
    rounds: int = 40
    slices: int = 4
    cut: str = "units"
    H: int = 20
    inner_lr: float = 3e-3
    rest_step: float = 0.0
    """InnerConfig.rest_step: 0 freezes the coordinates outside the slice (main's PPU, pinned here)."""
    lr: float | None = None
    """Outer lr; None keeps DEFAULT_OUTER's (as do momentum and consensus)."""
    momentum: float | None = None
    consensus: float | None = None
    rule: str | None = None
    fanout: int = 1
    d_model: int = 0
    """0 keeps the tiny preset's; another width builds a smaller model (equal-memory comparison)."""
    global_batch: int = GLOBAL_BATCH
    sim: tuple[tuple[str, object], ...] = ()
    """SimConfig fields to override, as (name, value) pairs; the others are pinned by `build_config` (a
    SimConfig default changed later does not change what a cached key means)."""
    diag: str = ""
    """A diagnostic simulation of this module (`DIAGNOSTICS`) instead of `Simulation`."""

    def key(self) -> str:
        """What this run is: the method, its outer settings (resolved, so the key outlives a change of
        DEFAULT_OUTER) and every other field that differs from the issue's setting."""
        parts = [self.method]
        outer = self.outer()
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("lr", "momentum", "consensus") and outer is not None:
                if f.name != "consensus" or outer.rule != "nesterov":
                    parts.append(f"{f.name}={getattr(outer, f.name)}")
            elif f.name == "rule" and outer is not None and outer.rule != DEFAULT_OUTER[self.method].rule:
                parts.append(f"rule={outer.rule}")
            elif f.name not in ("method", "sim", "rule", "lr", "momentum", "consensus") and value != f.default:
                parts.append(f"{f.name}={value}")
        parts += [f"{k}={v}" for k, v in self.sim]
        return " ".join(parts)

    def outer(self) -> OuterConfig | None:
        """The method's outer settings with this variant's changes; None for DDP."""
        base = DEFAULT_OUTER.get(self.method)
        if base is None:
            return None
        changes = {k: getattr(self, k) for k in ("rule", "lr", "momentum", "consensus") if getattr(self, k) is not None}
        return replace(base, **changes)

    def cost(self) -> float:
        """Relative CPU cost, to start the longest runs first."""
        return self.rounds * self.H * self.global_batch * (1 + (self.d_model or 96) / 96)


def build_config(v: Variant) -> SimConfig:
    """The SimConfig of a variant: the issue's setting with the variant's changes."""
    batch, rest = divmod(v.global_batch, v.peers)
    if rest or batch < 1:
        raise ValueError(f"{v.peers} peers cannot split a global batch of {v.global_batch}")
    total = v.rounds * v.H
    inner = InnerConfig(lr=v.inner_lr, rest_step=v.rest_step, steps_per_round=v.H, batch_size=batch, total_steps=total,
                        warmup_steps=min(50, max(1, total // 10)))  # fmt: skip
    model = PRESETS["tiny"] if not v.d_model else replace(PRESETS["tiny"], d_model=v.d_model)
    outer = dict(DEFAULT_OUTER)
    if v.outer() is not None:
        outer[v.method] = v.outer()
    config = SimConfig(model=model, inner=inner, slices=SliceConfig(num_slices=v.slices, cut=v.cut),
                       codec=CodecConfig(name="int8"), peers=v.peers, rounds=v.rounds, fanout=v.fanout,
                       consensus_slice="rotate", eval_every=4, outer=outer)  # fmt: skip
    return replace(config, **dict(v.sim))


def _flat(c: Contribution) -> torch.Tensor:
    return torch.cat([c.tensors[n].flatten() for n in sorted(c.tensors)])


class Probe:
    """Records, every round, how much of the peers' pseudo-gradients survives averaging.

    For a group of m peers whose deltas cover the same coordinates, `||mean d||^2 / mean ||d||^2` is
    1 when they agree and 1/m when they are independent noise; `c = (s*m - 1)/(m - 1)` is then their
    mean pairwise cosine. Groups are peers k with equal k % 4 (the slice groups of K=4; for DiLoCo, the
    same peers, so the two noise levels compare), and for DiLoCo also all peers together.
    """

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def record(self, deltas: list[Contribution], groups: int = 4) -> None:
        flat = [_flat(d) for d in deltas]
        row = {}
        for name, g in (("groups", groups), ("all", 1)):
            parts = [[flat[k] for k in range(len(flat)) if k % g == i] for i in range(g)]
            if any(len(p) < 2 or p[0].shape != q.shape for p in parts for q in p):
                continue
            ratios = [float(torch.stack(p).mean(0).square().sum() / torch.stack([x.square().sum() for x in p]).mean())
                      for p in parts]  # fmt: skip
            row[f"signal_{name}"] = sum(ratios) / len(ratios)
            row[f"peers_{name}"] = len(parts[0])
        row["delta_norm"] = float(torch.stack([f.norm() for f in flat]).mean())
        self.rows.append(row)


class ProbedSimulation(Simulation):
    """`Simulation` that also records the agreement of the peers' pseudo-gradients (`Probe`)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.probe = Probe()

    def _all_reduce(self, deltas: list[Contribution]) -> None:
        self.probe.record(deltas)
        super()._all_reduce(deltas)

    def _exchange(self, deltas: list[Contribution], r: int) -> object:
        self.probe.record(deltas)
        return super()._exchange(deltas, r)


class FullInnerSimulation(ProbedSimulation):
    """Diagnostic: every peer trains the whole model (full AdamW), but sends only its slice's delta.

    Against PPU it removes the frozen coordinates and keeps the per-coordinate averaging over N/K
    peers; against DiLoCo it keeps the full inner training and removes the other N - N/K peers'
    contributions to each coordinate.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        for optimizer in self.optimizers:
            optimizer.close()
        full = full_layout(self.shapes)
        self.optimizers = [SliceOptimizer(m, full, self.config.inner) for m in self.models]


class RestSignOptimizer(SliceOptimizer):
    """AdamW on one slice, and a stateless sign step (`scale` x the inner lr) on every other coordinate.

    The other coordinates' moves are never sent: the next round starts from the outer weights again. They
    only let the slice train against a model that moves as the other slices will, so that the K slices stop
    fitting the same error (the additivity probe). Stateless, so a real peer could apply each tensor's step
    in its backward hook and hold no gradient or moment for it (`state_bytes` counts the largest such tensor);
    it gives up PPU's saving of weight-gradient FLOPs, not its memory.
    """

    def __init__(self, model: torch.nn.Module, layout: SliceLayout, config: InnerConfig, scale: float) -> None:
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        super().__init__(model, full_layout(shapes), config)
        self.scale = scale
        self.masks: dict[str, torch.Tensor] = {}
        for o in self._owned:
            mask = torch.zeros(o.param.shape, dtype=torch.bool, device=o.param.device)
            region = layout.get(o.name)
            for view in region.views(mask) if region is not None else ():
                view.fill_(True)
            self.masks[o.name] = mask
        self.slice_bytes = sum(r.numel(shapes[n]) * 12 for n, r in layout.items())
        self.rest_bytes = max((int((~m).sum()) * 4 for m in self.masks.values()), default=0)

    def _adam_directions(self) -> Iterator[tuple[_Owned, torch.Tensor, torch.Tensor]]:
        """Count one step and advance every gradient's AdamW moments; yields (owned, gradient, the
        bias-corrected Adam direction), which `step` mixes with the sign step coordinate by coordinate."""
        beta1, beta2 = self.config.betas
        self.steps += 1
        bias1, bias2 = 1 - beta1**self.steps, 1 - beta2**self.steps
        for o, grad in self._grads():
            if o.exp_avg is None:
                o.exp_avg, o.exp_avg_sq = torch.zeros_like(grad), torch.zeros_like(grad)
            o.exp_avg.lerp_(grad, 1 - beta1)
            o.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            yield o, grad, (o.exp_avg / bias1) / ((o.exp_avg_sq / bias2).sqrt_().add_(1e-8))

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for o, grad, adam in self._adam_directions():
            mask = self.masks[o.name]
            if o.param.ndim >= 2 and self.config.weight_decay:
                o.param.data.mul_(torch.where(mask, 1 - lr * self.config.weight_decay, 1.0))
            o.param.data.add_(torch.where(mask, adam, self.scale * grad.sign()), alpha=-lr)

    def state_bytes(self) -> int:
        return self.slice_bytes + self.rest_bytes


class RestSignSimulation(ProbedSimulation):
    """Diagnostic: PPU whose peers also move the coordinates outside their slice, by a stateless sign step
    (`RestSignOptimizer`), and send only their slice. `scale` is set by the diag name (rest-sign-0.3)."""

    scale = 1.0

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        for optimizer in self.optimizers:
            optimizer.close()
        self.optimizers = [RestSignOptimizer(m, self.layouts[k], self.config.inner, self.scale)
                           for k, m in enumerate(self.models)]  # fmt: skip


def rest_sign(scale: float) -> type[Simulation]:
    return type(f"RestSign{scale}Simulation", (RestSignSimulation,), {"scale": scale})


class LookaheadSimulation(ProbedSimulation):
    """Each peer trains its slice against the other coordinates moved by the step its outer momentum
    predicts (Nesterov: -lr*m; NoLoCo: +m), instead of frozen at phi: a guess at where the other slices
    are heading, so that a slice does not fit errors the others fix in the same round. (Measured: far worse.)
    """

    def inner_start(self, k: int, phi: Params) -> Params:
        state, outer = self.states[k % len(self.states)], self.outer
        scale = -outer.lr if outer.rule == "nesterov" else 1.0
        start = {name: p + scale * state[name] for name, p in phi.items()}
        for name, region in self.layouts[k].items():
            region.scatter_(start[name], region.extract(phi[name]))
        return start


class SequentialSimulation(ProbedSimulation):
    """Every peer trains the same slice, round % K, so slices take turns instead of being added together.

    Each peer keeps the AdamW moments of every slice it trained (as if parked in host memory) and loads
    them back when that slice's turn comes; `reset = True` starts each turn from fresh moments instead.
    The inner lr schedule follows the peer's own step count, as always.
    """

    reset = False

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.parked: list[dict[int, dict]] = [{} for _ in self.models]
        self.turn = [k % len(self.all_slices) for k in range(len(self.models))]

    def run_round(self, r: int) -> None:
        want = r % len(self.all_slices)
        for k, model in enumerate(self.models):
            if self.turn[k] != want:
                old = self.optimizers[k]
                self.parked[k][self.turn[k]] = {n: t.clone() for n, t in old.state_dict().items()}
                old.close()
                new = SliceOptimizer(model, self.all_slices[want], self.config.inner)
                if want in self.parked[k] and not self.reset:
                    new.load_state_dict(self.parked[k][want])
                new.steps = r * self.config.inner.steps_per_round
                self.optimizers[k], self.layouts[k], self.turn[k] = new, self.all_slices[want], want
        super().run_round(r)


class SequentialResetSimulation(SequentialSimulation):
    reset = True


class AdditivitySimulation(ProbedSimulation):
    """Diagnostic (all-reduce methods): do the slices' parts of one round's update add up?

    Before each outer step, the validation loss (2 batches) at phi, at phi minus each part of the averaged
    pseudo-gradient alone, and at phi minus all of it. Parts are the K=4 `units` slices without the shared
    head, plus the head. `additivity` = combined gain / sum of the parts' gains: about 1 when the parts
    improve different things, well under 1 when each part fits the same error (the sum overshoots).
    """

    def _all_reduce(self, deltas: list[Contribution]) -> None:
        mean = CoordinateMean(self.phis[0])
        for d in deltas:
            mean.add(d)
        additivity = self._additivity(self.phis[0], mean.mean())
        super()._all_reduce(deltas)
        self.probe.rows[-1].update(additivity)

    def _additivity(self, phi: Params, delta: Params) -> dict:
        config = replace(self.config, eval_batches=2)
        head = set(head_parameters(config.model))
        cuts = partition(config.model, SliceConfig(num_slices=4))
        parts = [{n: r for n, r in lay.items() if n not in head} for lay in cuts] + [{n: Region.whole(
            tuple(phi[n].shape)) for n in head}]  # fmt: skip

        def loss_after(layout: SliceLayout | None) -> float:
            moved = {n: t.clone() for n, t in phi.items()}
            for name in moved if layout is None else layout:
                region = layout[name] if layout is not None else Region.whole(tuple(phi[name].shape))
                region.scatter_(moved[name], region.extract(phi[name]) - region.extract(delta[name]))
            return evaluate(self.model, moved, self.corpus, config)

        base = evaluate(self.model, phi, self.corpus, config)
        gains = [base - loss_after(p) for p in parts]
        combined = base - loss_after(None)
        return {"base": base, "part_gains": gains, "combined_gain": combined,
                "additivity": combined / sum(gains) if sum(gains) else float("nan")}  # fmt: skip


class DelayedOverlapSimulation(ProbedSimulation):
    """Diagnostic: the daemon's overlap before issue 13 changed it. Round r's whole outer step (own delta and
    partners' terms) lands after round r+1 trained, from weights that lacked it (a DiLoCoX-style one-round
    delay); the last round's step lands at the end, so every token counts."""

    def run_round(self, r: int) -> None:
        if not (self.method.startswith("gossip") and self.config.overlap):
            return super().run_round(r)
        exchange, self.in_flight = self.in_flight, self._exchange(self.train_peers(r), r)
        if exchange is not None:
            self._gossip(exchange)
        if r + 1 == self.config.rounds:
            last, self.in_flight = self.in_flight, None
            self._gossip(last)
        return None


class EagerOverlapSimulation(DelayedOverlapSimulation):
    """Diagnostic: the delayed overlap, but each peer's next inner round starts from its weights after an eager
    outer step with its own delta alone (on copies; the real step lands later with every term), and its
    pseudo-gradient is taken from that start. It recovered about half of what the delay cost; the simulator's
    and the daemon's overlap now take the own step for real instead (`SimConfig.overlap`)."""

    def inner_start(self, k: int, phi: Params) -> Params:
        start = {n: t.clone() for n, t in phi.items()}
        if self.in_flight is not None:
            state = {n: t.clone() for n, t in self.states[k].items()}
            gossip_step(start, state, self.in_flight.deltas[k], [], [], self.outer)
        return start


class FreshWeightsOverlapSimulation(ProbedSimulation):
    """Diagnostic: the overlap of `SimConfig.overlap`, but the weight slice is sent after this round's outer step
    (as old as the receiver's weights when it mixes them) instead of before it. (Measured: slightly worse.)"""

    def run_round(self, r: int) -> None:
        if not (self.method.startswith("gossip") and self.config.overlap):
            return super().run_round(r)
        deltas = self.train_peers(r)
        self._gossip(self.in_flight, own=deltas)
        self.in_flight = self._exchange(deltas, r)
        return None


DIAGNOSTICS: dict[str, type[Simulation]] = {
    "": ProbedSimulation, "full-inner": FullInnerSimulation, "additivity": AdditivitySimulation,
    "sequential": SequentialSimulation, "sequential-reset": SequentialResetSimulation,
    "lookahead": LookaheadSimulation, "eager-overlap": EagerOverlapSimulation,
    "delayed-overlap": DelayedOverlapSimulation, "fresh-weights": FreshWeightsOverlapSimulation,
    "rest-sign": rest_sign(1.0), "rest-sign-0.3": rest_sign(0.3), "rest-sign-0.1": rest_sign(0.1),
}


def run_variant(v: Variant) -> dict:
    """Run one variant in this process (one torch thread); the JSON row the cache keeps."""
    torch.set_num_threads(1)
    cpu = time.process_time()
    sim = DIAGNOSTICS[v.diag](v.method, load_corpus(), build_config(v))
    start, done = time.perf_counter(), [0]

    def progress() -> None:
        done[0] += 1
        if done[0] % 4 == 0:
            print(f"    {v.key()}: round {done[0]}/{v.rounds} after {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)

    result = sim.run(progress)
    row = {f.name: getattr(result, f.name) for f in fields(result)}
    row.update(key=v.key(), variant={f.name: getattr(v, f.name) for f in fields(v)}, probe=sim.probe.rows,
               cpu_seconds=time.process_time() - cpu)  # fmt: skip
    return row
