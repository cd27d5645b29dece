"""The artifact contract between the pipeline and the edge: manifest schema, S3 layout, target keys, digests,
signatures. Importable without torch, on Python 3.10+."""

from edgeloop_core.contract.channel import ChannelPointer, check_name, parse_pointer, sign_pointer, verify_pointer
from edgeloop_core.contract.digest import sha256_bytes, sha256_file, verify_file
from edgeloop_core.contract.layout import ArtifactLayout
from edgeloop_core.contract.manifest import (
    ENGINES_BY_VARIANT_SCHEMA,
    SCHEMA_VERSION,
    Clip,
    EngineRef,
    FileRef,
    Manifest,
    OutputSlice,
    Preprocessing,
    Signature,
    Task,
    TensorSpec,
    Validation,
    Variant,
    engine_entry,
)
from edgeloop_core.contract.signing import (
    generate_signing_key,
    key_id,
    load_signing_key,
    load_verify_key,
    load_verify_keys,
    sign_manifest,
    verify_manifest,
)
from edgeloop_core.contract.target import TargetKey

__all__ = [
    "ENGINES_BY_VARIANT_SCHEMA",
    "SCHEMA_VERSION",
    "ArtifactLayout",
    "ChannelPointer",
    "Clip",
    "EngineRef",
    "FileRef",
    "Manifest",
    "OutputSlice",
    "Preprocessing",
    "Signature",
    "TargetKey",
    "Task",
    "TensorSpec",
    "Validation",
    "Variant",
    "check_name",
    "engine_entry",
    "generate_signing_key",
    "key_id",
    "load_signing_key",
    "load_verify_key",
    "load_verify_keys",
    "parse_pointer",
    "sha256_bytes",
    "sha256_file",
    "sign_manifest",
    "sign_pointer",
    "verify_file",
    "verify_manifest",
    "verify_pointer",
]
