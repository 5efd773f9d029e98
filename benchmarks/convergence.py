"""Convergence at equal tokens: ddp, diloco, ppu and gossip-ppu with 8 and 16 peers, and what each codec costs.

    python -m benchmarks.convergence [--full] [--peers 8,16] [--codecs fp32,bf16,int8,int4,topk] [--jobs 2]

Every run is one `peer.lab.sim.Simulation` (through `peer.lab.compare.run_methods`) with the same token
budget, so rows compare side by side: validation loss (mean of each peer's own weights, and of the
peers' averaged weights), bytes each peer sends, and the consensus distance between peers' weights.
More peers split the same global batch: 16 peers train batch B/2 each, so the rounds, H and the
tokens per round match the 8-peer runs (ddp is then the same algorithm at both counts). The codec
table runs gossip-ppu at the first peer count with each pseudo-gradient codec; the consensus
weight slices always travel as bf16. Runs go to `--jobs` processes of `--threads` torch threads.
Writes `benchmarks/results/convergence[_full].json` unless `--json` names another path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from peer.core.data import load_corpus
from peer.core.inner import InnerConfig
from peer.core.model import PRESETS
from peer.core.slices import SliceConfig
from peer.lab.compare import run_methods
from peer.lab.sim import SimConfig
from protocol.codec import CODEC_NAMES, CodecConfig

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ddp", "diloco", "ppu", "gossip-ppu")
QUICK = {"rounds": 5, "H": 20, "batch_size": 8}
"""819,200 tokens per run with 8 peers: half of `make simulate` (10 rounds, 1,638,400 tokens)."""
FULL = {"rounds": 20, "H": 20, "batch_size": 8}


def build_config(s: dict, peers: int, codec: str) -> SimConfig:
    """The simulator config of one run; the per-peer batch shrinks with the peer count (equal tokens)."""
    batch = s["batch_size"] * s["peers"][0] // peers
    if batch < 1 or batch * peers != s["batch_size"] * s["peers"][0]:
        raise ValueError(f"{peers} peers cannot split a global batch of {s['batch_size'] * s['peers'][0]} evenly")
    total = s["rounds"] * s["H"]
    inner = InnerConfig(lr=3e-3, steps_per_round=s["H"], batch_size=batch, total_steps=total,
                        warmup_steps=min(50, max(1, total // 10)))  # fmt: skip
    return SimConfig(model=PRESETS[s["preset"]], inner=inner, slices=SliceConfig(num_slices=s["slices"], cut=s["cut"]),
                     codec=CodecConfig(name=codec), peers=peers, rounds=s["rounds"], seed=s["seed"],
                     eval_every=s["rounds"])  # fmt: skip


def one_run(job: tuple[dict, int, str, str]) -> dict:
    """One method at one peer count and codec, in whichever process the pool picked."""
    settings, peers, codec, method = job
    torch.set_num_threads(settings["threads"])
    cpu = time.process_time()
    report = run_methods([method], load_corpus(), build_config(settings, peers, codec), lambda _: lambda: None)
    result = report["methods"][method]
    return {"peers": peers, "codec": codec, "method": method, "config": report["config"],
            "unigram_entropy_nats": report["unigram_entropy_nats"], **result,
            "bytes_per_peer": result["bytes_per_peer_per_round"] * settings["rounds"],
            "cpu_seconds": time.process_time() - cpu}  # fmt: skip


def jobs(settings: dict, methods: list[str], codecs: list[str]) -> list[tuple[dict, int, str, str]]:
    """Methods at every peer count with the default codec, then gossip-ppu with each other codec."""
    default = settings["codec"]
    out = [(settings, peers, default, m) for peers in settings["peers"] for m in methods]
    return out + [(settings, settings["peers"][0], c, "gossip-ppu") for c in codecs if c != default]


def run_all(todo: list[tuple[dict, int, str, str]], workers: int) -> list[dict]:
    if workers <= 1:
        return [one_run(job) for job in todo]
    order = sorted(range(len(todo)), key=lambda i: -todo[i][1])  # the larger peer counts first
    with ProcessPoolExecutor(workers) as pool:
        done = dict(zip(order, pool.map(one_run, [todo[i] for i in order])))
    return [done[i] for i in range(len(todo))]


def methods_table(rows: list[dict], peers: int, codec: str) -> str:
    head = (f"{'method':<12}{'val loss':>9}{'val(avg w)':>11}{'train':>7}{'tokens':>11}{'MB sent/peer':>13}"
            f"{'consensus':>10}{'state MB/peer':>14}{'secs':>6}")  # fmt: skip
    lines = [f"{peers} peers, codec {codec}", head]
    for r in rows:
        if r["peers"] == peers and r["codec"] == codec:
            lines.append(f"{r['method']:<12}{r['val_loss']:>9.4f}{r['val_loss_of_mean_weights']:>11.4f}"
                         f"{r['train_loss']:>7.3f}{r['tokens']:>11,}{r['bytes_per_peer'] / 1e6:>13.2f}"
                         f"{r['consensus_distance']:>10.4f}{r['peak_state_bytes_per_peer'] / 1e6:>14.2f}"
                         f"{r['wall_seconds']:>6.0f}")  # fmt: skip
    return "\n".join(lines)


def codec_table(rows: list[dict], peers: int) -> str:
    gossip = {r["codec"]: r for r in rows if r["peers"] == peers and r["method"] == "gossip-ppu"}
    base = gossip.get("fp32")
    head = f"{'codec':<11}{'val loss':>9}{'vs fp32':>9}{'MB sent/peer':>13}{'bytes vs fp32':>14}{'consensus':>10}"
    lines = [f"gossip-ppu, {peers} peers, by pseudo-gradient codec", head]
    for codec in CODEC_NAMES:
        r = gossip.get(codec)
        if r is None:
            continue
        loss_gap = f"{r['val_loss'] - base['val_loss']:>+9.4f}" if base else f"{'-':>9}"
        size = f"{r['bytes_per_peer'] / base['bytes_per_peer']:>14.3f}" if base else f"{'-':>14}"
        lines.append(f"{codec:<11}{r['val_loss']:>9.4f}{loss_gap}{r['bytes_per_peer'] / 1e6:>13.2f}{size}"
                     f"{r['consensus_distance']:>10.4f}")  # fmt: skip
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help=f"The longer run: {FULL['rounds']} rounds.")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--peers", default="8,16", help="Peer counts; the first sets the global batch.")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--codecs", default=",".join(CODEC_NAMES), help="Codecs for gossip-ppu ('' for none).")
    parser.add_argument("--codec", default="int8", help="The codec of the method comparison.")
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--cut", default="units", choices=["units", "blocks"])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("-H", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="Per peer at the first peer count.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


def settings_of(args: argparse.Namespace) -> dict:
    base = FULL if args.full else QUICK
    peers = [int(p) for p in args.peers.split(",")]
    s = {"preset": args.preset, "peers": peers, "slices": args.slices, "cut": args.cut, "codec": args.codec,
         "seed": args.seed, "threads": args.threads, "rounds": args.rounds or base["rounds"], "H": args.H or base["H"],
         "batch_size": args.batch_size or base["batch_size"]}  # fmt: skip
    for p in peers:  # fail before any run starts, not in a worker minutes later
        build_config(s, p, s["codec"])
    return s


def main() -> None:
    args = parse_args()
    methods = [m for m in args.methods.split(",") if m]
    codecs = [c for c in args.codecs.split(",") if c]
    try:
        settings = settings_of(args)
        for c in [*codecs, args.codec]:
            CodecConfig(name=c)
    except ValueError as error:
        sys.exit(f"convergence: {error}")
    todo = jobs(settings, methods, codecs)
    config = build_config(settings, settings["peers"][0], settings["codec"])
    tokens = settings["rounds"] * config.tokens_per_round
    print(f"{len(todo)} runs of {tokens:,} tokens each ({settings['rounds']} rounds of H={settings['H']}), "
          f"{args.jobs} jobs x {args.threads} threads", file=sys.stderr)  # fmt: skip
    start = time.perf_counter()
    rows = run_all(todo, args.jobs)
    seconds = time.perf_counter() - start
    print(f"unigram entropy of the corpus: {rows[0]['unigram_entropy_nats']:.3f} nats; {tokens:,} tokens per run; "
          f"K={settings['slices']} ({settings['cut']})\n")  # fmt: skip
    for peers in settings["peers"]:
        print(methods_table(rows, peers, settings["codec"]) + "\n")
    if codecs:
        print(codec_table(rows, settings["peers"][0]) + "\n")
    cpu = sum(r["cpu_seconds"] for r in rows)
    print(f"{seconds:.0f} s wall, {cpu:.0f} CPU-seconds in the runs (a shared machine stretches the wall time)")
    name = "convergence_full.json" if args.full else "convergence.json"
    path = args.json or ROOT / "benchmarks" / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {"settings": settings, "tokens_per_run": tokens, "seconds": seconds, "cpu_seconds": cpu, "runs": rows}
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
