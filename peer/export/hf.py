"""A murmur model as a Hugging Face Llama folder that `transformers` loads with no custom code.

murmur's network (peer/core/model.py) is Llama's: pre-norm RMSNorm blocks, rotary attention with as many
key/value heads as query heads, a SwiGLU MLP, no biases, optionally tied embeddings. So the export is
renaming and splitting, never arithmetic:

    murmur                                  LlamaForCausalLM
    embed.weight                            model.embed_tokens.weight
    blocks.i.attn_norm.weight               model.layers.i.input_layernorm.weight
    blocks.i.attn.qkv.weight  rows [q|k|v]  model.layers.i.self_attn.{q,k,v}_proj.weight (d_model rows each)
    blocks.i.attn.out.weight                model.layers.i.self_attn.o_proj.weight
    blocks.i.mlp_norm.weight                model.layers.i.post_attention_layernorm.weight
    blocks.i.mlp.up.weight  rows [gate|up]  model.layers.i.mlp.{gate,up}_proj.weight (hidden rows each)
    blocks.i.mlp.down.weight                model.layers.i.mlp.down_proj.weight
    final_norm.weight                       model.norm.weight
    head.weight (untied runs only)          lm_head.weight (tied: tie_word_embeddings, no tensor)

No permutation of q and k: murmur's rotary (`apply_rotary`) rotates the pair (x[j], x[j + head_dim/2]) by
position * 10000^(-2j/head_dim), which is Llama's `rotate_half` convention, not the interleaved pairs of the
original RoPE paper (those would need the rows of each head permuted). Attention scales by 1/sqrt(head_dim)
in both. The tests hold the logits of both models to 1e-4.

Refused: `mlp="gelu"` (one un-gated matrix) and `positions="learned"`. No architecture that transformers ships
computes them with RMSNorm and no biases (GPT-2, GPT-J, StarCoder2 and Phi normalise with LayerNorm, which
subtracts the mean and has a bias), and an export that does not compute what murmur trained is worse than none.

Written with safetensors and json only: transformers is not a dependency of murmur.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from peer import __version__
from peer.core.model import ModelConfig
from peer.export.hf_tokenizer import tokenizer_files
from peer.export.source import Trained
from protocol.errors import ExportError
from protocol.files import fsync_path, replace_directory
from protocol.logs import get_logger

log = get_logger(__name__)

ROPE_THETA = 10000.0
"""`rotary_tables`' default base, the one every murmur model is built with."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHTS_FILE = "model.safetensors"


def check_exportable(config: ModelConfig) -> None:
    """ExportError (one line) for a model Llama does not compute: see the module docstring."""
    if config.mlp != "swiglu":
        raise ExportError(f"cannot export a model with mlp={config.mlp!r}: only SwiGLU presets are Llama-shaped "
                          "(no transformers architecture computes RMSNorm with an un-gated GELU MLP)")  # fmt: skip
    if config.positions != "rotary":
        raise ExportError(f"cannot export a model with positions={config.positions!r}: only rotary presets are "
                          "Llama-shaped (no transformers architecture adds learned positions to RMSNorm)")  # fmt: skip


def llama_config(config: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """config.json of the LlamaForCausalLM that computes `config`'s network.

    `rope_theta` is written both at the top (transformers 4) and in `rope_parameters` (transformers 5).
    No bos/eos ids: murmur trains on documents joined by a blank line, with no special tokens.
    """
    check_exportable(config)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": ROPE_THETA,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def generation_config() -> dict[str, Any]:
    """generation_config.json: greedy unless asked, no special tokens. No `max_length` (the context is config.json's
    max_position_embeddings): transformers warns on every `generate(max_new_tokens=...)` when both are set."""
    return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "do_sample": False}


def llama_tensors(config: ModelConfig, phi: Mapping[str, torch.Tensor], *,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:  # fmt: skip
    """Llama's state dict from murmur's (the table in the module docstring); contiguous CPU copies.

    ExportError when `phi` has a name this mapping does not place, so a future layer cannot be dropped silently.
    """
    check_exportable(config)
    C, H = config.d_model, config.hidden
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": phi["embed.weight"],
                                    "model.norm.weight": phi["final_norm.weight"]}  # fmt: skip
    used = {"embed.weight", "final_norm.weight"}
    if not config.tie_embeddings:
        out["lm_head.weight"] = phi["head.weight"]
        used.add("head.weight")
    for i in range(config.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        qkv, up = phi[src + "attn.qkv.weight"], phi[src + "mlp.up.weight"]
        out |= {
            dst + "input_layernorm.weight": phi[src + "attn_norm.weight"],
            dst + "self_attn.q_proj.weight": qkv[:C],
            dst + "self_attn.k_proj.weight": qkv[C : 2 * C],
            dst + "self_attn.v_proj.weight": qkv[2 * C :],
            dst + "self_attn.o_proj.weight": phi[src + "attn.out.weight"],
            dst + "post_attention_layernorm.weight": phi[src + "mlp_norm.weight"],
            dst + "mlp.gate_proj.weight": up[:H],
            dst + "mlp.up_proj.weight": up[H:],
            dst + "mlp.down_proj.weight": phi[src + "mlp.down.weight"],
        }
        used |= {src + name for name in ("attn_norm.weight", "attn.qkv.weight", "attn.out.weight",
                                         "mlp_norm.weight", "mlp.up.weight", "mlp.down.weight")}  # fmt: skip
    if unplaced := sorted(set(phi) - used):
        raise ExportError(f"the checkpoint holds weights the Llama mapping does not place: {unplaced[:3]}")
    return {name: t.detach().to("cpu", dtype, copy=True).contiguous() for name, t in out.items()}


def export_hf(trained: Trained, out: Path, *, dtype: str = "float32", force: bool = False,
              keep_clear: tuple[Path, ...] = ()) -> Path:  # fmt: skip
    """Write the Hugging Face folder of `trained` to `out` (see `write_folder`); returns its absolute path.

    Files: config.json, generation_config.json, model.safetensors (with the run id, swarm and rounds as
    metadata), tokenizer.json and tokenizer_config.json. Every check runs before anything is written.
    """
    from safetensors.torch import save_file

    config = trained.run.model
    files = {"config.json": _json_bytes(llama_config(config, dtype=dtype)),
             "generation_config.json": _json_bytes(generation_config()),
             **tokenizer_files(trained.tokenizer_file, max_length=config.seq_len)}  # fmt: skip
    tensors = llama_tensors(config, trained.phi, dtype=DTYPES[dtype])
    metadata = {"format": "pt", "murmur_version": __version__, "murmur_run_id": trained.run_id,
                "murmur_swarm": trained.run.swarm, "murmur_rounds": ",".join(map(str, trained.rounds))}  # fmt: skip

    def fill(folder: Path) -> None:
        for name, data in files.items():
            (folder / name).write_bytes(data)
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata=metadata)
        shutil.copymode(folder / "config.json", folder / WEIGHTS_FILE)  # safetensors leaves it 0600: share it alike

    return write_folder(out, fill, force=force, keep_clear=keep_clear)


def write_folder(out: Path, fill: Callable[[Path], None], *, force: bool = False,
                 keep_clear: tuple[Path, ...] = ()) -> Path:  # fmt: skip
    """Make the folder `out` atomically: `fill` writes into a hidden sibling, which is renamed into place whole.

    An existing non-empty `out` is refused unless `force`, and even then only when it is an earlier export
    (it has a config.json): `--force` must never empty a folder of something else. `keep_clear` are paths
    (the checkpoints) that `out` must not contain. ExportError (one line) for every refusal.
    """
    out = out.resolve()
    check_target(out, force=force, keep_clear=keep_clear)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        fill(tmp)
        for path in tmp.iterdir():
            fsync_path(path)
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a folder; the rename still holds
            fsync_path(tmp)
        replace_directory(tmp, out)  # an empty folder or (with --force) an earlier export is moved aside, dropped
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out





def check_target(out: Path, *, force: bool, keep_clear: tuple[Path, ...]) -> None:
    """ExportError unless `out` (absolute) may become the export: see `write_folder`. Also called before a
    checkpoint is read, so a refusal costs nothing."""
    for path in keep_clear:
        if path.resolve().is_relative_to(out):
            raise ExportError(f"--out {out} contains the checkpoint {path}: choose another folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not force:
        raise ExportError(f"--out {out} exists and is not empty: pass --force to replace it")
    if not (out / "config.json").is_file():
        raise ExportError(f"--out {out} is not an earlier export (no config.json): --force only replaces those")


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")
