"""The device serves the fastest variant that passes validation on it, measured there; ``variant`` still forces one.

The two variants here are made to differ in speed on purpose: ``fp32`` is the trained CNN with an extra, expensive
branch whose result is multiplied by zero (same outputs, about three times the work), ``fp32-dense`` is the plain
CNN. The static preference order on a CPU puts ``fp32`` first, so serving ``fp32-dense`` shows that the device measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.build.choice import CHOICE_FILE
from tests.edge_runtime.conftest import RunningEdge, publish_model

MODEL = "digits-cnn"


def with_expensive_branch(source: Path, dest: Path, width: int = 1024, layers: int = 16) -> Path:
    """``source`` plus ``0 * sum(relu(...relu(x W1) W2...) W2)`` added to its output: the same answers, several times
    the MatMul work (``layers`` products of ``width`` × ``width`` sharing one weight, so the file stays small)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    out = graph.output[0].name
    rng = np.random.default_rng(0)
    features = int(np.prod([d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]]))
    he = np.sqrt(2.0 / width)  # keeps the activations' scale: nothing overflows into inf/NaN, so 0 * x stays 0
    graph.initializer.extend([
        numpy_helper.from_array((rng.standard_normal((features, width)) * he).astype(np.float32), "slow/w1"),
        numpy_helper.from_array((rng.standard_normal((width, width)) * he).astype(np.float32), "slow/w2"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "slow/flat"),
        numpy_helper.from_array(np.array([1], np.int64), "slow/axes"),
        numpy_helper.from_array(np.zeros((), np.float32), "slow/zero"),
    ])
    for node in graph.node:  # the original output becomes an inner tensor
        node.output[:] = ["slow/logits" if name == out else name for name in node.output]
    nodes = [helper.make_node("Reshape", [graph.input[0].name, "slow/flat"], ["slow/x"]),
             helper.make_node("MatMul", ["slow/x", "slow/w1"], ["slow/h0"])]
    for i in range(layers):
        nodes += [helper.make_node("Relu", [f"slow/h{i}"], [f"slow/r{i}"]),
                  helper.make_node("MatMul", [f"slow/r{i}", "slow/w2"], [f"slow/h{i + 1}"])]
    nodes += [helper.make_node("ReduceSum", [f"slow/h{layers}", "slow/axes"], ["slow/s"], keepdims=1),
              helper.make_node("Mul", ["slow/s", "slow/zero"], ["slow/nothing"]),
              helper.make_node("Add", ["slow/logits", "slow/nothing"], [out])]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))
    return dest


@pytest.fixture(scope="module")
def slow_fp32(trained, tmp_path_factory) -> Path:
    return with_expensive_branch(trained.good["fp32"], tmp_path_factory.mktemp("slow") / "slow-fp32.onnx")


def test_the_slow_branch_changes_nothing_but_speed(trained, slow_fp32):
    import onnxruntime as ort

    x = trained.x_val[:32]
    fast = ort.InferenceSession(str(trained.good["fp32"]), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    slow = ort.InferenceSession(str(slow_fp32), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    np.testing.assert_allclose(slow[0], fast[0], rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_the_device_serves_the_fastest_validated_variant_and_remembers_it(store, signing_key, trained, slow_fp32,
                                                                        edge_settings):
    publish_model(store, signing_key, trained, "v1", files={"fp32": slow_fp32, "fp32-dense": trained.good["fp32"]})
    settings = edge_settings(store.bucket, variant_choice_budget_s=0.6)
    edge = RunningEdge(settings, store=store)
    try:
        edge.wait_ready(90)
        runtime = edge.app.runtime
        assert runtime.choice.mode == "measured", runtime.choice
        assert runtime.serving.plan.variant.name == "fp32-dense", runtime.choice
        figures = {f.variant: f for f in runtime.choice.figures}
        assert set(figures) == {"fp32", "fp32-dense"} and all(f.passed for f in figures.values())
        assert figures["fp32"].score_ms > figures["fp32-dense"].score_ms
        assert figures["fp32-dense"].batch == settings.max_batch_size
        event = edge.events("variant_choice")[-1]
        assert event["chosen"] == "fp32-dense" and event["mode"] == "measured" and "faster than fp32" in event["reason"]
        assert {f["variant"] for f in event["figures"]} == {"fp32", "fp32-dense"}
        assert runtime.status()["variant_choice"]["chosen"] == "fp32-dense"
        assert (settings.cache_dir / "engines" / MODEL / "v1" / CHOICE_FILE).exists()
    finally:
        edge.stop()

    # a restart takes the saved choice: one engine built from the cache, nothing measured again
    edge = RunningEdge(settings, store=store)
    try:
        edge.wait_ready(60)
        assert edge.app.runtime.serving.plan.variant.name == "fp32-dense"
        assert edge.app.runtime.choice.mode == "cached"
        assert [e["variant"] for e in edge.events("built") if e["version"] == "v1"][-1:] == ["fp32-dense"]
    finally:
        edge.stop()

    # the variant setting still wins over speed
    forced = RunningEdge(edge_settings(store.bucket, variant="fp32", variant_choice_budget_s=0.6,
                                       cache_dir=settings.cache_dir.parent / "forced-cache"), store=store)
    try:
        forced.wait_ready(60)
        assert forced.app.runtime.serving.plan.variant.name == "fp32"
        assert forced.app.runtime.choice.mode == "forced"
    finally:
        forced.stop()


@pytest.mark.integration
def test_a_faster_variant_that_fails_validation_is_never_served(store, signing_key, trained, slow_fp32,
                                                               edge_settings):
    # int8-ort is first in the CPU order and fast, but untrained (it misses the trained model's reference);
    # the slow fp32 is the only valid variant
    publish_model(store, signing_key, trained, "v1",
                  files={"fp32": slow_fp32, "int8-ort": trained.untrained["int8-ort"]})
    edge = RunningEdge(edge_settings(store.bucket, variant_choice_budget_s=0.3), store=store)
    try:
        edge.wait_ready(90)
        runtime = edge.app.runtime
        assert runtime.serving.plan.variant.name == "fp32"
        figures = {f.variant: f for f in runtime.choice.figures}
        assert not figures["int8-ort"].passed and "below" in figures["int8-ort"].reason
        assert "failed: int8-ort" in runtime.choice.reason
    finally:
        edge.stop()
