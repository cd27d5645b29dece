"""One model's life on the device: desired → fetch → build → validate → serve (atomic swap) → report.

A failure at any step keeps the last good version serving, is reported, and is retried with back-off. The loop
re-reads the desired version (the settings file that Helm mounts, and the channel pointer) every poll interval.
Each model this device serves has its own :class:`ModelRuntime` (its own loop, back-off, state and telemetry); they
share what :class:`DeviceResources` holds (see :mod:`edge_runtime.repository`).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.aio import wait_event
from edge_runtime.build.choice import (
    VariantChoice,
    VariantFigures,
    choose_fastest,
    load_choice,
    save_choice,
    time_variant,
)
from edge_runtime.build.device import DeviceFacts
from edge_runtime.build.engines import EnginePlan, candidate_variants, named_variant, plan_for, resolve_backend
from edge_runtime.build.engines.base import Engine
from edge_runtime.build.engines.onnxruntime import spins
from edge_runtime.build.engines.provider import EngineProvider
from edge_runtime.build.memory import MemoryBudget
from edge_runtime.fetch.cache import ArtifactCache
from edge_runtime.fetch.desired import DesiredModels
from edge_runtime.serve.batching import DynamicBatcher
from edge_runtime.serve.slot import ServingModel, ServingSlot
from edge_runtime.settings import EdgeSettings, ModelEntry
from edge_runtime.states import State
from edge_runtime.validate import ValidationResult, read_validation_set, validate
from edgeloop_core.contract import (
    ArtifactLayout,
    Manifest,
    check_name,
    load_signing_key,
    load_verify_key,
    load_verify_keys,
    verify_manifest,
)
from edgeloop_core.errors import (
    EdgeloopError,
    EngineError,
    InsufficientMemory,
    ManifestInvalid,
    ModelNotFound,
    NotReady,
    ValidationFailed,
)
from edgeloop_core.files import write_atomic
from edgeloop_core.published import read_manifest, resolve_desired
from edgeloop_core.store import ObjectStore
from edgeloop_core.timing import Timing

log = logging.getLogger(__name__)

Reporter = Callable[[str, dict[str, Any]], None]


def describe(exc: BaseException) -> str:
    """One line for an error report: our messages as they are; anything else with its type (never empty)."""
    if isinstance(exc, EdgeloopError) and str(exc):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
"""``report(kind, payload)``: telemetry events (fetched, built, validated, failed, serving, ...)."""


@dataclass
class CycleResult:
    """What one reconcile cycle did."""

    version: str
    changed: bool
    downloaded_bytes: int = 0
    built: bool = False


@dataclass
class DeviceResources:
    """What every model's life cycle on this device shares: one store, one cache with one size cap, one engine
    provider (one build at a time), the trusted keys, and one memory budget."""

    settings: EdgeSettings
    facts: DeviceFacts
    store: ObjectStore
    layout: ArtifactLayout
    cache: ArtifactCache
    trusted: list[Any]
    engines: EngineProvider
    memory: MemoryBudget
    triton: Any = None
    """The supervised :class:`TritonServer` when ``serving_engine`` is ``triton``."""

    @classmethod
    def create(cls, settings: EdgeSettings, facts: DeviceFacts, store: ObjectStore | None = None) -> DeviceResources:
        """Open the cache (sweeping what a killed process left half-written), the store and the keys."""
        store = store or ObjectStore(settings.s3_bucket, endpoint_url=settings.s3_endpoint_url,
                                     connect_timeout_s=settings.s3_connect_timeout_s,
                                     read_timeout_s=settings.s3_read_timeout_s, max_attempts=settings.s3_max_attempts)
        layout = ArtifactLayout(settings.s3_prefix)
        cache = ArtifactCache(settings.cache_dir, settings.cache_max_bytes)
        cache.sweep_temporary()
        engines = EngineProvider(
            cache, store, layout, device_id=settings.device_id, max_batch_size=settings.max_batch_size,
            share=settings.share_engines, fetch_attempts=settings.fetch_attempts,
            fleet_keys=[load_verify_key(settings.engine_verify_key_file)] if settings.engine_verify_key_file else [],
            fleet_signing_key=(load_signing_key(settings.engine_signing_key_file)
                               if settings.engine_signing_key_file else None),
            ort_threads=settings.ort_intra_op_threads, ort_spin=settings.ort_spin_wait)
        triton = None
        if settings.serving_engine == "triton":
            from edge_runtime.serve.triton.dataplane import TritonServer, find_triton

            work = cache.root / "triton"
            install = find_triton(settings.triton_home, settings.triton_python, work, settings.triton_backend)
            triton = TritonServer(install, work / "models",
                                  bind_address=settings.bind_address, grpc_port=settings.grpc_port,
                                  metrics_port=settings.triton_metrics_port, log_path=work / "tritonserver.log")
        return cls(settings, facts, store, layout, cache, load_verify_keys(settings.verify_key_file), engines,
                   MemoryBudget(settings.memory_budget_bytes, settings.memory_reserve_bytes), triton)


def _what(manifest: Manifest, plan: EnginePlan) -> str:
    """How memory messages name an engine: ``name/version (variant)``."""
    return f"{manifest.name}/{manifest.version} ({plan.variant.name})"


class ModelRuntime:
    """Holds one model's serving version and drives its life cycle. All public coroutines run on one event loop."""

    def __init__(self, name: str, shared: DeviceResources, desired: DesiredModels, *,
                 report: Reporter | None = None, on_batch: Callable[[int, float], None] | None = None,
                 keep: Callable[[], set[tuple[str, str]]] | None = None) -> None:
        self.name = check_name(name, "model name")
        self.shared = shared
        self.desired_models = desired
        self.entry: ModelEntry = desired.current.get(name) or ModelEntry(name=name)
        """This model's desired entry as last read (version or channel, variant, batching limits)."""
        self._report_to = report or (lambda kind, payload: None)
        self._on_batch = on_batch
        self._keep_others = keep or set
        self.slot = ServingSlot()
        self.desired_version: str | None = None
        self.state = State.STARTING
        self.last_error = ""
        self.last_validation: ValidationResult | None = None
        self.choice: VariantChoice | None = None
        """Which variant serves and why (measured, cached, forced or static)."""
        self._listeners: list[Callable[[], None]] = []
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self.batching: tuple[int, int] = (self.max_batch_size, self.max_queue_delay_us)
        """(max batch size, max queue delay µs) the serving batcher uses; tuned per device when configured."""
        self.paused = False
        """Set by an unload request: the loop leaves the model unloaded until a load request."""
        self._holders: dict[int, str] = {}
        """Loaded engine (by id) → its name in the memory budget."""
        self._loads = 0
        self.bringing_up: str | None = None
        """The version being fetched, built and validated now (kept from eviction by every life cycle)."""
        self._heartbeat = time.monotonic()
        self.failures = 0
        """Failed cycles since the last good one (reported with each failure)."""

    # --- what is shared, and this model's own limits ------------------------------------------------------------
    @property
    def settings(self) -> EdgeSettings:
        return self.shared.settings

    @property
    def facts(self) -> DeviceFacts:
        return self.shared.facts

    @property
    def store(self) -> ObjectStore:
        return self.shared.store

    @property
    def cache(self) -> ArtifactCache:
        return self.shared.cache

    @property
    def engines(self) -> EngineProvider:
        return self.shared.engines

    @property
    def layout(self) -> ArtifactLayout:
        return self.shared.layout

    @property
    def trusted(self) -> list[Any]:
        return self.shared.trusted

    @property
    def memory(self) -> MemoryBudget:
        return self.shared.memory

    @property
    def max_batch_size(self) -> int:
        return self.entry.max_batch_size or self.settings.max_batch_size

    @property
    def max_queue_delay_us(self) -> int:
        return self.entry.max_queue_delay_us if self.entry.max_queue_delay_us is not None \
            else self.settings.max_queue_delay_us

    @property
    def batching_budget_ms(self) -> float | None:
        return self.entry.batching_budget_ms or self.settings.batching_budget_ms

    def _report(self, kind: str, payload: dict[str, Any]) -> None:
        self._report_to(kind, {"model_name": self.name, **payload})

    def keeps(self) -> set[tuple[str, str]]:
        """Versions of this model the cache must keep: what serves, what is desired, what is being brought up."""
        versions = {self.desired_version, self.bringing_up, self.serving.version if self.serving else None}
        return {(self.name, v) for v in versions if v}

    # --- state ---------------------------------------------------------------------------------------------
    def ready(self) -> bool:
        """Readiness: the desired version is validated and serving."""
        return self.serving is not None and self.serving.version == self.desired_version

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every state change (health status, metrics)."""
        self._listeners.append(listener)

    def _set_state(self, state: State, error: str = "") -> None:
        self.state, self.last_error = state, error
        self._heartbeat = time.monotonic()
        for listener in self._listeners:
            try:
                listener()
            except Exception:  # a metrics or health hook must not break the life cycle
                log.exception("state listener failed")

    def status(self) -> dict[str, Any]:
        """A snapshot for telemetry and the CLI."""
        serving = self.serving
        return {
            "model_name": self.name,
            "desired": self.desired[1],
            "desired_version": self.desired_version,
            "serving_version": serving.version if serving else None,
            "variant": serving.plan.variant.name if serving else None,
            "target_key": str(serving.plan.target_key) if serving else None,
            "state": self.state.value,
            "ready": self.ready(),
            "error": self.last_error,
            "validation": self.last_validation.summary() if self.last_validation else "",
            "batching": {"max_batch_size": self.batching[0], "max_queue_delay_us": self.batching[1]},
            "variant_choice": ({"chosen": self.choice.chosen, "mode": self.choice.mode, "reason": self.choice.reason}
                               if self.choice else None),
            "paused": self.paused,
        }

    @property
    def serving(self) -> ServingModel | None:
        """What serves now (read-only: the slot changes it)."""
        return self.slot.current

    @property
    def desired(self) -> tuple[str, str]:
        """(model name, version or channel) as the desired state answered last."""
        return self.name, self.entry.version

    def beat(self) -> None:
        """The loop is alive (called every loop turn and on every state change)."""
        self._heartbeat = time.monotonic()

    def wedged(self) -> bool:
        """True when the loop has been silent longer than ``liveness_timeout_s`` (a hung build or download):
        liveness then fails and the kubelet restarts the pod."""
        return time.monotonic() - self._heartbeat > self.settings.liveness_timeout_s

    # --- serving ---------------------------------------------------------------------------------------------
    def model(self, name: str, version: str = "") -> ServingModel:
        """The serving model called ``name`` (and ``version`` when given), or the right error."""
        return self.slot.lookup(name, version, configured=self.name, state=str(self.state))

    # --- the life cycle ----------------------------------------------------------------------------------------
    def read_desired(self) -> tuple[str, str]:
        """What should serve (see :class:`~edge_runtime.fetch.desired.DesiredModels` for the precedence)."""
        entry = self.desired_models.entry(self.name)
        if entry is None:
            raise ModelNotFound(f"model {self.name!r} is no longer desired on this device")
        self.entry = entry
        return self.name, entry.version

    async def reconcile(self) -> CycleResult:
        """One cycle: bring the serving model to the desired version, or raise and keep the old one.

        Any exception (ours or not: a malformed channel pointer, a full disk, a library bug) is reported as a
        ``failed`` event and state with its reason before it propagates; what serves keeps serving.
        """
        async with self._lock:
            self.beat()
            target = self.desired[1]
            try:
                name, wanted = self.read_desired()
                target = wanted
                warm = await self._serve_last_good(name, wanted) if self.serving is None else None
                try:
                    version = await asyncio.to_thread(self._resolve, name, wanted)
                except Exception:
                    if warm is not None:  # S3 cannot say what is desired now: the last good version is our best
                        self.desired_version = warm
                    raise
                target = version
                self.desired_version = version
                if self.serving is not None and self.serving.version == version and self.serving.name == name:
                    self._set_state(State.SERVING)
                    self.failures = 0
                    return CycleResult(version, changed=False)
                result = await self._bring_up(name, version)
                self.failures = 0
                return result
            except Exception as exc:
                self.failures += 1
                reason = describe(exc)
                self._set_state(State.FAILED, reason)
                self._report("failed", {"version": target, "error": reason, "error_kind": type(exc).__name__,
                                        "serving_version": self.serving.version if self.serving else None,
                                        "consecutive_failures": self.failures})
                raise

    def _resolve(self, name: str, wanted: str) -> str:
        """The version to serve: ``wanted`` itself when it is a version (pinned), else what its channel's verified
        pointer says, refusing a pointer older than one this device accepted before."""
        seen = self.cache.load_sequences().get(f"{name}/{wanted}", 0)
        version, pointer = resolve_desired(self.store, self.layout, name, wanted, self.trusted, min_sequence=seen)
        if pointer is not None:
            self.cache.record_sequence(name, wanted, pointer.sequence)
        return version

    async def _serve_last_good(self, name: str, wanted: str) -> str | None:
        """At start-up, serve the last good version from the cache before asking S3 anything (returns it), so a
        restarted pod answers requests at once and keeps answering while it validates what is desired now.

        It does not make the pod Ready by itself: readiness waits until S3 says which version is desired (it may be
        this one), or, when S3 cannot be reached or hangs, falls back to this version (see :meth:`reconcile`)."""
        state = self.cache.load_state(name)
        if not state or state.get("desired") != wanted:
            return None
        try:
            version = check_name(state.get("version"), "cached version")
            if self.cache.cached_manifest(name, version) is None:
                return None
            await self._bring_up(name, version, offline=True)
            log.info("serving the last good version %s/%s from the cache", name, version)
            return version
        except Exception as exc:  # noqa: BLE001 - a bad cache must not stop the normal path
            log.warning("could not serve the cached last good version: %s", describe(exc))
            self._report("failed", {"version": state.get("version"), "error": f"cached last good version: "
                                    f"{describe(exc)}", "error_kind": type(exc).__name__})
            return None

    async def _bring_up(self, name: str, version: str, *, offline: bool = False) -> CycleResult:
        self.bringing_up = version
        try:
            return await self._bring_up_now(name, version, offline=offline)
        finally:
            self.bringing_up = None

    def _check_memory(self, manifest: Manifest, plan: EnginePlan) -> None:
        """:class:`InsufficientMemory` unless the engine for ``plan`` fits what is free: by what it held when it was
        last loaded here, or (never loaded here) by its weights."""
        what = _what(manifest, plan)
        recorded = self.engines.recorded_memory(manifest, plan)
        if recorded is not None:
            self.memory.check(what, recorded, basis="recorded when it was last loaded here")
        else:
            self.memory.check(what, plan.variant.size_bytes, basis="its weights; it was never loaded here")

    def _fitting(self, manifest: Manifest, plans: list[EnginePlan]) -> list[EnginePlan]:
        """The plans whose engines fit the memory budget; none: :class:`InsufficientMemory` with every reason."""
        fitting, reasons = [], []
        for plan in plans:
            try:
                self._check_memory(manifest, plan)
                fitting.append(plan)
            except InsufficientMemory as exc:
                reasons.append(str(exc))
        if not fitting:
            raise InsufficientMemory("; ".join(reasons))
        return fitting

    def _obtain(self, manifest: Manifest, plan: EnginePlan, model_path: Path, *,
                local_only: bool = False) -> tuple[Engine, str, list[str]]:
        """The engine for ``plan`` if its memory needs fit the device's budget (checked before with what was recorded
        when it was last loaded here, or its weights; and after, with what loading it took), else
        :class:`InsufficientMemory`. What it holds counts against the budget until :meth:`_drop`."""
        what = _what(manifest, plan)
        self._check_memory(manifest, plan)
        engine, source, notes = self.engines.obtain(manifest, plan, model_path, local_only=local_only,
                                                    max_batch_size=self.max_batch_size)
        measured = int(getattr(engine, "memory_bytes", 0) or 0)
        try:
            self.memory.check(what, measured, basis="measured as it loaded")
        except InsufficientMemory:
            engine.close()
            raise
        self.engines.record_memory(manifest, plan, measured)
        self._loads += 1
        holder = f"{manifest.name}/{manifest.version}/{plan.variant.name}#{self._loads}"
        self._holders[id(engine)] = holder
        self.memory.hold(holder, measured)
        return engine, source, notes

    def _holder(self, engine: Engine) -> str:
        return self._holders.pop(id(engine), "")

    def _drop(self, engine: Engine) -> None:
        """Close an engine that will not serve, and give its memory back to the budget."""
        engine.close()
        self.memory.release(self._holder(engine))

    async def _bring_up_now(self, name: str, version: str, *, offline: bool = False) -> CycleResult:
        started = time.monotonic()
        self._set_state(State.FETCHING)
        manifest = self.cache.cached_manifest(name, version)
        if manifest is not None:
            if (manifest.name, manifest.version) != (name, version):
                raise ManifestInvalid(f"the cached manifest for {name}/{version} describes "
                                      f"{manifest.name}/{manifest.version}: refusing it")
            verify_manifest(manifest, self.trusted)
        elif offline:
            raise NotReady(f"{name}/{version} is not in the cache")
        else:
            manifest = await asyncio.to_thread(read_manifest, self.store, self.layout, name, version, self.trusted)
        plans = self._candidate_plans(manifest)
        cached_choice = None
        if self._measuring(plans):
            cached_choice = load_choice(self._choice_dir(manifest), self._candidate_keys(plans))
            if cached_choice is not None:
                plans = [p for p in plans if p.variant.name == cached_choice.chosen]
        plans = self._fitting(manifest, plans)  # before downloading what could not be loaded anyway
        refs = [*(p.variant for p in plans), manifest.validation]
        keep = {(name, version)} | self.keeps() | self._keep_others()
        await asyncio.to_thread(self.cache.reserve, manifest, refs, keep)
        paths, downloaded = await asyncio.to_thread(self.cache.fetch, self.store, self.layout, manifest, refs,
                                                    attempts=self.settings.fetch_attempts)
        self._report("fetched", {"version": version, "variants": [p.variant.name for p in plans],
                                 "variant": plans[0].variant.name, "bytes": downloaded})

        validation_path = paths[manifest.validation.file]
        candidates: list[tuple[EnginePlan, Engine, ValidationResult, str, float]] = []
        figures: list[VariantFigures] = []
        failures: list[str] = []
        memory_refusals = 0
        for plan in plans:
            self._set_state(State.BUILDING)
            build_started = time.monotonic()
            try:
                engine, source, notes = await asyncio.to_thread(self._obtain, manifest, plan, paths[plan.variant.file])
            except EdgeloopError as exc:
                if len(plans) == 1:
                    raise
                memory_refusals += isinstance(exc, InsufficientMemory)
                failures.append(f"{plan.variant.name}: {exc}")
                figures.append(VariantFigures(plan.variant.name, str(plan.target_key), False, reason=str(exc)))
                continue
            self._report("built", {"version": version, "variant": plan.variant.name,
                                   "target_key": str(plan.target_key), "built": source == "built", "source": source,
                                   "notes": notes, "seconds": round(time.monotonic() - build_started, 3)})
            self._set_state(State.VALIDATING)
            result = await asyncio.to_thread(validate, engine, validation_path, manifest, plan.variant.name,
                                             latency_budget_p99_ms=self.settings.latency_budget_p99_ms)
            self._report("validated", {"version": version, "source": source, **result.to_dict()})
            if not result.passed and source != "built":
                # an engine that came from elsewhere (cache, manifest, another device) fails: set it aside and
                # validate one built here from the verified ONNX before blaming the version
                self._drop(engine)
                await asyncio.to_thread(self.engines.quarantine, manifest, plan,
                                        f"{source} engine failed validation: {result.reason}")
                self._set_state(State.BUILDING)
                engine, source, _ = await asyncio.to_thread(self._obtain, manifest, plan, paths[plan.variant.file],
                                                            local_only=True)
                self._report("built", {"version": version, "variant": plan.variant.name,
                                       "target_key": str(plan.target_key), "built": True, "source": source,
                                       "notes": ["rebuilt after the previous engine failed validation"]})
                self._set_state(State.VALIDATING)
                result = await asyncio.to_thread(validate, engine, validation_path, manifest, plan.variant.name,
                                                 latency_budget_p99_ms=self.settings.latency_budget_p99_ms)
                self._report("validated", {"version": version, "source": source, **result.to_dict()})
            self.last_validation = result
            if not result.passed:
                self._drop(engine)
                failures.append(f"{plan.variant.name}: {result.reason}")
                figures.append(VariantFigures(plan.variant.name, str(plan.target_key), False, result.value,
                                              reason=result.reason))
                continue
            if len(plans) > 1:
                b1, batched = await asyncio.to_thread(self._time_variant, engine, validation_path, manifest)
                figure = VariantFigures(plan.variant.name, str(plan.target_key), True, result.value,
                                        engine.max_batch_size, b1, batched)
                figures.append(figure)
                # one engine open at a time besides the fastest so far (device memory on a Jetson is shared)
                if candidates and figure.score_ms >= candidates[0][4]:
                    self._drop(engine)
                    continue
                for kept in candidates:
                    self._drop(kept[1])
                candidates = [(plan, engine, result, source, figure.score_ms)]
            else:
                candidates.append((plan, engine, result, source, 0.0))
        if not candidates:
            plan = plans[0]
            if memory_refusals == len(plans):
                raise InsufficientMemory("; ".join(failures))
            raise ValidationFailed(f"{name}/{version} failed validation on this device "
                                   f"({plan.target_key}): {'; '.join(failures)}")

        choice = self._decide(plans, cached_choice, figures)
        plan, engine, result, source, _ = candidates[0]
        assert plan.variant.name == choice.chosen
        self.last_validation, self.choice = result, choice
        if choice.mode == "measured":
            save_choice(self._choice_dir(manifest), self._candidate_keys(plans), choice)
        self._report("variant_choice", {"version": version, "target_key": str(plan.target_key), **choice.to_dict()})

        # the engine's cap: the setting, or less (a fixed-batch model, a TensorRT profile); never past it
        max_batch = engine.max_batch_size
        delay_us, company_us = self.max_queue_delay_us, self.settings.company_queue_delay_us
        if self.batching_budget_ms is not None:
            choice_b = await asyncio.to_thread(self._tune, engine, validation_path, manifest)
            max_batch, delay_us = choice_b.max_batch_size, choice_b.max_queue_delay_us
            slack_us = (choice_b.budget_ms - choice_b.expected_worst_ms) * 1000 + delay_us
            company_us = int(min(company_us, max(0.0, slack_us)))
        self.batching = (max_batch, delay_us)
        if self.shared.triton is not None:  # Triton serves it: validate through Triton, then swap Triton's version
            engine, result = await asyncio.to_thread(self._promote_through_triton, manifest, plan, engine,
                                                     validation_path, max_batch, delay_us)
            self.last_validation = result
        batcher = DynamicBatcher(engine, max_batch_size=max_batch, max_queue_delay_us=delay_us,
                                 company_delay_us=company_us, on_batch=self._on_batch)
        # requests already queued on the old model finish there; new ones go to the new model at once
        holder = self._holder(engine)
        old = await self.slot.swap(ServingModel(name, version, manifest, plan, engine, batcher, result,
                                                release_memory=lambda: self.memory.release(holder)))
        self._set_state(State.SERVING)
        self._report("serving", {"version": version, "variant": plan.variant.name, "target_key": str(plan.target_key),
                                 "validation": result.to_dict(), "previous": old.version if old else None,
                                 "seconds": round(time.monotonic() - started, 3)})
        self.cache.save_state(name, {"desired": self.desired[1], "version": version})
        keep = {(name, version)} | ({(old.name, old.version)} if old else set()) | self._keep_others()
        await asyncio.to_thread(self.cache.evict, keep)
        return CycleResult(version, changed=True, downloaded_bytes=downloaded, built=source == "built")

    # --- Triton as the data plane ----------------------------------------------------------------------------
    def _promote_through_triton(self, manifest: Manifest, plan: EnginePlan, engine: Engine, validation_path: Path,
                                max_batch: int, delay_us: int) -> tuple[Engine, ValidationResult]:
        """Hand the engine that passed here to Triton: load it under a candidate name, validate it again through
        Triton's own front end, and only then write it as the model's next version and load it (Triton swaps versions
        once the new one loaded; the old one serves until then, and stays when the load fails)."""
        from edge_runtime.serve.triton.dataplane import (
            CANDIDATE_SUFFIX,
            TritonEngine,
            next_version_number,
            prune_versions,
            remove_model,
            write_model,
        )

        triton = self.shared.triton
        assert triton is not None
        repo = triton.repo
        holder = self._holder(engine)
        io = {"inputs": engine.inputs, "outputs": engine.outputs}
        platform, memory = engine.platform, int(getattr(engine, "memory_bytes", 0) or 0)
        engine.close()  # Triton runs it from here on (one copy in memory)
        shape = {"engine_path": self.engines.path(manifest, plan), "platform": platform, **io,
                 "max_batch_size": max_batch, "max_queue_delay_us": delay_us, "edgeloop_version": manifest.version,
                 "variant": plan.variant.name, "threads": self.settings.ort_intra_op_threads,
                 "spin": spins(self.settings.ort_spin_wait),  # as the builtin engine reads the same settings
                 "backend": triton.install.ort_backend}
        candidate = self.name + CANDIDATE_SUFFIX
        try:
            write_model(repo, candidate, 1, **shape)
            triton.load(candidate)
            staged = TritonEngine(triton, candidate, max_batch_size=max_batch, platform=platform, **io)
            result = validate(staged, validation_path, manifest, plan.variant.name,
                              latency_budget_p99_ms=self.settings.latency_budget_p99_ms)
        except BaseException:
            self.memory.release(holder)
            raise
        finally:
            try:
                triton.unload(candidate)
            except EdgeloopError as exc:
                log.warning("could not unload %s from Triton: %s", candidate, exc)
            remove_model(repo, candidate)
        self._report("validated", {"version": manifest.version, "source": "triton", **result.to_dict()})
        if not result.passed:
            self.memory.release(holder)
            raise ValidationFailed(f"{manifest.name}/{manifest.version} failed validation through Triton "
                                   f"({plan.target_key}): {result.reason}")
        model_dir = repo / self.name
        previous = (model_dir / "config.pbtxt").read_text() if (model_dir / "config.pbtxt").exists() else None
        number = next_version_number(model_dir)
        folder = model_dir / str(number)
        try:
            write_model(repo, self.name, number, **shape)  # leaves nothing behind when it fails (a full disk)
            triton.load(self.name)
            if not triton.model_ready(self.name, str(number)):
                raise EngineError(f"Triton loaded {self.name} but version {number} is not ready")
        except BaseException:
            self.memory.release(holder)
            shutil.rmtree(folder, ignore_errors=True)  # Triton keeps serving the old version; so does the repository
            if previous is not None:
                write_atomic(model_dir / "config.pbtxt", previous.encode())
            raise
        prune_versions(repo, self.name, keep=number)
        served = TritonEngine(triton, self.name, max_batch_size=max_batch, platform=platform, memory_bytes=memory,
                              **io)
        served.version = str(number)
        self._holders[id(served)] = holder
        return served, result

    def _unload_from_triton(self, *, remove: bool = False) -> None:
        triton = self.shared.triton
        if triton is None or not triton.running():
            return
        try:
            triton.unload(self.name)
        except EdgeloopError as exc:
            log.warning("could not unload %s from Triton: %s", self.name, exc)
        if remove:
            from edge_runtime.serve.triton.dataplane import remove_model

            remove_model(triton.repo, self.name)

    async def reload_into_triton(self) -> None:
        """After tritonserver restarted: load this model's last good version again (it is still on disk)."""
        if self.serving is None or self.paused or self.shared.triton is None:
            return
        try:
            await asyncio.to_thread(self.shared.triton.load, self.name)
        except Exception as exc:
            reason = f"Triton restarted but could not load {self.name} again: {describe(exc)}"
            self._set_state(State.FAILED, reason)
            self._report("failed", {"version": self.serving.version, "error": reason, "error_kind": type(exc).__name__,
                                    "serving_version": self.serving.version})
            raise
        self._set_state(State.SERVING)
        self._report("serving", {"version": self.serving.version, "variant": self.serving.plan.variant.name,
                                 "target_key": str(self.serving.plan.target_key),
                                 "validation": self.serving.validation.to_dict(), "previous": self.serving.version,
                                 "reloaded_into_triton": True})

    # --- which variant ---------------------------------------------------------------------------------------
    def _candidate_plans(self, manifest: Manifest) -> list[EnginePlan]:
        """The forced variant (``variant`` setting), or every variant this backend runs, in preference order."""
        backend, device = resolve_backend(self.facts, self.settings.backend,
                                          allow_cpu_fallback=self.settings.allow_cpu_fallback)
        if backend != "tensorrt" and self.facts.is_jetson and self.settings.backend == "auto":
            self._report("cpu_fallback", {"reason": self.facts.trt_error or "TensorRT is not installed",
                                           "module": self.facts.module, "l4t": self.facts.l4t_release})
        if self.entry.variant is not None:
            variants = [named_variant(manifest, self.entry.variant)]
        else:
            variants = candidate_variants(manifest, backend, device)
            if self.settings.variant_choice_budget_s <= 0:
                variants = variants[:1]
        return [plan_for(manifest, self.facts, v, backend=backend, device=device,
                         max_batch_size=self.max_batch_size, opt_batch_size=self.settings.opt_batch_size)
                for v in variants]

    def _measuring(self, plans: list[EnginePlan]) -> bool:
        return self.entry.variant is None and len(plans) > 1

    @staticmethod
    def _candidate_keys(plans: list[EnginePlan]) -> dict[str, str]:
        return {p.variant.name: str(p.target_key) for p in plans}

    def _choice_dir(self, manifest: Manifest) -> Path:
        return self.cache.root / "engines" / manifest.name / manifest.version

    def _decide(self, plans: list[EnginePlan], cached: VariantChoice | None,
                figures: list[VariantFigures]) -> VariantChoice:
        if self.entry.variant is not None:
            return VariantChoice(self.entry.variant, "forced by the variant setting", "forced")
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
        return time_variant(engine, sample, engine.max_batch_size,
                            budget_s=self.settings.variant_choice_budget_s)

    def _tune(self, engine: Engine, validation_path: Path, manifest: Manifest):  # noqa: ANN202 - BatchingChoice
        """Sweep batch sizes on this device and choose the batcher's limits (reported as ``batch_sweep``)."""
        from edge_runtime.build.tuning import choose, sweep

        inputs, _ = read_validation_set(validation_path, manifest, engine)
        points = sweep(engine, {k: v[:1] for k, v in inputs.items()}, engine.max_batch_size)
        assert self.batching_budget_ms is not None
        choice = choose(points, self.batching_budget_ms, self.max_queue_delay_us)
        self._report("batch_sweep", {"version": manifest.version, "points": [p.__dict__ for p in points],
                                     "chosen": choice.to_dict()})
        return choice

    def wake(self) -> None:
        """Run the next cycle now (a changed desired file)."""
        self._wake.set()

    async def load(self) -> CycleResult:
        """Repository extension: serve this model again now, whatever the desired state says of it (the repository
        pinned its version there first: :meth:`ModelRepository.load`)."""
        self.paused = False
        return await self.reconcile()

    async def run_forever(self) -> None:
        """Reconcile every poll interval, or at once when woken (the desired file changed); after a failure back off
        exponentially up to ``retry_max_s``.

        Nothing but cancellation ends this loop: every exception is reported (by :meth:`reconcile`), logged, and
        retried after the back-off, so a malformed pointer or a full disk never freezes a device on its old version.
        """
        delay = self.settings.retry_initial_s
        while True:
            self.beat()
            try:
                if not self.paused:  # unloaded: it stays so until a load request
                    await self.reconcile()
                delay = self.settings.retry_initial_s
                wait = self.settings.poll_interval_s
            except Exception as exc:  # noqa: BLE001 - the loop must outlive anything a cycle raises
                log.warning("%s: cycle failed: %s (retry in %.1fs)", self.name, describe(exc), delay,
                            exc_info=not isinstance(exc, EdgeloopError))
                wait, delay = delay, min(delay * 2, self.settings.retry_max_s)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.beat()
                if await wait_event(self._wake, min(1.0, deadline - time.monotonic())):
                    self._wake.clear()
                    break

    async def unload(self) -> None:
        """Stop serving this model (repository extension); the loop loads it again only on a load request."""
        self.model(self.name)  # UNAVAILABLE when nothing serves, as for any request
        self.paused = True
        await self.slot.unload()
        await asyncio.to_thread(self._unload_from_triton)
        self._set_state(State.UNLOADED)
        self._report("unloaded", {"version": self.desired_version})

    async def close(self, *, retire: bool = False) -> None:
        """Drain and release the serving model; ``retire`` (it left the desired set): Triton drops it too."""
        await self.slot.unload()
        if retire:
            await asyncio.to_thread(self._unload_from_triton, remove=True)
