"""``edgeloop demo --flywheel``: one whole turn of the data flywheel on this machine (docs/flywheel.md).

1. a real S3 server (SeaweedFS), the signing keys, and version 1 of ``digits-cnn`` trained on the curated data
   (scikit-learn's handwritten digits) through kfp.local, on the ``stable`` and ``canary`` channels;
2. the telemetry hub and a small fleet: three devices on ``stable`` that capture half their requests, and one on
   the ``canary`` ring; each is a real edge runtime (fetch, build, validate, serve gRPC);
3. the field: the devices meet digits set in type (:mod:`edgeloop.field_world`, a shift from handwriting) and the app
   confirms the right answer for some of its requests through the Label RPC; captures and labels go home to S3,
   field statistics to the hub (which sees the drift);
4. the scheduled run: a snapshot of the captures, pseudo-labels from the deployed version for what no app labelled,
   warm start from the deployed version's checkpoint, a field slice held out by device, the two-slice gate against
   the deployed version, publish to ``canary``;
5. the canary device validates the new version on-device and serves it; ``fleet promote`` moves it to ``stable``
   once the canary's field signals are no worse; the stable devices follow;
6. a table: old and new version on the curated test set, on the field slice, on live field traffic, and the drift.

Everything lives under one work folder (``.demo-flywheel/`` by default); every server is stopped at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from edgeloop.demo import BUCKET, MODEL, _LoopThread
from edgeloop.field_world import typeset_digits
from edgeloop.local_s3 import LocalS3
from edgeloop_core.contract import ArtifactLayout, generate_signing_key, load_signing_key
from edgeloop_core.contract.captures import CapturePolicy

STABLE_DEVICES = ("shop-1", "shop-2", "shop-3")
CANARY_DEVICE = "lab-1"
FIELD_REQUESTS = 400
"""Requests each stable device answers in the field before the scheduled run (and again after the rollout)."""
LABEL_SHARE = 0.5
"""Share of its requests for which the app later learns and sends the right answer."""
CAPTURE_POLICY = {"sample_rate": 0.5, "hard_examples": {"margin_below": 0.3}}
"""What the stable channel's devices capture: half their requests at random, plus every one with a top-1 margin
below 0.3."""
FIRST_RUN = {"epochs": 12}
"""Version 1's schedule (short: the demo's whole turn stays within three minutes on two cores)."""
FLYWHEEL_RUN = {"field_snapshot": "latest", "teacher": "deployed", "teacher_min_confidence": 0.9,
                "warm_start": True, "epochs": 8, "field_ratio": 0.2,
                "field_slice_fraction": 0.3, "channel": "canary", "deployed_channel": "stable", "field_gate": "beat",
                "tolerance_points": 1.0, "retrain_min_new_labels": 50}
"""The scheduled run's flywheel parameters (pipelines/retraining.py)."""
PROMOTE_WINDOW_S = 5.0
"""How long the canary must serve the new version before it may be promoted (a fleet's would be hours)."""


@dataclass
class FlywheelResult:
    """What the turn measured, by version: accuracy (0..1) on the curated test set, the field slice and live
    traffic, and the largest drift the hub saw."""

    old_version: str
    new_version: str
    promoted: bool
    promote_reason: str
    variant: str = ""
    manifest: Any = None
    old_manifest: Any = None
    figures: dict[str, dict[str, float | None]] = field(default_factory=dict)
    seconds: float = 0.0


class _Fleet:
    """The demo's devices: real edge runtimes in this process, on the demo's event loop thread."""

    def __init__(self, loop: _LoopThread, root: Path, s3: LocalS3, store: Any, hub_port: int,  # noqa: ANN401
                 hub_tokens: dict[str, str], control_token: str) -> None:
        self.loop, self.root, self.s3, self.store = loop, root, s3, store
        self.hub_port, self.hub_tokens, self.control_token = hub_port, hub_tokens, control_token
        self.apps: dict[str, Any] = {}

    def start(self, device: str, channel: str, capture: dict[str, Any] | None) -> None:
        from edge_runtime.app import EdgeApp
        from edge_runtime.settings import EdgeSettings

        desired = self.root / f"desired-{device}.json"
        entry: dict[str, Any] = {"name": MODEL, "version": channel}
        if capture is not None:
            entry["capture"] = capture
        desired.write_text(json.dumps({"models": [entry], "capture": {"shard_max_items": 256,
                                                                       "shard_max_age_s": 1.0}}))
        settings = EdgeSettings(
            desired_file=desired, s3_endpoint_url=self.s3.endpoint_url, s3_bucket=BUCKET,
            verify_key_file=self.root / "keys" / "verify-key.pem", cache_dir=self.root / "devices" / device,
            grpc_port=0, metrics_port=0, hub_address=f"127.0.0.1:{self.hub_port}",
            hub_token=self.hub_tokens[device], device_id=device, telemetry_interval_s=1.0, poll_interval_s=1.0,
            field_stats_rate=1.0, field_stats_min_samples=100, repository_control=True,
            control_token=self.control_token,
        )
        app = EdgeApp(settings, store=self.store)
        self.loop.run(app.start())
        self.apps[device] = app

    def wait_serving(self, device: str, version: str, timeout_s: float = 120.0) -> None:
        """Until ``device`` serves ``version`` (validated on the device)."""
        deadline = time.monotonic() + timeout_s
        app = self.apps[device]
        while time.monotonic() < deadline:
            if app.repository is not None and MODEL in {m["model_name"] for m in app.repository.index()}:
                if app.repository.runtime(MODEL).status().get("serving_version") == version:
                    return
            time.sleep(0.2)
        from edgeloop_core.errors import NotReady

        raise NotReady(f"{device} does not serve {MODEL}/{version} after {timeout_s:.0f}s")

    def address(self, device: str) -> str:
        return f"127.0.0.1:{self.apps[device].grpc_port}"

    def flush(self, timeout_s: float = 30.0) -> None:
        """Every device's captures uploaded and telemetry sent."""
        deadline = time.monotonic() + timeout_s
        for app in self.apps.values():
            app.report("stats", app.stats())
        while time.monotonic() < deadline:
            busy = [d for d, a in self.apps.items() if a.outbox.count() or not _captures_home(a)]
            if not busy:
                return
            time.sleep(0.2)

    def stop(self) -> None:
        for app in self.apps.values():
            self.loop.run(app.stop())
        self.apps.clear()


def _captures_home(app: Any) -> bool:  # noqa: ANN401 - an EdgeApp
    """Whether everything ``app`` captured is uploaded (its spool holds nothing spooled or ready to go)."""
    capture = getattr(app, "capture", None)
    spool = getattr(capture, "spool", None)
    if spool is None:
        return True
    capture.flush()  # what is still gathering for a commit, then every spooled item into a shard
    capture.roll_due(force=True)
    return spool.spooled() == 0 and not spool.ready()


def field_traffic(address: str, x: np.ndarray, y: np.ndarray, *, tag: str, token: str, label_share: float,
                  seed: int) -> float:
    """The app at work: each image in its own request with an id; for ``label_share`` of them it later learns the
    right answer and sends it to the device (the Label RPC). Returns the accuracy of what it was answered."""
    import grpc

    from edge_runtime.report.capture.client import send_label
    from edgeloop_core.protos import inference_pb2 as pb
    from edgeloop_core.protos import inference_pb2_grpc

    rng = np.random.default_rng(seed)
    correct = 0
    labelled: list[tuple[str, int]] = []
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        for i in range(len(x)):
            request = pb.ModelInferRequest(model_name=MODEL, id=f"{tag}-{i}")
            request.inputs.add(name="input", datatype="FP32", shape=[1, *x.shape[1:]])
            request.raw_input_contents.append(np.ascontiguousarray(x[i : i + 1], dtype=np.float32).tobytes())
            reply = stub.ModelInfer(request, timeout=30)
            top1 = int(np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).argmax())
            correct += top1 == int(y[i])
            if rng.random() < label_share:
                labelled.append((request.id, int(y[i])))
    for request_id, label in labelled:
        send_label(address, MODEL, request_id, str(label), source="app", token=token)
    return correct / max(len(x), 1)


def _drift(reader: str, hub_port: int, loop: _LoopThread, devices: tuple[str, ...]) -> float | None:
    """The largest Jensen–Shannon distance the hub holds for ``devices`` (None: none reported yet)."""
    from telemetry_hub.server import fleet_status

    rows = loop.run(fleet_status(f"127.0.0.1:{hub_port}", reader))
    values = [json.loads(r.drift_json).get("max", 0.0) for r in rows
              if r.device_id in devices and r.model_name == MODEL and r.drift_json]
    return max(values) if values else None


def run_flywheel(workdir: str | Path = ".demo-flywheel", *, seed: int = 0) -> FlywheelResult:
    """One turn of the flywheel (the module's docstring); stops every server even when a step fails."""
    from components.publish import move_channel
    from pipelines.cli import console, print_result
    from pipelines.local_run import run_local
    from telemetry_hub.server import HubSettings, start_hub

    root = Path(workdir).resolve()
    keys = root / "keys"
    if not (keys / "signing-key.pem").exists():
        generate_signing_key(keys)
    started = time.monotonic()
    loop = _LoopThread()
    hub = fleet = None
    devices = (*STABLE_DEVICES, CANARY_DEVICE)
    with LocalS3(root / "s3") as s3:
        try:
            store = s3.store(BUCKET)
            os.environ.update(s3.env())
            os.environ["EDGELOOP_SIGNING_KEY_FILE"] = str(keys / "signing-key.pem")
            common = {"model_name": MODEL, "bucket": BUCKET, "s3_endpoint": s3.endpoint_url, "seed": seed}
            console.print(f"[bold]1.[/bold] SeaweedFS on {s3.endpoint_url}; version 1 of {MODEL} from the curated "
                          "digits (handwriting) through kfp.local")
            first = run_local({**common, **FIRST_RUN, "channel": "stable", "force_retrain": True},
                              runs_dir=root / "runs")
            print_result(first)
            assert first.version is not None
            old = first.version
            for channel in ("stable", "canary"):  # both rings capture (the Label RPC needs a policy)
                move_channel(store, ArtifactLayout(), MODEL, channel, old, load_signing_key(keys / "signing-key.pem"),
                             capture=CapturePolicy.model_validate(CAPTURE_POLICY))

            tokens = {d: secrets.token_hex(16) for d in devices}
            reader, control = secrets.token_hex(16), secrets.token_hex(16)
            hub, hub_port, _ = loop.run(start_hub(HubSettings(
                database_url=f"sqlite:///{root / 'hub.sqlite'}", port=0, read_tokens=reader,
                tokens=",".join(f"{d}:{t}" for d, t in tokens.items()))))
            fleet = _Fleet(loop, root, s3, store, hub_port, tokens, control)
            for device in STABLE_DEVICES:
                fleet.start(device, "stable", None)  # the capture policy comes with the signed stable pointer
            fleet.start(CANARY_DEVICE, "canary", None)
            for device in devices:
                fleet.wait_serving(device, old)
            console.print(f"[bold]2.[/bold] hub on 127.0.0.1:{hub_port}; {len(STABLE_DEVICES)} devices on stable "
                          f"(capturing: {CAPTURE_POLICY}), {CANARY_DEVICE} on canary; all serve {old}")

            live_before = []
            for n, device in enumerate(STABLE_DEVICES):
                x, y = typeset_digits(FIELD_REQUESTS, seed=seed * 100 + n + 1)
                live_before.append(field_traffic(fleet.address(device), x, y, tag=f"{device}-a", token=control,
                                                 label_share=LABEL_SHARE, seed=n))
            fleet.flush()
            drift_before = _drift(reader, hub_port, loop, STABLE_DEVICES)
            console.print(f"[bold]3.[/bold] the field: {FIELD_REQUESTS} typeset digits per stable device, "
                          f"{LABEL_SHARE:.0%} confirmed by the app; live accuracy "
                          f"{np.mean(live_before) * 100:.1f}%, drift {_fmt(drift_before)}")

            console.print("[bold]4.[/bold] the scheduled run: snapshot → teacher labels → warm start → two-slice "
                          "gate → publish to canary")
            second = run_local({**common, **FLYWHEEL_RUN}, runs_dir=root / "runs")
            print_result(second)
            assert second.version is not None
            new = second.version

            fleet.wait_serving(CANARY_DEVICE, new)
            x, y = typeset_digits(FIELD_REQUESTS // 2, seed=seed * 100 + 50)
            field_traffic(fleet.address(CANARY_DEVICE), x, y, tag=f"{CANARY_DEVICE}-b", token=control,
                          label_share=LABEL_SHARE, seed=50)
            fleet.flush()
            promoted, reason = _promote(store, reader, hub_port, root)
            console.print(f"[bold]5.[/bold] {CANARY_DEVICE} validated and serves {new}; promote: {reason}")
            live_after: list[float] = []
            drift_after = None
            if promoted:
                for device in STABLE_DEVICES:
                    fleet.wait_serving(device, new)
                for n, device in enumerate(STABLE_DEVICES):
                    x, y = typeset_digits(FIELD_REQUESTS, seed=seed * 100 + n + 11)
                    live_after.append(field_traffic(fleet.address(device), x, y, tag=f"{device}-c", token=control,
                                                    label_share=0.0, seed=n))
                fleet.flush()
                drift_after = _drift(reader, hub_port, loop, STABLE_DEVICES)
            variant = fleet.apps[CANARY_DEVICE].repository.runtime(MODEL).status()["variant"]
            result = FlywheelResult(old, new, promoted, reason, variant=variant, manifest=second.manifest,
                                    old_manifest=first.manifest)
            result.figures = _figures(second, tuple(dict.fromkeys(("fp32-dense", variant))), live_before,
                                      live_after, drift_before, drift_after)
            console.print(_table(result))
        finally:  # the devices and the hub stop before S3 does
            if fleet is not None:
                fleet.stop()
            if hub is not None:
                loop.run(hub.stop(0))
            loop.close()
    result.seconds = time.monotonic() - started
    console.print(f"done in {result.seconds:.0f}s; everything stopped.")
    return result


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value * 100:.1f}%" if percent else f"{value:.3f}"


def _promote(store: Any, reader: str, hub_port: int, root: Path) -> tuple[bool, str]:  # noqa: ANN401
    """``edgeloop fleet promote`` canary → stable, with a window that fits a demo (:data:`PROMOTE_WINDOW_S`): asked
    again while the canary's only fault is that its window has not passed yet."""
    from components.promote import PromoteRules, promote

    deadline = time.monotonic() + PROMOTE_WINDOW_S + 30
    while True:
        result = promote(store, ArtifactLayout(), MODEL, hub_address=f"127.0.0.1:{hub_port}", hub_token=reader,
                         signing_key=load_signing_key(root / "keys" / "signing-key.pem"), source="canary",
                         target="stable", rules=PromoteRules(window_s=PROMOTE_WINDOW_S, min_feedback=20))
        if result.promoted or "window" not in result.reason or time.monotonic() > deadline:
            return result.promoted, result.reason
        time.sleep(1.0)


def _figures(run: Any, variants: tuple[str, ...], live_before: list[float], live_after: list[float],  # noqa: ANN401
             drift_before: float | None, drift_after: float | None) -> dict[str, dict[str, float | None]]:
    """Old (deployed) and new version's figures for each of ``variants`` (``old/<variant>``, ``new/<variant>``), from
    the run's two-slice evaluation, and the field's live accuracy and drift (``old``, ``new``)."""
    evaluation = run.evaluation()

    def overall(part: Any) -> float | None:  # noqa: ANN401
        return None if part is None else float(part.overall)

    figures: dict[str, dict[str, float | None]] = {
        "old": {"live": float(np.mean(live_before)) if live_before else None, "drift": drift_before},
        "new": {"live": float(np.mean(live_after)) if live_after else None, "drift": drift_after},
    }
    for variant in variants:
        compared = next(c for c in evaluation.comparisons if c.name == variant)
        figures[f"old/{variant}"] = {"curated": overall(compared.deployed_curated),
                                     "field_slice": overall(compared.deployed_field)}
        figures[f"new/{variant}"] = {"curated": overall(compared.curated), "field_slice": overall(compared.field)}
    return figures


def _table(result: FlywheelResult) -> Table:
    table = Table(title=f"{MODEL}: one turn of the flywheel (curated test set: handwriting; field: typeset digits)")
    for column in ("version", "", "variant", "curated test %", "field slice %", "live field %", "drift (JS max)"):
        table.add_column(column, justify="right")
    variants = ["fp32-dense"] + ([result.variant] if result.variant != "fp32-dense" else [])
    for key, version, role in (("old", result.old_version, "before"), ("new", result.new_version, "after")):
        for n, variant in enumerate(variants):
            f = result.figures[f"{key}/{variant}"]
            live = result.figures[key] if n == len(variants) - 1 else {"live": None, "drift": None}
            table.add_row(version if n == 0 else "", role if n == 0 else "",
                          variant + (" (trained)" if variant == "fp32-dense" else " (served)"),
                          _fmt(f["curated"], True), _fmt(f["field_slice"], True), _fmt(live["live"], True),
                          _fmt(live["drift"]))
    return table
