"""Fetch step of the edge life cycle: read a version's manifest, check its signature, download and verify files.

(The device's resumable, cached fetch builds on these; the pipeline's tests and ``edgeloop pipeline verify`` use
them to check a published version end to end.)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from edgeloop_core.contract import (
    ArtifactLayout,
    ChannelPointer,
    Manifest,
    check_name,
    parse_pointer,
    verify_file,
    verify_manifest,
    verify_pointer,
)
from edgeloop_core.errors import ManifestInvalid, ObjectNotFound

if TYPE_CHECKING:
    from collections.abc import Iterable

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edgeloop_core.store import ObjectStore


def resolve_version(store: ObjectStore, layout: ArtifactLayout, name: str, version_or_channel: str,
                    trusted: Ed25519PublicKey | Iterable[Ed25519PublicKey] | None = None) -> str:
    """A concrete version: ``version_or_channel`` itself if it is a version, else what the channel points at.

    With ``trusted`` the channel pointer must carry a valid, unexpired signature (see :func:`read_channel`); without,
    it is only parsed (the pipeline's plan step, which only decides whether to train).
    """
    resolved, _ = resolve_desired(store, layout, name, version_or_channel, trusted)
    return resolved


def resolve_desired(store: ObjectStore, layout: ArtifactLayout, name: str, version_or_channel: str,
                    trusted: Ed25519PublicKey | Iterable[Ed25519PublicKey] | None = None, *,
                    min_sequence: int = 0) -> tuple[str, ChannelPointer | None]:
    """``(version, pointer)``: a channel's verified pointer, or a version named directly (pinned; no pointer).

    The channel pointer is looked for first: a name with a pointer is a channel, whatever else the bucket holds under
    that name. (Looking for a version first let anyone who can write to the bucket freeze a channel without the model
    key: an object planted at ``models/<name>/<channel>/manifest.json`` made the device ignore the signed pointer.)"""
    check_name(name, "model name")
    check_name(version_or_channel, "version or channel")
    if not store.exists(layout.channel_key(name, version_or_channel)) and store.exists(
            layout.manifest_key(name, version_or_channel)):
        return version_or_channel, None
    pointer = read_channel(store, layout, name, version_or_channel, trusted, min_sequence=min_sequence)
    return pointer.version, pointer


def read_channel(store: ObjectStore, layout: ArtifactLayout, name: str, channel: str,
                 trusted: Ed25519PublicKey | Iterable[Ed25519PublicKey] | None, *,
                 min_sequence: int = 0) -> ChannelPointer:
    """Download and parse ``name``'s ``channel`` pointer; with ``trusted``, also check its signature, expiry and
    that its sequence is at least ``min_sequence``. Every refusal is one readable line (a contract error)."""
    try:
        data = store.get_bytes(layout.channel_key(name, channel))
    except ObjectNotFound:
        raise ObjectNotFound(
            f"model {name!r} has neither a version nor a channel called {channel!r} in "
            f"s3://{store.bucket}/{layout.model_prefix(name)}"
        ) from None
    pointer = parse_pointer(data, name, channel)
    if trusted is not None:
        verify_pointer(pointer, trusted, min_sequence=min_sequence)
    return pointer


def read_manifest(
    store: ObjectStore,
    layout: ArtifactLayout,
    name: str,
    version: str,
    trusted: Ed25519PublicKey | Iterable[Ed25519PublicKey],
) -> Manifest:
    """Download, parse and signature-check a version's manifest; refuse one that names another version."""
    manifest = Manifest.from_json(store.get_bytes(layout.manifest_key(name, version)))
    if (manifest.name, manifest.version) != (name, version):
        raise ManifestInvalid(
            f"manifest at {name}/{version} describes {manifest.name}/{manifest.version}: refusing it"
        )
    verify_manifest(manifest, trusted)
    return manifest


def verify_published(
    store: ObjectStore,
    layout: ArtifactLayout,
    name: str,
    version: str,
    trusted: Ed25519PublicKey | Iterable[Ed25519PublicKey],
    workdir: str | Path | None = None,
) -> Manifest:
    """Check a whole published version: signed manifest, and every file's size and sha256.

    Files are downloaded into ``workdir`` (a temporary folder, removed afterwards, when ``None``).
    """
    manifest = read_manifest(store, layout, name, version, trusted)
    with tempfile.TemporaryDirectory(prefix="edgeloop-verify-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        for ref in manifest.files():
            local = store.download_file(layout.file_key(name, version, ref.file), root / ref.file)
            verify_file(local, ref)
    return manifest
