"""``edgeloop hub serve`` and ``edgeloop fleet status``."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from datetime import datetime, timezone
from typing import Annotated

import typer
from rich.table import Table

from edge_runtime.cli import console

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
        server, bound, _ = await start_hub(settings)
        logging.getLogger("edgeloop.hub").info("telemetry hub on %s:%d", settings.bind_address, bound)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(2)

    asyncio.run(run())


def fleet_table(devices) -> Table:  # noqa: ANN001 - telemetry DeviceStatus messages
    """device, target key, desired and serving version, state, validation, p50/p99, last seen."""
    table = Table(title="fleet")
    for column in ("device", "target key", "desired", "serving", "state", "validation", "p50 ms", "p99 ms",
                   "last seen (UTC)"):
        table.add_column(column)
    for d in devices:
        seen = datetime.fromtimestamp(d.last_seen_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S") \
            if d.last_seen_ms else ""
        table.add_row(d.device_id, d.target_key, d.desired_version, d.serving_version, d.state, d.validation_result,
                      f"{d.p50_ms:.2f}" if d.p50_ms else "", f"{d.p99_ms:.2f}" if d.p99_ms else "", seen)
    return table


@fleet_app.command("status")
def status_command(
    hub: Annotated[str, typer.Option(envvar="EDGE_HUB_ADDRESS", help="hub host:port")] = "127.0.0.1:50052",
    token: Annotated[str | None, typer.Option(envvar="EDGE_HUB_TOKEN", help="a token the hub accepts")] = None,
) -> None:
    """Print every device: target key, desired and serving version, validation result, p50/p99, last seen."""
    from edge_runtime.errors import ConfigError
    from telemetry_hub.server import fleet_status

    token = token or os.environ.get("HUB_TOKEN")
    if not token:
        raise ConfigError("no token: pass --token or set EDGE_HUB_TOKEN")
    console.print(fleet_table(asyncio.run(fleet_status(hub, token))))
