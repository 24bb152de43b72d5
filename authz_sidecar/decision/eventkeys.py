"""The keys of signed events: the private keys this sidecar signs with, and the public keys it
verifies with.

Private keys come from PEM (PKCS#8, Ed25519) files, a directory of them, or the environment; they
stay in this process. Nothing here logs, formats or returns private key material: a
:class:`SigningKey`'s repr omits it, errors about a key name where it came from, never what it
holds. Public keys are identified by a key id derived from the key itself (:func:`key_id`), so two
sidecars holding the same key file agree on its id without coordinating, and a published public
key can be checked against its id.

Which public keys verify depends on the policy source. With etcd, a key verifies while it is
published under ``<prefix>/eventkeys/`` (the sidecar publishes its own keys on start; removing a
key there withdraws it everywhere, this sidecar included). Without etcd, the sidecar's own keys
verify, and nothing else does.
"""

from __future__ import annotations

import hashlib
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from authz_sidecar.errors import ConfigError
from authz_sidecar.model.events import SIGNATURE_BYTES, EnvelopeFields, EventRefusal, signed_bytes

log = structlog.get_logger("authz_sidecar.decision.eventkeys")

PUBLIC_KEY_BYTES = 32
# Hex characters of the key id: 64 bits of SHA-256, unique among any keys one deployment will hold.
KID_HEX = 16
# Where keys given in the environment say they came from (the variable's name, not its value).
ENVIRONMENT = "AUTHZ_EVENT_KEY"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.*?-----END \1-----", re.DOTALL)


def key_id(public_raw: bytes) -> str:
    """The first 16 hex characters of the SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(public_raw).hexdigest()[:KID_HEX]


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    # A path, or the environment variable's name: what to say in a log line or an error.
    source: str
    public_raw: bytes
    private: Ed25519PrivateKey = field(repr=False, compare=False)

    def sign(self, envelope: EnvelopeFields) -> bytes:
        return self.private.sign(signed_bytes(envelope))


def _from_pem(block: bytes, source: str) -> SigningKey:
    if block.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----"):
        raise ConfigError(f"event key {source}: encrypted keys are not supported (give the key unencrypted, 0600)")
    try:
        private = serialization.load_pem_private_key(block, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Never the exception's text: it is the library's, and says nothing a reader needs.
        raise ConfigError(f"event key {source}: not a PEM PKCS#8 private key") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"event key {source}: a {type(private).__name__.removeprefix('_')}, not an Ed25519 key")
    public = raw_public(private.public_key())
    return SigningKey(key_id(public), source, public, private)


def _from_text(text: bytes, source: str) -> list[SigningKey]:
    blocks = [m.group(0) for m in _PEM_BLOCK.finditer(text)]
    if not blocks:
        raise ConfigError(f"event key {source}: no PEM block (-----BEGIN PRIVATE KEY-----)")
    return [_from_pem(block, source) for block in blocks]


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.glob("*.pem") if p.is_file())
        if not found:
            raise ConfigError(f"--event-key {path}: a directory without *.pem files")
        return found
    if not path.is_file():
        raise ConfigError(f"--event-key {path}: no such file or directory")
    return [path]


def _read(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--event-key {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("event_key_readable_by_others", path=str(path), mode=oct(stat.S_IMODE(mode)))
    return data


def load_signing_keys(paths: Sequence[Path], pem: str = "") -> tuple[SigningKey, ...]:
    """The private keys, oldest first: the files in the order given, a directory's ``*.pem`` files
    by name, the PEM blocks of one file (or of the environment's text) in order. The last is the
    newest, the one that signs; so name the files of a directory so that they sort by age
    (``2026-11.pem``, ``2026-12.pem``). A key given twice counts once, where it was last given."""
    keys: dict[str, SigningKey] = {}
    loaded: list[SigningKey] = []
    for path in paths:
        for file in _files(path):
            loaded += _from_text(_read(file), str(file))
    if pem:
        loaded += _from_text(pem.encode("utf-8"), ENVIRONMENT)
    for key in loaded:
        keys.pop(key.kid, None)
        keys[key.kid] = key
    return tuple(keys.values())


class EventKeys:
    """The signing key (the newest private key) and the public keys that verify.

    The published view is replaced whole by the etcd policy source's thread of control (the event
    loop) and read by any RPC thread: one attribute load, as with the snapshot."""

    def __init__(self, own: Sequence[SigningKey], *, published_only: bool) -> None:
        self.own = tuple(own)
        self.signer: SigningKey | None = self.own[-1] if self.own else None
        # With etcd: only published keys verify, and nothing does until the first listing is read.
        self.published_only = published_only
        self._local = {k.kid: Ed25519PublicKey.from_public_bytes(k.public_raw) for k in self.own}
        self._published: dict[str, Ed25519PublicKey] | None = None
        self._raw: dict[str, bytes] = {}

    @property
    def ready(self) -> bool:
        """Whether the keys that verify are known (etcd: the published keys have been read)."""
        return not self.published_only or self._published is not None

    def published(self, keys: Mapping[str, bytes]) -> None:
        """The public keys published now (key id -> raw 32 bytes), already checked against their ids."""
        previous, parsed = self._published or {}, {}
        for kid, raw in keys.items():
            same = previous.get(kid) if self._raw.get(kid) == raw else None
            parsed[kid] = same or Ed25519PublicKey.from_public_bytes(raw)
        added, removed = sorted(set(parsed) - set(previous)), sorted(set(previous) - set(parsed))
        self._raw = dict(keys)
        self._published = parsed
        if added or removed:
            log.info("event_keys_published", added=added, removed=removed, verifying=sorted(parsed))

    def public(self, kid: str) -> Ed25519PublicKey | None:
        if self.published_only:
            return (self._published or {}).get(kid)
        return self._local.get(kid)

    def is_published(self, kid: str) -> bool:
        return kid in (self._published or {})

    def verifying(self) -> list[str]:
        """The key ids that verify now."""
        return sorted(self._published or {}) if self.published_only else sorted(self._local)

    def check(self, envelope: EnvelopeFields, signature: bytes) -> EventRefusal | None:
        """None if a trusted key signed exactly these fields, else why not."""
        public = self.public(envelope.key_id)
        if public is None:
            return EventRefusal.UNKNOWN_KEY
        if len(signature) != SIGNATURE_BYTES:
            return EventRefusal.BAD_SIGNATURE
        try:
            public.verify(signature, signed_bytes(envelope))
        except InvalidSignature:
            return EventRefusal.BAD_SIGNATURE
        return None

    def status(self) -> dict[str, object]:
        """For /status: key ids and where the keys came from, never a key."""
        return {
            "signing_key_id": self.signer.kid if self.signer is not None else None,
            "own": [{"key_id": k.kid, "source": k.source} for k in self.own],
            "verifying": self.verifying() if self.ready else None,
            "verifies_with": "published keys (etcd)" if self.published_only else "own keys",
        }


def environment_pem(value: str) -> bool:
    """Whether AUTHZ_EVENT_KEY holds PEM text rather than paths (as every AUTHZ_<FLAG> may)."""
    return "-----BEGIN" in value
