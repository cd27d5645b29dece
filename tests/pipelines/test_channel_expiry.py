"""Channel pointers expire (90 days): a scheduled run that has nothing to train re-signs those that expire soon, and
``edgeloop pipeline channels`` flags them. Real SeaweedFS, the real pipeline through kfp.local."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeloop_core.contract import ArtifactLayout, parse_pointer, sign_pointer, verify_pointer

MODEL = "digits-cnn"
LAYOUT = ArtifactLayout()


def _publish_with_pointers(store, tmp_path, signing_key, *, training: dict | None = None) -> str:
    """A published version of ``MODEL`` and three pointers to it: ``stable`` expiring in 10 days, ``canary`` in 80,
    and ``beta`` in 10 days but signed by a foreign key. Returns the version."""
    from components.publish import publish_version
    from tests.conftest import make_staged_version

    manifest = make_staged_version(tmp_path / "v1", name=MODEL, version="v1")
    if training is not None:
        manifest = manifest.model_copy(update={"training": training})
    publish_version(store, manifest, tmp_path / "v1", signing_key, layout=LAYOUT)
    for channel, key, days in (("stable", signing_key, 10), ("canary", signing_key, 80),
                               ("beta", Ed25519PrivateKey.generate(), 10)):
        pointer = sign_pointer(MODEL, channel, "v1", 1000, key, ttl=timedelta(days=days))
        store.put_bytes(LAYOUT.channel_key(MODEL, channel), pointer.model_dump_json().encode())
    return "v1"


def _pointer(store, channel: str):
    return parse_pointer(store.get_bytes(LAYOUT.channel_key(MODEL, channel)), MODEL, channel)


def _default_fingerprint() -> dict:
    """What the plan step computes for the pipeline's defaults on ``digits``: a version trained on it is current."""
    from dataclasses import asdict, fields

    from components.data import load_dataset
    from components.plan import TrainingConfig, fingerprint
    from pipelines.local_run import pipeline_parameters

    defaults = {name: p.default for name, p in pipeline_parameters().items()}
    config = TrainingConfig(**{f.name: defaults[f.name] for f in fields(TrainingConfig)})
    data = load_dataset(defaults["data_uri"], seed=defaults["seed"], image_size=defaults["image_size"],
                        channels=defaults["channels"])
    return {"fingerprint": fingerprint(data, config), "config": asdict(config)}


@pytest.mark.integration
def test_skipped_scheduled_run_resigns_the_pointer_that_expires_soon(local_s3, key_dir, signing_key, verify_key,
                                                                     tmp_path, monkeypatch):
    from pipelines.local_run import run_local

    for name, value in local_s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EDGELOOP_SIGNING_KEY_FILE", str(key_dir / "signing-key.pem"))
    store = local_s3.store("channel-expiry-run")
    _publish_with_pointers(store, tmp_path, signing_key, training=_default_fingerprint())
    before = {c: _pointer(store, c) for c in ("stable", "canary", "beta")}
    raw_before = {c: store.get_bytes(LAYOUT.channel_key(MODEL, c)) for c in ("canary", "beta")}

    result = run_local({"model_name": MODEL, "bucket": store.bucket, "s3_endpoint": local_s3.endpoint_url},
                       runs_dir=tmp_path / "runs")

    assert result.decision == "skip" and result.version is None
    stable = verify_pointer(_pointer(store, "stable"), verify_key)  # the model key signed the new pointer
    assert stable.version == before["stable"].version == "v1"
    assert stable.sequence > before["stable"].sequence
    assert stable.expires - datetime.now(timezone.utc) > timedelta(days=89)
    # 80 days left: outside the window, untouched; a pointer this key did not sign is never laundered
    assert {c: store.get_bytes(LAYOUT.channel_key(MODEL, c)) for c in ("canary", "beta")} == raw_before
    assert store.list_prefixes(LAYOUT.model_prefix(MODEL)) == ["channels", "v1"]  # nothing new was published


@pytest.mark.integration
def test_channels_command_flags_the_pointer_that_expires_soon(local_s3, key_dir, signing_key, tmp_path):
    from tests.pipelines.test_cli import run_cli

    store = local_s3.store("channel-expiry-cli")
    _publish_with_pointers(store, tmp_path, signing_key)
    done = run_cli("pipeline", "channels", "--bucket", store.bucket, "--verify-key",
                   str(key_dir / "verify-key.pem"), env=local_s3.env())
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout
    flagged = [line for line in lines if "EXPIRES SOON" in line]
    assert len(flagged) == 1 and flagged[0].startswith(f"{MODEL}/stable → v1 (sequence 1000,"), done.stdout
    assert "in 10 days" in flagged[0] and f"edgeloop pipeline promote {MODEL} v1 --channel stable" in flagged[0]
    canary = next(line for line in lines if line.startswith(f"{MODEL}/canary"))
    assert "in 80 days" in canary and "EXPIRES" not in canary
    beta = next(line for line in lines if line.startswith(f"{MODEL}/beta"))
    assert "UNTRUSTED" in beta and "not trusted here" in beta


@pytest.mark.integration
def test_resign_keeps_a_pointer_promoted_meanwhile(local_s3, signing_key, verify_key, tmp_path):
    """A promote that lands between the re-sign's read and its write wins: the write is conditional (If-Match), so
    the re-sign never puts the old version back over the new one."""
    from components.publish import move_channel, publish_version, resign_channels
    from tests.conftest import make_staged_version

    store = local_s3.store("channel-expiry-race")
    _publish_with_pointers(store, tmp_path, signing_key)
    publish_version(store, make_staged_version(tmp_path / "v2", name=MODEL, version="v2"), tmp_path / "v2",
                    signing_key, layout=LAYOUT)
    operator = local_s3.store(store.bucket)  # another client: the operator's `edgeloop pipeline promote`

    promoted = []

    def promote_first(params, **_):  # runs just before the re-sign writes stable
        if params["Key"].endswith("/stable.json") and not promoted:
            promoted.append(move_channel(operator, LAYOUT, MODEL, "stable", "v2", signing_key))

    store.client.meta.events.register("before-parameter-build.s3.PutObject", promote_first)
    assert resign_channels(store, LAYOUT, MODEL, signing_key) == []
    stable = verify_pointer(_pointer(store, "stable"), verify_key)
    assert promoted and stable.version == "v2"  # the operator's move stands


def test_only_the_signing_steps_get_the_signing_key(tmp_path):
    from pipelines.cluster import compile_pipeline

    path = compile_pipeline(tmp_path / "p.yaml", s3_secret="edgeloop-s3", signing_secret="edgeloop-signing")
    spec, platform = yaml.safe_load_all(path.read_text())
    kube = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert kube["exec-resign-channels"]["secretAsVolume"][0]["secretName"] == "edgeloop-signing"
    assert kube["exec-resign-channels"]["secretAsEnv"][0]["secretName"] == "edgeloop-s3"
    env = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"]["exec-resign-channels"]["container"]
           .get("env", [])}
    assert env["EDGELOOP_SIGNING_KEY_FILE"] == "/etc/edgeloop/signing/signing-key.pem"
    signing = {step for step, conf in kube.items() if conf.get("secretAsVolume")}
    assert signing == {"exec-publish", "exec-resign-channels", "exec-promote"}  # promote moves a signed pointer
    conditions = [t.get("triggerPolicy", {}).get("condition", "") for t in spec["root"]["dag"]["tasks"].values()]
    assert any("skip" in c for c in conditions) and any("train" in c for c in conditions)  # it runs when plan skips
