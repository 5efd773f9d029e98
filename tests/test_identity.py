"""Identity: keys on disk (0600, stable, never silently replaced), signatures, the TLS binding."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.errors import IdentityFileError
from protocol.identity import (
    TLS_SERVER_NAME,
    Identity,
    certificate_fingerprint,
    peer_id_from_public_key,
    tls_path_for,
    update_signing_bytes,
    verify,
    verify_tls_binding,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.timeout(30)
def test_save_load_roundtrip_with_0600(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "identity.pem"
    created = Identity.load_or_create(path)
    assert _mode(path) == 0o600
    assert _mode(tls_path_for(path)) == 0o600
    loaded = Identity.load_or_create(path)
    assert loaded.peer_id == created.peer_id
    assert loaded.public_key == created.public_key
    assert loaded.tls_fingerprint == created.tls_fingerprint, "the TLS certificate is kept, not remade"
    assert not list(path.parent.glob(".*tmp")), "no temporary files left behind"


@pytest.mark.timeout(30)
def test_peer_id_is_full_sha256_of_raw_public_key() -> None:
    identity = Identity.generate()
    assert identity.peer_id == hashlib.sha256(identity.public_key).hexdigest()
    assert len(identity.peer_id) == 64
    assert peer_id_from_public_key(identity.public_key) == identity.peer_id
    assert Identity.generate().peer_id != identity.peer_id


@pytest.mark.timeout(30)
def test_sign_verify_and_tampering() -> None:
    identity = Identity.generate()
    message = update_signing_bytes(
        run_id="r" * 64, round=3, slice_index=1, payload_sha256=bytes(32), sender=identity.peer_id, recipient="x"
    )
    signature = identity.sign(message)
    assert verify(identity.public_key, message, signature)
    assert not verify(identity.public_key, message + b"!", signature)
    flipped = bytes([message[0] ^ 1]) + message[1:]
    assert not verify(identity.public_key, flipped, signature)
    assert not verify(Identity.generate().public_key, message, signature)
    assert not verify(identity.public_key, message, signature[:-1])
    assert not verify(b"\x00" * 31, message, signature)


@pytest.mark.timeout(30)
def test_signing_bytes_separate_every_field() -> None:
    base = dict(run_id="run", round=1, slice_index=2, payload_sha256=bytes(32), sender="a", recipient="b")
    variants = [
        {**base, "run_id": "rum"},
        {**base, "round": 2},
        {**base, "slice_index": 3},
        {**base, "payload_sha256": b"\x01" + bytes(31)},
        {**base, "sender": "c"},
        {**base, "recipient": "c"},
        {**base, "sender": "ab", "recipient": ""},  # length prefixes: no ambiguity from moving bytes
    ]
    seen = {update_signing_bytes(**base)}
    for variant in variants:
        encoded = update_signing_bytes(**variant)
        assert encoded not in seen
        seen.add(encoded)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "content", [b"", b"garbage\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"]
)
def test_corrupt_key_file_errors_clearly_and_is_kept(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "identity.pem"
    path.write_bytes(content)
    with pytest.raises(IdentityFileError, match="refusing to replace"):
        Identity.load_or_create(path)
    assert path.read_bytes() == content, "a corrupt key is never overwritten"


@pytest.mark.timeout(30)
def test_wrong_key_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.pem"
    Identity.generate().save(path)
    tls_pem = tls_path_for(path).read_bytes()
    path.write_bytes(tls_pem)  # a P-256 key where the Ed25519 key belongs
    with pytest.raises(IdentityFileError, match="not an Ed25519"):
        Identity.load(path)


@pytest.mark.timeout(30)
def test_missing_tls_file_is_regenerated_for_the_same_identity(tmp_path: Path) -> None:
    path = tmp_path / "identity.pem"
    first = Identity.load_or_create(path)
    tls_path_for(path).unlink()
    second = Identity.load(path)
    assert second.peer_id == first.peer_id
    assert second.tls_fingerprint != first.tls_fingerprint
    assert tls_path_for(path).exists()
    assert verify_tls_binding(second.public_key, second.tls_fingerprint, second.tls_binding)


@pytest.mark.timeout(30)
def test_corrupt_tls_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "identity.pem"
    Identity.load_or_create(path)
    tls_path_for(path).write_bytes(b"not pem")
    with pytest.raises(IdentityFileError):
        Identity.load(path)


@pytest.mark.timeout(30)
def test_tls_certificate_is_p256_and_names_the_peer() -> None:
    identity = Identity.generate()
    cert = x509.load_pem_x509_certificate(identity.tls_cert_pem)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)
    assert cert.subject.rfc4514_string() == f"CN={identity.peer_id}"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [TLS_SERVER_NAME]
    assert certificate_fingerprint(identity.tls_cert_pem) == identity.tls_fingerprint


@pytest.mark.timeout(30)
def test_tls_binding_verifies_and_fails_for_another_key() -> None:
    identity, other = Identity.generate(), Identity.generate()
    assert verify_tls_binding(identity.public_key, identity.tls_fingerprint, identity.tls_binding)
    assert not verify_tls_binding(other.public_key, identity.tls_fingerprint, identity.tls_binding)
    assert not verify_tls_binding(identity.public_key, other.tls_fingerprint, identity.tls_binding)
    assert not verify_tls_binding(other.public_key, other.tls_fingerprint, identity.tls_binding)
