"""murmur's error tree: every exception murmur raises on purpose, in one place.

A remote peer's doing (or the network's):

    MurmurError
    ├── TransportError            the network failed us; the partner is skipped, not blamed
    │   ├── PeerTimeout           a deadline passed
    │   └── PeerUnreachable       connection refused, reset, TLS pin mismatch
    ├── IncompatibleVersion       the partner speaks another protocol major version
    ├── BannedPeer                we refuse this peer for a while
    └── ProtocolViolation         the partner sent something invalid; it is counted by `reason`
        ├── MalformedPayload      bytes that do not decode (garbage, truncated, bad lengths)
        ├── RejectedUpdate        decodes, but fails a check (shape, finiteness, signature, replay,
        │                         a round from the future...)
        ├── RateLimited           over a limit of protocol/limits.py (OVER_LIMIT), or the server is busy
        │                         (RATE_LIMITED)
        └── InvalidRecord         a DHT record that does not check (protocol/records.py)

Nobody's fault but the local set-up's, and the user's to fix; the ValueErrors are what every command
reports as one line:

    MurmurError
    ├── SetupError                a port taken, a path that cannot be written (also a ValueError)
    │   └── DataNotFound          a corpus or tokenizer path that is not there (also a FileNotFoundError)
    ├── IdentityFileError         an identity or TLS file that cannot be used or written (also a ValueError)
    ├── ManifestError             a manifest that cannot be used: forged, malformed, another swarm's
    │   ├── UntrustedOwner        signed by a key other than the one trusted for the swarm
    │   └── BadRunKey             a --run-key that is not a key (also a ValueError)
    ├── CheckpointError           a snapshot on disk that is unusable; it is skipped (also a ValueError)
    ├── ExportError               a checkpoint that cannot leave murmur as asked (`murmur export`, `sample`):
    │                             a shape no Hugging Face class computes, a tokenizer that does not match,
    │                             an output folder in the way (also a ValueError)
    └── DataError                 an input that `murmur prepare-data` cannot read, or a prepared dataset that
        │                         does not check: a malformed index.json, a missing extra (also a ValueError)
        └── CorruptShard          a shard whose bytes do not match the SHA-256 in its index.json

Lifecycle: what stops a process or a command that was running fine:

    MurmurError
    ├── DHTStartError             the DHT could not start (protocol/dht.py)
    ├── DHTStopped                the DHT process exited while a call waited on it
    ├── JoinInterrupted           SIGTERM/SIGINT while joining a swarm; the caller shuts down quietly
    └── DemoError                 `murmur demo` could not go on (also a RuntimeError)

Callers branch on the class (or `reason`), never on message text. The second bases keep older
`except ValueError` / `except RuntimeError` clauses catching what they always caught.
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    """Why an incoming message was refused; the label of the per-reason rejection counters."""

    GARBAGE = "garbage"
    OVERSIZE = "oversize"
    WRONG_SHAPE = "wrong_shape"
    WRONG_DTYPE = "wrong_dtype"
    NON_FINITE = "non_finite"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_PEER = "unknown_peer"
    WRONG_RUN = "wrong_run"
    REPLAY = "replay"
    FUTURE_ROUND = "future_round"
    """A round further ahead of the receiver's view of "now" than a live peer can be (peer/node/rounds.py)."""
    BANNED = "banned"
    RATE_LIMITED = "rate_limited"
    """The server is busy (downloads, payload buffers in flight): retry later or elsewhere; nobody is banned."""
    OVER_LIMIT = "over_limit"
    """The caller went over its calls or bytes per minute (protocol/limits.py); a proven peer is banned."""
    INCOMPATIBLE_VERSION = "incompatible_version"
    NOT_FOUND = "not_found"
    """A dataset file (FetchShard) the peer does not hold verified: ask another peer; nobody is blamed."""
    TIMEOUT = "timeout"
    """A stream took longer than the receiver allows (added by the wire: servers cap a call's time)."""
    OUTLIER = "outlier"
    """A partner's decoded term lies too far outside the clipping bound to be shrunk (peer/core/robust.py);
    refused by the outer step, never on the wire."""
    DISTRUSTED = "distrusted"
    """A sender whose terms kept being clipped or rejected, banned by partner trust (peer/node/trust.py); never
    on the wire."""


class MurmurError(Exception):
    """Base of every error murmur raises on purpose."""

    by_peer: bool = False
    """True when the partner raised it and sent it back (a refusal of ours it reports), not raised here."""


class SetupError(MurmurError, ValueError):
    """Something this process was told to use cannot be used (a port in use, an unwritable path); the message
    names it and what to do, and the CLI prints it as one line (a ValueError, like every bad input)."""


class TransportError(MurmurError):
    """The network failed; nobody is to blame and the partner is simply skipped this round."""


class PeerTimeout(TransportError):
    """A call's deadline passed."""


class PeerUnreachable(TransportError):
    """The partner could not be reached (refused, reset, or its TLS certificate did not match the pin)."""


class IncompatibleVersion(MurmurError):
    """The partner speaks a protocol major version we cannot talk to."""


class BannedPeer(MurmurError):
    """The peer is banned locally for a while after misbehaving."""


class ProtocolViolation(MurmurError):
    """The partner sent something invalid. `reason` labels the rejection counter."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class MalformedPayload(ProtocolViolation):
    """Bytes that do not decode: garbage, truncated, inconsistent lengths, oversize."""


class RejectedUpdate(ProtocolViolation):
    """A well-formed message that fails a check: shape, dtype, finiteness, signature, run, round."""


class RateLimited(ProtocolViolation):
    """Over a limit of protocol/limits.py: `Reason.OVER_LIMIT` (the caller's calls or bytes per minute; a proven
    peer is banned for it) or `Reason.RATE_LIMITED` (the server is busy; nobody is blamed, retry later)."""


class InvalidRecord(ProtocolViolation):
    """A DHT record that does not check: garbage, wrong tag, bad signature, wrong subkey, expired."""


class DataNotFound(SetupError, FileNotFoundError):
    """A corpus or tokenizer path that does not exist: a FileNotFoundError, and a SetupError (so a ValueError)
    that every command reports as one line."""


class IdentityFileError(MurmurError, ValueError):
    """An identity or TLS file exists but cannot be used (corrupt, wrong key type, unreadable), or a new one
    cannot be written where it was asked for."""


class ManifestError(MurmurError):
    """A manifest that cannot be used: forged, malformed, for another swarm or protocol, edited by hand."""


class UntrustedOwner(ManifestError):
    """The manifest is signed by a key other than the one this peer trusts for the swarm."""


class BadRunKey(ManifestError, ValueError):
    """A --run-key that is not an Ed25519 public key: a bad command-line value (ValueError) about trust."""


class CheckpointError(MurmurError, ValueError):
    """A snapshot on disk is unusable; the message says why (reported, then the snapshot is skipped)."""


class ExportError(MurmurError, ValueError):
    """A checkpoint cannot be exported or sampled as asked; the message names what and why, in one line."""


class DataError(MurmurError, ValueError):
    """An input file that cannot be read as text (missing, not JSON, no such column), a prepared dataset whose
    index.json does not check, or an optional package the input needs; the message names the file and the fix."""


class CorruptShard(DataError):
    """A shard's bytes differ from the SHA-256 its index.json names (a bad disk, a truncated copy, a lying
    peer): the shard is refused, never read; a downloader fetches it again from elsewhere."""


class DHTStartError(MurmurError):
    """The DHT could not start; the message names the cause and what to do."""


class DHTStopped(MurmurError):
    """The DHT process exited while a call waited on it (killed, or stopped by a signal to the process group)."""


class JoinInterrupted(MurmurError):
    """SIGTERM/SIGINT arrived while joining (e.g. waiting for a manifest); the caller shuts down quietly."""


class DemoError(MurmurError, RuntimeError):
    """The demo could not go on (a process failed or did not start); the message says which and why."""
