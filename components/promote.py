"""The canary ring's last step: move a channel (``stable``) to the version another channel (``canary``) names, only
when the devices that serve the canary say it is no worse in the field (docs/flywheel.md, "Canary ring").

The rules (:class:`PromoteRules`): at least ``min_devices`` devices serve the canary version with its on-device
validation passed, and no device failed it; they have served it for at least ``window_s`` (the hub's
``serving_since_ms``); their drift (the mean of each device's largest Jensen-Shannon distance, measured on the
canary version) is at most the stable devices' + ``drift_margin``; and where both rings have at least
``min_feedback`` feedback labels (apps' ground truth through the device's Label RPC), the canary's accuracy is at
least the stable ring's − ``accuracy_margin_points``. A signal one ring lacks is not compared (and the result says
so). The decision (:func:`decide`) is a pure function of the hub's rows; :func:`promote` reads the channels (the
canary's pointer and manifest signature-checked), the fleet (a reader token), decides, and moves the channel with a
newly signed pointer or says why not in one line. ``edgeloop fleet promote`` and the pipeline's ``promote`` step
call :func:`promote`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeloop_core.contract import ArtifactLayout, check_name
from edgeloop_core.errors import ConfigError, ObjectNotFound

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from edgeloop_core.protos.telemetry_pb2 import DeviceStatus
    from edgeloop_core.store import ObjectStore
    from edgeloop_core.tls import HubTls


@dataclass(frozen=True)
class PromoteRules:
    """When a canary may replace stable (see the module docstring); checked by :meth:`check`."""

    window_s: float = 600.0
    """Seconds every counted canary device must have served the canary version."""
    min_devices: int = 1
    """Devices that must serve the canary, validated and past the window."""
    drift_margin: float = 0.05
    """How much higher (Jensen-Shannon distance, 0..1) the canary ring's mean drift may be than the stable ring's."""
    accuracy_margin_points: float = 1.0
    """How many points lower the canary ring's feedback accuracy may be than the stable ring's."""
    min_feedback: int = 20
    """Feedback labels (of known requests) each ring needs before accuracies are compared."""

    def check(self) -> PromoteRules:
        """``self``, or :class:`ConfigError` naming the first rule that cannot work."""
        if not 0 <= self.window_s < 10 * 365 * 86_400:
            raise ConfigError(f"--window {self.window_s:g} must be 0 or more seconds")
        if self.min_devices < 1:
            raise ConfigError(f"--min-devices {self.min_devices} must be at least 1")
        if not 0 <= self.drift_margin <= 1:
            raise ConfigError(f"--drift-margin {self.drift_margin:g} must be between 0 and 1")
        if not 0 <= self.accuracy_margin_points <= 100:
            raise ConfigError(f"--accuracy-margin-points {self.accuracy_margin_points:g} must be between 0 and 100")
        if self.min_feedback < 1:
            raise ConfigError(f"--min-feedback {self.min_feedback} must be at least 1")
        return self


@dataclass(frozen=True)
class RingSignals:
    """What one ring's devices say about the version they serve."""

    devices: int = 0
    """Devices counted (the canary's: validated and past the window)."""
    drift: float | None = None
    """Mean of each device's largest Jensen-Shannon distance measured on this version; ``None``: none measured."""
    drift_devices: int = 0
    known: int = 0
    """Feedback labels whose request the devices still knew (summed)."""
    correct: int = 0

    @property
    def accuracy(self) -> float | None:
        """Share of known feedback labels the served top-1 got right; ``None`` without any."""
        return self.correct / self.known if self.known else None


@dataclass(frozen=True)
class PromoteResult:
    """What :func:`promote` decided; :meth:`line` says it in one line."""

    promoted: bool
    model: str
    source: str
    target: str
    version: str
    """The source channel's version (the canary)."""
    previous: str
    """The target channel's version before (empty: it had none)."""
    reason: str
    """Why not (refused), or what was compared (promoted)."""
    canary: RingSignals = RingSignals()
    stable: RingSignals = RingSignals()

    def line(self) -> str:
        """``promoted …`` or ``not promoted: …``."""
        if not self.promoted:
            return f"not promoted: {self.reason}"
        was = f" (was {self.previous})" if self.previous else ""
        return f"promoted {self.model} {self.version} from {self.source} to {self.target}{was}: {self.reason}"


def _drift_of(device: DeviceStatus, version: str) -> float | None:
    """The device's largest drift if it was measured on ``version`` (older figures are another version's)."""
    if not device.drift_json:
        return None
    try:
        drift = json.loads(device.drift_json)
    except ValueError:
        return None
    value = drift.get("max") if isinstance(drift, dict) and drift.get("version") == version else None
    return float(value) if isinstance(value, int | float) else None


def ring_signals(devices: Sequence[DeviceStatus], version: str) -> RingSignals:
    """Drift and feedback of ``devices`` (each serving ``version``)."""
    drifts = [d for d in (_drift_of(device, version) for device in devices) if d is not None]
    return RingSignals(devices=len(devices), drift=sum(drifts) / len(drifts) if drifts else None,
                       drift_devices=len(drifts), known=sum(d.feedback_known for d in devices),
                       correct=sum(d.feedback_correct for d in devices))


def _names(devices: Sequence[DeviceStatus]) -> str:
    shown = ", ".join(d.device_id for d in devices[:3])
    return shown + (f" and {len(devices) - 3} more" if len(devices) > 3 else "")


def _canary_ring(devices: Sequence[DeviceStatus], canary: str, rules: PromoteRules, now_ms: int,
                 ) -> tuple[list[DeviceStatus], str]:
    """The canary devices that count (validated, serving, past the window), or the reason they do not suffice."""
    failed = [d for d in devices if d.desired_version == canary and d.serving_version != canary
              and (d.state == "failed" or d.validation_result.startswith("failed"))]
    if failed:
        return [], (f"canary {canary} failed validation on {len(failed)} device(s): {_names(failed)} "
                    f"({failed[0].validation_result or failed[0].state})")
    passed = [d for d in devices if d.serving_version == canary and d.validation_result.startswith("passed")]
    if len(passed) < rules.min_devices:
        return [], (f"canary {canary} is validated and serving on {len(passed)} device(s), fewer than "
                    f"--min-devices {rules.min_devices}")
    window_ms = rules.window_s * 1000
    ripe = [d for d in passed if d.serving_since_ms and now_ms - d.serving_since_ms >= window_ms]
    if len(ripe) < rules.min_devices:
        longest = max((now_ms - d.serving_since_ms for d in passed if d.serving_since_ms), default=0) / 1000
        return [], (f"canary {canary} has served for {max(longest, 0):.0f} s at most, on {len(passed)} device(s); "
                    f"{rules.min_devices} must have served it for the window of {rules.window_s:g} s")
    return ripe, ""


def _compare(canary: str, ring: RingSignals, stable: RingSignals, rules: PromoteRules) -> tuple[str, list[str]]:
    """``(refusal or "", what was compared)`` for drift and feedback accuracy."""
    said: list[str] = []
    if ring.drift is not None and stable.drift is not None:
        if ring.drift > stable.drift + rules.drift_margin:
            return (f"canary {canary} drift {ring.drift:.2f} > stable's {stable.drift:.2f} + {rules.drift_margin:g} "
                    f"on {ring.drift_devices} device(s)"), said
        said.append(f"drift {ring.drift:.2f} vs stable's {stable.drift:.2f}")
    else:
        said.append("drift not compared (" + ("no stable devices' figures" if ring.drift is not None
                                             else "no canary figures") + ")")
    if ring.known >= rules.min_feedback and stable.known >= rules.min_feedback:
        assert ring.accuracy is not None and stable.accuracy is not None
        if 100 * ring.accuracy < 100 * stable.accuracy - rules.accuracy_margin_points:
            return (f"canary {canary} feedback accuracy {100 * ring.accuracy:.1f}% < stable's "
                    f"{100 * stable.accuracy:.1f}% - {rules.accuracy_margin_points:g} points ({ring.known} and "
                    f"{stable.known} labels)"), said
        said.append(f"feedback accuracy {100 * ring.accuracy:.1f}% vs stable's {100 * stable.accuracy:.1f}%")
    else:
        said.append(f"feedback accuracy not compared ({ring.known} and {stable.known} labels, "
                    f"--min-feedback {rules.min_feedback})")
    return "", said


def decide(devices: Sequence[DeviceStatus], canary: str, stable: str, rules: PromoteRules,
           now_ms: int) -> tuple[str, str, RingSignals, RingSignals]:
    """The rules over the hub's rows of one model: ``(refusal or "", what was compared, canary ring, stable ring)``.
    ``stable`` empty: the target channel has no version yet (nothing to compare with)."""
    ripe, refusal = _canary_ring(devices, canary, rules, now_ms)
    if refusal:
        return refusal, "", RingSignals(), RingSignals()
    ring = ring_signals(ripe, canary)
    others = ring_signals([d for d in devices if stable and d.serving_version == stable], stable)
    refusal, said = _compare(canary, ring, others, rules)
    head = f"{ring.devices} device(s) validated it and served it for >= {rules.window_s:g} s"
    return refusal, "; ".join([head, *said]), ring, others


def read_fleet(hub_address: str, hub_token: str, model: str, tls: HubTls | None = None) -> list[DeviceStatus]:
    """Every device row of ``model`` from the hub (a reader token), page by page."""
    import asyncio

    from telemetry_hub.server import fleet_status

    return asyncio.run(fleet_status(hub_address, hub_token, tls, model_name=model))


def promote(store: ObjectStore, layout: ArtifactLayout, model: str, *, hub_address: str, hub_token: str,
            signing_key: Ed25519PrivateKey, source: str = "canary", target: str = "stable",
            rules: PromoteRules | None = None, tls: HubTls | None = None,
            trusted: Iterable[Ed25519PublicKey] = (), now_ms: int | None = None) -> PromoteResult:
    """Move ``model``'s ``target`` channel to ``source``'s version when the rules allow (a pointer signed with
    ``signing_key``, then read back and verified); else leave it and say why. The source pointer and the version's
    manifest must carry a signature of ``signing_key`` or a ``trusted`` key. Bad arguments: :class:`ConfigError`."""
    from components.publish import move_channel
    from edgeloop_core.published import read_channel, read_manifest

    rules = (rules or PromoteRules()).check()
    check_name(model, "--model")
    check_name(source, "--from")
    check_name(target, "--to")
    if source == target:
        raise ConfigError(f"--from and --to are both {source!r}: promote from one channel to another")
    keys = [signing_key.public_key(), *trusted]
    refused = {"promoted": False, "model": model, "source": source, "target": target}
    try:
        canary = read_channel(store, layout, model, source, keys).version
    except ObjectNotFound:
        return PromoteResult(**refused, version="", previous="",
                             reason=f"{model} has no {source!r} channel yet: publish a version to it first")
    try:
        stable = read_channel(store, layout, model, target, None).version  # only its version: it is re-signed
    except ObjectNotFound:
        stable = ""
    refused |= {"version": canary, "previous": stable}
    if canary == stable:
        return PromoteResult(**refused, reason=f"{target} already points at {source}'s version {canary}")
    read_manifest(store, layout, model, canary, keys)  # a signed, complete version before anything moves
    devices = read_fleet(hub_address, hub_token, model, tls)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    refusal, said, ring, others = decide(devices, canary, stable, rules, now_ms)
    if refusal:
        return PromoteResult(**refused, reason=refusal, canary=ring, stable=others)
    move_channel(store, layout, model, target, canary, signing_key)
    moved = read_channel(store, layout, model, target, keys)
    if moved.version != canary:  # someone moved it meanwhile: theirs stands
        return PromoteResult(**refused, reason=f"{target} moved to {moved.version} meanwhile", canary=ring,
                             stable=others)
    return PromoteResult(**{**refused, "promoted": True}, reason=said, canary=ring, stable=others)


def promote_from_env(*, model_name: str, bucket: str, prefix: str, s3_endpoint: str, hub_address: str,
                     source: str, target: str, rules: PromoteRules) -> PromoteResult:
    """The pipeline's promote step: :func:`promote` with the publish step's signing key
    (``EDGELOOP_SIGNING_KEY[_FILE]``), the hub's reader token from ``HUB_READ_TOKEN`` (TLS with the CA in
    ``EDGELOOP_HUB_CA_FILE`` when set) and S3 credentials from boto3's usual chain."""
    import os
    from pathlib import Path

    from edgeloop_core.contract import load_signing_key
    from edgeloop_core.store import ObjectStore
    from edgeloop_core.tls import HubTls

    token = os.environ.get("HUB_READ_TOKEN", "")
    if not hub_address or not token:
        raise ConfigError("promote needs the hub: set hub_address and HUB_READ_TOKEN (a reader token)")
    ca = os.environ.get("EDGELOOP_HUB_CA_FILE")
    store = ObjectStore(bucket, endpoint_url=s3_endpoint or None)
    return promote(store, ArtifactLayout(prefix), model_name, hub_address=hub_address, hub_token=token,
                   signing_key=load_signing_key(), source=source, target=target, rules=rules,
                   tls=HubTls(Path(ca)) if ca else None)


def summary(result: PromoteResult) -> dict[str, Any]:
    """The result as JSON-ready figures (for the pipeline's metrics)."""
    return {"promoted": result.promoted, "version": result.version, "previous": result.previous,
            "canary_devices": result.canary.devices, "canary_drift": result.canary.drift,
            "stable_drift": result.stable.drift, "canary_accuracy": result.canary.accuracy,
            "stable_accuracy": result.stable.accuracy}
