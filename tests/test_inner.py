"""Inner loop: the lr schedule, and SliceOptimizer against torch's AdamW on a full slice."""

from __future__ import annotations

import pytest
import torch

from peer.core.inner import InnerConfig, SliceOptimizer, inner_round, lr_at
from peer.core.model import ModelConfig, Transformer
from peer.core.slices import SliceConfig, full_layout, parameter_shapes, partition

pytestmark = pytest.mark.timeout(60)
MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16)


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    config = InnerConfig(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(60, config) == pytest.approx(0.55)
    assert lr_at(110, config) == pytest.approx(0.1)
    assert lr_at(10_000, config) == pytest.approx(0.1)


def test_full_slice_optimizer_matches_torch_adamw() -> None:
    torch.manual_seed(0)
    ours, reference = Transformer(MODEL), Transformer(MODEL)
    reference.load_state_dict(ours.state_dict())
    config = InnerConfig(lr=1e-2, weight_decay=0.1, grad_clip=0)
    optimizer = SliceOptimizer(ours, full_layout(parameter_shapes(MODEL)), config)
    params = list(reference.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2]}, {"params": [p for p in params if p.ndim < 2],
                                                                  "weight_decay": 0.0}]  # fmt: skip
    torch_adamw = torch.optim.AdamW(groups, lr=1e-2, betas=config.betas, weight_decay=0.1, eps=1e-8)
    for _ in range(3):
        x = torch.randint(0, 256, (2, 16))
        optimizer.zero_grad()
        torch_adamw.zero_grad()
        ours.loss(x, x).backward()
        reference.loss(x, x).backward()
        optimizer.step(1e-2)
        torch_adamw.step()
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_state_dict_round_trips_and_checks_shapes() -> None:
    model = Transformer(MODEL)
    layout = partition(MODEL, SliceConfig(num_slices=2, cut="units"))[0]
    optimizer = SliceOptimizer(model, layout, InnerConfig())
    batches = lambda step, micro: (torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))  # noqa: E731
    inner_round(model, optimizer, batches, torch.device("cpu"))
    state = optimizer.state_dict()
    other = SliceOptimizer(Transformer(MODEL), layout, InnerConfig())
    other.load_state_dict(state)
    assert other.steps == optimizer.steps == InnerConfig().steps_per_round
    name = next(iter(layout))
    bad = dict(state, **{f"{name}.exp_avg": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(bad)


def test_inner_round_reports_tokens_and_a_finite_falling_loss() -> None:
    torch.manual_seed(0)
    model = Transformer(MODEL)
    config = InnerConfig(lr=1e-2, steps_per_round=15, batch_size=4, warmup_steps=1, total_steps=15)
    optimizer = SliceOptimizer(model, full_layout(parameter_shapes(MODEL)), config)
    text = torch.tensor(list(b"the cat sat on the mat. " * 40))
    batches = lambda step, micro: (text[:64].view(4, 16), text[1:65].view(4, 16))  # noqa: E731
    first = inner_round(model, optimizer, batches, torch.device("cpu"))
    second = inner_round(model, optimizer, batches, torch.device("cpu"))
    assert first.tokens == 15 * 64
    assert second.mean_loss < first.mean_loss


@pytest.mark.parametrize("cut, index", [("units", 1), ("blocks", 0)])
def test_rest_step_moves_the_rest_by_its_gradient_sign_and_the_slice_as_before(cut: str, index: int) -> None:
    """One step with rest_step: outside the slice, exactly -lr * rest_step * sign(full gradient); inside, exactly
    the frozen-rest optimiser's AdamW step (both start from the same weights, so the slice's gradient is the same).

    Not blocks' upper slice: frozen, it takes the tied embedding's gradient from the output side only (its
    backward stops at its lowest block); with rest_step the backward is whole, so it takes the full gradient."""
    torch.manual_seed(0)
    layout = partition(MODEL, SliceConfig(num_slices=2, cut=cut))[index]
    lr, rest = 1e-2, 0.3
    models = [Transformer(MODEL) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    start = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    x = torch.randint(0, 256, (2, 16))

    reference = models[2]  # the full gradient at the start
    reference.loss(x, x).backward()
    full_grad = {n: p.grad.clone() for n, p in reference.named_parameters()}

    moved: list[dict[str, torch.Tensor]] = []
    for model, step in ((models[0], rest), (models[1], 0.0)):
        config = InnerConfig(lr=lr, warmup_steps=0, grad_clip=0, rest_step=step)
        optimizer = SliceOptimizer(model, layout, config)
        optimizer.zero_grad()
        model.loss(x, x).backward()
        optimizer.step(lr_at(0, config))
        optimizer.close()
        moved.append({n: p.detach().clone() for n, p in model.named_parameters()})
    with_rest, frozen = moved

    for name, p0 in start.items():
        inside = torch.zeros_like(p0, dtype=torch.bool)
        if name in layout:
            for view in layout[name].views(inside):
                view.fill_(True)
        expected_rest = p0 - lr * rest * full_grad[name].sign()
        assert torch.equal(frozen[name][~inside], p0[~inside]), name  # rest_step 0: frozen as before
        torch.testing.assert_close(with_rest[name][~inside], expected_rest[~inside], rtol=0, atol=1e-7, msg=name)
        torch.testing.assert_close(with_rest[name][inside], frozen[name][inside], rtol=0, atol=1e-6, msg=name)


def test_rest_step_keeps_no_state_outside_the_slice() -> None:
    shapes = parameter_shapes(MODEL)
    layout = partition(MODEL, SliceConfig(num_slices=2))[0]
    owned = sum(region.numel(shapes[n]) for n, region in layout.items())
    largest = max(torch.Size(s).numel() for s in shapes.values())
    for step, extra in ((0.0, 0), (0.3, largest * 4)):
        optimizer = SliceOptimizer(Transformer(MODEL), layout, InnerConfig(rest_step=step))
        assert optimizer.state_bytes() == owned * 12 + extra
        optimizer.close()
    with pytest.raises(ValueError, match="rest_step"):
        InnerConfig(rest_step=-0.1)
    with pytest.raises(ValueError, match="rest_step"):
        InnerConfig(rest_step=float("nan"))
