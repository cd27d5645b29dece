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


ORIN_NX = Path(__file__).resolve().parents[1] / "data" / "sysfs-orin-nx"
VDD_IN_CURRENT = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1/curr1_input"


class Drawing:
    """A real ONNX Runtime engine that, while it runs, makes the recorded Orin's VDD_IN show the current the test
    scripts for it (as the INA3221 would show the module's draw): the power sampler reads only the files."""

    def __init__(self, engine, current_file: Path, milliamps: int) -> None:
        self.engine, self.current_file, self.milliamps = engine, current_file, milliamps

    def __getattr__(self, name) -> object:
        return getattr(self.engine, name)

    def infer(self, inputs):
        if self.current_file.read_text().strip() != str(self.milliamps):
            self.current_file.write_text(f"{self.milliamps}\n")
        return self.engine.infer(inputs)


def _local_manifest(trained, files: dict[str, Path], folder: Path):
    """An unsigned manifest for ``files`` with the good model's references, and its validation set on disk."""
    from datetime import datetime, timezone

    from edgeloop_core.contract import Manifest, TensorSpec, Validation, Variant, sha256_file
    from tests.edge_runtime.conftest import accuracy_of

    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "validation.npz", inputs=trained.x_val.astype(np.float32), labels=trained.y_val)
    reference = {n: accuracy_of(trained.good[n if n in trained.good else "fp32"], trained.x_val, trained.y_val)
                 for n in files}
    variants = []
    for name, path in files.items():
        digest, size = sha256_file(path)
        variants.append(Variant(file=Path(path).name, sha256=digest, size_bytes=size, name=name,
                                precision="int8" if "int8" in name else "fp32", backends=["onnxruntime"],
                                quantization="ort-qdq" if "int8" in name else "none", accuracy=reference[name]))
    digest, size = sha256_file(folder / "validation.npz")
    manifest = Manifest(name=MODEL, version="v1", created_at=datetime.now(timezone.utc),
                        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 1, 8, 8])],
                        outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
                        labels=[str(i) for i in range(10)], variants=variants,
                        validation=Validation(file="validation.npz", sha256=digest, size_bytes=size,
                                              num_samples=len(trained.y_val), reference=reference, tolerance=0.02))
    return manifest, folder / "validation.npz"


def test_the_energy_objective_picks_the_lowest_mj_per_inference_among_variants_that_pass(trained, slow_fp32,
                                                                                         tmp_path):
    import shutil

    from edge_runtime.build.choice import VariantFigures, choose_variant, load_choice, measure_variant, save_choice
    from edge_runtime.build.engines.onnxruntime import OrtEngine
    from edge_runtime.build.power import PowerSampler
    from edge_runtime.validate import validate

    root = tmp_path / "orin"
    shutil.copytree(ORIN_NX, root)
    power = PowerSampler(root, period_s=0.005)
    # the slow variant draws a tenth of the fast one's current (the fast one costs far more energy per inference
    # although it is faster); the untrained int8 draws least of all, but fails validation
    files = {"fp32": slow_fp32, "fp32-dense": trained.good["fp32"], "int8-ort": trained.untrained["int8-ort"]}
    draws = {"fp32": 300, "fp32-dense": 3000, "int8-ort": 50}
    manifest, validation_path = _local_manifest(trained, files, tmp_path / "version")
    figures, results = [], {}
    for name, path in files.items():
        engine = Drawing(OrtEngine(path, max_batch_size=8), root / VDD_IN_CURRENT, draws[name])
        result = results[name] = validate(engine, validation_path, manifest, name, power=power)
        if not result.passed:
            figures.append(VariantFigures(name, f"key-{name}", False, result.value, reason=result.reason))
            continue
        measured = measure_variant(engine, {"input": trained.x_val[:1]}, 8, budget_s=0.6, power=power)
        figures.append(measured.figures(name, f"key-{name}", result.value))

    assert not results["int8-ort"].passed and results["fp32"].passed and results["fp32-dense"].passed
    # validation reports mJ/inference for every variant, failed ones too; the failed one's is the lowest
    assert all(r.mj_per_inference is not None and r.mj_per_inference > 0 for r in results.values())
    assert results["int8-ort"].mj_per_inference < min(results[n].mj_per_inference for n in ("fp32", "fp32-dense"))
    by_name = {f.variant: f for f in figures}
    for name in ("fp32", "fp32-dense"):  # per variant and batch, and consistent with power x time
        figure = by_name[name]
        assert figure.b1_mj is not None and figure.batched_mj is not None
        milliwatts = 5008 * draws[name] / 1000
        # energy follows the mean time per call, the check the median: a loaded machine's stragglers widen the band
        assert 0.3 < figure.b1_mj / (milliwatts * figure.b1.p50_ms / 1e3) < 10
        assert 0.3 < figure.batched_mj / (milliwatts * figure.batched.p50_ms / 1e3 / 8) < 10
    assert by_name["fp32"].score_ms > by_name["fp32-dense"].score_ms  # the slow branch is slower...
    assert by_name["fp32"].mj_per_inference < by_name["fp32-dense"].mj_per_inference  # ...and cheaper

    energy = choose_variant(figures, "energy")
    assert energy.chosen == "fp32" and energy.objective == "energy" and "less energy than fp32-dense" in energy.reason
    assert "failed: int8-ort" in energy.reason
    assert energy.mj_per_inference == by_name["fp32"].mj_per_inference
    assert energy.to_dict()["mj_per_inference"] == energy.mj_per_inference
    assert choose_variant(figures, "balanced").chosen == "fp32-dense"

    # remembered per objective: a saved energy choice is not the answer to another objective
    candidates = {f.variant: f.target_key for f in figures}
    save_choice(tmp_path, candidates, energy)
    cached = load_choice(tmp_path, candidates, "energy")
    assert cached.chosen == "fp32" and cached.mode == "cached" and cached.mj_per_inference == energy.mj_per_inference
    assert load_choice(tmp_path, candidates, "balanced") is None


def test_the_energy_objective_without_rails_falls_back_to_balanced_and_says_so():
    from edge_runtime.build.choice import VariantFigures, choose_variant
    from edgeloop_core.timing import Timing

    fast = VariantFigures("fp16", "k1", True, 0.99, 8, Timing(1.0, 1.2, 50), Timing(4.0, 4.4, 50))
    slow = VariantFigures("fp32", "k2", True, 0.99, 8, Timing(2.0, 2.2, 50), Timing(8.0, 8.8, 50))
    choice = choose_variant([slow, fast], "energy")
    assert choice.chosen == "fp16" and choice.objective == "energy" and "no energy figure: balanced" in choice.reason
    assert choice.mj_per_inference is None and choice.to_dict()["mj_per_inference"] is None
    # one variant's reading failed (rails flaked): it ranks after those with a figure, whatever its speed
    from dataclasses import replace

    measured = replace(slow, b1_mj=2.0, batched_mj=2.0)
    partial = choose_variant([fast, measured], "energy")
    assert partial.chosen == "fp32" and "fp16 gave none" in partial.reason
    # batch 1 and the serving batch disagree: each objective takes its own side
    lone = VariantFigures("int8", "k3", True, 0.99, 8, Timing(0.5, 0.6, 50), Timing(16.0, 17.0, 50))
    busy = VariantFigures("fp16", "k1", True, 0.99, 8, Timing(1.0, 1.2, 50), Timing(4.0, 4.4, 50))
    assert choose_variant([lone, busy], "latency").chosen == "int8"
    assert choose_variant([lone, busy], "throughput").chosen == "fp16"
    assert "the throughput of int8" in choose_variant([lone, busy], "throughput").reason


@pytest.mark.integration
def test_the_runtime_chooses_by_energy_and_reports_mj_per_inference(store, signing_key, trained, slow_fp32,
                                                                   edge_settings, tmp_path):
    import shutil

    from prometheus_client import generate_latest

    root = tmp_path / "orin"
    shutil.copytree(ORIN_NX, root)  # a steady draw: the lowest energy per inference is the least time per inference
    publish_model(store, signing_key, trained, "v1", files={"fp32": slow_fp32, "fp32-dense": trained.good["fp32"]})
    settings = edge_settings(store.bucket, variant_choice_budget_s=0.6, variant_objective="energy", power_root=root,
                             power_sample_period_ms=5)
    edge = RunningEdge(settings, store=store)
    try:
        edge.wait_ready(90)
        runtime = edge.app.runtime
        choice = runtime.choice
        assert choice.mode == "measured" and choice.objective == "energy", choice
        figures = {f.variant: f for f in choice.figures}
        assert set(figures) == {"fp32", "fp32-dense"} and all(f.mj_per_inference for f in figures.values())
        best = min(figures.values(), key=lambda f: f.mj_per_inference)
        assert runtime.serving.plan.variant.name == best.variant and "less energy than" in choice.reason
        assert runtime.status()["mj_per_inference"] == choice.mj_per_inference == best.mj_per_inference
        event = edge.events("variant_choice")[-1]
        assert event["objective"] == "energy" and event["mj_per_inference"] == best.mj_per_inference
        assert all(e["mj_per_inference"] > 0 for e in edge.events("validated"))
        text = generate_latest(edge.app.metrics.registry).decode()
        assert f'edgeloop_energy_millijoules_per_inference{{model="{MODEL}",variant="{best.variant}"}}' in text
    finally:
        edge.stop()
