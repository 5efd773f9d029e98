"""`murmur demo`: a whole swarm on loopback in one command, the README's first thing to try.

It runs the very commands a volunteer would (`bootstrap`, `create-run`, `run`) as real processes, so
what the demo shows is what the swarm does, not a simulation of it: a bootstrap node, a run owner and
N-1 volunteers train the `tiny` preset on the bundled corpus, the demo prints their round lines, then
stops them with SIGTERM (each checkpoints and exits 0), reads every checkpoint back through
`peer/node/checkpoint.py` and reports each peer's validation loss and that of their averaged weights.

The corpus goes through the same door as any run's data: `murmur prepare-data`'s code (peer/core/prepare.py, in this
process) makes it a prepared dataset (byte tokens), a loopback HTTP server in a thread of the demo
(peer/lab/dataserver.py) serves it, `create-run --data URL` names it in the manifest, and each peer fetches index.json
and the shards its stream reaches into its own cache.

Every child runs in its own session (peer/lab/harness.py, as in the tests), so its DHT helper processes
(p2pd) are in its process group; the `finally` of `run_demo` sends SIGTERM to every group still alive, then
SIGKILL after a grace period, so an error or Ctrl-C leaves nothing running. Paths handed to children are
absolute (a `pgrep -f` for the output directory finds every one of them): the demo execs each command, where the
tests fork theirs from a server that imported murmur once (peer/lab/forkserver.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peer.core.data import default_corpus_text, unigram_entropy
from peer.core.evaluation import average_weights
from peer.lab.dataserver import DataServer
from peer.lab.evaluate import corpus_for, evaluate_weights, run_from_dict
from peer.lab.harness import MADDR_LINE, Proc, Procs, run_toml
from peer.node import checkpoint
from peer.node.roundline import parse_all
from protocol.errors import DemoError


def demo_toml(slices: int, preset: str = "tiny", min_round_s: float | None = None) -> str:
    """The demo's run config: K slices, H=10, one partner a round (tests/test_daemon_swarm.py runs it too, on
    `micro` with rounds paced by `min_round_s`, so that the processes it starts mid-test get CPU)."""
    return run_toml("demo", preset=preset, slices=slices, steps_per_round=10, fanout=1, min_round_s=min_round_s)
"""Rounds of a few tenths of a second on one CPU core: many rounds in a few minutes."""
STARTUP_S = 180.0
"""How long the bootstrap node may take to print its address: a bound that it comes up, even on a busy machine (its
start imports torch and starts p2pd; 5 s idle)."""
DEMO_SHARD_TOKENS = 1 << 19
"""About 8 shards of the 4 MB corpus: each peer fetches only those its stream reaches, as volunteers would."""
STOP_GRACE_S = 45.0
ERROR_TAIL = 15
"""Lines of a child's stdout and stderr a DemoError quotes: enough to see why, short enough for a terminal."""


def rounds(peer: Proc) -> list[tuple[int, float]]:
    """(round, loss) of every round line `peer` has printed so far (its reader thread may still be adding)."""
    return [(r.round, r.loss) for r in parse_all(list(peer.lines))]


@dataclass(kw_only=True, slots=True)
class DemoOptions:
    out: Path = Path("demo-out")
    peers: int = 4
    slices: int = 2
    seconds: float = 180.0
    """Training time, from the moment the peers are started."""
    progress_every: float = 5.0

    def __post_init__(self) -> None:
        if self.peers < 1 or self.slices < 1 or self.seconds <= 0 or self.progress_every <= 0:
            raise ValueError("--peers and --slices must be >= 1, --minutes > 0")


@dataclass(kw_only=True, slots=True)
class PeerResult:
    name: str
    exit_code: int | None
    history: list[tuple[int, float]]
    round: int | None = None
    """Round of its checkpoint (None: it saved none)."""
    val_loss: float | None = None


@dataclass(kw_only=True, slots=True)
class DemoReport:
    peers: list[PeerResult]
    averaged_val_loss: float | None
    unigram_entropy: float
    run_id: str
    run_key: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "run_key": self.run_key, "seconds": self.seconds,
            "unigram_entropy": self.unigram_entropy, "averaged_val_loss": self.averaged_val_loss,
            "peers": [{"name": p.name, "exit_code": p.exit_code, "checkpoint_round": p.round, "val_loss": p.val_loss,
                       "rounds": len(p.history), "last_train_loss": p.history[-1][1] if p.history else None,
                       "history": p.history} for p in self.peers],
            **self.extra,
        }  # fmt: skip


def murmur_argv(*args: str) -> list[str]:
    """The CLI as a child process, with this interpreter (works without the entry point on PATH)."""
    return [sys.executable, "-m", "peer.cli.main", *args]


def child_env(out: Path, name: str) -> dict[str, str]:
    """One core per peer, a private MURMUR_HOME (owner-key pins are per home) and dataset cache (each peer
    fetches its own shards, as a volunteer's machine would)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MURMUR_HOME": str(out / f"home-{name}"),
            "MURMUR_CACHE": str(out / f"cache-{name}")}  # fmt: skip


def prepare_corpus(out: Path) -> Path:
    """The embedded corpus as a prepared dataset in out/dataset (made again each demo), by what `murmur prepare-data`
    runs (peer/core/prepare.py), in this process: a `prepare-data` process of its own spent its start importing torch
    again (3-4 s idle, 30 s and more beside a busy test worker). Byte tokens and every 20th document held out, as
    the in-memory corpus splits it: the demo's losses stay comparable with the runs that train on that corpus."""
    from peer.core.prepare import PrepareOptions, prepare

    folder, text = out / "dataset", out / "corpus.txt"
    shutil.rmtree(folder, ignore_errors=True)
    text.write_text(default_corpus_text())
    opts = PrepareOptions(inputs=(str(text),), out=folder, tokenizer="bytes", shard_tokens=DEMO_SHARD_TOKENS,
                          heldout_fraction=0.05, progress=False)  # fmt: skip
    try:
        prepare(opts)
    except (ValueError, OSError) as exc:  # DataError, SetupError; a disk that refuses the shards
        raise DemoError(f"preparing the embedded corpus failed: {exc}") from exc
    return folder


def create_run(out: Path, slices: int, data_url: str) -> tuple[str, str]:
    """Write run.toml, sign the manifest (naming the dataset at `data_url`) with a fresh owner key; (run id,
    run key)."""
    (out / "run.toml").write_text(demo_toml(slices))
    argv = murmur_argv("create-run", "--config", str(out / "run.toml"), "--key", str(out / "owner.key"),
                       "--out", str(out / "manifest.json"), "--data", data_url)  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, cwd=out, env=child_env(out, "owner"), timeout=120)
    if done.returncode != 0:
        raise DemoError(f"create-run failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    lines = done.stdout.strip().splitlines()
    run_id = next((line.split()[-1] for line in lines if line.startswith("run id")), "")
    return run_id, lines[-1].strip()


def start_peer(procs: Procs, index: int, maddr: str, run_key: str) -> Proc:
    """Peer 0 is the run owner (publishes the manifest); the others need only the run key."""
    out, name = procs.workdir, f"peer{index}"
    who = (["--manifest", str(out / "manifest.json"), "--key", str(out / "owner.key")] if index == 0
           else ["--run-key", run_key])  # fmt: skip
    argv = murmur_argv("run", "--swarm", "demo", "--initial-peers", maddr, *who,
                       "--identity", str(out / f"{name}.id"), "--checkpoint-dir", str(out / f"ckpt-{name}"),
                       "--listen", "127.0.0.1:0", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", "cpu",
                       "--announce-ttl", "10", "--eval-every", "0")  # fmt: skip
    return procs.start(name, argv, child_env(out, name))


def show_progress(peers: list[Proc], elapsed: float) -> None:
    for peer in peers:
        history = rounds(peer)
        state = f"round {history[-1][0]:4d}  loss {history[-1][1]:.3f}" if history else "starting"
        print(f"[{elapsed:5.0f}s] {peer.name:7s} {state}", flush=True)


class TrainingCutShort(Exception):
    """Raised (by the command's SIGINT handler) while the swarm trains: stop now, and still report."""


def train_for(peers: list[Proc], seconds: float, progress_every: float) -> None:
    """Let the swarm train, printing progress; DemoError if a peer exits on its own."""
    start = time.monotonic()
    next_report = start + progress_every
    while (now := time.monotonic()) < start + seconds:
        for peer in peers:
            if peer.popen.poll() is not None:
                raise DemoError(f"{peer.name} exited early with code {peer.popen.returncode}\n{peer.logs()}")
        if now >= next_report:
            show_progress(peers, now - start)
            next_report += progress_every
        time.sleep(min(0.5, max(0.05, start + seconds - now)))


def run_demo(opts: DemoOptions) -> DemoReport:
    """Start, train, stop and evaluate the demo swarm; every child is gone when this returns or raises."""
    out = opts.out.resolve()
    procs = Procs(out, error=DemoError, tail=ERROR_TAIL, fork=False)  # each child exec'd: the volunteer's command
    started = time.monotonic()
    server: DataServer | None = None
    try:
        dataset = prepare_corpus(out)
        server = DataServer(dataset)  # a thread of this process, serving the shards the peers fetch
        print(f"dataset {dataset} served at {server.url}", flush=True)
        run_id, run_key = create_run(out, opts.slices, server.url)
        boot = procs.start("bootstrap", murmur_argv("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity",
                                                    str(out / "boot.key"), "--addrs-file", str(out / "boot.addrs")),
                           child_env(out, "bootstrap"))  # fmt: skip
        maddr = boot.wait_for(MADDR_LINE, STARTUP_S)[1]
        print(f"bootstrap node at {maddr}; run key {run_key}", flush=True)
        peers = [start_peer(procs, i, maddr, run_key) for i in range(opts.peers)]
        print(f"{opts.peers} peers training the tiny preset, K={opts.slices}, for {opts.seconds:.0f}s "
              f"(logs in {out / 'logs'})", flush=True)  # fmt: skip
        try:
            train_for(peers, opts.seconds, opts.progress_every)
        except TrainingCutShort:
            print("Ctrl-C: training ends early (Ctrl-C again aborts without the report)", flush=True)
        print("stopping the peers (SIGTERM: each saves a checkpoint and exits)", flush=True)
        codes = [peer.stop(STOP_GRACE_S) for peer in peers]
        boot.stop(STOP_GRACE_S)
        report = evaluate_peers(out, peers, codes, run_id)
        report.run_key, report.seconds = run_key, time.monotonic() - started
        return report
    finally:
        procs.stop_all()
        if server is not None:
            server.close()


def evaluate_peers(out: Path, peers: list[Proc], codes: list[int | None], run_id: str) -> DemoReport:
    """Each peer's newest checkpoint, its val loss, and the val loss of all their phi averaged."""
    results, phis, run = [], [], None
    for peer, code in zip(peers, codes):
        result = PeerResult(name=peer.name, exit_code=code, history=rounds(peer))
        with _quiet(checkpoint.log):  # its "resuming from" line would mislead here
            state = checkpoint.load_latest(out / f"ckpt-{peer.name}", run_id=run_id)
        if state is not None:
            run = run or run_from_dict(state.manifest)
            result.round = state.round
            phis.append(state.phi)
        results.append(result)
    if run is None:
        raise DemoError(f"no peer saved a checkpoint (logs in {out / 'logs'})")
    corpus = corpus_for(run, out / "dataset")  # the held-out shard, read where the demo prepared it
    states = iter(phis)
    for result in results:
        if result.round is not None:
            result.val_loss = evaluate_weights(run, next(states), corpus)
    averaged = average_weights(phis)
    return DemoReport(peers=results, averaged_val_loss=evaluate_weights(run, averaged, corpus),
                      unigram_entropy=unigram_entropy(corpus.val, corpus.vocab_size), run_id=run_id, run_key="",
                      seconds=0.0)  # fmt: skip


@contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Only warnings and errors from `logger` inside the block (skipped snapshots still show)."""
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def format_table(report: DemoReport) -> str:
    """The table the demo ends with (human output)."""
    rows = [f"{'peer':8s} {'rounds':>6s} {'train loss':>10s} {'val loss':>9s} {'exit':>5s}"]
    for p in report.peers:
        train = f"{p.history[-1][1]:.4f}" if p.history else "-"
        val = f"{p.val_loss:.4f}" if p.val_loss is not None else "-"
        code = "-" if p.exit_code is None else str(p.exit_code)
        rows.append(f"{p.name:8s} {len(p.history):6d} {train:>10s} {val:>9s} {code:>5s}")
    avg = f"{report.averaged_val_loss:.4f}" if report.averaged_val_loss is not None else "-"
    rows.append(f"val loss of the averaged weights: {avg}")
    rows.append(f"unigram entropy of the corpus:    {report.unigram_entropy:.4f}")
    return "\n".join(rows)


def write_outputs(report: DemoReport, out: Path) -> list[str]:
    """demo.json always; loss.png when matplotlib is installed. Messages for the user."""
    out = out.resolve()
    (out / "demo.json").write_text(json.dumps(report.to_json(), indent=2))
    messages = [f"wrote {out / 'demo.json'}"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [*messages, "no loss plot: matplotlib is not installed (pip install matplotlib)"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for p in report.peers:
        if p.history:
            ax.plot([r for r, _ in p.history], [loss for _, loss in p.history], label=p.name, linewidth=1)
    ax.axhline(report.unigram_entropy, color="grey", linestyle="--", linewidth=0.8, label="unigram entropy")
    ax.set_xlabel("round")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title("murmur demo: tiny preset on loopback")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    return [*messages, f"wrote {out / 'loss.png'}"]
