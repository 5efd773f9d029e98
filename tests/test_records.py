"""DHT records: keys, signed announcements, and the validator that refuses forgeries."""

from __future__ import annotations

import math
import time

import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer

from protocol import PROTOCOL_VERSION
from protocol._generated import murmur_pb2 as pb
from protocol.errors import InvalidRecord
from protocol.identity import Identity
from protocol.records import (
    ANNOUNCEMENT_TAG,
    Announcement,
    RecordValidator,
    check_record,
    encode_manifest_record,
    sign_announcement,
    swarm_keys,
    verify_announcement,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def mallory() -> Identity:
    return Identity.generate()


def announce(identity: Identity, *, expires: float | None = None, endpoint: str = "127.0.0.1:7000", **kw) -> bytes:
    fields = dict(run_id="ab" * 32, endpoint=endpoint, slice_index=2, round=7, tokens_per_second=1234.5,
                  loss=3.25, software_version="0.1.0", protocol_version=PROTOCOL_VERSION,
                  expires_unix=expires if expires is not None else time.time() + 60)  # fmt: skip
    fields.update(kw)
    return sign_announcement(identity, **fields)


def record(subkey: object, value: object, expiration: float) -> DHTRecord:
    return DHTRecord(b"k" * 20, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), expiration)


def test_keys_are_namespaced_versioned_and_validated() -> None:
    keys = swarm_keys("tinystories-124m")
    assert keys.manifest == "murmur/v1/tinystories-124m/manifest"
    assert keys.peers == "murmur/v1/tinystories-124m/peers"
    for bad in ("", "Upper", "a/b", "-x", "x" * 64, "sp ace"):
        with pytest.raises(ValueError, match="invalid swarm name"):
            swarm_keys(bad)


def test_announcement_round_trips_every_field(alice: Identity) -> None:
    ann = verify_announcement(announce(alice), subkey=alice.peer_id, now=time.time())
    assert ann.peer_id == alice.peer_id and ann.public_key == alice.public_key
    assert (ann.endpoint, ann.slice, ann.round) == ("127.0.0.1:7000", 2, 7)
    assert (ann.tokens_per_second, ann.loss) == (1234.5, 3.25)
    assert ann.tls_fingerprint == alice.tls_fingerprint and ann.software_version == "0.1.0"
    assert not ann.client_only
    client = verify_announcement(announce(alice, endpoint="", loss=math.nan))
    assert client.client_only and client.to_json()["loss"] is None and client.to_json()["endpoint"] is None


def test_forged_announcement_is_refused_with_a_clear_reason(alice: Identity, mallory: Identity) -> None:
    value = announce(alice)
    signed = pb.SignedAnnouncement.FromString(value[len(ANNOUNCEMENT_TAG) :])
    ann = pb.PeerAnnouncement.FromString(signed.announcement)
    ann.slice = 0  # tamper with a signed field
    tampered = pb.SignedAnnouncement(announcement=ann.SerializeToString(), signature=signed.signature)
    with pytest.raises(InvalidRecord, match="bad signature"):
        verify_announcement(ANNOUNCEMENT_TAG + tampered.SerializeToString())
    # Mallory signs an announcement that claims alice's peer id with her own key.
    ann = pb.PeerAnnouncement.FromString(signed.announcement)
    ann.public_key = mallory.public_key
    body = ann.SerializeToString()
    forged = pb.SignedAnnouncement(announcement=body, signature=mallory.sign(ANNOUNCEMENT_TAG + body))
    with pytest.raises(InvalidRecord, match="not the hash of its key"):
        verify_announcement(ANNOUNCEMENT_TAG + forged.SerializeToString())
    for garbage in (b"", b"junk", ANNOUNCEMENT_TAG + b"\xff\xff\xff", "text", None):
        with pytest.raises(InvalidRecord):
            verify_announcement(garbage)


def test_record_signed_by_another_key_cannot_take_a_peers_subkey(alice: Identity, mallory: Identity) -> None:
    with pytest.raises(InvalidRecord, match="stored under"):
        verify_announcement(announce(mallory), subkey=alice.peer_id)
    validator = RecordValidator()
    now = time.time()
    assert validator.validate(record(alice.peer_id, announce(alice), now + 30))
    assert not validator.validate(record(alice.peer_id, announce(mallory), now + 30))
    # A DHT expiration far past the signed expiry is a replay attempt.
    assert not validator.validate(record(alice.peer_id, announce(alice, expires=now + 10), now + 3600))
    # Plain values and foreign subkeys are not murmur records.
    assert not validator.validate(DHTRecord(b"k", MSGPackSerializer.dumps(None), MSGPackSerializer.dumps(b"x"), now))
    assert not validator.validate(record("nickname", announce(alice), now + 30))
    assert not validator.validate(DHTRecord(b"k", b"\xc1", b"\xc1", now))


def test_expired_announcement_is_dropped_by_readers(alice: Identity) -> None:
    value = announce(alice, expires=time.time() - 5)
    with pytest.raises(InvalidRecord, match="expired"):
        verify_announcement(value, now=time.time())


def test_manifest_record_must_sit_under_its_owner(alice: Identity, mallory: Identity) -> None:
    payload = b"\x0a\x02t1"
    signed = pb.SignedManifest(manifest=payload, owner_public_key=alice.public_key, signature=alice.sign(payload))
    value = encode_manifest_record(signed.SerializeToString())
    check_record(alice.public_key.hex(), value, time.time() + 60)
    with pytest.raises(InvalidRecord, match="another owner"):
        check_record(mallory.public_key.hex(), value, time.time() + 60)
    forged = pb.SignedManifest(manifest=payload, owner_public_key=alice.public_key, signature=mallory.sign(payload))
    with pytest.raises(InvalidRecord, match="bad signature"):
        check_record(alice.public_key.hex(), encode_manifest_record(forged.SerializeToString()), time.time())


def test_announced_certificate_must_match_the_signed_fingerprint(alice: Identity, mallory: Identity) -> None:
    assert verify_announcement(announce(alice)).tls_certificate == alice.tls_cert_pem
    signed = pb.SignedAnnouncement.FromString(announce(alice)[len(ANNOUNCEMENT_TAG) :])
    ann = pb.PeerAnnouncement.FromString(signed.announcement)
    ann.tls_certificate = mallory.tls_cert_pem
    body = ann.SerializeToString()
    swapped = pb.SignedAnnouncement(announcement=body, signature=alice.sign(ANNOUNCEMENT_TAG + body))
    with pytest.raises(InvalidRecord, match="certificate does not match"):
        verify_announcement(ANNOUNCEMENT_TAG + swapped.SerializeToString())


def test_announcement_verdicts_are_remembered_and_still_judged_by_subkey_and_time() -> None:
    """Each distinct value is checked once (a DHT read returns every announcement of the swarm, every time);
    what depends on where and when it is read (subkey, expiry) is judged on every call."""
    from protocol import records

    identity = Identity.generate()
    value = sign_announcement(identity, run_id="r" * 64, endpoint="127.0.0.1:1", slice_index=0, round=3,
                              tokens_per_second=1.0, loss=2.0, software_version="t", protocol_version="1.0",
                              expires_unix=1000.0)  # fmt: skip
    calls = []
    real = records._check_announcement

    def counting(v: bytes) -> Announcement:
        calls.append(v)
        return real(v)

    records._check_announcement = counting
    try:
        for _ in range(3):
            assert verify_announcement(value, subkey=identity.peer_id, now=999.0).peer_id == identity.peer_id
        with pytest.raises(InvalidRecord):
            verify_announcement(value, subkey="ab" * 32)
        with pytest.raises(InvalidRecord):
            verify_announcement(value, now=1001.0)
        for _ in range(2):
            with pytest.raises(InvalidRecord):
                verify_announcement(value[:-1] + bytes([value[-1] ^ 1]))
    finally:
        records._check_announcement = real
    assert len(calls) == 2  # the good value once, the corrupted one once
