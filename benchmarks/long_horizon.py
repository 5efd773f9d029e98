"""Slice training against DiLoCo as training goes on: 40 rounds at 8 and 16 peers, and why the gap is what it is.

    python -m benchmarks.long_horizon                      # print every table from the cached JSON
    python -m benchmarks.long_horizon --run before,after   # run what those sections lack, then print
    python -m benchmarks.long_horizon --run screen --rerun # run a section again even where cached

Every row is one `peer.lab.sim.Simulation` named by a `Variant` (benchmarks/long_horizon_runs.py): the
issue's setting (tiny, 40 rounds of H=20, global batch 64, K=4 `units`, int8) with the row's changes.
Results are cached per variant in `benchmarks/results/long_horizon.json`, so the tables print without
rerunning; `--run` computes only what a section lacks (`--rerun`: all of it) in `--jobs` processes of
one torch thread. 16 peers split the 8-peer global batch (batch 4 each): every row of a table sees the
same tokens. Sections: `before`/`after` (main's and the new defaults, 40 rounds), `diagnosis` and
`screen` (16-round proxies), `overlap` (the daemon's overlap: as it was, an eager fix on a copy, and as it
is), `k_sweep` (16 rounds) and `frontier` (40 rounds): loss gap against memory for K in 1, 2, 4, 8,
`equal_memory` (DiLoCo on the largest model that fits a PPU peer's memory). `--plot` draws the gap against
round and the frontier.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from benchmarks.long_horizon_runs import Variant, run_variant

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "long_horizon.json"
PLOT = ROOT / "benchmarks" / "results" / "long_horizon.png"

PROXY = 16
"""Rounds of the screening runs (a 16-round schedule: the inner lr decays within those rounds)."""

MAIN = {"diloco": {"lr": 0.7, "momentum": 0.5}, "ppu": {"lr": 0.4, "momentum": 0.5},
        "gossip-ppu": {"lr": 0.5, "momentum": 0.5, "consensus": 0.5}}  # fmt: skip
"""DEFAULT_OUTER on main before issue 13 (tuned on 10 rounds), pinned so the `before` rows stay what they were."""

NEW = {"diloco": {"lr": 0.7, "momentum": 0.5}, "ppu": {"lr": 0.7, "momentum": 0.5, "rest_step": 0.3},
       "gossip-ppu": {"lr": 0.4, "momentum": 0.5, "consensus": 0.5, "fanout": 2, "rest_step": 0.3}}  # fmt: skip
"""The defaults issue 13 chose (peer/core/outer.py DEFAULT_OUTER, peer/lab/sim.py SimConfig); `after` runs them."""

REFERENCE: dict[str, dict] = {
    "diloco lr=0.7 momentum=0.5": {"val_loss": 1.564, "curve_every_8": [2.267, 1.869, 1.686, 1.600, 1.564]},
    "ppu lr=0.4 momentum=0.5": {"val_loss": 1.802, "curve_every_8": [2.646, 2.292, 2.027, 1.873, 1.801]},
    "gossip-ppu lr=0.5 momentum=0.5 consensus=0.5": {"val_loss": 1.876,
                                                     "curve_every_8": [2.556, 2.299, 2.105, 1.974, 1.876]},
}  # fmt: skip
"""Issue 13's table (`murmur simulate --preset tiny --peers 8 --tokens 6553600` on main): the same runs as the
8-peer `before` rows (the simulator is deterministic), shown (marked *) where those were not rerun here."""

Rows = list[tuple[str, Variant]]

LAP = (("overlap", True),)
"""SimConfig override: the daemon's overlap."""


def pinned(method: str, table: dict = MAIN, **changes: object) -> Variant:
    """A variant at one table's outer settings (main's by default) with `changes`."""
    return Variant(method=method, **{**table.get(method, {}), **changes})


def before() -> Rows:
    return [(f"{m}, {n} peers", pinned(m, peers=n)) for n in (8, 16) for m in MAIN]


def after() -> Rows:
    rows = [(f"{m}, {n} peers", pinned(m, NEW, peers=n)) for n in (8, 16) for m in NEW]
    return [*rows[:3], ("gossip-ppu, 8 peers, lr 0.7", pinned("gossip-ppu", NEW, lr=0.7)),
            ("gossip-ppu, 8 peers, overlap as it was",
             pinned("gossip-ppu", NEW, sim=LAP, diag="delayed-overlap")),
            ("gossip-ppu, 8 peers, as it was + eager copy",
             pinned("gossip-ppu", NEW, sim=LAP, diag="eager-overlap")),
            ("gossip-ppu, 8 peers, overlap now (the daemon's)", pinned("gossip-ppu", NEW, sim=LAP)),
            *rows[3:]]  # fmt: skip


def diagnosis() -> Rows:
    r = PROXY
    return [
        ("DiLoCo, 8 peers", pinned("diloco", rounds=r)),
        ("DiLoCo, 2 peers (as few per coordinate as PPU)", pinned("diloco", rounds=r, peers=2, global_batch=16)),
        ("PPU", pinned("ppu", rounds=r)),
        ("PPU, full model trained, slice sent", pinned("ppu", rounds=r, diag="full-inner")),
        ("gossip-PPU", pinned("gossip-ppu", rounds=r)),
        ("DiLoCo, 8 rounds, additivity probe", pinned("diloco", rounds=8, diag="additivity")),
        ("PPU, 8 rounds, additivity probe", pinned("ppu", rounds=8, diag="additivity")),
    ]


def screen() -> Rows:
    r, own = PROXY, (("consensus_slice", "own"),)
    return [
        ("PPU outer lr 0.25", pinned("ppu", rounds=r, lr=0.25)),
        ("PPU outer lr 0.15", pinned("ppu", rounds=r, lr=0.15)),
        ("PPU, H=10 (32 rounds, same tokens)", pinned("ppu", rounds=2 * r, H=10)),
        ("PPU, neurons cut (whole heads/units)", pinned("ppu", rounds=r, cut="neurons")),
        ("PPU, frozen part at the momentum's next step", pinned("ppu", rounds=r, diag="lookahead")),
        ("PPU, slices take turns (lr 0.7, AdamW parked)", pinned("ppu", rounds=r, lr=0.7, diag="sequential")),
        ("gossip-PPU outer lr 0.3", pinned("gossip-ppu", rounds=r, lr=0.3)),
        ("gossip-PPU lr 0.2, momentum 0.8, consensus 0.2",
         pinned("gossip-ppu", rounds=r, lr=0.2, momentum=0.8, consensus=0.2)),
        ("gossip-PPU, 2 partners", pinned("gossip-ppu", rounds=r, fanout=2)),
        ("gossip-PPU, sends its own slice's weights", pinned("gossip-ppu", rounds=r, sim=own)),
        ("gossip-PPU, own slice's weights, consensus 1.0", pinned("gossip-ppu", rounds=r, consensus=1.0, sim=own)),
        ("gossip-PPU, own slice's weights, 2 partners", pinned("gossip-ppu", rounds=r, fanout=2, sim=own)),
        ("gossip-PPU, own slice's weights, 2 partners, lr 0.4",
         pinned("gossip-ppu", rounds=r, fanout=2, lr=0.4, sim=own)),
        ("PPU lr 0.7, rest moves by sign steps", pinned("ppu", rounds=r, lr=0.7, diag="rest-sign")),
        ("PPU lr 0.7, rest moves by 0.3x sign steps", pinned("ppu", rounds=r, lr=0.7, diag="rest-sign-0.3")),
        ("PPU lr 0.7, rest moves by 0.1x sign steps", pinned("ppu", rounds=r, lr=0.7, diag="rest-sign-0.1")),
        ("gossip-PPU, 2 partners, lr 0.4, rest 0.3x sign",
         pinned("gossip-ppu", rounds=r, fanout=2, lr=0.4, diag="rest-sign-0.3")),
        ("gossip-PPU, 2 partners, lr 0.7, rest 0.3x sign",
         pinned("gossip-ppu", rounds=r, fanout=2, lr=0.7, diag="rest-sign-0.3")),
        ("PPU lr 0.7, rest_step 0.5", pinned("ppu", rounds=r, lr=0.7, rest_step=0.5)),
        ("gossip-PPU lr 0.7, rest_step 0.3, 3 partners",
         pinned("gossip-ppu", rounds=r, fanout=3, lr=0.7, rest_step=0.3)),
        ("gossip-PPU lr 0.7, rest_step 0.3, 7 partners",
         pinned("gossip-ppu", rounds=r, fanout=7, lr=0.7, rest_step=0.3)),
    ]  # fmt: skip


def overlap() -> Rows:
    """The daemon's overlap: the outer step a round late (as it was), an eager fix on a copy, and the own delta
    taken at once with the partners' terms a round late (`SimConfig.overlap` and the daemon now)."""
    r = PROXY
    return [
        ("gossip-PPU, no overlap", pinned("gossip-ppu", NEW, rounds=r)),
        ("gossip-PPU, overlap as it was (step a round late)",
         pinned("gossip-ppu", NEW, rounds=r, sim=LAP, diag="delayed-overlap")),
        ("the same, eager own step on a copy", pinned("gossip-ppu", NEW, rounds=r, sim=LAP, diag="eager-overlap")),
        ("overlap now: own delta at once, partners' late", pinned("gossip-ppu", NEW, rounds=r, sim=LAP)),
        ("the same, weights sent after the own step",
         pinned("gossip-ppu", NEW, rounds=r, sim=LAP, diag="fresh-weights")),
    ]


def k_sweep() -> Rows:
    r = PROXY
    moving = pinned("ppu", rounds=r, lr=0.7, diag="rest-sign-0.3")  # = rest_step 0.3 (the screen's optimiser)
    return [
        ("K=1 (DiLoCo)", pinned("diloco", rounds=r)),
        ("K=2, frozen, lr 0.4", pinned("ppu", rounds=r, slices=2, lr=0.4)),
        ("K=4, frozen, lr 0.25", pinned("ppu", rounds=r, lr=0.25)),
        ("K=8, frozen, lr 0.15", pinned("ppu", rounds=r, slices=8, lr=0.15)),
        ("K=2, rest_step 0.3", pinned("ppu", NEW, rounds=r, slices=2)),
        ("K=4, rest_step 0.3", moving),
        ("K=8, rest_step 0.3", pinned("ppu", NEW, rounds=r, slices=8)),
        ("gossip (2 partners, lr 0.7), K=1: no slices", pinned("gossip-ppu", NEW, rounds=r, slices=1, lr=0.7)),
        ("gossip (2 partners, lr 0.7), K=4, rest_step 0.3",
         pinned("gossip-ppu", rounds=r, fanout=2, lr=0.7, diag="rest-sign-0.3")),
    ]


def equal_memory() -> Rows:
    r = PROXY
    return [
        ("PPU K=4 on tiny (d=96), rest_step 0.3", pinned("ppu", rounds=r, lr=0.7, diag="rest-sign-0.3")),
        ("PPU K=4 on tiny (d=96), frozen", pinned("ppu", rounds=r, lr=0.25)),
        ("DiLoCo on d=64: same weights+grad+AdamW bytes", pinned("diloco", rounds=r, d_model=64)),
        ("DiLoCo on d=48: same grad+AdamW bytes", pinned("diloco", rounds=r, d_model=48)),
        ("DiLoCo on tiny (d=96)", pinned("diloco", rounds=r)),
    ]


def frontier() -> Rows:
    """Loss against per-peer memory at 40 rounds: K slices per peer, gossip-PPU (the daemon's method) and PPU."""
    return [
        ("DiLoCo (K=1, all-reduce)", pinned("diloco", NEW)),
        *[(f"gossip-PPU, K={k}", pinned("gossip-ppu", NEW, slices=k)) for k in (1, 2, 4, 8)],
        *[(f"PPU (all-reduce), K={k}", pinned("ppu", NEW, slices=k)) for k in (2, 4, 8)],
    ]


SECTIONS: dict[str, Callable[[], Rows]] = {
    "before": before, "after": after, "diagnosis": diagnosis, "screen": screen, "overlap": overlap, "k_sweep": k_sweep,
    "equal_memory": equal_memory, "frontier": frontier,
}  # fmt: skip


def load_cache(path: Path = RESULTS) -> dict[str, dict]:
    return json.loads(path.read_text())["runs"] if path.exists() else {}


def save_cache(cache: dict[str, dict], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"runs": dict(sorted(cache.items()))}, indent=1))
    tmp.replace(path)


def lookup(cache: dict[str, dict], v: Variant) -> dict | None:
    """The cached row of a variant, else issue 13's numbers for it (8 peers, 40 rounds, marked), else None."""
    row = cache.get(v.key())
    if row is None and v.key() in REFERENCE:
        row = {**REFERENCE[v.key()], "reference": True}
    return row


def curve(row: dict, every: int) -> list[float]:
    """Validation loss every `every` rounds (the issue's reference rows have every 8th only)."""
    if "curve_every_8" in row:
        return row["curve_every_8"] if every == 8 else []
    per_round = row["tokens"] / row["variant"]["rounds"]
    return [loss for tokens, loss in row["curve"] if round(tokens / per_round) % every == 0]


def _diloco_of(v: Variant, table: dict = MAIN) -> Variant:
    """The DiLoCo row a variant compares with: same peers and tokens (H=20), and the same probe if any."""
    diag = v.diag if v.diag == "additivity" else ""
    return pinned("diloco", table, peers=v.peers, rounds=v.rounds * v.H // 20, global_batch=v.global_batch, diag=diag)


def _fmt(row: dict | None, v: Variant, base: dict | None, every: int) -> str:
    if row is None:
        return "(not run)"
    mark = "*" if row.get("reference") else " "
    ratio = f"{row['val_loss'] / base['val_loss']:.3f}" if base else "  -  "
    losses = curve(row, every)
    gaps = [f"{a / b - 1:+.0%}" for a, b in zip(losses, curve(base, every))] if base and v.H == 20 else []
    extra = ""
    if "peak_state_bytes_per_peer" in row:
        extra = (f"{row['bytes_per_peer_per_round'] / 1e6:>6.2f} MB {row['peak_state_bytes_per_peer'] / 1e6:>5.2f} MB"
                 f" {row['cpu_seconds']:>5.0f}")  # fmt: skip
    return (f"{row['val_loss']:.4f}{mark} {ratio}  {' '.join(f'{x:.3f}' for x in losses):<36} "
            f"{' '.join(gaps):<26} {extra}")  # fmt: skip


def table(cache: dict[str, dict], name: str) -> str:
    rows = SECTIONS[name]()
    every = 8 if rows[0][1].rounds >= 40 else 4
    head = (f"{'':<52}{'val':>7}  {'x DiLoCo':<7} {f'curve (every {every} rounds)':<36} {'gap to DiLoCo':<26} "
            f"{'sent/peer/rd':>9} {'grad+Adam':>8} {'CPU s':>5}")  # fmt: skip
    lines = [f"## {name}", head]
    for label, v in rows:
        row = lookup(cache, v)
        base = lookup(cache, _diloco_of(v, NEW if name == "after" else MAIN)) if v.method != "diloco" else None
        if name == "equal_memory" or (v.method == "diloco" and v.d_model):
            base = None
        lines.append(f"{label:<52}{_fmt(row, v, base, every)}")
    return "\n".join(lines)


def additivity_table(cache: dict[str, dict]) -> str:
    """Per round: each slice's part of the averaged update alone, and all of them together (raw, step 1)."""
    lines = ["## additivity (validation-loss gain of one round's averaged pseudo-gradient, applied raw)",
             f"{'round':>5} {'DiLoCo: parts':>24} {'together':>9} {'ratio':>6}   {'PPU: parts':>24} {'together':>9}"
             f" {'ratio':>6}"]  # fmt: skip
    rows = [lookup(cache, pinned(m, rounds=8, diag="additivity")) for m in ("diloco", "ppu")]
    if None in rows:
        return "\n".join([*lines, "(not run)"])
    for r, (d, p) in enumerate(zip(rows[0]["probe"], rows[1]["probe"])):
        parts = [" ".join(f"{g:+.3f}" for g in x["part_gains"][:4]) for x in (d, p)]
        lines.append(f"{r:>5} {parts[0]:>24} {d['combined_gain']:>+9.3f} {d['additivity']:>6.2f}   "
                     f"{parts[1]:>24} {p['combined_gain']:>+9.3f} {p['additivity']:>6.2f}")  # fmt: skip
    return "\n".join(lines)


def report(cache: dict[str, dict]) -> str:
    out = [table(cache, name) for name in SECTIONS]
    out.insert(3, additivity_table(cache))
    return "\n\n".join(out) + "\n\n* issue 13's measurement of the same run (not rerun here)"


def plot(cache: dict[str, dict], path: Path) -> bool:
    """Gap to DiLoCo against round, before and after, at 8 and 16 peers; False without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    drawn = False
    for ax, peers in zip(axes[:2], (8, 16)):
        lines = [(pinned(method, table_, peers=peers), table_, style, f"{method} {name}")
                 for name, table_, style in (("before", MAIN, "--"), ("after", NEW, "-"))
                 for method in ("ppu", "gossip-ppu")]  # fmt: skip
        lines.append((pinned("gossip-ppu", NEW, peers=peers, sim=LAP), NEW, ":", "gossip-ppu after, overlap"))
        for variant, table_, style, label in lines:
            row, base = lookup(cache, variant), lookup(cache, pinned("diloco", table_, peers=peers))
            if row is None or base is None:
                continue
            every = 8 if row.get("reference") or base.get("reference") else 4
            gaps = [100 * (a / b - 1) for a, b in zip(curve(row, every), curve(base, every))]
            ax.plot([every * (i + 1) for i in range(len(gaps))], gaps, style, marker="o", label=label)
            drawn = True
        ax.axhline(3, color="grey", linewidth=0.8, linestyle=":", label="goal: 3%")
        ax.set(title=f"{peers} peers", xlabel="round (H=20)", ylabel="val loss above DiLoCo (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    drawn = _plot_frontier(axes[2], cache) or drawn
    if drawn:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _plot_frontier(ax: Any, cache: dict[str, dict]) -> bool:
    """The `frontier` section: gap to DiLoCo at 40 rounds against gradient + AdamW bytes per peer, per K."""
    base = lookup(cache, pinned("diloco", NEW))
    drawn = False
    for method, marker in (("gossip-ppu", "o"), ("ppu", "s")):
        points = []
        for k in (1, 2, 4, 8):
            row = lookup(cache, pinned(method, NEW, slices=k))
            if row is not None and base is not None and "peak_state_bytes_per_peer" in row:
                gap = 100 * (row["val_loss"] / base["val_loss"] - 1)
                points.append((row["peak_state_bytes_per_peer"] / 1e6, gap, k))
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=method)
            for x, y, k in points:
                ax.annotate(f"K={k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            drawn = True
    if base is not None and "peak_state_bytes_per_peer" in base:
        ax.plot([base["peak_state_bytes_per_peer"] / 1e6], [0.0], "k*", markersize=10, label="DiLoCo")
    ax.axhline(3, color="grey", linewidth=0.8, linestyle=":", label="goal: 3%")
    ax.set(title="40 rounds, 8 peers: the frontier", xlabel="gradient + AdamW per peer (MB)",
           ylabel="val loss above DiLoCo (%)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return drawn


def run_missing(variants: list[Variant], cache: dict[str, dict], jobs: int, rerun: bool, path: Path = RESULTS) -> None:
    """Run what the cache lacks (or everything with `rerun`), the longest first; save after each run."""
    todo = [v for v in dict.fromkeys(variants) if rerun or v.key() not in cache]
    todo.sort(key=lambda v: -v.cost())
    print(f"{len(todo)} runs to do, {jobs} at a time", file=sys.stderr)
    with ProcessPoolExecutor(jobs) as pool:
        futures = {pool.submit(run_variant, v): v for v in todo}
        for future in as_completed(futures):
            v = futures[future]
            row = future.result()
            cache.clear()  # the file as it is now: rows another run saved (or a key renamed) meanwhile stay so
            cache.update(load_cache(path))
            cache[v.key()] = row
            save_cache(cache, path)
            print(f"  {v.key()}: val {cache[v.key()]['val_loss']:.4f}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="", help=f"Sections to compute: {', '.join(SECTIONS)}.")
    parser.add_argument("--rerun", action="store_true", help="Recompute cached variants of those sections too.")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--plot", default=str(PLOT), help="Where to draw the gap against round; '' for nowhere.")
    parser.add_argument("--results", type=Path, default=RESULTS, help="The cache of runs (JSON).")
    args = parser.parse_args()
    cache = load_cache(args.results)
    wanted = [s for s in args.run.split(",") if s]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        sys.exit(f"long_horizon: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if wanted:
        run_missing([v for s in wanted for _, v in SECTIONS[s]()], cache, args.jobs, args.rerun, args.results)
    print(report(cache))
    if args.plot and plot(cache, Path(args.plot)):
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
