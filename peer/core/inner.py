"""The inner loop: H AdamW steps on this peer's slice, everything else frozen, full forward pass.

`SliceOptimizer` keeps gradients and AdamW moments for the owned coordinates only. Under the
`blocks` cut unowned parameters have `requires_grad=False`, so autograd neither computes nor stores
their gradients and stops below the lowest trainable block. Under the `units` cut every matrix is
partly owned: its linear layer runs through `RowGradLinear`, which computes the weight gradient of
the owned output rows only (dW[rows] = dY[:, rows]^T X) straight into a compact buffer, so neither
the FLOPs nor the memory of unowned weight gradients are spent. Other partly owned tensors (norm
weights) get their full gradient cut down to the owned part by a post-accumulate hook.

With `rest_step` > 0 the coordinates outside the slice are not frozen: every step moves them by
`rest_step` x lr x sign(gradient), applied in each parameter's post-accumulate hook and then dropped,
so they hold neither moments nor a gradient beyond the one tensor being stepped. Their moves are never
sent (the round's pseudo-gradient covers the slice only) and the next round starts from phi again.
They let the slice train against a model that moves roughly as the other slices will, so K slices stop
each fitting the same error alone (benchmarks/long_horizon: the additivity probe and the rest-step
rows). The price is the weight-gradient FLOPs of the whole model: RowGradLinear is not used then.

Mixed precision (a bfloat16 run, `cast_parameters`): the model's parameters are bf16, frozen and rest
coordinates included; the owned coordinates also get an fp32 master (`begin_round` copies it from the
round's starting weights, the fp32 phi, not from their bf16 rounding), gradients of the owned part are gathered in fp32,
AdamW steps the master and writes it back rounded into the bf16 parameter, and the round's pseudo-gradient
is taken from the master (`pseudo_gradient`), so H small steps are not lost to bf16 rounding. A float32
model takes none of these paths: its numbers are what they were before mixed precision existed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.adamw import adamw

from peer.core.model import Transformer
from peer.core.slices import Region, SliceLayout, trains_input_embedding


@dataclass(frozen=True, kw_only=True, slots=True)
class InnerConfig:
    """Inner optimiser of every peer; part of the manifest so peers never desync."""

    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    """Decoupled; applied to matrices only (not norms)."""
    warmup_steps: int = 50
    total_steps: int = 10_000
    """Length of the cosine schedule in a peer's own inner steps; past it the lr stays at the floor."""
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    """Max global norm of the slice's gradient; 0 disables clipping."""
    steps_per_round: int = 20
    """H: inner steps between two outer exchanges."""
    batch_size: int = 8
    grad_accum: int = 1
    rest_step: float = 0.3
    """Step of the coordinates outside the slice, as a fraction of the inner lr (sign of the gradient, no
    state, reset every round; module docstring). 0 freezes them, as in the PPU paper; DiLoCo has no rest.
    0.3 from benchmarks/long_horizon (16 rounds, PPU at lr 0.7: 0.1 -> 2.741, 0.3 -> 2.053, 0.5 -> 2.088,
    1.0 -> 2.134; frozen at its best lr 0.25: 2.270; DiLoCo 2.086)."""

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"inner lr must be positive and finite, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        for name in ("steps_per_round", "batch_size", "grad_accum", "total_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (0 <= self.rest_step <= 1 and math.isfinite(self.rest_step)):
            raise ValueError(f"rest_step must lie in [0, 1], got {self.rest_step}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or self.grad_clip < 0:
            raise ValueError("warmup_steps >= 0, 0 <= min_lr_ratio <= 1 and grad_clip >= 0 are required")


def lr_at(step: int, config: InnerConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr_ratio * lr` at `total_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class RowGradLinear(torch.autograd.Function):
    """y = x W^T whose backward gives dX in full but the weight gradient of `rows` only.

    The weight itself is frozen; `anchor` is a scalar leaf that makes autograd call this backward
    even when nothing else upstream needs a gradient. The owned rows' gradient goes to `sink`.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.bfloat16)
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        anchor: torch.Tensor,
        rows: torch.Tensor | slice,
        sink: Callable[[torch.Tensor], None],
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.rows, ctx.sink = rows, sink
        return F.linear(x, weight)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dy_rows = dy2[:, ctx.rows] if isinstance(ctx.rows, slice) else dy2.index_select(1, ctx.rows)
        ctx.sink((dy_rows.t() @ x.reshape(-1, x.shape[-1])).float())  # (owned rows, in)
        dx = dy @ weight.to(dy.dtype) if ctx.needs_input_grad[0] else None
        return dx, None, torch.zeros((), device=dy.device), None, None


@dataclass(slots=True)
class _Owned:
    """One owned part of a parameter: the view to update, its gradient buffer, its AdamW moments."""

    name: str
    param: nn.Parameter
    region: Region
    compact: bool
    grad: torch.Tensor | None = None
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    master: torch.Tensor | None = None
    """fp32 copy of the owned part (compact shape) when the parameter is held in a lower precision."""


class SliceOptimizer:
    """AdamW over the coordinates of one slice; the model's other parameters are frozen."""

    def __init__(self, model: Transformer, layout: SliceLayout, config: InnerConfig) -> None:
        self.config = config
        self.steps = 0
        self._owned: list[_Owned] = []
        self._hooks = []
        params = dict(model.named_parameters())
        unknown = set(layout) - set(params)
        if unknown:
            raise ValueError(f"slice names parameters the model lacks: {sorted(unknown)[:3]}")
        rest = config.rest_step > 0
        model.detach_input_embedding = not rest and not trains_input_embedding(layout)
        device = next(model.parameters()).device
        self.mixed = next(model.parameters()).dtype != torch.float32
        """bf16 parameters: fp32 masters, gradients and moments for the owned part (module docstring)."""
        self._anchor = torch.zeros((), device=device, requires_grad=True)
        self._patched: list[nn.Linear] = []
        self.rest_bytes = 0
        """The largest gradient of coordinates outside the slice alive at once (rest_step > 0)."""
        self.reduce: Callable[[list[torch.Tensor]], None] = lambda grads: None  # --gpus N: averages over ranks
        linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        for name, param in params.items():
            region = layout.get(name)
            param.requires_grad_(region is not None or rest)
            param.grad = None
            whole = region is not None and region.is_whole(tuple(param.shape))
            if rest and not whole:
                owned = None if region is None else _Owned(name, param, region, compact=True)
                self._hooks.append(param.register_post_accumulate_grad_hook(self._rest_hook(owned)))
                self.rest_bytes = max(self.rest_bytes, param.numel() * 4)
                if owned is not None:
                    self._owned.append(owned)
                continue
            if region is None:
                continue
            owned = _Owned(name, param, region, compact=not whole)
            if owned.compact and region.dim == 0 and name in linears:
                param.requires_grad_(False)
                self._patch(linears[name], owned)
            elif owned.compact or self.mixed:  # a bf16 whole parameter: its gradient goes to an fp32 buffer
                self._hooks.append(param.register_post_accumulate_grad_hook(self._compact_hook(owned)))
            self._owned.append(owned)

    def _patch(self, linear: nn.Linear, owned: _Owned) -> None:
        ranges = owned.region.ranges
        # one contiguous range is sliced as a view; several (q|k|v heads, gate|up) gathered
        rows = slice(*ranges[0]) if len(ranges) == 1 else torch.cat([torch.arange(a, b) for a, b in ranges])
        rows = rows.to(owned.param.device) if isinstance(rows, torch.Tensor) else rows
        anchor = self._anchor

        def sink(grad: torch.Tensor) -> None:
            owned.grad = grad if owned.grad is None else owned.grad.add_(grad)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return RowGradLinear.apply(x, linear.weight, anchor, rows, sink)

        linear.forward = forward
        self._patched.append(linear)

    @staticmethod
    def _compact_hook(owned: _Owned) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            part = (owned.region.extract(param.grad) if owned.compact else param.grad).float()
            owned.grad = part if owned.grad is None else owned.grad.add_(part)
            param.grad = None

        return hook

    def _rest_hook(self, owned: _Owned | None) -> Callable[[torch.Tensor], None]:
        """Keep the owned part's gradient (if any) and step everything else by its sign, then drop it."""
        config = self.config

        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            param.grad = None
            if owned is not None:
                part = owned.region.extract(grad).float()
                owned.grad = part if owned.grad is None else owned.grad.add_(part)
                for view in owned.region.views(grad):
                    view.zero_()  # sign(0) = 0: the owned coordinates move with AdamW only
            self.reduce([grad])  # --gpus N: every rank steps by the sign of the whole micro-batch's gradient
            step = lr_at(self.steps, config) * config.rest_step / config.grad_accum
            with torch.no_grad():
                param.add_(grad.sign_().to(param.dtype), alpha=-step)

        return hook

    def _grads(self) -> Iterator[tuple[_Owned, torch.Tensor]]:
        for o in self._owned:
            grad = o.grad if o.compact or self.mixed else o.param.grad
            if grad is not None:
                yield o, grad

    def zero_grad(self) -> None:
        for o in self._owned:
            o.grad = None
            o.param.grad = None
        self._anchor.grad = None

    @torch.no_grad()
    def begin_round(self, start: Mapping[str, torch.Tensor] | None = None) -> None:
        """Mixed precision: the fp32 masters restart from `start` (the round's starting weights, phi, in fp32:
        else the pseudo-gradient would carry phi's bf16 rounding error), or from the parameters when None.
        A no-op for a float32 model, whose parameters are their own masters."""
        if not self.mixed:
            return
        for o in self._owned:
            whole = o.param.data if start is None else start[o.name]
            value = o.region.extract(whole) if o.compact else whole
            value = value.to(o.param.device)
            if o.master is None:
                o.master = value.to(torch.float32, copy=True)  # never an alias of phi
            else:
                o.master.copy_(value)

    @torch.no_grad()
    def pseudo_gradient(self, phi: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """delta = phi - theta on the owned coordinates, packed, fp32, on the model's device; theta is the
        fp32 master under mixed precision (not its bf16 rounding), the parameter itself otherwise (then the
        numbers are exactly `slices.pseudo_gradient`'s)."""
        out = {}
        for o in self._owned:
            start = o.region.extract(phi[o.name]).to(o.param.device).float()
            theta = o.master if o.master is not None else o.region.extract(o.param.data)
            out[o.name] = start - theta
        return out

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale the slice's gradient to global norm <= max_norm; returns the norm before clipping."""
        grads = [g for _, g in self._grads()]
        self.reduce(grads)  # --gpus N (peer/node/ranks.py): the step's whole gradient on every rank, then clipped
        if not grads:
            return 0.0
        norm = torch.nn.utils.get_total_norm(grads)
        if max_norm > 0:
            scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for grad in grads:
                grad.mul_(scale)
        return float(norm)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One AdamW step over the owned coordinates, by torch's own implementation (foreach; fused on
        CUDA): compact parts are packed, stepped and written back, whole parameters stepped in place.
        Matrices decay, norms and biases do not. Bias correction counts this optimiser's steps."""
        self.steps += 1
        self._anchor.grad = None  # RowGradLinear's zero for it: nothing to keep between steps
        beta1, beta2 = self.config.betas
        groups: dict[bool, list[tuple[_Owned, torch.Tensor]]] = {True: [], False: []}  # decays -> (owned, grad)
        for o, grad in self._grads():
            if o.exp_avg is None:
                o.exp_avg, o.exp_avg_sq = torch.zeros_like(grad), torch.zeros_like(grad)
            groups[o.param.ndim >= 2].append((o, grad))
        for decay, owned in groups.items():
            if not owned:
                continue
            params = [self._stepped(o) for o, _ in owned]
            fused = params[0].is_cuda
            # the steps so far; adamw counts this one in place (on the device when fused, as it requires)
            counts = [torch.tensor(float(self.steps - 1), device=p.device if fused else "cpu") for p in params]
            adamw(params, [g for _, g in owned], [o.exp_avg for o, _ in owned], [o.exp_avg_sq for o, _ in owned],
                  [], counts, foreach=not fused, fused=fused, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
                  weight_decay=self.config.weight_decay if decay else 0.0, eps=1e-8, maximize=False)  # fmt: skip
            for (o, _), packed in zip(owned, params):
                if o.compact:
                    o.region.scatter_(o.param.data, packed)
                elif self.mixed:
                    o.param.data.copy_(packed)  # the master, rounded into the bf16 parameter

    def _stepped(self, o: _Owned) -> torch.Tensor:
        """What AdamW steps for `o`: its fp32 master (mixed precision), its packed copy, or the parameter."""
        if self.mixed:
            if o.master is None:
                raise RuntimeError("begin_round first: a bf16 model's optimiser has no fp32 master yet")
            return o.master
        return o.region.extract(o.param.data) if o.compact else o.param.data

    def state_bytes(self) -> int:
        """Bytes of gradient buffers, AdamW moments and (mixed precision) fp32 masters this optimiser holds (or
        will, after a step)."""
        per = 16 if self.mixed else 12
        return sum(o.region.numel(tuple(o.param.shape)) * per for o in self._owned) + self.rest_bytes

    def held(self) -> dict[str, list[torch.Tensor]]:
        """Every tensor this optimiser holds, by kind (peer/core/memory.py counts them): the owned part's
        gradients, fp32 masters, and AdamW moments with the 4-byte anchor."""
        out: dict[str, list[torch.Tensor]] = {"grads": [], "master": [], "optimizer": [self._anchor]}
        for o in self._owned:
            grad = o.grad if o.compact or self.mixed else o.param.grad
            out["grads"] += [] if grad is None else [grad]
            out["master"] += [] if o.master is None else [o.master]
            out["optimizer"] += [t for t in (o.exp_avg, o.exp_avg_sq) if t is not None]
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor map (safetensors-friendly) of the moments and the step count."""
        state = {"steps": torch.tensor(self.steps, dtype=torch.int64)}
        for o in self._owned:
            if o.exp_avg is not None:
                state[f"{o.name}.exp_avg"] = o.exp_avg
                state[f"{o.name}.exp_avg_sq"] = o.exp_avg_sq
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.steps = int(state["steps"])
        for o in self._owned:
            shape = o.region.compact_shape(tuple(o.param.shape))
            for key in ("exp_avg", "exp_avg_sq"):
                value = state.get(f"{o.name}.{key}")
                if value is not None and tuple(value.shape) != shape:
                    raise ValueError(f"{o.name}.{key} has shape {tuple(value.shape)}, expected {shape}")
                setattr(o, key, None if value is None else value.to(o.param.device, torch.float32).clone())

    def close(self) -> None:
        """Undo hooks and patched layers, so the model can take another slice."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for linear in self._patched:
            del linear.forward
        self._patched.clear()


@dataclass(frozen=True, slots=True)
class InnerStats:
    mean_loss: float
    tokens: int
    steps: int


Batches = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
"""(step, micro) -> (inputs, targets): where a peer's tokens come from."""


def inner_round(
    model: Transformer, optimizer: SliceOptimizer, batches: Batches, device: torch.device,
    start: Mapping[str, torch.Tensor] | None = None,
) -> InnerStats:
    """Run H inner steps on the slice (theta moves; phi is untouched elsewhere). `start`: the weights the model
    was loaded from (phi), where a bf16 model's fp32 masters begin (`SliceOptimizer.begin_round`)."""
    config = optimizer.config
    model.train()
    losses, tokens = [], 0
    optimizer.begin_round(start)
    for _ in range(config.steps_per_round):
        step = optimizer.steps
        optimizer.zero_grad()
        for micro in range(config.grad_accum):
            x, y = batches(step, micro)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = model.loss(x, y)
            (loss / config.grad_accum).backward()
            losses.append(loss.detach())
            tokens += x.numel()
        optimizer.clip_grad_norm(config.grad_clip)
        optimizer.step(lr_at(step, config))
    mean_loss = float(torch.stack(losses).mean())
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"inner loss became {mean_loss}; lower the inner lr")
    return InnerStats(mean_loss=mean_loss, tokens=tokens, steps=config.steps_per_round)
