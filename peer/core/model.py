"""Decoder-only transformer with named presets, from `tiny` (tests, CPU) to `1.3b`.

Pre-norm blocks with RMSNorm, rotary or learned positions, SwiGLU or GELU MLP, optional tied
embeddings. Attention goes through `scaled_dot_product_attention` so CUDA picks flash kernels.
Parameter names are stable (`blocks.3.attn.qkv.weight`) because slices, codecs and checkpoints key
on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""The run dtypes (RunConfig.dtype): what the parameters are held in on the device."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """Shape of the network; part of the run manifest, so every peer builds the same model."""

    vocab_size: int = 256
    """256 for the byte-level default; a tokenizer.json's size otherwise."""
    seq_len: int = 128
    """Context length in tokens (learned positions are allocated for exactly this many)."""
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    d_hidden: int = 0
    """MLP hidden width; 0 means the usual default (8/3*d rounded to 64 for SwiGLU, 4*d for GELU)."""
    positions: Literal["rotary", "learned"] = "rotary"
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"unknown mlp {self.mlp!r}: expected 'swiglu' or 'gelu'")
        if self.positions not in ("rotary", "learned"):
            raise ValueError(f"unknown positions {self.positions!r}: expected 'rotary' or 'learned'")
        if self.d_hidden < 0:
            raise ValueError("d_hidden must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        if self.d_hidden:
            return self.d_hidden
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 64 * math.ceil(8 * self.d_model / 3 / 64)


PRESETS: dict[str, ModelConfig] = {
    # ~0.1M parameters: the process tests' swarms, a dozen peers sharing two CPU cores (a step ~4x cheaper than tiny).
    "micro": ModelConfig(d_model=64, n_layers=2, n_heads=2, seq_len=64),
    # ~0.4M parameters: a CPU step in a few tens of milliseconds; tests and the simulator.
    "tiny": ModelConfig(d_model=96, n_layers=4, n_heads=4, seq_len=128),
    # ~3.2M: CPU benchmarks.
    "small": ModelConfig(d_model=256, n_layers=4, n_heads=8, seq_len=256),
    # GPT-2 small-like shapes (with a byte vocabulary unless the manifest says otherwise).
    "124m": ModelConfig(d_model=768, n_layers=12, n_heads=12, seq_len=1024),
    "350m": ModelConfig(d_model=1024, n_layers=24, n_heads=16, seq_len=1024),
    "1.3b": ModelConfig(d_model=2048, n_layers=24, n_heads=16, seq_len=2048),
}


def preset(name: str, **overrides: object) -> ModelConfig:
    """A named preset, optionally with fields replaced (e.g. a tokenizer's vocab_size)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables of shape (seq_len, head_dim) for `apply_rotary`.

    The halves are laid out so that rotation is two contiguous multiplies: broadcasting a
    (T, hs/2) table against a chunked view runs an order of magnitude slower on CPU.
    Made on the CPU whatever the default device (the model moves them with its buffers): a model built on the meta
    device for its shapes alone then imports no more of torch (its meta `arange` imports torch._dynamo).
    """
    cpu = torch.device("cpu")
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=cpu) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=cpu), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) = halves of x (B, nh, T, hs) by position-dependent angles, in fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((x2, x1), dim=-1) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.rotary = config.positions == "rotary"
        # One matrix for q, k, v: rows [q heads | k heads | v heads], each head_dim rows per head.
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.rotary:
            q, k = apply_rotary(q, cos[:T], sin[:T]), apply_rotary(k, cos[:T], sin[:T])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        # SwiGLU keeps gate and up in one matrix: rows [gate | up].
        self.up = nn.Linear(config.d_model, (2 if self.swiglu else 1) * config.hidden, bias=False)
        self.down = nn.Linear(config.hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.down(h)


class Embedding(nn.Embedding):
    """`nn.Embedding` that leaves a weight on the meta device (`slices.parameter_shapes`) uninitialised: there are
    no values there to draw, and torch's meta `normal_` imports torch._dynamo, ~1.5 CPU-seconds of every peer's
    start-up. On a real device it draws exactly what `nn.Embedding` draws (the random stream is unchanged)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """`model(idx)` maps token ids (B, T) to logits (B, T, vocab); `model.loss(idx, targets)` to mean CE."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.detach_input_embedding = False
        """Set by a slice that trains the (tied) embedding only as the output head: no backward below."""
        self.checkpointing = False
        """Recompute each block's activations in backward instead of keeping them (a per-peer memory option:
        `murmur run --activation-checkpointing`); the numbers are the same, a block's forward runs twice."""
        self.embed = Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.pos_embed = Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        if not config.tie_embeddings:
            self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        cos, sin = rotary_tables(config.seq_len, config.head_dim)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2*n_layers)."""
        std = self.config.init_std
        if self.embed.weight.is_meta:  # shapes only (see Embedding)
            return
        for name, p in self.named_parameters():
            if p.ndim < 2:
                nn.init.ones_(p)
            elif name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.config.seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds the model's seq_len={self.config.seq_len}")
        x = self.embed(idx)  # (B, T, C)
        if self.detach_input_embedding:
            x = x.detach()
        if self.config.positions == "learned":
            x = x + self.pos_embed(torch.arange(T, device=idx.device))
        recompute = self.checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, self.rope_cos, self.rope_sin, use_reentrant=False)
            else:
                x = block(x, self.rope_cos, self.rope_sin)
        x = self.final_norm(x)
        weight = self.embed.weight if self.config.tie_embeddings else self.head.weight
        return F.linear(x, weight)  # (B, T, vocab)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy, in bf16 autocast on CUDA and fp32 elsewhere."""
        with autocast(idx.device):
            logits = self(idx)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; a disabled context on CPU (fp32 there is both faster and exact)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def cast_parameters(model: Transformer, dtype: str) -> Transformer:
    """Hold the parameters in `dtype` (a key of DTYPES), in place; buffers (the rotary tables) stay float32.

    A bfloat16 run keeps its frozen and rest coordinates in bf16 on the device and an fp32 master of the owned
    slice only (peer/core/inner.py). Cast after the fp32 initialisation, so that every peer of a run rounds the
    same initial draw."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for p in model.parameters():
        p.data = p.data.to(DTYPES[dtype])
    return model


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
