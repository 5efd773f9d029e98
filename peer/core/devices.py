"""Which device a peer trains on, and how the run's batch is split into micro-batches there.

Everything that decides is a pure function of plain numbers (device count, free bytes, the model's
shape), so it is unit-tested without a GPU; `fit_inner` is the one place that asks torch.

The run's batch (`InnerConfig.batch_size * grad_accum`, sequences per optimiser step) is part of the
signed manifest: every peer must step on the same batch, so a peer only chooses how to split it. With
neither --batch-size nor --grad-accum, CPU keeps the manifest's split; CUDA takes the largest divisor
of the run's batch whose activations fit in the free memory that `torch.cuda.mem_get_info` reports.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from peer.core.inner import InnerConfig
from peer.core.model import ModelConfig
from protocol.logs import get_logger

log = get_logger(__name__)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
HEADROOM = 0.8
"""Share of the free memory the automatic micro-batch may plan for: allocator fragmentation, cuBLAS
workspaces and other processes on the same GPU take the rest."""


def resolve_device(name: str, cuda_count: int) -> str:
    """`auto|cpu|cuda|cuda:i` -> the device to use, given how many CUDA devices torch sees.

    ValueError (naming --device) for a malformed name or a CUDA device that is not there, so the
    volunteer hears it before the DHT starts rather than after the manifest download."""
    if not DEVICE_PATTERN.match(name):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:INDEX, got {name!r}")
    if name == "auto":
        return "cuda" if cuda_count > 0 else "cpu"
    if name == "cpu":
        return name
    if cuda_count == 0:
        raise ValueError(f"--device {name}, but torch sees no CUDA device (a CPU-only torch build, or no driver)")
    index = int(name.partition(":")[2] or 0)
    if index >= cuda_count:
        last = cuda_count - 1
        raise ValueError(f"--device {name}, but torch sees only {cuda_count} CUDA device(s): cuda:0..cuda:{last}")
    return name


def pick_device(name: str) -> torch.device:
    """The torch device for `--device name` on this machine (see `resolve_device`)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return torch.device(resolve_device(name, count))


def split_batch(run_batch: int, micro_batch: int | None, grad_accum: int | None) -> tuple[int, int] | None:
    """(micro-batch, accumulation steps) from the flags, whose product must be the run's batch; None when
    neither flag was given (the caller keeps the manifest's split or fits one to the device)."""
    if micro_batch is None and grad_accum is None:
        return None
    if micro_batch is not None and grad_accum is not None:
        if micro_batch * grad_accum != run_batch:
            product = micro_batch * grad_accum
            raise ValueError(f"--batch-size {micro_batch} x --grad-accum {grad_accum} = {product}, but the run's "
                             f"batch is {run_batch} sequences per step: their product must equal it")  # fmt: skip
        return micro_batch, grad_accum
    flag, given = ("--batch-size", micro_batch) if micro_batch is not None else ("--grad-accum", grad_accum)
    assert given is not None
    if given < 1 or run_batch % given:
        divisors = ", ".join(str(d) for d in divisors_of(run_batch))
        raise ValueError(f"{flag} {given} must divide the run's batch of {run_batch} sequences (one of {divisors})")
    return (given, run_batch // given) if flag == "--batch-size" else (run_batch // given, given)


def divisors_of(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def training_bytes(model: ModelConfig, trainable_params: int) -> tuple[int, int]:
    """(fixed bytes, bytes per sequence of a micro-batch) that a peer's training needs on the device.

    Fixed: the fp32 model, phi and up to two outer buffers (4 x 4 bytes a parameter), and the slice's
    fp32 gradient and AdamW moments (12 bytes a trainable coordinate). Per sequence: what autograd keeps
    for the backward under bf16 autocast with SDPA (no T x T scores), counted generously per token and
    layer (normed inputs, q/k/v and their fp32 rotary copies, the attention output, the MLP's up
    projection and gate, fp32 residuals), plus the logits (bf16, their fp32 copy and its gradient)."""
    params = _param_count(model)
    fixed = 16 * params + 12 * trainable_params
    per_token_layer = 2 * (24 * model.d_model + 6 * model.hidden)
    per_token = model.n_layers * per_token_layer + 14 * model.vocab_size + 8 * model.d_model
    return fixed, model.seq_len * per_token


def fit_micro_batch(run_batch: int, free_bytes: int, fixed_bytes: int, per_sequence_bytes: int,
                    headroom: float = HEADROOM) -> int:  # fmt: skip
    """The largest divisor of the run's batch whose training fits in `headroom` of the free memory.

    ValueError when even one sequence does not fit: better said at start than an out-of-memory error
    in the first round."""
    budget = int(free_bytes * headroom) - fixed_bytes
    fitting = [d for d in divisors_of(run_batch) if d * per_sequence_bytes <= budget]
    if not fitting:
        gib = 2**30
        raise ValueError(f"this run needs about {(fixed_bytes + per_sequence_bytes) / gib:.1f} GiB on the device "
                         f"for one sequence at a time, but only {free_bytes / gib:.1f} GiB is free: "
                         f"free some GPU memory or use --device cpu")  # fmt: skip
    return fitting[-1]


def fit_inner(inner: InnerConfig, model: ModelConfig, device: torch.device, *, micro_batch: int | None = None,
              grad_accum: int | None = None, trainable_params: int = 0) -> InnerConfig:  # fmt: skip
    """The manifest's inner config with the run's batch split for this peer: as the flags say; else, on
    CUDA, fitted to the free memory; else (CPU) as the manifest has it."""
    run_batch = inner.batch_size * inner.grad_accum
    split = split_batch(run_batch, micro_batch, grad_accum)
    if split is None and device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        fixed, per_sequence = training_bytes(model, trainable_params)
        micro = fit_micro_batch(run_batch, free, fixed, per_sequence)
        split = (micro, run_batch // micro)
        log.info("micro-batch %d x %d accumulation steps: fitted to %.1f GiB free on %s (about %.2f GiB a sequence)",
                 micro, split[1], free / 2**30, device, per_sequence / 2**30)  # fmt: skip
    if split is None:
        return inner
    return replace(inner, batch_size=split[0], grad_accum=split[1])


def _param_count(model: ModelConfig) -> int:
    """Parameters of `Transformer(model)` without building it (weights only; norms are negligible)."""
    c, h = model.d_model, model.hidden
    up = 2 * h if model.mlp == "swiglu" else h
    per_block = 3 * c * c + c * c + up * c + c * h + 2 * c
    embeddings = model.vocab_size * c * (1 if model.tie_embeddings else 2)
    positions = model.seq_len * c if model.positions == "learned" else 0
    return model.n_layers * per_block + embeddings + positions + c
