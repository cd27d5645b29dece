"""The two-slice gate: the new version against the one deployed on the channel, on the curated test set and on the
held-out field slice; the report that shows both slices; the ``gate`` step's one line.

The models are small but real: multinomial logistic regressions on the digits, written as ONNX (Flatten + Gemm)
and run by ONNX Runtime, published to the session's SeaweedFS with a signed manifest and channel pointer. The field
shift is honest: the devices see the digits on a light grey background with faded strokes (``0.7 + 0.3·x``), which a
model trained only on the curated digits gets wrong about half the time.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from components.evaluate import (
    Evaluation,
    SliceAccuracy,
    VariantComparison,
    VariantEvaluation,
    better_and_worse,
    enforce_gate,
    evaluate_run,
    two_slice_failures,
)
from components.report import comparison_metrics, write_report
from edgeloop_core.contract import ArtifactLayout, Manifest, TensorSpec, Validation, Variant, sha256_file
from edgeloop_core.errors import ConfigError, GateFailed

MODEL = "digits-lr"
VERSION = "v20261205-120000-beef"


# --- the gate's rules, without any model ---------------------------------------------------------------------------


def _comparison(name: str, curated: tuple[float, float], field: tuple[float, float] | None,
                against: str | None = None) -> VariantComparison:
    return VariantComparison(
        name=name, against=against or name, curated=SliceAccuracy(curated[0]),
        deployed_curated=SliceAccuracy(curated[1]),
        field=SliceAccuracy(field[0], {"3": 0.9, "7": 0.5}, {"d3": field[0]}) if field else None,
        deployed_field=SliceAccuracy(field[1], {"3": 0.6, "7": 0.7}, {"d3": field[1]}) if field else None)


def test_gate_rules_beat_match_curated_tolerance_and_first_publish():
    rules = dict(deployed_version=VERSION, tolerance_points=1.0, field_tolerance_points=0.0, field_state="ready")
    better = [_comparison("fp32-dense", (0.955, 0.960), (0.80, 0.74))]
    assert two_slice_failures(better, field_gate="beat", **rules) == []  # -0.5 curated is within 1.0 point

    tie = [_comparison("int8-ort", (0.96, 0.96), (0.74, 0.74), against="fp32-dense")]
    (line,) = two_slice_failures(tie, field_gate="beat", **rules)
    assert line == f"field slice: int8-ort 74.0% is not above deployed {VERSION} fp32-dense (74.0%) — field_gate=beat"
    assert two_slice_failures(tie, field_gate="match", **rules) == []  # a tie matches
    assert two_slice_failures(tie, field_gate="off", **rules) == []

    slightly_worse = [_comparison("fp16", (0.96, 0.96), (0.725, 0.74))]
    (line,) = two_slice_failures(slightly_worse, field_gate="match", **rules)
    assert line.startswith("field slice: fp16 72.5% is 1.50 points below deployed") and "field_gate=match" in line
    assert two_slice_failures(slightly_worse, field_gate="match", **{**rules, "field_tolerance_points": 2.0}) == []

    curated_regression = [_comparison("fp32", (0.93, 0.96), (0.90, 0.74))]
    (line,) = two_slice_failures(curated_regression, field_gate="beat", **rules)
    assert line == (f"curated test: fp32 93.0% is 3.00 points below deployed {VERSION} (96.0%), beyond "
                    f"tolerance_points 1.00")
    assert two_slice_failures(curated_regression, field_gate="beat", **{**rules, "tolerance_points": 3.5}) == []

    # no deployed version (first publish): nothing to compare with, nothing fails ...
    first = {**rules, "deployed_version": ""}
    assert two_slice_failures(curated_regression + tie, field_gate="beat", **first) == []
    # ... except a field slice that is empty while the field gate is on: it cannot judge, and says so
    (line,) = two_slice_failures([], field_gate="beat", **{**first, "field_state": "empty"})
    assert line.startswith("field slice: empty") and "field_gate=off" in line
    assert two_slice_failures([], field_gate="off", **{**first, "field_state": "empty"}) == []
    assert two_slice_failures([], field_gate="beat", **{**first, "field_state": "none"}) == []  # no field data


def test_better_and_worse_name_slices_classes_and_devices():
    better, worse = better_and_worse(_comparison("fp32-dense", (0.955, 0.960), (0.80, 0.74)))
    assert better[0] == "field slice +6.0 points (74.0% → 80.0%)"
    assert "class 3 +30.0 points (60.0% → 90.0%)" in better and "device d3 +6.0 points (74.0% → 80.0%)" in better
    assert worse == ["curated test -0.5 points (96.0% → 95.5%)", "class 7 -20.0 points (70.0% → 50.0%)"]


def test_gate_step_raises_the_first_failure_as_one_line_and_old_evaluations_still_load(tmp_path):
    evaluation = Evaluation("fp32-dense", 1.0, [], passed=False, failures=["field slice: a", "curated test: b"])
    with pytest.raises(GateFailed) as info:
        enforce_gate(evaluation)
    assert str(info.value) == "field slice: a (and 1 more failure: see the report)"
    # an evaluation written before the two-slice gate (no comparison fields) still loads
    old = {"baseline": "fp32-dense", "tolerance_points": 1.0, "passed": True, "failures": [], "variants": [asdict(
        VariantEvaluation("fp32-dense", "fp32", "none", False, 1, 1, 1, 0.9, 0.1, 1.0))]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = Evaluation.load(tmp_path / "old.json")
    assert loaded.comparisons == [] and loaded.deployed == {} and loaded.field_gate == "off"
    enforce_gate(loaded)  # passed: no error


# --- real models, a really published deployed version ---------------------------------------------------------------


def _shifted(x: np.ndarray) -> np.ndarray:
    """The field's digits: a light grey background, faded strokes."""
    return (0.7 + 0.3 * x).astype(np.float32)


def _linear_onnx(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """A logistic regression fitted on ``x``/``y``, as ONNX: input ``[-1, 1, 8, 8]`` → Flatten → Gemm → logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.linear_model import LogisticRegression

    fitted = LogisticRegression(max_iter=300, tol=1e-3).fit(x.reshape(len(x), -1), y)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "W", "b"], ["logits"], transB=1)],
        "lr", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(fitted.coef_.astype(np.float32), "W"),
         numpy_helper.from_array(fitted.intercept_.astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _variants(out: Path, dense: Path, x_calibration: np.ndarray) -> Path:
    """``fp32-dense``, ``fp32`` (the same weights) and ``int8-ort`` (ONNX Runtime's quantizer), with variants.json."""
    from components.export import VariantInfo, quantize_ort_int8

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(dense, out / "fp32-dense.onnx")
    shutil.copyfile(dense, out / "fp32.onnx")
    quantize_ort_int8(out / "fp32.onnx", out / "int8-ort.onnx", x_calibration)
    infos = [VariantInfo(name, f"{name}.onnx", precision, quantization, ("onnxruntime",), name != "fp32-dense",
                         650, 1300, 0.0, 1.0)
             for name, precision, quantization in (("fp32-dense", "fp32", "none"), ("fp32", "fp32", "none"),
                                                   ("int8-ort", "int8", "ort-qdq"))]
    (out / "variants.json").write_text(json.dumps([asdict(i) for i in infos]))
    return out


@pytest.fixture(scope="module")
def field_run(tmp_path_factory):
    """The digits with a field slice (shifted test digits from devices d3 and d4), and two models: ``curated``
    (trained on the curated digits only) and ``flywheel`` (the curated digits plus shifted field-train digits)."""
    from components.data import load_digits_dataset

    root = tmp_path_factory.mktemp("two-slice")
    data = load_digits_dataset()
    field_train = _shifted(data.x_train[:500])
    data.x_field, data.y_field = _shifted(data.x_test[:150]), data.y_test[:150].copy()
    devices = ["d3" if i % 3 else "d4" for i in range(150)]
    data.extra["field"] = {"snapshot": "ab" * 32, "ratio": 0.3, "slice_fraction": 0.3,
                           "train": {"samples": 500, "devices": ["d1", "d2"], "days": ["2026-12-04"],
                                     "label_sources": {"app": 300, "teacher": 200}, "ids": ["c1:0", "c1:1"]},
                           "slice": {"samples": 150, "devices": ["d3", "d4"], "label_sources": {"app": 150},
                                     "ids": [f"c9:{i}" for i in range(150)], "device_of_row": devices}}
    data.extra["warm_start"] = {"version": VERSION, "checkpoint_sha256": "cd" * 32}
    curated = _linear_onnx(root / "curated.onnx", data.x_train, data.y_train)
    flywheel = _linear_onnx(root / "flywheel.onnx", np.concatenate([data.x_train, field_train]),
                            np.concatenate([data.y_train, data.y_train[:500]]))
    return data, {"curated": curated, "flywheel": flywheel}, root


def _publish_deployed(store, signing_key, onnx: Path, x_val: np.ndarray, y_val: np.ndarray, staging: Path) -> None:
    """Publish ``onnx`` as the signed version VERSION (variants fp32-dense and fp32) on channel ``stable``."""
    from components.publish import publish_version

    staging.mkdir(parents=True)
    np.savez(staging / "validation.npz", inputs=x_val, labels=y_val)
    variants = []
    for name in ("fp32-dense", "fp32"):
        shutil.copyfile(onnx, staging / f"{name}.onnx")
        digest, size = sha256_file(staging / f"{name}.onnx")
        variants.append(Variant(file=f"{name}.onnx", sha256=digest, size_bytes=size, name=name, precision="fp32",
                                backends=["onnxruntime"], accuracy=0.95))
    digest, size = sha256_file(staging / "validation.npz")
    manifest = Manifest(name=MODEL, version=VERSION, created_at=datetime.now(timezone.utc),
                        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 1, 8, 8])],
                        outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
                        labels=[str(i) for i in range(10)], variants=variants,
                        validation=Validation(file="validation.npz", sha256=digest, size_bytes=size,
                                              num_samples=len(y_val), reference={"fp32-dense": 0.95, "fp32": 0.95},
                                              tolerance=0.01))
    publish_version(store, manifest, staging, signing_key, layout=ArtifactLayout(), channel="stable")


@pytest.fixture
def trust(monkeypatch, key_dir):
    monkeypatch.setenv("EDGELOOP_VERIFY_KEY_FILE", str(key_dir / "verify-key.pem"))


def _evaluate(data, onnx_dir: Path, store, **overrides) -> Evaluation:
    options = dict(tolerance_points=1.0, min_speedup=0.01, store=store, model_name=MODEL, channel="stable",
                   field_gate="beat", latency_runs=3)
    return evaluate_run(data, onnx_dir, **{**options, **overrides})


def test_a_model_worse_on_the_field_slice_is_refused_in_one_line_and_the_report_shows_both_slices(
        field_run, store, signing_key, trust, tmp_path):
    data, models, _ = field_run
    _publish_deployed(store, signing_key, models["flywheel"], data.x_test, data.y_test, tmp_path / "staging")
    onnx_dir = _variants(tmp_path / "new", models["curated"], data.x_train[:256])
    evaluation = _evaluate(data, onnx_dir, store)

    assert not evaluation.passed and evaluation.deployed == {"channel": "stable", "version": VERSION}
    by_name = {c.name: c for c in evaluation.comparisons}
    assert by_name["int8-ort"].against == "fp32-dense"  # the deployed version has no int8-ort
    dense = by_name["fp32-dense"]
    assert dense.field.overall < dense.deployed_field.overall - 0.3  # the curated-only model fails on the shift
    assert set(dense.field.per_device) == {"d3", "d4"} and len(dense.field.per_class) == 10
    assert all(line.startswith("field slice: ") and line.endswith("— field_gate=beat")
               for line in evaluation.failures)
    evaluation.save(tmp_path / "evaluation.json")  # what the gate step reads
    with pytest.raises(GateFailed) as info:
        enforce_gate(Evaluation.load(tmp_path / "evaluation.json"))
    line = str(info.value)
    assert "\n" not in line and re.match(
        rf"field slice: fp32-dense \d+\.\d% is not above deployed {VERSION} \(\d+\.\d%\) — field_gate=beat "
        r"\(and 2 more failures: see the report\)$", line), line
    assert any(item.startswith("field slice -") for item in evaluation.worse)

    page = write_report(Evaluation.load(tmp_path / "evaluation.json"), data.labels, tmp_path / "report.html",
                        title="t", primary="int8-ort").read_text()
    table = re.search(r'<table id="two-slices">(.*?)</table>', page, re.S).group(1)
    assert "curated test set, accuracy %" in table and "field slice, accuracy %" in table
    row = re.search(r"<tr><td>fp32-dense</td>(.*?)</tr>", table).group(1)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", row)
    assert cells == ["fp32-dense", f"{dense.curated.overall * 100:.1f}", f"{dense.deployed_curated.overall * 100:.1f}",
                     f"{(dense.curated.overall - dense.deployed_curated.overall) * 100:+.1f}",
                     f"{dense.field.overall * 100:.1f}", f"{dense.deployed_field.overall * 100:.1f}",
                     f"{(dense.field.overall - dense.deployed_field.overall) * 100:+.1f}"]
    assert "verdict: FAILED" in page and all(f in page for f in evaluation.failures)  # every failure, not only one
    assert 'id="field-per-class"' in page and 'id="field-per-device"' in page and "<td>d4</td><td>50</td>" in page
    assert "worse: field slice -" in page
    assert "ab" * 32 in page and "label_sources" in page and VERSION in page  # lineage, warm-start base included
    assert "c9:7" not in page and "ids_count" in page  # the id lists are counted, not listed
    metrics = comparison_metrics(evaluation)
    assert metrics["gate_passed"] == 0.0 and metrics["field_slice_samples"] == 150.0
    assert metrics["fp32-dense_field_gain_points"] < -30


def test_a_model_that_learned_the_field_passes_and_every_variant_beats_the_deployed_one(
        field_run, store, signing_key, trust, tmp_path):
    data, models, _ = field_run
    _publish_deployed(store, signing_key, models["curated"], data.x_test, data.y_test, tmp_path / "staging")
    onnx_dir = _variants(tmp_path / "new", models["flywheel"], data.x_train[:256])
    evaluation = _evaluate(data, onnx_dir, store)
    assert evaluation.passed, evaluation.failures
    for c in evaluation.comparisons:
        assert c.field.overall > c.deployed_field.overall + 0.3
    assert evaluation.better[0].startswith("field slice +")
    assert evaluation.lineage["slice"]["ids_count"] == 150 and evaluation.lineage["warm_start"]["version"] == VERSION
    enforce_gate(evaluation)

    # the same run judged against a channel with nothing on it: first publish, no comparison, and it says so
    first = _evaluate(data, onnx_dir, store, channel="canary")
    assert first.passed and first.deployed == {} and "first publish" in first.comparison_note
    assert first.comparisons[0].deployed_field is None and first.comparisons[0].field is not None
    # field data whose slice came out empty: the field gate cannot judge, unless it is off
    data_without_slice = type(data)(**{**data.__dict__, "x_field": None, "y_field": None})
    (line,) = _evaluate(data_without_slice, onnx_dir, store).failures
    assert line.startswith("field slice: empty")
    assert _evaluate(data_without_slice, onnx_dir, store, field_gate="off").passed
    with pytest.raises(ConfigError):
        _evaluate(data, onnx_dir, store, field_gate="sometimes")


def test_a_deployed_version_that_fails_verification_fails_the_gate(field_run, store, signing_key, trust, tmp_path):
    data, models, _ = field_run
    _publish_deployed(store, signing_key, models["curated"], data.x_test, data.y_test, tmp_path / "staging")
    layout = ArtifactLayout()
    store.put_bytes(layout.file_key(MODEL, VERSION, "fp32.onnx"), b"planted")  # not the bytes the manifest signed
    onnx_dir = _variants(tmp_path / "new", models["flywheel"], data.x_train[:256])
    evaluation = _evaluate(data, onnx_dir, store, tolerance_points=3.0)
    (line,) = evaluation.failures
    assert line.startswith("deployed version on channel 'stable' could not be read: fp32.onnx: size 7 bytes")
    assert evaluation.deployed == {} and all(c.deployed_curated is None for c in evaluation.comparisons)


def test_the_steps_in_pipeline_order_evaluate_report_gate(field_run, store, signing_key, trust, tmp_path, local_s3,
                                                         monkeypatch):
    """The KFP components themselves (their Python functions, on artifacts with local paths): evaluate records the
    verdict without failing, report writes the page and the new metrics, then gate fails with the one line."""
    from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Metrics, Model

    from components import steps

    for name, value in local_s3.env().items():
        monkeypatch.setenv(name, value)
    data, models, _ = field_run
    _publish_deployed(store, signing_key, models["flywheel"], data.x_test, data.y_test, tmp_path / "staging")
    dataset, onnx = Dataset(uri=str(tmp_path / "dataset.npz")), Model(uri=str(tmp_path / "onnx"))
    data.save(dataset.path)
    _variants(Path(onnx.path), models["curated"], data.x_train[:256])
    (Path(onnx.path) / "int8-qdq.onnx").write_bytes((Path(onnx.path) / "int8-ort.onnx").read_bytes())
    infos = json.loads((Path(onnx.path) / "variants.json").read_text())  # the report's confusion matrix: int8-qdq
    (Path(onnx.path) / "variants.json").write_text(json.dumps(
        infos + [{**infos[-1], "name": "int8-qdq", "file": "int8-qdq.onnx", "quantization": "modelopt-qdq"}]))
    evaluation, metrics = Artifact(uri=str(tmp_path / "evaluation.json")), Metrics(uri=str(tmp_path / "m1"))
    steps.evaluate.python_func(dataset=dataset, onnx_models=onnx, tolerance_points=1.0, min_speedup=0.01,
                               evaluation=evaluation, metrics=metrics, model_name=MODEL, bucket=store.bucket,
                               s3_endpoint=local_s3.endpoint_url, channel="canary", deployed_channel="stable")
    assert evaluation.metadata["passed"] is False and evaluation.metadata["deployed"]["version"] == VERSION
    page, report_metrics = HTML(uri=str(tmp_path / "report.html")), Metrics(uri=str(tmp_path / "m2"))
    steps.report.python_func(dataset=dataset, evaluation=evaluation, model_name=MODEL, report_html=page,
                             metrics=report_metrics, confusion=ClassificationMetrics(uri=str(tmp_path / "c")))
    assert 'id="two-slices"' in Path(page.path).read_text() and "verdict: FAILED" in Path(page.path).read_text()
    assert report_metrics.metadata["gate_passed"] == 0.0
    assert report_metrics.metadata["int8-qdq_field_gain_points"] < -30
    assert report_metrics.metadata["fp32-dense_deployed_field_accuracy"] > 0.9
    with pytest.raises(GateFailed) as info:
        steps.gate.python_func(evaluation=evaluation)
    assert str(info.value).startswith("field slice: fp32-dense ") and "field_gate=beat" in str(info.value)


def test_a_deployed_version_that_cannot_run_here_fails_the_gate_in_one_line(field_run, store, signing_key, trust,
                                                                          tmp_path):
    data, models, root = field_run
    broken = root / "not-onnx.onnx"
    broken.write_bytes(b"signed, verified, and still not an ONNX model")
    _publish_deployed(store, signing_key, broken, data.x_test, data.y_test, tmp_path / "staging")
    onnx_dir = _variants(tmp_path / "new", models["flywheel"], data.x_train[:256])
    evaluation = _evaluate(data, onnx_dir, store)
    (line,) = evaluation.failures
    assert line.startswith(f"deployed {VERSION} could not run on this machine's ONNX Runtime: ") and "\n" not in line
    assert evaluation.deployed == {} and evaluation.comparisons[0].field is not None
