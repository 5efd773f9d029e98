"""The run manifest: canonical bytes, run id, signature, file form, trust (run key and pins), RunConfig."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from peer.config import DataConfig, GossipConfig, RunConfig
from peer.core.inner import InnerConfig
from peer.core.model import ModelConfig
from peer.core.outer import OuterConfig
from peer.core.slices import SliceConfig
from protocol import manifest as M
from protocol._generated import murmur_pb2 as pb
from protocol.codec import CodecConfig
from protocol.errors import ManifestError, UntrustedOwner
from protocol.identity import Identity

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def owner() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def config() -> RunConfig:
    return RunConfig.from_dict({"swarm": "t1", "slices": {"num_slices": 3}, "inner": {"betas": [0.8, 0.99]}})


def test_run_config_round_trips_through_the_manifest(config: RunConfig) -> None:
    assert RunConfig.from_manifest(config.to_manifest()) == config
    odd = RunConfig.from_dict({
        "swarm": "odd", "method": "gossip-ppu-gasloc", "preset": "small", "dtype": "bfloat16",
        "model": {"mlp": "gelu", "positions": "learned", "tie_embeddings": False, "norm_eps": 1e-6},
        "slices": {"num_slices": 5, "cut": "blocks", "shared_head": False},
        "inner": {"grad_accum": 3, "total_steps": 77, "rest_step": 0.5},
        "outer": {"clip": 2.5, "consensus": 0.25}, "gossip": {"fanout": 3, "min_round_s": 2.5},
        "codec": {"name": "topk"},
        "data": {"source": "hf:x", "seed": 9},
    })  # fmt: skip
    assert RunConfig.from_manifest(odd.to_manifest()) == odd
    assert odd.outer.rule == "gasloc" and odd.outer.consensus == 0.25


def test_every_config_field_has_a_manifest_field() -> None:
    """Walk the dataclasses, so a field added to a config without a manifest field fails here."""
    specs = {
        ModelConfig: pb.ModelSpec, SliceConfig: pb.SliceSpec, InnerConfig: pb.InnerSpec,
        OuterConfig: pb.OuterSpec, CodecConfig: pb.CodecSpec, GossipConfig: pb.GossipSpec, DataConfig: pb.DataSpec,
    }  # fmt: skip
    renamed = {"betas": "beta1", "num_slices": "num_slices", "name": "name"}
    for cls, spec in specs.items():
        names = set(spec.DESCRIPTOR.fields_by_name)
        for f in dataclasses.fields(cls):
            assert renamed.get(f.name, f.name) in names, f"{cls.__name__}.{f.name} is not in {spec.__name__}"


def test_min_round_s_sets_the_servers_limits_and_an_unset_one_is_the_default() -> None:
    config = RunConfig.from_dict({"swarm": "t", "gossip": {"min_round_s": 2.0}})
    assert RunConfig.from_manifest(config.to_manifest()).gossip.min_round_s == 2.0
    unset = config.to_manifest()
    unset.gossip.ClearField("min_round_s")  # a manifest that predates the field
    assert RunConfig.from_manifest(unset).gossip.min_round_s == GossipConfig().min_round_s == 0.25
    for bad in (0.0, -1.0, float("nan"), 1e9):
        with pytest.raises(ValueError, match="min_round_s"):
            RunConfig.from_dict({"swarm": "t", "gossip": {"min_round_s": bad}})


def test_a_manifest_without_rest_step_freezes_the_rest_as_before() -> None:
    config = RunConfig.from_dict({"swarm": "t", "inner": {"rest_step": 0.2}})
    assert RunConfig.from_manifest(config.to_manifest()).inner.rest_step == 0.2
    old = config.to_manifest()
    old.inner.ClearField("rest_step")  # a run created before the field: its peers froze the rest
    assert RunConfig.from_manifest(old).inner.rest_step == 0.0
    with pytest.raises(ValueError, match="rest_step"):
        RunConfig.from_dict({"swarm": "t", "inner": {"rest_step": 2.0}})


def test_unknown_config_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        RunConfig.from_dict({"swarm": "t", "inner": {"lr_typo": 1}})
    with pytest.raises(ValueError, match="sections"):
        RunConfig.from_dict({"swarm": "t", "extra": {}})


def test_run_id_is_the_hash_of_canonical_bytes(owner: Identity, config: RunConfig) -> None:
    a = M.sign(config.to_manifest(created_unix=1), owner)
    b = M.sign(config.to_manifest(created_unix=1), Identity.generate())
    assert a.run_id == b.run_id and len(a.run_id) == 64
    assert M.sign(config.to_manifest(created_unix=2), owner).run_id != a.run_id
    parsed = M.parse_signed(a.to_bytes(), swarm="t1", trusted_key=owner.public_key)
    assert parsed == a and parsed.manifest.slices.num_slices == 3


def test_forged_manifest_is_refused(owner: Identity, config: RunConfig) -> None:
    signed = M.sign(config.to_manifest(), owner)
    tampered = pb.Manifest.FromString(signed.payload)
    tampered.inner.lr = 1.0
    forged = dataclasses.replace(signed, payload=tampered.SerializeToString(deterministic=True))
    with pytest.raises(ManifestError, match="forged manifest"):
        M.parse_signed(forged.to_bytes())
    with pytest.raises(ManifestError, match="not a signed manifest"):
        M.parse_signed(b"\xff\xff")
    with pytest.raises(ManifestError, match="not 'other'"):
        M.parse_signed(signed.to_bytes(), swarm="other")


def test_manifest_signed_by_another_key_is_refused(owner: Identity, config: RunConfig, tmp_path: Path) -> None:
    other = M.sign(config.to_manifest(), Identity.generate())
    with pytest.raises(UntrustedOwner, match="trusts run key"):
        M.parse_signed(other.to_bytes(), trusted_key=owner.public_key)
    pins = M.PinStore(tmp_path / "pins.json")
    M.accept_owner("t1", M.sign(config.to_manifest(), owner), None, pins)  # first use: pinned
    assert pins.get("t1") == owner.public_key.hex()
    with pytest.raises(UntrustedOwner, match=f"--run-key {other.owner_key_hex}"):
        M.accept_owner("t1", other, None, pins)
    M.accept_owner("t1", other, other.owner_public_key, pins)  # the override
    with pytest.raises(UntrustedOwner, match="--run-key you gave"):
        M.accept_owner("t1", other, owner.public_key, pins)


def test_manifest_file_round_trips_and_refuses_hand_edits(owner: Identity, config: RunConfig, tmp_path: Path) -> None:
    signed = M.sign(config.to_manifest(), owner)
    path = tmp_path / "m.json"
    path.write_text(signed.to_json())
    assert M.load_json(path, trusted_key=owner.public_key) == signed
    doc = json.loads(path.read_text())
    doc["manifest"]["inner"]["lr"] = 1.0
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="edited by hand"):
        M.load_json(path)
    path.write_text("{}")
    with pytest.raises(ManifestError, match="not a murmur manifest file"):
        M.load_json(path)


def test_pin_store_uses_murmur_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MURMUR_HOME", str(tmp_path))
    store = M.PinStore()
    store.pin("a", "11" * 32)
    store.pin("b", "22" * 32)
    assert store.path == tmp_path / "pins.json" and store.load() == {"a": "11" * 32, "b": "22" * 32}
    (tmp_path / "pins.json").write_text("[")
    with pytest.raises(ManifestError, match="unreadable pin file"):
        store.load()
    with pytest.raises(ManifestError, match="64 hex"):
        M.parse_run_key("abc")


def test_create_run_from_a_toml_file_with_flag_overrides(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from peer.cli.main import main

    (tmp_path / "run.toml").write_text(
        'swarm = "from-toml"\nmethod = "gossip-ppu-gasloc"\n[slices]\nnum_slices = 2\ncut = "blocks"\n'
        "[inner]\nbetas = [0.8, 0.9]\nsteps_per_round = 7\n[outer]\nclip = 1.5\n[gossip]\nfanout = 3\n"
    )
    assert RunConfig.from_toml(tmp_path / "run.toml").inner.betas == (0.8, 0.9)
    out = tmp_path / "m.json"
    result = CliRunner().invoke(main, ["create-run", "--config", str(tmp_path / "run.toml"), "--slices", "5",
                                       "--key", str(tmp_path / "k.key"), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    config = RunConfig.from_manifest(M.load_json(out).manifest)
    assert (config.swarm, config.method) == ("from-toml", "gossip-ppu-gasloc")
    assert (config.slices.num_slices, config.slices.cut) == (5, "blocks")
    assert (config.inner.steps_per_round, config.clip, config.gossip.fanout) == (7, 1.5, 3)
    (tmp_path / "bad.toml").write_text('swarm = "x"\n[inner]\nlr_typo = 1\n')
    key = str(tmp_path / "k.key")
    bad = CliRunner().invoke(main, ["create-run", "--config", str(tmp_path / "bad.toml"), "--key", key])
    assert bad.exit_code == 1 and "lr_typo" in bad.output
