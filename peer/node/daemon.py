"""The peer daemon's round loop: one joined peer trains the swarm: inner -> exchange -> outer -> announce.

How a peer gets here (join, resume or late join, serve) and how it stops is `peer/node/lifecycle.py`.

One round (`Daemon.run_round`), DESIGN.md section 3:
1. H inner steps on this peer's slice, in a worker thread (the event loop keeps serving partners);
   pseudo-gradient; encode it with error feedback (`peer/node/gossip.py`).
2. Push-pull with `fanout` random live partners (`choose_partners`, other slices first), each bounded
   by the manifest's exchange timeout; a failure skips that partner (logged with its peer id) and
   rests it for two rounds. No barrier: nobody waits for a given partner. The one wait: when every partner
   refused our round as too far ahead of the swarm, the next round is held until one of them is near
   enough to take it (at most PACE_WAIT_MAX_S; peer/node/rounds.py), so a fast peer is not banned.
3. Updates that partners pushed to our server during the round join the replies (`Inbox`); one per
   sender, stale ones dropped.
4. `gossip_step` through `compose_outer_step`, the same call the simulator makes; announce round,
   loss and tokens/s with the next refresh.

With `overlap` (the default) step 2 of round r runs while round r+1's inner steps train: communication
hides behind computation. Each round still takes its outer step at once, from its own new delta and the
partner terms that round r's exchanges brought (a round old): an eager update (Kale et al., arXiv
2502.12996). Taking the whole step a round late instead, from weights that lacked it, cost 1.41x DiLoCo's
loss at 40 simulated rounds against 1.14x without overlap (`python -m benchmarks.long_horizon`, section
`overlap`). The training thread does one thing at a time (train r+1, then its outer step), so phi never
changes under a running inner round. A signal drops the exchanges in flight, as it drops a partial round;
so does the end of `--rounds N` once they are done (no later step would mix what they bring).

Round numbers work like a Lamport clock: a peer's next round is one past the highest round it has
seen (its own or a partner's), so peers that started at different times agree on "now" after their
first exchange, and "stale" means really behind (a stuck or much slower peer), not merely late to start.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from peer.config import RunConfig
from peer.node.gossip import Inbox, update_shapes
from peer.node.latejoin import (
    MAX_CANDIDATES,
    SNAPSHOT_EVERY,
    choose_donors,
    combine,
    download_deadline,
    fetch_states,
    loss_check,
)
from peer.node.metrics import Metrics
from peer.node.roundline import RoundLine
from peer.node.rounds import MAX_ROUND_LEAD, STRIKES_TO_BAN, RoundView
from peer.node.status import StatusReporter
from peer.node.trainer import Halted, TrainedRound, Trainer
from peer.node.trust import PartnerTrust
from peer.node.waits import Pacer, stopped_within, unless_stopped
from peer.swarm.admission import Admission
from peer.swarm.membership import Member, choose_partners
from peer.swarm.reachability import Prober
from protocol.bans import BanList
from protocol.client import PeerClient
from protocol.errors import BannedPeer, MurmurError, ProtocolViolation, Reason
from protocol.identity import Identity
from protocol.logs import get_logger
from protocol.records import Announcement
from protocol.service import PeerServer, PeerStatus
from protocol.updates import OutgoingUpdate, ReceivedUpdate, StateSnapshot, WirePolicy

log = get_logger(__name__)

REST_ROUNDS = 2
"""Rounds a partner whose exchange failed is left out of partner choice."""
PEERS_REFRESH_MIN_S = 2.0
"""An update from a sender not in our peer list re-reads the list, at most this often."""
ADMISSION_EVERY_S = 3.0
"""How often the admission loop looks for announced peers to probe (and forgets peers that left)."""
SHUNNED_FOR_S = 120.0
"""A partner that answered "you are banned here" is not dialled again for this long (its ban outlasts rounds)."""
PACE_POLL_S = 0.2
PACE_WAIT_MAX_S = 30.0
"""The longest a round is held for partners that refused it as too far ahead (peer/node/rounds.py)."""


@dataclass(slots=True)
class InFlight:
    """A round whose exchanges are running; what they bring lands with the next round's outer step (overlap)."""

    round: int
    partners: int
    exchanges: asyncio.Future
    """Gathers one bool per partner: reached or not."""


class Daemon:
    """The round loop of one joined peer, and the server callbacks that feed it."""

    def __init__(
        self, trainer: Trainer, member: Member, identity: Identity, run: RunConfig, eval_every: int = 0,
        overlap: bool = True,
    ) -> None:  # fmt: skip
        self.trainer, self.member, self.identity, self.run = trainer, member, identity, run
        self.eval_every, self.overlap = eval_every, overlap
        self.in_flight: InFlight | None = None
        self._landed_at = 0.0
        self.pacer = Pacer(run.gossip.min_round_s)
        self.inbox = Inbox()
        self.outgoing: OutgoingUpdate | None = None
        self.admission = Admission()
        """Which announced peers answered at their endpoint or exchanged with us (peer/swarm/admission.py)."""
        self.view = RoundView(voters=self.admission.admitted_ids)
        """The Lamport clock, bounded by what the admitted peers agree on (peer/node/rounds.py)."""
        self.trust = PartnerTrust()
        """Partners whose terms keep being clipped or rejected lose their place (peer/node/trust.py)."""
        self.bans = BanList()
        """This peer's local bans: its server refuses them, and they are never picked as partners."""
        self.rested: dict[str, int] = {}
        self.shunned: dict[str, float] = {}
        """Partners that told us we are banned there, and until when (time.monotonic) we leave them be."""
        self.server: PeerServer | None = None
        self.pushed_to_us = 0
        self.tokens_seen = 0
        self.metrics = Metrics()
        self.reporter = StatusReporter(self.metrics)
        """The live status line on stderr (a TTY), and the way round lines reach stdout without tearing it."""
        self._peers_read = 0.0
        self._peers_task: asyncio.Task | None = None
        self._rejections_seen: dict = {}
        self._future_announced: dict[str, int] = {}
        self.prober = Prober(self.admission, identity, member.manifest.run_id, lambda: self.member.peers, member.rng)
        self.snapshot: StateSnapshot | None = None
        """What FetchState serves: phi every SNAPSHOT_EVERY rounds."""
        tables = [update_shapes(trainer.layouts, trainer.shapes, k) for k in range(len(trainer.layouts))]
        self.policy = WirePolicy(
            run_id=member.manifest.run_id,
            expected_shapes=lambda k: tables[k] if 0 <= k < len(tables) else None,
            lookup=self._lookup,
            codec=run.codec,
            accepted_codecs=frozenset({"bf16"}),
            admit_round=self._admit_round,
        )

    @property
    def clock(self) -> int:
        """Highest round taken as "now" (Lamport, bounded: `peer/node/rounds.py`); the next round is clock + 1."""
        return self.view.clock

    @clock.setter
    def clock(self, round: int) -> None:
        self.view.start(round)

    def _admit_state_round(self, sender: str, round: int) -> bool:
        """`_admit_round` for a donor's state (late join), counted here: no server saw it."""
        admitted = self._admit_round(sender, round)
        if not admitted:
            self.metrics.reject(Reason.FUTURE_ROUND.value)
        return admitted

    def _admit_round(self, sender: str, round: int) -> bool:
        """The wire's round check (`WirePolicy.admit_round`), for pushes and replies alike."""
        verdict = self.view.admit(sender, round)
        if verdict.ban:
            self.bans.ban(sender, f"{STRIKES_TO_BAN} updates in a row more than {MAX_ROUND_LEAD} rounds ahead")
        if not verdict.admitted:
            log.info("refused round %d from %s: more than %d ahead of the swarm (ceiling %d)", round, sender[:16],
                     MAX_ROUND_LEAD, verdict.ceiling)  # fmt: skip
        return verdict.admitted

    def _lookup(self, peer_id: str) -> bytes | None:
        """A live peer's key. A miss (typically a peer that joined since our last refresh, refused once
        as unknown) re-reads the peer list in the background so that its next push is accepted."""
        key = self.member.lookup(peer_id)
        if key is None and time.monotonic() - self._peers_read >= PEERS_REFRESH_MIN_S:
            self._peers_read = time.monotonic()
            self._peers_task = asyncio.get_running_loop().create_task(self._read_peers())
        return key

    async def _read_peers(self) -> None:
        try:
            self.member.peers = await asyncio.to_thread(self.member.swarm.live_peers, self.policy.run_id)
        except (OSError, RuntimeError, asyncio.TimeoutError) as exc:
            log.warning("re-reading the peer list failed: %r", exc)

    async def on_update(self, update: ReceivedUpdate) -> None:
        """A partner pushed its update to our server: keep it for this round's outer step."""
        self.admission.prove(update.sender)
        self.pushed_to_us += 1
        self.metrics.add_bytes_received(update.payload_bytes)
        self.inbox.add(update)

    def reply_for(self, _round: int, _slice: int) -> OutgoingUpdate | None:
        return self.outgoing

    def status(self) -> PeerStatus:
        return PeerStatus(round=self.member.round, slice=self.member.slice)

    async def run_round(self, halt: threading.Event, stop: asyncio.Event) -> bool:
        """Train one round, start its exchanges, and take its outer step with what the exchanges brought:
        this round's (no overlap) or the previous round's (overlap; this round's stay in flight).
        False when a signal ended it early (the partial round, and any exchanges in flight, are dropped)."""
        r = self.clock + 1 if self.in_flight is None else max(self.clock + 1, self.in_flight.round + 1)
        if not await self.keep_pace(r, stop) or not await self.pacer.next_round(stop):
            return False
        if self.member.slice != self.trainer.slice:
            await asyncio.to_thread(self.trainer.take_slice, self.member.slice)
        start = time.perf_counter()
        try:
            trained = await asyncio.to_thread(self.trainer.train_round, r, halt)
        except Halted:
            return False
        flight = self._launch(r, trained)
        if not self.overlap:
            return await self.land(r, trained, flight, start, stop)
        previous, self.in_flight = self.in_flight, flight
        return await self.land(r, trained, previous, start, stop)

    async def keep_pace(self, r: int, stop: asyncio.Event) -> bool:
        """Hold round r, serving partners all the while, while every partner refused us as too far ahead and
        none would take it yet (peer/node/rounds.py), for at most PACE_WAIT_MAX_S. False on `stop`."""
        began = time.monotonic()
        if not self.view.must_wait(r):
            return True
        while (waited := time.monotonic() - began) < PACE_WAIT_MAX_S and self.view.must_wait(r):
            self.eligible()  # notes the rounds of fresh announcements
            if await stopped_within(stop, PACE_POLL_S):
                return False
        self.view.held = False
        log.info("round %d waited %.1f s for partners that refused it as too far ahead to catch up%s", r, waited,
                 "; going on" if waited >= PACE_WAIT_MAX_S else "")  # fmt: skip
        return True

    def _launch(self, r: int, trained: TrainedRound) -> InFlight:
        """Serve round r's update to partners that call us, and start pushing it to `fanout` of them."""
        self.outgoing = trained.update
        now = time.monotonic()
        avoid = [p for p, until in self.rested.items() if until >= r] + self.bans.banned()
        avoid += [p for p, until in self.shunned.items() if until > now] + self.view.holding(r)
        partners = choose_partners(self.eligible(), me=self.identity.peer_id, own_slice=self.trainer.slice,
                                   fanout=self.run.gossip.fanout, rng=self.member.rng, avoid=avoid)  # fmt: skip
        exchanges = asyncio.gather(*(self.metrics.timed_exchange(self._exchange_with(p, trained.update, r))
                                     for p in partners))  # fmt: skip
        return InFlight(round=r, partners=len(partners), exchanges=exchanges)

    async def finish_exchanges(self, stop: asyncio.Event) -> None:
        """Let the exchanges in flight finish (partners still get our last update), then drop what they brought:
        no later outer step would mix it (the end of `--rounds N`)."""
        if self.in_flight is not None:
            flight, self.in_flight = self.in_flight, None
            await unless_stopped(flight.exchanges, stop)

    async def land(self, r: int, trained: TrainedRound, flight: InFlight | None, started: float,
                   stop: asyncio.Event) -> bool:  # fmt: skip
        """Round r's outer step: wait for `flight`'s exchanges (None: nothing to wait for), then mix our own
        delta of `trained` with the partner updates that arrived. False if `stop` came first."""
        ok, partners = 0, 0
        if flight is not None:
            if not await unless_stopped(flight.exchanges, stop):
                return False
            ok, partners = sum(1 for done in flight.exchanges.result() if done), flight.partners
        updates = self.inbox.take(r)
        clipping = await asyncio.to_thread(self.trainer.outer_step, trained.own, updates)
        for sender, why in self.trust.record(clipping.outcomes).items():
            self.bans.ban(sender, why)
            self.inbox.pending.pop(sender, None)
            self.metrics.reject(Reason.DISTRUSTED.value)  # once per ban; what it pushes while banned counts as "banned"
        if r % SNAPSHOT_EVERY == 0:
            self.snapshot = await asyncio.to_thread(self.trainer.snapshot, r)
        self.view.advance(r, (u.round for u in updates))
        now = time.perf_counter()
        seconds, self._landed_at = now - max(started, self._landed_at), now
        self.tokens_seen += trained.tokens
        self._record(r, trained, ok, seconds)
        for reason, count in clipping.rejected.items():
            self.metrics.reject(reason, count)
        self.metrics.add_clipped(clipping.clipped)
        self.member.round, self.member.loss = r, trained.loss
        self.member.tokens_per_second = trained.tokens / seconds
        shown = self.metrics.snapshot()
        self.member.bytes_sent, self.member.bytes_received = shown.bytes_sent, shown.bytes_received
        line = RoundLine(round=r, loss=trained.loss, tokens_per_s=trained.tokens / seconds, slice=trained.update.slice,
                         exchanged=ok, partners=partners, mixed=len(updates), pushed_to_us=self.pushed_to_us,
                         stale_dropped=self.inbox.dropped_stale, seconds=seconds)  # fmt: skip
        self.reporter.emit(line.format())
        if self.eval_every and r % self.eval_every == 0:
            self.metrics.set_validation_loss(val := await asyncio.to_thread(self.trainer.evaluate))
            self.reporter.emit(f"eval round {r} val_loss {val:.4f}")
        return True

    async def drop_in_flight(self) -> None:
        """Abandon the exchanges in flight (on a signal): they are cancelled, and what they brought never lands."""
        if self.in_flight is not None:
            self.in_flight.exchanges.cancel()
            await asyncio.gather(self.in_flight.exchanges, return_exceptions=True)
            self.in_flight = None

    def eligible(self) -> list[Announcement]:
        """Announced peers that may take a partner slot or donate weights: admitted (they answered at their
        endpoint or exchanged with us) and not claiming a round beyond the ceiling. Notes their rounds as votes."""
        admitted = self.admission.admitted(self.member.others())
        for peer in admitted:
            self.view.note(peer.peer_id, peer.round)
        ceiling = self.view.ceiling()
        for peer in admitted:
            if peer.round > ceiling and self._future_announced.get(peer.peer_id) != peer.round:
                self._future_announced[peer.peer_id] = peer.round  # counted once per announced round
                self.metrics.reject("future_round")
                log.info("%s announces round %d, beyond the ceiling %d: not a partner", peer.peer_id[:16],
                         peer.round, ceiling)  # fmt: skip
        return [p for p in admitted if p.round <= ceiling]

    async def admission_loop(self, stop: asyncio.Event) -> None:
        """Keep probing newly announced peers, and forget peers that left, until `stop`."""
        while not await stopped_within(stop, ADMISSION_EVERY_S):
            # peers that answered are kept while a DHT hiccup hides their announcement; strangers are forgotten
            keep = {p.peer_id for p in self.member.peers} | set(self.admission.admitted_ids())
            for table in (self.admission, self.view, self.trust):
                table.forget(keep)
            self.prober.start()

    def _record(self, r: int, trained: TrainedRound, reached: int, seconds: float) -> None:
        """This round's values into the metrics (and the server's refusals since the last round)."""
        m = self.metrics
        m.observe_round(seconds)
        m.set_round(r)
        m.set_slice(self.trainer.slice, len(self.trainer.layouts))
        m.set_loss(trained.loss)
        m.add_tokens(trained.tokens)
        m.set_peers_live(len(self.member.peers))
        m.set_peers_admitted(len(self.admission.admitted(self.member.others())))
        m.set_partners_reached(reached)
        if self.server is not None:
            for reason, count in self.server.rejections.items():
                if count > self._rejections_seen.get(reason, 0):
                    m.reject(reason.value, count - self._rejections_seen.get(reason, 0))
            self._rejections_seen = dict(self.server.rejections)

    async def late_join(self) -> None:
        """Start from weights several live donors agree on when the swarm is already training: the median of 3,
        which one lying donor cannot steer, at the lower median of their rounds (see peer/node/latejoin.py)."""
        candidates = choose_donors(self.eligible(), me=self.identity.peer_id, rng=self.member.rng,
                                   limit=MAX_CANDIDATES)  # fmt: skip
        if not candidates:
            return
        run_id = self.member.manifest.run_id
        timeout = download_deadline(self.trainer.shapes, self.run.gossip.exchange_timeout_s)
        states = await fetch_states(
            candidates, identity=self.identity, run_id=run_id, shapes=self.trainer.shapes, timeout_s=timeout,
            admit_round=self._admit_state_round, note_round=self.view.note,
        )
        if not states:
            print("late join: no donor delivered its state; starting from the initial weights", flush=True)
            return
        try:
            start = await asyncio.to_thread(combine, states, lambda w: self.trainer.evaluate(weights=w))
        except ValueError as exc:
            print(f"late join: {exc}; starting from the initial weights", flush=True)
            return
        await asyncio.to_thread(self.trainer.adopt, start.weights)
        self.clock = min(start.round, self.view.ceiling())  # even 2 of 3 donors cannot take it past the bound
        print(start.summary(), flush=True)
        print(loss_check(await asyncio.to_thread(self.trainer.evaluate), self.member.others()), flush=True)

    async def _exchange_with(self, partner: Announcement, update: OutgoingUpdate, r: int) -> bool:
        """Push-pull with one partner within the manifest's timeout; a failure skips it (and rests it)."""
        timeout = self.run.gossip.exchange_timeout_s
        try:
            async with PeerClient.connect(
                partner.endpoint, peer_id=partner.peer_id, tls_fingerprint=partner.tls_fingerprint,
                identity=self.identity, policy=self.policy, tls_certificate=partner.tls_certificate or None,
                deadline=timeout,
            ) as client:  # fmt: skip
                reply = await asyncio.wait_for(client.exchange(update), timeout)
                self.metrics.add_bytes_sent(client.bytes_sent)
                self.metrics.add_bytes_received(client.bytes_received)
        except (MurmurError, asyncio.TimeoutError) as exc:  # PeerClient turns grpc and OS errors into ours
            log.warning("round %d: exchange with %s at %s failed, skipped: %r", r, partner.peer_id[:16],
                        partner.endpoint, exc)  # fmt: skip
            if isinstance(exc, ProtocolViolation) and exc.reason is Reason.FUTURE_ROUND:
                if exc.by_peer:  # it refused our round: we run too far ahead of it
                    self.view.hold_for(partner.peer_id)
                else:  # its reply was refused here
                    self.metrics.reject(exc.reason.value)
            self.rested[partner.peer_id] = r + REST_ROUNDS
            if isinstance(exc, BannedPeer):
                self.shunned[partner.peer_id] = time.monotonic() + SHUNNED_FOR_S
            return False
        except Exception:  # a bug of ours with this one partner must not end the round (or the daemon)
            log.exception("round %d: exchange with %s failed unexpectedly, skipped", r, partner.peer_id[:16])
            self.rested[partner.peer_id] = r + REST_ROUNDS
            return False
        self.admission.prove(partner.peer_id)
        self.view.admitted_by_partner()
        if reply is not None:
            self.inbox.add(reply)
        log.info("round %d: exchanged with %s (slice %d), reply round %s", r, partner.peer_id[:16], partner.slice,
                 None if reply is None else reply.round)  # fmt: skip
        return True
