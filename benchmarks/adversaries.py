"""Each adversary of tests/adversaries.py alone against 4 honest peers, next to a baseline swarm of the same 4
peers (same identities, so the same data; run at the same time, so under the same load): what stopped the
attack, the honest peers' counters, and their validation loss over the same rounds, a few after the attack landed.

    python -m benchmarks.adversaries [--rounds 12] [--kinds scaled,nan,...] [--json out.json]

Real processes on loopback (bootstrap nodes, `murmur run`), like tests/test_adversaries.py; everything started
is stopped in `finally`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from adversaries import KINDS, finish, start_swarms
from procs import Procs

STOPPED_BY = {
    "scaled": "outer step: rejected as an outlier, >10x the clipping bound (peer/robust.py)",
    "nan": "wire: non-finite values refused, sender banned",
    "shape": "wire: header's shapes refused, sender banned",
    "replay": "wire: replay guard (round already seen)",
    "badkey": "wire: signature does not check against the announced key",
    "flood": "limits: per-peer exchanges/minute (RESOURCE_EXHAUSTED), then banned",
}


EXPECTED_COUNTER = {
    "scaled": "rejected:outlier",
    "nan": "rejected:non_finite",
    "shape": "rejected:wrong_shape",
    "replay": "rejected:replay",
    "badkey": "rejected:bad_signature",
    "flood": "rejected:over_limit",
}


def run_one(kind: str, rounds: int, workdir: Path) -> dict[str, object]:
    procs = Procs(workdir)
    began = time.monotonic()
    try:
        swarms = start_swarms(procs, {"base": [], "attacked": [kind]})
        results = finish(swarms, rounds, timeout=1200, expect={"attacked": {EXPECTED_COUNTER[kind]}})
    finally:
        procs.stop_all()
    base, hit = results["base"], results["attacked"]
    return {"attack": kind, "stopped_by": STOPPED_BY[kind], "counters": hit["counters"],
            "baseline_counters": base["counters"], "loss_with": hit["loss"], "loss_without": base["loss"],
            "ratio": hit["loss"] / base["loss"], "honest_alive": hit["alive"], "rounds": hit["target"],
            "landed_s": hit["landed_s"],
            "seconds": time.monotonic() - began}  # fmt: skip


def table(rows: list[dict[str, object]]) -> str:
    head = "| attack | what stopped it | honest peers' counters (sum of 4) | val loss with | without | ratio |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        counters = ", ".join(f"{k} {v:g}" for k, v in sorted(r["counters"].items())) or "none"
        lines.append(f"| {r['attack']} | {r['stopped_by']} | {counters} | {r['loss_with']:.4f} | "
                     f"{r['loss_without']:.4f} | {r['ratio']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    rows = []
    for kind in kinds:
        with tempfile.TemporaryDirectory(prefix=f"murmur-adv-{kind}-") as tmp:
            rows.append(run_one(kind, args.rounds, Path(tmp)))
        print(f"{kind}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
