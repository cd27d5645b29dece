"""The pipeline's report: one self-contained HTML page (plots inlined as PNG) that is published with the version."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from components.evaluate import Evaluation


def _figure_png(fig) -> str:  # noqa: ANN001 - matplotlib figure
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_plots(evaluation: Evaluation, labels: list[str], primary: str) -> dict[str, str]:
    """Base64 PNGs: accuracy vs size (marker area ~ batch-1 latency), latency per variant, confusion matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = evaluation.variants
    plots: dict[str, str] = {}

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lat = [v.latency_ms_b1 for v in variants]
    scale = 600.0 / max(max(lat), 1e-9)
    for v in variants:
        ax.scatter(v.size_bytes / 1024, v.accuracy * 100, s=40 + v.latency_ms_b1 * scale, alpha=0.7)
        ax.annotate(f"{v.name}\n{v.latency_ms_b1:.3f} ms", (v.size_bytes / 1024, v.accuracy * 100),
                    textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("ONNX file size (KiB)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs size (marker area: ORT CPU latency, batch 1)")
    ax.grid(alpha=0.3)
    plots["accuracy_size_latency"] = _figure_png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    xs = range(len(variants))
    ax.bar([x - 0.2 for x in xs], [v.latency_ms_b1 for v in variants], width=0.4, label="batch 1")
    ax.bar([x + 0.2 for x in xs], [v.latency_ms_b16 / 16 for v in variants], width=0.4, label="batch 16, per sample")
    ax.set_xticks(list(xs), [v.name for v in variants])
    ax.set_ylabel("ms")
    ax.set_title("ONNX Runtime CPU latency")
    ax.legend()
    plots["latency"] = _figure_png(fig)
    plt.close(fig)

    chosen = evaluation.variant(primary)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    image = ax.imshow(chosen.confusion, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix: {primary}")
    for i, row in enumerate(chosen.confusion):
        for j, count in enumerate(row):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, shrink=0.8)
    plots["confusion"] = _figure_png(fig)
    plt.close(fig)
    return plots


def _ratio(variant, figure: str) -> str:  # noqa: ANN001 - VariantEvaluation
    value = variant.speedup.get(figure)
    return "" if value is None else f"{value:.2f}x"


def write_report(
    evaluation: Evaluation, labels: list[str], path: str | Path, *, title: str, primary: str = "int8-qdq",
    details: dict[str, str] | None = None,
) -> Path:
    """Write the HTML report to ``path``."""
    plots = render_plots(evaluation, labels, primary)
    rows = "\n".join(
        f"<tr><td>{html.escape(v.name)}</td><td>{v.precision}</td><td>{v.quantization}</td>"
        f"<td>{'yes' if v.pruned else 'no'}</td><td>{v.params:,}</td><td>{v.flops / 1e6:.2f}</td>"
        f"<td>{v.size_bytes / 1024:.1f}</td><td>{v.accuracy * 100:.2f}</td><td>{v.drop_points:+.2f}</td>"
        f"<td>{v.latency_ms_b1:.3f}</td><td>{v.latency_ms_b16:.3f}</td>"
        f"<td>{_ratio(v, 'b1_vs_fp32-dense')}</td><td>{_ratio(v, 'b16_vs_fp32-dense')}</td>"
        f"<td>{_ratio(v, 'b1_vs_fp32')}</td><td>{_ratio(v, 'b16_vs_fp32')}</td>"
        f"<td>{'yes' if v.preferred else 'no'}</td></tr>"
        for v in evaluation.variants
    )
    notes = "".join(f"<li>{html.escape(v.name)}: {html.escape(v.note)}</li>" for v in evaluation.variants if v.note)
    calibration = evaluation.calibration
    histogram = ", ".join(f"{html.escape(k)}: {n}" for k, n in calibration.get("histogram", {}).items())
    calibration_text = (f"<p>INT8 calibration (QAT and ONNX Runtime's quantizer): {calibration.get('samples')} "
                        f"training rows, stratified by class (seed {calibration.get('seed')}): {histogram}</p>"
                        if calibration else "")
    verdict = "passed" if evaluation.passed else "FAILED: " + "; ".join(evaluation.failures)
    info = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in (details or {}).items()
    )
    images = "".join(f'<figure><img alt="{k}" src="data:image/png;base64,{v}"></figure>' for k, v in plots.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}th{{background:#f4f4f4}}
figure{{display:inline-block;margin:.5em}}</style></head><body>
<h1>{html.escape(title)}</h1>
<table>{info}</table>
<h2>Variants</h2>
<p>Gate (INT8 vs {html.escape(evaluation.baseline)}, tolerance {evaluation.tolerance_points:.2f} points):
<strong>{html.escape(verdict)}</strong></p>
<table><tr><th>variant</th><th>precision</th><th>quantization</th><th>pruned</th><th>params</th><th>MFLOPs</th>
<th>size KiB</th><th>accuracy %</th><th>drop pts</th><th>ORT ms b1</th><th>ORT ms b16</th>
<th>÷ dense b1</th><th>÷ dense b16</th><th>÷ fp32 b1</th><th>÷ fp32 b16</th><th>preferred</th></tr>
{rows}</table>
<p>Speed-ups are the reference's ONNX Runtime CPU latency divided by the variant's (above 1: faster). A CPU INT8
variant must reach {evaluation.min_speedup:.2f}x over fp32 at batch 1 and 16 to be preferred.</p>
<ul>{notes}</ul>
{calibration_text}
<h2>Plots</h2>{images}
</body></html>
"""
    Path(path).write_text(page, encoding="utf-8")
    return Path(path)
