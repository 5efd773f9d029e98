"""Inner loop: the lr schedule, and SliceOptimizer against torch's AdamW on a full slice."""

from __future__ import annotations

import pytest
import torch

from peer.inner import InnerConfig, SliceOptimizer, inner_round, lr_at
from peer.model import ModelConfig, Transformer
from peer.subsets import SliceConfig, full_layout, parameter_shapes, partition

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
