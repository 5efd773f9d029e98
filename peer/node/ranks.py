"""A multi-GPU volunteer (`murmur run --gpus N`): one peer, one identity, N processes that train each round together.

The daemon's process is rank 0: it alone joins, announces, gossips, takes the outer step and saves checkpoints.
It starts N - 1 worker processes (peer/node/rank_worker.py, ranks 1..N-1: cuda:i+r next to rank 0's cuda:i, or
all on the CPU with gloo), each holding a replica of the model and of the slice's optimiser, and drives them
through `torch.distributed` during `Trainer.train_round` only:

- At a round's start rank 0 sends a `Command` down each worker's stdin (a pipe, not a collective: an idle
  worker waits as long as the exchange takes, with no timeout to outlive, and reads EOF the moment rank 0 is
  gone), then broadcasts the round's starting weights and, when its optimiser is new or was restored, the AdamW
  moments, so every replica starts the round identical.
- Rank 0 reads every micro-batch from its stream exactly as a single-process peer does and broadcasts it; rank r
  trains rows [r B/N, (r+1) B/N) of it. Each rank's loss is the mean over its rows, so the average of the
  ranks' gradients is the micro-batch's gradient: the peer trains the same tokens with the same steps as a
  one-GPU peer with the same --batch-size and --grad-accum.
- `SliceOptimizer.reduce` averages gradients across ranks: the owned slice's accumulated gradients once per step
  (before clipping), and with rest_step > 0 each unowned gradient inside its post-accumulate hook, before its
  sign step. Why within each micro-batch rather than micro-batches spread over ranks: the rest step moves the
  weights after every micro-batch, so micro-batch m + 1 is computed on weights micro-batch m moved; splitting
  each micro-batch keeps that order, and the sign is taken of the whole micro-batch's gradient, as alone.
  Hooks fire in autograd's order, the same on every rank (same model, same shapes), so the collectives match.
- A worker that dies breaks the next collective (gloo at once; NCCL at the group's timeout): rank 0 raises
  RankFailed, one line, and the daemon stops. Rank 0 that dies closes the pipes: the workers exit.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import IO

import torch
import torch.distributed as dist

from peer.config import RunConfig
from peer.core.inner import Batches, InnerConfig, InnerStats, SliceOptimizer, inner_round
from peer.core.model import Transformer
from protocol.errors import MurmurError, SetupError
from protocol.logs import get_logger

log = get_logger(__name__)

WORKER_MODULE = "peer.node.rank_worker"
TIMEOUT_S = 300.0
"""How long a collective (and the start-up rendezvous) may wait for a rank: far above any skew between
ranks within a round, which is all the ranks ever wait on each other for."""


class RankFailed(MurmurError):
    """A worker process of this multi-GPU peer died or stopped answering: the peer stops."""


class RankHalted(Exception):
    """A worker's round was abandoned by rank 0 (SIGTERM there): the worker goes back to waiting."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker needs to build its replica and join the group (pickled down its stdin)."""

    run: RunConfig
    inner: InnerConfig
    world: int
    rank: int
    port: int
    device: str
    timeout_s: float
    checkpointing: bool = False


@dataclass(frozen=True, slots=True)
class Command:
    """One round: the slice, the optimiser's step count, the dtype of the starting weights rank 0 broadcasts
    (phi's, which a bf16 model's fp32 masters begin from; None: the model's own parameters), and the AdamW
    moments' (name, shape) it broadcasts after them (None: the workers' own moments are rank 0's already)."""

    slice: int
    steps: int
    moments: list[tuple[str, tuple[int, ...]]] | None
    start: torch.dtype | None = None


def rank_devices(device: torch.device, world: int) -> list[torch.device]:
    """The device of each rank: all CPU (gloo), or `world` consecutive CUDA devices from rank 0's."""
    if world < 1:
        raise SetupError(f"--gpus {world}: give 1 or more")
    if device.type != "cuda":
        return [device] * world
    first = device.index or 0
    visible = torch.cuda.device_count()
    if first + world > visible:
        raise SetupError(f"--gpus {world} from cuda:{first} needs {first + world} CUDA devices; {visible} visible")
    return [torch.device("cuda", first + r) for r in range(world)]


def check_gpus(device_name: str, gpus: int) -> None:
    """`--gpus N` against `--device`: N CUDA devices from its index on, or the CPU when asked for by name."""
    from peer.core.devices import pick_device

    device = pick_device(device_name)
    if device.type == "cpu" and device_name != "cpu":
        raise SetupError(f"--gpus {gpus} needs {gpus} CUDA devices; none visible (--device cpu runs {gpus} CPU "
                         "processes)")  # fmt: skip
    rank_devices(device, gpus)


def backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def averager(world: int) -> Callable[[list[torch.Tensor]], None]:
    """`SliceOptimizer.reduce`: the tensors, in place, averaged over the ranks, in one all-reduce (fp32)."""

    def reduce(tensors: list[torch.Tensor]) -> None:
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    return reduce


def _wire(t: torch.Tensor, gloo: bool) -> torch.Tensor:
    """`t` as gloo can broadcast it: bf16 bits as int16 (a bitwise copy, whatever the backend supports)."""
    return t.view(torch.int16) if gloo and t.dtype == torch.bfloat16 else t


@torch.no_grad()
def broadcast_weights(model: Transformer) -> None:
    """Every parameter from rank 0, in place, at the model's dtype."""
    gloo = dist.get_backend() == "gloo"
    for p in model.parameters():
        dist.broadcast(_wire(p.data, gloo), src=0)


@torch.no_grad()
def broadcast_start(model: Transformer, start: Mapping[str, torch.Tensor] | None, dtype: torch.dtype,
                    device: torch.device) -> dict[str, torch.Tensor]:  # fmt: skip
    """The round's starting weights at their dtype, from rank 0's `start` (None on the workers, which load them
    into their model as rank 0 did into its own); every rank's copy, by name."""
    gloo, out = dist.get_backend() == "gloo", {}
    for name, p in model.named_parameters():
        out[name] = start[name].to(device) if start is not None else torch.empty(p.shape, dtype=dtype, device=device)
        dist.broadcast(_wire(out[name], gloo), src=0)
        if start is None:
            p.copy_(out[name])
    return out


def broadcast_batch(batch: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device) -> torch.Tensor:
    """Rank 0 sends (x, y) stacked (or None: the round is abandoned); every rank returns the (2, B, T) stack.
    A worker raises RankHalted on None."""
    header = torch.zeros(3, dtype=torch.int64, device=device)
    if dist.get_rank() == 0 and batch is not None:
        header.copy_(torch.tensor([1, *batch[0].shape]))
    dist.broadcast(header, src=0)
    if int(header[0]) == 0:
        raise RankHalted("rank 0 abandoned the round")  # rank 0 has its own exception to raise: the caller's
    if dist.get_rank() == 0:
        assert batch is not None
        stacked = torch.stack(batch).to(device)
    else:
        stacked = torch.empty((2, int(header[1]), int(header[2])), dtype=torch.int64, device=device)
    dist.broadcast(stacked, src=0)
    return stacked


def mean_loss(own: float, device: torch.device) -> float:
    """The round's mean loss over every rank's rows (equal shares), the last collective of a round."""
    value = torch.tensor([own], dtype=torch.float64, device=device)
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


def own_rows(stacked: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of a micro-batch."""
    share = stacked.shape[1] // world
    part = stacked[:, rank * share : (rank + 1) * share]
    return part[0], part[1]


class Ranks:
    """Rank 0's side: the worker processes, and the rounds it drives them through (see the module docstring)."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], devices: list[torch.device], timeout_s: float) -> None:
        self.procs, self.devices, self.world, self.timeout_s = procs, devices, len(devices), timeout_s
        self.reduce = averager(self.world)
        self._optimizer: SliceOptimizer | None = None
        self._steps = -1

    @classmethod
    def start(cls, run: RunConfig, inner: InnerConfig, device: torch.device, world: int, *,
              checkpointing: bool = False, timeout_s: float = TIMEOUT_S) -> Ranks:  # fmt: skip
        """Start ranks 1..world-1 and the process group (blocking: a worker thread, never the event loop)."""
        devices = rank_devices(device, world)
        if inner.batch_size % world:
            raise SetupError(f"--gpus {world} splits each micro-batch over {world} processes, but it has "
                             f"{inner.batch_size} sequences; give --batch-size a multiple of {world}")  # fmt: skip
        wait = timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=wait, wait_for_workers=False)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for r in range(1, world):
                proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULE], stdin=subprocess.PIPE)
                procs.append(proc)
                spec = WorkerSpec(run=run, inner=inner, world=world, rank=r, port=store.port, device=str(devices[r]),
                                  timeout_s=timeout_s, checkpointing=checkpointing)  # fmt: skip
                _send(proc, spec)
            dist.init_process_group(backend(device), store=store, rank=0, world_size=world, timeout=wait)
        except (RuntimeError, OSError) as exc:
            _stop(procs)
            raise RankFailed(f"the {world} processes of --gpus {world} did not start together: {_line(exc)}") from None
        log.info("training on %d processes (%s, %s)", world, backend(device), ", ".join(map(str, devices)))
        return cls(procs, devices, timeout_s)

    def inner_round(self, slice_index: int, model: Transformer, optimizer: SliceOptimizer, batches: Batches,
                    device: torch.device, start: Mapping[str, torch.Tensor] | None = None) -> InnerStats:  # fmt: skip
        """`inner_round` over all ranks (`start`: phi, as there); rank 0's weights are then the peer's. Raises
        RankFailed."""
        optimizer.reduce = self.reduce
        fresh = optimizer is not self._optimizer or optimizer.steps != self._steps
        state = {k: v for k, v in optimizer.state_dict().items() if k != "steps"} if fresh else {}
        moments = [(k, tuple(v.shape)) for k, v in state.items()] if fresh else None
        dtype = None if start is None else next(iter(start.values())).dtype

        def split(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
            try:
                batch = batches(step, micro)
            except Exception:  # Halted (SIGTERM), or the data failed: the workers drop the round too
                with contextlib.suppress(RankHalted):
                    broadcast_batch(None, device)
                raise
            return own_rows(broadcast_batch(batch, device), 0, self.world)

        try:
            for proc in self.procs:
                _send(proc, Command(slice_index, optimizer.steps, moments, dtype))
            if start is None:
                broadcast_weights(model)
            else:
                broadcast_start(model, start, dtype, device)
            for value in state.values():
                dist.broadcast(value, src=0)
            self._optimizer, self._steps = None, -1  # until the round completes on every rank
            stats = inner_round(model, optimizer, split, device, start=start)
            loss = mean_loss(stats.mean_loss, device)
        except (RuntimeError, OSError) as exc:
            raise RankFailed(self._why(exc)) from None
        except FloatingPointError:
            mean_loss(math.nan, device)  # the workers wait for it whatever their own loss
            raise
        if not math.isfinite(loss):  # a worker's rows diverged
            raise FloatingPointError(f"inner loss became {loss}; lower the inner lr")
        self._optimizer, self._steps = optimizer, optimizer.steps
        return replace(stats, mean_loss=loss, tokens=stats.tokens * self.world)

    def _why(self, exc: BaseException) -> str:
        """One line: which worker died (and how), else what the collective said."""
        for r, proc in enumerate(self.procs, start=1):
            if proc.poll() is not None:
                return f"rank {r} of this peer's {self.world} processes exited (code {proc.returncode}); stopping"
        return f"a collective among this peer's {self.world} processes failed: {_line(exc)}"

    def close(self) -> None:
        """Tell the workers to exit, wait a little, kill what is left, leave the group."""
        _stop(self.procs)
        if dist.is_initialized():
            dist.destroy_process_group()


def _send(proc: subprocess.Popen[bytes], message: object) -> None:
    stdin: IO[bytes] | None = proc.stdin
    assert stdin is not None
    pickle.dump(message, stdin)
    stdin.flush()


def _stop(procs: list[subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
    """EOF on each worker's stdin (it exits 0 when idle), then SIGKILL for any still there after `grace_s`."""
    for proc in procs:
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
