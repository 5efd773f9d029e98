"""What benchmarks/vs_hivemind.py runs and how it scores them: the options, hivemind's configurations, the
curves, the "each system at its best" summary, the tables and the chart.

Separate from the orchestrator (namespaces, processes) so that the scoring can be unit-tested without root
or processes (tests/test_vs_hivemind.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peer.core.model import preset

SPEC = re.compile(r"^(allreduce|local)(?:-(fp16|8bit))?(?::(\d+))?$")


@dataclass(kw_only=True, slots=True)
class Options:
    peers: int = 4
    rounds: int = 10
    steps: int = 10
    """H: local steps per round (murmur) and per peer per epoch (hivemind, at the default target batch)."""
    batch: int = 8
    slices: int = 2
    preset: str = "tiny"
    timeout: float = 600.0
    workdir: Path = Path("/tmp/murmur-vs-hivemind")

    @property
    def samples(self) -> int:
        """The swarm's budget in samples (sequences): what murmur's peers train in `rounds` rounds."""
        return self.peers * self.rounds * self.steps * self.batch

    @property
    def tokens(self) -> int:
        """The swarm's token budget."""
        return self.samples * preset(self.preset).seq_len


@dataclass(frozen=True, slots=True)
class HivemindConfig:
    """One hivemind set-up, written `(allreduce|local)[-(fp16|8bit)][:TARGET]`: the mode (all-reduce of
    gradients, or local updates with parameter averaging each epoch), the compression of the averaged
    tensors, and target_batch_size (default peers x H x B: one epoch per H local steps per peer)."""

    spec: str
    local: bool
    compression: str
    target: int | None

    def target_for(self, opts: Options) -> int:
        return self.target or opts.peers * opts.steps * opts.batch

    def epochs_for(self, opts: Options) -> int:
        """Epochs (global steps) that use the swarm's sample budget (its peers also stop at their share of it)."""
        return -(-opts.samples // self.target_for(opts))


def parse_configs(text: str) -> list[HivemindConfig]:
    """`allreduce,local-fp16:160,...` -> configurations; ValueError naming the bad entry."""
    out = []
    for spec in (s.strip() for s in text.split(",")):
        m = SPEC.match(spec)
        if not m or (m.group(3) is not None and int(m.group(3)) < 1):
            raise ValueError(f"bad hivemind configuration {spec!r}: want (allreduce|local)[-(fp16|8bit)][:TARGET]")
        out.append(HivemindConfig(spec=spec, local=m.group(1) == "local", compression=m.group(2) or "none",
                                  target=int(m.group(3)) if m.group(3) else None))  # fmt: skip
    if len({c.spec for c in out}) != len(out):
        raise ValueError("a hivemind configuration is listed twice")
    return out


Eval = tuple[float, float, float, int]
"""(t since the start, bytes this peer had sent, its validation loss, swarm samples trained: its own steps x B x
peers)."""


@dataclass(kw_only=True, slots=True)
class Curve:
    """One run: each peer's evaluations, and the peers' mean bytes sent over time."""

    system: str
    label: str = ""
    evals: list[list[Eval]] = field(default_factory=list)
    traffic: list[tuple[float, float]] = field(default_factory=list)
    """(t, mean bytes sent per peer), sampled every 0.5 s."""
    wall_s: float = 0.0
    sent: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    tokens: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    def _mean_last(self, index: int, bound: float, start_loss: float) -> float:
        """Mean over the peers of the loss of their last evaluation with field `index` <= bound."""
        last = [next((e[2] for e in reversed(p) if e[index] <= bound), start_loss) for p in self.evals]
        return sum(last) / len(last) if last else start_loss

    def loss_at_time(self, t: float, start_loss: float) -> float:
        return self._mean_last(0, t, start_loss)

    def loss_at_samples(self, samples: float, start_loss: float) -> float:
        """Loss at equal tokens: each peer's last evaluation before the swarm had trained more than `samples`."""
        return self._mean_last(3, samples, start_loss)

    def end_s(self) -> float:
        """When the last peer made its last evaluation."""
        return max((p[-1][0] for p in self.evals if p), default=0.0)

    def bytes_at(self, t: float) -> float:
        """Mean bytes sent per peer at t (linear between samples)."""
        prev_t, prev = 0.0, 0.0
        for st, value in self.traffic:
            if st >= t:
                return prev + (t - prev_t) / (st - prev_t) * (value - prev) if st > prev_t else value
            prev_t, prev = st, value
        return prev

    def reach(self, target: float, start_loss: float) -> tuple[float, float] | None:
        """(t, mean bytes sent per peer) when the peers' mean loss (each at its latest evaluation) first was <=
        target."""
        for t in sorted(e[0] for p in self.evals for e in p):
            if self.loss_at_time(t, start_loss) <= target:
                return t, self.bytes_at(t)
        return None


def summary(curves: list[Curve], opts: Options, start_loss: float, target: float | None) -> dict[str, Any]:
    """Each run at the three yardsticks: time and bytes to `target` (default: murmur's mean loss at half its
    token budget), loss at equal tokens (the budget), loss at equal wall-clock (when the fastest run's last
    peer made its last evaluation)."""
    murmur = next((c for c in curves if c.system == "murmur"), None)
    if target is None and murmur is not None:
        target = round(murmur.loss_at_samples(opts.samples / 2, start_loss), 3)
    equal_t = min((c.end_s() for c in curves), default=0.0)
    rows = []
    for c in curves:
        got = c.reach(target, start_loss) if target is not None else None
        cpu = c.notes.get("cpu_s") or [0.0]
        rows.append({"run": c.label, "load_average": c.notes.get("load_average"),
                     "loss_at_budget": c.loss_at_samples(opts.samples, start_loss),
                     "s_to_target": got[0] if got else None, "mb_to_target": got[1] / 1e6 if got else None,
                     "loss_at_equal_time": c.loss_at_time(equal_t, start_loss), "wall_s": c.wall_s,
                     "timed_out": c.notes.get("timed_out", False), "mb_sent": sum(c.sent) / max(1, len(c.sent)) / 1e6,
                     "mb_received": sum(c.received) / max(1, len(c.received)) / 1e6,
                     "cpu_s": sum(cpu) / len(cpu), "tokens": c.tokens})  # fmt: skip
    return {"target_loss": target, "equal_time_s": equal_t, "rows": rows}


def _num(value: float | None, fmt: str) -> str:
    return "not reached" if value is None else format(value, fmt)


def summary_table(summ: dict[str, Any]) -> str:
    """Markdown: a row per run."""
    rows = [f"| run | load avg (start-end) | loss at equal tokens | s to {summ['target_loss']} | "
            f"MB / peer to {summ['target_loss']} | loss at {summ['equal_time_s']:.0f} s | wall s | MB sent / peer | "
            "CPU s / peer | tokens trained |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in summ["rows"]:
        load = r["load_average"] or (0.0, 0.0)
        wall = f">{r['wall_s']:.0f}" if r["timed_out"] else f"{r['wall_s']:.0f}"
        rows.append(f"| {r['run']} | {load[0]:.1f}-{load[1]:.1f} | {r['loss_at_budget']:.3f} | "
                    f"{_num(r['s_to_target'], '.0f')} | {_num(r['mb_to_target'], '.1f')} | "
                    f"{r['loss_at_equal_time']:.3f} | {wall} | {r['mb_sent']:.1f} | {r['cpu_s']:.0f} | "
                    f"{r['tokens']:,} |")  # fmt: skip
    return "\n".join(rows)


def curve_table(curves: list[Curve], opts: Options, start_loss: float) -> str:
    """Markdown: each run's mean loss at a quarter, half, three quarters and all of the token budget, with
    when (mean over the peers) and the bytes sent per peer by then."""
    seq = preset(opts.preset).seq_len
    rows = ["| run | tokens (swarm) | val loss, mean of peers | wall s | MB sent / peer |",
            "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for curve in curves:
        for f in (0.25, 0.5, 0.75, 1.0):
            bound = opts.samples * f
            times = [next((e[0] for e in reversed(p) if e[3] <= bound), None) for p in curve.evals]
            if any(t is None for t in times) or not times:
                rows.append(f"| {curve.label} | {int(bound * seq):,} | (not every peer got there) | | |")
                continue
            t = sum(times) / len(times)  # type: ignore[arg-type]
            rows.append(f"| {curve.label} | {int(bound * seq):,} | {curve.loss_at_samples(bound, start_loss):.3f} | "
                        f"{t:.0f} | {curve.bytes_at(t) / 1e6:.2f} |")  # fmt: skip
    return "\n".join(rows)


def plot(curves: list[Curve], start_loss: float, path: Path, title: str) -> None:
    """Mean validation loss of the peers against wall-clock and against MB sent per peer, a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for i, curve in enumerate(curves):
        times = [0.0, *sorted({e[0] for p in curve.evals for e in p})]
        losses = [curve.loss_at_time(t, start_loss) for t in times]
        style = {"color": "black" if curve.system == "murmur" else f"C{i}", "lw": 2.2 if curve.system == "murmur"
                 else 1.4, "marker": "o", "ms": 2}  # fmt: skip
        ax_t.plot(times, losses, label=curve.label, drawstyle="steps-post", **style)
        ax_b.plot([curve.bytes_at(t) / 1e6 for t in times], losses, label=curve.label, drawstyle="steps-post",
                  **style)  # fmt: skip
    ax_t.set_xlabel("wall-clock since the peers were started (s)")
    ax_b.set_xlabel("MB sent per peer (veth counters)")
    ax_b.set_xscale("symlog", linthresh=0.1)
    ax_t.set_ylabel("validation loss, mean of peers (nats/token)")
    ax_b.legend(fontsize=8)
    for ax in (ax_t, ax_b):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
