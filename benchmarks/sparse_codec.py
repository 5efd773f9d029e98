"""Issue 17 item 2: gossip-ppu with SparseLoCo-style compression against int8, in bytes and validation loss.

    python -m benchmarks.sparse_codec [--peers 8,16] [--variants int8,sl3,sign-own-now,...] [--jobs 2]

Each variant is one `peer.lab.sim.Simulation` of gossip-ppu at convergence.py's QUICK settings (`tiny`, K=4
units, 5 rounds of H=20, equal tokens at every peer count), differing only in how the pseudo-gradient and the
consensus weight slice travel and in the outer rule. Bytes are per peer per round, against DiLoCo's with the
fp32 codec (its ring all-reduce at the same peer count, from the simulator's own byte count). Loss is the
mean of each peer's own weights' validation loss; "vs int8" is the relative gap to the int8 row of the same
run. Writes `benchmarks/results/sparse_codec.json` unless `--json` names another path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.convergence import QUICK, build_config
from peer.core.data import load_corpus
from peer.core.outer import DEFAULT_OUTER
from peer.lab.compare import run_methods
from peer.lab.sim import SimConfig, Simulation
from protocol.codec import CodecConfig

ROOT = Path(__file__).resolve().parents[1]
BF16 = {"name": "bf16"}
# label: (pseudo-gradient codec, consensus weight codec or None, outer override or None)
VARIANTS: dict[str, tuple[dict, dict | None, dict | None]] = {
    "int8": ({"name": "int8"}, BF16, None),
    "sl1": ({"name": "sparseloco", "topk_fraction": 0.01}, BF16, None),
    "sl3": ({"name": "sparseloco", "topk_fraction": 0.03}, BF16, None),
    "int8-now": ({"name": "int8"}, None, None),
    "sl3-ef-now": ({"name": "sparseloco", "topk_fraction": 0.03, "feedback_decay": 0.95}, None, {"momentum": 0.0}),
    "sl3-own": ({"name": "sparseloco", "topk_fraction": 0.03}, BF16, None),
    "sl3-own-now": ({"name": "sparseloco", "topk_fraction": 0.03}, None, None),
    "sl1-own-now": ({"name": "sparseloco", "topk_fraction": 0.01}, None, None),
    "sign-now": ({"name": "sign"}, None, None),
    "sign-own-now": ({"name": "sign"}, None, None),
    "sign64-own-now": ({"name": "sign", "block_size": 64}, None, None),
}
"""`slN`: sparseloco keeping N% of each chunk; `sign64`: sign with a scale per 64 values (256 otherwise).
`-now`: no weight slice (no consensus pull). `-ef`: SparseLoCo's outer rule: error feedback with decay 0.95
is the momentum, so the outer rule (NoLoCo) runs with momentum 0. `-own`: a peer mixes its own delta as trained
(`SimConfig.own_uncompressed`), only partners get the compressed one."""


def variant_config(base: SimConfig, label: str) -> SimConfig:
    """The simulator config of one variant (codec, weight codec, gossip-ppu's outer settings)."""
    codec, weights, outer = VARIANTS[label]
    gossip = DEFAULT_OUTER["gossip-ppu"]
    outers = {**base.outer, "gossip-ppu": replace(gossip, **outer) if outer else gossip}
    return replace(base, codec=CodecConfig(**codec), weights_codec=CodecConfig(**weights) if weights else None,
                   outer=outers, own_uncompressed="-own" in label)  # fmt: skip


def diloco_fp32_bytes(settings: dict, peers: int) -> int:
    """DiLoCo's bytes per peer per round with the fp32 codec: counted by the simulator, no training needed."""
    sim = Simulation("diloco", load_corpus(), build_config(settings, peers, "fp32"))
    return sim._all_reduce_bytes()


def one_run(job: tuple[dict, int, str]) -> dict:
    settings, peers, label = job
    torch.set_num_threads(settings["threads"])
    config = variant_config(build_config(settings, peers, "int8"), label)
    result = run_methods(["gossip-ppu"], load_corpus(), config, lambda _: lambda: None)["methods"]["gossip-ppu"]
    return {"peers": peers, "variant": label, **result}


def table(rows: list[dict], peers: int, diloco: int) -> str:
    base = next((r for r in rows if r["peers"] == peers and r["variant"] == "int8"), None)
    lines = [f"gossip-ppu, {peers} peers; DiLoCo fp32 sends {diloco:,} bytes/peer/round",
             f"{'variant':<16}{'val loss':>9}{'vs int8':>9}{'bytes/peer/rd':>15}{'x fewer than DiLoCo fp32':>26}"
             f"{'consensus':>10}"]  # fmt: skip
    for r in rows:
        if r["peers"] != peers:
            continue
        gap = f"{(r['val_loss'] / base['val_loss'] - 1) * 100:>+8.2f}%" if base else f"{'-':>9}"
        lines.append(f"{r['variant']:<16}{r['val_loss']:>9.4f}{gap}{r['bytes_per_peer_per_round']:>15,}"
                     f"{diloco / r['bytes_per_peer_per_round']:>26.1f}{r['consensus_distance']:>10.4f}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default="8,16")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="Comma-separated; default: all (about an hour on 2 idle cores for both peer counts).",
    )
    parser.add_argument("--rounds", type=int, default=QUICK["rounds"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "sparse_codec.json")
    args = parser.parse_args()
    labels = [v for v in args.variants.split(",") if v]
    unknown = [v for v in labels if v not in VARIANTS]
    if unknown:
        sys.exit(f"sparse_codec: unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    peers = [int(p) for p in args.peers.split(",")]
    # the global batch is QUICK's batch_size x 8 peers whichever counts run (convergence.py's first count)
    settings = {"preset": "tiny", "peers": [8, *(p for p in peers if p != 8)], "slices": 4, "cut": "units",
                "seed": 0, "threads": args.threads, "rounds": args.rounds, "H": QUICK["H"],
                "batch_size": QUICK["batch_size"]}  # fmt: skip
    todo = [(settings, p, v) for p in sorted(peers, reverse=True) for v in labels]
    start = time.perf_counter()
    if args.jobs <= 1:
        rows = [one_run(job) for job in todo]
    else:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(one_run, todo))
    diloco = {p: diloco_fp32_bytes(settings, p) for p in peers}
    for p in peers:
        print(table(rows, p, diloco[p]) + "\n")
    print(f"{time.perf_counter() - start:.0f} s wall")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"settings": settings, "diloco_fp32_bytes": diloco, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
