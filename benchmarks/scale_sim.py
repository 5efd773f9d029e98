"""The simulator at swarm sizes a public run has: gossip-PPU and all-reduce PPU from 8 to 256 virtual peers.

    .venv/bin/python -m benchmarks.scale_sim [--peers 8,16,64,256] [--rounds 8] [--jobs 1] [--json PATH]

Every peer does the same work at every size (`tiny`, K=4 `units`, H steps of batch B a round, the run's int8
codec), so a larger swarm trains more tokens a round, as a real one would: the question is whether gossip with a
fixed fanout keeps up with an all-reduce as the swarm grows. Reported per size and method: validation loss (the
mean over peers of each peer's own weights, and of the peers' averaged weights), consensus distance (mean
||phi_k - mean|| / ||mean||), bytes each peer sends a round, and what the simulator needed on this machine: wall
seconds and the peak resident memory of the process that ran it (each run in a fresh process). Writes
benchmarks/results/scale_sim.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("gossip-ppu", "ppu")


def one_run(job: tuple[int, str, dict]) -> dict:
    """One method at one swarm size, in a fresh process (its peak RSS is this run's alone)."""
    peers, method, s = job
    torch.set_num_threads(1)
    total = s["rounds"] * s["H"]
    inner = InnerConfig(lr=3e-3, steps_per_round=s["H"], batch_size=s["batch"], total_steps=total,
                        warmup_steps=max(1, total // 10))  # fmt: skip
    config = SimConfig(model=PRESETS["tiny"], inner=inner, slices=SliceConfig(num_slices=4, cut="units"), peers=peers,
                       rounds=s["rounds"], seed=0, eval_every=s["rounds"], eval_batches=4)  # fmt: skip
    began = time.monotonic()
    result = run_methods([method], load_corpus(), config, lambda _: lambda: None)["methods"][method]
    return {"peers": peers, "method": method, "val_loss": result["val_loss"],
            "val_loss_of_mean_weights": result["val_loss_of_mean_weights"],
            "consensus_distance": result["consensus_distance"], "tokens": result["tokens"],
            "bytes_per_peer_per_round": result["bytes_per_peer_per_round"],
            "wall_s": round(time.monotonic() - began, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default="8,16,64,256")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--H", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "scale_sim.json")
    args = parser.parse_args()
    settings = {"rounds": args.rounds, "H": args.H, "batch": args.batch}
    todo = [(int(p), m, settings) for p in args.peers.split(",") for m in args.methods.split(",")]
    todo.sort(key=lambda job: -job[0])  # the largest first: the pool's tail is the short runs
    rows = []
    with ProcessPoolExecutor(args.jobs, max_tasks_per_child=1) as pool:
        for row in pool.map(one_run, todo):
            row["load_average"] = round(os.getloadavg()[0], 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    rows.sort(key=lambda r: (r["peers"], r["method"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    print("| peers | method | val loss | val (avg w) | consensus | KB sent / peer / round | wall s | peak RSS MB |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['peers']} | {r['method']} | {r['val_loss']:.3f} | {r['val_loss_of_mean_weights']:.3f} | "
              f"{r['consensus_distance']:.3f} | {r['bytes_per_peer_per_round'] / 1e3:.0f} | {r['wall_s']:.0f} | "
              f"{r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
