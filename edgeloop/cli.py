"""The ``edgeloop`` command. Sub-commands whose dependencies are not installed (an edge image has no kfp) are
left out rather than failing the whole command."""

from __future__ import annotations

import importlib.util
import sys

import typer
from rich.console import Console
from rich.markup import escape

from edgeloop_core.errors import EdgeloopError

app = typer.Typer(help="edgeloop: train, publish, deploy and serve models on Jetson fleets.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

pipeline_app = None
if importlib.util.find_spec("kfp") is not None:  # the cloud extra is installed (not on edge images)
    from pipelines.cli import app as pipeline_app
if pipeline_app is not None:
    app.add_typer(pipeline_app, name="pipeline")

from edge_runtime.cli import app as edge_app  # noqa: E402 - after the optional cloud part on purpose

app.add_typer(edge_app, name="edge")
try:
    from telemetry_hub.cli import fleet_app, hub_app
except ImportError:  # the hub extra (SQLAlchemy) is not installed here
    hub_app = fleet_app = None
if hub_app is not None and fleet_app is not None:
    app.add_typer(hub_app, name="hub")
    app.add_typer(fleet_app, name="fleet")
if importlib.util.find_spec("pyarrow") is not None:  # `edgeloop data`: capture shards are Parquet
    from edgeloop.data_cli import app as data_app

    app.add_typer(data_app, name="data")


@app.command("keys")
def keys_command(
    out: str = typer.Option(..., help="folder for signing-key.pem (private, 0600) and verify-key.pem"),
) -> None:
    """Generate an ed25519 key pair for signing manifests."""
    from edgeloop_core.contract import generate_signing_key

    private, public = generate_signing_key(out)
    Console().print(f"wrote {private} (keep secret) and {public} (give to devices)")


@app.command("demo")
def demo_command(
    workdir: str = typer.Option(".demo", help="where the demo keeps its S3 data, keys and runs"),
    detection: bool = typer.Option(False, help="also train, serve and score a detector (synthetic shapes, mAP@0.5)"),
    flywheel: bool = typer.Option(False, help="one turn of the data flywheel instead: a fleet meets a shifted field, "
                                              "captures and labels come home, the scheduled run retrains, canary, "
                                              "promote (docs/flywheel.md)"),
) -> None:
    """The whole loop on this machine (see `make demo`)."""
    if flywheel:
        from edgeloop.flywheel_demo import run_flywheel

        run_flywheel(workdir if workdir != ".demo" else ".demo-flywheel")
        return
    from edgeloop.demo import run_demo

    run_demo(workdir, detection=detection)


def main() -> None:
    """Entry point: our errors become one readable line and exit code 1, never a traceback."""
    try:
        app()
    except EdgeloopError as exc:
        err = Console(stderr=True, soft_wrap=True, highlight=False)
        log_path = getattr(exc, "log_path", None)
        tail = f" (full log: {log_path})" if log_path else ""
        err.print(f"[red]error:[/red] {escape(str(exc))}{escape(tail)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
