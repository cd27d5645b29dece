"""The Label RPC on the device's own gRPC endpoint (beside inference), under repository control's access rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_runtime.report.capture.client import send_label
from edgeloop_core.errors import AccessDenied, ConfigError, Unauthenticated
from tests.edge_runtime.conftest import RunningEdge, publish_model, wait_until
from tests.edge_runtime.test_capture import MODEL, infer

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("control", [True, False])
def test_the_label_rpc_is_served_on_the_device_endpoint_under_repository_control(
        store, signing_key, trained, edge_settings, tmp_path, control):
    publish_model(store, signing_key, trained, "v1")
    desired = tmp_path / "desired.json"
    desired.write_text(json.dumps({"models": [{"name": MODEL, "capture": {"sample_rate": 1.0}}],
                                   "capture": {"shard_max_age_s": 3600}}))
    edge = RunningEdge(edge_settings(store.bucket, desired_file=desired, repository_control=control,
                                     control_token="s3cret"))
    edge.wait_ready()
    try:
        infer(edge, trained.x_val[:1].astype(np.float32), "req-1")
        wait_until(lambda: edge.app.capture.spool.spooled() == 1)
        if not control:
            with pytest.raises(AccessDenied) as refused:
                send_label(edge.address, MODEL, "req-1", "4", token="s3cret")
            assert "repository control is off" in str(refused.value)
            return
        with pytest.raises(Unauthenticated):
            send_label(edge.address, MODEL, "req-1", "4", token="wrong")
        answer = send_label(edge.address, MODEL, "req-1", "4", token="s3cret", source="operator")
        assert (answer.outcome, answer.captures) == ("joined", 1)
    finally:
        edge.stop()


def test_edgeloop_edge_label_sends_a_label_and_says_where_it_went(store, signing_key, trained, edge_settings,
                                                                   tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from edgeloop.cli import app

    publish_model(store, signing_key, trained, "v1")
    desired = tmp_path / "desired.json"
    desired.write_text(json.dumps({"models": [{"name": MODEL, "capture": {"sample_rate": 1.0}}],
                                   "capture": {"shard_max_age_s": 3600}}))
    edge = RunningEdge(edge_settings(store.bucket, desired_file=desired, repository_control=True,
                                     control_token="s3cret"))
    edge.wait_ready()
    try:
        infer(edge, trained.x_val[:1].astype(np.float32), "req-7")
        wait_until(lambda: edge.app.capture.spool.spooled() == 1)
        monkeypatch.setenv("EDGE_CONTROL_TOKEN", "s3cret")
        said = CliRunner().invoke(app, ["edge", "label", "req-7", "3", "--address", edge.address, "--model", MODEL])
        assert said.exit_code == 0, said.output
        assert "joined to 1 spooled capture" in said.output
        said = CliRunner().invoke(app, ["edge", "label", "req-8", "{not json", "--address", edge.address])
        assert isinstance(said.exception, ConfigError)  # edgeloop's main() prints it as one line
        assert "neither a class index nor JSON" in str(said.exception)
    finally:
        edge.stop()
