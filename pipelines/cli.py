"""``edgeloop pipeline ...``: run locally (kfp.local), compile, submit to a cluster, schedule, verify."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from edgeloop_core.console import console

if TYPE_CHECKING:
    from components.evaluate import Evaluation

app = typer.Typer(help="The retraining pipeline: run it here, or compile/submit/schedule it on Kubeflow.",
                  no_args_is_help=True)

ParamOption = Annotated[
    list[str] | None,
    typer.Option("--param", "-p", help="pipeline parameter NAME=VALUE (repeatable); see `edgeloop pipeline params`"),
]


S3SecretOption = Annotated[str | None, typer.Option(
    help="Kubernetes Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for the S3 steps")]
SigningSecretOption = Annotated[str | None, typer.Option(
    help="Kubernetes Secret with signing-key.pem, mounted into the publish step")]
TrainGpusOption = Annotated[int, typer.Option(help="nvidia.com/gpu for train, prune and QAT (0: CPU)")]
VerifySecretOption = Annotated[str | None, typer.Option(
    help="Kubernetes Secret with verify-key.pem, mounted into the steps that check the deployed version (field "
         "data's teacher, warm start, the gate's comparison)")]


def _cluster(s3_secret: str | None, signing_secret: str | None, train_gpus: int,
             verify_secret: str | None = None) -> dict:
    return {"s3_secret": s3_secret, "signing_secret": signing_secret, "train_gpus": train_gpus,
            "verify_secret": verify_secret}


def variants_table(evaluation: Evaluation, title: str = "variants") -> Table:
    """The variants as a rich table: params, FLOPs, size, accuracy (detectors: mAP@0.5), drop, ORT CPU latency at
    batch 1 and 16."""
    table = Table(title=title)
    figure = "mAP@0.5 %" if evaluation.metric == "detection_map50" else "accuracy %"
    for column in ("variant", "precision", "pruned", "params", "MFLOPs", "size KiB", figure, "drop pts",
                   "ORT ms b1", "ORT ms b16"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for v in evaluation.variants:
        table.add_row(
            v.name, v.precision, "yes" if v.pruned else "no", f"{v.params:,}", f"{v.flops / 1e6:.2f}",
            f"{v.size_bytes / 1024:.1f}", f"{v.accuracy * 100:.2f}", f"{v.drop_points:+.2f}",
            f"{v.latency_ms_b1:.3f}", f"{v.latency_ms_b16:.3f}",
        )
    return table


@app.command("params")
def params_command() -> None:
    """List the pipeline's parameters and their defaults."""
    from pipelines.local_run import pipeline_parameters

    table = Table(title="pipeline parameters")
    table.add_column("name")
    table.add_column("type")
    table.add_column("default")
    for name, param in pipeline_parameters().items():
        kind = getattr(param.annotation, "__name__", str(param.annotation))
        table.add_row(name, kind, repr(param.default))
    console.print(table)


@app.command("run")
def run_command(
    param: ParamOption = None,
    runs_dir: Annotated[Path, typer.Option(help="where each local run keeps its outputs and log")] = Path(
        ".edgeloop/runs"),
    verbose: Annotated[bool, typer.Option(help="stream the components' output instead of logging to a file")] = False,
) -> None:
    """Run the pipeline on this machine through kfp.local (S3 and signing key from the environment)."""
    from pipelines.local_run import parse_parameters, run_local

    values = parse_parameters(param or [])
    with console.status("running the pipeline through kfp.local ..."):
        result = run_local(values, runs_dir=runs_dir, log_to_file=not verbose)
    print_result(result)


def print_result(result) -> None:  # noqa: ANN001 - LocalRunResult, imported lazily
    """The table of variants and where the version went."""
    if result.decision == "skip":
        console.print(f"skipped training: {result.reason or 'nothing changed since the deployed version'}; "
                      f"pass -p force_retrain=true to retrain anyway", highlight=False, markup=False)
        return
    if result.reason:
        console.print(f"trained: {result.reason}", highlight=False, markup=False)
    evaluation = result.evaluation()
    if evaluation is not None:
        console.print(variants_table(evaluation))
    if result.manifest is not None:
        console.print(f"published [bold]{result.manifest.name}/{result.manifest.version}[/bold] "
                      f"({len(result.manifest.files())} files, signed by key {result.manifest.signature.key_id})")
    if result.log_path:
        console.print(f"log: {result.log_path}")


@app.command("import-onnx")
def import_onnx_command(
    onnx: Annotated[str, typer.Option(help="the model: a path, file:// or s3:// URI")],
    calibration: Annotated[str, typer.Option(help=".npz with one array per model input (path or s3://)")],
    model_name: Annotated[str, typer.Option(help="name under models/ in the bucket")],
    task: Annotated[str, typer.Option(
        help="what the outputs mean: classification, detection, keyword_spotting, embedding or raw "
             "(default: inferred from the graph)")] = "",
    layout: Annotated[str, typer.Option(
        help="a detector's outputs: yolov5, yolov8 (also v11), end2end (YOLOv10, NMS included) or separate "
             "(default: inferred from the graph)")] = "",
    slice_: Annotated[list[str] | None, typer.Option(
        "--slice", help="a part of an output judged on its own, name=output:axis:start[:stop] (repeatable), "
                        "e.g. boxes=output0:1:0:4 --slice scores=output0:1:4")] = None,
    nms: Annotated[bool, typer.Option(
        help="a YOLOv5/v8/v11 detector: append decode + NMS to every variant, so apps get boxes, scores, classes "
             "and num_detections (-p score_threshold=, -p iou_threshold=, -p max_detections= set them)")] = False,
    labels: Annotated[str, typer.Option(
        help="a detector: COCO-format labels of the calibration .npz's rows (image i is row i); the variants get "
             "their mAP and the device validates by mAP@0.5 against the held-out rows' labels")] = "",
    param: ParamOption = None,
    runs_dir: Annotated[Path, typer.Option(help="where each local run keeps its outputs and log")] = Path(
        ".edgeloop/runs"),
) -> None:
    """Bring your own ONNX: quantize (INT8 Q/DQ and ORT), convert (FP16), gate on the task's metric, publish."""
    from components.tasks import check_stated
    from edgeloop_core.errors import PipelineFailed
    from pipelines.import_onnx import import_onnx_pipeline
    from pipelines.local_run import parse_parameters, run_local

    slices = ",".join(slice_ or [])
    check_stated(task, layout, slices)
    values = {"onnx_uri": onnx, "calibration_uri": calibration, "model_name": model_name,
              **parse_parameters(param or [], import_onnx_pipeline)}
    values.update({k: v for k, v in (("task", task), ("layout", layout), ("slices", slices), ("nms", nms),
                                     ("labels_uri", labels)) if v})
    try:
        with console.status("importing through kfp.local ..."):
            result = run_local(values, runs_dir=runs_dir, pipeline=import_onnx_pipeline)
    except PipelineFailed as failed:  # what the intake did may be why: say it before the failure
        if failed.log_path is not None:
            _print_intake(_import_file(failed.log_path.parent, "intake.json") or {})
        raise
    assert result.manifest is not None
    manifest = result.manifest
    _print_intake(manifest.training.get("intake", {}))
    what = manifest.task.kind + (f", layout {manifest.task.layout}" if manifest.task.layout else "") + (
        f", {manifest.task.num_classes} classes" if manifest.task.num_classes else "")
    console.print(f"task: {what}", highlight=False)
    metric, control = manifest.validation.metric, manifest.validation.control
    table = Table(title=f"{manifest.name}/{manifest.version}")
    for column in ("variant", "precision", "quantization", "size KiB", f"{metric} vs FP32"):
        table.add_column(column)
    for v in manifest.variants:
        table.add_row(v.name, v.precision, v.quantization, f"{v.size_bytes / 1024:.1f}", f"{v.accuracy:.4f}")
    console.print(table)
    if control is not None:
        console.print(f"negative control ({metric} on wrongly paired samples): {control:.4f}", highlight=False)
    for left_out in (_import_file(result.run_dir, "gate.json") or {}).get("excluded", []):
        console.print(f"left out by the gate: {left_out.get('reason', left_out.get('name'))}", highlight=False,
                      markup=False)


def _import_file(run_dir: Path, name: str) -> dict | None:
    """A JSON file the import step or its gate left in a local run's folder (``intake.json``, ``gate.json``)."""
    import json

    found = sorted(run_dir.glob(f"**/onnx_models/{name}"))
    return json.loads(found[-1].read_text()) if found else None


def _print_intake(intake: dict) -> None:
    """What the intake found and changed, and why the batch stays fixed where it does (one line each)."""
    if not intake:
        return
    batch = f"fixed at {intake['fixed_batch']}" if intake.get("fixed_batch") else "dynamic"
    console.print(f"intake: opset {intake.get('opset_before')} → {intake.get('opset_after')}, batch {batch}",
                  highlight=False, markup=False)
    for change in intake.get("changes", []):
        console.print(f"intake: {change}", highlight=False, markup=False)


@app.command("compile")
def compile_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="YAML file to write")] = Path("pipeline.yaml"),
    s3_secret: S3SecretOption = None,
    signing_secret: SigningSecretOption = None,
    train_gpus: TrainGpusOption = 0,
    verify_secret: VerifySecretOption = None,
) -> None:
    """Compile the pipeline to KFP IR YAML for a Kubeflow cluster."""
    from pipelines.cluster import compile_pipeline

    console.print(f"wrote {compile_pipeline(output, **_cluster(s3_secret, signing_secret, train_gpus, verify_secret))}")


@app.command("submit")
def submit_command(
    host: Annotated[str, typer.Option(help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80")],
    param: ParamOption = None,
    experiment: Annotated[str, typer.Option(help="experiment name")] = "edgeloop",
    run_name: Annotated[str | None, typer.Option(help="display name of the run")] = None,
    namespace: Annotated[str | None, typer.Option(help="Kubeflow profile namespace")] = None,
    s3_secret: S3SecretOption = None,
    signing_secret: SigningSecretOption = None,
    train_gpus: TrainGpusOption = 0,
    verify_secret: VerifySecretOption = None,
) -> None:
    """Submit one run to a Kubeflow Pipelines cluster."""
    from pipelines.cluster import submit_run
    from pipelines.local_run import parse_parameters

    run_id = submit_run(host, parse_parameters(param or []), experiment=experiment, run_name=run_name,
                        namespace=namespace, cluster=_cluster(s3_secret, signing_secret, train_gpus, verify_secret))
    console.print(f"submitted run {run_id}")


@app.command("schedule")
def schedule_command(
    host: Annotated[str, typer.Option(help="KFP API endpoint")],
    cron: Annotated[str, typer.Option(help="cron expression, e.g. '0 3 * * 1' (Mondays 03:00)")],
    name: Annotated[str, typer.Option(help="recurring run name; an existing one of that name is replaced")] = (
        "edgeloop-retraining"),
    param: ParamOption = None,
    experiment: Annotated[str, typer.Option(help="experiment name")] = "edgeloop",
    namespace: Annotated[str | None, typer.Option(help="Kubeflow profile namespace")] = None,
    s3_secret: S3SecretOption = None,
    signing_secret: SigningSecretOption = None,
    train_gpus: TrainGpusOption = 0,
    verify_secret: VerifySecretOption = None,
) -> None:
    """Create or update (never duplicate) a recurring run of the pipeline."""
    from pipelines.cluster import connect, upsert_recurring_run
    from pipelines.local_run import parse_parameters

    run = upsert_recurring_run(connect(host, namespace), name=name, cron=cron,
                               parameters=parse_parameters(param or []), experiment=experiment, namespace=namespace,
                               cluster=_cluster(s3_secret, signing_secret, train_gpus, verify_secret))
    console.print(f"recurring run {name!r} scheduled ({getattr(run, 'recurring_run_id', '')})")


@app.command("verify")
def verify_command(
    model: Annotated[str, typer.Argument(help="model name")],
    version: Annotated[str, typer.Argument(help="version or channel")] = "stable",
    bucket: Annotated[str, typer.Option(envvar="EDGELOOP_S3_BUCKET", help="bucket")] = "edgeloop",
    prefix: Annotated[str, typer.Option(envvar="EDGELOOP_S3_PREFIX", help="key prefix before models/")] = "",
    endpoint: Annotated[str | None, typer.Option(envvar="AWS_ENDPOINT_URL_S3", help="S3 endpoint URL")] = None,
    verify_key: Annotated[
        Path | None, typer.Option(help="PEM public key (default: EDGELOOP_VERIFY_KEY[_FILE])")
    ] = None,
) -> None:
    """Check a published version: signature and every file's sha256."""
    from edgeloop_core.contract import ArtifactLayout, load_verify_keys
    from edgeloop_core.published import resolve_version, verify_published
    from edgeloop_core.store import ObjectStore

    store, layout = ObjectStore(bucket, endpoint_url=endpoint), ArtifactLayout(prefix)
    trusted = load_verify_keys(verify_key)
    resolved = resolve_version(store, layout, model, version, trusted)  # a channel's pointer is verified too
    manifest = verify_published(store, layout, model, resolved, trusted)
    console.print(f"{model}/{resolved}: signature and {len(manifest.files())} files verified")


@app.command("promote")
def promote_command(
    model: Annotated[str, typer.Argument(help="model name")],
    version: Annotated[str, typer.Argument(help="a published version")],
    channel: Annotated[str, typer.Option(help="channel to point at it")] = "stable",
    bucket: Annotated[str, typer.Option(envvar="EDGELOOP_S3_BUCKET", help="bucket")] = "edgeloop",
    prefix: Annotated[str, typer.Option(envvar="EDGELOOP_S3_PREFIX", help="key prefix before models/")] = "",
    endpoint: Annotated[str | None, typer.Option(envvar="AWS_ENDPOINT_URL_S3", help="S3 endpoint URL")] = None,
    ttl_days: Annotated[int, typer.Option(help="days until the pointer expires")] = 90,
    capture_policy: Annotated[Path | None, typer.Option(
        help="field-capture policy (JSON or YAML file, docs/capture.md) the pointer carries for the devices that "
             "follow the channel (default: keep the current pointer's)")] = None,
    no_capture: Annotated[bool, typer.Option(help="the pointer carries no capture policy")] = False,
) -> None:
    """Point a channel at a published version with a newly signed pointer (also: re-sign before it expires; go back
    to an older version on purpose). Signs with EDGELOOP_SIGNING_KEY[_FILE]."""
    from datetime import timedelta

    from components.publish import KEEP_CAPTURE, move_channel
    from edgeloop_core.contract import ArtifactLayout, load_signing_key
    from edgeloop_core.errors import ConfigError
    from edgeloop_core.store import ObjectStore

    if capture_policy is not None and no_capture:
        raise ConfigError("give --capture-policy or --no-capture, not both")
    capture = None if no_capture else read_capture_policy(capture_policy) if capture_policy else KEEP_CAPTURE
    store = ObjectStore(bucket, endpoint_url=endpoint)
    pointer = move_channel(store, ArtifactLayout(prefix), model, channel, version, load_signing_key(),
                           ttl=timedelta(days=ttl_days), capture=capture)
    console.print(f"{model}: channel {channel!r} → {pointer.version} (sequence {pointer.sequence}, "
                  f"expires {pointer.expires:%Y-%m-%d}){_capture_note(pointer)}")


@app.command("set-capture")
def set_capture_command(
    model: Annotated[str, typer.Argument(help="model name")],
    channel: Annotated[str, typer.Argument(help="channel whose pointer carries the policy")] = "stable",
    policy: Annotated[Path | None, typer.Option(
        help="field-capture policy, a JSON or YAML file (docs/capture.md)")] = None,
    clear: Annotated[bool, typer.Option(help="remove the pointer's capture policy")] = False,
    bucket: Annotated[str, typer.Option(envvar="EDGELOOP_S3_BUCKET", help="bucket")] = "edgeloop",
    prefix: Annotated[str, typer.Option(envvar="EDGELOOP_S3_PREFIX", help="key prefix before models/")] = "",
    endpoint: Annotated[str | None, typer.Option(envvar="AWS_ENDPOINT_URL_S3", help="S3 endpoint URL")] = None,
    ttl_days: Annotated[int, typer.Option(help="days until the pointer expires")] = 90,
) -> None:
    """Switch field capture for every device that follows a channel, from the cloud: re-sign the channel's pointer
    (same version, higher sequence) with a capture policy, or with --clear without one. A device's own desired
    file still wins for a model it sets a policy for. Signs with EDGELOOP_SIGNING_KEY[_FILE]."""
    from datetime import timedelta

    from components.publish import set_channel_capture
    from edgeloop_core.contract import ArtifactLayout, load_signing_key
    from edgeloop_core.errors import ConfigError
    from edgeloop_core.store import ObjectStore

    if (policy is None) == (not clear):
        raise ConfigError("give --policy FILE to set a capture policy, or --clear to remove it")
    capture = read_capture_policy(policy) if policy is not None else None
    store = ObjectStore(bucket, endpoint_url=endpoint)
    pointer = set_channel_capture(store, ArtifactLayout(prefix), model, channel, load_signing_key(), capture,
                                  ttl=timedelta(days=ttl_days))
    console.print(f"{model}: channel {channel!r} → {pointer.version} (sequence {pointer.sequence}, "
                  f"expires {pointer.expires:%Y-%m-%d}){_capture_note(pointer)}")


def read_capture_policy(path: Path):  # noqa: ANN201 - CapturePolicy, imported lazily
    """The capture policy in a JSON or YAML file; a ConfigError naming the file and the first problem."""
    import yaml
    from pydantic import ValidationError

    from edgeloop_core.contract.captures import CapturePolicy
    from edgeloop_core.errors import ConfigError

    try:
        data = yaml.safe_load(path.read_text())  # YAML reads JSON too
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"capture policy {path} cannot be read: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"capture policy {path} is not a mapping of settings (docs/capture.md)")
    try:
        return CapturePolicy.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "policy"
        raise ConfigError(f"capture policy {path}: {field}: {first['msg']}") from exc


def _capture_note(pointer) -> str:  # noqa: ANN001 - ChannelPointer, imported lazily
    """How a pointer's capture policy reads in one line."""
    if pointer.capture is None:
        return ", no capture policy"
    return f", capture policy {pointer.capture.model_dump_json(exclude_defaults=True)}"


@app.command("channels")
def channels_command(
    models: Annotated[list[str] | None, typer.Argument(help="model names (default: every model in the bucket)")] = None,
    bucket: Annotated[str, typer.Option(envvar="EDGELOOP_S3_BUCKET", help="bucket")] = "edgeloop",
    prefix: Annotated[str, typer.Option(envvar="EDGELOOP_S3_PREFIX", help="key prefix before models/")] = "",
    endpoint: Annotated[str | None, typer.Option(envvar="AWS_ENDPOINT_URL_S3", help="S3 endpoint URL")] = None,
    within_days: Annotated[int, typer.Option(
        help="flag pointers that expire within this many days (30: the window a skipped scheduled run re-signs)")] = 30,
    verify_key: Annotated[Path | None, typer.Option(
        help="PEM public key(s) to check each pointer's signature (default: EDGELOOP_VERIFY_KEY[_FILE], if set)")] = (
            None),
) -> None:
    """List every channel pointer, one line each: version, sequence, expiry; flags those that expire within
    --within-days (a scheduled run re-signs them when it skips training; `promote` re-signs by hand)."""
    import os
    from datetime import datetime, timezone

    from components.publish import channel_pointers
    from edgeloop_core.contract import ArtifactLayout, load_verify_keys
    from edgeloop_core.contract.signing import VERIFY_KEY_ENV, VERIFY_KEY_FILE_ENV
    from edgeloop_core.store import ObjectStore

    store, layout = ObjectStore(bucket, endpoint_url=endpoint), ArtifactLayout(prefix)
    checks = verify_key is not None or bool(os.environ.get(VERIFY_KEY_ENV) or os.environ.get(VERIFY_KEY_FILE_ENV))
    trusted = load_verify_keys(verify_key) if checks else None
    now = datetime.now(timezone.utc)
    for name in models or store.list_prefixes(layout.model_prefix("x")[: -len("x/")]):
        for pointer in channel_pointers(store, layout, name):
            line = f"{name}: UNREADABLE {pointer}" if isinstance(pointer, str) else _channel_line(
                pointer, trusted, now, within_days)
            console.print(line, highlight=False, markup=False, soft_wrap=True)


def _channel_line(pointer, trusted: list | None, now, within_days: int) -> str:  # noqa: ANN001 - lazy imports
    """One channel pointer in one line, flagged UNTRUSTED (signature check fails), EXPIRED or EXPIRES SOON."""
    from datetime import timezone

    from edgeloop_core.contract.signing import check_signature
    from edgeloop_core.errors import SignatureInvalid

    where = f"{pointer.name}/{pointer.channel}"
    expires = pointer.expires if pointer.expires.tzinfo else pointer.expires.replace(tzinfo=timezone.utc)
    days = (expires - now).total_seconds() / 86400
    line = (f"{where} → {pointer.version} (sequence {pointer.sequence}, expires {expires:%Y-%m-%d %H:%M} UTC, "
            f"in {days:.0f} days{_capture_note(pointer) if pointer.capture is not None else ''})")
    resign = f"re-sign: edgeloop pipeline promote {pointer.name} {pointer.version} --channel {pointer.channel}"
    if trusted is not None:
        try:
            check_signature(pointer.signature, pointer.canonical_bytes(), trusted, where)
        except SignatureInvalid as exc:
            return f"{line} UNTRUSTED: {exc} (devices refuse it; nothing re-signs it for you)"
    if days <= 0:
        return f"{line} EXPIRED: devices refuse it; {resign}"
    if days <= within_days:
        return f"{line} EXPIRES SOON: {resign}"
    return line
