"""sha256 digests of artifact files, computed in chunks so large engines never sit in memory."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from edgeloop_core.errors import DigestMismatch

if TYPE_CHECKING:
    from edgeloop_core.contract.manifest import FileRef

_CHUNK_BYTES = 1 << 20


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> tuple[str, int]:
    """Return ``(hex sha256, size in bytes)`` of the file at ``path``."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def verify_file(path: str | Path, ref: FileRef) -> None:
    """Raise :class:`DigestMismatch` unless the file at ``path`` has the size and sha256 that ``ref`` records."""
    digest, size = sha256_file(path)
    if size != ref.size_bytes:
        raise DigestMismatch(f"{ref.file}: size {size} bytes, manifest says {ref.size_bytes}: refusing to use it")
    if digest != ref.sha256:
        raise DigestMismatch(f"{ref.file}: sha256 {digest[:12]}… does not match the manifest's {ref.sha256[:12]}…")
