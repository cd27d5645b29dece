"""Bring your own YOLO: real ultralytics exports (:mod:`tests.pipelines.yolo` — YOLOv8n, YOLO11n and YOLOv10n, opset
17 and 18, 320 and 640 pixels, a fixed batch of 1 and ``dynamic=True``) through the intake, task inference, and for a
representative few the whole import → publish → serve path; plus graphs built here for what the intake must say when
it cannot make a batch dynamic.

The exports have random weights with BatchNorm statistics gathered on random images and class-score biases set so
FP32 scores reach ~0.5–0.99 on some anchors of each image (see :mod:`tests.pipelines.yolo`): untouched random weights
give every image the same boxes and scores of ~1e-4, so nothing would be detected and no negative control could tell
one image from another. Inputs are uniform [0, 1) noise, as ultralytics models take images scaled by 1/255.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from components.import_onnx import tensor_specs
from components.intake import normalise
from components.tasks import infer_model_task, infer_task
from edgeloop_core.contract import TensorSpec
from edgeloop_core.errors import ConfigError
from tests.pipelines.yolo import FAMILIES, ExportSpec

EDGELOOP = str(Path(sys.executable).parent / "edgeloop")
INTAKE_SPECS = [ExportSpec(family, opset, imgsz, dynamic) for family in FAMILIES for opset in (17, 18)
                for imgsz in (320, 640) for dynamic in (False, True)]


def _images(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 3, size, size), dtype=np.float32)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _one_at_a_time(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ONNX Runtime on ``path``, one sample at a time (what a batch must reproduce)."""
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    count = len(next(iter(inputs.values())))
    runs = [session.run(names, {k: v[i : i + 1] for k, v in inputs.items()}) for i in range(count)]
    return {name: np.concatenate([r[j] for r in runs]) for j, name in enumerate(names)}


def _expected_slices(spec: ExportSpec) -> list[tuple[str, int, int, int | None]]:
    if spec.end2end:  # [batch, 300, 6]: x1, y1, x2, y2, score, class
        return [("boxes", 2, 0, 4), ("scores", 2, 4, 5), ("classes", 2, 5, 6)]
    return [("boxes", 1, 0, 4), ("scores", 1, 4, None)]  # [batch, 4 + 80, anchors]


@pytest.mark.integration
@pytest.mark.parametrize("spec", INTAKE_SPECS, ids=lambda spec: spec.slug)
def test_ultralytics_exports_take_a_dynamic_batch_and_say_their_task(spec, yolo_exporter, tmp_path):
    """Every export leaves the intake with a dynamic batch (the fixed-batch ones share one shape constant across
    three Reshapes: the intake used to duplicate it, fail onnx.checker and keep batch 1), a batch of 2 answers
    exactly like the original run one sample at a time, and the task is read from the graph — dynamic exports
    declare ``[batch, 84, anchors]``, so the anchors come from a run on a calibration sample."""
    source = yolo_exporter.export(spec)
    images = _images(2, spec.imgsz)
    report = normalise(source, {"images": images}, tmp_path / "fp32.onnx")
    assert report.fixed_batch is None, report.changes
    if not spec.dynamic:
        assert any(c.startswith("fixed batch 1 made dynamic") for c in report.changes), report.changes
    inputs, outputs = tensor_specs(tmp_path / "fp32.onnx")
    assert inputs[0].shape[0] == -1 and [o.name for o in outputs] == ["output0"] and outputs[0].shape[0] == -1

    batch = _session(tmp_path / "fp32.onnx").run(["output0"], {"images": images})[0]
    np.testing.assert_allclose(batch, _one_at_a_time(source, {"images": images})["output0"], rtol=1e-4, atol=1e-4)
    assert batch.shape == ((2, 300, 6) if spec.end2end else (2, 84, (spec.imgsz // 8) ** 2 * 21 // 16))

    task = infer_model_task(tmp_path / "fp32.onnx", {"images": images})
    assert task.kind == "detection" and task.layout == ("end2end" if spec.end2end else "yolov8")
    assert task.num_classes == 80
    assert [(s.name, s.axis, s.start, s.stop) for s in task.slices] == _expected_slices(spec)
    assert all(s.output == "output0" for s in task.slices)


def _shared_reshape_model(batch: int = 1) -> onnx.ModelProto:
    """YOLOv8's pattern, small: three Reshapes of three feature maps share one shape constant ``[1, 4, -1]``, and
    their results are concatenated along the anchors."""
    from onnx import TensorProto, helper, numpy_helper

    inputs = [helper.make_tensor_value_info(f"p{i}", TensorProto.FLOAT, [batch, 4, size, size])
              for i, size in enumerate((8, 4, 2))]
    shape = numpy_helper.from_array(np.array([batch, 4, -1], np.int64), "shape")
    nodes = [helper.make_node("Reshape", [f"p{i}", "shape"], [f"r{i}"], name=f"reshape{i}") for i in range(3)]
    nodes.append(helper.make_node("Concat", ["r0", "r1", "r2"], ["out"], axis=2, name="join"))
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 4, 84])
    graph = helper.make_graph(nodes, "shared", inputs, [out], [shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_shape_constant_shared_by_several_reshapes_is_rewritten_once(tmp_path):
    onnx.save(_shared_reshape_model(), str(tmp_path / "shared.onnx"))
    rng = np.random.default_rng(0)
    calibration = {f"p{i}": rng.standard_normal((4, 4, s, s)).astype(np.float32) for i, s in enumerate((8, 4, 2))}
    report = normalise(tmp_path / "shared.onnx", calibration, tmp_path / "fp32.onnx")
    assert report.fixed_batch is None
    assert report.changes == ["fixed batch 1 made dynamic (3 Reshape(s) no longer hard-code it)"]
    graph = onnx.load(str(tmp_path / "fp32.onnx")).graph
    names = [i.name for i in graph.initializer]
    assert len(names) == len(set(names))  # one rewritten copy, not one per Reshape
    assert len({n.input[1] for n in graph.node if n.op_type == "Reshape"}) == 1
    got = _session(tmp_path / "fp32.onnx").run(["out"], calibration)[0]
    assert got.shape == (4, 4, 84)
    np.testing.assert_allclose(got, _one_at_a_time(tmp_path / "shared.onnx", calibration)["out"], rtol=1e-6)


def _fixed_batch_model(kind: str) -> onnx.ModelProto:
    """A graph whose batch cannot change: ``concat`` joins the input with a ``[1, 4]`` constant (ONNX Runtime
    refuses batch 2), ``mean`` averages over the batch axis (batch 2 gives other numbers)."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    if kind == "concat":
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
        pad = numpy_helper.from_array(np.ones((1, 4), np.float32), "pad")
        graph = helper.make_graph([helper.make_node("Concat", ["x", "pad"], ["y"], axis=1, name="join")], "g",
                                  [x], [y], [pad])
    else:
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
        graph = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["m"], keepdims=1, axes=[0]),
                                   helper.make_node("Mul", ["x", "m"], ["y"], name="scale")], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("kind", "why"), [
    ("concat", "ONNX Runtime cannot run it at batch 2 (Concat node 'join': Non concat axis dimensions must match"),
    ("mean", "at batch 2 output 'y' differs from the same samples run one at a time"),
])
def test_a_batch_that_cannot_change_is_kept_with_the_real_reason(kind, why, tmp_path):
    onnx.save(_fixed_batch_model(kind), str(tmp_path / "model.onnx"))
    calibration = {"x": np.random.default_rng(1).random((4, 4), dtype=np.float32) + 0.5}
    report = normalise(tmp_path / "model.onnx", calibration, tmp_path / "fp32.onnx")
    assert report.fixed_batch == 1
    assert len(report.changes) == 1 and report.changes[0].startswith(f"the batch stays fixed at 1: {why}")
    assert "does not allow another batch" not in report.changes[0] and "\n" not in report.changes[0]


def _spec(shape: list[int], name: str = "output0") -> TensorSpec:
    return TensorSpec(name=name, datatype="FP32", shape=shape)


def test_shapes_alone_decide_only_what_they_say():
    """Declared shapes: a static YOLOv8 head and an end-to-end ``[batch, 300, 6]`` are recognised; a dynamic
    ``[-1, 84, -1]`` is not guessed at (raw), and a stated detection without a layout that fits is one line asking
    for ``--layout``."""
    assert infer_task([_spec([-1, 84, 8400])]).layout == "yolov8"
    end2end = infer_task([_spec([-1, 300, 6])])
    assert end2end.layout == "end2end" and end2end.num_classes is None
    assert infer_task([_spec([-1, 300, 6])], num_classes=80).num_classes == 80
    assert infer_task([_spec([-1, 84, -1])]).kind == "raw"
    with pytest.raises(ConfigError) as info:
        infer_task([_spec([-1, 84, -1])], "detection")
    assert "needs --layout" in str(info.value) and "\n" not in str(info.value)
    stated = infer_task([_spec([-1, 84, -1])], "detection", "yolov8")
    assert stated.num_classes == 80 and [s.name for s in stated.slices] == ["boxes", "scores"]
    with pytest.raises(ConfigError) as misfit:
        infer_task([_spec([-1, 300, 4])], "detection", "end2end")
    assert "does not fit output 'output0'" in str(misfit.value)
    with pytest.raises(ConfigError) as unknown:
        infer_task([_spec([-1, 300, 6])], "detection", "yolov7")
    assert "--layout 'yolov7' is not one of" in str(unknown.value)


def _yolo_head_model(classes: int, size: int) -> onnx.ModelProto:
    """A YOLOv8-style head over a dynamic image: boxes ``[batch, 4, anchors]`` joined on axis 1 with Sigmoid class
    scores ``[batch, classes, anchors]``, declared ``[batch, 4 + classes, anchors]`` as a dynamic export has it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    image = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + classes, "anchors"])
    weights = [numpy_helper.from_array(rng.standard_normal((c, 3, 1, 1)).astype(np.float32), n)
               for n, c in (("wb", 4), ("wc", classes))]
    flat = numpy_helper.from_array(np.array([0, 0, -1], np.int64), "flat")
    nodes = [helper.make_node("Conv", ["images", "wb"], ["b"]), helper.make_node("Conv", ["images", "wc"], ["c"]),
             helper.make_node("Reshape", ["b", "flat"], ["bf"]), helper.make_node("Reshape", ["c", "flat"], ["cf"]),
             helper.make_node("Sigmoid", ["cf"], ["scores"]),
             helper.make_node("Concat", ["bf", "scores"], ["output0"], axis=1)]
    graph = helper.make_graph(nodes, "head", [image], [out], [*weights, flat])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_graph_says_what_dynamic_shapes_do_not(tmp_path):
    """The anchors a dynamic output declares come from a run on a calibration sample, and the Concat of boxes and
    Sigmoid scores marks a YOLOv8 head even where the shape ratio would read as YOLOv5 (1000 classes over 256
    anchors)."""
    for classes, size in ((80, 64), (1000, 16)):
        path = tmp_path / f"head-{classes}.onnx"
        onnx.save(_yolo_head_model(classes, size), str(path))
        sample = {"images": _images(1, size)}
        assert tensor_specs(path)[1][0].shape == [-1, 4 + classes, -1]
        task = infer_model_task(path, sample)
        assert (task.kind, task.layout, task.num_classes) == ("detection", "yolov8", classes)
    assert infer_task([_spec([-1, 1004, 256])]).layout == "yolov5"  # what the shape alone would have said


@pytest.mark.integration
def test_the_cli_prints_the_intake_the_task_and_the_metric_per_variant(tmp_path, local_s3, key_dir):
    """``import-onnx --task raw``: the batch stays fixed and the command says why (ONNX Runtime's words), then the
    task and each variant's figure by the gate's metric, with the negative control; when the gate then fails, the
    intake's lines still come first, and the failure is one line on stderr."""
    onnx.save(_fixed_batch_model("concat"), str(tmp_path / "join.onnx"))
    np.savez(tmp_path / "calibration.npz", x=np.random.default_rng(2).standard_normal((16, 4)).astype(np.float32))
    local_s3.store("imports-join")
    env = {**os.environ, **local_s3.env(), "EDGELOOP_SIGNING_KEY_FILE": str(key_dir / "signing-key.pem"),
           "COLUMNS": "200"}
    why = ("intake: the batch stays fixed at 1: ONNX Runtime cannot run it at batch 2 (Concat node 'join': Non "
           "concat axis dimensions must match")

    def run(gate: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [EDGELOOP, "pipeline", "import-onnx", "--onnx", str(tmp_path / "join.onnx"), "--calibration",
             str(tmp_path / "calibration.npz"), "--model-name", "join", "--task", "raw", "-p", "bucket=imports-join",
             "-p", f"s3_endpoint={local_s3.endpoint_url}", "-p", f"min_agreement={gate}", "--runs-dir",
             str(tmp_path / "runs")], capture_output=True, text=True, timeout=300, env=env, check=False)

    result = run(0.9)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "intake: opset 17 → 17, batch fixed at 1" in out and why in out
    assert "task: raw" in out and "tensor_agreement vs FP32" in out
    assert "negative control (tensor_agreement on wrongly paired samples)" in out
    assert all(name in out for name in ("fp32", "fp16", "int8-qdq", "int8-ort"))
    failed = run(1.01)
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert failed.returncode == 1 and len(lines) == 1 and "GateFailed" in lines[0], failed.stderr
    assert why in failed.stdout


def test_a_task_or_layout_edgeloop_does_not_know_is_refused_before_anything_runs(tmp_path):
    result = subprocess.run([EDGELOOP, "pipeline", "import-onnx", "--onnx", str(tmp_path / "none.onnx"),
                             "--calibration", str(tmp_path / "none.npz"), "--model-name", "m", "--task", "detection",
                             "--layout", "yolov7", "--runs-dir", str(tmp_path / "runs")],
                            capture_output=True, text=True, timeout=120, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "--layout 'yolov7' is not one of" in lines[0]
    assert not (tmp_path / "runs").exists()


# --- the whole path, for a representative few ---------------------------------------------------------------------


def _serve_and_ask(name: str, bucket: str, tmp_path: Path, edge_settings, queries: np.ndarray,
                   batch: int) -> dict[str, np.ndarray]:
    """Start the edge runtime on ``bucket``, send ``queries`` in requests of ``batch`` through tritonclient."""
    import tritonclient.grpc as triton

    from tests.edge_runtime.conftest import RunningEdge

    edge = RunningEdge(edge_settings(bucket, model_name=name, cache_dir=tmp_path / "device"))
    try:
        edge.wait_ready(120)
        client = triton.InferenceServerClient(edge.address)
        parts = []
        for start in range(0, len(queries), batch):
            tensor = triton.InferInput("images", list(queries[start : start + batch].shape), "FP32")
            tensor.set_data_from_numpy(queries[start : start + batch])
            parts.append(client.infer(name, [tensor]).as_numpy("output0"))
        validated = edge.events("validated")
    finally:
        edge.stop()
    assert validated and validated[-1].get("passed"), validated
    return {"output0": np.concatenate(parts)}


def _check_published(manifest, local_s3, bucket: str, layout: str) -> None:
    """The manifest's task and gate metric, and the report's figure by that metric for every published variant."""
    assert manifest.task.kind == "detection" and manifest.task.layout == layout
    assert manifest.task.num_classes == 80
    assert manifest.validation.metric == "detection_f1" and manifest.validation.control is not None
    assert manifest.validation.control < 0.95 - 0.05
    assert {v.name for v in manifest.variants} >= {"fp32", "fp16"}
    assert all(v.accuracy >= 0.95 for v in manifest.variants)
    store = local_s3.store(bucket)
    report_key = next(k for k in store.list_keys("models/") if k.endswith(f"{manifest.version}/report.html"))
    page = store.get_bytes(report_key).decode()
    for v in manifest.variants:
        assert f"<td>{v.name}</td>" in page and f"detection_f1 {v.accuracy:.4f}" in page


@pytest.mark.integration
@pytest.mark.parametrize(("family", "opset"), [("yolov8n", 17), ("yolo11n", 18)])
def test_a_fixed_batch_yolov8_export_imports_publishes_and_serves_batches(yolo_exporter, tmp_path, local_s3,
                                                                          key_dir, edge_settings, family, opset):
    """The issue's model, YOLOv8n at opset 17, and YOLO11n at opset 18 (its head has the same layout), at 320
    pixels and batch 1. The task is inferred (yolov8, 80 classes), the gate judges by detection F1 against FP32 with
    an informative negative control, and batch-2 requests answer like the original run one sample at a time."""
    from pipelines.import_onnx import import_onnx_pipeline
    from pipelines.local_run import run_local

    spec = ExportSpec(family, opset, 320, False)
    source = yolo_exporter.export(spec)
    np.savez(tmp_path / "calibration.npz", images=_images(24, spec.imgsz))
    local_s3.store(f"imports-{family}")
    mp = pytest.MonkeyPatch()
    for key, value in {**local_s3.env(), "EDGELOOP_SIGNING_KEY_FILE": str(key_dir / "signing-key.pem")}.items():
        mp.setenv(key, value)
    try:
        result = run_local({"onnx_uri": str(source), "calibration_uri": str(tmp_path / "calibration.npz"),
                            "model_name": family, "bucket": f"imports-{family}",
                            "s3_endpoint": local_s3.endpoint_url, "min_agreement": 0.95},
                           runs_dir=tmp_path / "runs", pipeline=import_onnx_pipeline)
    finally:
        mp.undo()
    manifest = result.manifest
    assert manifest is not None and manifest.inputs[0].shape == [-1, 3, 320, 320]
    assert manifest.training["intake"]["fixed_batch"] is None
    _check_published(manifest, local_s3, f"imports-{family}", "yolov8")
    queries = _images(4, spec.imgsz, seed=5)
    got = _serve_and_ask(family, f"imports-{family}", tmp_path, edge_settings, queries, batch=2)
    expected = _one_at_a_time(source, {"images": queries})
    assert got["output0"].shape == (4, 84, 2100)
    np.testing.assert_allclose(got["output0"], expected["output0"], rtol=1e-3, atol=1e-2)


@pytest.mark.integration
def test_a_dynamic_yolov10_export_imports_through_the_cli_with_its_layout_and_serves(yolo_exporter, tmp_path,
                                                                                      local_s3, key_dir,
                                                                                      edge_settings):
    """YOLOv10n end-to-end (``[batch, 300, 6]``), opset 18, exported with ``dynamic=True`` (batch, height and
    width), imported with ``edgeloop pipeline import-onnx --task detection --layout end2end``: the command prints the
    task and each variant's detection F1; batch-2 requests answer like the original one sample at a time."""
    spec = ExportSpec("yolov10n", 18, 320, True)
    source = yolo_exporter.export(spec)
    np.savez(tmp_path / "calibration.npz", images=_images(24, spec.imgsz))
    local_s3.store("imports-yolov10n")
    env = {**os.environ, **local_s3.env(), "EDGELOOP_SIGNING_KEY_FILE": str(key_dir / "signing-key.pem"),
           "COLUMNS": "200"}
    result = subprocess.run(
        [EDGELOOP, "pipeline", "import-onnx", "--onnx", str(source), "--calibration",
         str(tmp_path / "calibration.npz"), "--model-name", "yolov10n", "--task", "detection", "--layout",
         "end2end", "-p", "bucket=imports-yolov10n", "-p", f"s3_endpoint={local_s3.endpoint_url}", "-p",
         "min_agreement=0.95", "--runs-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "task: detection, layout end2end, 80 classes" in result.stdout
    assert "detection_f1 vs FP32" in result.stdout
    from edgeloop_core.contract import Manifest

    manifest = Manifest.from_json(next((tmp_path / "runs").glob("**/publish*/manifest")).read_text())
    assert manifest.inputs[0].shape == [-1, 3, -1, -1]
    _check_published(manifest, local_s3, "imports-yolov10n", "end2end")
    queries = _images(4, spec.imgsz, seed=6)
    got = _serve_and_ask("yolov10n", "imports-yolov10n", tmp_path, edge_settings, queries, batch=2)
    expected = _one_at_a_time(source, {"images": queries})
    assert got["output0"].shape == (4, 300, 6)
    np.testing.assert_allclose(got["output0"], expected["output0"], rtol=1e-3, atol=1e-2)
