"""A prepared dataset where the manifest says it is: index.json, tokenizer.json and only the shards a peer's own
stream reaches, fetched into a local cache and checked against the manifest's dataset id.

Why lazily: a run's dataset can be terabytes and a volunteer's disk is not; its stream needs about S/K + 1 of K
shards an epoch (peer/core/shard_plan.py), so it fetches those before the round that first reads them and the
next round's while this one trains. Why the chain of hashes: the signed manifest names the dataset id (SHA-256
of index.json), index.json names the SHA-256 of the tokenizer and of every shard, so whoever serves the files
(a CDN, a mirror, a peer) needs no trust: a file whose hash differs is fetched again and, after a few tries,
refused in one line.

Cache layout (CACHE = $MURMUR_CACHE, else $XDG_CACHE_HOME/murmur, else ~/.cache/murmur):

    CACHE/datasets/<dataset id>/index.json, tokenizer.json, shard-00000.bin, ..., heldout.bin
    CACHE/datasets/<dataset id>/<name>.partial      a download in progress, resumed with an HTTP Range request

A file gets its final name only after its SHA-256 matched (an atomic rename of the .partial), so a complete
name in the cache is a verified file; it is hashed once more per process when first used, which also catches
a disk that changed it. HTTP is the standard library's urllib, called from the trainer's thread (or a prefetch
thread), never from the event loop. Retries: a server that is down, times out or cuts a transfer short is tried
again after 1, 2, 4 ... s (at most `max_wait_s`), one warning line each, resuming where the bytes stopped;
a file that does not verify is fetched again from scratch, `corrupt_tries` times at most.

A `location` that is a local folder (a path, or file://) is opened where it is: nothing is copied.

Peers as a second source (peer/core/fetch_peers.py): when the server fails a file (down, a 4xx, or bytes that
do not verify), the fetcher asks the run's live peers for it by SHA-256 before it waits to try the server again;
HTTP stays the first choice while it works. Once the server failed a whole retry policy, it counts as gone for
`GONE_S`: files then come from peers only, and a file nobody has fails at once (DataError) instead of waiting
out the policy again for every file. Where each file came from is logged.

A peer's own shards held by nobody (the server gone, no peer reached that part of the data):
peer/core/fetch_peers.py `stream_for_round` trains that round on another stream whose shards can be had, the
first in an order keyed by (own stream, round) (peer/core/shard_plan.py `fallback_streams`), or failing that on a
later round's windows that the cache holds; so the choice is reproducible, and its own stream, tried first every
round, is back as soon as its shards are. It costs diversity (windows another stream trains too), never correctness.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peer.core.data import Corpus
from peer.core.fetch_peers import FetchStopped, PeerList, from_peers
from peer.core.shards import INDEX_NAME, MAX_INDEX_BYTES, DatasetIndex, PreparedDataset, sha256_file
from protocol.errors import CorruptShard, DataError, DataNotFound
from protocol.logs import get_logger

log = get_logger(__name__)

MAX_STREAMS = 1024
"""The most streams a run's data is cut into: more peers than this share streams (two peers on one stream
train on the same windows, which costs diversity, not correctness)."""
_CHUNK = 1 << 20
GONE_S = 300.0
"""How long a server that failed a whole retry policy is skipped (files come from peers), before it is tried again."""
_URL_SCHEMES = ("http://", "https://")


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """How hard to try: `down_tries` transfers without progress before a server counts as gone, waits doubling
    from `first_wait_s` to `max_wait_s` between them; `corrupt_tries` complete downloads that fail their SHA-256
    before a file counts as wrong at the source."""

    down_tries: int = 12
    corrupt_tries: int = 3
    first_wait_s: float = 1.0
    max_wait_s: float = 60.0
    timeout_s: float = 30.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The defaults, or MURMUR_FETCH_TRIES / MURMUR_FETCH_WAIT_S (down_tries, first_wait_s) where set: what
        a test (or an impatient volunteer) shortens; max_wait_s follows first_wait_s (at most 60x it)."""
        tries, wait = os.environ.get("MURMUR_FETCH_TRIES"), os.environ.get("MURMUR_FETCH_WAIT_S")
        default = cls()
        try:
            first = float(wait) if wait else default.first_wait_s
            policy = cls(down_tries=int(tries) if tries else default.down_tries, first_wait_s=first,
                         max_wait_s=min(default.max_wait_s, 60 * first))  # fmt: skip
        except ValueError:
            raise DataError(f"MURMUR_FETCH_TRIES={tries!r} / MURMUR_FETCH_WAIT_S={wait!r}: not numbers") from None
        if policy.down_tries < 1 or policy.first_wait_s < 0:
            raise DataError("MURMUR_FETCH_TRIES must be >= 1 and MURMUR_FETCH_WAIT_S >= 0")
        return policy


def cache_root() -> Path:
    """$MURMUR_CACHE, else $XDG_CACHE_HOME/murmur, else ~/.cache/murmur."""
    if os.environ.get("MURMUR_CACHE"):
        return Path(os.environ["MURMUR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "murmur"


def is_url(location: str) -> bool:
    """Whether `location` is fetched over HTTP (http:// or https://) rather than read from this machine."""
    return location.startswith(_URL_SCHEMES)


def local_folder(location: str) -> Path:
    """The folder a file:// URL or a plain path names."""
    if location.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(location).path))
    return Path(location).expanduser()


def _url(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + urllib.parse.quote(name)


def read_index(location: str, timeout_s: float = 30.0) -> tuple[DatasetIndex, str]:
    """The checked index.json of the dataset at `location` and its dataset id (SHA-256 of its bytes): what
    `murmur create-run --data` signs. One try; a DataError names the location and what went wrong."""
    if is_url(location):
        url = _url(location, INDEX_NAME)
        try:
            with urllib.request.urlopen(_request(url), timeout=timeout_s) as response:
                raw = response.read(MAX_INDEX_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise DataError(f"cannot read {url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise DataError(f"cannot read {url}: {_reason(exc)}") from None
        if len(raw) > MAX_INDEX_BYTES:
            raise DataError(f"{url}: larger than {MAX_INDEX_BYTES >> 20} MiB, not an index")
        return DatasetIndex.parse(raw, url), hashlib.sha256(raw).hexdigest()
    folder = local_folder(location)
    if not folder.is_dir():
        raise DataNotFound(f"no prepared dataset at {location} (not a folder, nor an http(s):// URL)")
    dataset = PreparedDataset.open(folder)
    return dataset.index, dataset.dataset_id


def _request(url: str, start: int = 0) -> urllib.request.Request:
    headers = {"User-Agent": "murmur"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.Request(url, headers=headers)


def _reason(exc: BaseException) -> str:
    """One line for a transport failure: urllib wraps the socket error in `reason`."""
    reason = getattr(exc, "reason", None) or exc
    return str(reason).splitlines()[0] if str(reason) else type(reason).__name__


class _Transient(Exception):
    """A transfer that may work if tried again: server down, timeout, 5xx, cut short."""


class DatasetFetcher:
    """The cached copy of the dataset at `location` (an http(s) URL) with id `dataset_id`; see the module
    docstring. Thread-safe: the trainer's thread and one prefetch thread call `ensure` together."""

    def __init__(self, location: str, dataset_id: str, *, cache: Path | None = None,
                 retry: RetryPolicy | None = None, peers: PeerList | None = None) -> None:  # fmt: skip
        """`peers`: the run's live peers to ask when the server fails a file (None: the server only)."""
        self.location, self.dataset_id, self.peers = location, dataset_id, peers
        self.root = (cache if cache is not None else cache_root()) / "datasets" / dataset_id
        self.retry = retry or RetryPolicy.from_env()
        self.dataset: PreparedDataset | None = None
        self._lock = threading.Lock()
        self._done: set[str] = set()
        self._names = {dataset_id: INDEX_NAME}
        """SHA-256 -> file name of every file of the dataset: what `lookup` may serve."""
        self._gone_until = 0.0

    def lookup(self, sha256: str) -> Path | None:
        """The file of this dataset with this SHA-256 if it is in the cache and verified, else None: what this
        peer serves to others (protocol/shard_service.py). Lock-free (the event loop calls it): `_done` only
        grows, and a name enters it after its file got its final, verified name."""
        name = self._names.get(sha256)
        return self.root / name if name is not None and name in self._done else None

    def holds(self, names: Iterable[str]) -> bool:
        """Whether every file of `names` is in the cache (verified, or from an earlier run: `ensure` checks it)."""
        return all(name in self._done or (self.root / name).is_file() for name in names)

    def open(self, stop: threading.Event | None = None) -> PreparedDataset:
        """index.json (checked against the dataset id) and tokenizer.json (against the index), fetched unless
        cached; the dataset, its shards still where they are."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot make the dataset cache {self.root}: {exc.strerror or exc} "
                            "(set MURMUR_CACHE to another folder)") from None  # fmt: skip
        with self._lock:
            self._have(INDEX_NAME, self.dataset_id, None, stop)
        dataset = PreparedDataset.open(self.root, dataset_id=self.dataset_id)
        index = dataset.index
        self._names.update({s.sha256: s.name for s in (*index.train, index.heldout)})
        if index.tokenizer_file is not None:
            self._names[index.tokenizer] = index.tokenizer_file
            with self._lock:
                self._have(dataset.index.tokenizer_file, dataset.index.tokenizer, None, stop)
        self.dataset = dataset
        return dataset

    def ensure(self, names: Iterable[str], stop: threading.Event | None = None, *, patient: bool = True) -> None:
        """Every shard of `names` on disk and verified (fetched when missing); raises DataError when one cannot
        be had (server gone, file wrong at the source, no peer has it) and FetchStopped when `stop` is set while
        it waits. Not `patient`: one try at the server and one pass over the peers, no waiting."""
        assert self.dataset is not None, "open first"
        index = self.dataset.index
        shards = {s.name: s for s in (*index.train, index.heldout)}
        for name in names:
            info = shards[name]
            with self._lock:
                if name in self._done:
                    continue
                self._have(name, info.sha256, info.tokens * np.dtype(index.dtype).itemsize, stop, patient)
                self.dataset.verified(name)

    def _have(self, name: str, sha256: str, size: int | None, stop: threading.Event | None,
              patient: bool = True) -> None:  # fmt: skip
        """`name` in the cache with this SHA-256: kept if it is already there and checks, else downloaded."""
        path = self.root / name
        if path.is_file():
            if (size is None or path.stat().st_size == size) and sha256_file(path) == sha256:
                self._done.add(name)
                return
            log.warning("dataset cache: %s differs from its SHA-256 in the index; fetching it again", path)
            path.unlink()
        self._download(name, sha256, size, stop, patient)
        self._done.add(name)

    def _download(self, name: str, sha256: str, size: int | None, stop: threading.Event | None,
                  patient: bool = True) -> None:  # fmt: skip
        """The server first, while it works; the peers whenever it fails; waits between tries (see the module
        docstring). DataError (CorruptShard for bytes that never verify) once neither has the file."""
        url = _url(self.location, name)
        partial = self.root / f"{name}.partial"
        down = corrupt = 0
        while True:
            problem = "the server failed its last tries"
            if time.monotonic() >= self._gone_until:
                before = partial.stat().st_size if partial.exists() else 0
                try:
                    if self._from_server(url, partial, size, sha256):
                        return
                    corrupt += 1
                    problem = f"SHA-256 differs from the index's {sha256[:16]}…"
                except _Transient as exc:
                    grew = (partial.stat().st_size if partial.exists() else 0) > before
                    down, problem = (1 if grew else down + 1), str(exc)  # progress starts the count again
                except DataNotFound as exc:
                    down, problem = self.retry.down_tries, str(exc)  # a 4xx: another try will not change it
            if self.peers is not None and (peer := from_peers(self.peers, name, sha256, size, partial)):
                os.replace(partial, self.root / name)
                log.info("dataset: %s from peer %s (SHA-256 verified; the server: %s)", name, peer, problem)
                return
            self._give_up_or_wait(url, problem, down, corrupt, patient, stop)

    def _from_server(self, url: str, partial: Path, size: int | None, sha256: str) -> bool:
        """One transfer from the server; True when `partial` then verified and took the file's name."""
        self._transfer(url, partial, size)
        found = sha256_file(partial)
        if found == sha256:
            os.replace(partial, partial.with_suffix(""))
            self._gone_until = 0.0
            return True
        partial.unlink()
        log.warning("dataset: %s does not match its SHA-256 (%s… served, %s… expected): refused", url, found[:16],
                    sha256[:16])  # fmt: skip
        return False

    def _give_up_or_wait(self, url: str, problem: str, down: int, corrupt: int, patient: bool,
                         stop: threading.Event | None) -> None:  # fmt: skip
        """Raise once the retry policy is spent (or at once while the server counts as gone, or when not
        `patient`), else wait before the next try; FetchStopped when `stop` is set while waiting."""
        peers = "" if self.peers is None else "; no peer has it either"
        if corrupt >= self.retry.corrupt_tries:
            raise CorruptShard(f"{url}: {problem} in {corrupt} downloads; the file served there is not the one the "
                               f"run names{peers}")  # fmt: skip
        gone = time.monotonic() < self._gone_until
        if down >= self.retry.down_tries:
            self._gone_until = time.monotonic() + GONE_S
        if gone or down >= self.retry.down_tries or not patient:
            tries = f", {down} tries in a row" if down else ""
            raise DataError(f"cannot fetch {url}: {problem}{tries}{peers}; is the dataset still served there?")
        if not down:
            return  # a corrupt download: fetch again at once
        wait = min(self.retry.max_wait_s, self.retry.first_wait_s * 2 ** (down - 1))
        log.warning("dataset: %s: %s; trying again in %.3gs (%d of %d)", url, problem, wait, down + 1,
                    self.retry.down_tries)  # fmt: skip
        if (stop or threading.Event()).wait(wait):
            raise FetchStopped(f"stopped while fetching {url}") from None

    def _transfer(self, url: str, partial: Path, size: int | None) -> None:
        """Append the rest of `url` to `partial` (a Range request from its length); _Transient if the server
        is down or the bytes stop early, DataNotFound for a 4xx that another try will not change."""
        have = partial.stat().st_size if partial.exists() else 0
        if size is not None and have > size:
            partial.unlink()
            have = 0
        if size is not None and have == size:
            return
        status = None
        try:
            with urllib.request.urlopen(_request(url, have), timeout=self.retry.timeout_s) as response:
                if have and response.status != 206:  # the server ignored the Range: start over
                    have = 0
                with partial.open("ab" if have else "wb") as f:
                    while chunk := response.read(_CHUNK):
                        f.write(chunk)
                        if size is not None and f.tell() > size:
                            break  # longer than the index says: the hash will refuse it
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise _Transient(_reason(exc)) from None
        if status == 416:  # the partial is no prefix of what is served now
            partial.unlink(missing_ok=True)
            raise _Transient("HTTP 416 (the partial download does not fit; starting over)")
        if status is not None and (status >= 500 or status in (408, 429)):
            raise _Transient(f"HTTP {status}")
        if status is not None:
            raise DataNotFound(f"cannot fetch {url}: HTTP {status}")
        got = partial.stat().st_size if partial.exists() else 0
        if size is not None and got < size:
            raise _Transient(f"the transfer stopped at {got} of {size} bytes")


def num_streams(windows: int, windows_per_round: int) -> int:
    """S, the streams a run's training windows are cut into. The same for every peer of a run, since it depends
    only on the index (`windows` of seq_len + 1 tokens) and the manifest (`windows_per_round`: steps per round
    times the run's batch per optimiser step, micro-batch times accumulation), never on a peer's own split of
    that batch. Each stream keeps at least two rounds' windows an epoch, so that a round reads one slice of
    about K/S + 1 shards (not a new slice every few steps, which would fetch every shard of a small dataset
    within a round); at most MAX_STREAMS, so a large dataset is cut fine enough for that many peers on disjoint
    data, each fetching a couple of shards an epoch."""
    return max(1, min(MAX_STREAMS, windows // (2 * max(1, windows_per_round))))


def open_dataset(location: str, dataset_id: str | None, stop: threading.Event | None = None, *,
                 cache: Path | None = None, peers: PeerList | None = None,
                 ) -> tuple[PreparedDataset, DatasetFetcher | None]:  # fmt: skip
    """The dataset a manifest names: opened in place when local (its id checked when given), else through a
    fetcher on the cache (index and tokenizer fetched now, shards by `fetcher.ensure`), asking `peers` for
    what the server fails."""
    if not is_url(location):
        return PreparedDataset.open(local_folder(location), dataset_id=dataset_id), None
    if dataset_id is None:
        raise DataError(f"{location}: a dataset fetched over HTTP needs the dataset id the manifest names")
    fetcher = DatasetFetcher(location, dataset_id, cache=cache, peers=peers)
    return fetcher.open(stop), fetcher


def heldout_corpus(dataset: PreparedDataset, fetcher: DatasetFetcher | None, name: str,
                   stop: threading.Event | None = None) -> Corpus:  # fmt: skip
    """The held-out shard as a Corpus with no training tokens: what evaluation reads (peer/core/evaluation.py
    `val_loss` takes the same windows of it as `PreparedDataset.heldout_batches`)."""
    held = dataset.index.heldout.name
    if fetcher is not None:
        fetcher.ensure([held], stop)
    val = torch.from_numpy(np.asarray(dataset.shard(held)).astype(np.int32))
    return Corpus(name=name, train=torch.empty(0, dtype=torch.int32), val=val, vocab_size=dataset.index.vocab_size,
                  tokenizer=dataset.tokenizer())  # fmt: skip


def with_dataset(config: dict[str, Any]) -> dict[str, Any]:
    """A run config (the TOML layout of peer/config.py) whose [data] location names a prepared dataset, with
    what the manifest signs about it filled in from its index.json: dataset_id, tokenizer, and [model]
    vocab_size (the dataset's, unless the config sets it: then they must agree). `murmur create-run` calls
    this on the owner's machine, which must reach the location; DataError names a mismatch in one line."""
    section = dict(config.get("data", {}))
    location = section.get("location")
    if not location:
        return config
    if not is_url(location):
        location = str(local_folder(location).resolve())  # peers on this machine may start elsewhere
    index, dataset_id = read_index(location)
    if section.get("dataset_id") not in (None, "", dataset_id):
        raise DataError(f"the dataset at {location} is {dataset_id}, but [data] dataset_id says "
                        f"{section['dataset_id']}")  # fmt: skip
    if section.get("tokenizer") not in (None, index.tokenizer):
        raise DataError(f"the dataset at {location} was tokenised with {index.tokenizer}, but [data] tokenizer "
                        f"says {section['tokenizer']}")  # fmt: skip
    model = dict(config.get("model", {}))
    if model.get("vocab_size", index.vocab_size) != index.vocab_size:
        raise DataError(f"the dataset at {location} has a vocabulary of {index.vocab_size} tokens, but [model] "
                        f"vocab_size is {model['vocab_size']}; drop vocab_size to follow the dataset")  # fmt: skip
    model["vocab_size"] = index.vocab_size
    section.update(location=location, dataset_id=dataset_id, tokenizer=index.tokenizer)
    return {**config, "data": section, "model": model}
