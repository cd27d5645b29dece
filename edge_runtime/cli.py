"""``edgeloop edge ...``: serve on this device, or send a quick check to a running server."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from edgeloop_core.console import console

app = typer.Typer(help="The edge runtime: fetch, build, validate and serve a model over gRPC.", no_args_is_help=True)


@app.command("serve")
def serve_command(
    config: Annotated[Path | None, typer.Option(help="settings file (JSON/YAML); EDGE_* variables override it")] = None,
    model: Annotated[str | None, typer.Option(help="model name")] = None,
    version: Annotated[str | None, typer.Option(help="version or channel")] = None,
    s3_endpoint: Annotated[str | None, typer.Option(help="S3 endpoint URL")] = None,
    bucket: Annotated[str | None, typer.Option(help="S3 bucket")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="artifact and engine cache")] = None,
    bind: Annotated[str | None, typer.Option(help="bind address for gRPC and metrics")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port (0: off)")] = None,
    backend: Annotated[str | None, typer.Option(help="auto, tensorrt or onnxruntime")] = None,
    hub: Annotated[str | None, typer.Option(help="telemetry hub host:port")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Serve the Open Inference Protocol on this device until SIGTERM."""
    from edge_runtime.app import serve
    from edge_runtime.settings import EdgeSettings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):  # their DEBUG lines carry the S3 access key id
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
    settings = EdgeSettings.load(config, model_name=model, model_version=version, s3_endpoint_url=s3_endpoint,
                                 s3_bucket=bucket, cache_dir=cache_dir, bind_address=bind, grpc_port=grpc_port,
                                 metrics_port=metrics_port, backend=backend, hub_address=hub)
    asyncio.run(serve(settings))


def send_dataset(address: str, model: str, inputs: np.ndarray, labels: np.ndarray | None, batch_size: int = 1,
                 timeout_s: float = 30.0, return_predictions: bool = False) -> dict[str, Any]:
    """Send ``inputs`` through ``ModelInfer`` (tritonclient-compatible requests); accuracy and latency."""
    import grpc

    from edgeloop_core.errors import NotReady
    from edgeloop_core.protos import inference_pb2 as pb
    from edgeloop_core.protos import inference_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise NotReady(f"{address}: {exc.code().name}: {exc.details()}") from exc
        name = meta.inputs[0].name
        predictions, times = [], []
        started = time.perf_counter()
        for start in range(0, len(inputs), batch_size):
            x = np.ascontiguousarray(inputs[start : start + batch_size], dtype=np.float32)
            request = pb.ModelInferRequest(model_name=model)
            request.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
            request.raw_input_contents.append(x.tobytes())
            begin = time.perf_counter()
            reply = stub.ModelInfer(request, timeout=timeout_s)
            times.append((time.perf_counter() - begin) * 1e3)
            shape = tuple(reply.outputs[0].shape)
            logits = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(shape)
            predictions.append(logits.argmax(axis=1))
        elapsed = time.perf_counter() - started
    result = {"samples": float(len(inputs)), "p50_ms": float(np.percentile(times, 50)),
              "p99_ms": float(np.percentile(times, 99)), "samples_per_s": len(inputs) / elapsed,
              "version": reply.model_version}
    if labels is not None:
        result["accuracy"] = float((np.concatenate(predictions) == labels).mean())
    if return_predictions:
        result["predictions"] = np.concatenate(predictions)
    return result


def wav_to_input(wav: Path, manifest_path: Path) -> tuple[np.ndarray, list[str]]:
    """One WAV → the model's input tensor, with the feature settings and normalisation the manifest records."""
    from edgeloop_core.contract import Manifest
    from edgeloop_core.errors import ConfigError
    from edgeloop_core.features import MelConfig, log_mel, read_wav

    manifest = Manifest.from_json(manifest_path.read_bytes())
    pre = manifest.preprocessing
    if pre.kind != "spectrogram":
        raise ConfigError(f"{manifest.name}/{manifest.version} takes {pre.kind} inputs, not audio")
    config = MelConfig.from_params(pre.params)
    features = (log_mel(read_wav(wav, config), config) * pre.scale - pre.mean[0]) / pre.std[0]
    return features[None].astype(np.float32), manifest.labels


@app.command("selfcheck")
def selfcheck_command(
    out: Annotated[Path, typer.Option(help="where the JSON report goes")] = Path("edgeloop-selfcheck.json"),
    config: Annotated[Path | None, typer.Option(help="settings file (JSON/YAML); EDGE_* variables override it")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="folder for the demo model and its engines (default: a "
                                                       "temporary one)")] = None,
    tests: Annotated[Path | None, typer.Option(help="the tests/ folder (default: beside the package)")] = None,
    no_tests: Annotated[bool, typer.Option("--no-tests", help="do not run the GPU conformance tests")] = False,
    budget_s: Annotated[float, typer.Option(help="timing per variant and batch size, seconds")] = 1.0,
) -> None:
    """Check this device once: facts and target key, CUDA, TensorRT, the demo model in fp32/fp16/int8-qdq built
    and timed (which precision wins), the GPU conformance tests, Triton's libraries; one JSON report. Exit 1 when a
    check failed; what could not be checked here is reported as skipped, with the reason."""
    import tempfile

    from edge_runtime.report.selfcheck import run_selfcheck
    from edge_runtime.settings import EdgeSettings
    from edgeloop_core.files import write_atomic

    settings = EdgeSettings.load(config)
    default_tests = Path(__file__).resolve().parents[1] / "tests"
    with tempfile.TemporaryDirectory(prefix="edgeloop-selfcheck-") as scratch:
        report = run_selfcheck(settings, work_dir or Path(scratch), tests=tests or default_tests,
                               run_tests=not no_tests, budget_s=budget_s)
    console.print(f"device: {report.device.get('gpu_name') or report.device.get('arch')}, backend {report.backend}, "
                  f"target key {report.target_key}")
    table = Table("check", "status", "seconds", "finding or reason")
    for check in report.checks:
        table.add_row(check.name, check.status, f"{check.seconds:.2f}", check.reason)
    console.print(table)
    write_atomic(out, report.model_dump_json(indent=2).encode())
    console.print(f"report: {out}")
    if not report.ok:
        raise typer.Exit(1)


@app.command("triton-backend")
def triton_backend_command(
    python: Annotated[Path | None, typer.Argument(help="the interpreter it embeds (default: this one)")] = None,
) -> None:
    """Build edgeloop's Triton backend (engine triton, ONNX Runtime engines) into the package, as images do at build
    time; the runtime builds it itself where a C compiler is."""
    import sys

    from edge_runtime.serve.triton.native import prebuild

    console.print(f"built {prebuild(python or Path(sys.executable))}")


@app.command("infer")
def infer_command(
    inputs: Annotated[Path, typer.Argument(help=".npz with `inputs` (and optional `labels`), or a 16 kHz .wav")],
    address: Annotated[str, typer.Option(help="host:port of the runtime")] = "127.0.0.1:8001",
    model: Annotated[str, typer.Option(help="model name")] = "digits-cnn",
    batch_size: Annotated[int, typer.Option(help="samples per request")] = 1,
    manifest: Annotated[Path | None, typer.Option(help="the version's manifest.json (for a .wav: features)")] = None,
) -> None:
    """Send a data set (or one WAV clip) to a running runtime; print accuracy and latency (or the keyword)."""
    from edgeloop_core.errors import ConfigError

    if inputs.suffix.lower() == ".wav":
        if manifest is None:
            raise ConfigError("a .wav needs --manifest (the version's manifest.json) for its feature settings")
        x, labels = wav_to_input(inputs, manifest)
        result = send_dataset(address, model, x, None, 1, return_predictions=True)
        console.print(f"{inputs.name}: {labels[int(result['predictions'][0])]} "
                      f"({model} version {result['version']}, {result['p50_ms']:.2f} ms)")
        return
    try:
        with np.load(inputs, allow_pickle=False) as npz:
            x, y = npz["inputs"], (npz["labels"] if "labels" in npz else None)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"{inputs}: not an .npz with an `inputs` array") from exc
    result = send_dataset(address, model, x, y, batch_size)
    console.print(f"{model} at {address}, version {result['version']}")
    table = Table("measure", "value")
    for key in ("samples", "accuracy", "p50_ms", "p99_ms", "samples_per_s"):
        if key in result:
            table.add_row(key, f"{result[key]:.4f}" if key == "accuracy" else f"{result[key]:.2f}")
    console.print(table)


@app.command("label")
def label_command(
    request_id: Annotated[str, typer.Argument(help="the ModelInfer request id the app sent")],
    label: Annotated[str, typer.Argument(help="a class index (3), or JSON: '\"cat\"', '{\"false_trigger\": true}'")],
    address: Annotated[str, typer.Option(help="host:port of the runtime")] = "127.0.0.1:8001",
    model: Annotated[str, typer.Option(help="model name")] = "digits-cnn",
    source: Annotated[str, typer.Option(help="who says so (operator, app, ...)")] = "cli",
    token: Annotated[str | None, typer.Option(envvar="EDGE_CONTROL_TOKEN", show_default=False,
                                              help="the device's control token (EDGE_CONTROL_TOKEN)")] = None,
    ca_file: Annotated[Path | None, typer.Option(help="CA (PEM) of a TLS endpoint")] = None,
) -> None:
    """Send the right answer for an earlier request (field capture, docs/capture.md): joined to its capture while it
    is on the device, else sent home as its own record."""
    from edge_runtime.report.capture.client import send_label

    answer = send_label(address, model, request_id, label, source=source, token=token, ca_file=ca_file)
    console.print(f"{model} {request_id}: " + (f"joined to {answer.captures} spooled capture(s)"
                                               if answer.outcome == "joined"
                                               else "not on the device any more: sent home as a label record"))
