"""The `edgeloop` command: bad input gives one readable line and exit code 1, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EDGELOOP = str(Path(sys.executable).parent / "edgeloop")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert shutil.which(EDGELOOP), "the edgeloop entry point is installed with the project"
    return subprocess.run([EDGELOOP, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, check=False)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_unknown_parameter_is_one_line():
    line = one_line_error(run_cli("pipeline", "run", "-p", "epochz=3"))
    assert "unknown pipeline parameter 'epochz'" in line


def test_bad_parameter_value_is_one_line():
    line = one_line_error(run_cli("pipeline", "submit", "--host", "http://127.0.0.1:9", "-p", "epochs=many"))
    assert "epochs" in line and "not a valid int" in line


@pytest.mark.integration
def test_verify_command(local_s3, key_dir, tmp_path):
    from components.publish import publish_version
    from edgeloop_core.contract import ArtifactLayout, load_signing_key
    from tests.conftest import make_staged_version

    store = local_s3.store("cli-verify")
    manifest = make_staged_version(tmp_path)
    publish_version(store, manifest, tmp_path, load_signing_key(key_dir / "signing-key.pem"),
                    layout=ArtifactLayout(), channel="stable")
    env = {**local_s3.env(), "EDGELOOP_VERIFY_KEY_FILE": str(key_dir / "verify-key.pem")}
    ok = run_cli("pipeline", "verify", "demo-model", "stable", "--bucket", "cli-verify", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "signature and 4 files verified" in ok.stdout

    store.put_bytes("models/demo-model/v1/fp32.onnx", b"swapped")
    line = one_line_error(run_cli("pipeline", "verify", "demo-model", "v1", "--bucket", "cli-verify", env=env))
    assert "fp32.onnx" in line and "size" in line

    line = one_line_error(run_cli("pipeline", "verify", "demo-model", "v1", "--bucket", "cli-verify",
                                  env={**env, "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}))
    assert "cannot reach" in line


@pytest.mark.integration
def test_promote_moves_a_channel_with_a_higher_signed_sequence(local_s3, key_dir, tmp_path):
    import json

    from components.publish import publish_version
    from edgeloop_core.contract import ArtifactLayout, load_signing_key, load_verify_key, parse_pointer, verify_pointer
    from tests.conftest import make_staged_version

    store = local_s3.store("cli-promote")
    publish_version(store, make_staged_version(tmp_path / "v1"), tmp_path / "v1",
                    load_signing_key(key_dir / "signing-key.pem"), layout=ArtifactLayout(), channel="stable")
    key = ArtifactLayout().channel_key("demo-model", "stable")
    before = parse_pointer(store.get_bytes(key), "demo-model", "stable")
    env = {**local_s3.env(), "EDGELOOP_SIGNING_KEY_FILE": str(key_dir / "signing-key.pem")}
    done = run_cli("pipeline", "promote", "demo-model", "v1", "--channel", "stable", "--bucket", "cli-promote",
                   env=env)
    assert done.returncode == 0, done.stderr
    after = verify_pointer(parse_pointer(store.get_bytes(key), "demo-model", "stable"),
                           load_verify_key(key_dir / "verify-key.pem"))
    assert after.version == "v1" and after.sequence > before.sequence
    line = one_line_error(run_cli("pipeline", "promote", "demo-model", "v9", "--bucket", "cli-promote", env=env))
    assert "v9" in line and "publish it first" in line
    assert json.loads(store.get_bytes(key))["sequence"] == after.sequence  # nothing moved
