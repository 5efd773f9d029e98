"""DHT records of a swarm: which keys a swarm name maps to, and the signed values stored under them.

Keys (namespaced by `murmur`, versioned by the record format `v1`, then the swarm name):

    murmur/v1/<swarm>/manifest   subkey = run owner's public key (hex)  value = tagged SignedManifest
    murmur/v1/<swarm>/peers      subkey = peer id (hex)                 value = tagged SignedAnnouncement

Every value is a short tag followed by the proto bytes (`MANIFEST_TAG`, `ANNOUNCEMENT_TAG`): the two
proto messages share a layout, so the tag keeps one from being read as the other.

Contracts:
- A record is valid only when the key that signed it is the one its subkey names: an announcement under
  subkey P must be signed by the key whose hash is P, a manifest under subkey K by owner key K. So a
  record signed by another key can never replace a peer's (or an owner's) record; the most it can do is
  sit under its own signer's subkey, where readers see it for what it is.
- `RecordValidator` applies exactly these checks inside hivemind's DHT (on store and on fetch), and
  refuses anything that is not a murmur record: a murmur DHT holds murmur records only, which also stops
  a plain value from shadowing a swarm's dictionary.
- Readers verify again (`verify_announcement`), because a DHT node that skipped validation may answer.
  Verification never raises anything but `InvalidRecord`, whatever the bytes.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer

from protocol import PROTOCOL_MAJOR, protocol_major
from protocol._generated import murmur_pb2 as pb
from protocol.errors import InvalidRecord, Reason
from protocol.identity import (
    Identity,
    certificate_fingerprint,
    peer_id_from_public_key,
    verify,
    verify_tls_binding,
)

KEY_PREFIX = "murmur/v1"
MANIFEST_TAG = b"murmur/manifest/v1\0"
ANNOUNCEMENT_TAG = b"murmur/announce/v1\0"
# A DHT expiration may exceed the signed `expires_unix` by this much (clock skew between peers).
EXPIRY_SLACK_S = 30.0
# Values larger than this are refused before parsing (a manifest is a few hundred bytes).
MAX_RECORD_BYTES = 64 * 1024
_SWARM_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# libp2p protocol on which bootstrap nodes (and later peers) dial an announced endpoint on request:
# request SignedAnnouncement, reply InfoReply (what the endpoint answered; health "ok" or why not).
REACHABILITY_HANDLER = "murmur.v1.reachability"
# libp2p protocol on which bootstrap nodes tell a caller the IP its connection comes from:
# request InfoRequest, reply ObservedAddress.
OBSERVED_ADDRESS_HANDLER = "murmur.v1.observed_address"


def check_swarm_name(name: str) -> str:
    """Return `name` if it is a valid swarm name (lowercase letters, digits, '.', '_', '-'; <= 63)."""
    if not _SWARM_NAME.match(name):
        raise ValueError(
            f"invalid swarm name {name!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. tinystories-124m)"
        )
    return name


@dataclass(frozen=True, slots=True)
class SwarmKeys:
    """The DHT keys a swarm name maps to."""

    manifest: str
    peers: str


def swarm_keys(swarm: str) -> SwarmKeys:
    """The DHT keys of `swarm` (validated)."""
    check_swarm_name(swarm)
    return SwarmKeys(manifest=f"{KEY_PREFIX}/{swarm}/manifest", peers=f"{KEY_PREFIX}/{swarm}/peers")


@dataclass(frozen=True, slots=True)
class Announcement:
    """A verified peer announcement (the fields of PeerAnnouncement, typed)."""

    peer_id: str
    public_key: bytes
    run_id: str
    endpoint: str
    tls_fingerprint: str
    tls_certificate: bytes
    """PEM, so a client can pin without probing (empty when the peer did not include it)."""
    slice: int
    round: int
    tokens_per_second: float
    loss: float
    software_version: str
    protocol_version: str
    expires_unix: float
    bytes_sent: int = 0
    bytes_received: int = 0
    """Payload bytes since the peer started (0 from a peer that does not say)."""

    @property
    def client_only(self) -> bool:
        """True for a peer that accepts no connections (it initiates every exchange itself)."""
        return not self.endpoint

    def to_json(self) -> dict:
        """The fields `murmur status --json` prints (NaN loss becomes null)."""
        return {
            "peer_id": self.peer_id,
            "endpoint": self.endpoint or None,
            "client_only": self.client_only,
            "slice": self.slice,
            "round": self.round,
            "tokens_per_s": self.tokens_per_second,
            "loss": self.loss if math.isfinite(self.loss) else None,
            "version": self.software_version,
            "protocol_version": self.protocol_version,
            "run_id": self.run_id,
            "tls_fingerprint": self.tls_fingerprint,
            "expires_unix": self.expires_unix,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }


def sign_announcement(
    identity: Identity,
    *,
    run_id: str,
    endpoint: str,
    slice_index: int,
    round: int,
    tokens_per_second: float,
    loss: float,
    software_version: str,
    protocol_version: str,
    expires_unix: float,
    bytes_sent: int = 0,
    bytes_received: int = 0,
) -> bytes:
    """The DHT value announcing `identity`: tag + SignedAnnouncement, signed by the identity."""
    message = pb.PeerAnnouncement(
        peer_id=identity.peer_id,
        public_key=identity.public_key,
        run_id=run_id,
        endpoint=endpoint,
        tls_fingerprint=identity.tls_fingerprint,
        tls_binding=identity.tls_binding,
        tls_certificate=identity.tls_cert_pem,
        slice=slice_index,
        round=round,
        tokens_per_second=tokens_per_second,
        loss=loss,
        software_version=software_version,
        protocol_version=protocol_version,
        expires_unix=math.ceil(expires_unix),
        bytes_sent=bytes_sent,
        bytes_received=bytes_received,
    )
    body = message.SerializeToString(deterministic=True)
    signed = pb.SignedAnnouncement(announcement=body, signature=identity.sign(ANNOUNCEMENT_TAG + body))
    return ANNOUNCEMENT_TAG + signed.SerializeToString(deterministic=True)


def _untag(value: object, tag: bytes) -> bytes:
    if not isinstance(value, bytes):
        raise InvalidRecord(Reason.GARBAGE, f"record value is {type(value).__name__}, not bytes")
    if len(value) > MAX_RECORD_BYTES:
        raise InvalidRecord(Reason.OVERSIZE, f"record of {len(value)} bytes (max {MAX_RECORD_BYTES})")
    if not value.startswith(tag):
        raise InvalidRecord(Reason.GARBAGE, f"record does not start with {tag!r}")
    return value[len(tag) :]


class _Verdicts:
    """What `_check_announcement` said about the last MAX_VERDICTS distinct values, by their SHA-256.

    Why: every DHT read returns every announcement of the swarm, and each is checked twice (by the DHT process's
    RecordValidator, and by the reader), Ed25519 twice and an X.509 parse each time. With a few hundred
    announcements (a flood of fakes, or a big swarm) that cost a loaded peer seconds per refresh, long enough
    for its own announcement to expire between two refreshes. The same bytes always get the same verdict, so
    it is computed once. Thread-safe (the daemon reads the DHT from worker threads).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._seen: OrderedDict[bytes, Announcement | InvalidRecord] = OrderedDict()

    def verdict(self, value: bytes) -> Announcement | InvalidRecord:
        key = hashlib.sha256(value).digest()
        with self._lock:
            held = self._seen.get(key)
            if held is not None:
                self._seen.move_to_end(key)
                return held
        try:
            verdict: Announcement | InvalidRecord = _check_announcement(value)
        except InvalidRecord as exc:
            verdict = exc
        with self._lock:
            self._seen[key] = verdict
            while len(self._seen) > self.size:
                self._seen.popitem(last=False)
        return verdict


MAX_VERDICTS = 4096
"""Announcement verdicts remembered per process (a few MB at most)."""
_VERDICTS = _Verdicts(MAX_VERDICTS)


def verify_announcement(value: object, *, subkey: object = None, now: float | None = None) -> Announcement:
    """Parse and check an announcement value; raise InvalidRecord on any failure.

    Checks: tag, proto, peer id = hash(public key), signature by that key over tag + announcement bytes,
    TLS binding, subkey = peer id (when given), protocol major, and expiry (when `now` is given). The checks
    that depend on the bytes alone are done once per distinct value (`_Verdicts`).
    """
    if not isinstance(value, bytes):
        raise InvalidRecord(Reason.GARBAGE, f"record value is {type(value).__name__}, not bytes")
    verdict = _VERDICTS.verdict(value)
    if isinstance(verdict, InvalidRecord):  # a fresh one each time: a re-raised instance keeps growing its traceback
        raise InvalidRecord(verdict.reason, verdict.detail)
    if subkey is not None and subkey != verdict.peer_id:
        raise InvalidRecord(
            Reason.BAD_SIGNATURE, f"announcement of {verdict.peer_id[:16]} stored under {subkey!r:.24}"
        )
    if now is not None and verdict.expires_unix < now:
        raise InvalidRecord(
            Reason.REPLAY, f"announcement of {verdict.peer_id[:16]} expired {now - verdict.expires_unix:.0f}s ago"
        )
    return verdict


def _check_announcement(value: bytes) -> Announcement:
    """Every check of `verify_announcement` that depends on the bytes alone (not on subkey or time)."""
    body = _untag(value, ANNOUNCEMENT_TAG)
    try:
        signed = pb.SignedAnnouncement.FromString(body)
        ann = pb.PeerAnnouncement.FromString(signed.announcement)
    except DecodeError as exc:
        raise InvalidRecord(Reason.GARBAGE, f"announcement does not parse: {exc}") from exc
    try:
        peer_id = peer_id_from_public_key(ann.public_key)
    except ValueError as exc:
        raise InvalidRecord(Reason.BAD_SIGNATURE, str(exc)) from exc
    if ann.peer_id != peer_id:
        raise InvalidRecord(Reason.BAD_SIGNATURE, f"peer id {ann.peer_id[:16]} is not the hash of its key")
    if not verify(ann.public_key, ANNOUNCEMENT_TAG + signed.announcement, signed.signature):
        raise InvalidRecord(Reason.BAD_SIGNATURE, f"announcement of {peer_id[:16]} has a bad signature")
    if not verify_tls_binding(ann.public_key, ann.tls_fingerprint, ann.tls_binding):
        raise InvalidRecord(Reason.BAD_SIGNATURE, f"{peer_id[:16]} does not vouch for its TLS fingerprint")
    if ann.tls_certificate and _fingerprint_or_none(ann.tls_certificate) != ann.tls_fingerprint:
        raise InvalidRecord(Reason.BAD_SIGNATURE, f"{peer_id[:16]}'s certificate does not match its fingerprint")
    if protocol_major(ann.protocol_version) != PROTOCOL_MAJOR:
        raise InvalidRecord(Reason.INCOMPATIBLE_VERSION, f"{peer_id[:16]} speaks protocol {ann.protocol_version}")
    return Announcement(
        peer_id=peer_id,
        public_key=ann.public_key,
        run_id=ann.run_id,
        endpoint=ann.endpoint,
        tls_fingerprint=ann.tls_fingerprint,
        tls_certificate=ann.tls_certificate,
        slice=ann.slice,
        round=ann.round,
        tokens_per_second=ann.tokens_per_second,
        loss=ann.loss,
        software_version=ann.software_version,
        protocol_version=ann.protocol_version,
        expires_unix=float(ann.expires_unix),
        bytes_sent=ann.bytes_sent,
        bytes_received=ann.bytes_received,
    )


def _fingerprint_or_none(cert: bytes) -> str | None:
    try:
        return certificate_fingerprint(cert)
    except ValueError:
        return None


def encode_manifest_record(signed_manifest: bytes) -> bytes:
    """The DHT value of a manifest: tag + serialised SignedManifest."""
    return MANIFEST_TAG + signed_manifest


def manifest_record_signer(value: object) -> tuple[bytes, bytes]:
    """(SignedManifest bytes, owner key) of a manifest value whose signature checks; InvalidRecord otherwise.

    Only the signature is checked here; what the manifest says is protocol/manifest.py's business.
    """
    body = _untag(value, MANIFEST_TAG)
    try:
        signed = pb.SignedManifest.FromString(body)
    except DecodeError as exc:
        raise InvalidRecord(Reason.GARBAGE, f"manifest record does not parse: {exc}") from exc
    if not verify(signed.owner_public_key, signed.manifest, signed.signature):
        raise InvalidRecord(Reason.BAD_SIGNATURE, "manifest record has a bad signature")
    return body, signed.owner_public_key


def check_record(subkey: object, value: object, expiration_time: float) -> None:
    """The DHT-layer rule for one (subkey, value): signed by the key the subkey names; InvalidRecord if not."""
    if not isinstance(subkey, str) or not _HEX64.match(subkey):
        raise InvalidRecord(Reason.GARBAGE, "murmur records live under a 64-hex subkey")
    if isinstance(value, bytes) and value.startswith(MANIFEST_TAG):
        _, owner = manifest_record_signer(value)
        if owner.hex() != subkey:
            raise InvalidRecord(Reason.BAD_SIGNATURE, "manifest stored under another owner's subkey")
        return
    ann = verify_announcement(value, subkey=subkey)
    if expiration_time > ann.expires_unix + EXPIRY_SLACK_S:
        raise InvalidRecord(Reason.REPLAY, "DHT expiration outlives the signed expiry")


class RecordValidator(RecordValidatorBase):
    """hivemind validator that admits only murmur records whose signer matches their subkey.

    Pass it to every murmur DHT (peers and bootstrap nodes): stores of forged records are refused by
    honest nodes, and forged answers from dishonest ones are dropped on fetch.
    """

    def validate(self, record: DHTRecord) -> bool:
        """True for a valid murmur dictionary record; False for anything else, never raising."""
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
        except Exception:  # msgpack raises many exception types on hostile bytes; each means "not ours"
            return False
        try:
            check_record(subkey, value, record.expiration_time)
        except InvalidRecord:
            return False
        return True
