"""Action recognition on clips through the retraining pipeline's steps: the generated action set (``data_uri=
synthetic-actions``), the (2+1)D clip model (``arch=r2plus1d``), train, prune, QAT, export, evaluate (gate), report
and publish to the real SeaweedFS S3; then an edge runtime validates the 5-D version on the device and serves it,
batching clips like any input.

Each step is the KFP component's own function (``steps.<name>.python_func``) run in this process on local artifact
paths — what ``kfp.local`` runs, without a Python start-up per step, so the whole chain fits the suite's budget."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from components import steps
from components.action_data import ACTIONS
from edgeloop_core.contract import ArtifactLayout, Clip
from edgeloop_core.published import verify_published

pytestmark = pytest.mark.integration

MODEL = "actions-r2plus1d"
BAR = 0.90
"""The stated top-1 accuracy the FP32 clip model must reach on the synthetic test set (seven actions, chance 0.14)."""
SETTINGS = {"arch": "r2plus1d", "epochs": 15, "lr": 0.004, "seed": 0, "prune_constraint": "flops",
            "prune_keep_fraction": 0.75, "prune_finetune_epochs": 6, "qat_epochs": 3, "tolerance_points": 1.0,
            "calibration_samples": 256, "min_speedup": 1.0}
"""Short schedules sized for two CPU cores; the gate is the default one (INT8 within 1 point of FP32)."""


def _artifact(kind, path):
    from kfp import dsl

    return getattr(dsl, kind)(uri=str(path), name=path.name, metadata={})


@pytest.fixture(scope="module")
def clip_run(local_s3, key_dir, tmp_path_factory):
    """One run of the pipeline's steps on the action clips, published to its own bucket; with each step's time."""
    work = tmp_path_factory.mktemp("clip-run")
    art = {name: _artifact(kind, work / name) for name, kind in [
        ("dataset", "Dataset"), ("plan", "Artifact"), ("dense", "Model"), ("pruned", "Model"), ("qat", "Model"),
        ("onnx", "Model"), ("evaluation", "Artifact"), ("report", "HTML"), ("manifest", "Artifact"),
        ("confusion", "ClassificationMetrics")]}
    metrics = {name: _artifact("Metrics", work / f"{name}-metrics") for name in
               ("train", "prune", "qat", "evaluate", "report")}
    store = local_s3.store("clip-pipeline")
    s3 = {"bucket": store.bucket, "prefix": "", "s3_endpoint": local_s3.endpoint_url}
    cfg = SETTINGS
    seconds: dict[str, float] = {}
    mp = pytest.MonkeyPatch()
    for name, value in local_s3.env().items():
        mp.setenv(name, value)
    mp.setenv("EDGELOOP_SIGNING_KEY_FILE", str(key_dir / "signing-key.pem"))

    def step(name, func, **kwargs):
        start = time.perf_counter()
        out = func.python_func(**kwargs)
        seconds[name] = time.perf_counter() - start
        return out

    try:
        step("load_data", steps.load_data, data_uri="synthetic-actions", seed=0, image_size=32, channels=1,
             dataset=art["dataset"])
        decision = step("plan", steps.plan, dataset=art["dataset"], model_name=MODEL, channel="stable", **s3,
                        **{k: v for k, v in cfg.items()}, force_retrain=False, plan_info=art["plan"])
        assert decision == "train"
        step("train", steps.train, dataset=art["dataset"], arch=cfg["arch"], epochs=cfg["epochs"], lr=cfg["lr"],
             seed=0, model=art["dense"], metrics=metrics["train"])
        step("prune", steps.prune, dataset=art["dataset"], model=art["dense"], constraint=cfg["prune_constraint"],
             keep_fraction=cfg["prune_keep_fraction"], finetune_epochs=cfg["prune_finetune_epochs"], seed=0,
             pruned_model=art["pruned"], metrics=metrics["prune"])
        step("qat", steps.qat, dataset=art["dataset"], model=art["pruned"], epochs=cfg["qat_epochs"], seed=0,
             calibration_samples=cfg["calibration_samples"], qat_model=art["qat"], metrics=metrics["qat"])
        step("export", steps.export, dataset=art["dataset"], dense_model=art["dense"], pruned_model=art["pruned"],
             qat_model=art["qat"], calibration_samples=cfg["calibration_samples"], seed=0, onnx_models=art["onnx"])
        step("evaluate", steps.evaluate, dataset=art["dataset"], onnx_models=art["onnx"],
             tolerance_points=cfg["tolerance_points"], min_speedup=cfg["min_speedup"],
             evaluation=art["evaluation"], metrics=metrics["evaluate"], min_score=BAR)
        step("report", steps.report, dataset=art["dataset"], evaluation=art["evaluation"], model_name=MODEL,
             report_html=art["report"], metrics=metrics["report"], confusion=art["confusion"])
        step("gate", steps.gate, evaluation=art["evaluation"])
        version = step("publish", steps.publish, dataset=art["dataset"], onnx_models=art["onnx"],
                       evaluation=art["evaluation"], report_html=art["report"], model_name=MODEL, channel="stable",
                       **s3, tolerance_points=cfg["tolerance_points"], plan_info=art["plan"],
                       manifest=art["manifest"])
    finally:
        mp.undo()
        if (work / "evaluation").exists():  # the figures, also when the gate failed
            from components.evaluate import Evaluation

            evaluation = Evaluation.load(work / "evaluation")
            print("\nclip variants (top-1): " + ", ".join(f"{v.name} {v.accuracy:.4f}" for v in evaluation.variants))
            print("confusion of int8-ort (rows: true " + ",".join(ACTIONS) + "):",
                  evaluation.variant("int8-ort").confusion)
    print("\nclip pipeline steps: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return store, version, art, metrics


def test_the_clip_model_reaches_the_bar_and_int8_stays_within_a_point(clip_run):
    from components.evaluate import Evaluation

    _, _, art, metrics = clip_run
    evaluation = Evaluation.load(art["evaluation"].path)
    assert evaluation.metric == "top1_accuracy" and evaluation.passed, evaluation.failures
    dense, pruned = evaluation.variant("fp32-dense"), evaluation.variant("fp32")
    print("\n" + ", ".join(f"{v.name} {v.accuracy:.4f}" for v in evaluation.variants))
    assert dense.accuracy >= BAR and pruned.accuracy >= BAR
    for name in ("int8-qdq", "int8-ort"):
        int8 = evaluation.variant(name)
        assert dense.accuracy - int8.accuracy <= 0.01, (name, int8.accuracy, dense.accuracy)
    assert pruned.flops <= 0.75 * dense.flops  # FastNAS pruned the Conv3d channels
    assert metrics["prune"].metadata["flops_reduction"] >= 0.25
    assert len(evaluation.variant("int8-qdq").confusion) == len(ACTIONS)


def test_the_published_version_describes_a_clip_input(clip_run, verify_key, tmp_path):
    store, version, _, _ = clip_run
    layout = ArtifactLayout()
    manifest = verify_published(store, layout, MODEL, version, verify_key, workdir=tmp_path)
    assert manifest.inputs[0].shape == [-1, 1, 8, 32, 32]
    assert [(o.name, o.shape) for o in manifest.outputs] == [("logits", [-1, len(ACTIONS)])]
    assert manifest.labels == list(ACTIONS)
    assert manifest.preprocessing.layout == "NCTHW"
    assert manifest.preprocessing.clip == Clip(frames=8, fps=8.0, stride=1)
    assert manifest.training["config"]["arch"] == "r2plus1d"
    with np.load(tmp_path / "validation.npz", allow_pickle=False) as npz:
        assert npz["inputs"].shape[1:] == (1, 8, 32, 32) and len(npz["labels"]) == manifest.validation.num_samples
    report = store.get_bytes(layout.file_key(MODEL, version, "report.html")).decode()
    assert "fp32-dense" in report and "int8-ort" in report


def test_an_edge_runtime_validates_the_clip_model_and_serves_batches_of_clips(clip_run, edge_settings, tmp_path):
    import tritonclient.grpc as triton

    from tests.edge_runtime.conftest import RunningEdge

    store, version, _, _ = clip_run
    # a queue delay of 20 ms: single-clip requests that arrive together share an engine run
    edge = RunningEdge(edge_settings(store.bucket, models=[{"name": MODEL, "max_queue_delay_us": 20_000}]))
    try:
        edge.wait_ready(timeout=120)
        validated = edge.events("validated")
        assert validated and all(e["metric"] == "top1_accuracy" and e["passed"] for e in validated), validated
        status = edge.app.repository.runtime(MODEL).status()
        assert status["serving_version"] == version

        path = store.download_file(ArtifactLayout().file_key(MODEL, version, "validation.npz"),
                                   tmp_path / "validation.npz")
        with np.load(path, allow_pickle=False) as npz:
            x, y = npz["inputs"][:96], npz["labels"][:96]
        client = triton.InferenceServerClient(edge.address)
        metadata = client.get_model_metadata(MODEL, as_json=True)
        assert [int(d) for d in metadata["inputs"][0]["shape"]] == [-1, 1, 8, 32, 32]
        predictions = []
        for start in range(0, len(x), 32):  # a batch of 32 clips per request: [32, 1, 8, 32, 32]
            given = triton.InferInput("input", list(x[start : start + 32].shape), "FP32")
            given.set_data_from_numpy(x[start : start + 32])
            predictions.append(client.infer(MODEL, [given]).as_numpy("logits").argmax(1))
        served = np.concatenate(predictions)
        assert (served == y).mean() >= BAR

        # 24 clips from 24 concurrent requests (one camera each): batched together, each answered with its own
        from concurrent.futures import ThreadPoolExecutor

        def one(index):
            single = triton.InferInput("input", [1, 1, 8, 32, 32], "FP32")
            single.set_data_from_numpy(x[index : index + 1])
            return triton.InferenceServerClient(edge.address).infer(MODEL, [single]).as_numpy("logits")[0]

        batcher = edge.app.repository.runtime(MODEL).serving.batcher
        before = (batcher.counts.requests, batcher.counts.batches)
        with ThreadPoolExecutor(24) as pool:
            singles = np.stack(list(pool.map(one, range(24))))
        requests, batches = batcher.counts.requests - before[0], batcher.counts.batches - before[1]
        assert requests == 24 and batches < requests, (requests, batches)
        assert (singles.argmax(1) == served[:24]).all()
        # a clip of the wrong length is refused with one readable line, not served as something else
        wrong = triton.InferInput("input", [1, 1, 6, 32, 32], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, 1, 6, 32, 32), np.float32))
        with pytest.raises(triton.InferenceServerException) as info:
            client.infer(MODEL, [wrong])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "\n" not in info.value.message()
    finally:
        edge.stop()


def test_a_users_clip_model_from_pytorch_imports_through_bring_your_own_onnx_and_serves(
        clip_run, tmp_path, edge_settings, local_s3, key_dir):
    """A user's own PyTorch clip model, with its frames first (``[batch, frames, channels, H, W]``), exported to
    ONNX by the user, goes through the import's steps (intake, FP16/INT8 variants, agreement gate, publish) and an
    edge runtime serves it."""
    import torch
    import tritonclient.grpc as triton
    from torch import nn

    from components.action_data import generate
    from components.models import load_checkpoint
    from tests.edge_runtime.conftest import RunningEdge

    store, _, art, _ = clip_run
    trained, _ = load_checkpoint(art["dense"].path)

    class FramesFirst(nn.Module):
        """What a user might have: frames stacked first, the network wants channels first."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, frames: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.net(frames.permute(0, 2, 1, 3, 4)), dim=1)

    user_model = FramesFirst(trained).eval()
    onnx_path = tmp_path / "user-clips.onnx"
    with torch.no_grad():
        torch.onnx.export(user_model, (torch.zeros(2, 8, 1, 32, 32),), str(onnx_path), input_names=["frames"],
                          output_names=["probabilities"],
                          dynamic_axes={"frames": {0: "batch"}, "probabilities": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    clips, labels = generate(160, seed=[7, 7])
    frames_first = np.ascontiguousarray(clips.transpose(0, 2, 1, 3, 4))
    np.savez(tmp_path / "calibration.npz", frames=frames_first)

    work = tmp_path / "import"
    work.mkdir()
    onnx_models, holdout = _artifact("Model", work / "onnx"), _artifact("Dataset", work / "holdout")
    gate, manifest_art = _artifact("Metrics", work / "gate"), _artifact("Artifact", work / "manifest")
    mp = pytest.MonkeyPatch()
    for name, value in local_s3.env().items():
        mp.setenv(name, value)
    mp.setenv("EDGELOOP_SIGNING_KEY_FILE", str(key_dir / "signing-key.pem"))
    try:
        steps.import_onnx.python_func(
            onnx_uri=str(onnx_path), calibration_uri=str(tmp_path / "calibration.npz"), holdout_fraction=0.25,
            calibration_layout="NCHW", calibration_scale=1 / 255, calibration_mean="0", calibration_std="1",
            calibration_samples=512, onnx_models=onnx_models, holdout=holdout)
        steps.evaluate_agreement.python_func(onnx_models=onnx_models, holdout=holdout, min_agreement=0.95,
                                             metrics=gate)
        version = steps.publish_onnx.python_func(
            onnx_models=onnx_models, holdout=holdout, gate=gate, model_name="user-clips", bucket=store.bucket,
            prefix="", channel="stable", s3_endpoint=local_s3.endpoint_url, tolerance=0.02,
            manifest=manifest_art)
    finally:
        mp.undo()
    assert all(gate.metadata[f"{v}_agreement"] >= 0.95 for v in ("fp16", "int8-qdq", "int8-ort"))

    edge = RunningEdge(edge_settings(store.bucket, models=[{"name": "user-clips"}]))
    try:
        edge.wait_ready(timeout=120)
        assert edge.app.repository.runtime("user-clips").status()["serving_version"] == version
        client = triton.InferenceServerClient(edge.address)
        given = triton.InferInput("frames", [40, 8, 1, 32, 32], "FP32")
        given.set_data_from_numpy(frames_first[-40:])
        served = client.infer("user-clips", [given]).as_numpy("probabilities")
        assert served.shape == (40, len(ACTIONS))
        assert (served.argmax(1) == labels[-40:]).mean() >= BAR  # the user's model still recognises the actions
    finally:
        edge.stop()


SEGMENT_FRAMES = 16
"""Frames of each segment of the generated video (two seconds at the clips' 8 frames/s)."""


def write_action_video(path, actions, seed, *, fps, upscale=2):
    """The generator's video of ``actions`` (one segment each) as lossless FFV1, each frame enlarged ``upscale``
    times (nearest neighbour: the client's area resize gives the generator's pixels back)."""
    import cv2

    from components.action_data import generate_video

    frames = generate_video(actions, seed, frames_per_segment=SEGMENT_FRAMES)
    size = frames.shape[1] * upscale
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), fps, (size, size))
    assert writer.isOpened()
    for frame in np.round(frames * 255).astype(np.uint8):
        big = cv2.resize(frame, (size, size), interpolation=cv2.INTER_NEAREST)
        writer.write(cv2.cvtColor(big, cv2.COLOR_GRAY2BGR))
    writer.release()
    return len(frames)


def test_the_streaming_client_names_the_action_of_each_segment_of_a_video(clip_run, edge_settings, tmp_path):
    """examples/clip_client.py on a generated video of known actions: windows of 8 frames, stride 2, through shared
    memory; the majority action of the windows inside each segment is the generator's in at least 90% of them."""
    import subprocess
    import sys
    from pathlib import Path

    import cv2
    import tritonclient.grpc as triton

    from tests.edge_runtime.conftest import RunningEdge

    store, _, _, _ = clip_run
    actions = [ACTIONS[i] for i in np.random.default_rng(3).permutation(np.arange(21) % len(ACTIONS))]
    count = write_action_video(tmp_path / "actions.avi", actions, seed=[5, 5], fps=8.0)
    edge = RunningEdge(edge_settings(store.bucket, models=[{"name": MODEL}]))
    try:
        edge.wait_ready(timeout=120)
        root = Path(__file__).resolve().parents[2]
        result = subprocess.run(
            [sys.executable, str(root / "examples" / "clip_client.py"), str(tmp_path / "actions.avi"), "--model",
             MODEL, "--url", edge.address, "--stride", "2", "--labels", ",".join(ACTIONS), "--actions",
             str(tmp_path / "actions.jsonl"), "--output", str(tmp_path / "labelled.avi")],
            capture_output=True, text=True, timeout=120, cwd=root, check=False)
        assert result.returncode == 0, result.stderr
        regions = triton.InferenceServerClient(edge.address).get_system_shared_memory_status(as_json=True)
        assert not regions.get("regions")  # the client released what it registered
    finally:
        edge.stop()
    windows = [json.loads(line) for line in (tmp_path / "actions.jsonl").read_text().splitlines()]
    assert len(windows) == (count - 8) // 2 + 1 and windows[0]["end_frame"] == 7 and windows[1]["start_frame"] == 2
    assert windows[1]["start_s"] == pytest.approx(0.25) and "clips/s" in result.stdout
    right = 0
    for segment, truth in enumerate(actions):
        first, last = segment * SEGMENT_FRAMES, (segment + 1) * SEGMENT_FRAMES - 1
        inside = [w["action"] for w in windows if w["start_frame"] >= first and w["end_frame"] <= last]
        assert inside, segment
        right += max(set(inside), key=inside.count) == truth
    print(f"\nstreaming client: {right}/{len(actions)} segments named right")
    assert right >= 0.9 * len(actions)
    rendered = cv2.VideoCapture(str(tmp_path / "labelled.avi"))
    assert int(rendered.get(cv2.CAP_PROP_FRAME_COUNT)) == count and rendered.get(cv2.CAP_PROP_FRAME_HEIGHT) >= 256
    rendered.release()
