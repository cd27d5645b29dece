"""INT8 calibration that represents the data, the CPU quantizer's recipe, and the evaluation's speed-ups."""

from __future__ import annotations

import numpy as np
import pytest

from components.data import calibration_indices, class_histogram
from components.evaluate import Evaluation, VariantEvaluation, rank_by_speed
from components.report import write_report
from edgeloop_core.errors import ConfigError


def test_class_ordered_training_rows_still_calibrate_on_every_class():
    # a training split sorted by class, as the Speech Commands loader writes it: the first 512 rows are all class 0
    labels = np.repeat(np.arange(10), [400, 300, 200, 100, 90, 80, 70, 60, 50, 40])
    assert set(labels[:512]) == {0, 1}  # what the old `x_train[:512]` calibrated on
    rows = calibration_indices(labels, 512, seed=0)
    assert len(rows) == 512 == len(set(rows.tolist()))
    histogram = class_histogram(labels[rows], [str(c) for c in range(10)])
    assert all(histogram[str(c)] > 0 for c in range(10))
    shares = np.bincount(labels, minlength=10) / len(labels)
    np.testing.assert_allclose(np.array(list(histogram.values())) / 512, shares, atol=2 / 512)
    # shuffled: a calibrator that stops after its first batch still sees many classes
    assert len(set(labels[rows[:64]].tolist())) >= 5
    np.testing.assert_array_equal(rows, calibration_indices(labels, 512, seed=0))  # seeded


def test_rare_classes_are_kept_and_small_or_large_requests_work():
    labels = np.array([0] * 995 + [1] * 5)
    rows = calibration_indices(labels, 20, seed=1)
    assert len(rows) == 20 and 1 in set(labels[rows].tolist())
    assert sorted(calibration_indices(labels, 5000, seed=1).tolist()) == list(range(1000))  # all rows, shuffled
    unlabelled = calibration_indices(None, 30, total=100, seed=2)
    assert len(set(unlabelled.tolist())) == 30 and unlabelled.max() < 100
    with pytest.raises(ConfigError):
        calibration_indices(labels, 0)


def test_cpu_int8_quantizes_only_weight_bearing_ops(tmp_path):
    import onnx
    import torch

    from components.export import activation_matmuls, export_onnx, quantize_ort_int8
    from components.models import ModelSpec, build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec("ast", 1, 40, 10, width=98)).eval()
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", (1, 40, 98))
    attention = activation_matmuls(fp32)
    assert len(attention) == 4  # Q·Kᵀ and softmax·V in each of the two blocks
    x = np.random.default_rng(0).standard_normal((64, 1, 40, 98)).astype(np.float32)
    graph = onnx.load(str(quantize_ort_int8(fp32, tmp_path / "int8.onnx", x))).graph
    quantized_inputs = {i for n in graph.node if n.op_type == "DequantizeLinear" for i in n.output}
    quantized_outputs = {i for n in graph.node if n.op_type == "QuantizeLinear" for i in n.input}
    softmax_inputs = {i for n in graph.node if n.op_type == "Softmax" for i in n.input}
    assert not softmax_inputs & quantized_inputs  # Softmax runs in float
    constants = {i.name for i in graph.initializer}

    def quantized(node) -> bool:
        activations = [i for i in node.input if i and i not in constants]
        return set(activations) <= quantized_inputs and bool(set(node.output) & quantized_outputs)

    for node in graph.node:
        if node.name in attention or node.op_type in ("Softmax", "LayerNormalization", "Add", "Mul"):
            assert not quantized(node), node.name  # these run in float
    weight_matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.name not in attention]
    assert len(weight_matmuls) >= 8 and all(set(n.input) <= quantized_inputs for n in weight_matmuls)


def _evaluation(times: dict[str, tuple[float, float]], quantization: dict[str, str]) -> list[VariantEvaluation]:
    return [VariantEvaluation(name=n, precision="int8" if "int8" in n else "fp32",
                              quantization=quantization.get(n, "none"),
                              pruned=n != "fp32-dense", params=1, flops=1, size_bytes=1, accuracy=0.99,
                              latency_ms_b1=b1, latency_ms_b16=b16, confusion=[[1, 0], [0, 1]])
            for n, (b1, b16) in times.items()]


def test_speedups_against_dense_and_pruned_and_the_preference_rule(tmp_path):
    quantization = {"int8-ort": "ort-qdq", "int8-qdq": "modelopt-qdq"}
    results = _evaluation({"fp32-dense": (0.2, 2.0), "fp32": (0.1, 1.0), "int8-ort": (0.08, 0.7),
                           "int8-qdq": (0.5, 5.0)}, quantization)
    rank_by_speed(results, min_speedup=1.3)
    by = {r.name: r for r in results}
    assert by["int8-ort"].speedup == {"b1_vs_fp32-dense": 2.5, "b16_vs_fp32-dense": 2.857, "b1_vs_fp32": 1.25,
                                      "b16_vs_fp32": 1.429}
    assert not by["int8-ort"].preferred and "1.25x at batch 1" in by["int8-ort"].note  # batch 1 misses 1.3x
    assert by["int8-qdq"].preferred  # a TensorRT variant: CPU timings say nothing about it
    assert by["fp32"].speedup["b16_vs_fp32-dense"] == 2.0

    results = _evaluation({"fp32-dense": (0.2, 2.0), "fp32": (0.1, 1.0), "int8-ort": (0.08, 0.7)}, quantization)
    rank_by_speed(results, min_speedup=1.0)
    assert all(r.preferred for r in results)

    evaluation = Evaluation("fp32-dense", 1.0, _evaluation({"fp32-dense": (0.2, 2.0), "fp32": (0.1, 1.0),
                                                            "int8-ort": (0.12, 1.1), "int8-qdq": (0.5, 5.0)},
                                                           quantization), True, [], min_speedup=1.0,
                            calibration={"samples": 512, "seed": 0, "histogram": {"0": 256, "1": 256}})
    rank_by_speed(evaluation.variants, 1.0)
    page = write_report(evaluation, ["0", "1"], tmp_path / "r.html", title="t").read_text()
    assert "not preferred: 0.83x at batch 1" in page and "0.91x" in page and "0: 256, 1: 256" in page
    evaluation.save(tmp_path / "e.json")
    assert Evaluation.load(tmp_path / "e.json").variant("int8-ort").preferred is False
    with pytest.raises(ConfigError):
        rank_by_speed(results, 0)
