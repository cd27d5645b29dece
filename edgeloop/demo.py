"""``make demo``: the loop on one machine — a real S3 server, the pipeline through kfp.local, a verified version.

Everything lives under one work folder (``.demo/`` by default): the SeaweedFS data, the signing keys (generated on
the first run, never in the repo) and each run's outputs. A second run publishes a new version next to the first.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.table import Table

from edge_runtime.contract import ArtifactLayout, generate_signing_key, load_verify_key
from edge_runtime.fetch import verify_published
from edgeloop.local_s3 import LocalS3

BUCKET = "edgeloop"
MODEL = "digits-cnn"
CHANNEL = "stable"


def run_demo(workdir: str | Path = ".demo") -> None:
    """Start S3, run the pipeline (always retraining), verify what it published, list versions, stop S3."""
    from pipelines.cli import console, print_result
    from pipelines.local_run import run_local

    root = Path(workdir).resolve()
    keys = root / "keys"
    if not (keys / "signing-key.pem").exists():
        generate_signing_key(keys)
    started = time.monotonic()
    with LocalS3(root / "s3") as s3:
        store = s3.store(BUCKET)
        console.print(f"[bold]1.[/bold] SeaweedFS S3 on {s3.endpoint_url}, bucket {BUCKET!r} (data in {root / 's3'})")
        os.environ.update(s3.env())
        os.environ["EDGELOOP_SIGNING_KEY_FILE"] = str(keys / "signing-key.pem")
        console.print("[bold]2.[/bold] retraining pipeline through kfp.local: "
                      "load digits → train → prune → QAT → export → evaluate (gate) → report → publish")
        result = run_local(
            {"model_name": MODEL, "bucket": BUCKET, "channel": CHANNEL, "s3_endpoint": s3.endpoint_url,
             "force_retrain": True},
            runs_dir=root / "runs",
        )
        print_result(result)
        layout = ArtifactLayout()
        assert result.version is not None
        manifest = verify_published(store, layout, MODEL, result.version, load_verify_key(keys / "verify-key.pem"))
        console.print(f"[bold]3.[/bold] verified s3://{BUCKET}/{layout.version_prefix(MODEL, result.version)}: "
                      f"ed25519 signature and sha256 of {len(manifest.files())} files")
        table = Table(title=f"versions of {MODEL} in s3://{BUCKET}")
        for column in ("version", "complete (manifest)", "files", f"channel {CHANNEL!r}"):
            table.add_column(column)
        pointer = store.get_bytes(layout.channel_key(MODEL, CHANNEL)).decode()
        for version in sorted(store.list_prefixes(layout.model_prefix(MODEL))):
            if version == "channels":
                continue
            keys_under = store.list_keys(layout.version_prefix(MODEL, version))
            complete = layout.manifest_key(MODEL, version) in keys_under
            table.add_row(version, "yes" if complete else "no", str(len(keys_under)),
                          "◀" if f'"{version}"' in pointer else "")
        console.print(table)
    console.print(f"done in {time.monotonic() - started:.0f}s; S3 stopped. Run `make demo` again for a new version.")
