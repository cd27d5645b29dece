"""Bring your own ONNX: a multi-output model with dynamic axes, built here, goes through kfp.local, the real S3, the
edge runtime's task-aware validation (each output on its own), and tritonclient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from components.import_onnx import tensor_specs
from edgeloop_core.quality import output_agreement

pytestmark = pytest.mark.integration


class TwoHeads(nn.Module):
    """A small 'detector': per-sequence features → class scores and a box regression, batch and length dynamic."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv1d(4, 32, 3, padding=1), nn.ReLU(), nn.Conv1d(32, 32, 3, padding=1),
                                     nn.ReLU())
        self.scores = nn.Linear(32, 5)
        self.boxes = nn.Linear(32, 4)

    def forward(self, signal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.encoder(signal).mean(dim=2)
        return self.scores(pooled), torch.sigmoid(self.boxes(pooled))


def build_model(tmp_path):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    path = tmp_path / "detector.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.randn(2, 4, 32),), str(path), input_names=["signal"],
                          output_names=["scores", "boxes"],
                          dynamic_axes={"signal": {0: "batch", 2: "length"}, "scores": {0: "batch"},
                                        "boxes": {0: "batch"}}, opset_version=17, dynamo=False)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calibration.npz", signal=rng.standard_normal((64, 4, 32)).astype(np.float32))
    return model, path


def test_specs_keep_every_output_and_dynamic_axis(tmp_path):
    _, path = build_model(tmp_path)
    inputs, outputs = tensor_specs(path)
    assert [(t.name, t.shape) for t in inputs] == [("signal", [-1, 4, -1])]
    assert [(t.name, t.shape) for t in outputs] == [("scores", [-1, 5]), ("boxes", [-1, 4])]


def test_agreement_metric():
    a = {"x": np.array([[1.0, 0.0], [0.0, 2.0]])}
    assert output_agreement(a, a) == pytest.approx(1.0)
    assert output_agreement(a, {"x": np.array([[0.0, 1.0], [0.0, 2.0]])}) == pytest.approx(0.5)


def test_import_publish_validate_serve(tmp_path, local_s3, key_dir, edge_settings):
    import tritonclient.grpc as triton

    from pipelines.import_onnx import import_onnx_pipeline
    from pipelines.local_run import run_local
    from tests.edge_runtime.conftest import RunningEdge

    model, path = build_model(tmp_path)
    store = local_s3.store("imports")
    mp = pytest.MonkeyPatch()
    for name, value in local_s3.env().items():
        mp.setenv(name, value)
    mp.setenv("EDGELOOP_SIGNING_KEY_FILE", str(key_dir / "signing-key.pem"))
    try:
        result = run_local({"onnx_uri": str(path), "calibration_uri": str(tmp_path / "calibration.npz"),
                            "model_name": "detector", "bucket": "imports", "s3_endpoint": local_s3.endpoint_url,
                            "min_agreement": 0.95, "slices": "first=scores:1:0:2,rest=scores:1:2"},
                           runs_dir=tmp_path / "runs", pipeline=import_onnx_pipeline)
    finally:
        mp.undo()
    manifest = result.manifest
    # two different quantities (class scores, one box per sample): a raw model, each output judged on its own
    assert manifest is not None and manifest.validation.metric == "tensor_agreement"
    assert manifest.task.kind == "raw" and manifest.validation.control is not None
    assert [(s.name, s.output, s.axis, s.start, s.stop) for s in manifest.task.slices] == [
        ("first", "scores", 1, 0, 2), ("rest", "scores", 1, 2, None)]  # declared: judged each on its own
    assert manifest.validation.control < 0.95 - 0.1
    assert {v.name for v in manifest.variants} == {"fp32", "fp16", "int8-qdq", "int8-ort"}
    assert [o.name for o in manifest.outputs] == ["scores", "boxes"] and manifest.inputs[0].shape == [-1, 4, -1]
    assert all(v.accuracy >= 0.95 for v in manifest.variants)  # agreement with FP32, measured in the cloud

    # with a latency budget the device sweeps batch sizes on the imported version's own calibration inputs (an
    # import has no "inputs" array in validation.npz; that once hung the device in `validating`)
    import json

    from tests.edge_runtime.conftest import assert_captured

    desired = tmp_path / "desired.json"  # an imported model's requests come home too (field capture, every one)
    desired.write_text(json.dumps({"models": [{"name": "detector", "capture": {"sample_rate": 1.0}}],
                                   "capture": {"shard_max_age_s": 0.2}}))
    assert manifest.field_baseline is not None  # the drift baseline, from the held-out rows
    edge = RunningEdge(edge_settings(store.bucket, desired_file=desired, batching_budget_ms=50.0))
    sent = {}
    try:
        edge.wait_ready()
        validated = edge.events("validated")[-1]
        assert validated["metric"] == "tensor_agreement" and validated["passed"]
        (sweep,) = edge.events("batch_sweep")
        assert [p["batch"] for p in sweep["points"]][0] == 1 and sweep["chosen"]["expected_worst_ms"] <= 50.0
        assert edge.app.runtime.serving.batcher.max_batch_size == sweep["chosen"]["max_batch_size"]
        client = triton.InferenceServerClient(edge.address)
        meta = client.get_model_metadata("detector")
        assert [o.name for o in meta.outputs] == ["scores", "boxes"]
        for length in (32, 48):  # the dynamic length axis passes through
            x = np.random.default_rng(length).standard_normal((3, 4, length)).astype(np.float32)
            tensor = triton.InferInput("signal", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            reply = client.infer("detector", [tensor], request_id=f"len-{length}")
            with torch.no_grad():
                scores, boxes = model(torch.from_numpy(x))
            got = {"scores": reply.as_numpy("scores"), "boxes": reply.as_numpy("boxes")}
            assert got["scores"].shape == (3, 5) and got["boxes"].shape == (3, 4)
            assert output_agreement({"scores": scores.numpy(), "boxes": boxes.numpy()}, got) >= 0.95
            sent[f"len-{length}"] = (x, got)
        assert_captured(store, sent, "detector")
    finally:
        edge.stop()


def test_cli_import_with_an_impossible_gate_fails_in_one_line(tmp_path, local_s3, key_dir):
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, path = build_model(tmp_path)
    local_s3.store("imports-gate")
    env = {**os.environ, **local_s3.env(), "EDGELOOP_SIGNING_KEY_FILE": str(key_dir / "signing-key.pem")}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "edgeloop"), "pipeline", "import-onnx", "--onnx", str(path),
         "--calibration", str(tmp_path / "calibration.npz"), "--model-name", "detector", "-p", "min_agreement=1.01",
         "-p", "bucket=imports-gate", "-p", f"s3_endpoint={local_s3.endpoint_url}", "--runs-dir",
         str(tmp_path / "runs")], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "GateFailed" in lines[0] and "< 1.0100" in lines[0]
    assert local_s3.store("imports-gate").list_keys("models/") == []
