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
from peer.core.planner import ALLOCATOR_SHARE, footprint
from peer.core.slices import SliceConfig
from protocol.logs import get_logger

log = get_logger(__name__)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
HEADROOM = ALLOCATOR_SHARE
"""Share of the memory this process can have that the automatic micro-batch may plan for (the planner's:
allocator fragmentation takes the rest; the CUDA context is already outside what mem_get_info calls free)."""


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


def training_bytes(model: ModelConfig, slices: SliceConfig | None = None, *, dtype: str = "float32",
                   checkpointing: bool = False, offload_outer: bool = False,
                   rest_step: float = 0.3) -> tuple[int, int]:  # fmt: skip
    """(fixed bytes, bytes per sequence of a micro-batch) that a peer's training needs on a CUDA device, from
    the one memory model (peer/core/planner.py): resident state and per-step copies, and activations plus the
    backward's working set per sequence. `slices` None: the full model (DiLoCo's cost, an upper bound)."""
    fixed, per_sequence, _host = footprint(model, slices, dtype=dtype, checkpointing=checkpointing,
                                           offload_outer=offload_outer, rest_step=rest_step)  # fmt: skip
    return fixed, per_sequence


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
                         f"for one sequence at a time, but only {free_bytes / gib:.1f} GiB is free: free some GPU "
                         f"memory, try --activation-checkpointing or --offload-outer, or use --device cpu")  # fmt: skip
    return fitting[-1]


def fit_inner(inner: InnerConfig, model: ModelConfig, device: torch.device, *, micro_batch: int | None = None,
              grad_accum: int | None = None, slices: SliceConfig | None = None,
              dtype: str = "float32", checkpointing: bool = False,
              offload_outer: bool = False) -> InnerConfig:  # fmt: skip
    """The manifest's inner config with the run's batch split for this peer: as the flags say; else, on
    CUDA, fitted to the memory this process can have; else (CPU) as the manifest has it.

    The memory it can have is what the device has free plus what this process's tensors already hold (the
    model, phi, the outer state: `training_bytes` counts them in its fixed part). The planner counts the
    slice from `slices` (None plans for the full model, an upper bound)."""
    run_batch = inner.batch_size * inner.grad_accum
    split = split_batch(run_batch, micro_batch, grad_accum)
    if split is None and device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        available = free + torch.cuda.memory_allocated(device)
        fixed, per_sequence = training_bytes(model, slices, dtype=dtype, checkpointing=checkpointing,
                                             offload_outer=offload_outer, rest_step=inner.rest_step)  # fmt: skip
        micro = fit_micro_batch(run_batch, available, fixed, per_sequence)
        split = (micro, run_batch // micro)
        log.info("micro-batch %d x %d accumulation steps: fitted to %.1f GiB on %s (about %.2f GiB a sequence)",
                 micro, split[1], available / 2**30, device, per_sequence / 2**30)  # fmt: skip
    if split is None:
        return inner
    return replace(inner, batch_size=split[0], grad_accum=split[1])
