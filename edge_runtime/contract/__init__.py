"""The artifact contract between the pipeline and the edge: manifest schema, S3 layout, target keys, digests,
signatures. Importable without torch, on Python 3.10+."""

from edge_runtime.contract.channel import ChannelPointer, check_name, parse_pointer, sign_pointer, verify_pointer
from edge_runtime.contract.digest import sha256_bytes, sha256_file, verify_file
from edge_runtime.contract.layout import ArtifactLayout
from edge_runtime.contract.manifest import (
    SCHEMA_VERSION,
    EngineRef,
    FileRef,
    Manifest,
    Preprocessing,
    Signature,
    TensorSpec,
    Validation,
    Variant,
)
from edge_runtime.contract.signing import (
    generate_signing_key,
    key_id,
    load_signing_key,
    load_verify_key,
    load_verify_keys,
    sign_manifest,
    verify_manifest,
)
from edge_runtime.contract.target import TargetKey

__all__ = [
    "SCHEMA_VERSION",
    "ArtifactLayout",
    "ChannelPointer",
    "EngineRef",
    "FileRef",
    "Manifest",
    "Preprocessing",
    "Signature",
    "TargetKey",
    "TensorSpec",
    "Validation",
    "Variant",
    "check_name",
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
