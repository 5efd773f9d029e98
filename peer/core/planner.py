"""Will a peer fit on this GPU, and how: the one memory model of training on a device.

A peer's device memory is a static part and a part that grows with the micro-batch:

- static: weights, the fp32 master of the owned slice, gradients, AdamW moments, outer state and error
  feedback (`peer.core.memory.resident_bytes`, exact), plus what training adds once per step whatever the
  micro-batch: bf16 copies of the fp32 matrices under autocast, the largest fp32 gradient of a coordinate
  outside the slice while the rest takes its sign step (`InnerConfig.rest_step` > 0), and the last round's
  own pseudo-gradient, which the daemon's overlapped exchange keeps while the next round trains;
- per sequence of a micro-batch: what autograd keeps for the backward (`activation_bytes`), and the
  backward's working set on top of it.

`activation_bytes` counts, per token, the tensors our `Transformer` saves (model.py: RMSNorm, one qkv
matrix, rotary in fp32, SDPA, SwiGLU, a tied head, fp32 log-softmax). The constants are calibrated on CPU
only, with `torch.autograd.graph.saved_tensors_hooks` counting distinct storages, fp32 and bf16 autocast,
with and without activation checkpointing (tests/test_planner.py re-measures `micro` and `tiny`; the CPU
model matches to the byte). On CUDA two things differ and are modelled, not measured: RMSNorm's fused
kernel keeps only its input and rstd (the CPU composite also keeps x*rstd), and the CUDA context and
cuBLAS/cuDNN workspaces sit outside torch's allocator (CONTEXT_BYTES). `benchmarks/gpu_check.sh` measures
the CUDA peak against `peak_bytes`; the issue asks for 15%.

The search (`plan`): the largest micro-batch (a divisor of the run's batch) that fits, trying plain
training, then the outer state on the host (`--offload-outer`: a host copy once a round), then activation
checkpointing (a third more compute every step), then both; or "does not fit".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from peer.core.memory import ResidentBytes, resident_bytes
from peer.core.model import PRESETS, ModelConfig
from peer.core.slices import SliceConfig, block_of, parameter_shapes, partition, trains_input_embedding
from protocol.codec import CodecConfig
from protocol.errors import SetupError

MIB, GIB = 2**20, 2**30
CONTEXT_BYTES = 600 * MIB
"""What a CUDA process holds outside torch's caching allocator: the context (kernels of torch, cuBLAS,
cuDNN: 300-500 MiB with lazy module loading) and library workspaces. Not seen by max_memory_allocated."""
WORKSPACE_BYTES = 64 * MIB
"""cuBLAS/cuBLASLt workspaces, which torch allocates through its caching allocator (so they count in its peak)."""
ALLOCATOR_SHARE = 0.9
"""Share of the rest the caching allocator can hand out as live tensors: the other tenth is lost to
fragmentation between micro-batch shapes (block rounding, cached free blocks)."""
HOME_GPUS_GB = (8, 12, 16, 24)
"""The cards the planner's table answers for: 8 (RTX 3070/4060), 12 (3060/4070), 16 (4060 Ti/4080), 24 (3090/4090)."""
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(text: str) -> int:
    """The bytes of a size such as "24GB", "24GiB", "24G" or "8000MB"; SetupError for anything else. Binary units
    throughout: a card sold as "24GB" has 24 GiB (nvidia-smi: 24564 MiB), so GB and GiB mean the same here."""
    match = _SIZE.match(text)
    if not match or (not match[2] and not match[3]):
        raise SetupError(f"expected a size such as 24GB, 24GiB, 24G or 8000MB, got {text!r}")
    size = int(float(match[1]) * _UNITS[match[2].lower()])
    if size <= 0:
        raise SetupError(f"expected a size above zero, got {text!r}")
    return size


@dataclass(frozen=True, slots=True)
class Activations:
    """Device bytes that grow with the micro-batch (per sequence), and the once-per-step rest."""

    saved: int
    """Per sequence: what autograd keeps from the forward for the backward."""
    working: int
    """Per sequence: the backward's own tensors on top (gradients of one block or of the logits, and with
    checkpointing the recomputed block's activations)."""
    fixed: int
    """Per step, whatever the micro-batch: bf16 copies of fp32 matrices under autocast."""

    @property
    def per_sequence(self) -> int:
        return self.saved + self.working


def activation_bytes(model: ModelConfig, *, lowest_block: int | None = 0, checkpointing: bool = False,
                     dtype: str = "float32", cuda: bool = True) -> Activations:  # fmt: skip
    """What training one micro-batch keeps on the device beyond the resident state (module docstring).

    `lowest_block`: the lowest block the backward reaches (0 when the slice trains block 0 or the rest
    moves; None when only the head trains); blocks below it run without autograd and keep nothing.
    `cuda`: bf16 autocast with SDPA and the fused RMSNorm; False: CPU, fp32 (the calibrated case)."""
    d, h, nh, vocab, tokens = model.d_model, model.hidden, model.n_heads, model.vocab_size, model.seq_len
    low = cuda or dtype == "bfloat16"  # matmul outputs in bf16
    act = 2 if low else 4
    norm_out = 0 if cuda else 4  # the CPU composite keeps x*rstd; the fused CUDA kernel only x and rstd
    residual = 4  # rms_norm runs in fp32 under autocast and keeps an fp32 input (measured for bf16 weights too)
    per_norm = (residual + norm_out + act) * d + 4  # input, x*rstd, the matmul's input (its bf16 cast), rstd
    attention = 6 * act * d + 4 * nh  # rotated q, k (act each), the qkv output v views (3 act), SDPA out, lse
    mlp = 4 * act * h  # gate|up output, silu(gate), their product
    layer = 2 * per_norm + attention + mlp
    head = per_norm + 4 * vocab + 8  # final norm, fp32 log-softmax, the token ids
    depth = 0 if lowest_block is None else model.n_layers - lowest_block
    if checkpointing:
        kept = (2 if dtype == "bfloat16" else 4) * d  # each block's input
        saved, working = tokens * (depth * kept + head), tokens * (min(depth, 1) * layer)
    else:
        saved, working = tokens * (depth * layer + head), 0
    working += tokens * (8 * d + max(10 * vocab, layer if depth else 0))  # residual grads; logits or a block
    shapes = _shapes(model)
    casts = 0
    if cuda and dtype == "float32":  # autocast keeps a bf16 copy of every matrix the backward goes through
        casts = sum(2 * math.prod(s) for n, s in shapes.items() if len(s) == 2 and _reached(n, lowest_block))
    return Activations(saved=saved, working=working, fixed=casts)  # the rotary tables: resident weights


@lru_cache(maxsize=64)
def _shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes, once per model: each call builds the model on the meta device."""
    return parameter_shapes(model)


@lru_cache(maxsize=256)
def _resident(model: ModelConfig, slices: SliceConfig | None, dtype: str, offload_outer: bool) -> ResidentBytes:
    """peer.core.memory's exact resident bytes, once per question (it cuts the model each time)."""
    codec = None if slices is None else CodecConfig()  # murmur's error feedback; DiLoCo's all-reduce has none
    return resident_bytes(model, slices, dtype=dtype, offload_outer=offload_outer, codec=codec)


def _reached(name: str, lowest_block: int | None) -> bool:
    block = block_of(name)
    if block is None:
        return True  # the (tied) head
    return lowest_block is not None and block >= lowest_block


@dataclass(frozen=True, slots=True)
class Plan:
    """How one peer trains on a device of `budget` usable bytes, or that it cannot."""

    micro_batch: int
    """0 when nothing fits."""
    grad_accum: int
    checkpointing: bool
    offload_outer: bool
    peak: int
    """Predicted peak of torch's allocator (max_memory_allocated), bytes."""
    budget: int
    """Usable bytes of the card: its size less CONTEXT_BYTES, times ALLOCATOR_SHARE."""
    host: int
    """Host bytes the plan moves there (the outer state when offloaded)."""

    @property
    def fits(self) -> bool:
        return self.micro_batch > 0

    def describe(self) -> str:
        """One phrase: "micro-batch 4 x 2" (+ what it needs) or "does not fit"."""
        if not self.fits:
            return "does not fit"
        needs = [n for n, on in (("checkpointing", self.checkpointing), ("offload", self.offload_outer)) if on]
        return f"micro-batch {self.micro_batch} x {self.grad_accum}" + (f" + {' + '.join(needs)}" if needs else "")


def usable_bytes(gpu_bytes: int) -> int:
    """Of a card's memory, what torch's allocator can hold in live tensors (CONTEXT_BYTES, ALLOCATOR_SHARE)."""
    return max(0, int((gpu_bytes - CONTEXT_BYTES) * ALLOCATOR_SHARE))


def footprint(model: ModelConfig, slices: SliceConfig | None, *, dtype: str = "float32",
              checkpointing: bool = False, offload_outer: bool = False, rest_step: float = 0.3,
              cuda: bool = True) -> tuple[int, int, int]:  # fmt: skip
    """(device bytes whatever the micro-batch, device bytes per sequence, host bytes) of training the worst
    slice of the run (a peer does not choose its slice), or DiLoCo's full model when `slices` is None."""
    resident = _resident(model, slices, dtype, offload_outer)
    rest = rest_step > 0 and slices is not None
    acts = activation_bytes(model, lowest_block=_lowest_block(model, slices, rest), checkpointing=checkpointing,
                            dtype=dtype, cuda=cuda)  # fmt: skip
    rest_grad = max(4 * math.prod(s) for s in _shapes(model).values()) if rest else 0
    # the daemon overlaps a round's exchange with the next round's steps: its own fp32 pseudo-gradient stays
    held = 0 if slices is None else resident.grads
    workspace = WORKSPACE_BYTES if cuda else 0
    return resident.device + acts.fixed + rest_grad + held + workspace, acts.per_sequence, resident.host


def step_peak(model: ModelConfig, slices: SliceConfig | None, micro_batch: int, *, cuda: bool = True) -> int:
    """The peak of one inner step alone (benchmarks/step_cost.py's Stepper: a model and its slice optimiser, no
    outer state, no error feedback, the rest frozen), for comparing with a measured peak."""
    resident = _resident(model, slices, "float32", False)
    acts = activation_bytes(model, lowest_block=_lowest_block(model, slices, False), cuda=cuda)
    state = resident.weights + resident.master + resident.grads + resident.optimizer
    return state + acts.fixed + (WORKSPACE_BYTES if cuda else 0) + micro_batch * acts.per_sequence


def peak_bytes(model: ModelConfig, slices: SliceConfig | None, micro_batch: int, **options: object) -> int:
    """Predicted peak of torch's allocator training `micro_batch` sequences at once (`footprint`'s options)."""
    fixed, per_sequence, _host = footprint(model, slices, **options)  # type: ignore[arg-type]
    return fixed + micro_batch * per_sequence


@lru_cache(maxsize=256)
def _lowest_block(model: ModelConfig, slices: SliceConfig | None, rest: bool) -> int | None:
    """The lowest block any slice's backward reaches: 0 for DiLoCo, units, neurons or a moving rest."""
    if slices is None or rest or slices.cut != "blocks":
        return 0
    lows = []
    for layout in partition(model, slices):
        blocks = [b for b in (block_of(n) for n in layout) if b is not None]
        lows.append(0 if trains_input_embedding(layout) else min(blocks, default=None))
    known = [b for b in lows if b is not None]
    return min(known) if known else None


def plan(model: ModelConfig, slices: SliceConfig | None, gpu_bytes: int, *, run_batch: int = 8,
         dtype: str = "float32", rest_step: float = 0.3, micro_batch: int | None = None) -> Plan:  # fmt: skip
    """The largest micro-batch (a divisor of the run's batch, or exactly `micro_batch`) that fits in a card
    of `gpu_bytes`, with the cheapest options that make it fit (module docstring), or a Plan that does not fit."""
    budget = usable_bytes(gpu_bytes)
    sizes = [micro_batch] if micro_batch else [d for d in range(run_batch, 0, -1) if run_batch % d == 0]
    best: Plan | None = None
    for checkpointing in (False, True):
        for offload in (False, True):
            for size in sizes:
                fixed, per_sequence, host = footprint(model, slices, dtype=dtype, checkpointing=checkpointing,
                                                      offload_outer=offload, rest_step=rest_step)  # fmt: skip
                peak = fixed + size * per_sequence
                if peak <= budget:
                    candidate = Plan(size, run_batch // size, checkpointing, offload, peak, budget, host)
                    if best is None or size > best.micro_batch:
                        best = candidate
                    break
        if best is not None:
            return best  # checkpointing only when nothing fits without it
    fixed, per_sequence, host = footprint(model, slices, dtype=dtype, checkpointing=True, offload_outer=True,
                                          rest_step=rest_step)  # fmt: skip
    return Plan(0, 0, True, True, fixed + sizes[-1] * per_sequence, budget, host)


@dataclass(frozen=True, slots=True)
class LargestRow:
    """The largest preset each method trains on one card size."""

    gpu_gb: int
    method: str
    """"diloco" or "murmur K=4 (units)"."""
    preset: str | None
    plan: Plan | None


def largest_presets(sizes_gb: tuple[int, ...] = HOME_GPUS_GB, ks: tuple[int, ...] = (4, 8), cut: str = "units", *,
                    run_batch: int = 8, dtype: str = "float32",
                    rest_step: float = 0.3) -> list[LargestRow]:  # fmt: skip
    """For every card size: the largest preset (by parameters) that DiLoCo and murmur at each K fit, with how."""
    by_size = sorted(PRESETS, key=lambda name: _resident(PRESETS[name], None, dtype, False).weights)
    methods: list[tuple[str, SliceConfig | None]] = [("diloco", None)]
    methods += [(f"murmur K={k} ({cut})", SliceConfig(num_slices=k, cut=cut)) for k in ks]
    rows = []
    for size in sizes_gb:
        for method, slices in methods:
            found = LargestRow(size, method, None, None)
            for name in by_size:
                if slices is not None and not _cuttable(PRESETS[name], slices):
                    continue
                fit = plan(PRESETS[name], slices, size * GIB, run_batch=run_batch, dtype=dtype, rest_step=rest_step)
                if fit.fits:
                    found = LargestRow(size, method, name, fit)
            rows.append(found)
    return rows


@lru_cache(maxsize=64)
def _cuttable(model: ModelConfig, slices: SliceConfig) -> bool:
    try:
        partition(model, slices)
    except ValueError:
        return False
    return True


def report_lines(preset: str, slices: SliceConfig, gpu_bytes: int, *, run_batch: int = 8,
                 micro_batch: int | None = None, dtype: str = "float32",
                 rest_step: float = 0.3) -> list[str]:  # fmt: skip
    """`murmur slices --gpu-memory`'s text: this preset on this card for murmur and DiLoCo, then the largest
    preset each fits on the home cards. Every figure is predicted (module docstring), none measured."""
    model = PRESETS[preset]
    options = {"run_batch": run_batch, "micro_batch": micro_batch, "dtype": dtype, "rest_step": rest_step}
    ours = plan(model, slices, gpu_bytes, **options)  # type: ignore[arg-type]
    theirs = plan(model, None, gpu_bytes, **options)  # type: ignore[arg-type]
    lines = ["", f"{preset} on a {gpu_bytes / GIB:.1f} GiB card ({dtype}, batch {run_batch}): "
                 f"{ours.budget / GIB:.1f} GiB usable after CUDA context and fragmentation (predicted)"]  # fmt: skip
    lines.append(f"{'method':<24}{'plan':<44}{'peak GiB':>9}{'host GiB':>9}")
    for name, fit in ((f"murmur K={slices.num_slices} ({slices.cut})", ours), ("diloco", theirs)):
        lines.append(f"{name:<24}{fit.describe():<44}{fit.peak / GIB:>9.2f}{fit.host / GIB:>9.2f}")
    lines += ["", f"largest preset that fits ({dtype}, batch {run_batch}, predicted):",
              f"{'GPU':<7}{'method':<24}{'preset':<8}plan"]  # fmt: skip
    for row in largest_presets(ks=(slices.num_slices, 8) if slices.num_slices != 8 else (8,), cut=slices.cut,
                               run_batch=run_batch, dtype=dtype, rest_step=rest_step):  # fmt: skip
        how = row.plan.describe() if row.plan else "nothing fits"
        lines.append(f"{row.gpu_gb:>2} GB  {row.method:<24}{row.preset or '-':<8}{how}")
    return lines
