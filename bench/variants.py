"""Variant benchmark: does CPU INT8 pay off, per model, and what does a device then serve?

    .venv/bin/python bench/variants.py [--models cnn,ast] [--quick] [--readme PATH] [--plot PATH]

Runs the retraining pipeline through kfp.local against a SeaweedFS on loopback for the digits CNN (default
parameters) and for the audio spectrogram transformer on a Speech Commands-style set spoken by espeak-ng (the
parameters the README gives for keyword spotting), prints the pipeline's own evaluation table with each variant's
speed-up against FP32 pruned and FP32 dense (ONNX Runtime, CPU, batch 1 and 16, measured in the same run), then
starts the edge runtime on each published version (in this process, ``bench/harness.py``) and shows which variant
it chose after measuring on this machine. Writes its section of ``bench/README.md`` (``bench/report.py``) and a
plot; ``--quick`` runs the digits CNN with a few epochs (and no accuracy gate) into a copy of the README. Never part
of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import edge_in_process, local_store  # noqa: E402 - after the path the benchmarks import from
from bench.report import BenchRun  # noqa: E402

if TYPE_CHECKING:
    from edge_runtime.build.choice import VariantChoice
    from edge_runtime.settings import EdgeSettings
    from edgeloop_core.store import ObjectStore

PARAMETERS = {
    "cnn": {"model_name": "digits-cnn"},
    "ast": {"model_name": "kws-ast", "arch": "ast", "epochs": 30, "lr": 0.002, "prune_keep_fraction": 0.8,
            "prune_finetune_epochs": 5, "qat_epochs": 2,
            # the spoken test set has 30 clips: one clip is 3.3 accuracy points, so the default 1-point gate would
            # measure luck (the keyword-spotting test uses no gate at all)
            "tolerance_points": 7.0},
}
QUICK_PARAMETERS = {"epochs": 2, "prune_finetune_epochs": 1, "qat_epochs": 1, "tolerance_points": 100.0}
"""What ``--quick`` changes: a few epochs, so a barely trained model must pass no accuracy gate."""


async def device_choice(settings: EdgeSettings, store: ObjectStore) -> VariantChoice:
    """Start the edge runtime on the published version, wait until it serves, return its variant choice."""
    async with edge_in_process(settings, store) as app:
        return app.runtime.choice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated: cnn, ast (default cnn,ast; --quick: cnn)")
    BenchRun.add_options(parser, "variants")
    args = parser.parse_args()
    run = BenchRun.from_args("variants", args, parser)

    from edge_runtime.settings import EdgeSettings
    from edgeloop.speech import make_speech_commands
    from pipelines.local_run import run_local

    models = [m.strip() for m in (args.models or ("cnn" if args.quick else "cnn,ast")).split(",") if m.strip()]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-variants-") as tmp:
        work = Path(tmp)
        with local_store(work) as (s3, store):
            os.environ["EDGELOOP_SIGNING_KEY_FILE"] = str(work / "keys" / "signing-key.pem")
            os.environ.update(s3.env())
            for model in models:
                params = {**PARAMETERS[model], **(QUICK_PARAMETERS if args.quick else {}), "bucket": "bench",
                          "s3_endpoint": s3.endpoint_url}
                if model == "ast":
                    params["data_uri"] = str(make_speech_commands(work / "speech_commands"))
                started = time.monotonic()
                result = run_local(params, runs_dir=work / "runs")
                print(f"{model}: pipeline {time.monotonic() - started:.0f} s, version {result.version}")
                evaluation = result.evaluation()
                settings = EdgeSettings(s3_endpoint_url=s3.endpoint_url, s3_bucket="bench",
                                        cache_dir=work / f"device-{model}", model_name=params["model_name"],
                                        verify_key_file=work / "keys" / "verify-key.pem", grpc_port=0,
                                        metrics_port=0, device_id=f"bench-{model}")
                choice = asyncio.run(device_choice(settings, store))
                for v in evaluation.variants:
                    rows.append({"model": model, "variant": v.name, "accuracy": v.accuracy * 100,
                                 "b1": v.latency_ms_b1, "b16": v.latency_ms_b16,
                                 "b1_fp32": v.speedup.get("b1_vs_fp32"), "b16_fp32": v.speedup.get("b16_vs_fp32"),
                                 "b16_dense": v.speedup.get("b16_vs_fp32-dense"), "preferred": v.preferred,
                                 "served": v.name == choice.chosen, "note": v.note})
                print(f"{model}: the device serves {choice.chosen} ({choice.mode}: {choice.reason})")

    table = tables(rows)
    print(table)
    write_plot(rows, models, run.plot)
    run.finish(table)


def tables(rows: list[dict]) -> str:
    """The markdown table and a note per variant that has one."""
    header = ("| model | variant | accuracy % | ORT ms b1 | ORT ms b16 | ÷ fp32 b1 | ÷ fp32 b16 | ÷ dense b16 "
              "| preferred | device serves |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['accuracy']:.2f} | {r['b1']:.3f} | {r['b16']:.3f} | "
                     f"{r['b1_fp32']:.2f}x | {r['b16_fp32']:.2f}x | {r['b16_dense']:.2f}x | "
                     f"{'yes' if r['preferred'] else 'no'} | {'**yes**' if r['served'] else ''} |")
    notes = [f"- {r['model']} {r['variant']}: {r['note']}" for r in rows if r["note"]]
    return "\n".join(lines + ([""] + notes if notes else []))


def write_plot(rows: list[dict], models: list[str], path: Path) -> None:
    """Speed-up against fp32 pruned at batch 1 and 16, a panel per model (int8-qdq left out: it is the TensorRT
    variant, slow on a CPU by design)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model and r["variant"] != "int8-qdq"]
        xs = range(len(mine))
        ax.bar([x - 0.2 for x in xs], [r["b1_fp32"] for r in mine], width=0.4, label="batch 1")
        ax.bar([x + 0.2 for x in xs], [r["b16_fp32"] for r in mine], width=0.4, label="batch 16")
        ax.axhline(1.0, color="grey", linewidth=1)
        ax.axhline(1.3, color="red", linewidth=1, linestyle="--", label="1.3x")
        ax.set_xticks(list(xs), [r["variant"] + (" *" if r["served"] else "") for r in mine], fontsize=8)
        ax.set_ylabel("speed-up vs fp32 pruned (ORT CPU)")
        ax.set_title(f"{model} (* = what the device serves)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
