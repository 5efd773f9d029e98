"""No manifest field is ignored (issue 15): every leaf field of the Manifest proto, found by walking its descriptor,
is in FIELDS, and changing it either changes what a peer does or is refused with a one-line error.

A field added to protos/murmur.proto fails `test_every_manifest_field_is_in_the_table` until it gets a row here.
Behaviour is probed through the code a peer runs: the model built from the config, a Trainer's first round on
`micro` (two inner steps), the slice partition, the gossip outer step, partner choice, the codec. A refusal is a
MurmurError or ValueError whose message is one line (what `murmur run` prints).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from peer.config import RunConfig
from peer.core.model import Transformer
from peer.core.outer import initial_state
from peer.core.robust import Clipper
from peer.core.slices import Contribution, full_layout, parameter_shapes, partition
from peer.node.gossip import PartnerTerms, outer_step
from peer.node.latejoin import download_deadline
from peer.node.trainer import Trainer
from peer.swarm.membership import choose_partners
from protocol import manifest as M
from protocol._generated import murmur_pb2 as pb
from protocol.codec import ErrorFeedback, encode
from protocol.errors import MurmurError
from protocol.identity import Identity

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow(10)]

BASE = {"swarm": "fields", "preset": "micro", "slices": {"num_slices": 2},
        "inner": {"steps_per_round": 2, "batch_size": 2, "warmup_steps": 0, "total_steps": 2}}  # fmt: skip


def base_manifest() -> pb.Manifest:
    return RunConfig.from_dict(BASE).to_manifest(created_unix=1_700_000_000)


# ------------------------------------------------------------------------------------------------ probes


def model_probe(run: RunConfig) -> Any:
    """Shapes and the loss of the seeded initial model on fixed tokens."""
    torch.manual_seed(0)
    model = Transformer(run.model)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return parameter_shapes(run.model), float(model.loss(ids, ids))


def trainer_probe(run: RunConfig) -> Any:
    """A real peer's first round: tokens, loss, the dtype and values of its weights after the round."""
    trainer = Trainer(run, "ab" * 32, torch.device("cpu"))
    trainer.take_slice(0)
    done = trainer.train_round(0, threading.Event())
    weights = torch.cat([p.detach().float().flatten() for p in trainer.model.parameters()])
    return done.tokens, done.loss, str(next(trainer.model.parameters()).dtype), weights.tolist()


def partition_probe(run: RunConfig) -> Any:
    return [{n: (r.dim, r.ranges) for n, r in lay.items()} for lay in partition(run.model, run.slices)]


def outer_probe(run: RunConfig) -> Any:
    """One gossip outer step (the daemon's `outer_step`, with its clipper) on fixed small tensors."""
    g = torch.Generator().manual_seed(0)
    phi = {"w": torch.randn(8, 8, generator=g)}
    layout = full_layout({"w": (8, 8)})
    own = Contribution(layout, {"w": 0.01 * torch.randn(8, 8, generator=g)})
    partner = Contribution(layout, {"w": own.tensors["w"] + 0.03 * torch.randn(8, 8, generator=g)}, "p")
    weights = Contribution(layout, {"w": phi["w"] + 0.1 * torch.randn(8, 8, generator=g)}, "p")
    state, clipper = initial_state(phi, run.outer), Clipper(run.clip)
    for _ in range(2):  # momentum starts at zero: only a second step shows it
        outer_step(phi, state, own, PartnerTerms([partner], [weights]), run.outer, clipper)
    return phi["w"].tolist()


def fanout_probe(run: RunConfig) -> Any:
    peers = [SimpleNamespace(peer_id=f"p{i}", slice=i % 3, client_only=False) for i in range(6)]
    import random

    return len(choose_partners(peers, me="x", own_slice=0, fanout=run.gossip.fanout, rng=random.Random(0)))


def codec_probe(run: RunConfig) -> Any:
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 1e-3
    return encode(x, run.codec).payload


def feedback_probe(run: RunConfig) -> Any:
    """The second round's payload: it carries the first round's residual, times the decay."""
    feedback = ErrorFeedback(run.codec)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 1e-3
    feedback.encode("w", x)
    return feedback.encode("w", x).payload


def signed(manifest: pb.Manifest) -> M.SignedRunManifest:
    return M.sign(manifest, OWNER)


OWNER = Identity.generate()


# ------------------------------------------------------------------------------------------------ table


@dataclass(frozen=True, slots=True)
class Row:
    """One field: `value` changes it to something valid that `probe` (a function of the RunConfig) must tell
    apart from the base, and/or `bad` is refused by `refuse` (from_manifest unless said); or `info` says why the
    field changes no behaviour (it still changes the run id: every field is in the signed bytes)."""

    value: Any = None
    probe: Callable[[RunConfig], Any] | None = None
    bad: Any = None
    refuse: Callable[[pb.Manifest], Any] = RunConfig.from_manifest
    info: str = ""
    base: Callable[[pb.Manifest], None] | None = None
    """Adjusts the base manifest first (a field that matters only with another's value, e.g. topk_fraction)."""


def _trainer(manifest: pb.Manifest) -> Trainer:
    return Trainer(RunConfig.from_manifest(manifest), "ab" * 32, torch.device("cpu"))


def _verify_for(swarm: str) -> Callable[[pb.Manifest], None]:
    return lambda m: M.verify_signed(signed(m), swarm=swarm)


def _set_codec(name: str) -> Callable[[pb.Manifest], None]:
    return lambda m: setattr(m.codec, "name", name)


FIELDS: dict[str, Row] = {
    "swarm_name": Row(bad="other", refuse=_verify_for("fields")),
    "protocol_version": Row(bad="9.0", refuse=signed),
    "model.preset": Row(info="the shape comes from the fields below; the preset only names it (printed by "
                             "create-run and join)"),  # fmt: skip
    "model.vocab_size": Row(value=300, probe=model_probe, bad=0),
    "model.d_model": Row(value=32, probe=model_probe, bad=63),
    "model.n_layers": Row(value=3, probe=model_probe, bad=0),
    "model.n_heads": Row(value=4, probe=model_probe, bad=3),
    "model.seq_len": Row(value=32, probe=trainer_probe, bad=0),
    "model.dtype": Row(value="bfloat16", probe=trainer_probe, bad="float16"),
    "model.mlp": Row(value="gelu", probe=model_probe, bad="relu"),
    "model.d_hidden": Row(value=128, probe=model_probe),
    "model.positions": Row(value="learned", probe=model_probe, bad="alibi"),
    "model.tie_embeddings": Row(value=False, probe=model_probe),
    "model.norm_eps": Row(value=0.5, probe=model_probe),
    "model.init_std": Row(value=0.05, probe=model_probe),
    "slices.num_slices": Row(value=4, probe=partition_probe, bad=0, refuse=signed),
    "slices.cut": Row(value="blocks", probe=partition_probe, bad="rows"),
    "slices.shared_head": Row(value=False, probe=partition_probe),
    "inner.steps_per_round": Row(value=1, probe=trainer_probe, bad=0),
    "inner.lr": Row(value=1e-2, probe=trainer_probe, bad=-1.0),
    "inner.beta1": Row(value=0.5, probe=trainer_probe, bad=1.0),
    "inner.beta2": Row(value=0.5, probe=trainer_probe, bad=1.5),
    "inner.weight_decay": Row(value=0.9, probe=trainer_probe),
    "inner.warmup_steps": Row(value=2, probe=trainer_probe),
    "inner.schedule": Row(bad="linear"),
    "inner.batch_size": Row(value=1, probe=trainer_probe, bad=0),
    "inner.total_steps": Row(value=100, probe=trainer_probe, bad=0),
    "inner.min_lr_ratio": Row(value=0.9, probe=trainer_probe, bad=2.0),
    "inner.grad_clip": Row(value=0.01, probe=trainer_probe, bad=-1.0),
    "inner.grad_accum": Row(value=2, probe=trainer_probe, bad=0),
    "inner.rest_step": Row(value=0.0, probe=trainer_probe, bad=2.0),
    "outer.method": Row(bad="diloco", info="the rule below is what steps; the method must be a run method"),
    "outer.lr": Row(value=0.9, probe=outer_probe, bad=3.0),
    "outer.momentum": Row(value=0.9, probe=outer_probe, bad=1.0),
    "outer.clip": Row(value=1.0, probe=outer_probe, bad=-1.0),
    "outer.rule": Row(value="gasloc", probe=outer_probe, bad="adam"),
    "outer.consensus": Row(value=1.0, probe=outer_probe, bad=2.0),
    "gossip.fanout": Row(value=1, probe=fanout_probe, bad=0),
    "gossip.exchange_timeout_s": Row(value=5.0, probe=lambda r: download_deadline({}, r.gossip.exchange_timeout_s),
                                     bad=-1.0),
    "gossip.min_round_s": Row(bad=4000.0, info="paces rounds and sizes partners' rate limits (peer/node/waits.Pacer, "
                                               "protocol/limits.py): a wall-clock behaviour, refused out of range"),
    "codec.name": Row(value="int4", probe=codec_probe, bad="zip"),
    "codec.block_size": Row(value=64, probe=codec_probe, bad=0),
    "codec.topk_fraction": Row(value=0.5, probe=codec_probe, bad=2.0, base=_set_codec("topk")),
    "codec.chunk_size": Row(value=64, probe=codec_probe, bad=2**16 + 1, base=_set_codec("sparseloco")),
    "codec.feedback_decay": Row(value=0.5, probe=feedback_probe, bad=1.5, base=_set_codec("sparseloco")),
    "data.source": Row(value="TEXT", probe=trainer_probe, bad="/nonexistent/corpus.txt", refuse=_trainer),
    "data.tokenizer": Row(bad="ab" * 32, refuse=_trainer),
    "data.seed": Row(value=7, probe=trainer_probe),
    "data.location": Row(bad="https://example.org/ds/"),
    "data.dataset_id": Row(bad="ab" * 32),
    "created_unix": Row(info="when the owner signed; it changes the run id (a fresh run of the same config), "
                             "nothing a peer computes"),  # fmt: skip
}


def leaf_fields(descriptor: Any = pb.Manifest.DESCRIPTOR, prefix: str = "") -> list[str]:
    out = []
    for field in descriptor.fields:
        if field.message_type is not None:
            out += leaf_fields(field.message_type, f"{prefix}{field.name}.")
        else:
            out.append(prefix + field.name)
    return out


def with_value(manifest: pb.Manifest, path: str, value: Any) -> pb.Manifest:
    out = pb.Manifest()
    out.CopyFrom(manifest)
    *parents, leaf = path.split(".")
    target = out
    for name in parents:
        target = getattr(target, name)
    setattr(target, leaf, value)
    return out


# ------------------------------------------------------------------------------------------------ tests


def test_every_manifest_field_is_in_the_table() -> None:
    fields = leaf_fields()
    assert sorted(set(fields) - set(FIELDS)) == [], "a manifest field nobody proved is honoured: add a row"
    assert sorted(set(FIELDS) - set(fields)) == [], "a row for a field the manifest no longer has"
    for path, row in FIELDS.items():
        assert row.probe is not None or row.bad is not None or row.info, path


@pytest.fixture
def text_source(tmp_path: Path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text("a small corpus of its own, unlike the embedded one. " * 400)
    return str(path)


@pytest.mark.parametrize("path", [p for p, row in FIELDS.items() if row.probe is not None])
def test_changing_the_field_changes_behaviour(path: str, text_source: str) -> None:
    row = FIELDS[path]
    base = base_manifest()
    if row.base is not None:
        row.base(base)
    value = text_source if row.value == "TEXT" else row.value
    changed = with_value(base, path, value)
    assert M.sign(changed, OWNER).run_id != M.sign(base, OWNER).run_id
    assert row.probe(RunConfig.from_manifest(changed)) != row.probe(RunConfig.from_manifest(base)), path


@pytest.mark.parametrize("path", [p for p, row in FIELDS.items() if row.bad is not None])
def test_a_bad_value_is_refused_in_one_line(path: str) -> None:
    row = FIELDS[path]
    bad = with_value(base_manifest(), path, row.bad)
    with pytest.raises((MurmurError, ValueError)) as err:
        row.refuse(bad)
    assert str(err.value) and "\n" not in str(err.value), path


@pytest.mark.parametrize("path", [p for p, row in FIELDS.items() if row.info])
def test_an_informational_field_still_changes_the_run_id(path: str) -> None:
    base = base_manifest()
    value = {"model.preset": "tiny", "created_unix": 1_800_000_000, "outer.method": "gossip-ppu-noloco",
             "gossip.min_round_s": 2.5}[path]  # fmt: skip
    changed = with_value(base, path, value)
    assert M.sign(changed, OWNER).run_id != M.sign(base, OWNER).run_id
    RunConfig.from_manifest(changed)  # and it is accepted
