"""Real model versions for the edge tests: a small CNN trained on digits, exported and published to SeaweedFS."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from edgeloop_core.contract import (
    ArtifactLayout,
    Manifest,
    TensorSpec,
    Validation,
    Variant,
    sha256_file,
)


@dataclass
class TrainedModels:
    good: dict[str, Path]        # variant name -> ONNX file
    untrained: dict[str, Path]
    x_val: np.ndarray
    y_val: np.ndarray


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> TrainedModels:
    from components.data import load_digits_dataset
    from components.export import export_onnx, quantize_ort_int8
    from components.models import ModelSpec, build_model
    from components.train import train_model

    root = tmp_path_factory.mktemp("edge-models")
    data = load_digits_dataset()
    model, spec, _ = train_model(data, epochs=4, progress=False)
    good = {"fp32": export_onnx(model, root / "fp32.onnx", data.input_shape)}
    good["int8-ort"] = quantize_ort_int8(good["fp32"], root / "int8-ort.onnx", data.x_train[:256])
    import torch

    torch.manual_seed(123)
    blank = build_model(ModelSpec("cnn", 1, 8, 10)).eval()
    untrained = {"fp32": export_onnx(blank, root / "bad-fp32.onnx", data.input_shape)}
    untrained["int8-ort"] = quantize_ort_int8(untrained["fp32"], root / "bad-int8-ort.onnx", data.x_train[:256])
    return TrainedModels(good, untrained, data.x_test, data.y_test)


def accuracy_of(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": x})[0].argmax(1) == y).mean())


def publish_model(store, signing_key, trained: TrainedModels, version: str, *, files: dict[str, Path] | None = None,
                  name: str = "digits-cnn", channel: str | None = "stable", prefix: str = "",
                  reference_files: dict[str, Path] | None = None, field_baseline=None) -> Manifest:
    """Publish ``files`` (default: the good model) as ``version``; references come from ``reference_files``
    (default: the good model), so shipping the untrained files makes a version that must fail on-device
    validation."""
    files = files or trained.good
    reference_files = reference_files or trained.good
    layout = ArtifactLayout(prefix)
    staging = Path(files["fp32"]).parent / f"stage-{version}"
    staging.mkdir(exist_ok=True)
    np.savez(staging / "validation.npz", inputs=trained.x_val.astype(np.float32), labels=trained.y_val)
    references = {n: accuracy_of(p, trained.x_val, trained.y_val) for n, p in reference_files.items()}
    for variant, path in files.items():  # variants the good model has no file for are their own reference
        references.setdefault(variant, accuracy_of(path, trained.x_val, trained.y_val))
    variants = []
    for variant, path in files.items():
        target = staging / f"{variant}.onnx"
        target.write_bytes(Path(path).read_bytes())
        digest, size = sha256_file(target)
        variants.append(Variant(file=target.name, sha256=digest, size_bytes=size, name=variant,
                                precision="int8" if "int8" in variant else "fp32",
                                quantization="ort-qdq" if variant == "int8-ort" else "none",
                                backends=["onnxruntime"] if variant == "int8-ort" else ["tensorrt", "onnxruntime"],
                                accuracy=references[variant]))
    digest, size = sha256_file(staging / "validation.npz")
    manifest = Manifest(
        name=name, version=version, created_at=datetime.now(timezone.utc),
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 1, 8, 8])],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
        labels=[str(i) for i in range(10)], variants=variants,
        validation=Validation(file="validation.npz", sha256=digest, size_bytes=size, num_samples=len(trained.y_val),
                              reference={n: r for n, r in references.items() if n in files}, tolerance=0.02),
        field_baseline=field_baseline,
    )
    from components.publish import publish_version

    signed = publish_version(store, manifest, staging, signing_key, layout=layout, channel=channel)
    return signed


def move_channel(store, signing_key, version: str, name: str = "digits-cnn", channel: str = "stable") -> None:
    """Point the channel at ``version`` the way the pipeline does: a signed pointer with a higher sequence."""
    from components.publish import move_channel as move

    move(store, ArtifactLayout(), name, channel, version, signing_key)


def free_port() -> int:
    """A loopback port nothing listens on right now (for servers that must be told one, not pick their own)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> None:
    """Poll ``predicate`` (sync) until true or fail after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


async def wait_ready(app, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not app.repository.ready():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"runtime not ready within {timeout}s: {app.repository.status()}")
        await asyncio.sleep(0.05)


class RunningEdge:
    """An :class:`EdgeApp` on its own event loop in a background thread, for synchronous clients."""

    def __init__(self, settings, store=None, facts=None) -> None:
        import threading

        from edge_runtime.app import EdgeApp
        from edge_runtime.build.device import detect

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = EdgeApp(settings, facts=facts or detect(), store=store)
        self.call(self.app.start())

    def call(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.grpc_port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.call(wait_ready(self.app, timeout), timeout + 5)

    def events(self, kind: str | None = None) -> list[dict]:
        rows = [(e.kind, json.loads(e.payload_json)) for e in self.app.outbox.pending(10_000)]
        return [p for k, p in rows if kind is None or k == kind]

    def stop(self) -> None:
        if not self.thread.is_alive():
            return  # stopped already (a test that restarts the runtime stops it itself)
        try:
            self.call(self.app.stop(grace_s=1.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def assert_captured(store, sent: dict, model: str, device: str = "test-jetson") -> None:
    """Field capture took every request of ``sent`` (request id -> (input batch, outputs received: one array, or a
    dict by output name)): each arrived in S3 as a capture of ``model`` whose first input is bit-identical to what was
    sent and whose outputs equal what the client received."""
    import io

    import pandas as pd

    from edgeloop_core.contract.captures import CaptureLayout, tensor_array

    def rows():
        keys = [k for k in store.list_keys(CaptureLayout().device_prefix(device)) if k.endswith(".parquet")]
        frames = [pd.read_parquet(io.BytesIO(store.get_bytes(k))) for k in keys]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    wait_until(lambda: len(rows()) == len(sent), timeout=30)
    for row in rows().itertuples():
        batch, received = sent[row.request_id]
        assert row.model == model and tensor_array(row.inputs[0]).tobytes() == batch.tobytes()
        outputs = {t["name"]: tensor_array(t) for t in row.outputs}
        expected = received if isinstance(received, dict) else {next(iter(outputs)): received}
        for name, value in expected.items():
            np.testing.assert_array_equal(outputs[name], value)

