"""`murmur run`'s options, without a swarm: device names, the batch split, the automatic micro-batch
(fake memory numbers), and `--config FILE.toml` (flags override it; bad keys and types are named)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from peer.cli import run as cli_run
from peer.cli.main import main
from peer.core.devices import HEADROOM, fit_inner, fit_micro_batch, resolve_device, split_batch, training_bytes
from peer.core.inner import InnerConfig
from peer.core.model import PRESETS
from peer.core.slices import SliceConfig

GiB = 2**30
BASE = ["run", "--swarm", "loop", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmX", "--identity", "p.key"]


@pytest.mark.timeout(10)
def test_device_names_are_checked_against_the_cuda_devices_torch_sees() -> None:
    assert [resolve_device("auto", n) for n in (0, 2)] == ["cpu", "cuda"]
    assert resolve_device("cpu", 4) == "cpu"
    assert resolve_device("cuda", 1) == "cuda" and resolve_device("cuda:1", 2) == "cuda:1"
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda", 0)
    with pytest.raises(ValueError, match=r"only 2 CUDA device\(s\): cuda:0..cuda:1"):
        resolve_device("cuda:2", 2)
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "cuda:-1", ""):
        with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:INDEX"):
            resolve_device(bad, 8)


@pytest.mark.timeout(10)
def test_the_flags_split_the_runs_batch_and_must_multiply_to_it() -> None:
    assert split_batch(16, None, None) is None
    assert split_batch(16, 4, None) == (4, 4)
    assert split_batch(16, None, 8) == (2, 8)
    assert split_batch(16, 2, 8) == (2, 8)
    assert split_batch(16, 16, 1) == (16, 1)
    with pytest.raises(ValueError, match=r"--batch-size 4 x --grad-accum 3 = 12, but the run's batch is 16"):
        split_batch(16, 4, 3)
    with pytest.raises(
        ValueError, match=r"--batch-size 3 must divide the run's batch of 16 sequences \(one of 1, 2, 4"
    ):
        split_batch(16, 3, None)
    with pytest.raises(ValueError, match="--grad-accum 32 must divide"):
        split_batch(16, None, 32)
    with pytest.raises(ValueError, match="--batch-size 32 must divide"):
        split_batch(16, 32, None)


@pytest.mark.timeout(10)
def test_the_automatic_micro_batch_is_the_largest_divisor_that_fits() -> None:
    # budget = HEADROOM (0.9) * free - fixed; the largest divisor of 16 with d * per_sequence <= budget
    assert fit_micro_batch(16, free_bytes=10 * GiB, fixed_bytes=2 * GiB, per_sequence_bytes=1 * GiB) == 4
    assert fit_micro_batch(16, free_bytes=100 * GiB, fixed_bytes=2 * GiB, per_sequence_bytes=1 * GiB) == 16
    assert fit_micro_batch(12, free_bytes=10 * GiB, fixed_bytes=0, per_sequence_bytes=1 * GiB) == 6
    assert fit_micro_batch(16, free_bytes=10 * GiB, fixed_bytes=2 * GiB, per_sequence_bytes=1 * GiB, headroom=1) == 8
    with pytest.raises(ValueError, match=r"about 3.0 GiB .* only 2.0 GiB is free"):
        fit_micro_batch(16, free_bytes=2 * GiB, fixed_bytes=2 * GiB, per_sequence_bytes=1 * GiB)


@pytest.mark.timeout(10)
def test_training_bytes_grow_with_the_model_and_the_trainable_share() -> None:
    tiny_fixed, tiny_seq = training_bytes(PRESETS["tiny"])
    fixed, per_seq = training_bytes(PRESETS["124m"])  # the full model: DiLoCo's cost, the upper bound
    half_fixed, _ = training_bytes(PRESETS["124m"], SliceConfig(num_slices=2))
    quarter_fixed, _ = training_bytes(PRESETS["124m"], SliceConfig(num_slices=4))
    assert tiny_fixed < fixed and tiny_seq < per_seq
    assert quarter_fixed < half_fixed < fixed  # gradient, AdamW moments and feedback of the slice only
    assert training_bytes(PRESETS["124m"], checkpointing=True)[1] < per_seq / 3
    assert training_bytes(PRESETS["124m"], offload_outer=True)[0] < fixed
    # 124m (byte vocabulary, 1024 tokens): an 80 GB card fits the whole default batch, a 6 GB one does not
    assert 0.2 * GiB < per_seq < 1.5 * GiB and 1 * GiB < fixed < 4 * GiB
    assert fit_micro_batch(8, 79 * GiB, fixed, per_seq) == 8
    assert fit_micro_batch(8, 6 * GiB, fixed, per_seq) < 8


@pytest.mark.timeout(10)
def test_fit_inner_keeps_the_manifest_on_cpu_and_applies_the_flags() -> None:
    inner = InnerConfig(batch_size=8, grad_accum=2)
    cpu = torch.device("cpu")
    assert fit_inner(inner, PRESETS["tiny"], cpu) == inner
    split = fit_inner(inner, PRESETS["tiny"], cpu, micro_batch=4)
    assert (split.batch_size, split.grad_accum, split.lr) == (4, 4, inner.lr)
    split = fit_inner(inner, PRESETS["tiny"], cpu, grad_accum=16)
    assert (split.batch_size, split.grad_accum) == (1, 16)
    with pytest.raises(ValueError, match="= 8, but the run's batch is 16"):
        fit_inner(inner, PRESETS["tiny"], cpu, micro_batch=4, grad_accum=2)


def invoke(
    args: list[str], tmp_path: Path, config: str | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, dict]:
    """Run `murmur run` up to the point where it would start the daemon; (exit code, output, options)."""
    seen: dict = {}

    def fake_run_daemon(opts: object, *, software_version: str) -> None:
        seen["opts"] = opts

    if config is not None:
        (tmp_path / "peer.toml").write_text(config)
        args = [*args, "--config", str(tmp_path / "peer.toml")]
    with pytest.MonkeyPatch.context() as mp:
        import uvloop

        import peer.node.lifecycle

        mp.setattr(peer.node.lifecycle, "run_daemon", fake_run_daemon)
        mp.setattr(uvloop, "run", lambda coro: coro)
        result = CliRunner().invoke(main, args, catch_exceptions=False, env=env)
    return result.exit_code, result.output, seen


@pytest.mark.timeout(30)
def test_config_file_sets_any_option_and_flags_override_it(tmp_path: Path) -> None:
    config = """
swarm = "from-file"
initial-peers = ["/ip4/127.0.0.1/tcp/1/p2p/QmA", "/ip4/127.0.0.1/tcp/2/p2p/QmB"]
identity = "peer.id"
client_only = true
checkpoint-every = 3
eval_every = 7
batch-size = 2
device = "cpu"
announce-ttl = 9
rounds = 12
overlap = false
"""
    code, output, seen = invoke(["run"], tmp_path, config)
    assert code == 0, output
    opts = seen["opts"]
    assert opts.join.swarm == "from-file" and opts.join.initial_peers == ("/ip4/127.0.0.1/tcp/1/p2p/QmA",
                                                                          "/ip4/127.0.0.1/tcp/2/p2p/QmB")  # fmt: skip
    assert opts.join.listen is None and opts.join.announce_ttl_s == 9.0
    assert (opts.checkpoint_every, opts.eval_every, opts.batch_size, opts.device) == (3, 7, 2, "cpu")
    assert opts.max_rounds == 12  # keyed by the flag (--rounds), not by the parameter's name
    assert opts.overlap is False

    code, output, seen = invoke(["run", "--swarm", "from-flag", "--eval-every", "0", "--overlap"], tmp_path, config)
    assert code == 0 and seen["opts"].overlap is True, output
    assert (seen["opts"].join.swarm, seen["opts"].eval_every, seen["opts"].checkpoint_every) == ("from-flag", 0, 3)
    code, output, seen = invoke(["run"], tmp_path, config, env={"MURMUR_RUN_CHECKPOINT_EVERY": "4"})
    assert code == 0 and seen["opts"].checkpoint_every == 4, output  # the environment overrides the file too


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("checkpoint-evry = 3\n", "unknown key 'checkpoint-evry' (did you mean 'checkpoint-every'?)"),
        ('config = "other.toml"\n', "unknown key 'config'"),
        ('checkpoint-every = "ten"\n', "key 'checkpoint-every' takes an integer, got 'ten'"),
        ("checkpoint-every = 2.5\n", "key 'checkpoint-every' takes an integer, got 2.5"),
        ("checkpoint-every = -1\n", "key 'checkpoint-every': -1 is not in the range x>=0"),
        ("client-only = 1\n", "key 'client-only' takes true or false, got 1"),
        ("swarm = 5\n", "key 'swarm' takes a string, got 5"),
        ("initial_peers = [1, 2]\n", "key 'initial_peers' takes a string or a list of strings"),
        ('log-level = "LOUD"\n', "key 'log-level': 'LOUD' is not one of"),
        ("device = [\n", "is not valid TOML"),
    ],
)
def test_config_file_errors_name_the_key(tmp_path: Path, config: str, message: str) -> None:
    code, output, seen = invoke(BASE[:1], tmp_path, config)
    assert code == 2 and not seen, output
    assert message in " ".join(output.split()), output


@pytest.mark.timeout(30)
def test_bad_devices_and_grad_accum_are_usage_errors_before_anything_starts(tmp_path: Path) -> None:
    flags = [*BASE, "--client-only"]
    for device, message in (("gpu", "auto, cpu, cuda or cuda:INDEX"), ("cuda:99", "CUDA device")):
        if device == "cuda:99" and torch.cuda.device_count() > 99:
            continue
        code, output, seen = invoke([*flags, "--device", device], tmp_path)
        assert code == 2 and not seen and message in output, output
    code, output, _ = invoke([*flags, "--grad-accum", "0"], tmp_path)
    assert code == 2 and "--grad-accum" in output, output
    code, output, seen = invoke([*flags, "--grad-accum", "4", "--batch-size", "2", "--device", "cpu"], tmp_path)
    assert code == 0 and (seen["opts"].batch_size, seen["opts"].grad_accum) == (2, 4), output


@pytest.mark.timeout(10)
def test_every_run_option_can_come_from_a_config_file() -> None:
    keys = {p.name for p in cli_run.run.params if isinstance(p, click.Option)} - cli_run.NOT_IN_CONFIG
    assert {"device", "batch_size", "grad_accum", "checkpoint_dir", "metrics_port", "listen", "swarm"} <= keys


@pytest.mark.timeout(10)
def test_fit_inner_on_cuda_asks_for_free_memory_and_fits_the_micro_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    inner = InnerConfig(batch_size=8, grad_accum=1)
    model = PRESETS["124m"]
    slices = SliceConfig(num_slices=4)
    fixed, per_seq = training_bytes(model, slices)
    free = {"bytes": 80 * GiB}
    asked = []

    def mem_get_info(device: torch.device) -> tuple[int, int]:
        asked.append(str(device))
        return free["bytes"], 80 * GiB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    cuda = torch.device("cuda:0")
    assert fit_inner(inner, model, cuda, slices=slices) == inner  # all 8 fit at once
    free["bytes"] = int((fixed + 2.5 * per_seq) / HEADROOM)  # room for 2 sequences, not 4
    split = fit_inner(inner, model, cuda, slices=slices)
    assert (split.batch_size, split.grad_accum) == (2, 4)
    assert fit_inner(inner, model, cuda, micro_batch=8) == inner  # a flag wins over the fit
    free["bytes"] = fixed // 2
    with pytest.raises(ValueError, match="use --device cpu"):
        fit_inner(inner, model, cuda, slices=slices)
    assert asked == ["cuda:0", "cuda:0", "cuda:0"]
