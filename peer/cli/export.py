"""`murmur export` and `murmur sample`: the trained model outside the swarm (peer/export/).

`murmur eval` (the held-out loss of a checkpoint) lives in demo.py beside the demo that reports it. Thin click
commands: heavy imports (torch, safetensors) happen inside them, so `murmur --help` stays fast; every user error
(a corrupt checkpoint, a refused shape, an occupied --out) is one line and exit 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

CHECKPOINT_HELP = ("A peer's checkpoint folder (its newest valid snapshot) or one round-N folder in it; repeat it with "
                   "snapshots of other peers of the same run to use the mean of their weights.")  # fmt: skip
TOKENIZER_HELP = "The run's tokenizer.json, for a run that is not byte level (its SHA-256 must match the run's)."


def _device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """auto|cpu|cuda|cuda:i, checked against the CUDA devices torch sees before any checkpoint is read."""
    from peer.core.devices import pick_device

    try:
        return str(pick_device(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


@click.command("export")
@click.option("--checkpoint", "checkpoints", multiple=True, required=True, type=click.Path(path_type=Path),
              help=CHECKPOINT_HELP)  # fmt: skip
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The Hugging Face folder to write.")
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path), help=TOKENIZER_HELP)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Weights' dtype in model.safetensors (murmur keeps float32).")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace --out when it holds an earlier export.")
def export(checkpoints: tuple[Path, ...], out: Path, tokenizer: Path | None, dtype: str, force: bool) -> None:
    """Write a checkpoint's model as a Hugging Face Llama folder: config.json, model.safetensors,
    generation_config.json and the tokenizer, loadable with transformers' AutoModelForCausalLM and
    AutoTokenizer without custom code.

    \b
    Examples:
      murmur export --checkpoint ~/.local/share/murmur/checkpoints/myswarm/0a1b2c3d4e5f6a7b --out my-model
      murmur export --checkpoint ckpt-peer0 --checkpoint ckpt-peer1 --out averaged --dtype bfloat16
    """
    from peer.export.hf import check_target, export_hf
    from peer.export.source import load_trained

    try:
        check_target(out.resolve(), force=force, keep_clear=checkpoints)
        trained = load_trained(checkpoints, tokenizer=tokenizer)
        path = export_hf(trained, out, dtype=dtype, force=force, keep_clear=checkpoints)
    except (ValueError, OSError, ImportError) as exc:  # CheckpointError and ExportError are ValueErrors
        raise click.ClickException(str(exc)) from exc
    rounds = ", ".join(map(str, trained.rounds))
    click.echo(f"exported run {trained.run_id} (round {rounds}, {trained.run.preset} preset) to {path}")


@click.command("sample")
@click.option("--checkpoint", "checkpoints", multiple=True, required=True, type=click.Path(path_type=Path),
              help=CHECKPOINT_HELP)  # fmt: skip
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(0), default=64, show_default=True)
@click.option("--greedy", is_flag=True, help="The most likely token every step (deterministic).")
@click.option("--temperature", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0: sample among all tokens.")
@click.option("--seed", type=int, help="Seed of the sampling (default: a fresh draw).")
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path), help=TOKENIZER_HELP)
@click.option("--device", default="auto", show_default=True, callback=_device, help="auto|cpu|cuda|cuda:INDEX.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (prompt and continuation, text and ids).")
def sample(checkpoints: tuple[Path, ...], prompt: str, max_new_tokens: int, greedy: bool, temperature: float,
           top_k: int, seed: int | None, tokenizer: Path | None, device: str, as_json: bool) -> None:  # fmt: skip
    """Continue --prompt with a checkpoint's model; prints only the continuation (logs go to stderr).

    \b
    Examples:
      murmur sample --checkpoint ckpt-peer --prompt "The module" --max-new-tokens 80 --greedy
      murmur sample --checkpoint ckpt-peer --prompt "def " --temperature 0.8 --top-k 40 --seed 1
    """
    from peer.export.sampling import SampleConfig, generate
    from peer.export.source import load_trained

    config = SampleConfig(max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k,
                          seed=seed)  # fmt: skip
    try:
        trained = load_trained(checkpoints, tokenizer=tokenizer)
        prompt_ids = trained.tokenizer.encode(prompt)
        if not prompt_ids:
            raise click.UsageError("--prompt is empty: give at least one character to continue")
        ids = generate(trained.model(device), prompt_ids, config)
    except (ValueError, OSError, ImportError) as exc:
        raise click.ClickException(str(exc)) from exc
    text = trained.tokenizer.decode(ids)
    if as_json:
        click.echo(json.dumps({"prompt": prompt, "prompt_ids": prompt_ids, "text": text, "ids": ids,
                               "run_id": trained.run_id, "rounds": list(trained.rounds)}))  # fmt: skip
        return
    # only the continuation: a newline of ours would be read as part of it, unless a person is reading
    click.echo(text, nl=sys.stdout.isatty())
