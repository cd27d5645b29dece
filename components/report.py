"""The pipeline's report: one self-contained HTML page (plots inlined as PNG) that is published with the version."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from components.evaluate import Evaluation, SliceAccuracy, VariantComparison


def _figure_png(fig) -> str:  # noqa: ANN001 - matplotlib figure
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _is_detection(evaluation: Evaluation) -> bool:
    return evaluation.metric == "detection_map50"


def render_plots(evaluation: Evaluation, labels: list[str], primary: str) -> dict[str, str]:
    """Base64 PNGs: accuracy vs size (marker area ~ batch-1 latency), latency per variant, confusion matrix; for
    detectors mAP@0.5 vs size, latency, and mAP@0.5 and mAP@0.5:0.95 per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = evaluation.variants
    plots: dict[str, str] = {}
    figure = "mAP@0.5" if _is_detection(evaluation) else "accuracy"

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lat = [v.latency_ms_b1 for v in variants]
    scale = 600.0 / max(max(lat), 1e-9)
    for v in variants:
        ax.scatter(v.size_bytes / 1024, v.accuracy * 100, s=40 + v.latency_ms_b1 * scale, alpha=0.7)
        ax.annotate(f"{v.name}\n{v.latency_ms_b1:.3f} ms", (v.size_bytes / 1024, v.accuracy * 100),
                    textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("ONNX file size (KiB)")
    ax.set_ylabel(f"test {figure} (%)")
    ax.set_title(f"{figure} vs size (marker area: ORT CPU latency, batch 1)")
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

    if _is_detection(evaluation):
        plots["map"] = _map_plot(evaluation)
        return plots
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


def _map_plot(evaluation: Evaluation) -> str:
    """A detector's mAP@0.5 and mAP@0.5:0.95 per variant, with the gate's bar."""
    import matplotlib.pyplot as plt

    variants = evaluation.variants
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    xs = range(len(variants))
    ax.bar([x - 0.2 for x in xs], [v.accuracy * 100 for v in variants], width=0.4, label="mAP@0.5")
    ax.bar([x + 0.2 for x in xs], [(v.map50_95 or 0.0) * 100 for v in variants], width=0.4, label="mAP@0.5:0.95")
    if evaluation.min_score > 0:
        ax.axhline(evaluation.min_score * 100, color="grey", linestyle="--", linewidth=1, label="bar (mAP@0.5)")
    ax.set_xticks(list(xs), [v.name for v in variants])
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title("COCO mAP on the test set, per variant")
    ax.legend(loc="lower right")
    png = _figure_png(fig)
    plt.close(fig)
    return png


def _ratio(variant, figure: str) -> str:  # noqa: ANN001 - VariantEvaluation
    value = variant.speedup.get(figure)
    return "" if value is None else f"{value:.2f}x"


def _cell(value: SliceAccuracy | float | None) -> str:
    """A percentage cell (empty when there is no figure)."""
    if isinstance(value, SliceAccuracy):
        value = value.overall
    return "<td>—</td>" if value is None else f"<td>{value * 100:.1f}</td>"


def _delta(new: SliceAccuracy | float | None, old: SliceAccuracy | float | None) -> str:
    """The change in points, marked better/worse by class (empty when a side is missing)."""
    new = new.overall if isinstance(new, SliceAccuracy) else new
    old = old.overall if isinstance(old, SliceAccuracy) else old
    if new is None or old is None:
        return "<td>—</td>"
    delta = (new - old) * 100.0
    kind = "better" if delta > 0 else "worse" if delta < 0 else "same"
    return f'<td class="{kind}">{delta:+.1f}</td>'


def _side_by_side(comparisons: list[VariantComparison]) -> str:
    """Both slices, new beside deployed, one row per variant."""
    rows = "\n".join(
        f"<tr><td>{html.escape(c.name)}</td><td>{html.escape(c.against or '—')}</td>"
        f"{_cell(c.curated)}{_cell(c.deployed_curated)}{_delta(c.curated, c.deployed_curated)}"
        f"{_cell(c.field)}{_cell(c.deployed_field)}{_delta(c.field, c.deployed_field)}</tr>"
        for c in comparisons)
    return ('<table id="two-slices"><tr><th rowspan="2">variant</th><th rowspan="2">deployed variant</th>'
            '<th colspan="3">curated test set, accuracy %</th><th colspan="3">field slice, accuracy %</th></tr>'
            "<tr><th>new</th><th>deployed</th><th>Δ points</th><th>new</th><th>deployed</th><th>Δ points</th></tr>"
            f"\n{rows}</table>")


def _breakdown(comparisons: list[VariantComparison], kind: str, counts: dict[str, int]) -> str:
    """The field slice per class (``kind="class"``) or per device, every variant's new and deployed accuracy."""
    shown = [c for c in comparisons if c.field is not None]
    if not shown or not counts:
        return ""

    def figures(side: SliceAccuracy | None, key: str) -> float | None:
        table = (side.per_class if kind == "class" else side.per_device) if side is not None else {}
        return table.get(key)

    head = "".join(f'<th colspan="3">{html.escape(c.name)}</th>' for c in shown)
    sub = "<th>new</th><th>deployed</th><th>Δ</th>" * len(shown)
    rows = "\n".join(
        f"<tr><td>{html.escape(key)}</td><td>{count}</td>" + "".join(
            _cell(figures(c.field, key)) + _cell(figures(c.deployed_field, key))
            + _delta(figures(c.field, key), figures(c.deployed_field, key)) for c in shown) + "</tr>"
        for key, count in counts.items())
    return (f'<h3>Field slice per {kind}</h3><table id="field-per-{kind}"><tr><th rowspan="2">{kind}</th>'
            f'<th rowspan="2">samples</th>{head}</tr><tr>{sub}</tr>\n{rows}</table>')


def _lineage(lineage: dict) -> str:
    """Where the training data came from, one row per fact (nested facts as compact JSON)."""
    import json

    rows = []
    for key, value in lineage.items():
        parts = value.items() if isinstance(value, dict) else [("", value)]
        for sub, item in parts:
            text = item if isinstance(item, str) else json.dumps(item, sort_keys=True)
            rows.append(f"<tr><th>{html.escape(key + ('.' + sub if sub else ''))}</th>"
                        f"<td>{html.escape(str(text))}</td></tr>")
    return f'<h3>Lineage</h3><table id="lineage">{"".join(rows)}</table>' if rows else ""


def two_slice_section(evaluation: Evaluation, extra: dict | None = None) -> str:
    """The report's comparison with the deployed version: the verdict and every failure, both slices side by side
    per variant, the field slice per class and per device, what got better and worse, and the data's lineage
    (``evaluation.lineage``, else the dataset's ``extra``)."""
    from components.evaluate import field_lineage

    deployed = evaluation.deployed
    against = (f"deployed version {html.escape(deployed.get('version', ''))} (channel "
               f"{html.escape(deployed.get('channel', ''))})" if deployed else "no deployed version")
    gate = {"beat": "must be above the deployed version's", "off": "not judged",
            "match": f"may be at most {evaluation.field_tolerance_points:.2f} points below the deployed version's"}
    field_gate = html.escape(evaluation.field_gate)
    rule = (f"<p>Against the {against}: curated test accuracy may be at most {evaluation.tolerance_points:.2f} "
            f"points below the deployed version's; field slice accuracy (field_gate={field_gate})"
            f" {gate.get(evaluation.field_gate, '')}.</p>")
    note = f"<p>{html.escape(evaluation.comparison_note)}</p>" if evaluation.comparison_note else ""
    verdict = ("<p class=\"verdict\"><strong>verdict: passed</strong></p>" if evaluation.passed else
               "<p class=\"verdict\"><strong>verdict: FAILED</strong></p><ul class=\"failures\">"
               + "".join(f"<li>{html.escape(f)}</li>" for f in evaluation.failures) + "</ul>")
    changes = "".join(f"<p class=\"{kind}\">{kind}: {html.escape('; '.join(items))}</p>"
                      for kind, items in (("better", evaluation.better), ("worse", evaluation.worse)) if items)
    slice_info = evaluation.field_slice
    table = _side_by_side(evaluation.comparisons) if evaluation.comparisons else ""
    lineage = evaluation.lineage or field_lineage(extra or {})
    return ("<h2>New vs deployed: curated test set and field slice</h2>" + rule + note + verdict
            + (f"<p>Field slice: {slice_info.get('samples', 0)} samples held out of training, from devices "
               f"{html.escape(', '.join(slice_info.get('device_counts', {})) or '—')}.</p>" if slice_info else "")
            + table + (f"<p>Changes of fp32-dense (the trained model) against the deployed version:</p>{changes}"
                       if changes else "")
            + _breakdown(evaluation.comparisons, "class", slice_info.get("class_counts", {}))
            + _breakdown(evaluation.comparisons, "device", slice_info.get("device_counts", {}))
            + _lineage(lineage))


def comparison_metrics(evaluation: Evaluation) -> dict[str, float]:
    """KFP metrics of the two-slice gate: each variant's field-slice accuracy, the deployed counterpart's on both
    slices and the gains in points (present sides only), the field slice's size and the verdict (1 passed)."""
    figures: dict[str, float] = {"gate_passed": 1.0 if evaluation.passed else 0.0,
                                 "field_slice_samples": float(evaluation.field_slice.get("samples", 0))}
    for c in evaluation.comparisons:
        for slice_name, new, old in (("curated", c.curated, c.deployed_curated), ("field", c.field, c.deployed_field)):
            if new is not None and slice_name == "field":
                figures[f"{c.name}_field_accuracy"] = new.overall
            if old is not None:
                figures[f"{c.name}_deployed_{slice_name}_accuracy"] = old.overall
            if new is not None and old is not None:
                figures[f"{c.name}_{slice_name}_gain_points"] = round((new.overall - old.overall) * 100.0, 4)
    return figures


def write_report(
    evaluation: Evaluation, labels: list[str], path: str | Path, *, title: str, primary: str = "int8-qdq",
    details: dict[str, str] | None = None, extra: dict | None = None,
) -> Path:
    """Write the HTML report to ``path`` (``extra``: the dataset's, for the lineage of an evaluation that does not
    carry it). Written atomically: a reader never sees half a page."""
    plots = render_plots(evaluation, labels, primary)
    detection = _is_detection(evaluation)
    rows = "\n".join(
        f"<tr><td>{html.escape(v.name)}</td><td>{v.precision}</td><td>{v.quantization}</td>"
        f"<td>{'yes' if v.pruned else 'no'}</td><td>{v.params:,}</td><td>{v.flops / 1e6:.2f}</td>"
        f"<td>{v.size_bytes / 1024:.1f}</td><td>{v.accuracy * 100:.2f}</td>"
        + (f"<td>{(v.map50_95 or 0.0) * 100:.2f}</td>" if detection else "")
        + f"<td>{v.drop_points:+.2f}</td>"
        f"<td>{v.latency_ms_b1:.3f}</td><td>{v.latency_ms_b16:.3f}</td>"
        f"<td>{_ratio(v, 'b1_vs_fp32-dense')}</td><td>{_ratio(v, 'b16_vs_fp32-dense')}</td>"
        f"<td>{_ratio(v, 'b1_vs_fp32')}</td><td>{_ratio(v, 'b16_vs_fp32')}</td>"
        f"<td>{'yes' if v.preferred else 'no'}</td></tr>"
        for v in evaluation.variants
    )
    notes = "".join(f"<li>{html.escape(v.name)}: {html.escape(v.note)}</li>" for v in evaluation.variants if v.note)
    calibration = evaluation.calibration
    histogram = ", ".join(f"{html.escape(k)}: {n}" for k, n in calibration.get("histogram", {}).items())
    sample = ("a seeded random sample (seed {seed}); objects per class: " if detection
              else "stratified by class (seed {seed}): ").format(seed=calibration.get("seed"))
    calibration_text = (f"<p>INT8 calibration (QAT and ONNX Runtime's quantizer): {calibration.get('samples')} "
                        f"training rows, {sample}{histogram}</p>"
                        if calibration else "")
    verdict = "passed" if evaluation.passed else "FAILED: " + "; ".join(evaluation.failures)
    gate = (f"INT8 vs {html.escape(evaluation.baseline)}, tolerance {evaluation.tolerance_points:.2f} "
            + ("mAP@0.5 points" if detection else "points")
            + (f"; every variant's {'mAP@0.5' if detection else 'accuracy'} at least {evaluation.min_score * 100:.2f} %"
               if evaluation.min_score > 0 else ""))
    score_header = ("<th>mAP@0.5 %</th><th>mAP@0.5:0.95 %</th>" if detection else "<th>accuracy %</th>")
    task_text = ("<p>Detections are decoded and suppressed (NMS) outside the model, as on the device; mAP is COCO's "
                 "(faster-coco-eval) against the test set's boxes. Negative control (fp32-dense's detections scored "
                 f"against other images' labels): mAP@0.5 {(evaluation.control or 0.0) * 100:.2f}.</p>"
                 if detection else "")
    info = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in (details or {}).items()
    )
    images = "".join(f'<figure><img alt="{k}" src="data:image/png;base64,{v}"></figure>' for k, v in plots.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}th{{background:#f4f4f4}}
figure{{display:inline-block;margin:.5em}}.better{{color:#176b2c}}.worse{{color:#a4161a}}</style></head><body>
<h1>{html.escape(title)}</h1>
<table>{info}</table>
<h2>Variants</h2>
<p>Gate ({gate}):
<strong>{html.escape(verdict)}</strong></p>
<table><tr><th>variant</th><th>precision</th><th>quantization</th><th>pruned</th><th>params</th><th>MFLOPs</th>
<th>size KiB</th>{score_header}<th>drop pts</th><th>ORT ms b1</th><th>ORT ms b16</th>
<th>÷ dense b1</th><th>÷ dense b16</th><th>÷ fp32 b1</th><th>÷ fp32 b16</th><th>preferred</th></tr>
{rows}</table>
<p>Speed-ups are the reference's ONNX Runtime CPU latency divided by the variant's (above 1: faster). A CPU INT8
variant must reach {evaluation.min_speedup:.2f}x over fp32 at batch 1 and 16 to be preferred.</p>
<ul>{notes}</ul>
{task_text}{calibration_text}
{two_slice_section(evaluation, extra)}
<h2>Plots</h2>{images}
</body></html>
"""
    from edgeloop_core.files import write_atomic

    write_atomic(Path(path), page.encode("utf-8"))
    return Path(path)
