"""Connections one peer holds, and how fast a newcomer sees everyone, as a swarm grows on loopback.

    .venv/bin/python -m benchmarks.swarm_connections [--sizes 8,16,32,64] [--settle 20] [--json PATH]

One bootstrap node, the owner and light members (peer/lab/scale.py: the join sequence, announcements and their
refreshes, reachability; no training), grown in waves to each size. Per size: seconds from a new member's start
until its live list holds every peer (median and max over that wave), and the established TCP connections per peer
(median and max over all peers; split into libp2p, held by p2pd for the DHT, and gRPC), counted from /proc after
the swarm ran `--settle` seconds more at that size. Writes benchmarks/results/swarm_connections.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from peer.lab.harness import Procs, unwind_on_sigterm
from peer.lab.scale import GrowingSwarm

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,16,32,64")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds at each size before counting")
    parser.add_argument("--ttl", type=float, default=15.0, help="announcement TTL of every member (s)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "swarm_connections.json")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    unwind_on_sigterm()
    rows = []
    with tempfile.TemporaryDirectory(prefix="murmur-scale-") as work:
        procs = Procs(Path(work))
        try:
            swarm = GrowingSwarm(procs, ttl_s=args.ttl)
            for size in sizes:
                row = swarm.grow_to(size, timeout_s=60 + 6 * size, settle_s=args.settle).row()
                row["load_average"] = round(os.getloadavg()[0], 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            procs.stop_all()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"settle_s": args.settle, "ttl_s": args.ttl, "rows": rows}, indent=1) + "\n")
    print("| peers | sees everyone: median / max s | connections per peer: median / max | libp2p max | gRPC max |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['peers']} | {r['see_all_s_median']} / {r['see_all_s_max']} | {r['connections_median']} / "
              f"{r['connections_max']} | {r['libp2p_max']} | {r['grpc_max']} |")


if __name__ == "__main__":
    main()
