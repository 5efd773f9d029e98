"""murmur against hivemind's collaborative optimizer: validation loss vs wall-clock and vs bytes sent per peer.

Both systems train the same model (`tiny` preset, same seed, so the same initial weights) on the same data
(the embedded byte-level corpus, disjoint windows per peer) with the same number of peers and the same
token budget, every peer a real process, and both are scored on the same held-out windows (the daemon's
`eval round N val_loss`: batch 2 x B, 8 batches):

- hivemind: benchmarks/_hivemind_worker.py, `hivemind.Optimizer` in each configuration of
  `--hivemind-configs` (benchmarks/_vs_hivemind_report.py: `(allreduce|local)[-(fp16|8bit)][:TARGET]`):
  all-reduce of gradients (`use_local_updates=False`, synchronous large-batch AdamW steps) or local updates
  with the parameters averaged every epoch (`use_local_updates=True`, DiLoCo-like), the averaged tensors in
  fp32, fp16 or 8-bit, target_batch_size by default peers x H x B (an epoch per H local steps per peer).
  Each uses the same sample budget as murmur: all-reduce peers stop at the epoch that spends it, local
  ones at their share of it (R x H steps).
- murmur: `murmur run --rounds R` (R rounds of H inner steps of batch B per peer), owner with
  --manifest/--key, the others with --run-key, a `murmur bootstrap` node, K slices, int8 updates.

Bytes: each peer runs in its own network namespace (`ip netns`), joined to a bridge by a veth pair; the
host end's rx_bytes/tx_bytes are what the peer sent/received, everything included (DHT, gRPC or libp2p,
TLS, TCP/IP headers; what a peer says to itself stays on its own loopback). Sampled every 0.5 s and
interpolated at each evaluation. Needs root (CAP_NET_ADMIN); the bootstrap node sits on the bridge.

    sudo .venv/bin/python -m benchmarks.vs_hivemind            # ~15 minutes on 2 cores (7 runs)
    .venv/bin/python -m benchmarks.vs_hivemind --rounds 4 --hivemind-configs local-8bit    # a quick look

Each run is scored at time and bytes to a target loss, loss at equal tokens and at equal wall-clock
(benchmarks/_vs_hivemind_report.py). Writes benchmarks/results/vs_hivemind.json and vs_hivemind.png; prints
the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._vs_hivemind_report import (
    Curve,
    Eval,
    HivemindConfig,
    Options,
    curve_table,
    parse_configs,
    plot,
    summary,
    summary_table,
)
from peer.core.data import load_corpus
from peer.core.evaluation import val_loss
from peer.core.model import Transformer, preset
from peer.lab.harness import run_toml
from peer.node.roundline import RoundLine

SUBNET = "10.79.0"
BRIDGE = "vhbr0"
ROOT = Path(__file__).resolve().parent.parent
MADDR = re.compile(r"^(/ip4/[\d.]+/tcp/\d+/p2p/\w+)$")
EVAL = re.compile(r"^eval round (\d+) val_loss ([\d.]+|nan|inf)$")
DEFAULT_CONFIGS = "allreduce,allreduce-8bit:160,local,local-fp16,local-8bit,local-8bit:160"


class BenchError(RuntimeError):
    """The benchmark could not go on; the message says which process or step failed and why."""


# --- network namespaces ------------------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode:
        raise BenchError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()} (this benchmark needs root)")


def teardown_network(peers: int) -> None:
    for i in range(peers):
        _ip("netns", "del", f"vhp{i}", check=False)  # deletes its veth pair too
    _ip("link", "del", BRIDGE, check=False)


def setup_network(peers: int) -> list[str]:
    """Bridge at SUBNET.1, namespace vhp{i} at SUBNET.{11+i}; the IPs of the peers."""
    teardown_network(peers)
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    ips = []
    for i in range(peers):
        ns, host, inner, ip = f"vhp{i}", f"vhh{i}", f"vhn{i}", f"{SUBNET}.{11 + i}"
        _ip("netns", "add", ns)
        _ip("link", "add", host, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", host, "master", BRIDGE)
        _ip("link", "set", host, "up")
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        ips.append(ip)
    return ips


def counters(peers: int) -> list[tuple[int, int]]:
    """(sent, received) bytes of each peer: rx/tx of the host end of its veth."""
    out = []
    for i in range(peers):
        stats = Path(f"/sys/class/net/vhh{i}/statistics")
        out.append((int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())))
    return out


def group_cpu_ticks(pgid: int, seen: dict[int, int]) -> None:
    """Record utime + stime (+ reaped children's) of every live process of group `pgid` into `seen` (pid -> ticks)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # fields[2]: pgrp; [11..14]: utime stime cutime cstime
            seen[int(stat.parent.name)] = sum(int(f) for f in fields[11:15])


class Sampler:
    """Every `period` s: (time since t0, per-peer (sent, received) since the start); and the CPU ticks of the
    process groups in `groups` (CPU seconds do not depend on what else the machine runs, wall-clock does)."""

    def __init__(self, peers: int, t0: float, period: float = 0.5) -> None:
        self.peers, self.t0, self.period = peers, t0, period
        self.groups: list[int] = []
        self.ticks: dict[int, dict[int, int]] = {}
        self.base = counters(peers)
        self.samples: list[tuple[float, list[tuple[int, int]]]] = [(0.0, [(0, 0)] * peers)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _take(self) -> None:
        now = [(s - bs, r - br) for (s, r), (bs, br) in zip(counters(self.peers), self.base)]
        self.samples.append((time.monotonic() - self.t0, now))
        for pgid in list(self.groups):
            group_cpu_ticks(pgid, self.ticks.setdefault(pgid, {}))

    def cpu_seconds(self, pgid: int) -> float:
        return sum(self.ticks.get(pgid, {}).values()) / os.sysconf("SC_CLK_TCK")

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._take()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def sent_at(self, peer: int, t: float) -> float:
        """Bytes `peer` had sent at time t (linear between samples)."""
        prev_t, prev = 0.0, 0
        for st, values in self.samples:
            if st >= t:
                frac = (t - prev_t) / (st - prev_t) if st > prev_t else 1.0
                return prev + frac * (values[peer][0] - prev)
            prev_t, prev = st, values[peer][0]
        return float(prev)


# --- processes ---------------------------------------------------------------------------------------------


class Child:
    """A process (in a namespace or not) in its own session; stdout lines stamped on arrival."""

    def __init__(self, name: str, argv: list[str], workdir: Path, t0: float, ns: str | None = None) -> None:
        self.name, self.t0 = name, t0
        self.lines: list[tuple[float, str]] = []
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
               "MURMUR_HOME": str(workdir / f"home-{name}")}  # fmt: skip
        full = ["ip", "netns", "exec", ns, *argv] if ns else argv
        self.err_path = workdir / f"{name}.err"
        with open(self.err_path, "w") as err:
            self.popen = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1, cwd=workdir,
                                          env=env, start_new_session=True)  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, line in list(self.lines):
                if m := pattern.search(line):
                    return m
            if self.popen.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.2)
        raise BenchError(f"{self.name}: no line matching {pattern.pattern!r}\n{self.tail()}")

    def tail(self, n: int = 12) -> str:
        err = self.err_path.read_text(errors="replace").splitlines()[-n:] if self.err_path.exists() else []
        return "\n".join([f"--- {self.name} stdout:", *[s for _, s in self.lines[-n:]], "--- stderr:", *err])

    def kill(self) -> None:
        """SIGTERM the group, SIGKILL it after 10 s (hivemind's helpers and p2pd included)."""
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.popen.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGKILL:
                return


def wait_all(children: list[Child], timeout: float, what: str) -> float | None:
    """Until every child exited: the time (since t0) the last one did; None when `timeout` passed first (what
    they did so far is still reported). BenchError when one failed."""
    deadline = time.monotonic() + timeout
    while any(c.popen.poll() is None for c in children):
        if time.monotonic() > deadline:
            print(f"{what}: not finished within {timeout:.0f}s; reporting what the peers did so far", flush=True)
            return None
        time.sleep(0.25)
    for child in children:
        if child.popen.returncode != 0:
            raise BenchError(f"{child.name} exited with {child.popen.returncode}\n{child.tail()}")
    return time.monotonic() - children[0].t0


# --- the two runs ------------------------------------------------------------------------------------------


def start_murmur(opts: Options, ips: list[str], t0: float) -> tuple[list[Child], list[Child]]:
    wd = opts.workdir / "murmur"
    wd.mkdir(parents=True)
    total = opts.rounds * opts.steps
    config = run_toml("vsh", preset=opts.preset, slices=opts.slices, steps_per_round=opts.steps, batch_size=opts.batch,
                      warmup_steps=opts.steps, total_steps=total)  # fmt: skip
    (wd / "run.toml").write_text(config)
    cli = [sys.executable, "-m", "peer.cli.main"]
    made = subprocess.run(
        [*cli, "create-run", "--config", "run.toml", "--key", "owner.key", "--out", "manifest.json"],
        cwd=wd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "MURMUR_HOME": str(wd / "home-create")},
    )
    if made.returncode:
        raise BenchError(f"murmur create-run failed: {made.stdout}{made.stderr}")
    run_key = made.stdout.strip().splitlines()[-1].strip()
    boot = Child("boot", [*cli, "bootstrap", "--host-maddrs", f"/ip4/{SUBNET}.1/tcp/0", "--identity", "boot.key"], wd,
                 t0)  # fmt: skip
    maddr = boot.wait_for(MADDR, 90).group(1)
    peers = []
    for i, ip in enumerate(ips):
        who = ["--manifest", "manifest.json", "--key", "owner.key"] if i == 0 else ["--run-key", run_key]
        argv = [*cli, "run", "--swarm", "vsh", "--initial-peers", maddr, *who, "--identity", f"peer{i}.id",
                "--host-maddrs", f"/ip4/{ip}/tcp/0", "--listen", f"{ip}:0", "--announce-ttl", "10", "--device", "cpu",
                "--rounds", str(opts.rounds), "--eval-every", "1", "--checkpoint-every", "0"]  # fmt: skip
        peers.append(Child(f"murmur{i}", argv, wd, t0, ns=f"vhp{i}"))
    return [boot], peers


def murmur_evals(child: Child, sampler: Sampler, index: int, opts: Options) -> list[Eval]:
    """After each round this peer trained (`--eval-every 1`: an eval line per round): (t, bytes sent, val loss,
    swarm samples = rounds x H x B x peers)."""
    out: list[Eval] = []
    for t, line in child.lines:
        if m := EVAL.match(line):
            done = (len(out) + 1) * opts.steps * opts.batch * opts.peers
            out.append((t, sampler.sent_at(index, t), float(m.group(2)), done))
    return out


def start_hivemind(opts: Options, ips: list[str], t0: float, config: HivemindConfig) -> tuple[list[Child], list[Child]]:
    wd = opts.workdir / f"hivemind-{config.spec.replace(':', '-')}"
    wd.mkdir(parents=True)
    worker = [sys.executable, "-m", "benchmarks._hivemind_worker"]
    boot = Child("boot", [*worker, "--bootstrap", "--host", f"{SUBNET}.1"], wd, t0)
    maddr = json.loads(boot.wait_for(re.compile(r'^\{"event": "maddrs"'), 90).string)["maddrs"][0]
    mode = ["--local-updates"] if config.local else []
    # local mode: every peer stops at its share of the budget (its epochs lag its steps: the swarm's sample count
    # reaches the DHT late); all-reduce mode: at the last epoch, as hivemind's users stop (a cap there would drop
    # the last global step, whose transition comes after the peers' share of the budget)
    cap = ["--max-local-steps", str(opts.rounds * opts.steps)] if config.local else []
    peers = [Child(f"hivemind{i}", [*worker, "--host", ip, "--initial-peers", maddr, "--index", str(i),
                                    "--num-peers", str(opts.peers), "--preset", opts.preset,
                                    "--batch-size", str(opts.batch),
                                    "--target-batch-size", str(config.target_for(opts)),
                                    "--epochs", str(config.epochs_for(opts)), "--eval-every", "1", *mode,
                                    *cap,
                                    "--compression", config.compression, "--run-id", f"vsh-{config.spec}"],
                   wd, t0, ns=f"vhp{i}")
             for i, ip in enumerate(ips)]  # fmt: skip
    return [boot], peers


def hivemind_events(child: Child) -> list[tuple[float, dict[str, Any]]]:
    out = []
    for t, line in child.lines:
        if line.startswith("{"):
            try:
                out.append((t, json.loads(line)))
            except ValueError:
                continue
    return out


def hivemind_evals(child: Child, sampler: Sampler, index: int, opts: Options, config: HivemindConfig) -> list[Eval]:
    """At each global epoch this peer reached (and, in local mode, when it stopped): (t, bytes sent, val loss,
    swarm samples). Samples: in local mode every local step moved the weights, so its local steps x B x peers;
    in all-reduce mode hivemind's own account, epochs x target batch (each global step averages the gradients
    of 1x-1.1x the target batch, its docs say; what the peers computed beyond it is in "tokens trained")."""
    out: list[Eval] = []
    for t, e in hivemind_events(child):
        if e.get("event") == "eval":
            done = int(e["step"]) * opts.batch * opts.peers if config.local else e["epoch"] * config.target_for(opts)
            out.append((t, sampler.sent_at(index, t), float(e["val_loss"]), done))
    return out


def run_system(opts: Options, ips: list[str], config: HivemindConfig | None) -> Curve:
    """Start murmur (config None) or hivemind in `config`, with its bootstrap; wait until every peer finished,
    read its curve; kill all."""
    t0 = time.monotonic()
    label = "murmur" if config is None else f"hivemind {config.spec}"
    load_start = os.getloadavg()[0]
    sampler = Sampler(opts.peers, t0)
    children: list[Child] = []
    try:
        boots, peers = start_murmur(opts, ips, t0) if config is None else start_hivemind(opts, ips, t0, config)
        children = boots + peers
        sampler.groups = [p.popen.pid for p in peers]
        print(f"{label}: {len(peers)} peers started (load average {load_start:.1f})", flush=True)
        wall = wait_all(peers, opts.timeout, f"{label} training")
    finally:
        sampler.stop()
        for child in children:
            child.kill()
            (child.err_path.with_suffix(".out")).write_text("".join(f"{t:.2f} {line}\n" for t, line in child.lines))
    curve = Curve(
        system="murmur" if config is None else "hivemind",
        label=label,
        wall_s=wall or opts.timeout,
        evals=[
            murmur_evals(p, sampler, i, opts) if config is None else hivemind_evals(p, sampler, i, opts, config)
            for i, p in enumerate(peers)
        ],
        traffic=[(t, sum(s for s, _ in values) / len(values)) for t, values in sampler.samples],
    )
    curve.notes.update(timed_out=wall is None, load_average=(load_start, os.getloadavg()[0]))
    final = sampler.samples[-1][1]
    curve.sent, curve.received = [s for s, _ in final], [r for _, r in final]
    if config is None:
        rounds = [len([ln for _, ln in p.lines if RoundLine.parse(ln)]) for p in peers]
        curve.tokens = sum(rounds) * opts.steps * opts.batch * preset(opts.preset).seq_len
        curve.notes["rounds_trained"] = rounds
    else:
        steps = [max((int(e["step"]) for _, e in hivemind_events(p) if e.get("event") == "step"), default=0)
                 for p in peers]  # fmt: skip
        curve.tokens = sum(steps) * opts.batch * preset(opts.preset).seq_len
        curve.notes["local_steps"] = steps
    curve.notes["cpu_s"] = [sampler.cpu_seconds(p.popen.pid) for p in peers]
    curve.notes["first_eval_s"] = min((peer[0][0] for peer in curve.evals if peer), default=None)
    print(f"{label}: done in {curve.wall_s:.0f} s", flush=True)
    return curve


# --- report ------------------------------------------------------------------------------------------------


def initial_loss(opts: Options) -> float:
    """Val loss of the shared initial weights (seed 0, as both systems start)."""
    torch.manual_seed(0)
    model = Transformer(preset(opts.preset)).eval()
    return val_loss(model, load_corpus(None), seq_len=model.config.seq_len, batch_size=2 * opts.batch)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[HivemindConfig]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10, help="murmur rounds (the token budget)")
    p.add_argument("--steps", type=int, default=10, help="H: local steps per round per peer")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--slices", type=int, default=2, help="murmur's K")
    p.add_argument("--systems", default="murmur,hivemind")
    p.add_argument(
        "--hivemind-configs",
        default=DEFAULT_CONFIGS,
        help="(allreduce|local)[-(fp16|8bit)][:TARGET_BATCH], comma-separated; run in this order",
    )
    p.add_argument(
        "--target-loss",
        type=float,
        default=None,
        help="the loss to reach (default: murmur's mean at half its rounds, rounded to 3 decimals)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for one run's training")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="JSON and PNG go here")
    p.add_argument("--name", default="vs_hivemind", help="file stem of the outputs")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/murmur-vs-hivemind"))
    a = p.parse_args(argv)
    systems = [s for s in a.systems.split(",") if s]
    if not set(systems) <= {"murmur", "hivemind"} or not systems:
        p.error("--systems takes murmur and/or hivemind")
    if min(a.peers, a.rounds, a.steps, a.batch, a.slices) < 1 or a.peers > 200:
        p.error("--peers (<= 200), --rounds, --steps, --batch and --slices must be >= 1")
    try:
        configs = parse_configs(a.hivemind_configs) if "hivemind" in systems else []
    except ValueError as err:
        p.error(str(err))
    a.murmur = "murmur" in systems
    return a, configs


def write_results(a: argparse.Namespace, opts: Options, curves: list[Curve], start_loss: float) -> None:
    """Tables on stdout; JSON and chart under --out."""
    summ = summary(curves, opts, start_loss, a.target_loss)
    print(summary_table(summ))
    print()
    print(curve_table(curves, opts, start_loss))
    a.out.mkdir(parents=True, exist_ok=True)
    result = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
              "token_budget": opts.tokens, "initial_val_loss": start_loss,
              "bytes": "veth counters of each peer's network namespace (all traffic, headers included)",
              "summary": summ,
              "systems": [{"system": c.system, "run": c.label, "wall_s": c.wall_s, "tokens": c.tokens,
                           "bytes_sent": c.sent,
                           "bytes_received": c.received, "evals_t_sent_loss_samples": c.evals, **c.notes}
                          for c in curves]}  # fmt: skip
    (a.out / f"{a.name}.json").write_text(json.dumps(result, indent=1))
    title = f"{opts.preset}, {opts.peers} peers, {opts.tokens:,} tokens per run: murmur run vs hivemind.Optimizer"
    plot(curves, start_loss, a.out / f"{a.name}.png", title)
    print(f"wrote {a.out / (a.name + '.json')} and {a.out / (a.name + '.png')}")


def main(argv: list[str] | None = None) -> None:
    a, configs = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("vs_hivemind needs root: each peer runs in its own network namespace to count its bytes")
    opts = Options(peers=a.peers, rounds=a.rounds, steps=a.steps, batch=a.batch, slices=a.slices, timeout=a.timeout,
                   workdir=a.workdir)  # fmt: skip
    subprocess.run(["rm", "-rf", str(opts.workdir)], check=True)
    start_loss = initial_loss(opts)
    print(f"token budget {opts.tokens:,} ({opts.peers} peers x {opts.rounds} x {opts.steps} steps x batch "
          f"{opts.batch}); initial val loss {start_loss:.4f}", flush=True)  # fmt: skip
    curves = []
    try:
        ips = setup_network(opts.peers)
        for config in ([None] if a.murmur else []) + configs:
            curves.append(run_system(opts, ips, config))
    except BenchError as err:
        sys.exit(f"vs_hivemind: {err}")
    finally:
        teardown_network(opts.peers)
    write_results(a, opts, curves, start_loss)


if __name__ == "__main__":
    main()
