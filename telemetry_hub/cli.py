"""``edgeloop hub serve`` and ``edgeloop fleet status``."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeloop_core.console import console

hub_app = typer.Typer(help="The telemetry hub that devices report to.", no_args_is_help=True)
fleet_app = typer.Typer(help="The fleet as the hub sees it.", no_args_is_help=True)


@hub_app.command("serve")
def serve_command(
    port: Annotated[int | None, typer.Option(help="gRPC port (default HUB_PORT or 50052)")] = None,
    bind: Annotated[str | None, typer.Option(help="bind address")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default sqlite:///hub.sqlite)")] = None,
) -> None:
    """Serve the hub until SIGTERM. Device tokens come from HUB_TOKENS or HUB_TOKENS_FILE."""
    from telemetry_hub.server import HubSettings, start_hub

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in {"port": port, "bind_address": bind, "database_url": database_url}.items()
                 if v is not None}
    settings = HubSettings(**overrides)

    async def run() -> None:
        from edgeloop_core.process import settle_heap

        server, bound, _ = await start_hub(settings)
        settle_heap()  # full collections would otherwise stall every call for ~24 ms
        logging.getLogger("edgeloop.hub").info("telemetry hub on %s:%d", settings.bind_address, bound)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(2)

    asyncio.run(run())


def clock_skew(ms: int) -> str:
    """A device's clock skew (ms) for people: ``+10.0 d``, ``-3.2 h``, ``+12 min``, ``-4 s``."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000)):
        if abs(ms) >= size:
            return f"{ms / size:+.1f} {unit}"
    return f"{ms / 60_000:+.0f} min" if abs(ms) >= 60_000 else f"{ms / 1000:+.0f} s"


DRIFT_THRESHOLD = 0.2
"""Jensen-Shannon distance above which ``fleet status`` marks a device's drift (``--drift-threshold``): what a few
hundred samples of the training distribution stay well below, and a shifted camera or microphone passes."""


def drift_cell(drift_json: str, threshold: float) -> str:
    """``0.63 input:x:c0:mean DRIFT`` (the largest Jensen-Shannon distance and its feature, marked above
    ``threshold``), or empty."""
    if not drift_json:
        return ""
    drift = json.loads(drift_json)
    mark = " DRIFT" if drift.get("max", 0.0) > threshold else ""
    return f"{drift.get('max', 0.0):.2f} {drift.get('feature', '')}{mark}"


def feedback_cell(known: int, correct: int) -> str:
    """``93.1% of 120``: the serving version's feedback accuracy over the labels whose request the device knew."""
    return f"{100 * correct / known:.1f}% of {known}" if known else ""


def fleet_table(devices, drift_threshold: float = DRIFT_THRESHOLD) -> Table:  # noqa: ANN001 - DeviceStatus messages
    """A row per device and model: target key, desired and serving version, state, validation, p50/p99, last seen,
    the device's clock skew, the stats the hub did not keep (stamped outside its window), the drift of what it
    serves from the training data (marked above ``drift_threshold``) and the serving version's feedback accuracy."""
    table = Table(title="fleet")
    for column in ("device", "model", "target key", "desired", "serving", "state", "validation", "variant", "p50 ms",
                   "p99 ms", "mJ/inf", "batching", "last seen (UTC)", "clock skew", "stats dropped", "drift",
                   "feedback"):
        table.add_column(column)
    for d in devices:
        batching = ""
        if d.batching_json:
            chosen = json.loads(d.batching_json).get("chosen") or {}
            batching = f"≤{chosen.get('max_batch_size')} / {chosen.get('max_queue_delay_us')} µs"
        variant = energy = ""
        if d.variant_json:
            choice = json.loads(d.variant_json)
            if choice.get("mj_per_inference") is not None:  # absent where the device has no power rails
                energy = f"{choice['mj_per_inference']:.3f}"
            reason = str(choice.get("reason") or "").split(";")[0]  # the first clause: "1.21x faster than fp32"
            variant = f"{choice.get('chosen')} ({choice.get('mode')}: {reason})"
        seen = datetime.fromtimestamp(d.last_seen_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S") \
            if d.last_seen_ms else ""
        table.add_row(d.device_id, d.model_name, d.target_key, d.desired_version, d.serving_version, d.state,
                      d.validation_result, variant, f"{d.p50_ms:.2f}" if d.p50_ms else "",
                      f"{d.p99_ms:.2f}" if d.p99_ms else "", energy, batching, seen,
                      clock_skew(d.clock_skew_ms) if d.clock_skew_known else "",
                      str(d.stats_out_of_window) if d.stats_out_of_window else "",
                      drift_cell(d.drift_json, drift_threshold), feedback_cell(d.feedback_known, d.feedback_correct))
    return table


def kube_tables(namespace: str) -> tuple[Table, Table]:
    """Nodes with their edgeloop annotations, and the DaemonSets' rollout state, from the Kubernetes API."""
    from edgeloop_core.fleet import core_api, daemonset_rollouts, fleet_nodes

    core = core_api()
    nodes = Table(title="nodes (edgeloop.io/* annotations), a row per model")
    for column in ("node", "class", "ring", "ready", "model", "state", "desired", "serving", "target key",
                   "validation", "updated"):
        nodes.add_column(column)
    for n in fleet_nodes(core):
        for name, m in (n.models() or {"": {}}).items():
            nodes.add_row(n.name, n.device_class, n.ring, "yes" if n.ready else "no", name, m.get("state", ""),
                          m.get("desired_version", ""), m.get("serving_version", ""), m.get("target_key", ""),
                          m.get("validation", ""), n.get("updated-at"))
    rollouts = Table(title=f"edge-runtime DaemonSets in {namespace}")
    for column in ("daemonset", "desired", "updated", "ready", "unavailable"):
        rollouts.add_column(column)
    for d in daemonset_rollouts(core.api_client, namespace):
        rollouts.add_row(d["name"], str(d["desired"]), str(d["updated"]), str(d["ready"]), str(d["unavailable"]))
    return nodes, rollouts


@fleet_app.command("status")
def status_command(
    hub: Annotated[str, typer.Option(envvar="EDGE_HUB_ADDRESS", help="hub host:port")] = "127.0.0.1:50052",
    token: Annotated[str | None, typer.Option(envvar="HUB_READ_TOKEN", help="a reader token of the hub")] = None,
    ca: Annotated[Path | None, typer.Option(help="CA (PEM) of the hub's TLS certificate; set: use TLS")] = None,
    kube: Annotated[bool, typer.Option("--kube", help="ask the Kubernetes API (node annotations) instead")] = False,
    namespace: Annotated[
        str, typer.Option("--namespace", "-n", help="namespace of the edge-runtime releases (--kube)")
    ] = "edgeloop",
    state: Annotated[str, typer.Option(help="only devices in this state (serving, failed, ...)")] = "",
    model: Annotated[str, typer.Option(help="only devices serving this model")] = "",
    at_version: Annotated[str, typer.Option("--at-version", help="only devices wanting or serving this version")] = "",
    stale_minutes: Annotated[int, typer.Option(help="only devices not seen for this many minutes")] = 0,
    limit: Annotated[int, typer.Option(help="rows to print at most (the counts cover every device)")] = 200,
    drift_threshold: Annotated[float, typer.Option(
        help="mark drift (Jensen-Shannon distance, 0..1) above this")] = DRIFT_THRESHOLD,
) -> None:
    """Counts per state first, then a row per device and model: target key, desired and serving version,
    validation, p50/p99, clock skew, drift."""
    from edgeloop_core.errors import ConfigError
    from telemetry_hub.server import fleet_pages

    if kube:
        for table in kube_tables(namespace):
            console.print(table)
        return
    if not token:
        raise ConfigError("no token: pass --token or set HUB_READ_TOKEN (a reader token, not a device's)")
    import time as _time

    from edgeloop_core.tls import HubTls

    filters = {"state": state, "model_name": model, "version": at_version,
               "stale_since_ms": int((_time.time() - stale_minutes * 60) * 1000) if stale_minutes else 0}

    async def collect():  # noqa: ANN202 - (first reply, devices)
        first, devices = None, []
        async for reply in fleet_pages(hub, token, HubTls(ca) if ca else None, **filters):
            first = first or reply
            devices.extend(reply.devices[: max(0, limit - len(devices))])
            if len(devices) >= limit:
                break
        return first, devices

    first, devices = asyncio.run(collect())
    total = first.total if first else 0
    counts = ", ".join(f"{k} {v}" for k, v in sorted(first.state_counts.items())) if first else ""
    console.print(f"{total} device models: {counts}" if counts else f"{total} device models")
    console.print(fleet_table(devices, drift_threshold))
    if total > len(devices):
        console.print(f"(first {len(devices)} of {total} rows: --limit shows more, the filters fewer)")


@fleet_app.command("rollout")
def rollout_command(
    release: Annotated[str, typer.Argument(help="Helm release of the ring, e.g. edge-canary")],
    chart: Annotated[str, typer.Option(help="chart path or reference")] = "helm/edge-runtime",
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="namespace")] = "edgeloop",
    values: Annotated[list[str] | None, typer.Option("--values", "-f", help="values file (repeatable)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="value override, e.g. model.version=v2")] = None,
    ring: Annotated[str | None, typer.Option(help="watch only nodes of this ring")] = None,
    model: Annotated[str | None, typer.Option(help="move only this model (with --version); the others stay")] = None,
    version: Annotated[str | None, typer.Option(help="the version or channel --model moves to")] = None,
    timeout: Annotated[int, typer.Option(help="seconds before the rollout counts as failed")] = 900,
    helm: Annotated[str, typer.Option(help="helm binary")] = "helm",
) -> None:
    """helm upgrade --wait a ring; roll back when a device reports a failed validation or the rollout times out."""
    from edgeloop_core.fleet import core_api, rollout

    nodes = rollout(release, chart, namespace=namespace, api=core_api(), helm=helm, values=values or [],
                    sets=set_ or [], timeout_s=timeout, ring=ring, model=model, version=version)
    console.print(f"{release}: rolled out to {len(nodes)} nodes: " +
                  ", ".join(f"{n.name}={n.model(model).get('serving_version', '')}" for n in nodes))


@fleet_app.command("promote")
def promote_command(
    model: Annotated[str, typer.Option(help="model name")],
    from_: Annotated[str, typer.Option("--from", help="the channel whose version is promoted (the canary ring)")
                     ] = "canary",
    to: Annotated[str, typer.Option("--to", help="the channel moved to it")] = "stable",
    window: Annotated[float, typer.Option(help="seconds the canary devices must have served it")] = 600.0,
    min_devices: Annotated[int, typer.Option(help="canary devices that must have validated and served it")] = 1,
    drift_margin: Annotated[float, typer.Option(
        help="how much higher the canary's mean drift (Jensen-Shannon, 0..1) may be than stable's")] = 0.05,
    accuracy_margin_points: Annotated[float, typer.Option(
        help="how many points lower the canary's feedback accuracy may be than stable's")] = 1.0,
    min_feedback: Annotated[int, typer.Option(help="feedback labels each ring needs before accuracies are compared")
                            ] = 20,
    hub: Annotated[str, typer.Option(envvar="EDGE_HUB_ADDRESS", help="hub host:port")] = "127.0.0.1:50052",
    token: Annotated[str | None, typer.Option(envvar="HUB_READ_TOKEN", help="a reader token of the hub")] = None,
    ca: Annotated[Path | None, typer.Option(help="CA (PEM) of the hub's TLS certificate; set: use TLS")] = None,
    bucket: Annotated[str, typer.Option(envvar="EDGELOOP_S3_BUCKET", help="bucket")] = "edgeloop",
    prefix: Annotated[str, typer.Option(envvar="EDGELOOP_S3_PREFIX", help="key prefix before models/")] = "",
    endpoint: Annotated[str | None, typer.Option(envvar="AWS_ENDPOINT_URL_S3", help="S3 endpoint URL")] = None,
) -> None:
    """Move --to (stable) to --from's version (the canary) when the canary devices validated it, served it for the
    window, and their field signals (drift; feedback accuracy where both rings have labels) are no worse than the
    stable devices'. Exit 1 with one line `not promoted: ...` otherwise; 2 for arguments that cannot work. Signs
    with EDGELOOP_SIGNING_KEY[_FILE]."""
    from components.promote import PromoteRules, promote
    from edgeloop_core.contract import ArtifactLayout, load_signing_key
    from edgeloop_core.errors import ConfigError
    from edgeloop_core.store import ObjectStore
    from edgeloop_core.tls import HubTls

    try:
        if not token:
            raise ConfigError("no token: pass --token or set HUB_READ_TOKEN (a reader token, not a device's)")
        rules = PromoteRules(window_s=window, min_devices=min_devices, drift_margin=drift_margin,
                             accuracy_margin_points=accuracy_margin_points, min_feedback=min_feedback).check()
        signing_key = load_signing_key()
        result = promote(ObjectStore(bucket, endpoint_url=endpoint), ArtifactLayout(prefix), model, hub_address=hub,
                         hub_token=token, signing_key=signing_key, source=from_, target=to, rules=rules,
                         tls=HubTls(ca) if ca else None)
    except ConfigError as exc:  # arguments that cannot work: one line, exit 2 (as a usage error)
        from rich.console import Console

        Console(stderr=True, soft_wrap=True, highlight=False).print(f"error: {exc}", markup=False)
        raise typer.Exit(2) from None
    console.print(result.line(), markup=False, highlight=False, soft_wrap=True)
    if not result.promoted:
        raise typer.Exit(1)
