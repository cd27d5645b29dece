"""Serving benchmark: dynamic batching against one-request-per-run, through the real gRPC server on loopback.

    .venv/bin/python bench/serving.py [--clients 8] [--seconds 5] [--plot bench/serving.png]

Starts SeaweedFS, publishes a small CNN trained on digits (int8-ort variant), starts the edge runtime twice — once
with dynamic batching (max batch 16, no queue delay: batches form while the engine is busy) and once without (max
batch 1) — and drives each with N concurrent tritonclient clients for a fixed time. Prints a table (throughput,
p50/p99 latency, mean batch) with the batching/no-batching ratios, and writes a plot. Never part of the test run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def drive(address: str, x: np.ndarray, clients: int, seconds: float) -> tuple[list[float], float]:
    """``clients`` threads send batch-1 requests for ``seconds``; returns latencies (ms) and elapsed seconds."""
    import tritonclient.grpc as triton

    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client_loop(offset: int) -> None:
        client = triton.InferenceServerClient(address)
        mine, i = [], offset
        while time.monotonic() < stop:
            tensor = triton.InferInput("input", [1, *x.shape[1:]], "FP32")
            tensor.set_data_from_numpy(x[i % len(x)][None])
            begin = time.perf_counter()
            client.infer("digits-cnn", [tensor])
            mine.append((time.perf_counter() - begin) * 1e3)
            i += clients
        with lock:
            latencies.extend(mine)

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "serving.png")
    args = parser.parse_args()

    from components.data import load_digits_dataset
    from components.export import export_onnx, quantize_ort_int8
    from components.train import train_model
    from edgeloop.local_s3 import LocalS3
    from edgeloop_core.contract import generate_signing_key, load_signing_key
    from tests.edge_runtime.conftest import RunningEdge, TrainedModels, publish_model

    work = Path(tempfile.mkdtemp(prefix="edgeloop-bench-"))
    data = load_digits_dataset()
    model, _, _ = train_model(data, epochs=4, progress=False)
    fp32 = export_onnx(model, work / "fp32.onnx", data.input_shape)
    models = TrainedModels({"fp32": fp32, "int8-ort": quantize_ort_int8(fp32, work / "int8-ort.onnx",
                                                                        data.x_train[:256])}, {}, data.x_test,
                           data.y_test)
    generate_signing_key(work / "keys")
    rows = []
    with LocalS3(work / "s3") as s3:
        store = s3.store("bench")
        import os

        os.environ.update(s3.env())
        publish_model(store, load_signing_key(work / "keys" / "signing-key.pem"), models, "v1")
        from edge_runtime.settings import EdgeSettings

        for label, max_batch in (("no batching", 1), ("dynamic batching", 16)):
            settings = EdgeSettings(s3_endpoint_url=s3.endpoint_url, s3_bucket="bench", cache_dir=work / label,
                                    verify_key_file=work / "keys" / "verify-key.pem", grpc_port=0, metrics_port=0,
                                    max_batch_size=max_batch, max_queue_delay_us=0, device_id="bench")
            edge = RunningEdge(settings)
            try:
                edge.wait_ready()
                drive(edge.address, data.x_test, args.clients, 1.0)  # warm-up
                batches = edge.app.metrics.batch_size
                before_sum, before_count = _hist(batches)
                latencies, elapsed = drive(edge.address, data.x_test, args.clients, args.seconds)
                after_sum, after_count = _hist(batches)
                rows.append({
                    "mode": label, "requests/s": len(latencies) / elapsed,
                    "p50 ms": statistics.median(latencies), "p99 ms": float(np.percentile(latencies, 99)),
                    "mean batch": (after_sum - before_sum) / max(1, after_count - before_count),
                })
            finally:
                edge.stop()
    base = rows[0]
    print(f"\nserving digits-cnn int8-ort on ONNX Runtime (CPU), {args.clients} concurrent tritonclient clients, "
          f"{args.seconds:.0f} s each\n")
    print("| mode | requests/s | p50 ms | p99 ms | mean batch | throughput vs no batching |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['mode']} | {row['requests/s']:.0f} | {row['p50 ms']:.2f} | {row['p99 ms']:.2f} | "
              f"{row['mean batch']:.1f} | {row['requests/s'] / base['requests/s']:.2f}x |")
    _plot(rows, args.plot)
    print(f"\nplot: {args.plot}")


def _hist(histogram) -> tuple[float, float]:  # noqa: ANN001 - prometheus Histogram
    samples = {s.name: s.value for metric in histogram.collect() for s in metric.samples}
    return samples.get("edgeloop_batch_size_sum", 0.0), samples.get("edgeloop_batch_size_count", 0.0)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    names = [r["mode"] for r in rows]
    left.bar(names, [r["requests/s"] for r in rows], color=["#999999", "#2a7ab9"])
    left.set_ylabel("requests/s")
    left.set_title("throughput")
    width = 0.35
    xs = np.arange(len(rows))
    right.bar(xs - width / 2, [r["p50 ms"] for r in rows], width, label="p50")
    right.bar(xs + width / 2, [r["p99 ms"] for r in rows], width, label="p99")
    right.set_xticks(xs, names)
    right.set_ylabel("ms")
    right.set_title("latency per request")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
