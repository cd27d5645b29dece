"""A device's S3 identity reaches only what it needs (edgeloop_core.contract.captures.DeviceGrants): it reads the
models tree and writes its own captures, and it cannot read or write another device's captures, nor write, delete or
plant anything in the models tree. A SeaweedFS of its own with an identity per device (SeaweedFS grants actions on
key prefixes, the same shape as the IAM policy DeviceGrants.iam_policy writes for AWS); the real runtime serves and
uploads its captures with nothing but its device's keys."""

from __future__ import annotations

import json

import boto3
import numpy as np
import pytest
import tritonclient.grpc as triton
from botocore.config import Config
from botocore.exceptions import ClientError

from edge_runtime.settings import EdgeSettings
from edgeloop.local_s3 import LocalS3
from edgeloop_core.contract.captures import CaptureLayout
from tests.edge_runtime.conftest import RunningEdge, publish_model, wait_until

pytestmark = pytest.mark.integration
BUCKET, MODEL = "fleet", "digits-cnn"


def seaweed_actions(bucket: str, device: str) -> list[str]:
    """DeviceGrants in SeaweedFS's action grammar (an action on a key prefix)."""
    grants = CaptureLayout().device_grants(device)
    return [f"Read:{bucket}/{grants.read}*", f"Write:{bucket}/{grants.write}*"]


@pytest.fixture(scope="module")
def fleet_s3(tmp_path_factory):
    server = LocalS3(tmp_path_factory.mktemp("seaweedfs-identities"))
    for device in ("dev-1", "dev-2", "dev-10"):
        server.add_identity(device, seaweed_actions(BUCKET, device))
    with server:
        yield server


def client_of(s3: LocalS3, identity: str):
    keys = s3.env(identity)
    return boto3.client("s3", endpoint_url=s3.endpoint_url, aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))


def denied(call) -> bool:
    try:
        call()
    except ClientError as exc:
        return exc.response["Error"]["Code"] in ("AccessDenied", "403")
    return False


def test_a_device_identity_serves_and_uploads_its_captures_and_reaches_nothing_else(
        fleet_s3, signing_key, trained, key_dir, tmp_path, monkeypatch):
    admin = fleet_s3.store(BUCKET)
    publish_model(admin, signing_key, trained, "v1")
    layout = CaptureLayout()
    admin.put_bytes(layout.device_prefix("dev-2") + "models/digits-cnn/2026-12-05/other.parquet", b"dev-2's")
    for name, value in fleet_s3.env("dev-1").items():
        monkeypatch.setenv(name, value)
    desired = tmp_path / "desired.json"
    desired.write_text(json.dumps({"models": [{"name": MODEL, "capture": {"sample_rate": 1.0}}],
                                   "capture": {"shard_max_age_s": 0.2}}))
    edge = RunningEdge(EdgeSettings(
        s3_endpoint_url=fleet_s3.endpoint_url, s3_bucket=BUCKET, cache_dir=tmp_path / "cache", desired_file=desired,
        verify_key_file=key_dir / "verify-key.pem", grpc_port=0, metrics_port=0, poll_interval_s=3600,
        retry_initial_s=0.1, retry_max_s=0.3, telemetry_interval_s=3600, device_id="dev-1",
        variant_choice_budget_s=0))
    try:
        edge.wait_ready()  # manifests, pointers, variants and the validation set: read with dev-1's keys alone
        client = triton.InferenceServerClient(edge.address)
        x = trained.x_val[:2].astype(np.float32)
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        client.infer(MODEL, [tensor], request_id="r-1")
        client.close()
        mine = layout.device_prefix("dev-1")
        wait_until(lambda: any(k.endswith(".parquet") for k in admin.list_keys(mine)), timeout=30)
    finally:
        edge.stop()

    dev1, manifest_key = client_of(fleet_s3, "dev-1"), f"models/{MODEL}/v1/manifest.json"
    other = layout.device_prefix("dev-2") + "models/digits-cnn/2026-12-05/other.parquet"
    assert dev1.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read()  # it reads the models tree
    assert denied(lambda: dev1.get_object(Bucket=BUCKET, Key=other))  # not another device's captures
    assert denied(lambda: dev1.put_object(Bucket=BUCKET, Key=other, Body=b"overwritten"))
    assert denied(lambda: dev1.delete_object(Bucket=BUCKET, Key=other))
    assert denied(lambda: dev1.put_object(Bucket=BUCKET, Key=layout.device_prefix("dev-10") + "x", Body=b"x"))
    assert denied(lambda: dev1.list_objects_v2(Bucket=BUCKET, Prefix=layout.device_prefix("dev-2")))
    assert denied(lambda: dev1.put_object(Bucket=BUCKET, Key=manifest_key, Body=b"{}"))  # nor plant a version
    assert denied(lambda: dev1.put_object(Bucket=BUCKET, Key=f"models/{MODEL}/channels/stable.json", Body=b"{}"))
    assert denied(lambda: dev1.delete_object(Bucket=BUCKET, Key=manifest_key))
    assert admin.get_bytes(other) == b"dev-2's" and json.loads(admin.get_bytes(manifest_key))["version"] == "v1"


def test_the_grants_as_an_iam_policy():
    grants = CaptureLayout("fleet-a").device_grants("jetson-7")
    assert (grants.read, grants.write) == ("fleet-a/models/", "fleet-a/captures/jetson-7/")
    statements = {s["Sid"]: s for s in grants.iam_policy("acme")["Statement"]}
    assert statements["ReadModels"]["Resource"] == ["arn:aws:s3:::acme/fleet-a/models/*"]
    assert statements["WriteOwnCaptures"]["Action"] == ["s3:PutObject"]
    assert statements["WriteOwnCaptures"]["Resource"] == ["arn:aws:s3:::acme/fleet-a/captures/jetson-7/*"]
