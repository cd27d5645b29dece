"""``edgeloop data ...``: the field data devices sent home: list captures, export them to Label Studio and import its
labels back, fix a selection as a dataset snapshot (docs/flywheel.md). S3 from the same options and variables as
``edgeloop pipeline verify``; credentials from boto3's usual chain."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from edgeloop_core.console import console
from edgeloop_core.errors import ConfigError

if TYPE_CHECKING:
    from edgeloop_core.contract.datasets import DatasetLayout
    from edgeloop_core.store import ObjectStore

app = typer.Typer(help="Field data: list captures, label them in Label Studio, build dataset snapshots.",
                  no_args_is_help=True)

BucketOption = Annotated[str, typer.Option(envvar="EDGELOOP_S3_BUCKET", help="bucket")]
PrefixOption = Annotated[str, typer.Option(envvar="EDGELOOP_S3_PREFIX", help="key prefix before models/, captures/")]
EndpointOption = Annotated[str | None, typer.Option(envvar="AWS_ENDPOINT_URL_S3", help="S3 endpoint URL")]
SinceOption = Annotated[str | None, typer.Option(help="first capture day, yyyy-mm-dd (UTC; default: all)")]




def _model(name: str) -> str:
    from edgeloop_core.contract import check_name

    return check_name(name, "--model")


def _write(path: Path, data: bytes) -> None:
    """Write a file atomically; a path that cannot be written is one error line."""
    from edgeloop_core.files import write_atomic

    try:
        write_atomic(path, data)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _open(bucket: str, prefix: str, endpoint: str | None) -> tuple[ObjectStore, DatasetLayout]:
    from edgeloop_core.contract.datasets import DatasetLayout
    from edgeloop_core.store import ObjectStore

    return ObjectStore(bucket, endpoint_url=endpoint), DatasetLayout(prefix)


def _counts(title: str, counts: Counter[str], total: int) -> Table:
    table = Table(title=title)
    table.add_column(title.split(" ")[-1])
    table.add_column("count", justify="right")
    table.add_column("share %", justify="right")
    for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(name, str(count), f"{100 * count / max(total, 1):.1f}")
    return table


@app.command("captures")
def captures_command(
    model: Annotated[str | None, typer.Option(help="model name (default: every model)")] = None,
    since: SinceOption = None,
    bucket: BucketOption = "edgeloop",
    prefix: PrefixOption = "",
    endpoint: EndpointOption = None,
) -> None:
    """Count the captured items in S3: per device, class (a classifier's top-1 per sample), policy, label source."""
    from components.datasets import parse_since, summarize_captures
    from edgeloop_core.contract import ArtifactLayout

    store, layout = _open(bucket, prefix, endpoint)
    summary = summarize_captures(store, layout, ArtifactLayout(prefix), _model(model) if model else None,
                                 parse_since(since, "--since"))
    if not summary.items:
        console.print(f"no captures in s3://{bucket}/{layout.captures_prefix()}"
                      + (f" of {model}" if model else "") + (f" since {since}" if since else ""))
        return
    console.print(f"{summary.items} items ({summary.samples} samples) in {summary.shards} shards")
    for title, counts, total in (("items per model", summary.per_model, summary.items),
                                 ("items per device", summary.per_device, summary.items),
                                 ("items per policy", summary.per_policy, summary.items),
                                 ("samples per class", summary.per_class, summary.samples),
                                 ("items per label source", summary.per_label_source, summary.items)):
        if counts:
            console.print(_counts(title, counts, total))


@app.command("export-labelstudio")
def export_labelstudio_command(
    model: Annotated[str, typer.Option(help="model name")],
    out: Annotated[Path, typer.Option(help="the tasks (Label Studio JSON) to write")],
    config_out: Annotated[Path | None, typer.Option(
        help="the labelling config (XML) to write (default: beside --out, <name>.label-config.xml)")] = None,
    unlabelled_only: Annotated[bool, typer.Option(
        "--unlabelled-only", help="leave out items already labelled (by an app or a person)")] = False,
    bucket: BucketOption = "edgeloop",
    prefix: PrefixOption = "",
    endpoint: EndpointOption = None,
) -> None:
    """Export captured items as a Label Studio project: tasks with the model's top-1 as a pre-annotation, and the
    labelling config to create the project with. Media are embedded as data: URIs (docs/flywheel.md)."""
    import json

    from components.datasets import Manifests
    from components.labelstudio import export_tasks
    from edgeloop_core.contract import ArtifactLayout

    name = _model(model)
    store, layout = _open(bucket, prefix, endpoint)
    tasks, config = export_tasks(store, layout, Manifests(store, ArtifactLayout(prefix)), name,
                                 unlabelled_only=unlabelled_only)
    config_path = config_out or out.with_name(f"{out.stem}.label-config.xml")
    _write(out, json.dumps(tasks, indent=1).encode())
    _write(config_path, config.encode())
    console.print(f"wrote {len(tasks)} tasks to {out} and the labelling config to {config_path}: create a Label "
                  f"Studio project with that config (Settings → Labeling Interface → Code), then import {out}")


@app.command("import-labelstudio")
def import_labelstudio_command(
    export: Annotated[Path, typer.Argument(help="Label Studio's JSON export of the project (Export → JSON)")],
    model: Annotated[str, typer.Option(help="model name")],
    bucket: BucketOption = "edgeloop",
    prefix: PrefixOption = "",
    endpoint: EndpointOption = None,
) -> None:
    """Import a person's labels from Label Studio's JSON export: one label record (source human) per annotated
    sample, under labels/human/<model>/ in the bucket. A bad export writes nothing."""
    from components.datasets import Manifests
    from components.labelstudio import import_export
    from edgeloop_core.contract import ArtifactLayout

    name = _model(model)
    store, layout = _open(bucket, prefix, endpoint)
    keys = import_export(store, layout, Manifests(store, ArtifactLayout(prefix)), name, export)
    console.print(f"imported {len(keys)} human labels of {name} to s3://{bucket}/{layout.labels_prefix('human', name)}")


@app.command("snapshot")
def snapshot_command(
    model: Annotated[str, typer.Option(help="model name")],
    since: SinceOption = None,
    out: Annotated[Path | None, typer.Option(help="also write the snapshot's JSON here")] = None,
    bucket: BucketOption = "edgeloop",
    prefix: PrefixOption = "",
    endpoint: EndpointOption = None,
) -> None:
    """Fix the captures and labels of a model as a dataset snapshot named by its content hash, under
    datasets/<model>/snapshots/ in the bucket."""
    from components.datasets import build_snapshot, parse_since

    name = _model(model)
    store, layout = _open(bucket, prefix, endpoint)
    snapshot = build_snapshot(store, layout, name, parse_since(since, "--since"))
    if out is not None:
        _write(out, snapshot.to_json())
    sources = ", ".join(f"{k} {v}" for k, v in snapshot.label_sources.items())
    console.print(f"snapshot {snapshot.digest[:16]} of {name}: {snapshot.items} items in {len(snapshot.shards)} shards "
                  f"from {len(snapshot.devices)} devices ({', '.join(snapshot.devices)}), days "
                  f"{snapshot.days[0]}..{snapshot.days[-1]}; labels: {sources}", highlight=False, soft_wrap=True)
    console.print(f"s3://{bucket}/{layout.snapshot_key(name, snapshot.digest)}", highlight=False, soft_wrap=True)


@app.command("teacher-label")
def teacher_label_command(
    model: Annotated[str, typer.Option(help="model name")],
    teacher: Annotated[str, typer.Option(
        help="`deployed` (the --channel version's fp32-dense model, signature- and sha256-checked) or an ONNX "
             "classifier: a local path or s3://bucket/key")] = "deployed",
    channel: Annotated[str, typer.Option(help="the channel whose version is the deployed teacher")] = "stable",
    min_confidence: Annotated[float, typer.Option(
        help="keep a pseudo-label only when the teacher's top-1 probability is at least this (0..1]")] = 0.9,
    since: SinceOption = None,
    bucket: BucketOption = "edgeloop",
    prefix: PrefixOption = "",
    endpoint: EndpointOption = None,
) -> None:
    """Pseudo-label the captured samples no app and no person labelled with a teacher model: one label record
    (source teacher) per confident sample, under labels/teacher/<model>/ in the bucket. A deployed teacher's
    manifest must be signed by a trusted key (EDGELOOP_VERIFY_KEY[_FILE], else the public half of
    EDGELOOP_SIGNING_KEY[_FILE])."""
    from components.datasets import parse_since
    from components.teacher import run_teacher
    from edgeloop_core.contract import ArtifactLayout

    name = _model(model)
    store, layout = _open(bucket, prefix, endpoint)
    run = run_teacher(store, layout, ArtifactLayout(prefix), name, teacher=teacher, min_confidence=min_confidence,
                      since=parse_since(since, "--since"), channel=channel)
    unknown = f", {run.unknown} in a class {name} lacks" if run.unknown else ""
    console.print(f"wrote {len(run.records)} teacher labels of {name} by {run.identity} to "
                  f"s3://{bucket}/{layout.labels_prefix('teacher', name)}: {run.unlabelled} samples had no app or "
                  f"human label, {run.already} were labelled by this teacher already, {run.below} below "
                  f"{min_confidence:g} confidence{unknown}", highlight=False, soft_wrap=True)
