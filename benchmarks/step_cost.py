"""One training step of the full model against the slice-restricted step, side by side in one run.

    python -m benchmarks.step_cost --presets tiny,small --slices 2,4,8 [--device cuda] [--json PATH]

For each preset, cut and K: wall time, backward FLOPs (counted by torch's FLOP counter) and
memory, each as a ratio to the full-model step measured in the same process. Memory is CUDA's
peak allocated bytes on a GPU; on CPU it is the gradient + AdamW bytes the optimiser holds (peak
RSS of one process mixes every configuration and would say nothing per row).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from peer.inner import InnerConfig, SliceOptimizer
from peer.model import PRESETS, Transformer
from peer.subsets import SliceConfig, full_layout, parameter_shapes, partition, slice_cost


def measure(preset: str, layout: dict, batch: int, device: torch.device, repeats: int) -> dict:
    """Median step time, counted backward FLOPs and memory of training `layout` for one step."""
    config = PRESETS[preset]
    torch.manual_seed(0)
    model = Transformer(config).to(device)
    optimizer = SliceOptimizer(model, layout, InnerConfig())
    x = torch.randint(0, config.vocab_size, (batch, config.seq_len), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        model.loss(x, x).backward()
        optimizer.step(1e-4)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step allocates optimizer state
            times.append(time.perf_counter() - start)
    loss = model.loss(x, x)
    counter = FlopCounterMode(display=False)
    with counter:
        loss.backward()
    memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else optimizer.state_bytes()
    optimizer.close()
    del model, optimizer, loss
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"seconds": statistics.median(times), "backward_flops": counter.get_total_flops(), "memory": memory}


def run(presets: list[str], ks: list[int], cuts: list[str], batch: int, device: torch.device, repeats: int) -> list:
    rows = []
    for preset in presets:
        config = PRESETS[preset]
        full = measure(preset, full_layout(parameter_shapes(config)), batch, device, repeats)
        rows.append({"preset": preset, "cut": "full", "k": 1, "slice": "-", **full, "time_ratio": 1.0,
                     "flops_ratio": 1.0, "memory_ratio": 1.0, "predicted_flops_ratio": 1.0})  # fmt: skip
        full_cost = slice_cost(config, full_layout(parameter_shapes(config)))
        for cut in cuts:
            for k in ks:
                try:
                    layouts = partition(config, SliceConfig(num_slices=k, cut=cut))
                except ValueError as error:
                    print(f"skip {preset} {cut} K={k}: {error}")
                    continue
                # blocks: the top slice is cheapest and the bottom one as costly as it gets; units: all equal
                for index in sorted({0, len(layouts) - 1}):
                    m = measure(preset, layouts[index], batch, device, repeats)
                    predicted = slice_cost(config, layouts[index]).backward_flops_per_token
                    rows.append({"preset": preset, "cut": cut, "k": k, "slice": index, **m,
                                 "time_ratio": m["seconds"] / full["seconds"],
                                 "flops_ratio": m["backward_flops"] / full["backward_flops"],
                                 "memory_ratio": m["memory"] / full["memory"],
                                 "predicted_flops_ratio": predicted / full_cost.backward_flops_per_token})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--slices", default="2,4,8")
    parser.add_argument("--cuts", default="units,blocks")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = run(args.presets.split(","), [int(k) for k in args.slices.split(",")], args.cuts.split(","),
               args.batch_size, device, args.repeats)  # fmt: skip
    memory_kind = "CUDA peak allocated" if device.type == "cuda" else "grad+AdamW bytes"
    print(f"device {device}; memory = {memory_kind}; ratios against the full-model step of the same preset")
    print(f"{'preset':<7}{'cut':<8}{'K':>3}{'slice':>6}{'step ms':>10}{'time':>7}{'bwd FLOPs':>11}"
          f"{'predicted':>10}{'memory':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['preset']:<7}{r['cut']:<8}{r['k']:>3}{r['slice']!s:>6}{r['seconds'] * 1e3:>10.1f}"
              f"{r['time_ratio']:>7.2f}{r['flops_ratio']:>11.3f}{r['predicted_flops_ratio']:>10.3f}"
              f"{r['memory_ratio']:>8.3f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
