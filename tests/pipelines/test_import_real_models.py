"""Bring your own ONNX, for the models people actually have: structurally real networks (a ResNet-style residual
CNN with batch norm, a MobileNet-style depthwise-separable CNN, a two-head detector), built here with seeded weights
and exported as public model zoos publish them — opset 9, a fixed batch of 1, tensor names with ``/`` and ``:`` —
plus a model whose batch must stay fixed, a model with int64 and bool inputs, and one with external weights. Each
goes through the import pipeline (kfp.local), the real S3, the edge runtime and tritonclient, and must answer like
ONNX Runtime on the original file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from components.intake import ModelRefused, normalise
from edgeloop_core.quality import output_agreement

pytestmark = pytest.mark.integration
IMAGE = "images/in:0"


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class ResNetStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(_Residual(16), _Residual(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x)).mean(dim=(2, 3))
        return self.fc(x.view(x.size(0), -1))  # exported with the batch of 1 baked into a Reshape


class MobileNetStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def separable(ci: int, co: int, stride: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(ci, ci, 3, stride, 1, groups=ci, bias=False), nn.BatchNorm2d(ci),
                                 nn.ReLU6(), nn.Conv2d(ci, co, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU6())

        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU6(), separable(16, 32, 1),
                                      separable(32, 64, 2), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class DetectorStyle(nn.Module):
    """A backbone and two heads: boxes (anchors × 4) and class scores (anchors × 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.boxes = nn.Conv2d(32, 2 * 4, 1)
        self.scores = nn.Conv2d(32, 2 * 3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x)
        return self.boxes(f).reshape(1, -1, 4), torch.sigmoid(self.scores(f).reshape(1, -1, 3))


class BatchFolded(nn.Module):
    """Folds the batch into the channel axis (``reshape(16, -1)``): no other batch than the exported one works."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 2, 1)
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).reshape(16, -1)).mean(dim=0, keepdim=True)


class TokensAndMask(nn.Module):
    """int64 token ids and a bool padding mask → a masked mean of embeddings → class scores."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).float()
        pooled = (self.embed(ids) * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.fc(pooled)


def _seeded(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # trained-looking statistics, not the identity
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def export_zoo_style(model: nn.Module, path: Path, outputs: list[str], opset: int = 9) -> Path:
    """As model zoos publish: opset 9, a fixed batch of 1, names with '/' and ':'."""
    with torch.no_grad():
        torch.onnx.export(_seeded(model), (torch.randn(1, 3, 32, 32),), str(path), input_names=[IMAGE],
                          output_names=outputs, opset_version=opset, dynamo=False)
    return path


def _images(count: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 32, 32)).astype(np.float32)


def _per_sample(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ONNX Runtime on the original file, one sample at a time (the original accepts batch 1 only)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    count = len(next(iter(inputs.values())))
    runs = [session.run(names, {k: v[i : i + 1] for k, v in inputs.items()}) for i in range(count)]
    return {name: np.concatenate([r[j] for r in runs]) for j, name in enumerate(names)}


def _import_and_serve(tmp_path, local_s3, key_dir, edge_settings, source: Path,
                      calibration: dict[str, np.ndarray] | Path, name: str, queries: dict[str, np.ndarray], *,
                      batch: int, params: dict | None = None):
    """Import ``source`` through the pipeline (calibration: arrays, or a folder of images), serve it, send
    ``queries`` in requests of ``batch`` samples through tritonclient, and return (manifest, outputs by name, the
    running edge's events)."""
    import tritonclient.grpc as triton

    from pipelines.import_onnx import import_onnx_pipeline
    from pipelines.local_run import run_local
    from tests.edge_runtime.conftest import RunningEdge

    if isinstance(calibration, Path):
        calibration_uri = str(calibration)
    else:
        np.savez(tmp_path / "calibration.npz", **calibration)
        calibration_uri = str(tmp_path / "calibration.npz")
    bucket = f"imports-{name}"
    local_s3.store(bucket)
    mp = pytest.MonkeyPatch()
    for key, value in local_s3.env().items():
        mp.setenv(key, value)
    mp.setenv("EDGELOOP_SIGNING_KEY_FILE", str(key_dir / "signing-key.pem"))
    try:
        result = run_local({"onnx_uri": str(source), "calibration_uri": calibration_uri,
                            "model_name": name, "bucket": bucket, "s3_endpoint": local_s3.endpoint_url,
                            "min_agreement": 0.95, **(params or {})}, runs_dir=tmp_path / "runs",
                           pipeline=import_onnx_pipeline)
    finally:
        mp.undo()
    manifest = result.manifest
    assert manifest is not None and manifest.report is not None
    edge = RunningEdge(edge_settings(bucket, model_name=name, cache_dir=tmp_path / "device"))
    try:
        edge.wait_ready(90)
        client = triton.InferenceServerClient(edge.address)
        meta = client.get_model_metadata(name)
        count = len(next(iter(queries.values())))
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, count, batch):
            tensors = []
            for spec in meta.inputs:
                value = queries[spec.name][start : start + batch]
                tensor = triton.InferInput(spec.name, list(value.shape), spec.datatype)
                tensor.set_data_from_numpy(value)
                tensors.append(tensor)
            reply = client.infer(name, tensors)
            for out in meta.outputs:
                parts.setdefault(out.name, []).append(reply.as_numpy(out.name))
        events = edge.events()
    finally:
        edge.stop()
    return manifest, {k: np.concatenate(v) for k, v in parts.items()}, events


@pytest.mark.parametrize(("model", "outputs"), [
    (ResNetStyle, ["logits/out:0"]),
    (MobileNetStyle, ["logits/out:0"]),
    (DetectorStyle, ["boxes/out:0", "scores/out:0"]),
], ids=["resnet", "mobilenet", "detector"])
def test_zoo_style_models_import_serve_and_answer_like_the_original(model, outputs, tmp_path, local_s3, key_dir,
                                                                    edge_settings):
    source = export_zoo_style(model(), tmp_path / "zoo.onnx", outputs)
    assert onnx.load(str(source)).opset_import[0].version == 9
    queries = {IMAGE: _images(8, seed=1)}
    manifest, got, _ = _import_and_serve(tmp_path, local_s3, key_dir, edge_settings, source, {IMAGE: _images()},
                                         model.__name__.lower(), queries, batch=4)
    intake = manifest.training["intake"]
    assert intake["opset_before"] == 9 and intake["opset_after"] >= 13 and intake["fixed_batch"] is None
    assert any("made dynamic" in c for c in intake["changes"])
    assert manifest.inputs[0].name == IMAGE and manifest.inputs[0].shape == [-1, 3, 32, 32]
    assert [o.name for o in manifest.outputs] == outputs
    expected = _per_sample(source, queries)
    assert set(got) == set(expected) and all(got[k].shape == expected[k].shape for k in expected)
    assert output_agreement(expected, got) >= 0.95


def test_a_model_whose_batch_cannot_change_keeps_it_everywhere(tmp_path, local_s3, key_dir, edge_settings):
    import tritonclient.grpc as triton

    source = export_zoo_style(BatchFolded(), tmp_path / "folded.onnx", ["logits/out:0"], opset=11)
    queries = {IMAGE: _images(6, seed=2)}
    manifest, got, events = _import_and_serve(tmp_path, local_s3, key_dir, edge_settings, source,
                                              {IMAGE: _images(20)}, "folded", queries, batch=1)
    assert manifest.training["intake"]["fixed_batch"] == 1
    assert manifest.inputs[0].shape == [1, 3, 32, 32]  # the manifest says so
    assert output_agreement(_per_sample(source, queries), got) >= 0.95
    assert any(e.get("metric") == manifest.validation.metric and e.get("passed") for e in events)
    # the server refuses what the model cannot take, with INVALID_ARGUMENT, and never merges past batch 1
    from tests.edge_runtime.conftest import RunningEdge

    edge = RunningEdge(edge_settings("imports-folded", model_name="folded", cache_dir=tmp_path / "device"))
    try:
        edge.wait_ready(60)
        assert edge.app.runtime.serving.batcher.max_batch_size == 1
        client = triton.InferenceServerClient(edge.address)
        tensor = triton.InferInput(IMAGE, [2, 3, 32, 32], "FP32")
        tensor.set_data_from_numpy(_images(2))
        with pytest.raises(triton.InferenceServerException) as info:
            client.infer("folded", [tensor])
        assert "INVALID_ARGUMENT" in str(info.value.status())
    finally:
        edge.stop()


def test_int64_and_bool_inputs_at_opset_17_with_a_dynamic_batch(tmp_path, local_s3, key_dir, edge_settings):
    path = tmp_path / "tokens.onnx"
    with torch.no_grad():
        torch.onnx.export(_seeded(TokensAndMask()), (torch.zeros(2, 7, dtype=torch.int64),
                                                     torch.ones(2, 7, dtype=torch.bool)), str(path),
                          input_names=["ids", "mask"], output_names=["logits"],
                          dynamic_axes={"ids": {0: "batch"}, "mask": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    rng = np.random.default_rng(0)

    def tokens(count: int) -> dict[str, np.ndarray]:
        return {"ids": rng.integers(0, 50, (count, 7)).astype(np.int64), "mask": rng.random((count, 7)) > 0.3}

    queries = tokens(8)
    manifest, got, _ = _import_and_serve(tmp_path, local_s3, key_dir, edge_settings, path, tokens(32), "tokens",
                                         queries, batch=4)
    assert {(t.name, t.datatype) for t in manifest.inputs} == {("ids", "INT64"), ("mask", "BOOL")}
    assert manifest.training["intake"]["changes"] == []  # nothing to change
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, queries)
    assert output_agreement({"logits": expected}, got) >= 0.95


def test_unsigned_and_16_bit_integer_tensors_keep_their_types_end_to_end(tmp_path, local_s3, key_dir,
                                                                         edge_settings):
    from tests.onnx_models import sensor_model

    source = sensor_model(tmp_path / "sensor.onnx")
    rng = np.random.default_rng(1)

    def frames(count: int) -> dict[str, np.ndarray]:
        return {"raw": rng.integers(0, 4096, (count, 1, 8, 8)).astype(np.uint16),
                "offset": rng.integers(-2, 3, (count, 1)).astype(np.int16)}

    queries = frames(8)
    manifest, got, _ = _import_and_serve(tmp_path, local_s3, key_dir, edge_settings, source, frames(32), "sensor",
                                         queries, batch=4)
    assert [(t.name, t.datatype) for t in manifest.inputs] == [("raw", "UINT16"), ("offset", "INT16")]
    assert [(t.name, t.datatype) for t in manifest.outputs] == [("scores", "FP32"), ("label", "UINT32"),
                                                                ("label64", "UINT64")]
    assert (got["label"].dtype, got["label64"].dtype) == (np.uint32, np.uint64)  # what tritonclient was told
    expected = _per_sample(source, queries)
    assert output_agreement({"scores": expected["scores"]}, {"scores": got["scores"]}) >= 0.95
    assert np.array_equal(got["label"], got["scores"].argmax(1)) and np.array_equal(got["label64"], got["label"])


def test_external_weights_are_fetched_and_kept(tmp_path, local_s3, key_dir, edge_settings):
    source = export_zoo_style(MobileNetStyle(), tmp_path / "zoo.onnx", ["logits/out:0"])
    model = onnx.load(str(source))
    published = tmp_path / "published"
    published.mkdir()
    onnx.save(model, str(published / "mobilenet.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="mobilenet.weights", size_threshold=0)
    assert (published / "mobilenet.weights").stat().st_size > 10_000
    queries = {IMAGE: _images(4, seed=3)}
    _, got, _ = _import_and_serve(tmp_path, local_s3, key_dir, edge_settings, published / "mobilenet.onnx",
                                  {IMAGE: _images()}, "external", queries, batch=2)
    assert output_agreement(_per_sample(source, queries), got) >= 0.95


def test_a_folder_of_images_calibrates_with_recorded_preprocessing(tmp_path, local_s3, key_dir, edge_settings):
    from PIL import Image

    folder = tmp_path / "images"
    rng = np.random.default_rng(4)
    for i in range(40):  # photos of another size than the model's input, in subfolders
        (folder / f"scene-{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f"scene-{i % 3}/{i}.png")
    source = export_zoo_style(ResNetStyle(), tmp_path / "zoo.onnx", ["logits/out:0"])
    mean, std = "0.485,0.456,0.406", "0.229,0.224,0.225"
    queries = {IMAGE: _images(4, seed=5)}
    manifest, got, _ = _import_and_serve(tmp_path, local_s3, key_dir, edge_settings, source, folder, "photos",
                                         queries, batch=2, params={"calibration_mean": mean, "calibration_std": std})
    prep = manifest.preprocessing
    assert (prep.kind, prep.layout) == ("image", "NCHW") and prep.scale == pytest.approx(1 / 255)
    assert prep.mean == pytest.approx([0.485, 0.456, 0.406]) and prep.std == pytest.approx([0.229, 0.224, 0.225])
    assert manifest.validation.num_samples == 10  # a quarter of the 40 images held out
    assert output_agreement(_per_sample(source, queries), got) >= 0.95


def _graph_model(inputs, nodes, outputs, opset: int = 17, domains=()):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   *(helper.make_opsetid(d, 1) for d in domains)])


def test_what_the_intake_refuses_is_one_line_naming_the_cause(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    cases = {
        "custom op": (_graph_model([x], [helper.make_node("FusedGelu", ["x"], ["y"], domain="com.example",
                                                          name="gelu/1")], [y], domains=["com.example"]),
                      "gelu/1", "cannot import"),
        "sequence input": (_graph_model([helper.make_tensor_sequence_value_info("x", TensorProto.FLOAT, [1, 4])],
                                        [helper.make_node("SequenceAt", ["x", "i"], ["y"])], [y]),
                           "'x'", "not a tensor"),
        "unknown rank": (_graph_model([helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                                      [helper.make_node("Relu", ["x"], ["y"])], [y]), "'x'", "unknown rank"),
        "string input": (_graph_model([helper.make_tensor_value_info("x", TensorProto.STRING, [1, 4])],
                                      [helper.make_node("Identity", ["x"], ["y"])], [y]), "'x'", "STRING"),
        "bfloat16 output": (_graph_model([x], [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16)],
                                         [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [1, 4])]),
                            "output 'y'", "BFLOAT16"),
    }
    for label, (model, where, why) in cases.items():
        path = tmp_path / f"{label.replace(' ', '-')}.onnx"
        onnx.save(model, str(path))
        with pytest.raises(ModelRefused) as info:
            normalise(path, {"x": np.zeros((2, 1, 4), np.float32)}, tmp_path / "out.onnx")
        line = str(info.value)
        assert "\n" not in line and where in line and why in line, label
    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelRefused) as garbage:
        normalise(tmp_path / "garbage.onnx", {}, tmp_path / "out.onnx")
    assert "not a readable ONNX model" in str(garbage.value)


def test_the_cli_says_what_is_wrong_with_the_model_in_one_plain_line(tmp_path, local_s3, key_dir):
    import os
    import subprocess
    import sys

    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    onnx.save(_graph_model([x], [helper.make_node("FusedGelu", ["x"], ["y"], domain="com.example", name="gelu/1")],
                           [y], domains=["com.example"]), str(tmp_path / "custom.onnx"))
    np.savez(tmp_path / "calibration.npz", x=np.zeros((8, 4), np.float32))
    env = {**os.environ, **local_s3.env(), "EDGELOOP_SIGNING_KEY_FILE": str(key_dir / "signing-key.pem")}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "edgeloop"), "pipeline", "import-onnx", "--onnx", str(tmp_path /
         "custom.onnx"), "--calibration", str(tmp_path / "calibration.npz"), "--model-name", "custom", "-p",
         f"s3_endpoint={local_s3.endpoint_url}", "--runs-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=300, env=env, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr
    assert "ModelRefused" in lines[0] and "gelu/1" in lines[0] and "\x1b[" not in lines[0]
