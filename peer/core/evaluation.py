"""Held-out loss of a set of weights, and the weight plumbing around it: one definition of each.

Why one place: the simulator's table, a peer's `eval round N` line, `murmur eval` and the demo's report are
compared with each other (and across benchmarks), so they must measure the same thing the same way: the
same held-out windows every call (`val_batches`, batch-weighted mean), the model in eval mode, no gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from peer.core.data import Corpus, val_batches
from peer.core.model import Transformer

DEFAULT_BATCHES = 8
"""Held-out batches of a validation loss unless the caller says otherwise (the simulator's `eval_batches`)."""


@torch.no_grad()
def load_weights(model: Transformer, weights: Mapping[str, torch.Tensor]) -> Transformer:
    """Copy `weights` (every parameter, by name, any device) into `model`; returns it, in eval mode."""
    for name, p in model.named_parameters():
        p.copy_(weights[name])
    return model.eval()


@torch.no_grad()
def val_loss(model: Transformer, corpus: Corpus, *, seq_len: int, batch_size: int, batches: int = DEFAULT_BATCHES,
             device: torch.device | str | None = None) -> float:  # fmt: skip
    """Mean loss of `model` over the same held-out windows every call, moved to `device` when given."""
    losses = []
    for x, y in val_batches(corpus, seq_len, batch_size, batches):
        if device is not None:
            x, y = x.to(device), y.to(device)
        losses.append(float(model.loss(x, y)))
    return sum(losses) / len(losses)


def average_weights(weights: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The coordinate-wise mean of several models' weights (the consensus the simulator and the demo report)."""
    return {name: torch.stack([w[name] for w in weights]).mean(0) for name in weights[0]}
