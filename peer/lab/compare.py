"""Runs the simulator's methods side by side and reports them: table, JSON, plot, outer-lr sweep."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from peer.core.data import Corpus
from peer.core.outer import OuterConfig
from peer.lab.sim import DEFAULT_OUTER, MethodResult, SimConfig, Simulation, corpus_entropy
from protocol.files import atomic_write

# A small grid per rule: (lr, momentum, consensus). Nesterov ignores consensus.
SWEEP_GRID: dict[str, list[tuple[float, float, float]]] = {
    "nesterov": [(lr, mu, 0.0) for lr, mu in itertools.product((0.4, 0.7, 1.0), (0.5, 0.9))],
    "noloco": [(lr, beta, c) for lr, beta, c in itertools.product((0.5, 0.7, 1.0), (0.0, 0.5), (0.5, 0.7))],
    "gasloc": [(eta, gamma, a) for eta, gamma, a in itertools.product((0.5, 0.7, 1.0), (0.0, 0.5), (0.5, 1.0))],
}

Progress = Callable[[str], Callable[[], None]]


def run_methods(methods: list[str], corpus: Corpus, config: SimConfig, progress: Progress) -> dict:
    """Every method at the configured outer settings; the report dict `--json` writes."""
    results = {m: Simulation(m, corpus, config).run(progress(m)) for m in methods}
    return report(corpus, config, results)


def sweep(methods: list[str], corpus: Corpus, config: SimConfig, progress: Progress) -> dict:
    """Each method over its rule's grid; reports each at its best validation loss, with every try."""
    best: dict[str, MethodResult] = {}
    tried: dict[str, list[dict]] = {}
    for method in methods:
        base = config.outer.get(method)
        if base is None:  # ddp has no outer step
            best[method] = Simulation(method, corpus, config).run(progress(method))
            continue
        tried[method] = []
        for lr, momentum, consensus in SWEEP_GRID[base.rule]:
            outer = replace(base, lr=lr, momentum=momentum, consensus=consensus or base.consensus)
            trial = replace(config, outer={**config.outer, method: outer})
            result = Simulation(method, corpus, trial).run(progress(f"{method} {lr}/{momentum}/{consensus}"))
            tried[method].append({**result.outer, "val_loss": result.val_loss})
            if method not in best or result.val_loss < best[method].val_loss:
                best[method] = result
    out = report(corpus, config, best)
    out["sweep"] = tried
    return out


def report(corpus: Corpus, config: SimConfig, results: dict[str, MethodResult]) -> dict:
    return {
        "unigram_entropy_nats": corpus_entropy(corpus),
        "config": {
            "preset": asdict(config.model),
            "peers": config.peers,
            "rounds": config.rounds,
            "slices": config.slices.num_slices,
            "cut": config.slices.cut,
            "codec": config.codec.name,
            "inner_steps_per_round": config.inner.steps_per_round,
            "batch_size": config.inner.batch_size,
            "fanout": config.fanout,
            "overlap": config.overlap,
            "seed": config.seed,
        },
        "methods": {name: asdict(r) for name, r in results.items()},
    }


def format_table(data: dict) -> str:
    """The human table: one row per method."""
    head = (
        f"{'method':<20}{'val loss':>9}{'val(avg w)':>11}{'train':>8}{'tokens':>11}{'bytes/peer/rd':>15}"
        f"{'bwd FLOPs':>11}{'state B/peer':>13}{'consensus':>10}{'secs':>7}  outer"
    )
    lines = [f"unigram entropy of the corpus: {data['unigram_entropy_nats']:.3f} nats", head, "-" * len(head)]
    for name, r in data["methods"].items():
        outer = r["outer"]
        desc = f"{outer['rule']} lr={outer['lr']} m={outer['momentum']}" if outer else "-"
        if outer and outer["rule"] != "nesterov":
            desc += f" c={outer['consensus']}"
        lines.append(
            f"{name:<20}{r['val_loss']:>9.4f}{r['val_loss_of_mean_weights']:>11.4f}{r['train_loss']:>8.3f}"
            f"{r['tokens']:>11,}{r['bytes_per_peer_per_round']:>15,}{r['backward_flops']:>11.3g}"
            f"{r['peak_state_bytes_per_peer']:>13,}{r['consensus_distance']:>10.4f}{r['wall_seconds']:>7.0f}  {desc}"
        )
    return "\n".join(lines)


def write_json(data: dict, path: Path) -> None:
    """`data` as indented JSON at `path`, replaced in one step (a reader never sees half a result)."""
    atomic_write(path, json.dumps(data, indent=2).encode())


def plot(data: dict, path: Path) -> None:
    """Validation loss vs tokens, every method on one chart."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # matplotlib is a dev extra
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from error
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in data["methods"].items():
        tokens, losses = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(tokens, losses, marker="o", markersize=3, label=name)
    ax.axhline(data["unigram_entropy_nats"], color="grey", linestyle="--", label="unigram entropy")
    cfg = data["config"]
    ax.set(xlabel="tokens (all peers)", ylabel="validation loss (nats)",
           title=f"{cfg['peers']} peers, K={cfg['slices']} ({cfg['cut']}), codec {cfg['codec']}")  # fmt: skip
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["DEFAULT_OUTER", "OuterConfig", "format_table", "plot", "run_methods", "sweep", "write_json"]
