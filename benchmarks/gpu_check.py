"""Issue 16's GPU check, after the CUDA tests (benchmarks/gpu_check.sh runs both): step cost, a swarm on one
GPU, and the memory planner against the measured peaks.

    python -m benchmarks.gpu_check [--device cuda] [--out benchmarks/results/gpu_check.json]
    python -m benchmarks.gpu_check --device cpu --dry-run     # the same code paths with `micro`, on CPU

1. Step cost and peak memory of `124m` and `350m` (dry run: `micro`, K=2) for the full model, `units` and
   `blocks` at K=4 and 8: benchmarks/step_cost.py in a child process (every configuration's memory in a fresh one).
2. Two `murmur run --device cuda` peers of a `124m` run (K=2: one slice each) on the one GPU for a few rounds,
   with a bootstrap node, all on loopback: every peer exits 0, its loss falls; tokens/s and peak memory per peer
   (CUDA: the peer's own `murmur_gpu_memory_peak_bytes`, scraped from its metrics; CPU: peak RSS).
3. The planner (peer/core/planner.py) against each measured CUDA peak: the step-cost children (full and units,
   the inner step alone: weights, slice state, activations) and the swarm's peers (everything, outer state too).
   The issue asks for within 15%. On CPU the measured figure is RSS and the ratio is printed, not judged.

Writes everything to one JSON file and prints the tables as Markdown, ready to paste into benchmarks/README.md.
Budgets: step cost STEP_COST_S, swarm SWARM_S; the shell script adds the tests' and stays within 8 minutes.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from peer.core.memory import resident_bytes
from peer.core.model import PRESETS
from peer.core.planner import GIB, footprint, step_peak
from peer.core.slices import SliceConfig
from peer.lab.harness import MADDR_LINE, Proc, Procs, murmur, run_toml, unwind_on_sigterm, wait_until
from peer.node.roundline import parse_all

ROOT = Path(__file__).resolve().parents[1]
STEP_COST_S = 240
SWARM_S = 150
FULL = {"presets": "124m,350m", "slices": "4,8", "repeats": 3, "swarm_preset": "124m", "rounds": 4, "steps": 10,
        "batch": 8}  # fmt: skip
DRY = {"presets": "micro", "slices": "2", "repeats": 2, "swarm_preset": "micro", "rounds": 2, "steps": 3, "batch": 4}
"""What each mode measures: the dry run takes the same paths with presets that a CPU trains in seconds."""
METRICS_LINE = re.compile(r"^metrics at (http://\S+/metrics)$")
PEAK_METRIC = re.compile(r"^murmur_gpu_memory_peak_bytes\{[^}]*\} ([0-9.e+]+)$", re.MULTILINE)
TOLERANCE = 0.15
MEASURED_KIND = {True: "CUDA max_memory_allocated", False: "RSS (CPU: torch itself and glibc's heap too; not judged)"}


def step_cost(mode: dict, device: str, workdir: Path) -> dict:
    """benchmarks/step_cost.py for the mode's presets, cuts units and blocks, K from the mode, rest frozen."""
    out = workdir / "step_cost.json"
    command = [sys.executable, "-m", "benchmarks.step_cost", "--presets", mode["presets"], "--slices", mode["slices"],
               "--cuts", "units,blocks", "--rest-steps", "0", "--batch-size", str(mode["batch"]),
               "--repeats", str(mode["repeats"]), "--device", device, "--child-timeout", "120",
               "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=STEP_COST_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"step_cost failed ({done.returncode}): {done.stderr[-3000:]}")
    print(done.stdout, file=sys.stderr)
    return json.loads(out.read_text())


def planner_rows(cost: dict, device: str) -> list[dict]:
    """Predicted inner-step peak (no outer state or feedback: step_cost's Stepper holds neither) against the
    measured one, for the full model and units slices (equal, so slice 0 is every slice)."""
    cuda = device.startswith("cuda")
    rows = []
    for row in cost["rows"]:
        if row["cut"] not in ("full", "units"):
            continue
        model = PRESETS[row["preset"]]
        slices = None if row["cut"] == "full" else SliceConfig(num_slices=row["k"], cut="units")
        predicted = step_peak(model, slices, cost["batch_size"], cuda=cuda)
        state = resident_bytes(model, slices).weights  # the CPU's base RSS holds the built model
        measured = row["peak_cuda"] if cuda else row["peak_rss"] - row["base_rss"] + state
        rows.append({"what": f"{row['preset']} {row['cut']} K={row['k']} step, micro-batch {cost['batch_size']}",
                     "predicted": predicted, "measured": measured, "ratio": predicted / measured,
                     "measured_kind": MEASURED_KIND[cuda]})  # fmt: skip
    return rows


def swarm(mode: dict, device: str, workdir: Path) -> dict:
    """A bootstrap node, a signed run and two peers on this device for `rounds` rounds; what each reported."""
    procs = Procs(workdir / "swarm", error=RuntimeError, tail=40, fork=False)
    try:
        config = run_toml("gpucheck", preset=mode["swarm_preset"], slices=2, steps_per_round=mode["steps"],
                          batch_size=mode["batch"], warmup_steps=2, fanout=1, exchange_timeout_s=60)  # fmt: skip
        (procs.workdir / "run.toml").write_text(config)
        made = procs.start("create", murmur("create-run", "--config", "run.toml", "--key", "owner.key",
                                            "--out", "manifest.json"))  # fmt: skip
        boot = procs.start("boot", murmur("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity",
                                          "boot.key"))  # fmt: skip
        maddr = boot.wait_for(MADDR_LINE, timeout=60).group(1)
        if made.wait_exit(60) != 0:
            raise RuntimeError(f"create-run failed: {made.logs()}")
        run_key = made.lines[-1]
        peers = [_start_peer(procs, name, maddr, run_key, mode, device) for name in ("owner", "peer1")]
        peaks = _watch(peers, device, SWARM_S)
        return {"preset": mode["swarm_preset"], "rounds": mode["rounds"], "steps_per_round": mode["steps"],
                "batch": mode["batch"], "peers": [_report(p, peaks[p.name], device) for p in peers]}  # fmt: skip
    finally:
        procs.stop_all()


def _start_peer(procs: Procs, name: str, maddr: str, run_key: str, mode: dict, device: str) -> Proc:
    who = ["--manifest", "manifest.json", "--key", "owner.key"] if name == "owner" else ["--run-key", run_key]
    args = ["run", "--swarm", "gpucheck", "--initial-peers", maddr, "--identity", f"{name}.id", "--host-maddrs",
            "/ip4/127.0.0.1/tcp/0", "--listen", "127.0.0.1:0", "--device", device, "--rounds", str(mode["rounds"]),
            "--eval-every", "0", "--no-checkpoints", "--batch-size", str(mode["batch"]), "--metrics-port", "0",
            *who]  # fmt: skip
    env = {"MURMUR_HOME": str(procs.workdir / f"home-{name}"), "MURMUR_LOG_LEVEL": "INFO"}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    return procs.start(name, murmur(*args), env=env)


def _watch(peers: list[Proc], device: str, timeout: float) -> dict[str, int]:
    """Wait for every peer to exit, sampling each one's peak memory the while; name -> peak bytes."""
    peaks = {p.name: 0 for p in peers}

    def sample() -> bool:
        for p in peers:
            if p.popen.poll() is None:
                peaks[p.name] = max(peaks[p.name], _peak_of(p, device))
        return all(p.popen.poll() is not None for p in peers)

    wait_until(sample, timeout, "both peers finish their rounds")
    return peaks


def _peak_of(proc: Proc, device: str) -> int:
    """The peer's CUDA peak from its metrics (once it printed where they are), or its peak RSS on CPU."""
    if device == "cpu":
        try:
            status = Path(f"/proc/{proc.popen.pid}/status").read_text()
        except OSError:
            return 0
        found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        return int(found[1]) * 1024 if found else 0
    url = next((m[1] for line in proc.lines if (m := METRICS_LINE.match(line))), None)
    if url is None:
        return 0
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # loopback: our own peer
            found = PEAK_METRIC.search(response.read().decode())
    except OSError:
        return 0
    return int(float(found[1])) if found else 0


def _report(proc: Proc, peak: int, device: str) -> dict:
    rounds = parse_all(proc.lines)
    code = proc.popen.wait(timeout=5)
    losses = [r.loss for r in rounds]
    rates = sorted(r.tokens_per_s for r in rounds[1:] or rounds)
    return {"name": proc.name, "exit_code": code, "rounds": len(rounds), "losses": losses,
            "loss_falls": len(losses) >= 2 and losses[-1] < losses[0],
            "tokens_per_s": rates[len(rates) // 2] if rates else 0.0, "peak_bytes": peak,
            "peak_kind": "cuda max_memory_allocated" if device != "cpu" else "peak RSS"}  # fmt: skip


def swarm_planner_rows(result: dict, device: str) -> list[dict]:
    """The planner's whole-peer prediction (K=2, the run's micro-batch, outer state on the device)."""
    model = PRESETS[result["preset"]]
    fixed, per_sequence, _host = footprint(model, SliceConfig(num_slices=2), cuda=device != "cpu")
    predicted = fixed + result["batch"] * per_sequence
    return [{"what": f"{result['preset']} swarm peer {p['name']}, micro-batch {result['batch']}",
             "predicted": predicted, "measured": p["peak_bytes"], "ratio": predicted / max(1, p["peak_bytes"]),
             "measured_kind": MEASURED_KIND[device != "cpu"]}
            for p in result["peers"]]  # fmt: skip


def markdown(out: dict) -> str:
    """The step-time, swarm and planner tables, as pasted into benchmarks/README.md."""
    lines = ["| preset | cut | K | slice | step ms | time / full | peak / full |", "|---|---|---|---|---|---|---|"]
    for r in out["step_cost"]["rows"]:
        if r["cut"] != "full":
            peak = r.get("cuda_peak_ratio", r.get("training_rss_ratio", 0.0))
            lines.append(f"| {r['preset']} | {r['cut']} | {r['k']} | {r['slice']} | {r['seconds'] * 1e3:.1f} | "
                         f"{r['time_ratio']:.2f} | {peak:.2f} |")  # fmt: skip
    lines += ["", "| peer | exit | rounds | loss first -> last | tokens/s | peak GiB |", "|---|---|---|---|---|---|"]
    for p in out["swarm"]["peers"]:
        loss = f"{p['losses'][0]:.3f} -> {p['losses'][-1]:.3f}" if p["losses"] else "-"
        lines.append(f"| {p['name']} | {p['exit_code']} | {p['rounds']} | {loss} | {p['tokens_per_s']:.0f} | "
                     f"{p['peak_bytes'] / GIB:.2f} |")  # fmt: skip
    lines += ["", "| planner | predicted GiB | measured GiB | predicted / measured | measured as |"]
    lines.append("|---|---|---|---|---|")
    for r in out["planner"]:
        lines.append(f"| {r['what']} | {r['predicted'] / GIB:.3f} | {r['measured'] / GIB:.3f} | {r['ratio']:.2f} | "
                     f"{r['measured_kind']} |")  # fmt: skip
    return "\n".join(lines)


def verdicts(out: dict) -> list[str]:
    """What failed, in words: a peer that did not exit 0 or whose loss did not fall; a CUDA prediction off by
    more than TOLERANCE. Empty when all passed."""
    failed = [] if out["swarm"]["peers"] or out["errors"] else ["swarm: no peer reported"]
    failed += [f"{p['name']}: exit {p['exit_code']}" for p in out["swarm"]["peers"] if p["exit_code"] != 0]
    failed += [f"{p['name']}: loss did not fall {p['losses']}" for p in out["swarm"]["peers"] if not p["loss_falls"]]
    if out["device"] != "cpu":
        failed += [f"planner off by more than {TOLERANCE:.0%}: {r['what']} ({r['ratio']:.2f})"
                   for r in out["planner"] if abs(r["ratio"] - 1) > TOLERANCE]  # fmt: skip
    return failed


def _section(out: dict, name: str, run: object, empty: dict) -> dict:
    """One part of the check; its failure is recorded and the others still run (a lent GPU's minutes are few)."""
    try:
        return run()  # type: ignore[operator]
    except (RuntimeError, OSError, subprocess.TimeoutExpired, AssertionError, ValueError) as error:
        out["errors"].append(f"{name}: {error!r}"[:2000])
        print(f"{name} failed: {error!r}", file=sys.stderr)
        return empty


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="micro/tiny presets, a short swarm (for CPU).")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="Logs and scratch. [default: a temp dir]")
    args = parser.parse_args()
    unwind_on_sigterm()
    mode = DRY if args.dry_run else FULL
    default_name = "gpu_check_dryrun.json" if args.dry_run else "gpu_check.json"
    path = args.out or ROOT / "benchmarks" / "results" / default_name
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        workdir = args.workdir or Path(scratch)
        start = time.perf_counter()
        out: dict = {"device": args.device, "dry_run": args.dry_run, "mode": mode, "errors": []}
        out["step_cost"] = _section(out, "step cost", lambda: step_cost(mode, args.device, workdir), {"rows": []})
        out["swarm"] = _section(out, "swarm", lambda: swarm(mode, args.device, workdir), {"peers": []})
        out["planner"] = []
        if out["step_cost"]["rows"]:
            out["planner"] += planner_rows(out["step_cost"], args.device)
        if out["swarm"]["peers"]:
            out["planner"] += swarm_planner_rows(out["swarm"], args.device)
        out["seconds"] = time.perf_counter() - start
        out["failed"] = out["errors"] + verdicts(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(markdown(out))
    print(f"{out['seconds']:.0f} s; wrote {path}", file=sys.stderr)
    for line in out["failed"]:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if out["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
