"""One model's life on the device: desired → fetch → build → validate → serve (atomic swap) → report.

A failure at any step keeps the last good version serving, is reported, and is retried with back-off. The loop
re-reads the desired version (the settings file that Helm mounts, and the channel pointer) every poll interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.cache import ArtifactCache
from edge_runtime.choice import (
    VariantChoice,
    VariantFigures,
    choose_fastest,
    load_choice,
    save_choice,
    time_variant,
)
from edge_runtime.contract import ArtifactLayout, Manifest, load_verify_key, verify_manifest
from edge_runtime.device import DeviceFacts
from edge_runtime.engines import EnginePlan, build_engine, candidate_variants, plan_for, resolve_backend
from edge_runtime.engines.base import Engine
from edge_runtime.errors import ConfigError, EdgeloopError, ModelNotFound, NotReady, ValidationFailed
from edge_runtime.fetch import read_manifest, resolve_version
from edge_runtime.serve.batching import DynamicBatcher
from edge_runtime.settings import EdgeSettings, read_settings_file
from edge_runtime.store import ObjectStore
from edge_runtime.timing import Timing
from edge_runtime.validate import ValidationResult, read_validation_set, validate

log = logging.getLogger(__name__)

Reporter = Callable[[str, dict[str, Any]], None]
"""``report(kind, payload)``: telemetry events (fetched, built, validated, failed, serving, ...)."""


@dataclass
class ServingModel:
    """A validated model that answers requests."""

    name: str
    version: str
    manifest: Manifest
    plan: EnginePlan
    engine: Engine
    batcher: DynamicBatcher
    validation: ValidationResult


@dataclass
class CycleResult:
    """What one reconcile cycle did."""

    version: str
    changed: bool
    downloaded_bytes: int = 0
    built: bool = False


class ModelRuntime:
    """Holds the serving model and drives the life cycle. All public coroutines run on one event loop."""

    def __init__(self, settings: EdgeSettings, facts: DeviceFacts, *, store: ObjectStore | None = None,
                 report: Reporter | None = None, on_batch: Callable[[int, float], None] | None = None) -> None:
        self.settings = settings
        self.facts = facts
        self.store = store or ObjectStore(settings.s3_bucket, endpoint_url=settings.s3_endpoint_url)
        self.layout = ArtifactLayout(settings.s3_prefix)
        self.cache = ArtifactCache(settings.cache_dir, settings.cache_max_bytes)
        self.trusted = [load_verify_key(settings.verify_key_file)]
        self._report = report or (lambda kind, payload: None)
        self._on_batch = on_batch
        self.serving: ServingModel | None = None
        self.desired: tuple[str, str] = (settings.model_name, settings.model_version)
        self.desired_version: str | None = None
        self.state = "starting"
        self.last_error = ""
        self.last_validation: ValidationResult | None = None
        self.choice: VariantChoice | None = None
        """Which variant serves and why (measured, cached, forced or static)."""
        self._listeners: list[Callable[[], None]] = []
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self.batching: tuple[int, int] = (settings.max_batch_size, settings.max_queue_delay_us)
        """(max batch size, max queue delay µs) the serving batcher uses; tuned per device when configured."""
        self._desired_seen: int | None = None
        self.paused = False
        """Set by an unload request: the loop leaves the model unloaded until a load request."""

    # --- state ---------------------------------------------------------------------------------------------
    def ready(self) -> bool:
        """Readiness: the desired version is validated and serving."""
        return self.serving is not None and self.serving.version == self.desired_version

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every state change (health status, metrics)."""
        self._listeners.append(listener)

    def _set_state(self, state: str, error: str = "") -> None:
        self.state, self.last_error = state, error
        for listener in self._listeners:
            listener()

    def status(self) -> dict[str, Any]:
        """A snapshot for telemetry and the CLI."""
        serving = self.serving
        return {
            "model_name": self.desired[0],
            "desired": self.desired[1],
            "desired_version": self.desired_version,
            "serving_version": serving.version if serving else None,
            "variant": serving.plan.variant.name if serving else None,
            "target_key": str(serving.plan.target_key) if serving else None,
            "state": self.state,
            "ready": self.ready(),
            "error": self.last_error,
            "validation": self.last_validation.summary() if self.last_validation else "",
            "batching": {"max_batch_size": self.batching[0], "max_queue_delay_us": self.batching[1]},
            "variant_choice": ({"chosen": self.choice.chosen, "mode": self.choice.mode, "reason": self.choice.reason}
                               if self.choice else None),
        }

    # --- serving ---------------------------------------------------------------------------------------------
    def model(self, name: str, version: str = "") -> ServingModel:
        """The serving model called ``name`` (and ``version`` when given), or the right error."""
        serving = self.serving
        if name != self.desired[0] and (serving is None or serving.name != name):
            raise ModelNotFound(f"model {name!r} is not served here (this device serves {self.desired[0]!r})")
        if serving is None:
            raise NotReady(f"model {name!r} is not ready yet ({self.state})")
        if version and version != serving.version:
            raise ModelNotFound(f"version {version!r} of {name!r} is not served here (serving {serving.version})")
        return serving

    async def infer(self, name: str, version: str, inputs: dict[str, np.ndarray]) -> tuple[str, dict[str, Any]]:
        """Run a request through the serving model's batcher; returns ``(version, outputs)``."""
        serving = self.model(name, version)
        return serving.version, await serving.batcher.infer(inputs)

    # --- the life cycle ----------------------------------------------------------------------------------------
    def _desired_file_mtime(self) -> int | None:
        path = self.settings.desired_file
        return Path(path).stat().st_mtime_ns if path and Path(path).exists() else None

    def read_desired(self) -> tuple[str, str]:
        """The model name and version/channel from the desired file (when set), else from the settings."""
        name, version = self.settings.model_name, self.settings.model_version
        if self.settings.desired_file is not None and Path(self.settings.desired_file).exists():
            data = read_settings_file(Path(self.settings.desired_file))
            name, version = str(data.get("model_name", name)), str(data.get("model_version", version))
        return name, version

    async def reconcile(self) -> CycleResult:
        """One cycle: bring the serving model to the desired version, or raise and keep the old one."""
        async with self._lock:
            self._desired_seen = self._desired_file_mtime()  # before reading: a later edit wakes the loop again
            self.desired = self.read_desired()
            name, wanted = self.desired
            try:
                version = await asyncio.to_thread(resolve_version, self.store, self.layout, name, wanted)
            except EdgeloopError:
                state = self.cache.load_state()
                if self.serving is not None or not state or state.get("name") != name or state.get("desired") != wanted:
                    raise
                version = state["version"]  # S3 unreachable at start-up: the cache knows what we served last
                log.warning("S3 unreachable; starting from the cached version %s", version)
            self.desired_version = version
            if self.serving is not None and self.serving.version == version and self.serving.name == name:
                self._set_state("serving")
                return CycleResult(version, changed=False)
            try:
                return await self._bring_up(name, version)
            except EdgeloopError as exc:
                self._set_state("failed", str(exc))
                self._report("failed", {"version": version, "error": str(exc)})
                raise

    async def _bring_up(self, name: str, version: str) -> CycleResult:
        started = time.monotonic()
        self._set_state("fetching")
        manifest = self.cache.cached_manifest(name, version)
        if manifest is not None:
            verify_manifest(manifest, self.trusted)
        else:
            manifest = await asyncio.to_thread(read_manifest, self.store, self.layout, name, version, self.trusted)
        plans = self._candidate_plans(manifest)
        cached_choice = None
        if self._measuring(plans):
            cached_choice = load_choice(self._choice_dir(manifest), self._candidate_keys(plans))
            if cached_choice is not None:
                plans = [p for p in plans if p.variant.name == cached_choice.chosen]
        refs = [*(p.variant for p in plans), manifest.validation]
        paths, downloaded = await asyncio.to_thread(self.cache.fetch, self.store, self.layout, manifest, refs,
                                                    attempts=self.settings.fetch_attempts)
        self._report("fetched", {"version": version, "variants": [p.variant.name for p in plans],
                                 "variant": plans[0].variant.name, "bytes": downloaded})

        validation_path = paths[manifest.validation.file]
        candidates: list[tuple[EnginePlan, Engine, ValidationResult, str, float]] = []
        figures: list[VariantFigures] = []
        failures: list[str] = []
        for plan in plans:
            self._set_state("building")
            build_started = time.monotonic()
            try:
                engine, source = await asyncio.to_thread(self._obtain_engine, manifest, plan,
                                                         paths[plan.variant.file])
            except EdgeloopError as exc:
                if len(plans) == 1:
                    raise
                failures.append(f"{plan.variant.name}: {exc}")
                figures.append(VariantFigures(plan.variant.name, str(plan.target_key), False, reason=str(exc)))
                continue
            self._report("built", {"version": version, "variant": plan.variant.name,
                                   "target_key": str(plan.target_key), "built": source == "built", "source": source,
                                   "seconds": round(time.monotonic() - build_started, 3)})
            self._set_state("validating")
            result = await asyncio.to_thread(validate, engine, validation_path, manifest, plan.variant.name,
                                             latency_budget_p99_ms=self.settings.latency_budget_p99_ms)
            self.last_validation = result
            self._report("validated", {"version": version, **result.to_dict()})
            if not result.passed:
                engine.close()
                failures.append(f"{plan.variant.name}: {result.reason}")
                figures.append(VariantFigures(plan.variant.name, str(plan.target_key), False, result.value,
                                              reason=result.reason))
                continue
            if len(plans) > 1:
                b1, batched = await asyncio.to_thread(self._time_variant, engine, validation_path, manifest)
                figure = VariantFigures(plan.variant.name, str(plan.target_key), True, result.value,
                                        self.settings.max_batch_size, b1, batched)
                figures.append(figure)
                # one engine open at a time besides the fastest so far (device memory on a Jetson is shared)
                if candidates and figure.score_ms >= candidates[0][4]:
                    engine.close()
                    continue
                for kept in candidates:
                    kept[1].close()
                candidates = [(plan, engine, result, source, figure.score_ms)]
            else:
                candidates.append((plan, engine, result, source, 0.0))
        if not candidates:
            plan = plans[0]
            raise ValidationFailed(f"{name}/{version} failed validation on this device "
                                   f"({plan.target_key}): {'; '.join(failures)}")

        choice = self._decide(plans, cached_choice, figures)
        plan, engine, result, source, _ = candidates[0]
        assert plan.variant.name == choice.chosen
        self.last_validation, self.choice = result, choice
        if choice.mode == "measured":
            save_choice(self._choice_dir(manifest), self._candidate_keys(plans), choice)
        self._report("variant_choice", {"version": version, "target_key": str(plan.target_key), **choice.to_dict()})

        max_batch, delay_us = self.settings.max_batch_size, self.settings.max_queue_delay_us
        if self.settings.batching_budget_ms is not None:
            choice_b = await asyncio.to_thread(self._tune, engine, validation_path, manifest)
            max_batch, delay_us = choice_b.max_batch_size, choice_b.max_queue_delay_us
        self.batching = (max_batch, delay_us)
        batcher = DynamicBatcher(engine, max_batch_size=max_batch, max_queue_delay_us=delay_us,
                                 on_batch=self._on_batch)
        old, self.serving = self.serving, ServingModel(name, version, manifest, plan, engine, batcher, result)
        self._set_state("serving")
        self._report("serving", {"version": version, "variant": plan.variant.name, "target_key": str(plan.target_key),
                                 "validation": result.to_dict(), "previous": old.version if old else None,
                                 "seconds": round(time.monotonic() - started, 3)})
        self.cache.save_state({"name": name, "desired": self.desired[1], "version": version})
        if old is not None:
            await old.batcher.close()  # requests already queued on the old model finish there
            old.engine.close()
        keep = {(name, version)} | ({(old.name, old.version)} if old else set())
        await asyncio.to_thread(self.cache.evict, keep)
        return CycleResult(version, changed=True, downloaded_bytes=downloaded, built=source == "built")

    # --- which variant ---------------------------------------------------------------------------------------
    def _candidate_plans(self, manifest: Manifest) -> list[EnginePlan]:
        """The forced variant (``variant`` setting), or every variant this backend runs, in preference order."""
        backend, device = resolve_backend(self.facts, self.settings.backend)
        if self.settings.variant is not None:
            names = [v.name for v in manifest.variants]
            if self.settings.variant not in names:
                raise ConfigError(f"variant {self.settings.variant!r} is not in {manifest.name}/{manifest.version} "
                                  f"(has {names})")
            variants = [manifest.variant(self.settings.variant)]
        else:
            variants = candidate_variants(manifest, backend, device)
            if self.settings.variant_choice_budget_s <= 0:
                variants = variants[:1]
        return [plan_for(manifest, self.facts, v, backend=backend, device=device,
                         max_batch_size=self.settings.max_batch_size, opt_batch_size=self.settings.opt_batch_size)
                for v in variants]

    def _measuring(self, plans: list[EnginePlan]) -> bool:
        return self.settings.variant is None and len(plans) > 1

    @staticmethod
    def _candidate_keys(plans: list[EnginePlan]) -> dict[str, str]:
        return {p.variant.name: str(p.target_key) for p in plans}

    def _choice_dir(self, manifest: Manifest) -> Path:
        return self.cache.root / "engines" / manifest.name / manifest.version

    def _decide(self, plans: list[EnginePlan], cached: VariantChoice | None,
                figures: list[VariantFigures]) -> VariantChoice:
        if self.settings.variant is not None:
            return VariantChoice(self.settings.variant, "forced by the variant setting", "forced")
        if cached is not None:
            return cached
        if len(plans) == 1:
            why = ("measuring is off (variant_choice_budget_s = 0): the first compatible variant in preference order"
                   if self.settings.variant_choice_budget_s <= 0 else "the only variant this backend runs")
            return VariantChoice(plans[0].variant.name, why, "static")
        choice = choose_fastest(figures)
        assert choice is not None  # at least one candidate passed, or _bring_up raised
        return choice

    def _time_variant(self, engine: Engine, validation_path: Path, manifest: Manifest) -> tuple[Timing, Timing]:
        inputs, _ = read_validation_set(validation_path, manifest, engine)
        sample = {k: v[:1] for k, v in inputs.items()}
        return time_variant(engine, sample, self.settings.max_batch_size,
                            budget_s=self.settings.variant_choice_budget_s)

    def _tune(self, engine: Engine, validation_path: Path, manifest: Manifest):  # noqa: ANN202 - BatchingChoice
        """Sweep batch sizes on this device and choose the batcher's limits (reported as ``batch_sweep``)."""
        from edge_runtime.tuning import choose, sweep

        inputs, _ = read_validation_set(validation_path, manifest, engine)
        points = sweep(engine, {k: v[:1] for k, v in inputs.items()}, self.settings.max_batch_size)
        assert self.settings.batching_budget_ms is not None
        choice = choose(points, self.settings.batching_budget_ms, self.settings.max_queue_delay_us)
        self._report("batch_sweep", {"version": manifest.version, "points": [p.__dict__ for p in points],
                                     "chosen": choice.to_dict()})
        return choice

    def _obtain_engine(self, manifest: Manifest, plan: EnginePlan, model_path: Path) -> tuple[Engine, str]:
        """The engine for ``plan.target_key``, from the first place that has it: the local cache, a prebuilt
        engine the signed manifest lists, an engine an identical device shared (``share_engines``), or a build
        here (shared back when ``share_engines``). Returns ``(engine, source)``.

        A shared engine is checked against the sha256 its builder recorded (integrity); it is not covered by the
        manifest's signature, which is why sharing is opt-in and why on-device validation still runs after.
        """
        from edge_runtime.cache import download_resumable
        from edge_runtime.contract import EngineRef, sha256_file

        name, version, target = manifest.name, manifest.version, str(plan.target_key)
        engine_path = self.cache.engine_path(name, version, target, plan.engine_file)
        source = "cache"
        prebuilt = manifest.engines.get(target)
        if prebuilt is not None and Path(prebuilt.file).name != plan.engine_file:
            prebuilt = None  # built for another variant of the same precision
        if not engine_path.exists() and prebuilt is not None:
            download_resumable(self.store, self.layout.file_key(name, version, prebuilt.file), engine_path, prebuilt)
            source = "manifest"
        sidecar_key = self.layout.engine_key(name, version, target, plan.record_file)
        if not engine_path.exists() and self.settings.share_engines:
            try:
                ref = EngineRef.model_validate_json(self.store.get_bytes(sidecar_key))
                download_resumable(self.store, self.layout.engine_key(name, version, target, plan.engine_file),
                                   engine_path, ref, attempts=self.settings.fetch_attempts)
                source = "shared"
            except EdgeloopError as exc:
                log.info("no usable shared engine for %s (%s): building", target, exc)
        engine, built = build_engine(plan, model_path, engine_path, max_batch_size=self.settings.max_batch_size)
        if built:
            source = "built"
            if self.settings.share_engines:
                digest, size = sha256_file(engine_path)
                ref = EngineRef(file=f"engines/{target}/{plan.engine_file}", sha256=digest, size_bytes=size,
                                built_by=self.settings.device_id)
                self.store.put_file(self.layout.engine_key(name, version, target, plan.engine_file), engine_path)
                self.store.put_bytes(sidecar_key, ref.model_dump_json().encode(), content_type="application/json")
        return engine, source

    def wake(self) -> None:
        """Run the next cycle now (a changed desired file)."""
        self._wake.set()

    async def load(self, name: str, version: str | None = None) -> CycleResult:
        """Repository extension: serve ``name`` (at ``version`` or channel, default the configured one) now."""
        if name != self.settings.model_name:
            raise ModelNotFound(f"model {name!r} is not configured on this device ({self.settings.model_name!r} is)")
        if version:
            self.settings = self.settings.model_copy(update={"model_version": version})
        self.paused = False
        return await self.reconcile()

    async def run_forever(self) -> None:
        """Reconcile every poll interval; after a failure back off exponentially up to ``retry_max_s``."""
        delay = self.settings.retry_initial_s
        while True:
            try:
                if self.paused:  # unloaded: a desired-file edit must not spin the loop
                    self._desired_seen = self._desired_file_mtime()
                else:
                    await self.reconcile()
                delay = self.settings.retry_initial_s
                wait = self.settings.poll_interval_s
            except EdgeloopError as exc:
                log.warning("cycle failed: %s (retry in %.0fs)", exc, delay)
                wait, delay = delay, min(delay * 2, self.settings.retry_max_s)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:  # also wake when the desired file changed since the last read
                if self._desired_file_mtime() != self._desired_seen:
                    break
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                    self._wake.clear()
                    break
                except (asyncio.TimeoutError, TimeoutError):
                    continue

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` (repository extension); the loop loads it again only on a load request."""
        serving = self.model(name)
        self.serving, self.paused = None, True
        self._set_state("unloaded")
        await serving.batcher.close()
        serving.engine.close()

    async def close(self) -> None:
        """Drain and release the serving model."""
        if self.serving is not None:
            serving, self.serving = self.serving, None
            await serving.batcher.close()
            serving.engine.close()
