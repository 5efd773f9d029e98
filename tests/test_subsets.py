"""Slices: every coordinate owned once, frozen parts stay frozen, costs match parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from peer.core.inner import InnerConfig, SliceOptimizer
from peer.core.model import ModelConfig, Transformer
from peer.core.slices import Region, SliceConfig, full_layout, head_parameters, parameter_shapes, partition, slice_cost

pytestmark = pytest.mark.timeout(60)

MODEL = ModelConfig(d_model=32, n_layers=4, n_heads=4, seq_len=16)
FROZEN = InnerConfig(rest_step=0.0)
"""The slice as the PPU paper trains it, everything else frozen: what these tests measure (the default moves the
rest by sign steps, tests/test_inner.py)."""


@pytest.mark.parametrize("cut", ["blocks", "units"])
@pytest.mark.parametrize("shared_head", [True, False])
def test_every_coordinate_is_owned_once_and_the_head_by_all(cut: str, shared_head: bool) -> None:
    shapes = parameter_shapes(MODEL)
    owners = {name: torch.zeros(shape) for name, shape in shapes.items()}
    for layout in partition(MODEL, SliceConfig(num_slices=4, cut=cut, shared_head=shared_head)):
        for name, region in layout.items():
            for view in region.views(owners[name]):
                view += 1
    for name, count in owners.items():
        expected = 4 if shared_head and name in head_parameters(MODEL) else 1
        assert torch.all(count == expected), name


def test_units_cut_keeps_heads_whole() -> None:
    layout = partition(MODEL, SliceConfig(num_slices=2, cut="units"))[1]
    region = layout["blocks.0.attn.qkv.weight"]
    # heads 2 and 3 (rows 16..32) of each of q, k, v
    assert region.ranges == ((16, 32), (48, 64), (80, 96))


def test_neurons_cut_owns_whole_heads_and_hidden_units_on_both_sides() -> None:
    layouts = partition(MODEL, SliceConfig(num_slices=2, cut="neurons"))
    layout = layouts[1]
    # heads 2 and 3: rows 16..32 of q, k and v, and the columns that read them in the output projection
    assert layout["blocks.0.attn.qkv.weight"].ranges == ((16, 32), (48, 64), (80, 96))
    assert layout["blocks.0.attn.out.weight"] == Region(1, ((16, 32),))
    h = MODEL.hidden  # the second half of the hidden units: gate and up rows, and the columns of down reading them
    assert layout["blocks.0.mlp.up.weight"].ranges == ((h // 2, h), (h + h // 2, 2 * h))
    assert layout["blocks.0.mlp.down.weight"] == Region(1, ((h // 2, h),))
    # norm weights belong to no head or unit: every slice trains them whole
    for lay in layouts:
        assert lay["blocks.0.attn_norm.weight"].is_whole((MODEL.d_model,))


def test_more_slices_than_heads_split_every_head_evenly() -> None:
    layouts = partition(MODEL, SliceConfig(num_slices=8, cut="units"))  # 4 heads of 8 dims: 4 dims per slice
    assert layouts[1]["blocks.0.attn.qkv.weight"].ranges == ((4, 8), (36, 40), (68, 72))
    shapes = parameter_shapes(MODEL)
    owners = torch.zeros(shapes["blocks.0.attn.qkv.weight"])
    for lay in layouts:
        for view in lay["blocks.0.attn.qkv.weight"].views(owners):
            view += 1
    assert torch.all(owners == 1)


def test_bad_cuts_are_refused() -> None:
    with pytest.raises(ValueError, match="n_layers"):
        partition(MODEL, SliceConfig(num_slices=5, cut="blocks"))
    with pytest.raises(ValueError, match="n_heads"):
        partition(MODEL, SliceConfig(num_slices=3, cut="units"))
    with pytest.raises(ValueError, match="n_heads"):
        partition(MODEL, SliceConfig(num_slices=3, cut="neurons"))


def _train_steps(model: Transformer, optimizer: SliceOptimizer, steps: int = 3) -> None:
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 256, (2, 16))
        optimizer.zero_grad()
        model.loss(x, x.roll(-1, 1)).backward()
        optimizer.step(1e-2)


@pytest.mark.parametrize("cut", ["blocks", "units", "neurons"])
def test_training_a_slice_changes_only_its_coordinates(cut: str) -> None:
    torch.manual_seed(0)
    model = Transformer(MODEL)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layout = partition(MODEL, SliceConfig(num_slices=4, cut=cut))[2]
    optimizer = SliceOptimizer(model, layout, FROZEN)
    _train_steps(model, optimizer)
    for name, p in model.named_parameters():
        changed = (p.detach() != before[name]).float()
        owned = torch.zeros_like(changed)
        if name in layout:
            for view in layout[name].views(owned):
                view.fill_(1)
        assert torch.all(changed <= owned), f"{name} changed outside the slice"
        if cut == "blocks":
            assert p.requires_grad == (name in layout)
        assert p.grad is None or name in layout
    state = optimizer.state_dict()
    assert {k.rsplit(".", 1)[0] for k in state if k != "steps"} == set(layout)
    for name, region in layout.items():
        assert tuple(state[f"{name}.exp_avg"].shape) == region.compact_shape(tuple(before[name].shape))


def test_slice_state_is_a_quarter_of_the_full_model() -> None:
    shapes = parameter_shapes(MODEL)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    model = Transformer(MODEL)
    full_bytes = SliceOptimizer(model, full_layout(shapes), FROZEN).state_bytes()
    assert full_bytes == 12 * total
    for cut in ("blocks", "units"):
        layouts = partition(MODEL, SliceConfig(num_slices=4, cut=cut))
        sizes = [SliceOptimizer(Transformer(MODEL), lay, FROZEN).state_bytes() for lay in layouts]
        head = sum(torch.Size(shapes[n]).numel() for n in head_parameters(MODEL)) * 12
        assert sum(sizes) == full_bytes + 3 * head  # the shared head is held by every slice
        assert all(0.15 < s / full_bytes < 0.4 for s in sizes), sizes


def _measured_backward_flops(layout: dict, config: InnerConfig = FROZEN) -> float:
    torch.manual_seed(0)
    model = Transformer(MODEL)
    SliceOptimizer(model, layout, config)
    x = torch.randint(0, 256, (2, MODEL.seq_len))
    loss = model.loss(x, x)
    counter = FlopCounterMode(display=False)
    with counter:
        loss.backward()
    return counter.get_total_flops()


def test_units_cut_computes_only_owned_weight_gradients() -> None:
    shapes = parameter_shapes(MODEL)
    full_measured = _measured_backward_flops(full_layout(shapes))
    full_estimate = slice_cost(MODEL, full_layout(shapes)).backward_flops_per_token
    layout = partition(MODEL, SliceConfig(num_slices=4, cut="units"))[1]
    measured = _measured_backward_flops(layout) / full_measured
    assert measured == pytest.approx(slice_cost(MODEL, layout).backward_flops_per_token / full_estimate, rel=0.1)
    assert measured < 0.8


def test_with_rest_steps_every_slice_pays_the_full_backward_as_estimated() -> None:
    shapes = parameter_shapes(MODEL)
    full_measured = _measured_backward_flops(full_layout(shapes))
    moving = InnerConfig(rest_step=0.3)
    for cut in ("units", "blocks"):
        for layout in partition(MODEL, SliceConfig(num_slices=4, cut=cut)):
            measured = _measured_backward_flops(layout, moving) / full_measured
            assert measured == pytest.approx(slice_cost(MODEL, layout, rest_moves=True).backward_flops_per_token
                                             / slice_cost(MODEL, full_layout(shapes)).backward_flops_per_token,
                                             rel=0.1)  # fmt: skip
            assert measured > 0.9, (cut, measured)


def test_row_gradients_equal_the_rows_of_the_full_gradient() -> None:
    torch.manual_seed(0)
    reference, sliced = Transformer(MODEL), Transformer(MODEL)
    sliced.load_state_dict(reference.state_dict())
    layout = partition(MODEL, SliceConfig(num_slices=4, cut="units"))[2]
    optimizer = SliceOptimizer(sliced, layout, FROZEN)
    x = torch.randint(0, 256, (2, MODEL.seq_len))
    reference.loss(x, x.roll(-1, 1)).backward()
    sliced.loss(x, x.roll(-1, 1)).backward()
    grads = {o.name: o.grad if o.compact else o.param.grad for o in optimizer._owned}
    full = dict(reference.named_parameters())
    for name, region in layout.items():
        assert torch.allclose(grads[name], region.extract(full[name].grad), atol=1e-6), name
    optimizer.close()
    assert "forward" not in vars(sliced.blocks[0].attn.qkv)


def test_blocks_cut_backward_flops_match_the_estimate() -> None:
    shapes = parameter_shapes(MODEL)
    full_measured = _measured_backward_flops(full_layout(shapes))
    full_estimate = slice_cost(MODEL, full_layout(shapes)).backward_flops_per_token
    ratios = []
    for layout in partition(MODEL, SliceConfig(num_slices=4, cut="blocks")):
        measured = _measured_backward_flops(layout) / full_measured
        estimated = slice_cost(MODEL, layout).backward_flops_per_token / full_estimate
        assert measured == pytest.approx(estimated, rel=0.1)
        ratios.append(measured)
    assert ratios == sorted(ratios, reverse=True), "higher slices should need less backward"
    assert ratios[-1] < 0.4  # the top slice skips the backward through three of four blocks
