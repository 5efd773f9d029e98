"""`murmur export`, `murmur sample` and `murmur eval` of a trained checkpoint: the exported folder loads in
transformers with no custom code and computes murmur's model (logits to 1e-4, the same greedy tokens, the same
token ids for text), and every refusal is one line.

The checkpoint is a real one: a micro-preset peer trains three rounds through the daemon's own `Trainer` and
saves them with `resume.save`, as `murmur run` does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner, Result
from safetensors.torch import load_file

from peer.cli.main import main
from peer.config import DataConfig, RunConfig
from peer.core.data import load_corpus, val_batches
from peer.core.model import Transformer
from peer.core.tokenizers import ByteTokenizer, JsonTokenizer
from peer.export.hf_tokenizer import bytes_to_unicode
from peer.export.source import load_trained
from peer.lab.harness import murmur
from peer.node import resume
from peer.node.checkpoint import CheckpointState, save_checkpoint
from peer.node.trainer import Trainer

transformers = pytest.importorskip("transformers", reason="the export tests load the folder with transformers (dev)")

RUN_ID = "ab" * 4
TEXTS = ["The module", "héllo wörld ✓ 🙂\n\n  def f(x):\treturn x", "", "a" * 300, "\x00\x7f\u0100"]
TOLERANCE = 1e-4


def micro_run(**model: Any) -> RunConfig:
    return RunConfig.from_dict({"swarm": "export-test", "preset": "micro", "slices": {"num_slices": 1},
                                "inner": {"steps_per_round": 10, "batch_size": 8, "warmup_steps": 5, "lr": 1e-2},
                                "model": model})  # fmt: skip


def random_checkpoint(directory: Path, run: RunConfig, *, seed: int = 0, round_: int = 1, run_id: str = RUN_ID) -> Path:
    """A snapshot of a freshly initialised model of `run`, written by the checkpoint module."""
    torch.manual_seed(seed)
    phi = {name: p.detach().clone() for name, p in Transformer(run.model).named_parameters()}
    momentum = {n: torch.zeros_like(t) for n, t in phi.items()}
    state = CheckpointState(round=round_, slice_index=0, run_id=run_id, phi=phi, momentum=momentum,
                            manifest=run.to_dict())  # fmt: skip
    return save_checkpoint(directory, state)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A peer's checkpoint folder after three trained rounds (the newest is round 3)."""
    directory = tmp_path_factory.mktemp("ckpt") / "peer"
    trainer = Trainer(micro_run(), "c" * 64, torch.device("cpu"))
    trainer.take_slice(0)
    for round_ in range(3):
        trained_round = trainer.train_round(round_, threading.Event())
        trainer.outer_step(trained_round.own, [])
        resume.save(trainer, directory, round=round_ + 1, run_id=RUN_ID, peer_id="c" * 64, version="test",
                    tokens_seen=0)  # fmt: skip
    return directory


@pytest.fixture(scope="module")
def exported(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    result = cli("export", "--checkpoint", str(trained), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout and "round 3" in result.stdout
    return out


@pytest.fixture(scope="module")
def hf_model(exported: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_line_error(result: Result, *words: str) -> None:
    """Exit 1, no traceback, and the message is one line naming `words`."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert all(word in errors[0] for word in words), errors[0]


def murmur_logits(checkpoint: Path, x: torch.Tensor, tokenizer: Path | None = None) -> torch.Tensor:
    with torch.no_grad():
        return load_trained([checkpoint], tokenizer=tokenizer).model()(x)


@pytest.mark.timeout(60)
def test_the_export_is_a_plain_llama_folder(exported: Path) -> None:
    names = {p.name for p in exported.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"}  # fmt: skip
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert config["tie_word_embeddings"] is True and config["num_key_value_heads"] == config["num_attention_heads"]
    tensors = load_file(str(exported / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # tied: transformers ties it to the embedding
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert tensors["model.layers.1.mlp.gate_proj.weight"].shape == (192, 64)
    assert (exported / "model.safetensors").stat().st_mode == (exported / "config.json").stat().st_mode
    assert not list(exported.parent.glob(".tmp-*"))


@pytest.mark.slow(5)  # transformers' first import and model load
@pytest.mark.timeout(120)
def test_transformers_computes_the_logits_murmur_does(trained: Path, hf_model: Any) -> None:
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    corpus = load_corpus(None)
    x, _ = next(iter(val_batches(corpus, 64, 4, 1)))
    ours, theirs = murmur_logits(trained, x), hf_model(x).logits.detach()
    diff = float((ours - theirs).abs().max())
    print(f"max |logit diff| {diff:.3g} (logits up to {float(ours.abs().max()):.2f})")
    assert diff < TOLERANCE


@pytest.mark.timeout(120)
def test_greedy_generation_matches_murmur_sample(trained: Path, exported: Path, hf_model: Any) -> None:
    prompt = "The module"
    result = cli("sample", "--checkpoint", str(trained), "--prompt", prompt, "--max-new-tokens", "40", "--greedy",
                 "--device", "cpu", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    sampled = json.loads(result.stdout)
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported, local_files_only=True)
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert input_ids.tolist() == [sampled["prompt_ids"]]
    out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=40, do_sample=False)
    assert out[0, input_ids.shape[1]:].tolist() == sampled["ids"]
    assert tokenizer.decode(sampled["ids"]) == sampled["text"]
    text = cli("sample", "--checkpoint", str(trained), "--prompt", prompt, "--max-new-tokens", "40", "--greedy")
    assert text.exit_code == 0 and text.stdout == sampled["text"]  # only the continuation, nothing else


@pytest.mark.timeout(60)
def test_the_tokenizer_encodes_text_to_murmurs_ids(exported: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported, local_files_only=True)
    ours = ByteTokenizer()
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == ours.encode(text), text
        assert tokenizer.decode(ours.encode(text)) == text
    broken = [0xFF, 0x41, 0xE2, 0x82, 0x20, 0xF0, 0x9F]
    assert tokenizer.decode(broken) == ours.decode(broken)
    assert sorted(bytes_to_unicode()) == list(range(256)) and len(set(bytes_to_unicode().values())) == 256


@pytest.mark.timeout(60)
def test_sampling_is_seeded_and_top_1_is_greedy(trained: Path) -> None:
    base = ("sample", "--checkpoint", str(trained), "--prompt", "def ", "--max-new-tokens", "24", "--device", "cpu")
    seeded = [cli(*base, "--temperature", "1.5", "--seed", "7").stdout for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert cli(*base, "--top-k", "1", "--seed", "3").stdout == cli(*base, "--greedy").stdout
    for bad in (("--temperature", "0"), ("--prompt", "")):  # usage errors: exit 2, before any checkpoint is read
        refused = cli("sample", "--checkpoint", str(trained), "--prompt", "x", *bad)
        assert refused.exit_code == 2 and bad[0] in refused.output and "Traceback" not in refused.output


@pytest.mark.timeout(120)
def test_eval_reports_the_held_out_loss_transformers_agrees_with(trained: Path, hf_model: Any) -> None:
    result = cli("eval", "--checkpoint", str(trained), "--batches", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["round"] == 3 and math.isclose(report["perplexity"], math.exp(report["val_loss"]))
    corpus = load_corpus(None)
    with torch.no_grad():  # the same held-out windows (batch 2 x the run's 8): transformers' loss is ours
        losses = [float(F.cross_entropy(hf_model(x).logits.flatten(0, 1), y.flatten()))
                  for x, y in val_batches(corpus, 64, 16, 2)]  # fmt: skip
    assert abs(sum(losses) / len(losses) - report["val_loss"]) < TOLERANCE
    text = cli("eval", "--checkpoint", str(trained), "--batches", "2")
    assert text.exit_code == 0
    assert f"val loss {report['val_loss']:.4f}  perplexity {report['perplexity']:.2f}" in text.stdout


@pytest.mark.timeout(120)
def test_an_untied_model_with_its_own_shapes_exports_exactly(tmp_path: Path) -> None:
    run = micro_run(tie_embeddings=False, d_hidden=96, n_heads=4, norm_eps=1e-6, vocab_size=300)
    checkpoint = random_checkpoint(tmp_path / "ckpt", run)
    result = cli("export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    x = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    assert float((murmur_logits(checkpoint, x) - model(x).logits.detach()).abs().max()) < TOLERANCE


@pytest.mark.timeout(120)
def test_a_tokenizer_json_run_exports_its_tokenizer(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    hf_tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf_tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=320, special_tokens=["<|end|>"], initial_alphabet=alphabet)
    hf_tok.train_from_iterator([ByteTokenizer().decode(load_corpus(None).val[:20000].tolist())], trainer)
    hf_tok.save(str(path := tmp_path / "tokenizer.json"))
    ours = JsonTokenizer(path)
    run = replace(micro_run(vocab_size=ours.vocab_size), data=DataConfig(tokenizer=sha256(path)))
    checkpoint = random_checkpoint(tmp_path / "ckpt", run)
    out = tmp_path / "out"
    one_line_error(cli("export", "--checkpoint", str(checkpoint), "--out", str(out)), "--tokenizer")
    (other := tmp_path / "other.json").write_text(path.read_text().replace("<|end|>", "<|stop|>"))
    one_line_error(cli("export", "--checkpoint", str(checkpoint), "--out", str(out), "--tokenizer", str(other)),
                   "SHA-256")  # fmt: skip
    result = cli("export", "--checkpoint", str(checkpoint), "--out", str(out), "--tokenizer", str(path))
    assert result.exit_code == 0, result.output
    assert (out / "tokenizer.json").read_bytes() == path.read_bytes()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == ours.encode(text), text
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    x = torch.tensor([ours.encode(TEXTS[1])])
    assert float((murmur_logits(checkpoint, x, path) - model(x).logits.detach()).abs().max()) < TOLERANCE


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("model", "named"), [({"mlp": "gelu"}, "mlp='gelu'"), ({"positions": "learned"}, "learned")])
def test_shapes_llama_cannot_compute_are_refused(tmp_path: Path, model: dict[str, str], named: str) -> None:
    checkpoint = random_checkpoint(tmp_path / "ckpt", micro_run(**model))
    one_line_error(cli("export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")), named)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.timeout(60)
def test_damaged_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    checkpoint = random_checkpoint(tmp_path / "ckpt", micro_run())
    out = str(tmp_path / "out")
    phi = checkpoint / "phi.safetensors"
    phi.write_bytes(phi.read_bytes()[:-100])
    one_line_error(cli("export", "--checkpoint", str(checkpoint), "--out", out), "phi.safetensors", "truncated")
    one_line_error(cli("export", "--checkpoint", str(tmp_path / "ckpt"), "--out", out), "none of its 1")
    (checkpoint / "meta.json").unlink()
    one_line_error(cli("export", "--checkpoint", str(checkpoint), "--out", out), "meta.json")
    one_line_error(cli("export", "--checkpoint", str(tmp_path / "nowhere"), "--out", out), "nowhere")
    one_line_error(cli("sample", "--checkpoint", str(checkpoint), "--prompt", "x"), "meta.json")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.timeout(60)
def test_an_occupied_out_is_refused_unless_forced_over_an_earlier_export(tmp_path: Path) -> None:
    first = random_checkpoint(tmp_path / "a", micro_run(), seed=1)
    second = random_checkpoint(tmp_path / "b", micro_run(), seed=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    export = ("export", "--out", str(out), "--checkpoint")
    one_line_error(cli(*export, str(first)), "not empty", "--force")
    one_line_error(cli(*export, str(first), "--force"), "not an earlier export")
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()  # an empty folder is fine
    assert cli(*export, str(first)).exit_code == 0
    one_line_error(cli(*export, str(second)), "not empty")
    assert cli(*export, str(second), "--force").exit_code == 0
    assert torch.equal(load_file(str(out / "model.safetensors"))["model.norm.weight"],
                       load_trained([second]).phi["final_norm.weight"])  # fmt: skip
    inside = cli("export", "--out", str(tmp_path), "--checkpoint", str(first), "--force")
    one_line_error(inside, "contains the checkpoint")
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))


@pytest.mark.timeout(60)
def test_several_peers_of_one_run_export_their_mean(tmp_path: Path) -> None:
    a = random_checkpoint(tmp_path / "a", micro_run(), seed=1)
    b = random_checkpoint(tmp_path / "b", micro_run(), seed=2, round_=2)
    trained = load_trained([a, b])
    expected = (load_trained([a]).phi["embed.weight"] + load_trained([b]).phi["embed.weight"]) / 2
    assert trained.rounds == (1, 2) and torch.allclose(trained.phi["embed.weight"], expected)
    stranger = random_checkpoint(tmp_path / "c", micro_run(), run_id="cd" * 4)
    one_line_error(cli("export", "--checkpoint", str(a), "--checkpoint", str(stranger), "--out", str(tmp_path / "o")),
                   "run cdcdcdcd")  # fmt: skip


@pytest.mark.slow(4)
@pytest.mark.timeout(90)
def test_sample_prints_only_the_continuation_from_the_real_entry_point(trained: Path) -> None:
    """What a user's terminal gets: stdout is the continuation alone, logs and errors go to stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = murmur("sample", "--checkpoint", str(trained), "--prompt", "The ", "--max-new-tokens", "12", "--greedy")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=80, env=env)
    assert done.returncode == 0, done.stderr
    expected = json.loads(cli("sample", "--checkpoint", str(trained), "--prompt", "The ", "--max-new-tokens", "12",
                              "--greedy", "--json").stdout)["text"]  # fmt: skip
    assert done.stdout == expected and "Traceback" not in done.stderr


@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sample_on_cuda_continues_as_on_the_cpu(trained: Path) -> None:
    """fp32 on both (murmur's forward has no autocast): greedy tokens agree unless two logits tie within float noise,
    which a trained micro model's first tokens do not."""
    base = ("sample", "--checkpoint", str(trained), "--prompt", "The ", "--max-new-tokens", "16", "--greedy", "--json")
    on = {device: json.loads(cli(*base, "--device", device).stdout)["ids"] for device in ("cpu", "cuda")}
    assert on["cpu"] == on["cuda"]
