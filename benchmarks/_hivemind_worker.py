"""One peer of hivemind's collaborative optimizer training murmur's `tiny` model: the baseline of vs_hivemind.

Why it is a separate process: the comparison must run every peer as its own process (own DHT, own p2pd,
own network namespace), exactly as murmur's peers run, so CPU and bytes are counted the same way for both.

The set-up is hivemind's documented one (its quickstart): a `hivemind.DHT`, then `hivemind.Optimizer` over
a torch optimizer with `batch_size_per_step` and `target_batch_size`, in one of the two modes its users pick:

- default (`use_local_updates=False`): every peer accumulates gradients until the swarm has processed
  `target_batch_size` samples, then the peers all-reduce their averaged gradients and each applies the same
  AdamW step (its state averaged in the background): synchronous large-batch training.
- `--local-updates` (`use_local_updates=True`): every peer applies its own AdamW step on every local batch,
  and each time the swarm has processed `target_batch_size` samples (an epoch) the peers average their
  parameters (every `--average-state-every` epochs): local SGD, the DiLoCo-like set-up for slow links.

`--compression` is what hivemind's docs suggest for the averaged tensors (both gradients and state): `fp16`
(Float16Compression) or `8bit` (SizeAdaptiveCompression: Uniform8BitQuantization for tensors of 2**16+1
elements or more, Float16 for the small ones, as in hivemind's ALBERT example).

What it shares with murmur: the model (`tiny` preset, same seed, so the same initial weights), the corpus
and tokenizer (the embedded byte-level corpus), disjoint training windows per peer (`TokenStream`), the
inner AdamW settings and gradient clipping, and the held-out windows of the daemon's `eval round N
val_loss` lines (`peer.core.evaluation.val_loss`, batch 2 x the training batch, 8 batches).

Output: one JSON object per stdout line (`event`: "maddrs", "joined", "eval", "done", "error"), read by
benchmarks/vs_hivemind.py. `--bootstrap` runs only a DHT node that peers find each other through (as
`murmur bootstrap` does for murmur) until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

import torch

from peer.core.data import TokenStream, load_corpus
from peer.core.evaluation import val_loss
from peer.core.inner import InnerConfig, lr_at
from peer.core.model import Transformer, preset

INNER = InnerConfig()
"""murmur's inner optimiser defaults (slots dataclass: read them from an instance)."""
COMPRESSIONS = ("none", "fp16", "8bit")


def compression(name: str) -> Any:
    """hivemind's compression of the averaged tensors, by the name `--compression` takes."""
    from hivemind.compression import Float16Compression, NoCompression, SizeAdaptiveCompression, Uniform8BitQuantization

    if name == "fp16":
        return Float16Compression()
    if name == "8bit":  # hivemind's ALBERT example: 8-bit for big tensors, fp16 for the small ones
        return SizeAdaptiveCompression(threshold=2**16 + 1, less=Float16Compression(),
                                       greater_equal=Uniform8BitQuantization())  # fmt: skip
    return NoCompression()


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout, stamped with this process's wall clock."""
    print(json.dumps({"event": event, "time": time.time(), **fields}), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="IPv4 address the DHT listens on")
    p.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of a DHT node already running")
    p.add_argument("--bootstrap", action="store_true", help="run only a DHT node and print its multiaddrs")
    p.add_argument("--run-id", default="vs-hivemind")
    p.add_argument("--index", type=int, default=0, help="this peer's data stream, 0..num-peers-1")
    p.add_argument("--num-peers", type=int, default=4)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=8, help="samples per local step (batch_size_per_step)")
    p.add_argument("--target-batch-size", type=int, default=320, help="samples the swarm gathers per global step")
    p.add_argument("--epochs", type=int, default=12, help="stop after this many global steps (hivemind epochs)")
    p.add_argument(
        "--max-local-steps",
        type=int,
        default=0,
        help="also stop after this many local steps, this peer's share of the token budget (0: no limit)",
    )
    p.add_argument("--lr", type=float, default=INNER.lr)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--matchmaking-time", type=float, default=3.0, help="hivemind's quickstart value")
    p.add_argument("--averaging-timeout", type=float, default=10.0, help="hivemind's quickstart value")
    p.add_argument("--local-updates", action="store_true", help="use_local_updates=True (local SGD)")
    p.add_argument("--average-state-every", type=int, default=1, help="epochs between two state averagings")
    p.add_argument("--compression", choices=sorted(COMPRESSIONS), default="none", help="of the averaged tensors")
    p.add_argument("--eval-every", type=int, default=1, help="validation loss every N epochs (0: never)")
    p.add_argument("--seed", type=int, default=0, help="model init seed (murmur's run.data.seed: the same weights)")
    p.add_argument("--dht-timeout", type=float, default=90.0, help="seconds to wait for the DHT to start")
    p.add_argument("--start-timeout", type=float, default=180.0, help="seconds to wait for all --num-peers peers")
    args = p.parse_args(argv)
    if not 0 <= args.index < args.num_peers:
        p.error(f"--index must lie in [0, {args.num_peers})")
    if min(args.batch_size, args.target_batch_size, args.epochs, args.num_peers, args.average_state_every) < 1:
        p.error("--batch-size, --target-batch-size, --epochs, --num-peers and --average-state-every must be >= 1")
    return args


def wait_for_signal(stop: threading.Event) -> None:
    """SIGTERM/SIGINT set `stop` (the training loop checks it between steps)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


def run_bootstrap(args: argparse.Namespace, stop: threading.Event) -> int:
    import hivemind

    dht = hivemind.DHT(host_maddrs=[f"/ip4/{args.host}/tcp/0"], start=True, startup_timeout=args.dht_timeout)
    emit("maddrs", maddrs=[str(m) for m in dht.get_visible_maddrs()])
    try:
        while not stop.wait(0.5):
            pass
    finally:
        dht.shutdown()
    return 0


def make_optimizer(args: argparse.Namespace, model: torch.nn.Module, dht: Any) -> Any:
    """hivemind.Optimizer with murmur's inner AdamW and its warm-up + cosine schedule, counted in epochs (hivemind
    steps the scheduler once per epoch in both modes)."""
    import hivemind

    inner = InnerConfig(lr=args.lr, warmup_steps=args.warmup_epochs, total_steps=args.epochs)

    def schedule(epoch: int) -> float:
        return lr_at(epoch, inner) / inner.lr

    return hivemind.Optimizer(
        dht=dht, run_id=args.run_id, batch_size_per_step=args.batch_size, target_batch_size=args.target_batch_size,
        params=model.parameters(),
        optimizer=lambda params: torch.optim.AdamW(params, lr=inner.lr, betas=inner.betas,
                                                   weight_decay=inner.weight_decay),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        use_local_updates=args.local_updates, average_state_every=args.average_state_every,
        grad_compression=compression(args.compression), state_averaging_compression=compression(args.compression),
        matchmaking_time=args.matchmaking_time, averaging_timeout=args.averaging_timeout, verbose=False,
    )  # fmt: skip


def wait_for_peers(dht: Any, args: argparse.Namespace, stop: threading.Event) -> bool:
    """Block until all `--num-peers` peers have joined the DHT (a rendezvous key, a subkey per peer).

    Without it a peer whose DHT started first reached the target batch alone, finished its epochs in seconds
    and left; the late one then found no averaging group and no peer to download state from, and kept its
    initial weights (tests/test_vs_hivemind failed so on a loaded machine)."""
    from hivemind.utils import get_dht_time

    key, deadline = f"{args.run_id}_rendezvous", time.monotonic() + args.start_timeout
    while not stop.is_set() and time.monotonic() < deadline:
        dht.store(key, subkey=args.index, value=True, expiration_time=get_dht_time() + args.start_timeout + 600)
        found = dht.get(key, latest=True)
        if found is not None and len(found.value) >= args.num_peers:
            return True
        stop.wait(0.5)
    return False


def train(args: argparse.Namespace, stop: threading.Event) -> int:
    import hivemind

    torch.manual_seed(args.seed)  # as peer/node/trainer.py does: every peer of either system starts here
    config = preset(args.preset)
    model = Transformer(config)
    corpus = load_corpus(None)
    windows = corpus.train.numel() // (config.seq_len + 1)
    num_streams = max(args.num_peers, min(1024, windows // (2 * args.batch_size)))  # as the daemon's Trainer
    stream = TokenStream(corpus.train, config.seq_len, stream_index=args.index, num_streams=num_streams,
                         steps_per_round=1, seed=0)  # fmt: skip
    dht = hivemind.DHT(host_maddrs=[f"/ip4/{args.host}/tcp/0"], initial_peers=args.initial_peers, start=True,
                       startup_timeout=args.dht_timeout)  # fmt: skip
    opt = make_optimizer(args, model, dht)
    emit("joined", index=args.index, maddrs=[str(m) for m in dht.get_visible_maddrs()])
    if not wait_for_peers(dht, args, stop):
        emit("error", error=f"fewer than {args.num_peers} peers joined within {args.start_timeout:.0f} s")
        shut_down(opt, dht)
        return 1
    step = last_eval = eval_step = 0
    try:
        while opt.local_epoch < args.epochs and not stop.is_set():
            if args.max_local_steps and step >= args.max_local_steps:
                break
            model.train()
            x, y = stream.batch(step, 0, args.batch_size)
            loss = model.loss(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), INNER.grad_clip)  # as murmur's inner step
            opt.step()
            opt.zero_grad()
            step += 1
            emit("step", step=step, epoch=opt.local_epoch, loss=float(loss.detach()))
            if args.eval_every and opt.local_epoch >= last_eval + args.eval_every:
                last_eval, eval_step = opt.local_epoch, step
                evaluate(model, config, corpus, opt.local_epoch, step, args.batch_size)
        if args.eval_every and step > eval_step:  # stopped at --max-local-steps: score the weights it ends with
            evaluate(model, config, corpus, opt.local_epoch, step, args.batch_size)
        emit("done", epoch=opt.local_epoch, steps=step, samples=step * args.batch_size)
    finally:
        shut_down(opt, dht)
    return 0


def evaluate(model: torch.nn.Module, config: Any, corpus: Any, epoch: int, step: int, batch_size: int) -> None:
    """An `eval` line: the validation loss of the weights this peer holds now, on the daemon's held-out windows."""
    model.eval()
    loss_val = val_loss(model, corpus, seq_len=config.seq_len, batch_size=2 * batch_size)
    emit("eval", epoch=epoch, step=step, samples=step * batch_size, val_loss=loss_val)


def shut_down(opt: Any, dht: Any, grace_s: float = 15.0) -> None:
    """Optimizer, then DHT, within `grace_s`: hivemind 1.1.12's shutdown can hang on its averager's pipe (seen
    here), so the caller exits with os._exit after this and the orchestrator reaps the process group."""
    stopper = threading.Thread(target=lambda: (opt.shutdown(), dht.shutdown()), daemon=True)
    stopper.start()
    stopper.join(grace_s)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stop = threading.Event()
    wait_for_signal(stop)
    torch.set_num_threads(1)
    try:
        code = run_bootstrap(args, stop) if args.bootstrap else train(args, stop)
    except Exception as exc:  # report why to the orchestrator, with the traceback on stderr
        emit("error", error=repr(exc))
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # hivemind's helper processes and threads would otherwise keep a finished peer alive


if __name__ == "__main__":
    main()
