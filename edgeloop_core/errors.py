"""The one exception tree of edgeloop.

Every error we raise on purpose is an :class:`EdgeloopError`; third-party errors (boto3, ONNX Runtime, TensorRT)
are wrapped at the boundary with ``raise ... from exc`` so the cause is kept and the message says what to do next.
The tree has six branches, one per part of the loop that can fail (configuration, the artifact contract, the
object store, the device, serving, the cloud side); catch the narrowest class you can handle. Beside each class the
diagram shows the gRPC status our servers answer with (:data:`edgeloop_core.rpc_errors.STATUS_FOR`, looked up along
the MRO; INTERNAL hides the message). ``tests/test_errors_doc.py`` checks the diagram against the classes, and
``docs/errors.md`` (from ``scripts/generate_error_reference.py``) adds each class's summary and CLI exit code.

::

    EdgeloopError                       INTERNAL
    ├── ConfigError                     INVALID_ARGUMENT
    ├── ContractError                   FAILED_PRECONDITION
    │   ├── ManifestInvalid             FAILED_PRECONDITION
    │   ├── SignatureInvalid            FAILED_PRECONDITION
    │   │   ├── ChannelExpired          FAILED_PRECONDITION
    │   │   └── ChannelRollback         FAILED_PRECONDITION
    │   └── DigestMismatch              FAILED_PRECONDITION
    ├── StoreError                      INTERNAL
    │   ├── StoreUnavailable            UNAVAILABLE
    │   ├── BucketNotFound              INTERNAL
    │   ├── ObjectNotFound              NOT_FOUND
    │   └── VersionExists               INTERNAL
    ├── DeviceError                     INTERNAL
    │   ├── EngineError                 INTERNAL
    │   ├── ValidationFailed            FAILED_PRECONDITION
    │   ├── InsufficientMemory          RESOURCE_EXHAUSTED
    │   └── CacheFull                   RESOURCE_EXHAUSTED
    ├── ServingError                    INTERNAL
    │   ├── InvalidInput                INVALID_ARGUMENT
    │   ├── ModelNotFound               NOT_FOUND
    │   ├── NotReady                    UNAVAILABLE
    │   ├── Overloaded                  RESOURCE_EXHAUSTED
    │   ├── AlreadyExists               ALREADY_EXISTS
    │   ├── AccessDenied                PERMISSION_DENIED
    │   └── Unauthenticated             UNAUTHENTICATED
    │       └── HubAuthError            UNAUTHENTICATED
    └── CloudError                      INTERNAL
        ├── GateFailed                  INTERNAL
        ├── PipelineFailed              INTERNAL
        └── RolloutFailed               INTERNAL
"""

# Leaf names say the condition (ModelNotFound, NotReady), like httpx's ConnectTimeout, and are public API (telemetry
# reports them as `error_kind`): each carries its own `noqa: N818`. Branch names end in Error.

from __future__ import annotations

from pathlib import Path


class EdgeloopError(Exception):
    """Base of every error edgeloop raises on purpose; ``str(exc)`` is one readable line for the user."""


# Configuration.


class ConfigError(EdgeloopError):
    """Settings or arguments that cannot work; the message names the setting to change."""


# The artifact contract and the trust chain.


class ContractError(EdgeloopError):
    """An artifact that does not honour the artifact contract (schema, signatures, digests)."""


class ManifestInvalid(ContractError):  # noqa: N818
    """``manifest.json`` does not parse or does not match the schema."""


class SignatureInvalid(ContractError):  # noqa: N818
    """The manifest's ed25519 signature is missing, made with an untrusted key, or does not match."""


class ChannelExpired(SignatureInvalid):
    """A channel pointer whose ``expires`` time has passed (re-sign it: ``edgeloop pipeline promote``)."""


class ChannelRollback(SignatureInvalid):
    """A channel pointer whose sequence is lower than one this device already accepted (a replayed old pointer)."""


class DigestMismatch(ContractError):  # noqa: N818
    """A file's sha256 digest or size differs from what the manifest records."""


# Storage: the object store (S3).


class StoreError(EdgeloopError):
    """The object store failed an operation."""


class StoreUnavailable(StoreError):  # noqa: N818
    """The S3 endpoint cannot be reached or refused our credentials."""


class BucketNotFound(StoreError):  # noqa: N818
    """The configured bucket does not exist at the configured endpoint."""


class ObjectNotFound(StoreError):  # noqa: N818
    """A key does not exist in the bucket."""


class VersionExists(StoreError):  # noqa: N818
    """A publish would overwrite an existing version; versions are immutable."""


# The device: engines, validation and the device's own resources.


class DeviceError(EdgeloopError):
    """A device could not bring a version up: its engine, its on-device validation, its memory or its disk."""


class EngineError(DeviceError):
    """Building or running an engine (TensorRT, ONNX Runtime) failed."""


class ValidationFailed(DeviceError):  # noqa: N818
    """A version's accuracy (or latency) on this device missed what its manifest requires."""


class InsufficientMemory(DeviceError):  # noqa: N818
    """A model's engine needs more memory than the device's budget has free: refused before the kernel kills the
    pod (on a Jetson the CPU and GPU share one RAM)."""


class CacheFull(DeviceError):  # noqa: N818
    """The cache cannot hold what a version needs: its size cap, or the disk under it, is full."""


# Serving: what a caller of our gRPC endpoints (the inference server, the telemetry hub) is told.


class ServingError(EdgeloopError):
    """A call to one of our gRPC endpoints (inference server, telemetry hub) that cannot be answered as asked."""


class InvalidInput(ServingError):  # noqa: N818
    """An inference request that cannot run: wrong datatype, shape, byte count, tensor names, or too large."""


class ModelNotFound(ServingError):  # noqa: N818
    """The request names a model (or version) this server does not have."""


class NotReady(ServingError):  # noqa: N818
    """No validated model is serving yet, or the requested one is still being fetched, built or validated."""


class Overloaded(ServingError):  # noqa: N818
    """A server has as many calls in progress as it takes: refused at once, so the caller backs off instead of
    queueing until its deadline."""


class AlreadyExists(ServingError):  # noqa: N818
    """The name is taken (a shared-memory region registered twice)."""


class AccessDenied(ServingError):  # noqa: N818
    """The caller is known but may not do this (repository control turned off, a device token reading the fleet)."""


class Unauthenticated(ServingError):  # noqa: N818
    """No credentials were presented, or unknown ones."""


class HubAuthError(Unauthenticated):
    """A device presented no token, or one the hub does not know."""


# The cloud side: the pipeline and the fleet rollout.


class CloudError(EdgeloopError):
    """The cloud side of the loop stopped: the pipeline's quality gate, a pipeline run, or a fleet rollout."""


class GateFailed(CloudError):  # noqa: N818
    """A model variant failed the pipeline's quality gate (accuracy drop beyond the tolerance)."""


class PipelineFailed(CloudError):  # noqa: N818
    """A local pipeline run ended with a failed task; ``str()`` says which and why, ``log_path`` has the rest."""

    def __init__(self, message: str, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path


class RolloutFailed(CloudError):  # noqa: N818
    """A rollout was rolled back: a device failed validation, or the rollout timed out."""
