"""The daemon's round without sockets: what goes on the wire, which updates are mixed, and that the
outer step from wire updates is exactly the simulator's `gossip_step`."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from peer.config import RunConfig
from peer.core.outer import consensus_distance, gossip_step, initial_state
from peer.core.slices import Contribution, parameter_shapes, partition, pseudo_gradient, weight_slice
from peer.node import resume
from peer.node.gossip import (
    STALE_ROUNDS,
    Inbox,
    compose_outer_step,
    consensus_slice,
    encode_update,
    split_update,
    update_shapes,
)
from peer.node.latejoin import MAX_DONORS, choose_donors
from peer.node.trainer import Halted, Trainer, _inner_config
from protocol.codec import CodecConfig, ErrorFeedback, decode
from protocol.identity import Identity
from protocol.records import Announcement
from protocol.updates import ReceivedUpdate, WirePolicy, plan_payload, seal_update

RUN = RunConfig.from_dict(
    {"swarm": "unit", "preset": "tiny", "slices": {"num_slices": 2},
     "inner": {"steps_per_round": 4, "batch_size": 4, "warmup_steps": 2}}
)  # fmt: skip
SHAPES = parameter_shapes(RUN.model)
LAYOUTS = partition(RUN.model, RUN.slices)


def _phi(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) * 0.02 for n, s in SHAPES.items()}


def _received(update, sender: str = "b" * 64) -> ReceivedUpdate:
    """What the wire hands over for `update`: the same tensors, decoded by the codec they name."""
    tensors = {n: decode(e, CodecConfig(name=e.codec)) for n, e in update.tensors.items()}
    return ReceivedUpdate(sender, "r" * 64, update.round, update.slice, tensors, b"\0" * 32, 0)


def _peer_update(seed: int, round: int, slice_index: int):
    phi, theta = _phi(seed), _phi(seed + 100)
    delta = pseudo_gradient(phi, theta, LAYOUTS[slice_index])
    return encode_update(round, slice_index, delta, phi, LAYOUTS, ErrorFeedback(RUN.codec))


@pytest.mark.timeout(30)
def test_outer_step_from_wire_updates_is_gossip_step() -> None:
    phi, state = _phi(0), initial_state(_phi(0), RUN.outer)
    _, own = _peer_update(0, round=3, slice_index=0)
    partner_updates = [_peer_update(1, round=3, slice_index=1)[0], _peer_update(2, round=2, slice_index=0)[0]]
    received = [_received(u, sender=f"{i}" * 64) for i, u in enumerate(partner_updates)]

    expected_phi = {n: t.clone() for n, t in phi.items()}
    expected_state = {n: t.clone() for n, t in state.items()}
    deltas, weights = [], []
    for update in received:  # by hand: the partner's packed delta on its slice, its weights on slice round % K
        k = consensus_slice(update.round, len(LAYOUTS))
        deltas.append(
            Contribution(LAYOUTS[update.slice], {n: update.tensors["delta/" + n] for n in LAYOUTS[update.slice]})
        )
        weights.append(Contribution(LAYOUTS[k], {n: update.tensors[f"phi/{k}/{n}"] for n in LAYOUTS[k]}))
    gossip_step(expected_phi, expected_state, own, deltas, weights, RUN.outer)

    compose_outer_step(phi, state, own, received, LAYOUTS, RUN.outer)
    for name in phi:
        torch.testing.assert_close(phi[name], expected_phi[name], rtol=0, atol=0)
        torch.testing.assert_close(state[name], expected_state[name], rtol=0, atol=0)
    assert any(not torch.equal(phi[n], _phi(0)[n]) for n in phi)


@pytest.mark.timeout(30)
def test_update_carries_delta_and_one_rotating_weight_slice_that_the_policy_accepts() -> None:
    me = Identity.generate()
    policy = WirePolicy(run_id="r" * 64, expected_shapes=lambda k: update_shapes(LAYOUTS, SHAPES, k),
                        lookup=lambda _: me.public_key, codec=RUN.codec,
                        accepted_codecs=frozenset({"bf16"}))  # fmt: skip
    for round in (4, 5):
        update, own = _peer_update(0, round=round, slice_index=1)
        k = round % 2
        assert {n for n in update.tensors if n.startswith("delta/")} == {"delta/" + n for n in LAYOUTS[1]}
        assert {n for n in update.tensors if n.startswith("phi/")} == {f"phi/{k}/{n}" for n in LAYOUTS[k]}
        header = seal_update(update, identity=me, run_id=policy.run_id, recipient="x" * 64)
        assert len(plan_payload(header.tensors, policy.expected_shapes(header.slice), policy)) == len(update.tensors)
        delta, weights = split_update(_received(update), LAYOUTS)
        assert delta.layout == LAYOUTS[1] and weights.layout == LAYOUTS[k]
        torch.testing.assert_close(weights.tensors["embed.weight"], weight_slice(_phi(0), LAYOUTS[k]).tensors[
            "embed.weight"], atol=1e-3, rtol=1e-2)  # fmt: skip
        for name, tensor in own.tensors.items():  # the sender mixes in exactly what partners decode
            torch.testing.assert_close(delta.tensors[name], tensor, rtol=0, atol=0)
    assert update_shapes(LAYOUTS, SHAPES, 2) is None and update_shapes(LAYOUTS, SHAPES, -1) is None


def _stub(sender: str, round: int) -> ReceivedUpdate:
    return ReceivedUpdate(sender, "r" * 64, round, 0, {}, b"", 0)


@pytest.mark.timeout(10)
def test_inbox_keeps_newest_per_sender_never_twice_and_drops_stale() -> None:
    inbox = Inbox()
    inbox.add(_stub("a", 9))
    inbox.add(_stub("a", 10))  # a reply and a push of the same peer: the newest wins
    inbox.add(_stub("a", 8))
    inbox.add(_stub("b", 10 - STALE_ROUNDS))
    inbox.add(_stub("c", 10 - STALE_ROUNDS - 1))
    inbox.add(_stub("d", 12))  # a peer ahead of us is not stale
    assert [(u.sender, u.round) for u in inbox.take(10)] == [("a", 10), ("b", 8), ("d", 12)]
    assert inbox.dropped_stale == 1 and not inbox.pending
    inbox.add(_stub("a", 10))  # a slower partner's reply repeats what we already mixed in
    inbox.add(_stub("b", 11))
    assert [(u.sender, u.round) for u in inbox.take(11)] == [("b", 11)]


def _train_pair(rounds: int, *, swap: bool) -> tuple[list[Trainer], list[float]]:
    """Two trainers on slices 0 and 1, handing each other their wire updates (or not) every round."""
    trainers = [Trainer(RUN, Identity.generate().peer_id, torch.device("cpu")) for _ in range(2)]
    for k, t in enumerate(trainers):
        t.take_slice(k)
    halt, losses = threading.Event(), []
    for r in range(rounds):
        done = [t.train_round(r, halt) for t in trainers]
        for t, mine, theirs in zip(trainers, done, reversed(done)):
            t.outer_step(mine.own, [_received(theirs.update, sender=f"{theirs.update.slice}" * 64)] if swap else [])
        losses.append(sum(x.loss for x in done) / 2)
    return trainers, losses


@pytest.mark.timeout(120)
def test_two_trainers_swapping_updates_by_hand_lower_their_loss_and_agree() -> None:
    """The daemon's round with a fake partner: train, encode, hand over the update, outer step."""
    torch.set_num_threads(1)
    trainers, losses = _train_pair(6, swap=True)
    assert losses[-1] < losses[0] - 0.5, losses
    alone, _ = _train_pair(6, swap=False)
    together = consensus_distance([t.phi for t in trainers])
    apart = consensus_distance([t.phi for t in alone])
    # Two peers that swap every round mix the same two deltas (each its own as the other decodes it) and
    # pull toward the same rounded weights: they stay identical, like an all-reduce of two; apart, they drift.
    assert together < 1e-9 and apart > 0.05, (together, apart)
    halt = threading.Event()
    halt.set()
    with pytest.raises(Halted):
        trainers[0].train_round(6, halt)


@pytest.mark.timeout(10)
def test_micro_batch_keeps_the_runs_batch_by_accumulation() -> None:
    assert _inner_config(RUN, None) == RUN.inner
    split = _inner_config(RUN, 2)
    assert (split.batch_size, split.grad_accum) == (2, 2)
    with pytest.raises(ValueError, match="must divide"):
        _inner_config(RUN, 3)


def _announcement(peer_id: str, endpoint: str, round: int) -> Announcement:
    return Announcement(peer_id=peer_id, public_key=b"", run_id="r" * 64, endpoint=endpoint, tls_fingerprint="",
                        tls_certificate=b"", slice=0, round=round, tokens_per_second=0.0, loss=0.0,
                        software_version="", protocol_version="", expires_unix=0.0)  # fmt: skip


@pytest.mark.timeout(10)
def test_late_joiners_pick_random_donors_that_serve_and_have_trained() -> None:
    peers = [_announcement("me", "h:1", 9), _announcement("nat", "", 9), _announcement("fresh", "h:2", 0)]
    peers += [_announcement(f"d{i}", f"h:{10 + i}", 5) for i in range(5)]
    seen = set()
    for seed in range(20):
        donors = choose_donors(peers, me="me", rng=random.Random(seed))
        assert len(donors) == MAX_DONORS and all(d.peer_id.startswith("d") for d in donors)
        seen.update(d.peer_id for d in donors)
    assert seen == {f"d{i}" for i in range(5)}
    assert choose_donors(peers[:3], me="me", rng=random.Random(0)) == []


@pytest.mark.timeout(60)
def test_checkpoint_on_stop_and_resume_restore_the_peer(tmp_path) -> None:
    torch.set_num_threads(1)
    trainers, _ = _train_pair(2, swap=True)
    before = trainers[1]
    saved = resume.save(before, tmp_path, round=7, run_id="ab" * 32, peer_id="c" * 64, version="t", tokens_seen=9)
    assert saved is not None and saved.name == "round-000007"

    again = Trainer(RUN, Identity.generate().peer_id, torch.device("cpu"))
    assert resume.restore(again, tmp_path, run_id="ab" * 32, slice_index=1) == 7
    for name in SHAPES:
        assert torch.equal(again.phi[name], before.phi[name]) and torch.equal(again.state[name], before.state[name])
    assert again.optimizer.steps == before.optimizer.steps > 0
    assert again.feedback.state_dict().keys() == before.feedback.state_dict().keys()
    # Another slice: phi and the outer state come back, the slice's inner state starts afresh.
    other = Trainer(RUN, Identity.generate().peer_id, torch.device("cpu"))
    assert resume.restore(other, tmp_path, run_id="ab" * 32, slice_index=0) == 7
    assert other.slice == 0 and other.optimizer.steps == 0
    assert resume.restore(other, tmp_path / "none", run_id="ab" * 32, slice_index=0) is None


@pytest.mark.timeout(30)
def test_run_command_is_registered_and_refuses_bad_flag_combinations() -> None:
    from click.testing import CliRunner

    from peer.cli.main import main

    runner = CliRunner()
    assert "run" in runner.invoke(main, ["--help"]).output
    base = ["run", "--swarm", "loop", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmX", "--identity", "p.key"]
    both = runner.invoke(main, [*base, "--listen", "127.0.0.1:0", "--client-only"])
    assert both.exit_code == 2 and "not both" in both.output
    contradicting = runner.invoke(main, [*base, "--client-only", "--no-checkpoints", "--checkpoint-dir", "c"])
    assert contradicting.exit_code == 2 and "contradict" in contradicting.output
    wildcard = runner.invoke(main, [*base, "--listen", "0.0.0.0:7000"])
    assert wildcard.exit_code == 2 and "--announce" in wildcard.output
