"""A worker process of a multi-GPU peer (`python -m peer.node.rank_worker`, started by peer/node/ranks.py).

It reads a WorkerSpec, then one Command per round, pickled on its stdin; EOF (rank 0 closed the pipe, or died)
ends it with exit 0. Between rounds it only waits on that pipe, so it holds no timeout; within a round it does
what rank 0 does on its rows of each micro-batch. It never touches the network beyond the loopback process
group, nor the data: rank 0 broadcasts every micro-batch. A poll of the parent's PID ends it if rank 0 is gone
while it is inside a collective (the pipe's EOF covers the idle case).
"""

from __future__ import annotations

import math
import os
import pickle
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import BinaryIO

import torch
import torch.distributed as dist

from peer.core.inner import SliceOptimizer, inner_round
from peer.core.model import Transformer, cast_parameters
from peer.core.slices import partition
from peer.node import ranks
from peer.node.ranks import Command, RankHalted, WorkerSpec

PARENT_POLL_S = 0.5


def _watch_parent(parent: int) -> None:
    """Exit when rank 0 is gone, whatever this process is blocked in."""
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            os._exit(1)


def _replica(spec: WorkerSpec, device: torch.device) -> Transformer:
    """The model as rank 0 builds it (the weights come from rank 0 every round anyway)."""
    torch.manual_seed(spec.run.data.seed)
    model = Transformer(spec.run.model)
    if spec.run.dtype != "float32":
        cast_parameters(model, spec.run.dtype)
    model.to(device)
    model.checkpointing = spec.checkpointing
    return model


def serve(spec: WorkerSpec, commands: BinaryIO) -> None:
    """Join the group, then train every round rank 0 commands until EOF."""
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    wait = timedelta(seconds=spec.timeout_s)
    store = dist.TCPStore("127.0.0.1", spec.port, spec.world, is_master=False, timeout=wait)
    dist.init_process_group(ranks.backend(device), store=store, rank=spec.rank, world_size=spec.world, timeout=wait)
    model = _replica(spec, device)
    layouts = partition(spec.run.model, spec.run.slices)
    optimizer: SliceOptimizer | None = None
    current = -1

    def batches(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return ranks.own_rows(ranks.broadcast_batch(None, device), spec.rank, spec.world)

    while True:
        try:
            command: Command = pickle.load(commands)
        except EOFError:
            break
        if optimizer is None or command.slice != current:
            if optimizer is not None:
                optimizer.close()
            optimizer = SliceOptimizer(model, layouts[command.slice], spec.inner)
            optimizer.reduce = ranks.averager(spec.world)
            current = command.slice
        if command.start is None:
            ranks.broadcast_weights(model)
            start = None
        else:
            start = ranks.broadcast_start(model, None, command.start, device)
        if command.moments is not None:
            state = {name: torch.empty(shape, device=device) for name, shape in command.moments}
            for value in state.values():
                dist.broadcast(value, src=0)
            optimizer.load_state_dict({**state, "steps": torch.tensor(command.steps)})
        try:
            loss = inner_round(model, optimizer, batches, device, start=start).mean_loss
        except RankHalted:
            continue  # rank 0 abandoned the round: wait for its next word
        except FloatingPointError:
            loss = math.nan  # rank 0 says so, and decides
        ranks.mean_loss(loss, device)
    dist.destroy_process_group()


def main() -> int:
    """Exit 0 on EOF; 1 with one line on stderr on any failure (rank 0 then says which rank stopped)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: rank 0 decides
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True, name="murmur-parent").start()
    commands = sys.stdin.buffer
    try:
        spec: WorkerSpec = pickle.load(commands)
        serve(spec, commands)
    except EOFError:
        return 0
    except Exception as exc:  # one line for the user; rank 0 names this rank
        text = str(exc).strip().splitlines()
        print(f"murmur worker: {text[0][:200] if text else type(exc).__name__}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
