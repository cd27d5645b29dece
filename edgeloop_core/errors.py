"""The one exception tree of edgeloop.

Every error we raise on purpose is an :class:`EdgeloopError`; third-party errors (boto3, ONNX Runtime, TensorRT)
are wrapped at the boundary with ``raise ... from exc`` so the cause is kept and the message says what to do next.

::

    EdgeloopError
    ├── ConfigError                  bad settings or arguments (the user can fix them)
    ├── ContractError                an artifact does not honour the contract
    │   ├── ManifestInvalid          manifest.json does not parse or fails the schema
    │   ├── SignatureInvalid         missing, unknown-key or wrong ed25519 signature
    │   │   ├── ChannelExpired       a channel pointer past its expiry
    │   │   └── ChannelRollback      a channel pointer older (lower sequence) than one already accepted
    │   └── DigestMismatch           a file's sha256 or size differs from the manifest
    ├── StoreError                   the object store (S3) failed us
    │   ├── StoreUnavailable         endpoint unreachable or credentials refused
    │   ├── BucketNotFound           the bucket does not exist at that endpoint
    │   ├── ObjectNotFound           a key does not exist
    │   └── VersionExists            publish refused: versions are immutable
    ├── GateFailed                   a variant failed the pipeline's quality gate
    ├── PipelineFailed               a local pipeline run ended with a failed step (carries the log's path)
    ├── RolloutFailed                a fleet rollout was rolled back
    ├── InvalidInput                 a request we cannot run (dtype, shape, byte count, names)   → INVALID_ARGUMENT
    ├── ModelNotFound                no such model on this server                                → NOT_FOUND
    ├── NotReady                     nothing validated is serving yet (or it is building)        → UNAVAILABLE
    ├── ValidationFailed             a version failed on-device validation                       → FAILED_PRECONDITION
    ├── EngineError                  building or running an engine failed                        → INTERNAL
    ├── CacheFull                    no room in the cache (its cap, or the disk) for a download  → RESOURCE_EXHAUSTED
    ├── AccessDenied                 authenticated, but not allowed to do this                   → PERMISSION_DENIED
    ├── AlreadyExists                a name that is taken (a shared-memory region)               → ALREADY_EXISTS
    └── Unauthenticated              no credentials, or unknown ones                             → UNAUTHENTICATED
        └── HubAuthError             a device or reader token was missing or wrong
"""

from __future__ import annotations

from pathlib import Path


class EdgeloopError(Exception):
    """Base of every error edgeloop raises on purpose; ``str(exc)`` is one readable line for the user."""


class ConfigError(EdgeloopError):
    """Settings or arguments that cannot work; the message names the setting to change."""


class ContractError(EdgeloopError):
    """An artifact that does not honour the artifact contract."""


class ManifestInvalid(ContractError):
    """``manifest.json`` does not parse or does not match the schema."""


class SignatureInvalid(ContractError):
    """The manifest's ed25519 signature is missing, made with an untrusted key, or does not match."""


class DigestMismatch(ContractError):
    """A file's sha256 digest or size differs from what the manifest records."""


class StoreError(EdgeloopError):
    """The object store failed an operation."""


class StoreUnavailable(StoreError):
    """The S3 endpoint cannot be reached or refused our credentials."""


class BucketNotFound(StoreError):
    """The configured bucket does not exist at the configured endpoint."""


class ObjectNotFound(StoreError):
    """A key does not exist in the bucket."""


class VersionExists(StoreError):
    """A publish would overwrite an existing version; versions are immutable."""


class GateFailed(EdgeloopError):
    """A model variant failed the pipeline's quality gate (accuracy drop beyond the tolerance)."""


class PipelineFailed(EdgeloopError):
    """A local pipeline run ended with a failed task; ``str()`` says which and why, ``log_path`` has the rest."""

    def __init__(self, message: str, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path


class RolloutFailed(EdgeloopError):
    """A rollout was rolled back: a device failed validation, or the rollout timed out."""


class InvalidInput(EdgeloopError):
    """An inference request that cannot run: wrong datatype, shape, byte count, tensor names, or too large."""


class ModelNotFound(EdgeloopError):
    """The request names a model (or version) this server does not have."""


class NotReady(EdgeloopError):
    """No validated model is serving yet, or the requested one is still being fetched, built or validated."""


class ValidationFailed(EdgeloopError):
    """A version's accuracy (or latency) on this device missed what its manifest requires."""


class EngineError(EdgeloopError):
    """Building or running an engine (TensorRT, ONNX Runtime) failed."""


class ChannelExpired(SignatureInvalid):
    """A channel pointer whose ``expires`` time has passed (re-sign it: ``edgeloop pipeline promote``)."""


class ChannelRollback(SignatureInvalid):
    """A channel pointer whose sequence is lower than one this device already accepted (a replayed old pointer)."""


class CacheFull(EdgeloopError):
    """The cache cannot hold what a version needs: its size cap, or the disk under it, is full."""


class InsufficientMemory(EdgeloopError):
    """A model's engine needs more memory than the device's budget has free: refused before the kernel kills the
    pod (on a Jetson the CPU and GPU share one RAM)."""


class Overloaded(EdgeloopError):
    """A server has as many calls in progress as it takes: refused at once, so the caller backs off instead of
    queueing until its deadline."""


class AccessDenied(EdgeloopError):
    """The caller is known but may not do this (repository control turned off, a device token reading the fleet)."""


class AlreadyExists(EdgeloopError):
    """The name is taken (a shared-memory region registered twice)."""


class Unauthenticated(EdgeloopError):
    """No credentials were presented, or unknown ones."""


class HubAuthError(Unauthenticated):
    """A device presented no token, or one the hub does not know."""
