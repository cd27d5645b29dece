"""ed25519 signatures over manifests (the ``cryptography`` package).

Keys never live in the repository. The pipeline's private key comes from ``EDGELOOP_SIGNING_KEY`` (PEM text) or
``EDGELOOP_SIGNING_KEY_FILE`` (a PEM file); devices trust public keys from ``EDGELOOP_VERIFY_KEY`` /
``EDGELOOP_VERIFY_KEY_FILE`` (in Kubernetes, a Secret or ConfigMap mounted as a file).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeloop_core.contract.manifest import Manifest, Signature
from edgeloop_core.errors import ConfigError, SignatureInvalid

SIGNING_KEY_ENV = "EDGELOOP_SIGNING_KEY"
SIGNING_KEY_FILE_ENV = "EDGELOOP_SIGNING_KEY_FILE"
VERIFY_KEY_ENV = "EDGELOOP_VERIFY_KEY"
VERIFY_KEY_FILE_ENV = "EDGELOOP_VERIFY_KEY_FILE"


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short, stable id of a public key: the first 16 hex digits of the sha256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_signing_key(directory: str | Path) -> tuple[Path, Path]:
    """Write a new key pair as ``signing-key.pem`` (mode 0600) and ``verify-key.pem`` into ``directory``.

    Refuses to overwrite an existing private key. Returns ``(private_path, public_path)``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / "signing-key.pem", directory / "verify-key.pem"
    if private_path.exists():
        raise ConfigError(f"{private_path} already exists: refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def _pem_from(env_text: str, env_file: str, path: str | Path | None, what: str) -> bytes:
    if path is not None:
        source = Path(path)
    elif os.environ.get(env_text):
        return os.environ[env_text].encode()
    elif os.environ.get(env_file):
        source = Path(os.environ[env_file])
    else:
        raise ConfigError(f"no {what}: set {env_text} (PEM text) or {env_file} (path to a PEM file)")
    try:
        return source.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} from {source}: {exc.strerror}") from exc


def load_signing_key(path: str | Path | None = None) -> Ed25519PrivateKey:
    """The pipeline's private key, from ``path`` or the environment (see module docstring)."""
    pem = _pem_from(SIGNING_KEY_ENV, SIGNING_KEY_FILE_ENV, path, "signing key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError("the signing key is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError("the signing key is not an ed25519 key")
    return key


def load_verify_key(path: str | Path | None = None) -> Ed25519PublicKey:
    """The first trusted public key, from ``path`` or the environment (see :func:`load_verify_keys` for several)."""
    return load_verify_keys(path)[0]


def make_signature(private_key: Ed25519PrivateKey, payload: bytes) -> Signature:
    """An ed25519 signature over ``payload`` (canonical JSON of a manifest, channel pointer or engine record)."""
    value = private_key.sign(payload)
    return Signature(key_id=key_id(private_key.public_key()), value=base64.b64encode(value).decode("ascii"))


def check_signature(signature: Signature | None, payload: bytes,
                    trusted: Ed25519PublicKey | Iterable[Ed25519PublicKey], where: str) -> None:
    """Raise :class:`SignatureInvalid` (naming ``where``) unless a trusted key made ``signature`` over ``payload``."""
    keys = [trusted] if isinstance(trusted, Ed25519PublicKey) else list(trusted)
    if signature is None:
        raise SignatureInvalid(f"{where} is not signed")
    key = {key_id(k): k for k in keys}.get(signature.key_id)
    if key is None:
        raise SignatureInvalid(f"{where} is signed by key {signature.key_id}, which is not trusted here")
    try:
        key.verify(base64.b64decode(signature.value, validate=True), payload)
    except (InvalidSignature, ValueError) as exc:
        raise SignatureInvalid(f"{where}: the signature does not match the content") from exc


def load_verify_keys(path: str | Path | None = None) -> list[Ed25519PublicKey]:
    """Every trusted public key in ``path`` (or the environment): one PEM block or several, one after another.

    Several keys let a fleet rotate the model key: ship a file with the old and the new key, publish with the new
    one, then drop the old one.
    """
    pem = _pem_from(VERIFY_KEY_ENV, VERIFY_KEY_FILE_ENV, path, "verify key")
    blocks = re.findall(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", pem, flags=re.DOTALL)
    if not blocks:
        raise ConfigError("the verify key file holds no PEM public key")
    keys = []
    for block in blocks:
        try:
            key = serialization.load_pem_public_key(block)
        except ValueError as exc:
            raise ConfigError("the verify key file holds a PEM block that is not a public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError("the verify key file holds a key that is not ed25519")
        keys.append(key)
    return keys


def sign_manifest(manifest: Manifest, private_key: Ed25519PrivateKey) -> Manifest:
    """Return a copy of ``manifest`` carrying an ed25519 signature over its canonical JSON."""
    return manifest.model_copy(update={"signature": make_signature(private_key, manifest.canonical_bytes())})


def verify_manifest(manifest: Manifest, trusted: Ed25519PublicKey | Iterable[Ed25519PublicKey]) -> None:
    """Raise :class:`SignatureInvalid` unless a trusted key signed exactly this manifest."""
    check_signature(manifest.signature, manifest.canonical_bytes(), trusted,
                    f"manifest {manifest.name}/{manifest.version}")
