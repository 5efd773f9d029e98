"""The simulator's compression options (issue 17): no consensus weight slice, and a peer mixing its own delta
as trained while partners get the codec's version."""

from __future__ import annotations

import pytest

from peer.core.data import load_corpus
from peer.core.inner import InnerConfig
from peer.core.model import PRESETS
from peer.lab import sim
from protocol.codec import CodecConfig

pytestmark = pytest.mark.timeout(120)


def _run(monkeypatch: pytest.MonkeyPatch, **options: object) -> tuple[sim.Simulation, list]:
    """One round of gossip-ppu on `tiny` with one inner step; every outer step's (own, terms) recorded."""
    config = sim.SimConfig(model=PRESETS["tiny"], inner=InnerConfig(steps_per_round=1, batch_size=2, total_steps=1),
                           peers=4, rounds=1, fanout=1, eval_every=1, eval_batches=1, **options)  # fmt: skip
    simulation = sim.Simulation("gossip-ppu", load_corpus(None), config)
    steps: list = []
    monkeypatch.setattr(sim, "outer_step", lambda phi, state, own, terms, outer: steps.append((own, terms)))
    simulation.run_round(0)
    return simulation, steps


@pytest.mark.slow(2)
def test_without_weight_slices_only_deltas_travel(monkeypatch: pytest.MonkeyPatch) -> None:
    simulation, steps = _run(monkeypatch, weights_codec=None)
    assert all(terms.weights == [] and len(terms.deltas) == 1 for _, terms in steps)
    assert simulation.bytes_sent == simulation._payload(simulation.layouts[0])  # fanout 1: one delta each


@pytest.mark.slow(2)
def test_own_delta_as_trained_partners_get_it_as_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = CodecConfig(name="sparseloco", topk_fraction=0.01)
    simulation, steps = _run(monkeypatch, codec=codec, own_uncompressed=True)
    for k, (own, terms) in enumerate(steps):
        trained = simulation.uncompressed[k]
        assert all(bool((own.tensors[n] == trained.tensors[n]).all()) for n in trained.tensors)
        sent = terms.deltas[0].tensors
        kept, total = sum(int((t != 0).sum()) for t in sent.values()), sum(t.numel() for t in sent.values())
        assert 0 < kept < 0.02 * total  # a partner's delta as sent: about 1% of its entries
