"""The parameter partition of Partial Parameter Updates: which coordinates each slice trains.

A slice is a `SliceLayout`: for every parameter it owns any part of, a `Region` (one or more index
ranges along one dim). Three cuts, chosen in the run config:

- `blocks`: slice k owns a group of consecutive transformer blocks, whole. The input embedding goes
  with the lowest group, the final norm (and an untied head) with the highest. Blocks below a
  slice's lowest block are frozen, so autograd never builds a backward graph through them.
- `units`: slice k owns a share of every matrix's output units: its attention heads in q, k and v,
  its hidden units in the MLP, a contiguous share of every d_model-sized output. Every slice needs
  the full activation backward, but only its share of weight gradients and optimiser state. With more
  slices than heads, each head's rows are shared out evenly (`head_unit`).
- `neurons`: slice k owns whole heads and whole MLP hidden units, on both sides: the rows that compute
  them and the columns of the output projections that read them (a tensor-parallel shard, the way PPU's
  reviewers describe its subsets); norm weights are trained by every slice. The output projections'
  owned columns get their gradient cut from the whole one (no column kernel). Measured worse than
  `units` (benchmarks/long_horizon: a whole neuron lets every slice refit the same error alone).

Costs are estimated per token from shapes, so they apply to models too large to instantiate here;
`tests/test_subsets.py` checks them against torch's FLOP counter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from peer.core.model import ModelConfig

CUTS = ("blocks", "units", "neurons")


@dataclass(frozen=True, kw_only=True, slots=True)
class SliceConfig:
    """How the run cuts parameters into slices; part of the manifest."""

    num_slices: int = 4
    """K: peers are spread over K slices; each slice is trained by about N/K peers."""
    cut: Literal["blocks", "units", "neurons"] = "units"
    """`units` by default: from a fresh init, one block group trained alone (`blocks`) learns far
    slower (simulator: 3.2 vs 2.6 nats after 10 rounds), while a share of every matrix keeps up."""
    shared_head: bool = True
    """Every slice also trains the output head (the tied embedding, or the untied head) and the final
    norm. Without it, peers whose slice lacks the head cannot learn from a fresh init: a frozen
    N(0, 0.02) head caps logits near +-2 (measured: their inner loss stays at 5.2 nats). Slices above
    block 0 take the head's gradient from the output side only, so they still skip the backward below
    their lowest block."""

    def __post_init__(self) -> None:
        if self.num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {self.num_slices}")
        if self.cut not in CUTS:
            raise ValueError(f"unknown cut {self.cut!r}; choose one of {', '.join(CUTS)}")


@dataclass(frozen=True, slots=True)
class Region:
    """Index ranges [start, stop) along `dim` of one parameter; their union is what a slice owns."""

    dim: int
    ranges: tuple[tuple[int, int], ...]

    @classmethod
    def whole(cls, shape: tuple[int, ...]) -> Region:
        return cls(0, ((0, shape[0]),)) if shape else cls(0, ())

    def is_whole(self, shape: tuple[int, ...]) -> bool:
        return len(shape) > 0 and self.dim == 0 and self.ranges == ((0, shape[0]),)

    def compact_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the owned part packed together: `dim` shrinks to the owned length."""
        out = list(shape)
        out[self.dim] = sum(stop - start for start, stop in self.ranges)
        return tuple(out)

    def numel(self, shape: tuple[int, ...]) -> int:
        return int(torch.Size(self.compact_shape(shape)).numel())

    def fraction(self, shape: tuple[int, ...]) -> float:
        return sum(stop - start for start, stop in self.ranges) / shape[self.dim]

    def views(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Writable views of the owned parts of `tensor`, one per range."""
        return [tensor.narrow(self.dim, start, stop - start) for start, stop in self.ranges]

    def extract(self, tensor: torch.Tensor) -> torch.Tensor:
        """The owned part of `tensor`, packed into a new tensor of `compact_shape`."""
        parts = self.views(tensor)
        return parts[0].clone() if len(parts) == 1 else torch.cat(parts, dim=self.dim)

    def scatter_(self, target: torch.Tensor, compact: torch.Tensor, *, add: bool = False) -> None:
        """Write (or add) a packed tensor back into the owned part of `target`, in place."""
        offset = 0
        for view in self.views(target):
            length = view.shape[self.dim]
            piece = compact.narrow(self.dim, offset, length).to(view.dtype)
            view.add_(piece) if add else view.copy_(piece)
            offset += length


SliceLayout = dict[str, Region]


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter, without allocating the model."""
    from peer.core.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def block_of(name: str) -> int | None:
    """The transformer block a parameter belongs to, or None for embeddings, final norm and head."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


def partition(config: ModelConfig, slices: SliceConfig) -> list[SliceLayout]:
    """The K slice layouts of a run; every coordinate is owned by exactly one slice."""
    shapes = parameter_shapes(config)
    if slices.cut == "blocks":
        layouts = _cut_blocks(config, slices.num_slices, shapes)
    elif slices.cut == "neurons":
        layouts = _cut_neurons(config, slices.num_slices, shapes)
    else:
        layouts = _cut_units(config, slices.num_slices, shapes)
    if slices.shared_head:
        for name in head_parameters(config):
            for layout in layouts:
                layout[name] = Region.whole(shapes[name])
    return layouts


def head_parameters(config: ModelConfig) -> tuple[str, ...]:
    """The parameters that map the last hidden state to logits."""
    return ("final_norm.weight", "embed.weight" if config.tie_embeddings else "head.weight")


def trains_input_embedding(layout: SliceLayout) -> bool:
    """Whether a slice needs the gradient of the input embedding lookup: only if it owns block 0.

    Higher slices that share a tied embedding train it as the output head only, so their backward
    stops at their lowest block.
    """
    return any(block_of(name) == 0 for name in layout)


def _cut_blocks(config: ModelConfig, k: int, shapes: dict[str, tuple[int, ...]]) -> list[SliceLayout]:
    if k > config.n_layers:
        raise ValueError(f"the blocks cut needs num_slices <= n_layers ({k} > {config.n_layers})")
    layouts: list[SliceLayout] = [{} for _ in range(k)]
    for name, shape in shapes.items():
        block = block_of(name)
        if block is not None:
            owner = block * k // config.n_layers
        elif name.startswith(("embed.", "pos_embed.")):
            owner = 0
        else:  # final_norm, untied head
            owner = k - 1
        layouts[owner][name] = Region.whole(shape)
    return layouts


def _even_ranges(length: int, k: int, unit: int = 1) -> list[tuple[int, int]]:
    """Split [0, length) into k contiguous ranges, boundaries on multiples of `unit` where possible."""
    units = length // unit
    if units < k:
        raise ValueError(f"cannot split {units} units of size {unit} into {k} slices")
    bounds = [i * units // k * unit for i in range(k)] + [length]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


def head_unit(config: ModelConfig, k: int) -> int:
    """Rows of q (k, v) that go to a slice together: a whole head, or a part of one when K exceeds the heads.

    More slices than heads (K=8 on the 4-head `tiny`) split every head evenly; a split head trains fine,
    its rotary pairs just straddle two slices. Anything else (K=3 of 4 heads) cannot be cut evenly.
    """
    if config.n_heads % k == 0:
        return config.head_dim
    if k % config.n_heads == 0 and config.head_dim % (k // config.n_heads) == 0:
        return config.head_dim // (k // config.n_heads)
    raise ValueError(f"cannot share n_heads={config.n_heads} (head_dim {config.head_dim}) among {k} slices evenly")


def _unit_region(name: str, shape: tuple[int, ...], config: ModelConfig, k: int, s: int) -> Region:
    """Slice s's share of the output units of one parameter."""
    if name.endswith("attn.qkv.weight"):  # rows [q | k | v], head_dim rows per head
        start, stop = _even_ranges(config.d_model, k, head_unit(config, k))[s]
        c = config.d_model
        return Region(0, tuple((part * c + start, part * c + stop) for part in range(3)))
    if name.endswith("mlp.up.weight") and config.mlp == "swiglu":  # rows [gate | up]
        start, stop = _even_ranges(config.hidden, k)[s]
        return Region(0, ((start, stop), (config.hidden + start, config.hidden + stop)))
    if name in ("embed.weight", "pos_embed.weight"):  # outputs are the d_model features
        return Region(1, (_even_ranges(shape[1], k)[s],))
    return Region(0, (_even_ranges(shape[0], k)[s],))


def _cut_units(config: ModelConfig, k: int, shapes: dict[str, tuple[int, ...]]) -> list[SliceLayout]:
    head_unit(config, k)  # raises early when the heads cannot be shared evenly
    return [{name: _unit_region(name, shape, config, k, s) for name, shape in shapes.items()} for s in range(k)]


def _neuron_region(name: str, shape: tuple[int, ...], config: ModelConfig, k: int, s: int) -> Region | None:
    """Slice s's heads and hidden units, on both sides: the rows that compute them, the columns that read them.

    None for the parameters no head or hidden unit owns (norm weights, the input embedding), which
    every slice trains whole.
    """
    if name.endswith("attn.out.weight"):  # columns [head 0 | head 1 | ...]
        return Region(1, (_even_ranges(config.d_model, k, head_unit(config, k))[s],))
    if name.endswith("mlp.down.weight"):  # columns = hidden units
        return Region(1, (_even_ranges(config.hidden, k)[s],))
    if name.endswith(("attn.qkv.weight", "mlp.up.weight")) or name == "head.weight":
        return _unit_region(name, shape, config, k, s)
    return None


def _cut_neurons(config: ModelConfig, k: int, shapes: dict[str, tuple[int, ...]]) -> list[SliceLayout]:
    head_unit(config, k)
    layouts: list[SliceLayout] = [{} for _ in range(k)]
    for name, shape in shapes.items():
        for s, layout in enumerate(layouts):
            region = _neuron_region(name, shape, config, k, s)
            layout[name] = Region.whole(shape) if region is None else region
    return layouts


def slice_numel(layout: SliceLayout, shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(region.numel(shapes[name]) for name, region in layout.items())


def full_layout(shapes: dict[str, tuple[int, ...]]) -> SliceLayout:
    """The layout that owns everything: DiLoCo and DDP peers."""
    return {name: Region.whole(shape) for name, shape in shapes.items()}


@dataclass(frozen=True, kw_only=True, slots=True)
class SliceCost:
    """What training one slice costs a peer, next to what the full model costs."""

    params: int
    """Trainable coordinates."""
    state_bytes: int
    """fp32 gradient + AdamW moments (3 x 4 bytes per trainable coordinate)."""
    backward_flops_per_token: float
    """Backward FLOPs per trained token, as this implementation spends them."""
    ideal_backward_flops_per_token: float
    """Backward FLOPs if every weight gradient were computed for owned coordinates only."""


_STATE_BYTES_PER_COORD = 12  # fp32 grad + exp_avg + exp_avg_sq


def _matrices(config: ModelConfig) -> list[tuple[str, int, int]]:
    """(name, out, in) of every weight matrix that a token passes through."""
    c, h = config.d_model, config.hidden
    up_rows = 2 * h if config.mlp == "swiglu" else h
    mats = []
    for b in range(config.n_layers):
        p = f"blocks.{b}."
        mats += [(p + "attn.qkv.weight", 3 * c, c), (p + "attn.out.weight", c, c)]
        mats += [(p + "mlp.up.weight", up_rows, c), (p + "mlp.down.weight", c, h)]
    head = "embed.weight" if config.tie_embeddings else "head.weight"
    mats.append((head, config.vocab_size, c))
    return mats


def forward_flops_per_token(config: ModelConfig) -> float:
    """Matmul FLOPs of one forward token (attention core counted at full T, as SDPA's math path runs)."""
    attention = 4 * config.seq_len * config.d_model * config.n_layers
    return attention + sum(2 * out * inp for _, out, inp in _matrices(config))


def slice_cost(config: ModelConfig, layout: SliceLayout, *, rest_moves: bool = False) -> SliceCost:
    """Cost of training `layout`; with `full_layout` it is the full model's (DiLoCo's) cost.

    `rest_moves` (InnerConfig.rest_step > 0): the coordinates outside the slice take sign steps, so the
    backward computes every weight gradient, as the full model's does; the state stays the slice's.
    """
    shapes = parameter_shapes(config)
    if rest_moves:
        full = slice_cost(config, full_layout(shapes))
        params = slice_numel(layout, shapes)
        return replace(full, params=params, state_bytes=params * _STATE_BYTES_PER_COORD)
    blocks = [block_of(n) for n in layout]
    lowest = min((b for b in blocks if b is not None), default=None)
    if trains_input_embedding(layout):
        lowest = 0  # the input embedding's gradient needs the backward through every block
    actual = ideal = 0.0
    for name, out, inp in _matrices(config):
        block = block_of(name)
        needs_input_grad = lowest is not None and (block is None or block >= lowest)
        if needs_input_grad:
            actual += 2 * out * inp
            ideal += 2 * out * inp
        region = layout.get(name)
        if region is not None:
            share = region.fraction(shapes[name])
            # block linears owned by rows run RowGradLinear; the head's gradient is computed whole
            row_linear = region.dim == 0 and block_of(name) is not None
            actual += 2 * out * inp * (share if row_linear else 1.0)
            ideal += 2 * out * inp * share
    if lowest is not None:
        core = 8 * config.seq_len * config.d_model * (config.n_layers - lowest)
        actual += core
        ideal += core
    params = slice_numel(layout, shapes)
    return SliceCost(
        params=params,
        state_bytes=params * _STATE_BYTES_PER_COORD,
        backward_flops_per_token=actual,
        ideal_backward_flops_per_token=ideal,
    )


Params = dict[str, torch.Tensor]
"""Named tensors: a model's weights, or one slice's packed coordinates."""


@dataclass(frozen=True, slots=True)
class Contribution:
    """Tensors on the coordinates of one layout, packed per parameter (`Region.extract`)."""

    layout: SliceLayout
    tensors: Params
    source: str | None = None
    """Who sent it (a peer id), where that matters: robust aggregation reports per sender (`peer/node/trust.py`)."""


def pseudo_gradient(phi: Params, theta: Params, layout: SliceLayout) -> Contribution:
    """delta = phi - theta on the slice's coordinates, packed."""
    return Contribution(
        layout, {name: region.extract(phi[name]) - region.extract(theta[name]) for name, region in layout.items()}
    )


def weight_slice(phi: Params, layout: SliceLayout) -> Contribution:
    """The outer weights of one slice, packed: what a peer sends for the consensus term."""
    return Contribution(layout, {name: region.extract(phi[name]) for name, region in layout.items()})
