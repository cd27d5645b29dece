"""The object store and the fetch/verify path against a real SeaweedFS S3 server on loopback."""

from __future__ import annotations

import json

import pytest

from components.publish import publish_version
from edgeloop_core.contract import ArtifactLayout
from edgeloop_core.errors import (
    BucketNotFound,
    DigestMismatch,
    ObjectNotFound,
    SignatureInvalid,
    StoreUnavailable,
    VersionExists,
)
from edgeloop_core.published import read_manifest, resolve_version, verify_published
from edgeloop_core.store import ObjectStore
from tests.conftest import make_staged_version

pytestmark = pytest.mark.integration


def test_put_get_list_exists(store, tmp_path):
    store.put_bytes("a/b/c.json", b"{}", content_type="application/json")
    (tmp_path / "big.bin").write_bytes(b"x" * (9 * 1024 * 1024))  # multipart upload
    store.put_file("a/big.bin", tmp_path / "big.bin")
    assert store.get_bytes("a/b/c.json") == b"{}"
    assert sorted(store.list_keys("a/")) == ["a/b/c.json", "a/big.bin"]
    assert store.list_prefixes("a/") == ["b"]
    assert store.exists("a/big.bin") and not store.exists("a/nothing")
    dest = store.download_file("a/big.bin", tmp_path / "out" / "big.bin")
    assert dest.read_bytes() == (tmp_path / "big.bin").read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["big.bin"]  # no temporary file left behind


def test_errors_are_ours_with_next_steps(store, local_s3, tmp_path):
    with pytest.raises(ObjectNotFound):
        store.get_bytes("missing")
    with pytest.raises(ObjectNotFound):
        store.download_file("missing", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    missing_bucket = ObjectStore("no-such-bucket-here", endpoint_url=local_s3.endpoint_url, client=store.client)
    with pytest.raises(BucketNotFound) as info:
        missing_bucket.get_bytes("k")
    assert "create it" in str(info.value)
    store.put_bytes("once", b"1", if_absent=True)
    with pytest.raises(VersionExists):
        store.put_bytes("once", b"2", if_absent=True)
    assert store.get_bytes("once") == b"1"


def test_wrong_credentials_and_dead_endpoint(store, local_s3, monkeypatch):
    store.put_bytes("k", b"secret data")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StoreUnavailable) as denied:
        ObjectStore(store.bucket, endpoint_url=local_s3.endpoint_url).get_bytes("k")
    assert "AWS_ACCESS_KEY_ID" in str(denied.value)
    assert "wrong-secret" not in str(denied.value)
    dead = ObjectStore("edgeloop", endpoint_url="http://127.0.0.1:9")
    dead.client.meta.config.retries = {"max_attempts": 1}
    with pytest.raises(StoreUnavailable) as unreachable:
        dead.get_bytes("k")
    assert "cannot reach" in str(unreachable.value)


def test_published_version_verifies_and_tampering_is_caught(store, tmp_path, signing_key, verify_key):
    layout = ArtifactLayout("fleet")
    manifest = make_staged_version(tmp_path / "stage")
    publish_version(store, manifest, tmp_path / "stage", signing_key, layout=layout, channel="stable")
    assert resolve_version(store, layout, "demo-model", "stable") == "v1"
    assert resolve_version(store, layout, "demo-model", "v1") == "v1"
    verified = verify_published(store, layout, "demo-model", "v1", verify_key)
    assert verified.signature is not None

    # a file swapped in the bucket: the manifest still verifies, the file does not
    store.put_bytes(layout.file_key("demo-model", "v1", "int8-ort.onnx"), b"evil weights")
    with pytest.raises(DigestMismatch):
        verify_published(store, layout, "demo-model", "v1", verify_key)

    # a manifest edited in the bucket (tolerance loosened): the signature no longer matches
    key = layout.manifest_key("demo-model", "v1")
    raw = json.loads(store.get_bytes(key))
    raw["validation"]["tolerance"] = 1.0
    store.put_bytes(key, json.dumps(raw).encode())
    with pytest.raises(SignatureInvalid):
        read_manifest(store, layout, "demo-model", "v1", verify_key)


def test_publish_refuses_to_overwrite_and_leaves_the_first_untouched(store, tmp_path, signing_key, verify_key):
    layout = ArtifactLayout()
    first = make_staged_version(tmp_path / "one")
    publish_version(store, first, tmp_path / "one", signing_key, layout=layout, channel="stable")
    before = {k: store.get_bytes(k) for k in store.list_keys(layout.version_prefix("demo-model", "v1"))}

    second = make_staged_version(tmp_path / "two")  # same name and version, different random bytes
    with pytest.raises(VersionExists) as info:
        publish_version(store, second, tmp_path / "two", signing_key, layout=layout, channel="stable")
    assert "immutable" in str(info.value)

    after = {k: store.get_bytes(k) for k in store.list_keys(layout.version_prefix("demo-model", "v1"))}
    assert after == before
    verify_published(store, layout, "demo-model", "v1", verify_key)


def test_unknown_version_or_channel(store):
    with pytest.raises(ObjectNotFound) as info:
        resolve_version(store, ArtifactLayout(), "demo-model", "nightly")
    assert "neither a version nor a channel" in str(info.value)
