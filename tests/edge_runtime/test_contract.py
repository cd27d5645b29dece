"""The artifact contract: manifest schema, signatures, digests, target keys, S3 layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeloop_core.contract import (
    ArtifactLayout,
    Manifest,
    TargetKey,
    generate_signing_key,
    load_verify_key,
    sign_manifest,
    verify_file,
    verify_manifest,
)
from edgeloop_core.errors import ConfigError, DigestMismatch, ManifestInvalid, SignatureInvalid
from tests.conftest import make_staged_version


def test_signed_manifest_round_trips_through_json_and_verifies(tmp_path, signing_key, verify_key):
    signed = sign_manifest(make_staged_version(tmp_path), signing_key)
    parsed = Manifest.from_json(signed.to_json())
    verify_manifest(parsed, verify_key)
    assert parsed == signed
    assert [f.file for f in parsed.files()] == ["fp32.onnx", "int8-ort.onnx", "validation.npz", "report.html"]


def test_tampered_manifest_fails_verification(tmp_path, signing_key, verify_key):
    signed = sign_manifest(make_staged_version(tmp_path), signing_key)
    raw = json.loads(signed.to_json())
    raw["validation"]["tolerance"] = 0.5  # loosen the on-device gate
    tampered = Manifest.from_json(json.dumps(raw))
    with pytest.raises(SignatureInvalid) as info:
        verify_manifest(tampered, verify_key)
    assert "does not match" in str(info.value)


def test_unsigned_and_untrusted_manifests_are_refused(tmp_path, signing_key):
    manifest = make_staged_version(tmp_path)
    with pytest.raises(SignatureInvalid) as unsigned:
        verify_manifest(manifest, load_verify_key(_other_key_dir(tmp_path) / "verify-key.pem"))
    assert "not signed" in str(unsigned.value)
    signed = sign_manifest(manifest, signing_key)
    with pytest.raises(SignatureInvalid) as untrusted:
        verify_manifest(signed, load_verify_key(tmp_path / "other" / "verify-key.pem"))
    assert "not trusted" in str(untrusted.value)


def _other_key_dir(tmp_path: Path) -> Path:
    generate_signing_key(tmp_path / "other")
    return tmp_path / "other"


def test_file_digest_and_size_are_checked(tmp_path):
    manifest = make_staged_version(tmp_path)
    ref = manifest.variant("int8-ort")
    verify_file(tmp_path / ref.file, ref)
    data = bytearray((tmp_path / ref.file).read_bytes())
    data[10] ^= 0xFF
    (tmp_path / ref.file).write_bytes(bytes(data))
    with pytest.raises(DigestMismatch) as flipped:
        verify_file(tmp_path / ref.file, ref)
    assert "sha256" in str(flipped.value)
    (tmp_path / ref.file).write_bytes(bytes(data[:-1]))
    with pytest.raises(DigestMismatch) as truncated:
        verify_file(tmp_path / ref.file, ref)
    assert "size" in str(truncated.value)


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda m: m.update(schema_version=99), "newer"),
        (lambda m: m["variants"][0].update(sha256="abc"), "variants.0.sha256"),
        (lambda m: m["variants"][0].update(file="../../etc/passwd"), "variants.0.file"),
        (lambda m: m.update(name="Bad Name"), "name"),
        (lambda m: m["validation"]["reference"].update(ghost=0.5), "unknown variants"),
        (lambda m: m.update(unexpected=True), "unexpected"),
        (lambda m: m["variants"][0].update(file="manifest.json"), "manifest.json"),  # would overwrite the manifest
        (lambda m: m["variants"][1].update(file=m["variants"][0]["file"]), "unique"),
        (lambda m: m.update(version="v1\n"), "version"),
        (lambda m: m.update(task={"kind": "detection"}), "layout"),
    ],
)
def test_invalid_manifests_give_one_readable_line(tmp_path, mutate, where):
    raw = json.loads(make_staged_version(tmp_path).to_json())
    mutate(raw)
    with pytest.raises(ManifestInvalid) as info:
        Manifest.from_json(json.dumps(raw))
    message = str(info.value)
    assert where in message
    assert "\n" not in message


def test_garbage_is_not_a_manifest():
    with pytest.raises(ManifestInvalid):
        Manifest.from_json(b"\x00not json")


def test_signing_key_never_overwritten_and_private_key_is_private(tmp_path):
    private, public = generate_signing_key(tmp_path)
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(ConfigError):
        generate_signing_key(tmp_path)


def test_keys_from_environment(tmp_path, monkeypatch):
    from edgeloop_core.contract import key_id, load_signing_key

    private, public = generate_signing_key(tmp_path)
    monkeypatch.delenv("EDGELOOP_SIGNING_KEY_FILE", raising=False)
    monkeypatch.setenv("EDGELOOP_SIGNING_KEY", private.read_text())
    monkeypatch.setenv("EDGELOOP_VERIFY_KEY_FILE", str(public))
    assert key_id(load_signing_key().public_key()) == key_id(load_verify_key())
    monkeypatch.delenv("EDGELOOP_SIGNING_KEY")
    with pytest.raises(ConfigError) as info:
        load_signing_key()
    assert "EDGELOOP_SIGNING_KEY" in str(info.value)


@pytest.mark.parametrize(
    "text",
    ["trt10.3.0.30-sm87x8-orin-nx-l4t36.4-aarch64-int8-b1x16x32", "trt10.3.0.30-sm87x4-orin-nano-l4t36.4-aarch64"
     "-int8-b1x16x32", "trt10.3.0.30-sm87x16-agx-orin-l4t36.4-aarch64-fp16-b1x8x16",
     "trt11.0.0.114-sm90x132-x86_64-fp16-b1x8x64", "trt10.3.0.30-sm90x132-aarch64-int8-b1x8x16",
     "ort1.31-cpu-x86_64-int8", "ort1.20-cuda-aarch64-fp32"],
)
def test_target_keys_round_trip(text):
    assert str(TargetKey.parse(text)) == text


def test_orin_modules_and_tensorrt_builds_never_share_a_key():
    def orin(module: str, sms: int, version: str = "10.3.0.30") -> str:
        return str(TargetKey(backend="tensorrt", backend_version=version, precision="int8", compute_capability="87",
                             l4t_release="36.4", batch_profile=(1, 8, 16), device="trt", arch="aarch64",
                             sm_count=sms, module=module))

    keys = {orin("orin-nano", 8), orin("orin-nx", 8), orin("agx-orin", 16), orin("orin-nx", 8, "10.3.0.26")}
    assert len(keys) == 4  # all sm_87 "Orin"; module and TensorRT build tell them apart
    parsed = TargetKey.parse(orin("agx-orin", 16))
    assert (parsed.module, parsed.sm_count, parsed.arch, parsed.backend_version) == ("agx-orin", 16, "aarch64",
                                                                                      "10.3.0.30")
    arm_server = TargetKey.parse("trt10.3.0.30-sm90x132-aarch64-int8-b1x8x16")  # aarch64 without L4T
    assert arm_server.arch == "aarch64" and arm_server.l4t_release is None and arm_server.module is None


def test_module_names_from_the_device_tree():
    from edgeloop_core.contract.target import module_slug

    assert module_slug("NVIDIA Jetson Orin NX Engineering Reference Developer Kit\x00") == "orin-nx"
    assert module_slug("NVIDIA Jetson AGX Orin Developer Kit") == "agx-orin"
    assert module_slug("NVIDIA Jetson Orin Nano Developer Kit") == "orin-nano"
    assert module_slug("") is None and module_slug("NVIDIA Jetson") is None


@pytest.mark.parametrize("text", ["", "trt10-sm87-int8-b1x16x32", "trt10.3-sm87-int4-b1x1x1",
                                  "trt10.3-sm87-int8-b16x1x32", "onnx-cpu"])
def test_bad_target_keys_are_config_errors(text):
    with pytest.raises(ConfigError):
        TargetKey.parse(text)


def test_layout_keys():
    layout = ArtifactLayout("/fleet/prod/")
    assert layout.manifest_key("m", "v1") == "fleet/prod/models/m/v1/manifest.json"
    assert layout.engine_key("m", "v1", "trt10.3-sm87-int8-b1x1x1") == (
        "fleet/prod/models/m/v1/engines/trt10.3-sm87-int8-b1x1x1/engine.plan")
    assert layout.channel_key("m", "stable") == "fleet/prod/models/m/channels/stable.json"
    assert ArtifactLayout().version_prefix("m", "v2") == "models/m/v2/"


def test_several_trusted_keys_let_a_fleet_rotate_its_model_key(tmp_path, signing_key):
    from edgeloop_core.contract import generate_signing_key, load_signing_key, load_verify_keys, sign_manifest
    from edgeloop_core.errors import ConfigError
    from tests.conftest import make_staged_version

    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    generate_signing_key(old_dir)
    generate_signing_key(new_dir)
    both = tmp_path / "trusted.pem"
    both.write_bytes((old_dir / "verify-key.pem").read_bytes() + (new_dir / "verify-key.pem").read_bytes())
    keys = load_verify_keys(both)
    assert len(keys) == 2
    manifest = make_staged_version(tmp_path / "stage")
    for directory in (old_dir, new_dir):
        verify_manifest(sign_manifest(manifest, load_signing_key(directory / "signing-key.pem")), keys)
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ConfigError):
        load_verify_keys(tmp_path / "junk.pem")


@pytest.mark.parametrize("name", ["stable\n", "v1\n", "\nstable", "demo model", "../x", "A", ""])
def test_a_name_must_match_whole(name):
    """The one name pattern is matched whole: ``re.match`` with ``$`` let a trailing newline through."""
    from edgeloop_core.contract import check_name

    with pytest.raises(ConfigError) as info:
        check_name(name, "channel")
    assert "not a valid name" in str(info.value)


def _with_dense(tmp_path):
    """The staged version plus an ``fp32-dense`` variant: two fp32 variants, so one TensorRT target key."""
    from edgeloop_core.contract import Variant

    manifest = make_staged_version(tmp_path)
    dense = Variant(file="fp32-dense.onnx", sha256="0" * 64, size_bytes=1, name="fp32-dense", precision="fp32",
                    backends=["tensorrt", "onnxruntime"])
    return Manifest.model_validate({**manifest.model_dump(), "variants": [*manifest.model_dump()["variants"],
                                                                          dense.model_dump()]})


TARGET = "trt10.3.0.30-sm87x8-orin-nx-l4t36.4-aarch64-fp32-b1x8x16"


def _engine(variant: str):
    from edgeloop_core.contract import EngineRef

    return EngineRef(file=f"engines/{TARGET}/{variant}.plan", sha256=f"{len(variant):064x}", size_bytes=len(variant),
                     built_by="fleet-builder")


def test_a_manifest_carries_a_prebuilt_engine_per_variant_of_one_target_key(tmp_path, signing_key, verify_key):
    from edgeloop_core.contract import SCHEMA_VERSION

    manifest = _with_dense(tmp_path).with_engine(TARGET, "fp32", _engine("fp32")).with_engine(
        TARGET, "fp32-dense", _engine("fp32-dense"))
    assert manifest.schema_version == SCHEMA_VERSION == 4
    assert sorted(manifest.engines) == [f"{TARGET}/fp32", f"{TARGET}/fp32-dense"]
    signed = sign_manifest(manifest, signing_key)
    parsed = Manifest.from_json(signed.to_json())
    verify_manifest(parsed, verify_key)
    assert parsed.engine_for(TARGET, "fp32") == _engine("fp32")
    assert parsed.engine_for(TARGET, "fp32-dense") == _engine("fp32-dense")
    assert parsed.engine_for(TARGET.replace("x8-orin-nx", "x4-orin-nano"), "fp32") is None
    assert {f.file for f in parsed.files()} >= {f"engines/{TARGET}/fp32.plan", f"engines/{TARGET}/fp32-dense.plan"}


@pytest.mark.parametrize(("key", "why"), [(TARGET, "keyed <target-key>/<variant>"),
                                          (f"{TARGET}/int4", "keyed <target-key>/<variant>"),
                                          ("not-a-key/fp32", "not-a-key")])
def test_a_schema_4_engine_key_names_a_target_and_a_variant_of_the_manifest(tmp_path, key, why):
    raw = json.loads(_with_dense(tmp_path).to_json())
    raw["engines"] = {key: json.loads(_engine("fp32").model_dump_json())}
    with pytest.raises(ManifestInvalid) as info:
        Manifest.from_json(json.dumps(raw))
    assert why in str(info.value) and "\n" not in str(info.value)


def test_schema_3_manifests_keep_their_target_keyed_engines_and_signatures(tmp_path, signing_key, verify_key):
    """Before schema 4 an engine was keyed by target key alone and counted for the variant its file is named after;
    such a manifest still parses, verifies (its canonical bytes are what they were) and resolves the same way, and a
    runtime of schema 3 refuses a schema 4 manifest (the `newer` row above)."""
    raw = json.loads(_with_dense(tmp_path).to_json())
    raw.update(schema_version=3, engines={TARGET: json.loads(_engine("fp32").model_dump_json())})
    old = sign_manifest(Manifest.from_json(json.dumps(raw)), signing_key)
    payload = json.loads(old.canonical_bytes())
    assert payload["schema_version"] == 3 and list(payload["engines"]) == [TARGET]  # nothing added, nothing renamed
    again = Manifest.from_json(old.to_json())
    verify_manifest(again, verify_key)
    assert again.engine_for(TARGET, "fp32") == _engine("fp32")
    assert again.engine_for(TARGET, "fp32-dense") is None  # the one engine is fp32's: its file says so
    with pytest.raises(ManifestInvalid) as info:
        again.with_engine(TARGET, "fp32-dense", _engine("fp32-dense"))
    assert "by target key alone" in str(info.value)
