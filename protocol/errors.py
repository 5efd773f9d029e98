"""murmur's error tree: every failure a remote peer can cause, in one place.

    MurmurError
    ├── TransportError            the network failed us; the partner is skipped, not blamed
    │   ├── PeerTimeout           a deadline passed
    │   └── PeerUnreachable       connection refused, reset, TLS pin mismatch
    ├── IncompatibleVersion       the partner speaks another protocol major version
    ├── BannedPeer                we refuse this peer for a while
    └── ProtocolViolation         the partner sent something invalid; it is counted by `reason`
        ├── MalformedPayload      bytes that do not decode (garbage, truncated, bad lengths)
        └── RejectedUpdate        decodes, but fails a check (shape, finiteness, signature, replay,
                                  a round from the future...)

One more branch is nobody's fault but the local set-up's, and the user's to fix:

    MurmurError
    └── SetupError                a port taken, a path that cannot be written, a file that is not there;
                                  also a ValueError, so every command reports it as one line

Callers branch on the class (or `reason`), never on message text.
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
    TIMEOUT = "timeout"
    """A stream took longer than the receiver allows (added by the wire: servers cap a call's time)."""


class MurmurError(Exception):
    """Base of every error murmur raises on purpose."""


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
