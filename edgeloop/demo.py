"""``make demo``: the whole loop on one machine.

1. a real S3 server (SeaweedFS) on loopback;  2. the retraining pipeline through kfp.local, publishing a signed
version, and the bring-your-own-ONNX import of a second model (a logistic regression the demo trains);  3. the
telemetry hub;  4. one edge runtime serving both models side by side, each with its own life cycle (fetch → build →
validate → serve gRPC);  5. a client sends the held-out set to each through the Open Inference Protocol;  6. ``fleet
status`` from the hub, a row per device and model. Everything is stopped at the end.

``--detection`` adds a third model: the same pipeline trains a detector on the synthetic shapes set (``data_uri=
synthetic-detection``, YOLOv8-layout output, gated on COCO mAP@0.5), the device validates it by mAP@0.5 before it
serves, and the client decodes the served outputs (NMS on the client, as for real YOLO exports) and scores them.

Everything lives under one work folder (``.demo/`` by default): the SeaweedFS data, the signing keys (generated on
the first run, never in the repo), the device cache and each run's outputs. A second run publishes a new version
next to the first.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from rich.table import Table

from edgeloop.local_s3 import LocalS3
from edgeloop_core.contract import ArtifactLayout, Manifest, generate_signing_key, load_verify_key
from edgeloop_core.published import verify_published

T = TypeVar("T")
BUCKET = "edgeloop"
MODEL = "digits-cnn"
SECOND = "digits-linear"
DETECTOR = "shapes-detector"
CHANNEL = "stable"
DETECTION_RUN = {"data_uri": "synthetic-detection", "arch": "detector", "model_name": DETECTOR, "epochs": 10,
                 "prune_keep_fraction": 0.75, "prune_finetune_epochs": 3, "qat_epochs": 1, "min_score": 0.8}
"""The detector's pipeline parameters: short schedules (about a minute on two cores), and the stated bar: mAP@0.5
of at least 0.8 for every variant, INT8 within 1 point of FP32."""


class _LoopThread:
    """An event loop in a background thread (the hub and the device run on it)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="demo-loop")
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def run_demo(workdir: str | Path = ".demo", *, detection: bool = False) -> None:
    """Run every step; stop every server even when a step fails. ``detection``: train, publish, serve and score the
    detector too."""
    from edge_runtime.app import EdgeApp, wait_until_ready
    from edge_runtime.cli import send_dataset
    from edge_runtime.settings import EdgeSettings
    from edgeloop.samples import digits_linear
    from pipelines.cli import console, print_result
    from pipelines.import_onnx import import_onnx_pipeline
    from pipelines.local_run import run_local
    from telemetry_hub.cli import fleet_table
    from telemetry_hub.server import HubSettings, fleet_status, start_hub

    root = Path(workdir).resolve()
    keys = root / "keys"
    if not (keys / "signing-key.pem").exists():
        generate_signing_key(keys)
    started = time.monotonic()
    loop = _LoopThread()
    hub = edge = None
    try:
        with LocalS3(root / "s3") as s3:
            store = s3.store(BUCKET)
            console.print(f"[bold]1.[/bold] SeaweedFS S3 on {s3.endpoint_url}, bucket {BUCKET!r}")
            os.environ.update(s3.env())
            os.environ["EDGELOOP_SIGNING_KEY_FILE"] = str(keys / "signing-key.pem")
            console.print("[bold]2.[/bold] retraining pipeline through kfp.local: "
                          "load digits → train → prune → QAT → export → evaluate (gate) → report → publish")
            result = run_local(
                {"model_name": MODEL, "bucket": BUCKET, "channel": CHANNEL, "s3_endpoint": s3.endpoint_url,
                 "force_retrain": True},
                runs_dir=root / "runs",
            )
            print_result(result)
            layout = ArtifactLayout()
            assert result.version is not None
            manifest = verify_published(store, layout, MODEL, result.version,
                                        load_verify_key(keys / "verify-key.pem"), workdir=root / "verified")
            console.print(f"    verified s3://{BUCKET}/{layout.version_prefix(MODEL, result.version)}: "
                          f"signature and sha256 of {len(manifest.files())} files")
            _print_versions(console, store, layout)
            onnx_path, calibration = digits_linear(root / "byo-onnx")
            imported = run_local(
                {"onnx_uri": str(onnx_path), "calibration_uri": str(calibration), "model_name": SECOND,
                 "calibration_scale": 1.0, "bucket": BUCKET, "channel": CHANNEL, "s3_endpoint": s3.endpoint_url},
                runs_dir=root / "runs", pipeline=import_onnx_pipeline)
            assert imported.manifest is not None
            console.print(f"    imported {SECOND}/{imported.manifest.version} (bring your own ONNX, through "
                          f"kfp.local): {', '.join(v.name for v in imported.manifest.variants)}")
            served = [MODEL, SECOND]
            if detection:
                console.print("    detector through the same pipeline: synthetic shapes → train → prune → QAT → "
                              "export → evaluate (gate on mAP@0.5) → report → publish")
                detector = run_local({**DETECTION_RUN, "bucket": BUCKET, "channel": CHANNEL,
                                      "s3_endpoint": s3.endpoint_url, "force_retrain": True}, runs_dir=root / "runs")
                print_result(detector)
                assert detector.version is not None
                verify_published(store, layout, DETECTOR, detector.version, load_verify_key(keys / "verify-key.pem"),
                                 workdir=root / "verified-detector")
                served.append(DETECTOR)

            token, reader = secrets.token_hex(16), secrets.token_hex(16)
            hub_settings = HubSettings(database_url=f"sqlite:///{root / 'hub.sqlite'}", port=0,
                                       tokens=f"demo-jetson:{token}", read_tokens=reader)
            hub, hub_port, _ = loop.run(start_hub(hub_settings))
            console.print(f"[bold]3.[/bold] telemetry hub on 127.0.0.1:{hub_port} (SQLite {root / 'hub.sqlite'})")

            settings = EdgeSettings(
                models=[{"name": name, "version": CHANNEL} for name in served],
                s3_endpoint_url=s3.endpoint_url, s3_bucket=BUCKET,
                verify_key_file=keys / "verify-key.pem", cache_dir=root / "device-cache", grpc_port=0,
                metrics_port=0, hub_address=f"127.0.0.1:{hub_port}", hub_token=token, device_id="demo-jetson",
                telemetry_interval_s=1.0, batching_budget_ms=5.0,
            )
            edge = EdgeApp(settings, store=store)
            loop.run(edge.start())
            loop.run(wait_until_ready(edge, timeout_s=120))
            console.print(f"[bold]4.[/bold] edge runtime on 127.0.0.1:{edge.grpc_port}, {len(served)} models side by "
                          "side:")
            for name in served:
                status = edge.repository.runtime(name).status()
                batching = status["batching"]
                console.print(f"    {name}/{status['serving_version']} as {status['variant']} on "
                              f"{status['target_key']}; on-device validation {status['validation']}; batching "
                              f"tuned to {batching['max_batch_size']} samples / {batching['max_queue_delay_us']} µs "
                              "for a 5 ms budget")

            with np.load(root / "verified" / "validation.npz") as npz:
                x, y = npz["inputs"], npz["labels"]
            address = f"127.0.0.1:{edge.grpc_port}"
            table = Table(title=f"client → {address} (Open Inference Protocol, {len(y)} held-out images)")
            for column in ("model", "batch", "accuracy %", "p50 ms", "p99 ms", "images/s"):
                table.add_column(column, justify="right")
            for name in (MODEL, SECOND):
                for batch in (1, 16):
                    r = send_dataset(address, name, x, y, batch_size=batch)
                    table.add_row(name, str(batch), f"{r['accuracy'] * 100:.2f}", f"{r['p50_ms']:.3f}",
                                  f"{r['p99_ms']:.3f}", f"{r['samples_per_s']:.0f}")
            console.print("[bold]5.[/bold] client")
            console.print(table)
            if detection:
                console.print(_detector_table(address, edge.repository.runtime(DETECTOR).serving.manifest,
                                              root / "verified-detector" / "validation.npz"))

            edge.report("stats", edge.stats())
            deadline = time.monotonic() + 30
            while edge.outbox.count() and time.monotonic() < deadline:
                time.sleep(0.2)
            console.print("[bold]6.[/bold] edgeloop fleet status")
            console.print(fleet_table(loop.run(fleet_status(f"127.0.0.1:{hub_port}", reader))))
            loop.run(edge.stop())
            edge = None
            loop.run(hub.stop(1))
            hub = None
    finally:
        if edge is not None:
            loop.run(edge.stop())
        if hub is not None:
            loop.run(hub.stop(0))
        loop.close()
    console.print(f"done in {time.monotonic() - started:.0f}s; everything stopped. "
                  "Run `make demo` again for a new version.")


def _detector_table(address: str, manifest: Manifest, validation: Path) -> Table:
    """The detector's held-out images through the endpoint: raw YOLOv8-layout outputs, decoded and suppressed here
    as the manifest's task says, scored by COCO mAP against the boxes, with the request latency."""
    import json

    import grpc

    from edgeloop_core.detection import decode, detection_map
    from edgeloop_core.protos import inference_pb2 as pb
    from edgeloop_core.protos import inference_pb2_grpc

    with np.load(validation, allow_pickle=False) as npz:
        x, labels = npz["inputs"], json.loads(str(npz["coco"]))
    table = Table(title=f"client → {address}: {manifest.name} ({len(x)} held-out images, decode + NMS on the client)")
    for column in ("batch", "mAP@0.5 %", "mAP@0.5:0.95 %", "p50 ms", "p99 ms", "images/s"):
        table.add_column(column, justify="right")
    output = manifest.outputs[0].name
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        for batch in (1, 16):
            outputs, times = [], []
            started = time.perf_counter()
            for start in range(0, len(x), batch):
                part = np.ascontiguousarray(x[start : start + batch])
                request = pb.ModelInferRequest(model_name=manifest.name)
                request.inputs.add(name=manifest.inputs[0].name, datatype="FP32", shape=list(part.shape))
                request.raw_input_contents.append(part.tobytes())
                begin = time.perf_counter()
                reply = stub.ModelInfer(request, timeout=30)
                times.append((time.perf_counter() - begin) * 1e3)
                outputs.append(np.frombuffer(reply.raw_output_contents[0], dtype=np.float32)
                               .reshape(tuple(reply.outputs[0].shape)))
            elapsed = time.perf_counter() - started
            map50, map50_95 = detection_map(decode({output: np.concatenate(outputs)}, manifest.task), labels)
            table.add_row(str(batch), f"{map50 * 100:.2f}", f"{map50_95 * 100:.2f}", f"{np.percentile(times, 50):.3f}",
                          f"{np.percentile(times, 99):.3f}", f"{len(x) / elapsed:.0f}")
    return table


def _print_versions(console, store, layout: ArtifactLayout) -> None:  # noqa: ANN001
    table = Table(title=f"versions of {MODEL} in s3://{BUCKET}")
    for column in ("version", "complete (manifest)", "files", f"channel {CHANNEL!r}"):
        table.add_column(column)
    pointer = store.get_bytes(layout.channel_key(MODEL, CHANNEL)).decode()
    for version in sorted(store.list_prefixes(layout.model_prefix(MODEL))):
        if version == "channels":
            continue
        keys_under = store.list_keys(layout.version_prefix(MODEL, version))
        complete = layout.manifest_key(MODEL, version) in keys_under
        table.add_row(version, "yes" if complete else "no", str(len(keys_under)),
                      "◀" if f'"{version}"' in pointer else "")
    console.print(table)
