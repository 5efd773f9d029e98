"""The transformer: presets, shapes, causality, and config validation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from peer.core.model import PRESETS, ModelConfig, Transformer, apply_rotary, param_count, preset, rotary_tables

pytestmark = pytest.mark.timeout(60)


def test_presets_have_the_sizes_their_names_promise() -> None:
    sizes = {}
    for name, config in PRESETS.items():
        with torch.device("meta"):
            sizes[name] = param_count(Transformer(config))
    assert sizes["tiny"] < 1e6 and sizes["small"] < 5e6
    # byte vocabulary: GPT-2 shapes without its 38M-parameter token embedding
    assert 80e6 < sizes["124m"] < 130e6
    assert 280e6 < sizes["350m"] < 360e6
    assert 1.1e9 < sizes["1.3b"] < 1.4e9


@pytest.mark.timeout(150)  # a fresh interpreter imports torch: 30 s and more beside a busy test worker
def test_the_shapes_of_a_model_cost_no_torch_compiler_import() -> None:
    """A peer builds its model on the meta device for the slice layout (slices.parameter_shapes): that must not
    draw random values there, whose meta kernels import torch._dynamo (~1.5 CPU-seconds of every peer's start)."""
    code = ("import sys; from peer.core.model import preset; from peer.core.slices import parameter_shapes; "
            "shapes = parameter_shapes(preset('1.3b')); print(len(shapes), 'torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1] == "False", done.stdout


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(d_model=32, n_layers=2, n_heads=4, seq_len=16),
        ModelConfig(d_model=32, n_layers=2, n_heads=4, seq_len=16, mlp="gelu", positions="learned",
                    tie_embeddings=False),  # fmt: skip
    ],
)
def test_forward_is_causal_and_shaped(config: ModelConfig) -> None:
    torch.manual_seed(0)
    model = Transformer(config).eval()
    x = torch.randint(0, 256, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 256)
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        assert torch.allclose(model(changed)[:, :10], logits[:, :10], atol=1e-5)
        assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])
    uniform = torch.log(torch.tensor(256.0)).item()
    assert model.loss(x, torch.randint(0, 256, (2, 16))).item() == pytest.approx(uniform, abs=0.3)


def test_rotary_scores_depend_only_on_relative_position() -> None:
    cos, sin = rotary_tables(32, 8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i: int, j: int) -> float:
        qi = apply_rotary(q, cos[i : i + 1], sin[i : i + 1])
        kj = apply_rotary(k, cos[j : j + 1], sin[j : j + 1])
        return float((qi * kj).sum())

    assert score(5, 3) == pytest.approx(score(20, 18), abs=1e-4)


def test_too_long_input_and_bad_configs_are_refused() -> None:
    model = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, seq_len=8))
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="mlp"):
        ModelConfig(mlp="relu")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("7b")
    assert preset("tiny", vocab_size=1000).vocab_size == 1000
