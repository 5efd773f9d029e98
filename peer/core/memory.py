"""Resident training memory of one peer, to the byte: from the shapes alone, or by walking a real Trainer.

Resident means what lives between two steps for the whole run: the model's parameters (and its fp32 rotary
tables), the owned slice's gradients, fp32 masters and AdamW moments, the outer weights phi and the outer rule's
buffer, and the codec's error-feedback residuals. Activations and one-off buffers of a step (a rest-step
gradient, the outer step's per-coordinate means) come and go; `peer/core/devices.py` budgets those.

Per coordinate, with N parameters in the model and S in the largest slice of the cut (S = N for DiLoCo):

    weights    N x 4 (float32) or N x 2 (bfloat16)     + the rotary tables, 2 x seq_len x head_dim x 4
    master     S x 4 for a bfloat16 run, 0 for float32 (the parameters are their own master)
    grads      S x 4
    optimizer  S x 8 (AdamW's two moments)              + 4 (SliceOptimizer's anchor scalar)
    outer      N x 4 (phi, fp32 whatever the run dtype) + N x 4 (momentum / GASLoC's y_prev, fp32)
    feedback   S x 4 (residuals of the run's codec; 0 with codec=None: no error feedback, DiLoCo's all-reduce)

`measured_resident_bytes` walks the tensors a Trainer really holds, counting each storage once (views and
aliases share a data pointer), and `tests/test_memory.py` proves both agree exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from peer.core.inner import SliceOptimizer
from peer.core.model import ModelConfig, Transformer
from peer.core.outer import OuterConfig
from peer.core.slices import SliceConfig, parameter_shapes, partition, slice_numel
from protocol.codec import CodecConfig, ErrorFeedback

BYTES = {"float32": 4, "bfloat16": 2}
ANCHOR_BYTES = 4
"""SliceOptimizer's scalar anchor (it makes autograd call RowGradLinear's backward)."""


class Holder(Protocol):
    """What `measured_resident_bytes` walks: peer/node/trainer.Trainer (peer/core may not import peer/node)."""

    model: Transformer
    optimizer: SliceOptimizer | None
    phi: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]
    feedback: ErrorFeedback
    offload_outer: bool


@dataclass(frozen=True, slots=True)
class ResidentBytes:
    """Bytes one peer keeps resident, by kind; `device` and `host` say where."""

    weights: int
    """Model parameters on the device (run dtype), with the model's fp32 rotary tables."""
    master: int
    """fp32 master copies of the owned slice (0 for fp32 runs)."""
    grads: int
    """Gradients of the trained coordinates."""
    optimizer: int
    """AdamW moments (and the 4-byte anchor)."""
    outer: int
    """phi + outer momentum/buffers."""
    feedback: int
    """Error-feedback residuals of the codec."""
    outer_on_host: bool
    """Outer state offloaded to host memory (`murmur run --offload-outer`)."""

    @property
    def device(self) -> int:
        """What lives on the accelerator (the outer state excluded when offloaded)."""
        inner = self.weights + self.master + self.grads + self.optimizer + self.feedback
        return inner + (0 if self.outer_on_host else self.outer)

    @property
    def host(self) -> int:
        """What lives in host memory for training: the outer state when offloaded, else nothing."""
        return self.outer if self.outer_on_host else 0

    @property
    def total(self) -> int:
        return self.device + self.host


def resident_bytes(model: ModelConfig, slices: SliceConfig | None, *, dtype: str = "float32",
                   offload_outer: bool = False, outer: OuterConfig | None = None,
                   codec: CodecConfig | None = None) -> ResidentBytes:  # fmt: skip
    """slices=None: DiLoCo (every parameter trained by the one peer). The slice counted is the cut's largest.

    `outer` is accepted for the rule (every rule keeps one fp32 buffer the size of phi); `codec` None means no
    error feedback. Shapes only: nothing is allocated, so `1.3b` costs what `tiny` does.
    """
    if dtype not in BYTES:
        raise ValueError(f"dtype must be one of {', '.join(BYTES)}, got {dtype!r}")
    del outer  # nesterov momentum, noloco momentum and gasloc's y_prev are all one fp32 copy of phi
    shapes = parameter_shapes(model)
    total = sum(int(torch.Size(s).numel()) for s in shapes.values())
    owned = total if slices is None else max(slice_numel(lay, shapes) for lay in partition(model, slices))
    size = BYTES[dtype]
    rotary = 2 * model.seq_len * model.head_dim * 4
    return ResidentBytes(
        weights=total * size + rotary,
        master=owned * 4 if dtype != "float32" else 0,
        grads=owned * 4,
        optimizer=owned * 8 + ANCHOR_BYTES,
        outer=total * 4 + total * 4,  # phi keeps fp32 in a bf16 run too (peer/node/trainer.py)
        feedback=0 if codec is None else owned * 4,
        outer_on_host=offload_outer,
    )


def measured_resident_bytes(trainer: Holder) -> ResidentBytes:
    """Walk every tensor `trainer` holds for training (model parameters, gradients and buffers, the slice
    optimiser's, phi, the outer state, the error feedback), counting each storage once by its data pointer.

    Call it after a round has trained (before one, moments and residuals do not exist yet)."""
    model = trainer.model
    held = trainer.optimizer.held() if trainer.optimizer is not None else {"grads": [], "master": [], "optimizer": []}
    groups: dict[str, Iterable[torch.Tensor]] = {
        "weights": [*model.parameters(), *model.buffers()],
        "grads": [*held["grads"], *(p.grad for p in model.parameters() if p.grad is not None)],
        "master": held["master"],
        "optimizer": [*held["optimizer"], *(t.grad for t in held["optimizer"] if t.grad is not None)],
        "outer": [*trainer.phi.values(), *trainer.state.values()],
        "feedback": trainer.feedback._residuals.values(),  # protocol/codec.py exposes only copies
    }
    seen: set[tuple[str, int]] = set()
    counts = {}
    for kind, tensors in groups.items():
        counts[kind] = 0
        for tensor in tensors:
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                counts[kind] += storage.nbytes()
    return ResidentBytes(**counts, outer_on_host=trainer.offload_outer)
