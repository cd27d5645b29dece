"""The TensorRT path end to end on the strict stand-in (tests/trt_standin.py), for both API levels: 10.3 on an
Orin NX (JetPack 6.2) and 11 on a discrete GPU. The same life cycle as ONNX Runtime's: fetch, build, validate,
serve through tritonclient, swap, cache hit, shared engine, quarantine; plus what breaks on a real Jetson."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from edge_runtime.build.device import detect
from tests import trt_standin
from tests.edge_runtime.conftest import RunningEdge, accuracy_of, publish_model, wait_until

pytestmark = pytest.mark.integration
MODEL = "digits-cnn"
ORIN_MODEL = "NVIDIA Jetson Orin NX Engineering Reference Developer Kit\x00"
L4T_36_4 = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: ...\n"


@pytest.fixture(params=["10.3", "11"])
def trt_device(request, monkeypatch, tmp_path):
    """The stand-in installed, and host files laid out as the device for that API level would have them."""
    api = request.param
    host = tmp_path / "host"
    host.mkdir()
    if api == "10.3":  # an Orin NX on JetPack 6.2
        device = trt_standin.Device("Orin", 8, 7, 8, 16 << 30)
        (host / "nv_tegra_release").write_text(L4T_36_4)
        (host / "model").write_text(ORIN_MODEL)
    else:  # TensorRT 11 on a discrete GPU (Orin cannot run 11 on JetPack 6)
        device = trt_standin.Device("NVIDIA H100 80GB HBM3", 9, 0, 132, 80 << 30)
    trt = trt_standin.install(monkeypatch, api, device=device)
    files = {"tegra_release_file": host / "nv_tegra_release", "device_model_file": host / "model"}
    facts = detect(files["tegra_release_file"], files["device_model_file"])
    if api == "10.3":
        from dataclasses import replace

        facts = replace(facts, arch="aarch64")  # what platform.machine() says on the Orin
    return api, trt, facts, files


def _predict(address: str, x: np.ndarray) -> tuple[np.ndarray, str]:
    client = triton.InferenceServerClient(address)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x.astype(np.float32))
    result = client.infer(MODEL, [tensor])
    return result.as_numpy("logits"), result.get_response().model_version


def test_the_tensorrt_life_cycle(trt_device, store, signing_key, trained, edge_settings, tmp_path):
    api, trt, facts, files = trt_device
    assert facts.has_tensorrt and facts.trt_version == trt.__version__
    publish_model(store, signing_key, trained, "v1")
    settings = edge_settings(store.bucket, **files)
    edge = RunningEdge(settings, store=store, facts=facts)
    try:
        edge.wait_ready(60)
        serving = edge.app.runtime.serving
        assert serving.plan.backend == "tensorrt" and serving.engine.platform == "tensorrt_plan"
        key = str(serving.plan.target_key)
        if api == "10.3":
            assert key == "trt10.3.0.30-sm87x8-orin-nx-l4t36.4-aarch64-fp32-b1x8x16"
        else:
            assert key.startswith("trt11.0.0.114-sm90x132-") and "l4t" not in key
        built = edge.events("built")[-1]
        assert built["source"] == "built" and any("TensorRT: WARNING" in n for n in built["notes"])
        logits, version = _predict(edge.address, trained.x_val[:16])
        assert version == "v1" and logits.shape == (16, 10)
        reference = accuracy_of(trained.good["fp32"], trained.x_val[:16], trained.y_val[:16])
        assert float((logits.argmax(1) == trained.y_val[:16]).mean()) == pytest.approx(reference, abs=1e-9)
        assert edge.events("validated")[-1]["passed"]
        timing = list((settings.cache_dir / "engines" / "timing").glob("*.cache"))
        assert len(timing) == 1 and timing[0].name.startswith(f"trt{trt.__version__}-")  # per build and device
        # a new version swaps in while the old one serves
        publish_model(store, signing_key, trained, "v2")
        edge.app.runtime.wake()
        wait_until(lambda: edge.app.runtime.serving.version == "v2" and edge.app.runtime.ready(), timeout=60)
        assert _predict(edge.address, trained.x_val[:2])[1] == "v2"
    finally:
        edge.stop()
    engine = next((settings.cache_dir / "engines" / MODEL / "v2").rglob("fp32.plan"))
    # a restart loads the cached plan: no build
    again = RunningEdge(settings, store=store, facts=facts)
    try:
        again.wait_ready(60)
        assert again.events("built")[-1]["source"] == "cache"
    finally:
        again.stop()
    # a flipped byte in the plan: quarantined, rebuilt, validated
    data = bytearray(engine.read_bytes())
    data[-100] ^= 0xFF
    engine.write_bytes(bytes(data))
    third = RunningEdge(settings, store=store, facts=facts)
    try:
        third.wait_ready(60)
        built = third.events("built")[-1]
        assert built["source"] == "built" and "set aside" in built["notes"][0]
        assert third.events("validated")[-1]["passed"]
    finally:
        third.stop()


def test_a_shared_tensorrt_engine_between_identical_devices(trt_device, store, signing_key, trained, edge_settings,
                                                            tmp_path):
    from edgeloop_core.contract import generate_signing_key

    _, _, facts, files = trt_device
    fleet, _ = generate_signing_key(tmp_path / "fleet")
    sharing = {"share_engines": True, "engine_signing_key_file": fleet,
               "engine_verify_key_file": tmp_path / "fleet" / "verify-key.pem", **files}
    publish_model(store, signing_key, trained, "v1")
    first = RunningEdge(edge_settings(store.bucket, cache_dir=tmp_path / "a", **sharing), store=store, facts=facts)
    try:
        first.wait_ready(60)
    finally:
        first.stop()
    second = RunningEdge(edge_settings(store.bucket, cache_dir=tmp_path / "b", device_id="twin", **sharing),
                         store=store, facts=facts)
    try:
        second.wait_ready(60)
        assert second.events("built")[-1]["source"] == "shared"
        assert second.events("validated")[-1]["passed"]
    finally:
        second.stop()


def test_api_levels_expose_what_the_real_bindings_do(trt_device):
    api, trt, _, _ = trt_device
    assert hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    assert hasattr(trt.BuilderFlag, "FP16") == (api == "10.3")  # TensorRT 11 has no precision flags
    assert hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") == (api == "10.3")
    import sys

    assert ("cuda.cudart" in sys.modules) == (api == "10.3")  # cuda-bindings 13 dropped the trampoline


def test_plans_are_refused_by_another_build_or_device_and_profiles_are_enforced(monkeypatch, trained, tmp_path):
    from edge_runtime.build.engines.tensorrt import TrtEngine, build_trt
    from edgeloop_core.errors import EngineError, InvalidInput

    trt_standin.install(monkeypatch, "10.3")
    plan = tmp_path / "fp32.plan"
    build_trt(trained.good["fp32"], plan, batch_profile=(1, 4, 8))
    engine = TrtEngine(plan, max_batch_size=16)
    assert engine.max_batch_size == 8  # the profile's maximum, not the setting's
    with pytest.raises(InvalidInput):
        engine.infer({"input": np.zeros((9, 1, 8, 8), np.float32)})  # past the profile
    with pytest.raises(InvalidInput) as outside:
        engine.infer({"input": np.zeros((2, 1, 9, 9), np.float32)})  # set_input_shape returns False
    assert "optimization profile" in str(outside.value)
    engine.close()
    trt_standin.install(monkeypatch, "11")  # another TensorRT build: the plan is not for it
    with pytest.raises(EngineError) as other_build:
        TrtEngine(plan, max_batch_size=8)
    assert "not compatible with this version of TensorRT" in str(other_build.value)
    trt_standin.install(monkeypatch, "10.3", device=trt_standin.Device("Orin", 8, 7, 4))  # an Orin Nano 4GB
    with pytest.raises(EngineError) as other_device:
        TrtEngine(plan, max_batch_size=8)
    assert "built for device" in str(other_device.value)


def test_a_fixed_batch_onnx_gets_a_fixed_profile(monkeypatch, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edge_runtime.build.engines.tensorrt import TrtEngine, build_trt

    trt_standin.install(monkeypatch, "11")
    graph = helper.make_graph([helper.make_node("Relu", ["images/in:0"], ["scores/out:0"])], "fixed",
                              [helper.make_tensor_value_info("images/in:0", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("scores/out:0", TensorProto.FLOAT, [1, 3, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    build_trt(tmp_path / "fixed.onnx", tmp_path / "fixed.plan", batch_profile=(1, 8, 16))
    engine = TrtEngine(tmp_path / "fixed.plan", max_batch_size=16)
    assert engine.max_batch_size == 1 and engine.inputs[0].shape == (1, 3, 4, 4)
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(engine.infer({"images/in:0": x})["scores/out:0"], np.maximum(x, 0))
    engine.close()


def test_a_jetson_without_gpu_access_refuses_instead_of_serving_on_the_cpu(monkeypatch, store, signing_key, trained,
                                                                          edge_settings, tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    (host / "nv_tegra_release").write_text(L4T_36_4)
    (host / "model").write_text(ORIN_MODEL)
    files = {"tegra_release_file": host / "nv_tegra_release", "device_model_file": host / "model"}
    trt_standin.install(monkeypatch, "10.3", gpu=False)  # the pod lacks the video group: CUDA sees no device
    facts = detect(files["tegra_release_file"], files["device_model_file"])
    assert facts.is_jetson and not facts.has_tensorrt and "video" in facts.trt_error
    publish_model(store, signing_key, trained, "v1")
    edge = RunningEdge(edge_settings(store.bucket, **files), store=store, facts=facts)
    try:
        wait_until(lambda: edge.events("failed"), timeout=30)
        failure = edge.events("failed")[-1]["error"]
        assert "TensorRT is unusable" in failure and "video" in failure and "EDGE_ALLOW_CPU_FALLBACK" in failure
        assert not edge.app.runtime.ready() and edge.app.runtime.serving is None
    finally:
        edge.stop()
    allowed = RunningEdge(edge_settings(store.bucket, allow_cpu_fallback=True, cache_dir=tmp_path / "c2", **files),
                          store=store, facts=facts)
    try:
        allowed.wait_ready(60)
        assert allowed.app.runtime.serving.plan.backend == "onnxruntime"
        assert "video" in allowed.events("cpu_fallback")[-1]["reason"]  # said, not silent
    finally:
        allowed.stop()


def test_an_explicit_variant_must_suit_the_backend(tmp_path):
    from dataclasses import replace

    from edge_runtime.build.engines import plan_engine
    from edgeloop_core.errors import ConfigError
    from tests.conftest import make_staged_version

    manifest = make_staged_version(tmp_path)
    facts = replace(detect(Path("/nonexistent"), Path("/nonexistent")), trt_version="10.3.0.30",
                    compute_capability="87", sm_count=8, trt_error=None)
    with pytest.raises(ConfigError) as info:  # ONNX Runtime's asymmetric INT8 model on TensorRT
        plan_engine(manifest, facts, backend="tensorrt", variant="int8-ort")
    assert "made for onnxruntime, not tensorrt" in str(info.value)


def test_unsupported_jetpack_combinations_are_refused_with_what_to_do():
    from dataclasses import replace

    from edge_runtime.build.engines.select import resolve_backend
    from edgeloop_core.errors import ConfigError

    base = detect(Path("/nonexistent"), Path("/nonexistent"))
    orin = replace(base, arch="aarch64", trt_version="10.3.0.30", compute_capability="87", sm_count=8,
                   module="orin-nx", l4t_release="36.4", trt_error=None)
    assert resolve_backend(orin)[0] == "tensorrt"
    with pytest.raises(ConfigError) as jp60:
        resolve_backend(replace(orin, l4t_release="36.3"))
    assert "JetPack 6.1/6.2" in str(jp60.value) and "8.6" in str(jp60.value)
    with pytest.raises(ConfigError) as trt11:
        resolve_backend(replace(orin, trt_version="11.0.0.114"))
    assert "JetPack 7" in str(trt11.value)
    with pytest.raises(ConfigError):
        resolve_backend(replace(orin, trt_version="8.6.2.3", l4t_release="36.3"))
