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
    trt_standin.install(monkeypatch, "10.3", device=trt_standin.Device("NVIDIA H100 80GB HBM3", 9, 0, 132))
    with pytest.raises(EngineError) as other_device:
        TrtEngine(plan, max_batch_size=8)
    assert "incompatible device, expecting compute 9.0 got compute 8.7" in str(other_device.value)
    # an Orin Nano 4GB (sm_87, 4 SMs) loads the Orin NX's plan, as real TensorRT does, with its warning: the target
    # key (module, SM count) is what keeps a device from ever being handed such a plan
    trt_standin.install(monkeypatch, "10.3", device=trt_standin.Device("Orin", 8, 7, 4))
    nano = TrtEngine(plan, max_batch_size=8)
    assert any("across different models of devices" in m for m in nano.logger.messages)
    assert nano.infer({"input": np.zeros((2, 1, 8, 8), np.float32)})["logits"].shape == (2, 10)
    nano.close()


@pytest.mark.parametrize(("api", "bit", "fp16"), [("10.3", 1 << 1, 0), ("11", 0, None)])
def test_the_stand_in_has_the_bindings_enum_values_and_the_builder_sets_the_right_bit(monkeypatch, trained, tmp_path,
                                                                                       api, bit, fp16):
    """NvInfer.h: 10.3 has kEXPLICIT_BATCH = 0, kSTRONGLY_TYPED = 1, kFP16 = 0; 11 has kSTRONGLY_TYPED = 0 (ignored:
    always strongly typed), kPREFER_JIT_PYTHON_PLUGINS = 1 and no kFP16 (see tests/trt_standin.py for the lines)."""
    from edge_runtime.build.engines.tensorrt import build_trt

    trt = trt_standin.install(monkeypatch, api)
    assert int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == (1 if api == "10.3" else 0)
    if api == "11":
        assert int(trt.NetworkDefinitionCreationFlag.PREFER_JIT_PYTHON_PLUGINS) == 1
        assert int(trt.BuilderFlag.DISTRIBUTIVE_INDEPENDENCE) == 27 and not hasattr(trt.BuilderFlag, "FP16")
    else:
        assert int(trt.BuilderFlag.FP16) == fp16 and int(trt.BuilderFlag.REFIT_INDIVIDUAL) == 23
    created = []
    real_create = trt.Builder.create_network
    monkeypatch.setattr(trt.Builder, "create_network", lambda self, flags=0: created.append(flags) or
                        real_create(self, flags))
    build_trt(trained.good["fp32"], tmp_path / "fp32.plan", batch_profile=(1, 2, 4))
    assert created == [bit]  # 10.3: 1 << STRONGLY_TYPED; 11: nothing (1 << 0 would be the deprecated flag)


def test_a_corrupt_timing_cache_is_ignored_with_a_warning_and_rewritten(monkeypatch, trained, tmp_path):
    from edge_runtime.build.engines.tensorrt import build_trt

    trt_standin.install(monkeypatch, "10.3")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"\x00not a timing cache")
    messages = build_trt(trained.good["fp32"], tmp_path / "a.plan", batch_profile=(1, 2, 4), timing_cache=cache)
    assert any("timing cache is corrupted" in m for m in messages)
    assert cache.read_bytes().startswith(trt_standin.TIMING_MAGIC)  # a valid cache replaced the corrupt one
    again = build_trt(trained.good["fp32"], tmp_path / "b.plan", batch_profile=(1, 2, 4), timing_cache=cache)
    assert not any("timing cache" in m for m in again)  # the rewritten cache is accepted
    assert b'"entries": 2' in cache.read_bytes()  # and grows with each build
    trt_standin.install(monkeypatch, "11")  # a cache of another TensorRT build: ignored, never an error
    other = build_trt(trained.good["fp32"], tmp_path / "c.plan", batch_profile=(1, 2, 4), timing_cache=cache)
    assert any("created by TensorRT 10.3.0.30" in m for m in other)


def test_bad_requests_are_invalid_input_and_a_bad_engine_output_is_an_engine_error(monkeypatch, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edge_runtime.build.engines.tensorrt import TrtEngine, build_trt
    from edgeloop_core.errors import EngineError, InvalidInput

    trt_standin.install(monkeypatch, "11")
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]),
         helper.make_node("ReduceSum", ["sum", "axis0"], ["total"], keepdims=1)],
        "two_inputs", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [-1, 3]) for n in ("a", "b")],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, [-1, 3]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, [1, 3])],  # summed over the batch: not servable
        initializer=[helper.make_tensor("axis0", TensorProto.INT64, [1], [0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    build_trt(tmp_path / "m.onnx", tmp_path / "m.plan", batch_profile=(1, 2, 4))
    engine = TrtEngine(tmp_path / "m.plan", max_batch_size=4)
    with pytest.raises(InvalidInput) as disagree:
        engine.infer({"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 3), np.float32)})
    assert "share one batch size" in str(disagree.value)
    with pytest.raises(InvalidInput) as missing:
        engine.infer({"a": np.zeros((2, 3), np.float32)})
    assert "missing input(s) ['b']" in str(missing.value)
    with pytest.raises(EngineError) as no_batch:
        engine.infer({"a": np.ones((2, 3), np.float32), "b": np.ones((2, 3), np.float32)})
    assert "batch as its first axis" in str(no_batch.value)
    engine.close()


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
    assert "runs TensorRT 10.3" in str(trt11.value)  # NVIDIA: Orin on JetPack 6 stays on TensorRT 10.x
    with pytest.raises(ConfigError):
        resolve_backend(replace(orin, trt_version="8.6.2.3", l4t_release="36.3"))


def test_a_device_takes_the_prebuilt_engine_of_its_own_variant_when_two_share_a_target_key(monkeypatch, store,
                                                                                           trained, tmp_path):
    """``fp32`` and ``fp32-dense`` share a target key; a schema 4 manifest lists a prebuilt plan for each, and each
    variant's plan comes from the bucket (source ``manifest``), not from a build, and not the other's plan."""
    from edge_runtime.build.engines import plan_for
    from edge_runtime.build.engines.provider import EngineProvider
    from edge_runtime.build.engines.tensorrt import build_trt
    from edge_runtime.fetch.cache import ArtifactCache
    from edgeloop_core.contract import ArtifactLayout, EngineRef, Manifest, Variant, sha256_file
    from tests.conftest import make_staged_version

    trt_standin.install(monkeypatch, "11", device=trt_standin.Device("NVIDIA H100 80GB HBM3", 9, 0, 132, 80 << 30))
    facts = detect(Path("/nonexistent"), Path("/nonexistent"))
    staged = make_staged_version(tmp_path / "m", name=MODEL)
    dense = Variant(file="fp32-dense.onnx", sha256="0" * 64, size_bytes=1, name="fp32-dense", precision="fp32",
                    backends=["tensorrt"])
    manifest = Manifest.model_validate({**staged.model_dump(), "variants": [*staged.model_dump()["variants"],
                                                                            dense.model_dump()]})
    plans = {v: plan_for(manifest, facts, manifest.variant(v), backend="tensorrt", device="cpu")
             for v in ("fp32", "fp32-dense")}
    target = str(plans["fp32"].target_key)
    assert str(plans["fp32-dense"].target_key) == target
    layout, digests = ArtifactLayout(), {}
    for variant, onnx_file in (("fp32", trained.good["fp32"]), ("fp32-dense", trained.untrained["fp32"])):
        plan_file = tmp_path / variant / f"{variant}.plan"
        build_trt(onnx_file, plan_file, batch_profile=plans[variant].target_key.batch_profile)
        digest, size = sha256_file(plan_file)
        ref = EngineRef(file=f"engines/{target}/{variant}.plan", sha256=digest, size_bytes=size, built_by="ci")
        store.put_file(layout.file_key(manifest.name, manifest.version, ref.file), plan_file)
        manifest, digests[variant] = manifest.with_engine(target, variant, ref), digest
    assert digests["fp32"] != digests["fp32-dense"]
    provider = EngineProvider(ArtifactCache(tmp_path / "cache", 1 << 30), store, layout, device_id="orin-1",
                              max_batch_size=16)
    for variant, plan in plans.items():
        engine, source, notes = provider.obtain(manifest, plan, tmp_path / "no-onnx-needed.onnx")
        engine.close()
        assert source == "manifest", notes
        assert sha256_file(provider.path(manifest, plan))[0] == digests[variant]


def test_a_thor_on_jetpack_7_with_its_tensorrt_10_serves_on_tensorrt(monkeypatch, store, signing_key, trained,
                                                                      edge_settings, tmp_path):
    """JetPack 7.0 (L4T r38.2) ships TensorRT 10.13 for Thor (sm_110 under CUDA 13): the runtime builds and serves a
    plan there, where it used to refuse the pair and, with a CPU fallback allowed, serve on the CPU."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "nv_tegra_release").write_text("# R38 (release), REVISION: 2.1, GCID: 41062509, BOARD: generic, "
                                           "EABI: aarch64, DATE: ...\n")
    (host / "model").write_text("NVIDIA Jetson AGX Thor Developer Kit\x00")
    trt_standin.install(monkeypatch, "10.3", device=trt_standin.Device("NVIDIA Thor", 11, 0, 20, 128 << 30),
                        version="10.13.3.9")
    files = {"tegra_release_file": host / "nv_tegra_release", "device_model_file": host / "model"}
    from dataclasses import replace

    facts = replace(detect(files["tegra_release_file"], files["device_model_file"]), arch="aarch64")
    publish_model(store, signing_key, trained, "v1")
    edge = RunningEdge(edge_settings(store.bucket, allow_cpu_fallback=True, **files), store=store, facts=facts)
    try:
        edge.wait_ready(60)
        serving = edge.app.runtime.serving
        assert serving.plan.backend == "tensorrt" and not edge.events("cpu_fallback")
        assert str(serving.plan.target_key) == "trt10.13.3.9-sm110x20-agx-thor-l4t38.2-aarch64-fp32-b1x8x16"
        logits, version = _predict(edge.address, trained.x_val[:4])
        assert version == "v1" and logits.shape == (4, 10)
    finally:
        edge.stop()
