"""A peer's identity: an Ed25519 key that names and signs, and a P-256 TLS certificate it vouches for.

Why two keys: grpcio's TLS does not complete a handshake with an Ed25519 certificate (DESIGN.md
section 4), so the TLS key is a P-256 key kept beside the Ed25519 identity. The identity signs the
certificate's fingerprint; a client that trusts the identity (from its signed announcement) pins
exactly that certificate, and no CA is involved.

Contracts:
- `peer_id` is the lowercase hex SHA-256 of the raw 32-byte Ed25519 public key: all 64 characters,
  no prefix, so it is collision-proof and fits an X.509 common name (64 characters at most).
- Key files are PEM (PKCS#8, unencrypted), created with mode 0600 and replaced atomically. A file
  that exists but does not parse raises `IdentityFileError`; a new key is never made silently.
- Everything signed is a domain-separated, length-prefixed byte string built here
  (`update_signing_bytes`, `state_signing_bytes`, `tls_binding_bytes`), so a signature made for one
  purpose can never be replayed as another.
"""

from __future__ import annotations

import datetime
import hashlib
import struct
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from protocol.errors import IdentityFileError
from protocol.files import atomic_write
from protocol.logs import get_logger

log = get_logger(__name__)

# The DNS name every murmur certificate carries; clients override the target name with it. Trust does
# not come from the name (every peer has it) but from pinning the exact certificate.
TLS_SERVER_NAME = "murmur.peer"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_CERT_VALIDITY = datetime.timedelta(days=3650)


def peer_id_from_public_key(public_key: bytes) -> str:
    """The peer id of a raw Ed25519 public key: hex SHA-256, 64 characters."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    return hashlib.sha256(public_key).hexdigest()


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is `public_key`'s Ed25519 signature of `message`; False for anything else.

    Never raises on hostile input (wrong lengths, invalid points): callers treat False as a rejection.
    """
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def update_signing_bytes(
    *, run_id: str, round: int, slice_index: int, payload_sha256: bytes, sender: str, recipient: str
) -> bytes:
    """The canonical bytes an update's Ed25519 signature covers.

    DESIGN.md asks for (run id, round, slice, payload hash); sender and recipient peer ids are added so
    that a partner who received our signed update cannot replay it to a third peer (the signature only
    checks at the peer it was addressed to), which in turn makes every failure after a good signature
    attributable to the signer, and so safe to ban for. `payload_sha256` covers the tensor table too
    (see `protocol.updates.payload_digest`), so names, shapes and codecs are signed as well.
    """
    if len(payload_sha256) != 32:
        raise ValueError("payload_sha256 must be 32 bytes")
    return b"".join(
        (
            b"murmur/update/v1\0",
            _field(run_id.encode()),
            struct.pack(">QI", round, slice_index),
            payload_sha256,
            _field(sender.encode()),
            _field(recipient.encode()),
        )
    )


def state_signing_bytes(*, run_id: str, round: int, content_sha256: bytes, sender: str) -> bytes:
    """The canonical bytes a FetchState header's signature covers: the donor vouches for the content."""
    return b"".join(
        (
            b"murmur/state/v1\0",
            _field(run_id.encode()),
            struct.pack(">Q", round),
            content_sha256,
            _field(sender.encode()),
        )
    )


def tls_binding_bytes(peer_id: str, tls_fingerprint: str) -> bytes:
    """The canonical bytes by which an identity vouches for its TLS certificate's fingerprint."""
    return b"murmur/tls/v1\0" + _field(peer_id.encode()) + _field(tls_fingerprint.encode())


def verify_tls_binding(public_key: bytes, tls_fingerprint: str, signature: bytes) -> bool:
    """True when the identity owning `public_key` signed `tls_fingerprint` as its certificate."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        return False
    message = tls_binding_bytes(peer_id_from_public_key(public_key), tls_fingerprint)
    return verify(public_key, message, signature)


def certificate_fingerprint(cert: bytes) -> str:
    """Hex SHA-256 of a certificate's DER encoding; accepts PEM or DER."""
    if cert.lstrip().startswith(b"-----BEGIN"):
        cert = x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(cert).hexdigest()


def _self_signed_certificate(tls_key: ec.EllipticCurvePrivateKey, peer_id: str) -> bytes:
    """A self-signed P-256 certificate naming the peer id (CN) and TLS_SERVER_NAME (SAN), as PEM."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, peer_id)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(tls_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + _CERT_VALIDITY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_SERVER_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(tls_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _read_private(path: Path) -> bytes:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s is readable by others (mode %o); it should be 0600", path, mode)
    return path.read_bytes()


def tls_path_for(path: Path) -> Path:
    """Where the TLS key and certificate of the identity at `path` live: `<name>.tls.pem` beside it."""
    return path.with_name(path.name + ".tls.pem")


class Identity:
    """An Ed25519 identity with its TLS material. Immutable once made; cheap to share."""

    def __init__(
        self, key: Ed25519PrivateKey, tls_key: ec.EllipticCurvePrivateKey, tls_cert_pem: bytes
    ) -> None:
        self._key = key
        self._tls_key = tls_key
        self.public_key: bytes = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: str = peer_id_from_public_key(self.public_key)
        self.tls_cert_pem: bytes = tls_cert_pem
        self.tls_fingerprint: str = certificate_fingerprint(tls_cert_pem)
        cert_key = x509.load_pem_x509_certificate(tls_cert_pem).public_key()
        if cert_key != tls_key.public_key():
            raise IdentityFileError("the TLS certificate does not belong to the TLS key beside it")
        # The identity's statement "this certificate is mine", published in announcements.
        self.tls_binding: bytes = self.sign(tls_binding_bytes(self.peer_id, self.tls_fingerprint))

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity with a fresh TLS key and certificate (nothing is written)."""
        key = Ed25519PrivateKey.generate()
        return cls._with_new_tls(key)

    @classmethod
    def _with_new_tls(cls, key: Ed25519PrivateKey) -> Identity:
        tls_key = ec.generate_private_key(ec.SECP256R1())
        peer_id = peer_id_from_public_key(
            key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        return cls(key, tls_key, _self_signed_certificate(tls_key, peer_id))

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Load the identity at `path` and its TLS file; a missing TLS file is regenerated and saved.

        Raises FileNotFoundError when `path` is absent and IdentityFileError when it is unusable.
        """
        path = Path(path)
        key = _load_key(path, Ed25519PrivateKey, "an Ed25519 identity key")
        tls_path = tls_path_for(path)
        if not tls_path.exists():
            identity = cls._with_new_tls(key)
            identity._save_tls(tls_path)
            log.info("made a new TLS certificate for %s at %s", identity.peer_id, tls_path)
            return identity
        tls_key = _load_key(tls_path, ec.EllipticCurvePrivateKey, "a P-256 TLS key")
        try:
            cert_pem = _pem_block(_read_private(tls_path), b"CERTIFICATE")
            return cls(key, tls_key, cert_pem)
        except ValueError as exc:
            raise IdentityFileError(f"{tls_path}: unusable TLS certificate ({exc})") from exc

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """Load the identity at `path`, or create and save a new one when no file exists there."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        log.info("created identity %s at %s", identity.peer_id, path)
        return identity

    def save(self, path: Path) -> None:
        """Write the Ed25519 key to `path` and the TLS key + certificate beside it, both 0600.

        Raises IdentityFileError naming the path when it cannot be written (no such folder and none can be
        made, a file where a folder should be, no permission, a read-only disk)."""
        path = Path(path)
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            atomic_write(path, pem, mode=0o600, fsync=True)  # a crash never leaves half a key
            self._save_tls(tls_path_for(path))
        except OSError as exc:
            raise IdentityFileError(f"{path}: cannot write the key there ({exc.strerror or exc})") from exc

    def _save_tls(self, tls_path: Path) -> None:
        key_pem = self._tls_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        atomic_write(tls_path, key_pem + self.tls_cert_pem, mode=0o600, fsync=True)

    @property
    def tls_key_pem(self) -> bytes:
        """The TLS private key as PEM, for grpc's server credentials."""
        return self._tls_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message`."""
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id[:16]}…, tls={self.tls_fingerprint[:16]}…)"


def _pem_block(data: bytes, label: bytes) -> bytes:
    begin, end = b"-----BEGIN " + label + b"-----", b"-----END " + label + b"-----"
    start = data.find(begin)
    stop = data.find(end, start)
    if start < 0 or stop < 0:
        raise ValueError(f"no {label.decode()} block")
    return data[start : stop + len(end)] + b"\n"


def _load_key(path: Path, kind: type, what: str):
    try:
        data = _read_private(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise IdentityFileError(f"{path}: cannot read {what} ({exc})") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityFileError(
            f"{path} is not {what} (corrupt or wrong file); refusing to replace it. "
            f"Restore it, or move it away to create a new identity."
        ) from exc
    if not isinstance(key, kind) or (
        isinstance(key, ec.EllipticCurvePrivateKey) and not isinstance(key.curve, ec.SECP256R1)
    ):
        raise IdentityFileError(f"{path} holds a {type(key).__name__}, not {what}")
    return key
