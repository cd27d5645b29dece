"""Training, pruning, QAT and export on real data, kept small (the full-size run is the pipeline test)."""

from __future__ import annotations

import numpy as np
import pytest

from components.data import load_digits_dataset
from components.evaluate import enforce_gate, evaluate_variants
from components.export import VARIANTS, export_variants, load_variant_infos
from components.models import load_checkpoint, save_checkpoint
from components.prune import prune_model
from components.qat import quantize_aware_train
from components.report import write_report
from components.train import accuracy, train_model
from edgeloop_core.errors import ConfigError, GateFailed


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


@pytest.fixture(scope="module")
def vit_variants(digits, tmp_path_factory):
    """The vision transformer through every step, with short schedules."""
    root = tmp_path_factory.mktemp("vit")
    dense, spec, history = train_model(digits, arch="vit", epochs=6, progress=False)
    assert len(history.epochs) == 6
    save_checkpoint(dense, spec, root / "dense")
    pruned, result = prune_model(load_checkpoint(root / "dense")[0], digits, keep_fraction=0.7, finetune_epochs=2,
                                 progress=False)
    assert result.flops_after < result.flops_before
    save_checkpoint(pruned, spec, root / "pruned")
    quantized, _ = quantize_aware_train(load_checkpoint(root / "pruned")[0], digits, epochs=1, progress=False)
    save_checkpoint(quantized, spec, root / "qat")
    restored, _ = load_checkpoint(root / "qat")
    assert accuracy(restored, digits.x_test, digits.y_test) == accuracy(quantized, digits.x_test, digits.y_test)
    export_variants(load_checkpoint(root / "dense")[0], load_checkpoint(root / "pruned")[0], restored,
                    x_check=digits.x_test, x_calibration=digits.x_train[:256], out_dir=root / "onnx")
    return root / "onnx"


def test_every_variant_is_exported_with_a_dynamic_batch(vit_variants, digits):
    import onnx
    import onnxruntime as ort

    infos = load_variant_infos(vit_variants)
    assert tuple(i.name for i in infos) == VARIANTS
    for info in infos:
        model = onnx.load(str(vit_variants / info.file))
        batch = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param == "batch", info.name
        session = ort.InferenceSession(str(vit_variants / info.file), providers=["CPUExecutionProvider"])
        for n in (1, 7):
            (out,) = session.run(None, {"input": digits.x_test[:n]})
            assert out.shape == (n, 10)
        assert info.top1_agreement >= 0.95
    ops = {n.op_type for n in onnx.load(str(vit_variants / "int8-qdq.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    fp16_types = {i.data_type for i in onnx.load(str(vit_variants / "fp16.onnx")).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in fp16_types


def test_evaluation_gate_and_report(vit_variants, digits, tmp_path):
    infos = load_variant_infos(vit_variants)
    passed = evaluate_variants(vit_variants, infos, digits.x_test, digits.y_test, 10, tolerance_points=100.0,
                               latency_runs=5)
    enforce_gate(passed)
    dense = passed.variant("fp32-dense")
    assert dense.drop_points == 0.0 and dense.latency_ms_b1 > 0 and dense.size_bytes > 0
    assert np.array(dense.confusion).sum() == len(digits.y_test)
    assert np.trace(np.array(dense.confusion)) == round(dense.accuracy * len(digits.y_test))

    worst = max(v.drop_points for v in passed.variants if v.precision == "int8")
    strict = evaluate_variants(vit_variants, infos, digits.x_test, digits.y_test, 10,
                               tolerance_points=worst - 0.5, latency_runs=5)
    with pytest.raises(GateFailed) as info:
        enforce_gate(strict)
    assert not strict.passed and "tolerance" in str(info.value)

    page = write_report(passed, digits.labels, tmp_path / "report.html", title="vit").read_text()
    assert page.count("data:image/png;base64,") == 3 and "int8-ort" in page


def test_unknown_architecture_and_bad_settings(digits):
    with pytest.raises(ConfigError):
        train_model(digits, arch="resnet9000", epochs=1, progress=False)
    with pytest.raises(ConfigError):
        train_model(digits, epochs=-1, progress=False)


def test_the_export_check_tops_a_small_test_set_up_to_256_inputs():
    from components.export import CHECK_MIN_SAMPLES, check_inputs

    x_test, x_val, x_train = (np.full((n, 1, 2, 2), v, np.float32) for n, v in ((30, 0), (30, 1), (400, 2)))
    x = check_inputs(x_test, x_val, x_train)
    assert len(x) == CHECK_MIN_SAMPLES == 256  # 30 clips alone: one flipped answer would fail a 98% bound
    assert (x[:30] == 0).all() and (x[30:60] == 1).all() and (x[60:] == 2).all()
    large = np.zeros((300, 1, 2, 2), np.float32)
    assert check_inputs(large, x_val, x_train) is large  # a large test set is used alone, as before
    assert len(check_inputs(x_test, x_val, x_train[:10])) == 70  # all there is
