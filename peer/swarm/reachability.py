"""The probes behind admission (peer/swarm/admission.py): an Info call at an announced endpoint, in the background.

`Admission` is bookkeeping (who answered, who waits out a failure); this module makes the calls. A probe dials
the endpoint over TLS pinned to the certificate the signed announcement names, asks Info, and admits the peer
if it answers as itself, for this run. Probes run as tasks on the event loop, at most PROBES_AT_ONCE in flight,
each within PROBE_TIMEOUT_S; whatever happens to one (a refused port, a timeout, a bug of ours with one
stranger's bytes, a cancellation at shutdown), its outcome is recorded and its slot given back.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence

from peer.swarm.admission import PROBE_TIMEOUT_S, PROBES_AT_ONCE, Admission
from protocol.client import PeerClient
from protocol.errors import MurmurError
from protocol.identity import Identity
from protocol.logs import get_logger
from protocol.records import Announcement

log = get_logger(__name__)


class Prober:
    """Probes announced peers for an `Admission`. Event-loop only; `close()` cancels what is in flight."""

    def __init__(self, admission: Admission, identity: Identity, run_id: str,
                 announced: Callable[[], Sequence[Announcement]], rng: random.Random) -> None:  # fmt: skip
        self.admission, self.identity, self.run_id = admission, identity, run_id
        self.announced = announced
        """The peers announced right now (the daemon's peer list, refreshed from the DHT)."""
        self.rng = rng
        self.tasks: set[asyncio.Task] = set()

    def start(self) -> list[asyncio.Task]:
        """Start probes of announced, unadmitted peers (at most PROBES_AT_ONCE in flight); the started tasks."""
        room = PROBES_AT_ONCE - self.admission.probing()
        chosen = self.admission.to_probe(self.announced(), me=self.identity.peer_id, limit=room, rng=self.rng)
        started = [asyncio.get_running_loop().create_task(self._probe(peer)) for peer in chosen]
        for task in started:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return started

    async def admit_now(self, timeout_s: float = 2 * PROBE_TIMEOUT_S) -> None:
        """Probe announced peers until none is left unprobed or `timeout_s` passed: before the first round, so
        that slice, donors and partners are chosen among peers that answered."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while (started := self.start()) or self.tasks:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await asyncio.wait(started or set(self.tasks), timeout=left, return_when=asyncio.FIRST_COMPLETED)

    async def _probe(self, peer: Announcement) -> None:
        ok = False
        try:
            async with PeerClient.connect(
                peer.endpoint, peer_id=peer.peer_id, tls_fingerprint=peer.tls_fingerprint, identity=self.identity,
                tls_certificate=peer.tls_certificate or None, deadline=PROBE_TIMEOUT_S,
            ) as client:  # fmt: skip
                info = await asyncio.wait_for(client.info(), PROBE_TIMEOUT_S)
            ok = info.peer_id == peer.peer_id and info.run_id == self.run_id
        except (MurmurError, asyncio.TimeoutError) as exc:  # the client's errors, and our own wait_for's
            log.debug("probe of %s at %s failed: %r", peer.peer_id[:16], peer.endpoint, exc)
        except Exception:  # a bug of ours with one stranger's announcement must not stop admission
            log.exception("probe of %s at %s failed unexpectedly", peer.peer_id[:16], peer.endpoint)
        finally:  # also when cancelled: a probe slot is never lost
            self.admission.probed(peer.peer_id, ok)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
