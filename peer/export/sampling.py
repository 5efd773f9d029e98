"""Text from murmur's own model with nothing but torch: greedy decoding, or sampling with temperature and top-k.

Why murmur's model and not the export: `murmur sample` is how a run owner looks at a checkpoint without any
other library, and it is the reference the Hugging Face export is checked against (the same greedy tokens).

The model has no key/value cache, so each new token re-reads its context: fine for the few hundred tokens a
look at a checkpoint asks for (the export is the way to serve the model). The context is the last seq_len
tokens, as in training: past seq_len the window slides rather than running positions the model never saw.
Sampling draws on the CPU from a seeded generator, so a seed gives the same text on every device up to
floating-point differences between the devices' logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from peer.core.model import Transformer


@dataclass(frozen=True, kw_only=True, slots=True)
class SampleConfig:
    """How to pick each next token."""

    max_new_tokens: int = 64
    greedy: bool = False
    """The most likely token every step (temperature, top_k and seed are then unused)."""
    temperature: float = 1.0
    top_k: int = 0
    """Sample among the k most likely tokens only; 0: among all."""
    seed: int | None = None
    """None: a fresh draw every call."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@torch.no_grad()
def generate(model: Transformer, prompt: Sequence[int], config: SampleConfig) -> list[int]:
    """The ids `model` continues `prompt` (non-empty) with: `config.max_new_tokens` of them."""
    if not prompt:
        raise ValueError("the prompt has no tokens")
    device = model.embed.weight.device
    seq_len = model.config.seq_len
    ids = torch.tensor([list(prompt)[-seq_len:]], dtype=torch.long, device=device)  # (1, T)
    generator = None if config.greedy else torch.Generator()
    if generator is not None:
        if config.seed is None:
            generator.seed()
        else:
            generator.manual_seed(config.seed)
    new: list[int] = []
    for _ in range(config.max_new_tokens):
        logits = model(ids)[0, -1].float()  # (vocab,)
        token = next_token(logits, config, generator)
        new.append(token)
        ids = torch.cat((ids, ids.new_tensor([[token]])), dim=1)[:, -seq_len:]
    return new


def next_token(logits: torch.Tensor, config: SampleConfig, generator: torch.Generator | None) -> int:
    """One id from the last position's logits (vocab,): the arg max, or a draw from the tempered top-k."""
    if config.greedy:
        return int(logits.argmax())
    logits = logits / config.temperature
    if 0 < config.top_k < logits.numel():
        kth = torch.topk(logits, config.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))
