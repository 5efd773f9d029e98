"""Outer lr/momentum/consensus grid per method, run as parallel processes; prints each method's best.

    python -m benchmarks.outer_sweep --peers 8 --jobs 8 --threads 2 --json sweep.json

Every trial is one `peer.lab.sim.Simulation` at equal tokens, so trials compare side by side. The
method defaults in `peer/core/outer.py` (DEFAULT_OUTER) are set from this sweep's output.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from peer.core.data import load_corpus
from peer.core.inner import InnerConfig
from peer.core.model import PRESETS
from peer.core.slices import SliceConfig
from peer.lab.compare import SWEEP_GRID
from peer.lab.sim import DEFAULT_OUTER, SimConfig, Simulation
from protocol.codec import CodecConfig


def trial(args: tuple[dict, str, float, float, float, int]) -> dict:
    settings, method, lr, momentum, consensus, threads = args
    torch.set_num_threads(threads)
    config = build_config(settings)
    base = config.outer[method]
    outer = replace(base, lr=lr, momentum=momentum, consensus=consensus or base.consensus)
    config = replace(config, outer={**config.outer, method: outer})
    start = time.perf_counter()
    result = Simulation(method, load_corpus(), config).run()
    return {"method": method, **result.outer, "val_loss": result.val_loss,
            "val_loss_of_mean_weights": result.val_loss_of_mean_weights,
            "consensus_distance": result.consensus_distance, "seconds": time.perf_counter() - start}  # fmt: skip


def build_config(s: dict) -> SimConfig:
    total = s["rounds"] * s["H"]
    inner = InnerConfig(lr=s["lr"], steps_per_round=s["H"], batch_size=s["batch_size"], total_steps=total,
                        warmup_steps=min(50, max(1, total // 10)))  # fmt: skip
    return SimConfig(model=PRESETS[s["preset"]], inner=inner, slices=SliceConfig(num_slices=s["slices"], cut=s["cut"]),
                     codec=CodecConfig(name=s["codec"]), peers=s["peers"], rounds=s["rounds"],
                     fanout=s["fanout"], seed=s["seed"], eval_every=s["rounds"])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="diloco,ppu,gossip-ppu-noloco,gossip-ppu-gasloc")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--cut", default="blocks")
    parser.add_argument("--codec", default="int8")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("-H", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--fanout", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    settings = {k: getattr(args, k) for k in ("preset", "peers", "slices", "cut", "codec", "rounds", "H",
                                              "batch_size", "lr", "fanout", "seed")}  # fmt: skip
    trials = [(settings, m, lr, mom, c, args.threads) for m in args.methods.split(",")
              for lr, mom, c in SWEEP_GRID[DEFAULT_OUTER[m].rule]]  # fmt: skip
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(trial, trials))
    for method in args.methods.split(","):
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["val_loss"])
        print(f"\n{method}  (best first)")
        for r in rows:
            print(f"  lr={r['lr']:<4} m={r['momentum']:<4} c={r['consensus']:<4} val={r['val_loss']:.4f} "
                  f"avg-w={r['val_loss_of_mean_weights']:.4f} cd={r['consensus_distance']:.4f} {r['seconds']:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "trials": results}, indent=2))


if __name__ == "__main__":
    main()
