"""The canary ring: `edgeloop fleet promote` (components.promote) against a real hub fed by the device's own outbox
and sender, and real channel pointers in a real SeaweedFS. A canary whose devices validated it, served it for the
window and whose drift and feedback accuracy are no worse than stable's is promoted (stable's pointer names it,
signed); worse drift, worse feedback accuracy, a failed validation on a canary device, or a canary inside its window
each leave stable where it was and say why in one line."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import pytest
from rich.console import Console
from typer.testing import CliRunner

from components.promote import PromoteRules, promote
from components.publish import move_channel, publish_version
from edge_runtime.report.telemetry import Outbox, TelemetrySender
from edgeloop_core.contract import ArtifactLayout
from edgeloop_core.published import read_channel
from telemetry_hub.cli import fleet_table
from telemetry_hub.server import HubSettings, fleet_status, start_hub
from telemetry_hub.store import HubStore
from tests.conftest import make_staged_version

DEVICES = ("canary-1", "canary-2", "stable-1", "stable-2")
LAYOUT = ArtifactLayout("")


class Hub:
    """A real hub on a loop of its own (promote runs its own asyncio.run, as the CLI does)."""

    def __init__(self, tmp_path, store: HubStore | None = None) -> None:
        self.tmp_path = tmp_path
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        settings = HubSettings(database_url=f"sqlite:///{tmp_path / 'hub.sqlite'}", port=0, read_tokens="reader",
                               tokens=",".join(f"{d}:t-{d}" for d in DEVICES))
        self.server, port, self.store = self.run(start_hub(settings, store))
        self.address = f"127.0.0.1:{port}"

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def report(self, device: str, events: list[tuple[str, dict]]) -> None:
        """Send ``events`` as the device does: its outbox (stamped now), its sender."""
        outbox = Outbox(self.tmp_path / f"{device}-{uuid.uuid4().hex[:6]}.sqlite", device)
        for kind, payload in events:
            outbox.add(kind, payload)

        async def send() -> int:
            sender = TelemetrySender(outbox, self.address, f"t-{device}")
            try:
                return await sender.flush()
            finally:
                await sender.close()

        assert self.run(send()) == len(events)
        outbox.close()

    def close(self) -> None:
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """One hub for the module (each test its own model names)."""
    running = Hub(tmp_path_factory.mktemp("hub"))
    yield running
    running.close()


def published(store, signing_key, tmp_path, model: str) -> tuple[str, str]:
    """Two signed versions of ``model``: stable → v1, canary → v2."""
    for version in ("v1", "v2"):
        staging = tmp_path / f"{model}-{version}"
        publish_version(store, make_staged_version(staging, model, version), staging, signing_key, layout=LAYOUT)
    move_channel(store, LAYOUT, model, "stable", "v1", signing_key)
    move_channel(store, LAYOUT, model, "canary", "v2", signing_key)
    return "v1", "v2"


def validated(model: str, version: str, passed: bool = True) -> tuple[str, dict]:
    return "validated", {"model_name": model, "version": version, "passed": passed, "metric": "top1_accuracy",
                         "value": 0.99 if passed else 0.41, "reference": 0.99, "tolerance": 0.01}


def serving(model: str, version: str) -> tuple[str, dict]:
    return "serving", {"model_name": model, "version": version, "target_key": "ort1.31-cpu-x86_64-int8",
                       "validation": validated(model, version)[1]}


def stats(model: str, version: str, class_counts: list[int], labels: int = 0, correct: int = 0) -> tuple[str, dict]:
    """A stats event with field statistics (a two-class histogram against an even baseline: [50, 50] is no drift,
    [100, 0] a lot) and feedback counts of ``version``."""
    field = {"samples": sum(class_counts), "version": version, "counts": {"class": class_counts},
             "baseline": {"class": [0.5, 0.5]}}
    if labels:
        field["feedback"] = {version: {"labels": labels, "known": labels, "correct": correct}}
    return "stats", {"models": [{"model_name": model, "state": "serving", "serving_version": version,
                                 "desired_version": version, "requests": 100, "field": field}]}


def fleet_of(hub: Hub, model: str, canary: tuple[list[int], int], stable: tuple[list[int], int],
             stable_version: str = "v1", canary_version: str = "v2") -> None:
    """Two canary devices and two stable ones, each with drift counts and 50 feedback labels (``correct`` right)."""
    for device, (counts, correct), version in (("canary-1", canary, canary_version), ("canary-2", canary,
                                                                                     canary_version),
                                               ("stable-1", stable, stable_version),
                                               ("stable-2", stable, stable_version)):
        hub.report(device, [validated(model, version), serving(model, version),
                            stats(model, version, counts, labels=30, correct=correct * 30 // 50),
                            stats(model, version, counts, labels=20, correct=correct * 20 // 50)])


def decide_on(hub: Hub, store, signing_key, model: str, **rules):
    return promote(store, LAYOUT, model, hub_address=hub.address, hub_token="reader", signing_key=signing_key,
                   rules=PromoteRules(**{"window_s": 0, **rules}))


@pytest.mark.integration
def test_a_canary_no_worse_in_the_field_is_promoted_and_stable_is_signed_to_it(store, signing_key, verify_key,
                                                                               key_dir, s3_env, hub, tmp_path,
                                                                               monkeypatch):
    from edgeloop.cli import app

    published(store, signing_key, tmp_path, "digits")
    fleet_of(hub, "digits", canary=([52, 48], 47), stable=([50, 50], 46))
    rows = {r.device_id: r for r in hub.run(fleet_status(hub.address, "reader", model_name="digits"))}
    assert rows["canary-1"].feedback_known == 50 and rows["canary-1"].feedback_correct == 28 + 18  # summed deltas
    assert 0 < rows["canary-1"].serving_since_ms <= rows["canary-1"].last_seen_ms
    console = Console(width=400, record=True)
    console.print(fleet_table(list(rows.values())))
    shown = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if "-1 " in line}
    assert "92.0% of 50" in shown["canary-1"] and "90.0% of 50" in shown["stable-1"]  # the feedback column
    monkeypatch.setenv("EDGELOOP_SIGNING_KEY_FILE", str(key_dir / "signing-key.pem"))
    said = CliRunner().invoke(app, ["fleet", "promote", "--model", "digits", "--window", "0", "--hub", hub.address,
                                    "--token", "reader", "--bucket", store.bucket])
    assert said.exit_code == 0, said.output
    assert said.output == ("promoted digits v2 from canary to stable (was v1): 2 device(s) validated it and served "
                           "it for >= 0 s; drift 0.02 vs stable's 0.00; feedback accuracy 92.0% vs stable's 90.0%\n")
    pointer = read_channel(store, LAYOUT, "digits", "stable", verify_key)  # signature, expiry checked
    assert pointer.version == "v2"
    again = decide_on(hub, store, signing_key, "digits")
    assert not again.promoted and again.line() == "not promoted: stable already points at canary's version v2"


@pytest.mark.integration
@pytest.mark.parametrize(("case", "canary", "rules", "expected"), ids=["drift", "feedback", "window"], argvalues=[
    ("drift", ([100, 0], 46), {}, "not promoted: canary v2 drift 0.56 > stable's 0.00 + 0.05 on 2 device(s)"),
    ("feedback", ([50, 50], 30), {},
     "not promoted: canary v2 feedback accuracy 60.0% < stable's 90.0% - 1 points (100 and 100 labels)"),
    ("window", ([50, 50], 46), {"window_s": 600}, "not promoted: canary v2 has served for 0 s at most, on 2 "
                                                  "device(s); 1 must have served it for the window of 600 s"),
])
def test_a_canary_worse_in_the_field_or_inside_its_window_stays_and_says_why(store, signing_key, hub, tmp_path,
                                                                           case, canary, rules, expected):
    model = f"digits-{case}"
    published(store, signing_key, tmp_path, model)
    fleet_of(hub, model, canary=canary, stable=([50, 50], 46))
    result = decide_on(hub, store, signing_key, model, **rules)
    assert not result.promoted
    assert result.line() == expected
    assert read_channel(store, LAYOUT, model, "stable", signing_key.public_key()).version == "v1"


@pytest.mark.integration
def test_a_canary_that_failed_validation_on_one_device_is_not_promoted(store, signing_key, hub, tmp_path):
    published(store, signing_key, tmp_path, "kws")
    fleet_of(hub, "kws", canary=([50, 50], 48), stable=([50, 50], 46))
    hub.report("stable-2", [validated("kws", "v2", passed=False),  # tried the canary, kept serving v1
                            ("failed", {"model_name": "kws", "version": "v2", "error": "validation failed"})])
    result = decide_on(hub, store, signing_key, "kws")
    assert not result.promoted
    assert result.line() == ("not promoted: canary v2 failed validation on 1 device(s): stable-2 (failed "
                             "top1_accuracy 0.4100 (ref 0.9900 ± 0.0100))")
    assert read_channel(store, LAYOUT, "kws", "stable", signing_key.public_key()).version == "v1"


@pytest.mark.integration
def test_the_cli_says_one_line_and_exits_1_when_refused_and_2_for_bad_input(store, signing_key, key_dir, s3_env,
                                                                          hub, tmp_path, monkeypatch):
    from components.steps import promote as promote_step
    from edgeloop.cli import app

    published(store, signing_key, tmp_path, "digits-cli")
    fleet_of(hub, "digits-cli", canary=([50, 50], 46), stable=([50, 50], 46))
    monkeypatch.setenv("EDGELOOP_SIGNING_KEY_FILE", str(key_dir / "signing-key.pem"))
    base = ["fleet", "promote", "--model", "digits-cli", "--hub", hub.address, "--token", "reader",
            "--bucket", store.bucket]
    said = CliRunner().invoke(app, base)  # the default window: 600 s
    assert said.exit_code == 1 and said.output.count("\n") == 1 and said.output.startswith("not promoted: canary v2")
    for bad, words in ((["--window", "-1"], "--window -1 must be 0 or more seconds"),
                       (["--to", "canary"], "--from and --to are both 'canary'"),
                       (["--model", "../x"], "--model")):
        said = CliRunner().invoke(app, [*base, *bad])
        assert said.exit_code == 2 and said.output.count("\n") == 1 and words in said.output, said.output
    # the pipeline's step: refused is "" (a scheduled run goes on), promoted is the version
    monkeypatch.setenv("HUB_READ_TOKEN", "reader")
    step = dict(model_name="digits-cli", bucket=store.bucket, prefix="", s3_endpoint=s3_env.endpoint_url,
                hub_address=hub.address, promote_from="canary", promote_to="stable", min_devices=1,
                drift_margin=0.05, accuracy_margin_points=1.0, min_feedback=20)
    assert promote_step.python_func(**step, window_s=600.0) == ""
    assert promote_step.python_func(**step, window_s=0.0) == "v2"
    assert read_channel(store, LAYOUT, "digits-cli", "stable", signing_key.public_key()).version == "v2"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_hub_keeps_serving_since_and_the_serving_versions_feedback(backend, tmp_path, request):
    """serving_since_ms stays while the version does and moves with it; feedback of one version adds up over stats
    events (in one transaction and across them) and starts anew with the next version."""
    from telemetry_hub.store import IncomingEvent

    store = (HubStore(f"sqlite:///{tmp_path / 'hub.sqlite'}") if backend == "sqlite"
             else request.getfixturevalue("own_schema_store"))

    def event(n: int, kind: str, payload: dict, ts: int) -> IncomingEvent:
        return IncomingEvent(f"e{n}", kind, ts, json.dumps(payload))

    now = int(time.time() * 1000)
    store.ingest("d", [event(1, *serving("m", "v1"), now - 5000),
                       event(2, *stats("m", "v1", [1, 1], 10, 9), now - 4000),
                       event(3, *stats("m", "v1", [1, 1], 5, 5), now - 3000)])
    store.ingest("d", [event(4, *stats("m", "v1", [1, 1], 5, 1), now - 2000)])
    row = store.fleet(model_name="m")[0]
    assert (row["serving_since_ms"], row["feedback_version"], row["feedback_known"], row["feedback_correct"]) == \
        (now - 5000, "v1", 20, 15)
    store.ingest("d", [event(5, *serving("m", "v2"), now - 1000), event(6, *stats("m", "v2", [1, 1], 4, 4), now)])
    row = store.fleet(model_name="m")[0]
    assert (row["serving_since_ms"], row["feedback_version"], row["feedback_labels"], row["feedback_correct"]) == \
        (now - 1000, "v2", 4, 4)
    store.ingest("d", [event(7, *stats("m", "v2", [1, 1]), now + 1000)])  # same version: since stays
    assert store.fleet(model_name="m")[0]["serving_since_ms"] == now - 1000
