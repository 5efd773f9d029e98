"""Codec speed, compression and error, side by side.

    .venv/bin/python -m benchmarks.codec [--numel 16777216] [--repeats 5] [--json out.json]

Speed is reported as a ratio to `torch.clone` of the same tensor timed in the same run (medians),
so numbers from different machines compare: 1.0 means "as fast as copying the tensor once".
Error is ||decode(encode(x)) - x|| / ||x||, on Gaussian noise and on a real pseudo-gradient
(phi - theta after a few AdamW steps of the tiny model), whose heavy tails are what the codecs meet.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from protocol.codec import CODEC_NAMES, CodecConfig, ErrorFeedback, decode, encode

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A volunteer lends a graphics card for the night and the model learns a little more.",
    "Peers exchange compressed updates with a few random partners every round.",
    "Nobody waits for everyone: a partner that times out is simply skipped.",
    "Small steps taken locally add up to one shared model.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "It was the best of times, it was the worst of times.",
    "Every update is signed, checked, clipped and only then averaged.",
)


EF_ROUNDS = 10


def structured_text(n_bytes: int, seed: int = 0) -> torch.Tensor:
    """Byte tokens (uint8 values as int64) of shuffled, repeated English sentences."""
    generator = torch.Generator().manual_seed(seed)
    pieces: list[str] = []
    total = 0
    while total < n_bytes:
        sentence = SENTENCES[int(torch.randint(len(SENTENCES), (1,), generator=generator))]
        pieces.append(sentence + " ")
        total += len(sentence) + 1
    data = "".join(pieces).encode()[:n_bytes]
    return torch.tensor(list(data), dtype=torch.int64)


def pseudo_gradient(
    steps: int = 20, seed: int = 0, batch: int = 8, seq_len: int | None = None
) -> dict[str, torch.Tensor] | None:
    """delta = phi - theta per parameter of the tiny model after `steps` AdamW steps (lr 1e-3).

    None when peer.core.model is not there yet (the caller falls back to a synthetic tensor).
    """
    try:
        from peer.core.model import PRESETS, Transformer
    except ImportError:
        return None
    torch.manual_seed(seed)
    model = Transformer(PRESETS["tiny"])
    seq_len = seq_len or model.config.seq_len
    text = structured_text(64 * 1024, seed)
    phi = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(len(text) - seq_len - 1, (batch,), generator=generator)
        window = torch.stack([text[s : s + seq_len + 1] for s in starts.tolist()])  # (B, T+1)
        logits = model(window[:, :-1])  # (B, T, 256)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {name: phi[name] - p.detach() for name, p in model.named_parameters()}


def synthetic_heavy_tailed(numel: int = 400_000, seed: int = 0) -> dict[str, torch.Tensor]:
    """Student-t-like (Gaussian / |Gaussian|^0.5) noise at pseudo-gradient scale, in tiny-model shapes."""
    generator = torch.Generator().manual_seed(seed)
    spread = torch.randn(numel, generator=generator).abs().add(0.1).sqrt()
    x = torch.randn(numel, generator=generator) / spread
    return {"synthetic": x * 1e-4}


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def relative_error(decoded: torch.Tensor, x: torch.Tensor) -> float:
    norm = float(x.float().norm())
    return float((decoded.float() - x.float()).norm()) / norm if norm else 0.0


def speed_rows(numel: int, repeats: int, config_kwargs: dict, device: torch.device) -> list[dict]:
    """Per codec, clone/encode/decode timed in turn within each repeat, so load drift on a shared
    machine hits the baseline and the codec alike; ratios are of medians. On CUDA, encode includes
    the copy of the payload to host memory and decode the copy of the payload to the device."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for name in CODEC_NAMES:
        config = CodecConfig(name=name, **config_kwargs)
        encoded = encode(x, config)
        decode(encoded, config, device=device)  # warm-up
        times: dict[str, list[float]] = {"clone": [], "encode": [], "decode": []}
        for _ in range(repeats):
            times["clone"].append(seconds(lambda: x.clone(), device))
            times["encode"].append(seconds(lambda config=config: encode(x, config), device))
            times["decode"].append(
                seconds(lambda config=config, encoded=encoded: decode(encoded, config, device=device), device)
            )
        clone, encode_s, decode_s = (statistics.median(times[key]) for key in ("clone", "encode", "decode"))
        rows.append(
            {
                "codec": name,
                "encode_x_clone": encode_s / clone,
                "decode_x_clone": decode_s / clone,
                "clone_ms": clone * 1e3,
                "encode_ms": encode_s * 1e3,
                "decode_ms": decode_s * 1e3,
                "compression": 4 * numel / len(encoded.payload),
                "rel_error_gaussian": relative_error(decode(encoded, config, device=device), x),
            }
        )
    return rows


def pseudo_gradient_errors(delta: dict[str, torch.Tensor], config: CodecConfig) -> tuple[float, float]:
    """(relative error over all parameters together, fp32 bytes / payload bytes), one message each."""
    err_sq = norm_sq = 0.0
    raw = payload = 0
    for tensor in delta.values():
        encoded = encode(tensor, config)
        decoded = decode(encoded, config)
        err_sq += float((decoded - tensor).float().square().sum())
        norm_sq += float(tensor.float().square().sum())
        raw += 4 * tensor.numel()
        payload += len(encoded.payload)
    return math.sqrt(err_sq / norm_sq) if norm_sq else 0.0, raw / payload if payload else math.inf


def error_feedback_error(delta: dict[str, torch.Tensor], config: CodecConfig, rounds: int) -> float:
    """Relative error of the sum of `rounds` messages each carrying `delta`, with error feedback:
    ||sum decoded - rounds * delta|| / ||rounds * delta||, i.e. what is still owed at the end."""
    feedback = ErrorFeedback(config)
    err_sq = norm_sq = 0.0
    for name, tensor in delta.items():
        received = torch.zeros_like(tensor)
        for _ in range(rounds):
            received += decode(feedback.encode(name, tensor), config)
        err_sq += float((received - rounds * tensor).square().sum())
        norm_sq += float((rounds * tensor).square().sum())
    return math.sqrt(err_sq / norm_sq) if norm_sq else 0.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=16 * 2**20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--topk-fraction", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=20, help="AdamW steps for the pseudo-gradient")
    parser.add_argument("--device", default="cpu", help="where the tensor lives: cpu, cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config_kwargs = {"block_size": args.block_size, "topk_fraction": args.topk_fraction}

    rows = speed_rows(args.numel, args.repeats, config_kwargs, device)
    delta = pseudo_gradient(args.steps)
    source = f"tiny model, {args.steps} AdamW steps" if delta is not None else "SYNTHETIC heavy-tailed"
    if delta is None:
        delta = synthetic_heavy_tailed()
    for row in rows:
        config = CodecConfig(name=row["codec"], **config_kwargs)
        error, compression = pseudo_gradient_errors(delta, config)
        row["rel_error_pseudo_grad"] = error
        row["compression_pseudo_grad"] = compression
        row[f"rel_error_pseudo_grad_ef{EF_ROUNDS}"] = error_feedback_error(delta, config, EF_ROUNDS)

    result = {
        "numel": args.numel,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pseudo_gradient": source,
        "pseudo_gradient_numel": sum(t.numel() for t in delta.values()),
        "config": config_kwargs,
        "rows": rows,
    }
    print_table(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def print_table(result: dict) -> None:
    rows = result["rows"]
    print(
        f"codecs on {result['numel']:,} fp32 values on {result['device']}, {result['threads']} CPU threads, "
        f"torch {result['torch']}; "
        f"speed as a ratio to torch.clone (median of {result['repeats']}, interleaved)"
    )
    print(
        f"pseudo-gradient: {result['pseudo_gradient']} ({result['pseudo_gradient_numel']:,} values); "
        f"'err EF x{EF_ROUNDS}': error of the sum of {EF_ROUNDS} messages of it with error feedback"
    )
    header = ("codec", "enc/clone", "dec/clone", "clone ms", "enc ms", "dec ms", "compress", "err gauss",
              "err pgrad", "compress pgrad", f"err EF x{EF_ROUNDS}")
    print(("{:<6}" + "{:>11}" * 8 + "{:>15}{:>11}").format(*header))
    for r in rows:
        print(
            f"{r['codec']:<6}{r['encode_x_clone']:>11.2f}{r['decode_x_clone']:>11.2f}{r['clone_ms']:>11.1f}"
            f"{r['encode_ms']:>11.1f}"
            f"{r['decode_ms']:>11.1f}{r['compression']:>11.2f}{r['rel_error_gaussian']:>11.4f}"
            f"{r['rel_error_pseudo_grad']:>11.4f}{r['compression_pseudo_grad']:>15.2f}"
            f"{r[f'rel_error_pseudo_grad_ef{EF_ROUNDS}']:>11.4f}"
        )


if __name__ == "__main__":
    main()
