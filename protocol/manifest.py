"""The run manifest: what a swarm trains, signed by the run owner; its hash is the run id.

Canonical form: the manifest is the `Manifest` proto serialised with `deterministic=True` (fields in
number order, no unknown fields). The owner signs exactly those bytes; receivers check the signature,
parse, and refuse bytes that do not re-serialise to themselves, so one content has one run id:
`run_id = sha256(manifest bytes).hex()`.

On disk (`murmur create-run --out manifest.json`) a manifest is JSON holding the signed bytes (base64),
the owner key and signature (hex), the run id, and a readable copy of the fields. The bytes are the
truth; the readable copy is checked against them on load, so a hand edit fails loudly instead of
silently forking the run. (Signing JSON directly would need a canonical-JSON rule for floats; the
proto bytes sidestep that and are what travels in the DHT anyway.)

Trust: a peer trusts the owner key it was given (`--run-key`), or pins the first key it sees for a
swarm name in `pins.json` under the murmur state directory and refuses a different key later.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from protocol import PROTOCOL_MAJOR, protocol_major
from protocol._generated import murmur_pb2 as pb
from protocol.errors import BadRunKey, ManifestError, UntrustedOwner
from protocol.files import atomic_write
from protocol.identity import Identity, verify
from protocol.logs import get_logger

log = get_logger(__name__)

FILE_FORMAT = "murmur-manifest/1"


@dataclass(frozen=True, slots=True)
class SignedRunManifest:
    """A manifest as its owner signed it. Construct with `sign` or `parse_signed`; both verify."""

    payload: bytes
    owner_public_key: bytes
    signature: bytes

    @property
    def run_id(self) -> str:
        """Hex SHA-256 of the signed bytes."""
        return hashlib.sha256(self.payload).hexdigest()

    @property
    def owner_key_hex(self) -> str:
        return self.owner_public_key.hex()

    @property
    def manifest(self) -> pb.Manifest:
        """The parsed manifest (a fresh copy each call)."""
        return pb.Manifest.FromString(self.payload)

    def to_bytes(self) -> bytes:
        """Serialised SignedManifest, as stored in the DHT."""
        message = pb.SignedManifest(
            manifest=self.payload, owner_public_key=self.owner_public_key, signature=self.signature
        )
        return message.SerializeToString(deterministic=True)

    def to_json(self) -> str:
        """The on-disk form (see the module docstring)."""
        readable = json_format.MessageToDict(self.manifest, preserving_proto_field_name=True)
        doc = {
            "format": FILE_FORMAT,
            "run_id": self.run_id,
            "owner_public_key": self.owner_key_hex,
            "signature": self.signature.hex(),
            "manifest_b64": base64.b64encode(self.payload).decode(),
            "manifest": readable,
        }
        return json.dumps(doc, indent=2) + "\n"


def sign(manifest: pb.Manifest, owner: Identity) -> SignedRunManifest:
    """Serialise `manifest` canonically and sign it with the owner's key."""
    _check_content(manifest)
    payload = manifest.SerializeToString(deterministic=True)
    return SignedRunManifest(payload=payload, owner_public_key=owner.public_key, signature=owner.sign(payload))


def _check_content(manifest: pb.Manifest) -> None:
    if not manifest.swarm_name:
        raise ManifestError("the manifest names no swarm")
    if protocol_major(manifest.protocol_version) != PROTOCOL_MAJOR:
        raise ManifestError(
            f"the run speaks protocol {manifest.protocol_version!r} but this murmur speaks {PROTOCOL_MAJOR}.x; "
            "install the murmur version the run owner names"
        )
    if manifest.slices.num_slices < 1:
        raise ManifestError("the manifest has no parameter slices (slices.num_slices < 1)")


def verify_signed(signed: SignedRunManifest, *, swarm: str | None = None, trusted_key: bytes | None = None) -> None:
    """Raise ManifestError unless `signed` checks: signature, canonical bytes, swarm, protocol, owner.

    `trusted_key`, when given, must equal the signer's key (UntrustedOwner otherwise).
    """
    if not verify(signed.owner_public_key, signed.payload, signed.signature):
        raise ManifestError("forged manifest: the signature does not check against the owner key it carries")
    if trusted_key is not None and signed.owner_public_key != trusted_key:
        raise UntrustedOwner(
            f"manifest signed by {signed.owner_key_hex[:16]}…, but this peer trusts run key "
            f"{trusted_key.hex()[:16]}… for this swarm"
        )
    try:
        manifest = pb.Manifest.FromString(signed.payload)
    except DecodeError as exc:
        raise ManifestError(f"the signed manifest does not parse: {exc}") from exc
    if manifest.SerializeToString(deterministic=True) != signed.payload:
        raise ManifestError("the manifest bytes are not canonical (unknown fields or non-deterministic encoding)")
    _check_content(manifest)
    if swarm is not None and manifest.swarm_name != swarm:
        raise ManifestError(f"the manifest is for swarm {manifest.swarm_name!r}, not {swarm!r}")


def parse_signed(data: bytes, *, swarm: str | None = None, trusted_key: bytes | None = None) -> SignedRunManifest:
    """Parse serialised SignedManifest bytes and verify them (see `verify_signed`)."""
    try:
        message = pb.SignedManifest.FromString(data)
    except DecodeError as exc:
        raise ManifestError(f"not a signed manifest: {exc}") from exc
    signed = SignedRunManifest(
        payload=message.manifest, owner_public_key=message.owner_public_key, signature=message.signature
    )
    verify_signed(signed, swarm=swarm, trusted_key=trusted_key)
    return signed


def load_json(path: Path, *, swarm: str | None = None, trusted_key: bytes | None = None) -> SignedRunManifest:
    """Read a manifest file written by `to_json`, verify it, and check the readable copy matches."""
    try:
        doc = json.loads(Path(path).read_text())
        if not isinstance(doc, dict):
            raise TypeError(f"a JSON {type(doc).__name__}, not an object")
        signed = SignedRunManifest(
            payload=base64.b64decode(doc["manifest_b64"], validate=True),
            owner_public_key=bytes.fromhex(doc["owner_public_key"]),
            signature=bytes.fromhex(doc["signature"]),
        )
    except KeyError as exc:
        raise ManifestError(f"{path}: not a murmur manifest file (no {exc} field)") from exc
    except (OSError, ValueError, TypeError, binascii.Error) as exc:
        raise ManifestError(f"{path}: not a murmur manifest file ({exc})") from exc
    if doc.get("format") != FILE_FORMAT:
        raise ManifestError(f"{path}: unknown format {doc.get('format')!r} (expected {FILE_FORMAT})")
    verify_signed(signed, swarm=swarm, trusted_key=trusted_key)
    if doc.get("run_id") != signed.run_id:
        raise ManifestError(f"{path}: run_id does not match the signed bytes")
    readable = json_format.MessageToDict(signed.manifest, preserving_proto_field_name=True)
    if doc.get("manifest") != readable:
        raise ManifestError(
            f"{path}: the readable copy differs from the signed bytes (edited by hand?); "
            "change the TOML or flags and run `murmur create-run` again"
        )
    return signed


def murmur_home() -> Path:
    """The murmur state directory: $MURMUR_HOME, else $XDG_DATA_HOME/murmur, else ~/.local/share/murmur."""
    if os.environ.get("MURMUR_HOME"):
        return Path(os.environ["MURMUR_HOME"])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "murmur"


class PinStore:
    """First-seen owner keys per swarm name, in a small JSON file replaced atomically."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else murmur_home() / "pins.json"

    def load(self) -> dict[str, str]:
        """{swarm: owner key hex}; an absent file is empty, an unreadable one is an error (never ignored)."""
        try:
            pins = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{self.path}: unreadable pin file ({exc}); fix or remove it") from exc
        if not isinstance(pins, dict) or not all(isinstance(v, str) for v in pins.values()):
            raise ManifestError(f"{self.path}: pin file is not a JSON object of strings; fix or remove it")
        return pins

    def get(self, swarm: str) -> str | None:
        return self.load().get(swarm)

    def pin(self, swarm: str, owner_key_hex: str) -> None:
        """Record `owner_key_hex` for `swarm` (atomic write; other swarms' pins are kept)."""
        pins = self.load()
        pins[swarm] = owner_key_hex
        atomic_write(self.path, (json.dumps(pins, indent=2, sort_keys=True) + "\n").encode())


def parse_run_key(text: str) -> bytes:
    """A run key from the command line: 64 hex characters (an Ed25519 public key)."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise BadRunKey(f"--run-key must be 64 hex characters (an Ed25519 public key), got {text!r}")
    return key


def trusted_key_for(swarm: str, run_key: bytes | None, pins: PinStore) -> bytes | None:
    """The owner key to trust for `swarm`: `run_key` if given, else the pinned key, else None (pin on first use)."""
    if run_key is not None:
        return run_key
    pinned = pins.get(swarm)
    return bytes.fromhex(pinned) if pinned else None


def accept_owner(swarm: str, signed: SignedRunManifest, run_key: bytes | None, pins: PinStore) -> None:
    """Apply the trust rule to a manifest whose signature already checks; pin on first use, and pin a --run-key
    (it overrides an older pin).

    Raises UntrustedOwner naming `--run-key` when the pinned key differs from the signer's.
    """
    if run_key is not None:
        if signed.owner_public_key != run_key:
            raise UntrustedOwner(
                f"swarm {swarm!r}: manifest signed by {signed.owner_key_hex}, not by the --run-key you gave"
            )
        if pins.get(swarm) != signed.owner_key_hex:  # given once, then pinned: the next join needs no --run-key
            pins.pin(swarm, signed.owner_key_hex)
            log.info("swarm %r: owner %s pinned in %s", swarm, signed.owner_key_hex, pins.path)
        return
    pinned = pins.get(swarm)
    if pinned is None:
        pins.pin(swarm, signed.owner_key_hex)
        log.warning("swarm %r: trusting run owner %s from now on (pinned in %s)", swarm, signed.owner_key_hex,
                    pins.path)  # fmt: skip
        return
    if pinned != signed.owner_key_hex:
        raise UntrustedOwner(
            f"swarm {swarm!r} is now signed by owner key {signed.owner_key_hex}, but you pinned {pinned} "
            f"(in {pins.path}). If the run really changed hands, rerun with --run-key {signed.owner_key_hex}"
        )
