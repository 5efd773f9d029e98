"""Resident training memory of one peer, exact bytes: murmur (bf16, K=4 and 8, with and without --offload-outer)
against DiLoCo (fp32, and bf16 with an fp32 master), for `124m`, `350m` and `1.3b` (issue 16's memory goal).

    python -m benchmarks.peer_memory [--presets 124m,350m,1.3b] [--measure tiny,small,124m] [--json PATH]

The table is `peer/core/memory.resident_bytes` (shapes only, nothing allocated); `--measure` builds a real
Trainer for each listed preset (bf16 K=4 with offload, and DiLoCo fp32 as K=1), trains one round of one step of
one sequence (resident bytes do not depend on the batch), walks its tensors (`measured_resident_bytes`) and checks
they equal the analytic figure to the byte. Device bytes = weights + fp32 master + grads + AdamW moments + codec
residuals (+ phi and momentum unless offloaded); host bytes = phi + momentum when offloaded. DiLoCo rows carry no
error feedback (an all-reduce of fp32 deltas needs none); murmur's use the run's default codec (int8).
K=8 of `124m` uses the `blocks` cut: its 12 heads do not split 8 ways under `units`.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch

from peer.config import RunConfig
from peer.core.memory import ResidentBytes, measured_resident_bytes, resident_bytes
from peer.core.model import PRESETS
from peer.core.slices import SliceConfig, slice_numel
from protocol.codec import CodecConfig

GOALS = {4: 0.35, 8: 0.25}
"""Issue 16: device bytes of a murmur peer over DiLoCo's (fp32) at K=4 and K=8, with offload."""


def cut_for(preset: str, k: int) -> str:
    return "units" if PRESETS[preset].n_heads % k == 0 else "blocks"


def rows(preset: str) -> list[tuple[str, ResidentBytes]]:
    """(label, bytes) for DiLoCo fp32, DiLoCo bf16 + master, and murmur bf16 at K=4, 8, with and without offload."""
    model, codec = PRESETS[preset], CodecConfig()
    out = [("DiLoCo fp32", resident_bytes(model, None)),
           ("DiLoCo bf16 + fp32 master", resident_bytes(model, None, dtype="bfloat16"))]  # fmt: skip
    for k in GOALS:
        slices = SliceConfig(num_slices=k, cut=cut_for(preset, k))
        for offload in (False, True):
            label = f"murmur bf16 K={k}{' --offload-outer' if offload else ''}"
            out.append((label, resident_bytes(model, slices, dtype="bfloat16", offload_outer=offload, codec=codec)))
    return out


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def table(presets: list[str]) -> tuple[str, dict]:
    """The markdown table and its JSON form."""
    lines = ["| preset | peer | weights | master | grads | AdamW | outer | feedback | device | host | "
             "device / DiLoCo fp32 | device / DiLoCo bf16 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    report: dict = {}
    for preset in presets:
        found = rows(preset)
        fp32, bf16 = found[0][1].device, found[1][1].device
        report[preset] = {}
        for label, r in found:
            parts = (r.weights, r.master, r.grads, r.optimizer, r.outer, r.feedback, r.device, r.host)
            lines.append(f"| {preset} | {label} | " + " | ".join(mib(p) for p in parts)
                         + f" | {r.device / fp32:.3f} | {r.device / bf16:.3f} |")  # fmt: skip
            report[preset][label] = {"weights": r.weights, "master": r.master, "grads": r.grads,
                                     "optimizer": r.optimizer, "outer": r.outer, "feedback": r.feedback,
                                     "device": r.device, "host": r.host, "vs_diloco_fp32": r.device / fp32,
                                     "vs_diloco_bf16": r.device / bf16}  # fmt: skip
    return "\n".join(lines), report


def measure(preset: str, dtype: str, k: int, offload: bool) -> tuple[ResidentBytes, ResidentBytes, float]:
    """(measured, analytic, seconds) for a real Trainer of `preset` on its largest slice after one round."""
    from peer.node.trainer import Trainer

    slices = {"num_slices": k, "cut": cut_for(preset, k) if k > 1 else "units"}
    run = RunConfig.from_dict({"swarm": "memory", "preset": preset, "dtype": dtype, "slices": slices,
                               "inner": {"steps_per_round": 1, "batch_size": 1}})  # fmt: skip
    start = time.perf_counter()
    trainer = Trainer(run, "ab" * 32, torch.device("cpu"), offload_outer=offload)
    largest = max(range(k), key=lambda i: slice_numel(trainer.layouts[i], trainer.shapes))
    trainer.take_slice(largest)
    done = trainer.train_round(0, threading.Event())
    trainer.outer_step(done.own, [])
    measured = measured_resident_bytes(trainer)
    analytic = resident_bytes(run.model, run.slices if k > 1 else None, dtype=dtype, offload_outer=offload,
                              codec=run.codec)  # fmt: skip
    return measured, analytic, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="124m,350m,1.3b")
    parser.add_argument("--measure", default="tiny,small,124m", help="presets to cross-check with a real Trainer "
                                                                   "('' for none)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    text, report = table([p for p in args.presets.split(",") if p])
    print(text)
    checks = []
    for preset in [p for p in args.measure.split(",") if p]:
        for dtype, k, offload in (("bfloat16", 4, True), ("float32", 1, False)):
            measured, analytic, seconds = measure(preset, dtype, k, offload)
            same = measured == analytic
            checks.append({"preset": preset, "dtype": dtype, "k": k, "offload": offload, "equal": same,
                           "device": measured.device, "host": measured.host, "seconds": round(seconds, 1)})
            print(f"measured {preset} {dtype} K={k}{' offload' if offload else ''}: device {measured.device:,} B, "
                  f"host {measured.host:,} B, {'equal to' if same else 'DIFFERS from'} the analytic figure "
                  f"({seconds:.1f} s)", flush=True)  # fmt: skip
            if not same:
                print(f"  measured {measured}\n  analytic {analytic}")
    if args.json is not None:
        args.json.write_text(json.dumps({"table": report, "measured": checks}, indent=1))
    if not all(c["equal"] for c in checks):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
