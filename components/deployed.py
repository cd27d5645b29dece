"""The version now deployed on a channel, fetched and verified for the pipeline (the two-slice gate compares the new
version with it).

"Deployed" is what a channel's signed pointer names; its manifest's signature and every file's sha256 are checked
(:func:`edgeloop_core.published.verify_published`) before any of its files is used. A channel with no pointer (the
model's first publish) has no deployed version: :func:`fetch_deployed` returns ``None``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeloop_core.contract import ArtifactLayout, Manifest, load_signing_key, load_verify_keys
from edgeloop_core.contract.signing import VERIFY_KEY_ENV, VERIFY_KEY_FILE_ENV
from edgeloop_core.published import resolve_version, verify_published

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edgeloop_core.contract.manifest import Variant
    from edgeloop_core.store import ObjectStore

FALLBACK_VARIANT = "fp32-dense"
"""What a new variant is compared with when the deployed version has no variant of that name."""


@dataclass
class DeployedVersion:
    """A verified published version: its channel, version, signed manifest and the folder holding its files."""

    channel: str
    version: str
    manifest: Manifest
    directory: Path

    def counterpart(self, variant: str) -> Variant:
        """The deployed variant a new ``variant`` is judged against: the one of the same name, else ``fp32-dense``,
        else ``fp32``, else the first one the manifest lists."""
        by_name = {v.name: v for v in self.manifest.variants}
        for name in (variant, FALLBACK_VARIANT, "fp32"):
            if name in by_name:
                return by_name[name]
        return self.manifest.variants[0]

    def path(self, variant: Variant) -> Path:
        """The verified local file of ``variant``."""
        return self.directory / variant.file


def trusted_keys() -> list[Ed25519PublicKey]:
    """The keys a deployed version must be signed with: ``EDGELOOP_VERIFY_KEY[_FILE]`` when set, else the public half
    of the pipeline's own signing key (``EDGELOOP_SIGNING_KEY[_FILE]``, the key publish signs with); a
    :class:`~edgeloop_core.errors.ConfigError` line when neither is set."""
    if os.environ.get(VERIFY_KEY_ENV) or os.environ.get(VERIFY_KEY_FILE_ENV):
        return load_verify_keys()
    return [load_signing_key().public_key()]


def fetch_deployed(store: ObjectStore, layout: ArtifactLayout, model_name: str, channel: str, workdir: str | Path,
                   trusted: list[Ed25519PublicKey] | None = None) -> DeployedVersion | None:
    """The version ``channel`` of ``model_name`` points at, its pointer and manifest signature-checked against
    ``trusted`` (default: :func:`trusted_keys`) and every file downloaded into ``workdir`` and checked by sha256;
    ``None`` when the model has no such channel yet (nothing deployed). Every refusal is one readable error line
    (:class:`~edgeloop_core.errors.SignatureInvalid`, :class:`~edgeloop_core.errors.DigestMismatch`...)."""
    if not (store.exists(layout.channel_key(model_name, channel))
            or store.exists(layout.manifest_key(model_name, channel))):
        return None
    keys = trusted if trusted is not None else trusted_keys()
    version = resolve_version(store, layout, model_name, channel, keys)
    directory = Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = verify_published(store, layout, model_name, version, keys, workdir=directory)
    return DeployedVersion(channel=channel, version=version, manifest=manifest, directory=directory)
