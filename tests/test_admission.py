"""Admission (peer/swarm/admission.py) and partner trust (peer/node/trust.py), pure bookkeeping; and the probes behind
admission (peer/swarm/reachability.py) against a real PeerServer on loopback."""

from __future__ import annotations

import random
import socket
import time
from dataclasses import replace

import pytest
from conftest_wire import CLIENT_ID, RUN_ID, SERVER_ID, STRANGER_ID, Wire, run, serving

from peer.node.trust import CLEAN, CLIPPED, STRIKES, PartnerTrust
from peer.swarm.admission import ADMITTED_FOR_S, FIRST_BACKOFF_S, MAX_BACKOFF_S, Admission
from peer.swarm.reachability import Prober
from protocol import PROTOCOL_VERSION
from protocol.identity import Identity
from protocol.records import Announcement, sign_announcement, verify_announcement

BASE = Announcement(peer_id="", public_key=b"", run_id="r", endpoint="127.0.0.1:1", tls_fingerprint="",
                    tls_certificate=b"", slice=0, round=0, tokens_per_second=0.0, loss=0.0, software_version="",
                    protocol_version="1.0", expires_unix=0.0)  # fmt: skip


def ann(peer_id: str, endpoint: str = "127.0.0.1:1") -> Announcement:
    return replace(BASE, peer_id=peer_id, endpoint=endpoint)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_an_announcement_alone_admits_nobody_a_probe_or_an_exchange_does() -> None:
    admission = Admission(now=Clock())
    peers = [ann("a"), ann("b"), ann("c")]
    assert admission.admitted(peers) == []
    admission.prove("a")
    chosen = admission.to_probe(peers, me="me", limit=8, rng=random.Random(0))
    assert {p.peer_id for p in chosen} == {"b", "c"}  # a is proven already
    admission.probed("b", ok=True)
    admission.probed("c", ok=False)
    assert [p.peer_id for p in admission.admitted(peers)] == ["a", "b"]


def test_probes_are_bounded_and_never_doubled() -> None:
    admission = Admission(now=Clock())
    peers = [ann(f"p{i}") for i in range(20)] + [ann("client", endpoint=""), ann("me")]
    first = admission.to_probe(peers, me="me", limit=8, rng=random.Random(0))
    assert len(first) == 8 and admission.probing() == 8
    second = admission.to_probe(peers, me="me", limit=8, rng=random.Random(0))
    assert not {p.peer_id for p in first} & {p.peer_id for p in second}
    rest = admission.to_probe(peers, me="me", limit=100, rng=random.Random(0))
    assert len(rest) == 4  # never this peer, never a client-only one (nothing to dial)


def test_failed_probes_back_off_and_newcomers_come_first() -> None:
    clock = Clock()
    admission = Admission(now=clock)
    fakes = [ann(f"fake{i}") for i in range(200)]
    for peer in admission.to_probe(fakes, me="me", limit=200, rng=random.Random(0)):
        admission.probed(peer.peer_id, ok=False)
    assert admission.to_probe(fakes, me="me", limit=8, rng=random.Random(0)) == []  # all waiting out a failure
    newcomer = ann("newcomer")
    clock.t += FIRST_BACKOFF_S  # the fakes may be retried now, but a never-probed peer goes first
    chosen = admission.to_probe([*fakes, newcomer], me="me", limit=8, rng=random.Random(1))
    assert chosen[0].peer_id == "newcomer"
    for peer in chosen:
        admission.probed(peer.peer_id, ok=peer.peer_id == "newcomer")
    assert admission.is_admitted("newcomer")
    # a fake that keeps failing waits ever longer, up to the cap
    for _ in range(20):
        clock.t += MAX_BACKOFF_S
        for peer in admission.to_probe([fakes[0]], me="me", limit=1, rng=random.Random(0)):
            admission.probed(peer.peer_id, ok=False)
    assert admission.records["fake0"].retry_at - clock.t == MAX_BACKOFF_S


def test_admission_lapses_and_is_forgotten_with_the_announcement() -> None:
    clock = Clock()
    admission = Admission(now=clock)
    admission.prove("a")
    clock.t += ADMITTED_FOR_S + 1
    assert not admission.is_admitted("a")
    admission.forget(["b"])
    assert "a" not in admission.records


def test_trust_bans_a_sender_clipped_again_and_again_not_an_honest_one() -> None:
    trust = PartnerTrust()
    assert trust.record({"honest": [CLEAN, CLIPPED]}) == {}  # one odd round is no reason
    for _ in range(10):
        assert trust.record({"honest": [CLEAN, CLEAN]}) == {}
    lost = {}
    rounds = 0
    while not lost:
        rounds += 1
        lost = trust.record({"patient": [CLIPPED, CLEAN], "honest": [CLEAN, CLEAN]})
    assert set(lost) == {"patient"} and rounds == STRIKES
    assert "patient" not in trust.history  # a fresh start after its ban
    assert trust.record({"liar": ["outlier", "outlier", "non_finite"]}) == {
        "liar": "3 of its last 3 terms were clipped or rejected"
    }


def _announced(identity: Identity, endpoint: str, run_id: str = RUN_ID) -> Announcement:
    value = sign_announcement(identity, run_id=run_id, endpoint=endpoint, slice_index=0, round=1,
                              tokens_per_second=1.0, loss=2.0, software_version="t", protocol_version=PROTOCOL_VERSION,
                              expires_unix=time.time() + 60)  # fmt: skip
    return verify_announcement(value)


@pytest.mark.timeout(60)
def test_only_a_peer_that_answers_at_its_endpoint_as_itself_is_admitted() -> None:
    """Probes against a real PeerServer on loopback: it is admitted; an announcement of a fresh key pointing at
    a port where nothing listens, one pointing at the real server's endpoint (the TLS pin fails), and the real
    server announced by a key that is not its own, are not (and wait out a back-off)."""
    wire = Wire()

    async def scenario() -> tuple[Admission, list[Announcement]]:
        async with serving(wire) as server:
            closed = socket.socket()
            closed.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{closed.getsockname()[1]}"
            closed.close()
            peers = [
                _announced(SERVER_ID, server.endpoint),  # the real one
                _announced(Identity.generate(), dead),  # nothing listens there
                _announced(Identity.generate(), server.endpoint),  # someone else's endpoint: the TLS pin fails
                _announced(STRANGER_ID, server.endpoint, run_id="cd" * 32),  # another run's announcement
            ]
            admission = Admission()
            prober = Prober(admission, CLIENT_ID, RUN_ID, lambda: peers, random.Random(0))
            await prober.admit_now(timeout_s=20)
            await prober.close()
            return admission, peers

    admission, peers = run(scenario)
    assert [p.peer_id for p in admission.admitted(peers)] == [SERVER_ID.peer_id]
    assert all(admission.records[p.peer_id].retry_at > 0 for p in peers[1:])
