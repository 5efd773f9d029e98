"""Late join: a peer that arrives while the swarm is training starts from weights several live donors agree on.

Without it a newcomer would mix freshly initialised weights into the swarm through the consensus term
and send pseudo-gradients computed from them (DESIGN.md section 4: "Late joiners stream the current
weights ... verify their hash, and start training from there"). A donor's signature proves who sent the
weights, not that they are honest (DESIGN.md section 5b: "A late joiner never trusts one donor"), so:

- `choose_donors`: random live peers that accept connections and have trained, so joiners do not all hit
  one donor (each donor also caps its concurrent downloads, protocol/service.py).
- `fetch_states`: up to MAX_DONORS states downloaded at once, each within its deadline; a failed download
  starts the next candidate, up to MAX_CANDIDATES in all. The donors' signed rounds are judged together,
  once a batch is in (one far-future round among three is refused; an honest newer snapshot is not).
  Signature and content hash are checked by `PeerClient.fetch_state`, and the wire refuses a state whose
  names or shapes are not the manifest's.
- `combine`: with 3 or more donors, the coordinate-wise (lower) median of their weights: per coordinate it
  lies between two honest values when at most one donor of three lies, however large the lie. With 2 the
  median would be their mean, which one liar steers at will; the donor whose weights have the lower held-out
  loss is taken instead (`pick_by_held_out_loss`). With 1 it is used, and the log says it was unchecked.
- The round: `agreed_round`, the lower median of the donors' snapshot rounds, so one donor claiming a far
  future round cannot move the joiner's clock.

The daemon then logs the held-out loss of what it adopted next to the losses the swarm announces
(`loss_check`), so a start far above the swarm's level is visible at once.

Donors serve a snapshot of phi taken every `SNAPSHOT_EVERY` rounds (encoding the full model each
round would cost a 124m peer ~0.5 GB of copying per round for a download that rarely comes).
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import torch

from peer.node.rounds import lower_median
from protocol.client import FetchedState, PeerClient
from protocol.errors import MurmurError
from protocol.identity import Identity
from protocol.logs import get_logger
from protocol.records import Announcement

log = get_logger(__name__)

SNAPSHOT_EVERY = 5
"""Rounds between two snapshots a donor serves."""
MAX_DONORS = 3
"""Donors whose states a late joiner combines: 3 is the fewest whose median one liar cannot steer."""
MAX_CANDIDATES = 2 * MAX_DONORS
"""Donors tried in all when some downloads fail, before settling for fewer (or the initial weights)."""
DOWNLOAD_BYTES_PER_S = 1 << 20
"""The slowest donor uplink a state download is given time for (8 Mbit/s): a 124m state (~0.5 GB in fp32)
gets ~8 minutes, the tiny preset's a few seconds, on top of the run's exchange timeout."""
FAR_ABOVE_NATS = 1.0
"""A start whose held-out loss is this far above the swarm's announced median loss is logged as suspect."""

HeldOutLoss = Callable[[Mapping[str, torch.Tensor]], float]
"""Validation loss of candidate weights (blocking; the daemon adopts them and evaluates)."""


def download_deadline(shapes: Mapping[str, tuple[int, ...]], exchange_timeout_s: float) -> float:
    """Seconds one state download may take: the run's exchange timeout plus the fp32 state at
    DOWNLOAD_BYTES_PER_S (an exchange moves one slice's update; a state is the whole model)."""
    return exchange_timeout_s + 4 * sum(math.prod(shape) for shape in shapes.values()) / DOWNLOAD_BYTES_PER_S


def choose_donors(
    peers: Sequence[Announcement], *, me: str, rng: random.Random, limit: int = MAX_DONORS
) -> list[Announcement]:
    """Up to `limit` random live peers that accept connections and have trained (round > 0)."""
    candidates = [p for p in peers if p.peer_id != me and not p.client_only and p.round > 0]
    rng.shuffle(candidates)
    return candidates[:limit]


AdmitRound = Callable[[str, int], bool]
"""`admit_round(sender, round)`: False refuses a state whose round is beyond what the swarm agrees on."""
NoteRound = Callable[[str, int], None]
"""`note_round(sender, round)`: remember a donor's signed round as its claim before any state is judged."""


async def fetch_state_from(
    donor: Announcement, *, identity: Identity, run_id: str, shapes: Mapping[str, tuple[int, ...]], timeout_s: float
) -> FetchedState | None:
    """`donor`'s state, intact and within `timeout_s`, or None (the failure is logged with its peer id)."""
    try:
        async with PeerClient.connect(
            donor.endpoint, peer_id=donor.peer_id, tls_fingerprint=donor.tls_fingerprint, identity=identity,
            tls_certificate=donor.tls_certificate or None, deadline=timeout_s,
        ) as client:  # fmt: skip
            return await asyncio.wait_for(
                client.fetch_state(shapes, run_id=run_id, public_key=donor.public_key), timeout_s
            )
    except (MurmurError, asyncio.TimeoutError) as exc:  # the client's errors, and our own wait_for's
        log.warning("late join: state download from %s at %s failed: %r", donor.peer_id[:16], donor.endpoint, exc)
        return None


async def fetch_initial_state(
    donors: Sequence[Announcement],
    *,
    identity: Identity,
    run_id: str,
    shapes: Mapping[str, tuple[int, ...]],
    timeout_s: float,
) -> FetchedState | None:
    """The first state a donor delivers intact, or None when nobody does (one donor's word: for `murmur eval`,
    which evaluates what a peer serves; a joining peer uses `fetch_states` and `combine`)."""
    for donor in donors:
        state = await fetch_state_from(donor, identity=identity, run_id=run_id, shapes=shapes, timeout_s=timeout_s)
        if state is not None:
            return state
    return None


async def fetch_states(
    candidates: Sequence[Announcement],
    *,
    identity: Identity,
    run_id: str,
    shapes: Mapping[str, tuple[int, ...]],
    timeout_s: float,
    wanted: int = MAX_DONORS,
    admit_round: AdmitRound | None = None,
    note_round: NoteRound | None = None,
) -> list[FetchedState]:
    """Up to `wanted` intact states from `candidates`, in the order they arrived.

    `wanted` downloads run at once, each within `timeout_s`; each failure starts the next candidate, so a
    dead or refusing donor costs one deadline, not the late join. Rounds are judged once a batch is in: every
    state's signed round is first noted as its donor's claim (`note_round`), then each is judged (`admit_round`,
    peer/node/rounds.py), so an honest donor whose snapshot is newer than the announcements is judged against
    the other donors' rounds, not against announcements a few seconds old (on small fast rounds those lag by
    more than the bound: a newcomer refused an honest donor that way, in CI). A refused state costs one
    deadline too. Fewer come back only when the candidates run out. All `wanted` states are held at once (the
    median needs them): `wanted` copies of the model.
    """
    queue = list(candidates)
    states: list[FetchedState] = []
    while queue and len(states) < wanted:
        batch = await _download(queue, wanted - len(states), identity=identity, run_id=run_id, shapes=shapes,
                                timeout_s=timeout_s)  # fmt: skip
        if note_round is not None:
            for state in batch:
                note_round(state.sender, state.round)
        states += [state for state in batch if _admitted(state, admit_round)]
    return states


async def _download(queue: list[Announcement], wanted: int, *, identity: Identity, run_id: str,
                    shapes: Mapping[str, tuple[int, ...]], timeout_s: float) -> list[FetchedState]:  # fmt: skip
    """Up to `wanted` states from the front of `queue` (popped as they start), `wanted` downloads at once."""
    running: set[asyncio.Task] = set()
    states: list[FetchedState] = []
    try:
        while queue or running:
            while queue and len(states) + len(running) < wanted:
                running.add(asyncio.ensure_future(fetch_state_from(
                    queue.pop(0), identity=identity, run_id=run_id, shapes=shapes, timeout_s=timeout_s)))  # fmt: skip
            if not running:
                break
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            states += [state for task in done if (state := task.result()) is not None]
    finally:
        for task in running:  # cancelled (a signal during the join): no download outlives the call
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    return states


def _admitted(state: FetchedState, admit_round: AdmitRound | None) -> bool:
    if admit_round is None or admit_round(state.sender, state.round):
        return True
    log.warning("late join: refused the state of %s: its round %d is from the future", state.sender[:16], state.round)
    return False


def agreed_round(rounds: Sequence[int]) -> int:
    """The round a joiner starts from: the lower median of its donors' snapshot rounds.

    Lower, not upper: with two donors the smaller one wins, so a liar can only make the joiner start behind
    (its Lamport clock catches up at its first exchange), never far ahead. A bound on how far ahead of the
    receiver a round may be (peer/node/rounds.py) can be applied to this result as to any other claim.
    """
    agreed = lower_median(rounds)
    if agreed is None:
        raise ValueError("no donor rounds to agree on")
    return agreed


def median_weights(states: Sequence[MutableMapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The coordinate-wise lower median of `states` (>= 3 donors' weights with the same names and shapes).

    Memory: tensor by tensor, each donor's copy of one tensor is stacked (k x that tensor), its median taken,
    and the donors' copies of it are dropped from `states` (which this call empties), so the peak is the k
    donors' models plus one stacked tensor and its median, not k + 1 models. With k = 3, per coordinate the
    result lies between the two honest values whatever the third sends; with an even k (4 or more) the lower
    of the two middle values is taken, which still lies between honest values while liars are fewer than k/2.
    """
    if len(states) < 3:
        raise ValueError(f"a median that one liar cannot steer needs 3 donors or more, not {len(states)}")
    names = list(states[0])
    if any(set(s) != set(names) for s in states):
        raise ValueError("the donors' states do not name the same tensors")
    result: dict[str, torch.Tensor] = {}
    for name in names:
        copies = [s.pop(name) for s in states]
        if any(c.shape != copies[0].shape for c in copies):
            raise ValueError(f"{name}: the donors' shapes differ: {sorted({tuple(c.shape) for c in copies})}")
        dtype = copies[0].dtype
        for c in copies[1:]:
            dtype = torch.promote_types(dtype, c.dtype)
        stacked = torch.stack([c.to(dtype) for c in copies])
        del copies
        result[name] = stacked.median(dim=0).values
        del stacked
    return result


def pick_by_held_out_loss(losses: Sequence[float]) -> int:
    """The index of the lowest finite held-out loss (the first on a tie); raises ValueError if none is finite.

    Two donors: their median is their mean, which a liar steers anywhere. Nothing in the weights says which
    donor is honest, but the held-out loss is what training is for: taking the lower one means a liar wins
    only by serving weights that do better on held-out data than the honest donor's (it cannot start the
    joiner worse than the honest donor would). Not proof against a backdoor invisible to the validation loss,
    nor against weights fitted to the held-out windows, which are public.
    """
    finite = [(loss, i) for i, loss in enumerate(losses) if math.isfinite(loss)]
    if not finite:
        raise ValueError("no donor's weights have a finite held-out loss")
    return min(finite)[1]


@dataclass(frozen=True, slots=True)
class Start:
    """Where a late joiner starts: the weights, the round, and what was done to get them."""

    weights: dict[str, torch.Tensor]
    round: int
    rule: str
    """How the weights were chosen, in words, for the log."""
    donors: tuple[tuple[str, int], ...]
    """(peer id, snapshot round) of every donor consulted, in arrival order."""

    def summary(self) -> str:
        """One log line; it starts "late join: fetched the weights of round R" (the round the clock takes)."""
        donors = ", ".join(f"{peer[:16]} (round {r})" for peer, r in self.donors)
        return (f"late join: fetched the weights of round {self.round} from {len(self.donors)} donor(s): {donors}; "
                f"{self.rule}")  # fmt: skip


def combine(states: Sequence[FetchedState], held_out_loss: HeldOutLoss) -> Start:
    """Weights and round from the donors' states (see the module docstring for the rule per donor count).

    Blocking tensor work (run it in a worker thread). `held_out_loss` is called only with two donors.
    With three or more the states' tensors are consumed by the median (`median_weights`).
    """
    if not states:
        raise ValueError("no donor states to combine")
    donors = tuple((s.sender, s.round) for s in states)
    round = agreed_round([s.round for s in states])
    if len(states) == 1:
        rule = ("only one donor delivered: its weights are used unchecked (no other donor to compare them with); "
                "one dishonest donor could have poisoned them")  # fmt: skip
        return Start(states[0].tensors, round, rule, donors)
    if len(states) == 2:
        losses = [held_out_loss(s.tensors) for s in states]
        best = pick_by_held_out_loss(losses)
        rule = (f"only two donors delivered (their median would be their mean, which one liar steers): took "
                f"{states[best].sender[:16]}'s, held-out loss {losses[best]:.4f} against "
                f"{losses[1 - best]:.4f}")  # fmt: skip
        return Start(states[best].tensors, round, rule, donors)
    weights = median_weights([s.tensors for s in states])
    rule = (f"started from their coordinate-wise median (one liar among {len(states)} cannot steer it) "
            f"at the lower median of their rounds")  # fmt: skip
    return Start(weights, round, rule, donors)


def loss_check(held_out: float, peers: Sequence[Announcement]) -> str:
    """One log line: the adopted weights' held-out loss next to the training losses the swarm announces.

    The two are not the same measure (announced: mean inner loss of a peer's last round, on its own data;
    held out: the validation windows every peer evaluates on), but a poisoned start is nats above either.
    """
    announced = sorted(p.loss for p in peers if p.round > 0 and math.isfinite(p.loss))
    line = f"late join: held-out loss of the adopted weights {held_out:.4f}"
    if not announced:
        return line + "; no peer announces a loss yet"
    median = statistics.median(announced)
    line += (f"; the swarm announces training losses {announced[0]:.4f}..{announced[-1]:.4f} "
             f"(median {median:.4f}, {len(announced)} peers)")  # fmt: skip
    if not math.isfinite(held_out) or held_out > median + FAR_ABOVE_NATS:
        line += f"; over {FAR_ABOVE_NATS:g} nat above the swarm's: the donors' weights may be poisoned"
    return line
