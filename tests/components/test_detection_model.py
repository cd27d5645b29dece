"""The pipeline's detector: its output is the YOLOv8 layout in input pixels, it learns the synthetic set, and its
export keeps the decode in floating point in both INT8 variants and refuses a variant whose scores collapsed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.data import calibration_indices, load_digits_dataset, load_synthetic_detection
from components.detection_export import check_detector, export_detector_onnx, export_detector_variants
from components.detector import OUTPUT_NAME, TinyDetector, detection_scores, detection_task
from components.evaluate import evaluate_detector_variants
from components.export import VARIANTS, load_variant_infos, run_onnx
from components.train import train_model
from edgeloop_core.contract import TensorSpec
from edgeloop_core.detection import decode
from edgeloop_core.errors import ConfigError, ContractError


def test_the_output_is_the_yolov8_layout_in_input_pixels():
    torch.manual_seed(0)
    model = TinyDetector(1, 64, 4).eval()
    with torch.no_grad():  # every distance one stride (softplus(log(e - 1)) = 1), a fixed score per class
        model.boxes.weight.zero_()
        model.boxes.bias.fill_(math.log(math.e - 1))
        model.classes.weight.zero_()
        model.classes.bias.copy_(torch.tensor([-2.0, -1.0, 0.0, 1.0]))
        out = model(torch.rand(3, 1, 64, 64)).numpy()
    assert out.shape == (3, 4 + 4, 64)  # [batch, 4 + classes, anchors]: one anchor per 8x8 cell
    centres = (np.arange(8) + 0.5) * 8
    cy, cx = np.meshgrid(centres, centres, indexing="ij")  # anchors in row-major grid order
    np.testing.assert_allclose(out[:, 0], np.broadcast_to(cx.ravel(), (3, 64)), atol=1e-5)
    np.testing.assert_allclose(out[:, 1], np.broadcast_to(cy.ravel(), (3, 64)), atol=1e-5)
    np.testing.assert_allclose(out[:, 2:4], 16.0, atol=1e-5)  # w = left + right, h = top + bottom
    np.testing.assert_allclose(out[:, 4:, 0], np.broadcast_to(1 / (1 + np.exp([2.0, 1.0, 0.0, -1.0])), (3, 4)),
                               atol=1e-6)
    (found, *_) = decode({OUTPUT_NAME: out}, detection_task(4))
    assert len(found) == 64 and set(found.classes) == {3}  # class 3 (0.73) above the threshold everywhere
    np.testing.assert_allclose(found.boxes[np.argsort(found.boxes[:, 0] + 64 * found.boxes[:, 1])][0], [-4, -4, 12, 12],
                               atol=1e-4)


def test_the_export_reads_as_yolov8_with_a_dynamic_batch(tmp_path):
    from components.import_onnx import tensor_specs
    from components.tasks import infer_task

    torch.manual_seed(1)
    model = TinyDetector(1, 64, 4).eval()
    path = export_detector_onnx(model, tmp_path / "det.onnx", (1, 64, 64))
    inputs, outputs = tensor_specs(path)
    assert outputs == [TensorSpec(name="detections", datatype="FP32", shape=[-1, 8, 64])]
    assert inputs[0].shape == [-1, 1, 64, 64]
    task = infer_task(outputs)  # the intake, given this file, takes it for what it is
    assert (task.kind, task.layout, task.num_classes) == ("detection", "yolov8", 4)
    assert task.slices == detection_task(4).slices
    x = np.random.default_rng(0).random((5, 1, 64, 64), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    for n in (1, 5):
        np.testing.assert_allclose(run_onnx(path, x[:n]), expected[:n], atol=1e-4)


def test_architecture_and_data_must_agree():
    with pytest.raises(ConfigError) as detector_on_digits:
        train_model(load_digits_dataset(), arch="detector", epochs=1, progress=False)
    assert "set arch to one of cnn, vit, ast" in str(detector_on_digits.value)
    with pytest.raises(ConfigError) as cnn_on_boxes:
        train_model(load_synthetic_detection(sizes=(8, 4, 4)), arch="cnn", epochs=1, progress=False)
    assert "detection data" in str(cnn_on_boxes.value) and "detector" in str(cnn_on_boxes.value)


@pytest.fixture(scope="module")
def small():
    """A small split of the synthetic set and a detector trained on it for a few epochs."""
    data = load_synthetic_detection(sizes=(480, 96, 96))
    model, _, history = train_model(data, arch="detector", epochs=6, lr=0.004, progress=False)
    return data, model, history


def test_the_detector_learns_the_shapes(small):
    data, model, history = small
    assert history.metric == "val_map50" and len(history.epochs) == 6
    assert history.epochs[0]["val_map50"] < 0.3 < history.final_val_score
    with torch.no_grad():
        outputs = model(torch.from_numpy(data.x_test)).numpy()
    map50, map50_95 = detection_scores(outputs, data.y_test, 64)
    assert map50 >= 0.6 and 0.0 < map50_95 < map50


def _decode_outputs_quantized(path) -> list[str]:
    """Decode nodes (``/decode/...``) whose output goes through a QuantizeLinear."""
    import onnx

    graph = onnx.load(str(path)).graph
    produced_by = {out: node.name for node in graph.node for out in node.output}
    return sorted({produced_by.get(node.input[0], "") for node in graph.node if node.op_type == "QuantizeLinear"}
                  & {name for name in produced_by.values() if name.startswith("/decode/")})


@pytest.mark.integration
def test_every_variant_keeps_the_decode_in_float_and_the_gate_judges_map(small, tmp_path):
    from components.qat import quantize_aware_train

    data, model, _ = small
    quantized, _ = quantize_aware_train(_copy(model), data, epochs=1, calibration_samples=128, progress=False)
    rows = calibration_indices(data.y_train, 128, seed=0)
    infos = export_detector_variants(_copy(model), _copy(model), quantized, x_check=data.x_val,
                                     x_calibration=data.x_train[rows], out_dir=tmp_path)
    assert tuple(i.name for i in load_variant_infos(tmp_path)) == VARIANTS
    for name in ("int8-qdq", "int8-ort"):
        assert _decode_outputs_quantized(tmp_path / f"{name}.onnx") == [], name
    assert all(i.top1_agreement >= 0.9 for i in infos)  # detection F1 against PyTorch
    evaluation = evaluate_detector_variants(tmp_path, infos, data.x_test, data.y_test, latency_runs=5)
    assert evaluation.metric == "detection_map50" and evaluation.passed, evaluation.failures
    assert all(v.map50_95 is not None and 0 < v.map50_95 < v.accuracy for v in evaluation.variants)
    assert evaluation.control is not None and evaluation.control < 0.1
    strict = evaluate_detector_variants(tmp_path, infos, data.x_test, data.y_test, latency_runs=5, min_score=0.999)
    assert not strict.passed and any("below the bar of 0.9990" in f for f in strict.failures)


def test_an_export_whose_scores_collapsed_is_refused(small, tmp_path):
    data, model, _ = small
    silent = _copy(model)
    with torch.no_grad():  # every score ~0: what one INT8 scale over boxes and scores did to YOLOv8 (issue 24)
        silent.classes.bias.fill_(-60.0)
    path = export_detector_onnx(silent, tmp_path / "silent.onnx", data.input_shape)
    with torch.no_grad():
        reference = model(torch.from_numpy(data.x_val)).numpy()
    with pytest.raises(ContractError) as refused:
        check_detector(path, reference, data.x_val, min_f1=0.0, max_abs_diff=None)
    assert "detections[scores] collapsed" in str(refused.value)


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    clone = TinyDetector(1, 64, 4)
    clone.load_state_dict(model.state_dict())
    return clone.eval()
