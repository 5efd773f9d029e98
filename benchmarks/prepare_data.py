"""`murmur prepare-data`'s peak memory on the embedded corpus and on ten times it, and the shard loader's speed
against one `124m` training step, side by side in one run.

    python -m benchmarks.prepare_data [--copies 10] [--modes train,file,bytes] [--step-batch 1] [--json PATH]

Memory: for each tokenizer mode (`train`: --train-tokenizer 8192; `file`: the tokenizer.json that run wrote;
`bytes`), `murmur prepare-data` runs in a fresh process on the corpus (peer/corpus/default.txt.gz, ~4 MB of
text) and on `--copies` copies of it in one file, one after the other. Each child imports the CLI (torch
included), returns freed pages and resets its high-water mark (Linux `clear_refs`), runs the command through
click, and reports its RSS before, the high-water mark after (what preparing added) and `ru_maxrss` (the whole
process). Streaming means the two rows of a mode match: the check is peak RSS within 20%.

Loader: the `bytes` dataset of the large corpus (several 2^24-token shards) read as one stream's batches of
`--loader-batch` windows of the 124m preset's seq_len + 1 tokens, first cold (SHA-256 checks and page faults
included) then warm; against forward + backward of `Transformer(PRESETS["124m"])` on one micro-batch of
`--step-batch` sequences (a warm-up, then `--step-repeats` timed), on all of this machine's cores. The check:
the loader at least 10x the step's tokens/s (a peer's data must never be what it waits on).
Writes benchmarks/results/prepare_data.json unless `--json` names another path.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.step_cost import _maxrss, _status_bytes  # one reader of /proc/self/status for both

ROOT = Path(__file__).resolve().parents[1]
MODES = {"train": ["--train-tokenizer", "8192"], "bytes": ["--tokenizer", "bytes"]}
MAX_MEMORY_RATIO = 1.2
MIN_LOADER_RATIO = 10.0


def child(args: list[str]) -> dict:
    """In a fresh process: run `murmur prepare-data ARGS` and report its memory (see the module docstring)."""
    from peer.cli.main import main

    _reset_peak()
    base = _status_bytes("VmRSS")
    start = time.perf_counter()
    main(["prepare-data", *args], standalone_mode=False)
    seconds = time.perf_counter() - start
    peak = max(base, _status_bytes("VmHWM"))
    return {"base_rss": base, "peak_rss": peak, "added_rss": peak - base, "process_peak_rss": _maxrss(),
            "seconds": seconds}  # fmt: skip


def _reset_peak() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:  # not Linux with glibc: the peak then includes the imports'
        pass




def spawn(args: list[str], timeout: float) -> dict:
    command = [sys.executable, "-m", "benchmarks.prepare_data", "--child", json.dumps(args)]
    env = {**os.environ, "MURMUR_LOG_LEVEL": "WARNING"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"prepare-data {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_corpora(folder: Path, copies: int) -> dict[str, Path]:
    """The embedded corpus as one .txt file, and `copies` of it in another (written a copy at a time)."""
    from peer.core.data import default_corpus_text

    text = default_corpus_text()
    paths = {"1x": folder / "corpus.txt", f"{copies}x": folder / f"corpus{copies}.txt"}
    paths["1x"].write_text(text)
    with paths[f"{copies}x"].open("w") as f:
        for _ in range(copies):
            f.write(text + "\n\n")
    return paths


def memory_rows(folder: Path, corpora: dict[str, Path], modes: list[str], timeout: float) -> list[dict]:
    rows = []
    for mode in modes:
        for size, path in corpora.items():
            out = folder / f"{mode}-{size}"
            flags = MODES.get(mode) or ["--tokenizer", str(folder / "train-1x" / "tokenizer.json")]
            result = spawn(["--input", str(path), "--out", str(out), *flags], timeout)
            index = json.loads((out / "index.json").read_text())
            rows.append({"mode": mode, "corpus": size, "input_bytes": path.stat().st_size,
                         "tokens": index["total_tokens"], "shards": len(index["train"]), **result})  # fmt: skip
            print(f"  {mode} {size}: {result['seconds']:.1f} s, peak {result['peak_rss'] / 2**20:.0f} MiB",
                  file=sys.stderr)  # fmt: skip
    return rows


def loader_speed(dataset_dir: Path, seq_len: int, batch: int, batches: int) -> dict:
    """Tokens/s of one stream's batches: cold (each shard's SHA-256 and first page faults) and warm."""
    from peer.core.shards import PreparedDataset

    dataset = PreparedDataset.open(dataset_dir)
    stream = dataset.stream(seq_len, stream_index=0, num_streams=1, steps_per_round=batches)
    out = {"shards": len(dataset.index.train), "seq_len": seq_len, "batch": batch, "batches": batches}
    for label in ("cold", "warm"):
        start = time.perf_counter()
        for step in range(batches):
            stream.batch(0 if label == "cold" else 1, step, batch)
        out[f"{label}_tokens_per_s"] = batches * batch * seq_len / (time.perf_counter() - start)
    return out


def step_speed(batch: int, repeats: int) -> dict:
    """Tokens/s of forward + backward of the 124m preset on one micro-batch, after a warm-up step."""
    import torch

    from peer.core.model import PRESETS, Transformer

    torch.set_num_threads(os.cpu_count() or 1)
    config = PRESETS["124m"]
    torch.manual_seed(0)
    model = Transformer(config)
    x = torch.randint(0, config.vocab_size, (batch, config.seq_len))
    times = []
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model.loss(x, x).backward()
        if i:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"batch": batch, "seq_len": config.seq_len, "repeats": repeats, "step_seconds": seconds,
            "tokens_per_s": batch * config.seq_len / seconds, "threads": torch.get_num_threads()}  # fmt: skip


def table(rows: list[dict], loader: dict, step: dict) -> tuple[str, dict]:
    lines = ["| mode | corpus | input MiB | tokens | shards | seconds | peak RSS MiB | added by preparing MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    mib = 2**20
    for r in rows:
        lines.append(f"| {r['mode']} | {r['corpus']} | {r['input_bytes'] / mib:.1f} | {r['tokens']:,} | {r['shards']} "
                     f"| {r['seconds']:.1f} | {r['peak_rss'] / mib:.0f} | {r['added_rss'] / mib:.0f} |")  # fmt: skip
    checks: dict = {"memory": {}}
    lines += ["", "| mode | peak RSS, large / small | added, large / small | within 20% |", "| --- | --- | --- | --- |"]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        small, large = [r for r in rows if r["mode"] == mode]
        ratio, added = large["peak_rss"] / small["peak_rss"], large["added_rss"] / max(small["added_rss"], 1)
        checks["memory"][mode] = {"peak_ratio": ratio, "added_ratio": added, "ok": ratio <= MAX_MEMORY_RATIO}
        lines.append(f"| {mode} | {ratio:.3f} | {added:.2f} | {'yes' if ratio <= MAX_MEMORY_RATIO else 'NO'} |")
    cold, warm = loader["cold_tokens_per_s"], loader["warm_tokens_per_s"]
    checks["loader"] = {"cold_ratio": cold / step["tokens_per_s"], "warm_ratio": warm / step["tokens_per_s"],
                        "ok": cold / step["tokens_per_s"] >= MIN_LOADER_RATIO}  # fmt: skip
    lines += ["", "| what | tokens/s | / 124m step |", "| --- | --- | --- |",
              f"| shard loader, cold (shards: {loader['shards']}, batch {loader['batch']} x {loader['seq_len']}) "
              f"| {cold:,.0f} | {checks['loader']['cold_ratio']:,.0f}x |",
              f"| shard loader, warm | {warm:,.0f} | {checks['loader']['warm_ratio']:,.0f}x |",
              f"| 124m forward + backward (batch {step['batch']} x {step['seq_len']}, {step['threads']} threads, "
              f"{step['step_seconds']:.1f} s) | {step['tokens_per_s']:,.0f} | 1x |"]  # fmt: skip
    return "\n".join(lines), checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--modes", default="train,file,bytes", help="Tokenizer modes: train, file, bytes.")
    parser.add_argument("--loader-batch", type=int, default=8)
    parser.add_argument("--loader-batches", type=int, default=200)
    parser.add_argument("--step-batch", type=int, default=1, help="Sequences in the 124m step's micro-batch.")
    parser.add_argument("--step-repeats", type=int, default=2)
    parser.add_argument("--child-timeout", type=float, default=1200.0)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "prepare_data.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return
    modes = [m for m in args.modes.split(",") if m]
    if "file" in modes and "train" not in modes:
        parser.error("mode 'file' uses the tokenizer that mode 'train' writes")
    from peer.core.model import PRESETS

    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
        folder = Path(tmp)
        corpora = write_corpora(folder, args.copies)
        rows = memory_rows(folder, corpora, modes, args.child_timeout)
        loader_dir = folder / f"bytes-{args.copies}x" if "bytes" in modes else folder / f"{modes[0]}-{args.copies}x"
        loader = loader_speed(loader_dir, PRESETS["124m"].seq_len, args.loader_batch, args.loader_batches)
    step = step_speed(args.step_batch, args.step_repeats)
    text, checks = table(rows, loader, step)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"copies": args.copies, "cpus": os.cpu_count(), "memory": rows, "loader": loader,
                                     "step": step, "checks": checks}, indent=2) + "\n")  # fmt: skip
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
