"""`murmur demo` and `murmur eval`: thin click commands over peer/lab/demo.py and peer/lab/evaluate.py.

User errors exit 1 (ClickException) with a message naming the path and the problem.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    import torch

    from peer.lab.evaluate import EvalResult


@click.command("demo")
@click.option("--peers", type=click.IntRange(1, 16), default=4, show_default=True, help="Peers to start.")
@click.option("--slices", type=click.IntRange(1, 8), default=2, show_default=True, help="K, the slices of the model.")
@click.option("--minutes", type=click.FloatRange(0, min_open=True), default=3.0, show_default=True,
              help="Training time before the peers are stopped.")  # fmt: skip
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"), show_default=True,
              help="Working directory: keys, manifest, checkpoints, logs, loss.png, demo.json.")  # fmt: skip
@click.option("--progress-every", type=click.FloatRange(0.5), default=5.0, show_default=True, help="Seconds.")
def demo(peers: int, slices: int, minutes: float, out: Path, progress_every: float) -> None:
    """A swarm on loopback: a bootstrap node and several peers (real processes) train the tiny preset on
    the bundled corpus, then stop cleanly; prints each peer's loss and that of their averaged weights.

    \b
    Example:
      murmur demo --peers 4 --minutes 3 --out demo-out
    """
    from peer.cli.preflight import usable_directory
    from peer.lab.demo import DemoOptions, TrainingCutShort, format_table, run_demo, write_outputs
    from protocol.errors import DemoError

    try:
        opts = DemoOptions(out=out, peers=peers, slices=slices, seconds=60 * minutes, progress_every=progress_every)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        usable_directory(out, "--out")
    except ValueError as exc:  # SetupError
        raise click.ClickException(str(exc)) from exc
    # The first SIGINT (Ctrl-C) while the swarm trains ends the training early and still reports; SIGTERM, and
    # SIGINT at any other time, end run_demo through its `finally`, which stops every child (they run in their
    # own sessions, so Ctrl-C reaches only this process). Set even where a shell started us ignoring SIGINT.
    interrupts = iter([TrainingCutShort])
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_interrupt),
        signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: _cut_short(interrupts)),
    }
    try:
        report = run_demo(opts)
    except DemoError as exc:
        raise click.ClickException(str(exc)) from exc
    except TrainingCutShort:  # Ctrl-C before the swarm trained: nothing to report
        raise click.Abort() from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo(format_table(report))
    for message in write_outputs(report, out):
        click.echo(message)
    click.echo(f"demo took {report.seconds:.0f}s")
    failed = [p.name for p in report.peers if p.exit_code != 0]
    if failed:
        raise click.ClickException(f"peer(s) {', '.join(failed)} did not exit cleanly; see {out / 'logs'}")


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _cut_short(interrupts: Iterator[type[Exception]]) -> None:
    """The first Ctrl-C raises what `interrupts` yields (run_demo catches it around the training and reports;
    before the training it aborts, as every later Ctrl-C does, through KeyboardInterrupt)."""
    raise next(interrupts, KeyboardInterrupt)


@click.command("eval")
@click.option("--checkpoint", "checkpoint_dir", type=click.Path(path_type=Path),
              help="A --checkpoint-dir (its newest valid snapshot) or one round-N directory in it.")  # fmt: skip
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path),
              help="The run's manifest.json, for a checkpoint that stores no run config.")  # fmt: skip
@click.option("--swarm", help="Evaluate a live peer of this swarm instead (needs --initial-peers and --run-key).")
@click.option("--initial-peers", multiple=True, help="Multiaddr of a bootstrap node, with --swarm; repeatable.")
@click.option("--run-key", help="The run owner's key (64 hex), with --swarm.")
@click.option("--peer", help="Peer id (or a prefix) to fetch the weights of, with --swarm; default: any.")
@click.option("--data", help="A local .txt/.jsonl file or folder, or a prepared dataset's folder, instead of the run's "
                             "data (its held-out split or shard).")
@click.option("--batches", type=click.IntRange(1), default=8, show_default=True, help="Held-out batches.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(5.0), default=120.0, show_default=True,
              help="Seconds to find the swarm and fetch a live peer's weights, with --swarm.")  # fmt: skip
@click.option("--device", default="cpu", show_default=True, help="Where to compute: auto|cpu|cuda|cuda:INDEX.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def evaluate(checkpoint_dir: Path | None, manifest: Path | None, swarm: str | None, initial_peers: tuple[str, ...],
             run_key: str | None, peer: str | None, data: str | None, batches: int, timeout_s: float, device: str,
             as_json: bool) -> None:  # fmt: skip
    """Validation loss and perplexity of a checkpoint's outer weights (phi), or of a live peer's.

    \b
    Examples:
      murmur eval --checkpoint ckpt-peer
      murmur eval --checkpoint ckpt-peer/round-000120 --json
      murmur eval --swarm demo --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/QmXyz... --run-key 23ad4316...
    """
    from peer.core.devices import pick_device
    from peer.lab.evaluate import evaluate_checkpoint
    from protocol.errors import MurmurError

    if (checkpoint_dir is None) == (swarm is None):
        raise click.UsageError("give either --checkpoint DIR or --swarm NAME (with --initial-peers and --run-key)")
    try:
        where = pick_device(device)
        if swarm is not None:
            result = _evaluate_live(swarm, initial_peers, run_key, peer, data, batches, where, timeout_s)
        else:
            assert checkpoint_dir is not None
            result = evaluate_checkpoint(checkpoint_dir, manifest=manifest, data=data, batches=batches, device=where)
    except (ValueError, OSError, MurmurError) as exc:  # CheckpointError is a ValueError; ManifestError a MurmurError
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    click.echo(f"{'peer' if swarm else 'checkpoint'} {result.path} (round {result.round}), corpus {result.corpus}")
    click.echo(f"val loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
               f"(unigram entropy {result.unigram_entropy:.4f})")  # fmt: skip


def _evaluate_live(swarm: str, initial_peers: tuple[str, ...], run_key: str | None, peer: str | None,
                   data: str | None, batches: int, device: torch.device, timeout_s: float) -> EvalResult:  # fmt: skip
    """Fetch a live peer's weights the way a late joiner does, then evaluate them."""
    from peer.core.data import unigram_entropy
    from peer.lab.evaluate import EvalResult, corpus_for, evaluate_weights, fetch_live_weights
    from protocol.logs import get_logger
    from protocol.manifest import parse_run_key

    log = get_logger(__name__)

    peers = tuple(item for text in initial_peers for item in text.replace(",", " ").split())
    if not peers or run_key is None:
        raise click.UsageError("--swarm needs --initial-peers and --run-key")
    try:
        owner = parse_run_key(run_key)
    except ValueError as exc:  # a bad flag, like `murmur run`'s: a usage error, before any DHT starts
        raise click.UsageError(str(exc)) from exc
    live = fetch_live_weights(swarm, peers, run_key=owner, peer=peer, timeout_s=timeout_s)
    corpus = corpus_for(live.run, data)
    log.info("eval: %d held-out batch(es) of %s on %s", batches, corpus.name, device)
    loss = evaluate_weights(live.run, live.phi, corpus, batches, device)
    return EvalResult(loss=loss, round=live.round, path=live.sender, corpus=corpus.name,
                      unigram_entropy=unigram_entropy(corpus.val, corpus.vocab_size))  # fmt: skip
