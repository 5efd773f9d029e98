"""One training step of the full model against the slice-restricted step, side by side in one run.

    python -m benchmarks.step_cost [--presets tiny,small] [--slices 2,4,8] [--cuts units,blocks] [--rest-steps 0,0.3]
                                   [--device cuda]

For each preset, cut and K, every figure is a ratio to the full-model step of the same preset, shown
next to what `peer/core/slices.py` (`slice_cost`) predicts from parameter counts:
- time: median step time; full and slice steps alternate in one process so load noise hits both.
  Predicted: (forward + slice backward FLOPs) / (forward + full backward FLOPs).
- backward FLOPs: torch's FLOP counter over one backward pass.
- state: gradient + AdamW bytes, counted from the buffers the optimiser really holds after a step.
- peak memory: each configuration trains a few steps in a fresh subprocess that reports its peak RSS
  (`ru_maxrss`) and, on a GPU, CUDA's peak allocated bytes; the ratio is of what training added above
  the process's footprint once the model was built (torch's own ~300 MB would hide every difference).
Units slices are equal by construction, so only slice 0 is measured; blocks: the top slice (cheapest)
and the bottom one (it owns the input embedding, so its backward runs through every block).
Each slice is measured with every `--rest-steps` value: 0 freezes the rest (the PPU paper's slice),
above 0 the rest takes sign steps (InnerConfig.rest_step, the default run), which computes every
weight gradient (cut name `+rest`).
Writes `benchmarks/results/step_cost_<device>.json` unless `--json` names another path.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count

from peer.core.inner import InnerConfig, SliceOptimizer
from peer.core.model import PRESETS, Transformer
from peer.core.slices import (
    SliceConfig,
    SliceLayout,
    forward_flops_per_token,
    full_layout,
    parameter_shapes,
    partition,
    slice_cost,
)

ROOT = Path(__file__).resolve().parents[1]
CHILD_STEPS = 3


def _cpu_attention_backward(grad_out: tuple, query: tuple, key: tuple, value: tuple, *_: object, **__: object) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's FLOP counter has formulas for the CUDA attention kernels but none for the CPU one, so on CPU
# it would leave the attention core (8 T d_model per token and layer) out of the backward count
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


@dataclass(frozen=True, slots=True)
class Case:
    """One configuration: a preset and one slice of one cut (cut "full": the whole model)."""

    preset: str
    cut: str
    k: int
    index: int
    rest: float = 0.0
    """InnerConfig.rest_step of the slice's optimiser."""

    def layout(self) -> SliceLayout:
        config = PRESETS[self.preset]
        if self.cut == "full":
            return full_layout(parameter_shapes(config))
        return partition(config, SliceConfig(num_slices=self.k, cut=self.cut))[self.index]

    def spec(self) -> str:
        return f"{self.preset}:{self.cut}:{self.k}:{self.index}:{self.rest}"

    @classmethod
    def parse(cls, spec: str) -> Case:
        preset, cut, k, index, rest = spec.split(":")
        return cls(preset, cut, int(k), int(index), float(rest))


class Stepper:
    """A model and the optimiser of one slice, ready to take timed training steps on a fixed batch."""

    def __init__(self, case: Case, batch: int, device: torch.device) -> None:
        config = PRESETS[case.preset]
        torch.manual_seed(0)
        self.device = device
        self.model = Transformer(config).to(device)
        self.optimizer = SliceOptimizer(self.model, case.layout(), InnerConfig(rest_step=case.rest))
        self.x = torch.randint(0, config.vocab_size, (batch, config.seq_len), device=device)

    def step(self) -> float:
        start = time.perf_counter()
        self.optimizer.zero_grad()
        self.model.loss(self.x, self.x).backward()
        self.optimizer.step(1e-4)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def backward_flops(self) -> int:
        loss = self.model.loss(self.x, self.x)
        counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
        with counter:
            loss.backward()
        return counter.get_total_flops()

    def state_bytes(self) -> int:
        """Gradient + AdamW bytes held right after a step, counted from the real buffers (not a formula)."""
        moments = sum(t.nbytes for key, t in self.optimizer.state_dict().items() if key != "steps")
        grads = sum(g.nbytes for _, g in self.optimizer._grads())  # the buffers clip_grad_norm scales
        return moments + grads

    def close(self) -> None:
        self.optimizer.close()


def interleaved_times(full: Stepper, part: Stepper, repeats: int) -> tuple[float, float, float]:
    """Median step seconds of each and the median of per-pair ratios, alternating full/slice (and which
    goes first) so that load drift on a shared machine hits both alike."""
    full.step(), part.step()  # the first step allocates the optimiser state
    full_times, part_times = [], []
    for i in range(repeats):
        order = ((full, full_times), (part, part_times))
        for stepper, times in order if i % 2 == 0 else order[::-1]:
            times.append(stepper.step())
    ratio = statistics.median(p / f for p, f in zip(part_times, full_times))
    return statistics.median(full_times), statistics.median(part_times), ratio


def child_memory(case: Case, batch: int, device: torch.device) -> dict:
    """Run in a fresh process: peak RSS (and CUDA peak) of a few steps, and the footprint before them.

    `process_peak_rss` is `ru_maxrss`, the whole process's peak, import of torch included. For what
    training adds, freed heap pages go back to the kernel and the peak is reset (Linux `clear_refs`)
    once the model is built; `VmHWM` then tracks the training steps alone. (`ru_maxrss` cannot: it
    also keeps the peak of any thread that exited earlier.)
    """
    stepper = Stepper(case, batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_cuda = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # else training reuses freed pages unseen
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:  # not Linux with glibc: the base then includes the import peak
        pass
    base_rss = _status_bytes("VmRSS")
    for _ in range(CHILD_STEPS):
        stepper.step()
    out = {"base_rss": base_rss, "peak_rss": max(base_rss, _status_bytes("VmHWM")), "process_peak_rss": _maxrss()}
    if device.type == "cuda":
        out.update(base_cuda=base_cuda, peak_cuda=torch.cuda.max_memory_allocated())
    return out


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _status_bytes(field: str) -> int:
    """A /proc/self/status memory field; `ru_maxrss` where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _maxrss()


def spawn_child(case: Case, batch: int, device: torch.device, timeout: float) -> dict:
    command = [sys.executable, "-m", "benchmarks.step_cost", "--child", case.spec(), "--batch-size", str(batch),
               "--device", str(device)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child {case.spec()} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cases(presets: list[str], ks: list[int], cuts: list[str], rests: list[float] = [0.0]) -> list[Case]:  # noqa: B006
    out = []
    for preset in presets:
        for cut in cuts:
            for k in ks:
                try:
                    layouts = partition(PRESETS[preset], SliceConfig(num_slices=k, cut=cut))
                except ValueError as error:
                    print(f"skip {preset} {cut} K={k}: {error}", file=sys.stderr)
                    continue
                indices = [0] if cut == "units" else sorted({len(layouts) - 1, 0})
                out += [Case(preset, cut, k, index, rest) for rest in rests for index in indices]
    return out


def predicted(case: Case) -> dict:
    """What the parameter counts say, as ratios to the full model."""
    config = PRESETS[case.preset]
    full = slice_cost(config, full_layout(parameter_shapes(config)))
    cost = slice_cost(config, case.layout(), rest_moves=case.rest > 0)
    forward = forward_flops_per_token(config)
    return {
        "predicted_flops_ratio": cost.backward_flops_per_token / full.backward_flops_per_token,
        "ideal_flops_ratio": cost.ideal_backward_flops_per_token / full.ideal_backward_flops_per_token,
        "predicted_time_ratio": (forward + cost.backward_flops_per_token) / (forward + full.backward_flops_per_token),
        "predicted_state_ratio": cost.state_bytes / full.state_bytes,
        "params": cost.params,
    }


def measure_preset(preset: str, slices: list[Case], args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Every slice of one preset against the full step: interleaved times, FLOPs, state, child memory."""
    full = Stepper(Case(preset, "full", 1, 0), args.batch_size, device)
    full.step()
    full_flops, full_state = full.backward_flops(), full.state_bytes()
    memory = {"full": spawn_child(Case(preset, "full", 1, 0), args.batch_size, device, args.child_timeout)}
    rows = [{"preset": preset, "cut": "full", "k": 1, "slice": "-", "backward_flops": full_flops,
             "state_bytes": full_state, **memory["full"], **predicted(Case(preset, "full", 1, 0))}]  # fmt: skip
    for case in slices:
        part = Stepper(case, args.batch_size, device)
        full_s, part_s, ratio = interleaved_times(full, part, args.repeats)
        flops, state = part.backward_flops(), part.state_bytes()
        part.close()
        del part
        mem = spawn_child(case, args.batch_size, device, args.child_timeout)
        cut = f"{case.cut}+rest" if case.rest else case.cut
        row = {"preset": preset, "cut": cut, "rest_step": case.rest, "k": case.k, "slice": case.index,
               "seconds": part_s, "full_seconds": full_s, "time_ratio": ratio, "backward_flops": flops,
               "flops_ratio": flops / full_flops, "state_bytes": state, "state_ratio": state / full_state,
               **mem, **memory_ratios(mem, memory["full"]), **predicted(case)}  # fmt: skip
        rows.append(row)
        print(format_row(row), file=sys.stderr, flush=True)
    full.close()
    return rows


def memory_ratios(mem: dict, full: dict) -> dict:
    training, full_training = mem["peak_rss"] - mem["base_rss"], full["peak_rss"] - full["base_rss"]
    out = {"rss_ratio": mem["process_peak_rss"] / full["process_peak_rss"],
           "training_rss_ratio": training / max(1, full_training)}  # fmt: skip
    if "peak_cuda" in mem:
        out["cuda_peak_ratio"] = mem["peak_cuda"] / full["peak_cuda"]
    return out


HEADER = (f"{'preset':<7}{'cut':<12}{'K':>2}{'sl':>3}{'step ms':>9}{'time':>6}{'(pred)':>7}{'bwd FLOPs':>10}"
          f"{'(pred)':>7}{'state':>7}{'(pred)':>7}{'train RSS':>10}{'peak RSS':>9}")  # fmt: skip


def format_row(r: dict) -> str:
    if r["cut"] == "full":
        mb = (r["peak_rss"] - r["base_rss"]) / 2**20
        return f"{r['preset']:<7}{'full':<12}  1  - state {r['state_bytes']:,} B; training RSS {mb:.0f} MiB"
    cuda = f"{r['cuda_peak_ratio']:>7.3f}" if "cuda_peak_ratio" in r else ""
    return (f"{r['preset']:<7}{r['cut']:<12}{r['k']:>2}{r['slice']:>3}{r['seconds'] * 1e3:>9.1f}{r['time_ratio']:>6.2f}"
            f"{r['predicted_time_ratio']:>7.2f}{r['flops_ratio']:>10.3f}{r['predicted_flops_ratio']:>7.3f}"
            f"{r['state_ratio']:>7.3f}{r['predicted_state_ratio']:>7.3f}{r['training_rss_ratio']:>10.3f}"
            f"{r['rss_ratio']:>9.3f}{cuda}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--slices", default="2,4,8")
    parser.add_argument("--cuts", default="units,blocks")
    parser.add_argument("--rest-steps", default="0,0.3", help="InnerConfig.rest_step values per slice.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="Timed steps of each, full and slice, per row.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child-timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.child:
        print(json.dumps(child_memory(Case.parse(args.child), args.batch_size, device)))
        return
    start = time.perf_counter()
    presets, ks, cuts = args.presets.split(","), [int(k) for k in args.slices.split(",")], args.cuts.split(",")
    unknown = [p for p in presets if p not in PRESETS] + [c for c in cuts if c not in ("units", "blocks")]
    if unknown:
        parser.error(f"unknown preset or cut: {', '.join(unknown)}")
    try:
        rests = [float(x) for x in args.rest_steps.split(",")]
        InnerConfig(rest_step=max(rests))
    except ValueError as error:
        parser.error(f"--rest-steps: {error}")
    all_cases = cases(presets, ks, cuts, rests)
    print(HEADER, file=sys.stderr)
    rows = [row for p in presets for row in measure_preset(p, [c for c in all_cases if c.preset == p], args, device)]
    print(f"device {device}, batch {args.batch_size}, {torch.get_num_threads()} threads; ratios to the full step of "
          "the same preset, (pred) from parameter counts; train RSS = peak RSS above the built model's")  # fmt: skip
    print(HEADER + ("   CUDA peak" if device.type == "cuda" else ""))
    for r in rows:
        print(format_row(r))
    seconds = time.perf_counter() - start
    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))  # fmt: skip
    print(f"{seconds:.0f} s wall, {cpu:.0f} CPU-seconds with the memory children (a shared machine stretches the wall)")
    path = args.json or ROOT / "benchmarks" / "results" / f"step_cost_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {"batch_size": args.batch_size, "repeats": args.repeats, "threads": torch.get_num_threads()}
    out = {"device": str(device), **settings, "seconds": seconds, "cpu_seconds": cpu, "rows": rows}
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
