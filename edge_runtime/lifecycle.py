"""One model's life on the device: desired → fetch → build → validate → serve (atomic swap) → report.

This is the reconciler: it decides and sequences, and each stage's work lives in its room (:mod:`edge_runtime.fetch`,
:mod:`edge_runtime.build`, :mod:`edge_runtime.validate`, :mod:`edge_runtime.serve`, :mod:`edge_runtime.report`). A
failure at any step keeps the last good version serving, is reported, and is retried with back-off. The loop
re-reads the desired version (the settings file that Helm mounts, and the channel pointer) every poll interval.
Each model this device serves has its own :class:`ModelRuntime` (its own loop, back-off, state and telemetry); they
share what :class:`~edge_runtime.resources.DeviceResources` holds (see :mod:`edge_runtime.repository`).

A bring-up (:meth:`ModelRuntime._bring_up_now`), one method per stage: read the verified manifest → choose the
variants to try (forced, cached choice, those that fit memory) → fetch them → build and validate each (keeping the
fastest passing engine open) → choose the variant → tune the batcher → (Triton: validate again through Triton and
promote) → swap and report.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_runtime.aio import wait_event
from edge_runtime.build.choice import (
    VariantChoice,
    VariantFigures,
    VariantMeasure,
    choose_variant,
    load_choice,
    measure_variant,
    save_choice,
)
from edge_runtime.build.device import DeviceFacts
from edge_runtime.build.engines import EnginePlan, candidate_variants, named_variant, plan_for, resolve_backend
from edge_runtime.build.engines.base import Engine
from edge_runtime.build.engines.provider import EngineProvider
from edge_runtime.build.loader import EngineLoader
from edge_runtime.build.memory import MemoryBudget
from edge_runtime.build.power import PowerSampler
from edge_runtime.build.tuning import BatchingChoice, choose, sweep
from edge_runtime.fetch.cache import ArtifactCache
from edge_runtime.fetch.desired import DesiredModels
from edge_runtime.report.events import Reporter, describe
from edge_runtime.resources import DeviceResources
from edge_runtime.serve.batching import DynamicBatcher
from edge_runtime.serve.slot import ServingModel, ServingSlot
from edge_runtime.settings import EdgeSettings, ModelEntry
from edge_runtime.states import State
from edge_runtime.validate import ValidationResult, read_validation_set, validate
from edgeloop_core.contract import ArtifactLayout, Manifest, check_name, verify_manifest
from edgeloop_core.errors import (
    EdgeloopError,
    InsufficientMemory,
    ManifestInvalid,
    ModelNotFound,
    NotReady,
    ValidationFailed,
)
from edgeloop_core.published import read_manifest, resolve_desired
from edgeloop_core.store import ObjectStore

if TYPE_CHECKING:
    from edge_runtime.serve.triton.promotion import TritonModel

log = logging.getLogger(__name__)


@dataclass
class CycleResult:
    """What one reconcile cycle did."""

    version: str
    changed: bool
    downloaded_bytes: int = 0
    built: bool = False


@dataclass
class _Passed:
    """A variant that passed validation on this device, with its engine (open) and, when variants were measured, its
    rank under the variant objective (:meth:`VariantFigures.rank`, lower is better)."""

    plan: EnginePlan
    engine: Engine
    result: ValidationResult
    source: str
    rank: tuple[float, float] = (0.0, 0.0)


@dataclass
class _Trials:
    """What building and validating each candidate variant left: the passing engine kept open (the fastest so far
    when several are measured), every variant's figures, and why the others failed."""

    passed: _Passed | None = None
    figures: list[VariantFigures] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    memory_refusals: int = 0

    def refused(self, plan: EnginePlan, exc: EdgeloopError) -> None:
        """No engine for ``plan``: memory refused it, or obtaining it failed."""
        self.memory_refusals += isinstance(exc, InsufficientMemory)
        self.failures.append(f"{plan.variant.name}: {exc}")
        self.figures.append(VariantFigures(plan.variant.name, str(plan.target_key), False, reason=str(exc)))

    def failed(self, plan: EnginePlan, result: ValidationResult) -> None:
        """The engine for ``plan`` failed validation."""
        self.failures.append(f"{plan.variant.name}: {result.reason}")
        self.figures.append(VariantFigures(plan.variant.name, str(plan.target_key), False, result.value,
                                           reason=result.reason))


@dataclass(frozen=True)
class _Batching:
    """The serving batcher's limits: largest batch, queue delay (µs), and the delay a batch waits for company (µs)."""

    max_batch_size: int
    max_queue_delay_us: int
    company_delay_us: int


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
        self.loader = EngineLoader(shared.engines, shared.memory)
        """This model's engines, within the device's memory budget."""
        self.triton = self._triton_model(shared)
        self.power = PowerSampler.from_settings(shared.settings)
        """The module's power rails, sampled while engines are timed (mJ/inference); none: figures absent."""
        """This model in tritonserver (``serving_engine`` triton), else ``None``."""
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
        self.bringing_up: str | None = None
        """The version being fetched, built and validated now (kept from eviction by every life cycle)."""
        self._heartbeat = time.monotonic()
        self.failures = 0
        """Failed cycles since the last good one (reported with each failure)."""

    def _triton_model(self, shared: DeviceResources) -> TritonModel | None:
        if shared.triton is None:
            return None
        from edge_runtime.serve.triton.promotion import TritonModel  # only a device serving through Triton needs it

        return TritonModel(shared.triton, self.name)

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
            "variant_choice": ({"chosen": self.choice.chosen, "mode": self.choice.mode, "reason": self.choice.reason,
                                "objective": self.choice.objective} if self.choice else None),
            "mj_per_inference": self.mj_per_inference(),
            "paused": self.paused,
        }

    def mj_per_inference(self) -> float | None:
        """The serving variant's module energy per inference, mJ: from the variant choice's timing runs, else from
        its validation; ``None`` where the device has no power rails (never 0)."""
        serving = self.serving
        if serving is None:
            return None
        if self.choice is not None and self.choice.chosen == serving.plan.variant.name \
                and self.choice.mj_per_inference is not None:
            return self.choice.mj_per_inference
        return serving.validation.mj_per_inference

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
        """True when the loop has been silent longer than ``liveness_timeout_s`` (seconds) and its work made no
        progress meanwhile either (a hung build, a download no byte arrived for): liveness then fails and the kubelet
        restarts the pod. While a version is being brought up, a download that brings bytes or a build whose steps
        finish counts as life however long it takes (:meth:`ArtifactCache.note_progress`)."""
        last = max(self._heartbeat, self.cache.progress_at(self.name)) if self.state.loading else self._heartbeat
        return time.monotonic() - last > self.settings.liveness_timeout_s

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
        self.cache.record_pointer_capture(name, pointer.capture if pointer is not None else None)
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

    # --- one bring-up, one method per stage -------------------------------------------------------------------
    async def _bring_up_now(self, name: str, version: str, *, offline: bool = False) -> CycleResult:
        """Bring ``name/version`` up and swap it in, or raise and leave what serves untouched."""
        started = time.monotonic()
        manifest = await self._read_manifest(name, version, offline=offline)
        plans, cached_choice = self._variants_to_try(manifest)
        paths, downloaded = await self._fetch(manifest, plans)
        validation_path = paths[manifest.validation.file]
        trials = await self._build_and_validate(manifest, plans, paths)
        passed = self._choose_variant(manifest, plans, cached_choice, trials)
        limits = await self._batching_limits(passed.engine, validation_path, manifest)
        if self.triton is not None:  # Triton serves it: validate through Triton, then swap Triton's version
            passed = await self._serve_through_triton(manifest, passed, limits, validation_path)
        await self._swap(manifest, passed, limits, started)
        return CycleResult(version, changed=True, downloaded_bytes=downloaded, built=passed.source == "built")

    async def _read_manifest(self, name: str, version: str, *, offline: bool) -> Manifest:
        """The verified manifest of ``name/version``: the cached one (verified again), else S3's; ``offline`` (the
        last good version at start-up): :class:`NotReady` when it is not cached."""
        self._set_state(State.FETCHING)
        manifest = self.cache.cached_manifest(name, version)
        if manifest is not None:
            if (manifest.name, manifest.version) != (name, version):
                raise ManifestInvalid(f"the cached manifest for {name}/{version} describes "
                                      f"{manifest.name}/{manifest.version}: refusing it")
            verify_manifest(manifest, self.trusted)
            return manifest
        if offline:
            raise NotReady(f"{name}/{version} is not in the cache")
        return await asyncio.to_thread(read_manifest, self.store, self.layout, name, version, self.trusted)

    def _variants_to_try(self, manifest: Manifest) -> tuple[list[EnginePlan], VariantChoice | None]:
        """The plans to build and validate (only the chosen one when a choice for these candidates is cached), less
        those whose engines do not fit memory; and the cached choice."""
        plans = self._candidate_plans(manifest)
        cached_choice = None
        if self._measuring(plans):
            cached_choice = load_choice(self._choice_dir(manifest), self._candidate_keys(plans),
                                        self.settings.variant_objective)
            if cached_choice is not None:
                plans = [p for p in plans if p.variant.name == cached_choice.chosen]
        return self.loader.fitting(manifest, plans), cached_choice  # before downloading what could not load anyway

    async def _fetch(self, manifest: Manifest, plans: list[EnginePlan]) -> tuple[dict[str, Path], int]:
        """Make room in the cache, then download (resumably, verified) each variant to try and the validation set;
        returns their paths by file name and the bytes downloaded."""
        refs = [*(p.variant for p in plans), manifest.validation]
        keep = {(manifest.name, manifest.version)} | self.keeps() | self._keep_others()
        await asyncio.to_thread(self.cache.reserve, manifest, refs, keep)
        paths, downloaded = await asyncio.to_thread(self.cache.fetch, self.store, self.layout, manifest, refs,
                                                    attempts=self.settings.fetch_attempts)
        self._report("fetched", {"version": manifest.version, "variants": [p.variant.name for p in plans],
                                 "variant": plans[0].variant.name, "bytes": downloaded})
        return paths, downloaded

    async def _build_and_validate(self, manifest: Manifest, plans: list[EnginePlan],
                                  paths: dict[str, Path]) -> _Trials:
        """Each plan in turn: its engine, validated. None passes: :class:`InsufficientMemory` when memory refused
        them all, else :class:`ValidationFailed` with every reason."""
        trials = _Trials()
        for plan in plans:
            await self._try_variant(trials, manifest, plan, paths, alone=len(plans) == 1)
        if trials.passed is None:
            if trials.memory_refusals == len(plans):
                raise InsufficientMemory("; ".join(trials.failures))
            raise ValidationFailed(f"{manifest.name}/{manifest.version} failed validation on this device "
                                   f"({plans[0].target_key}): {'; '.join(trials.failures)}")
        return trials

    async def _try_variant(self, trials: _Trials, manifest: Manifest, plan: EnginePlan, paths: dict[str, Path], *,
                           alone: bool) -> None:
        """Obtain and validate the engine for ``plan``, and note how it did in ``trials``. When it is the only plan,
        a failure to obtain its engine is raised as it is."""
        model_path, validation_path = paths[plan.variant.file], paths[manifest.validation.file]
        self._set_state(State.BUILDING)
        try:
            engine, source = await self._build(manifest, plan, model_path)
        except EdgeloopError as exc:
            if alone:
                raise
            trials.refused(plan, exc)
            return
        engine, source, result = await self._validate_or_rebuild(manifest, plan, engine, source, model_path,
                                                                 validation_path)
        self.last_validation = result
        if not result.passed:
            self.loader.drop(engine)
            trials.failed(plan, result)
        elif alone:
            trials.passed = _Passed(plan, engine, result, source)
        else:
            await self._measure(trials, manifest, _Passed(plan, engine, result, source), validation_path)

    async def _build(self, manifest: Manifest, plan: EnginePlan, model_path: Path) -> tuple[Engine, str]:
        """The engine for ``plan`` (cached, prebuilt, shared by another device, or built here) and where it came
        from; reported as ``built``."""
        started = time.monotonic()
        engine, source, notes = await asyncio.to_thread(self.loader.obtain, manifest, plan, model_path,
                                                        max_batch_size=self.max_batch_size)
        self._report("built", {"version": manifest.version, "variant": plan.variant.name,
                               "target_key": str(plan.target_key), "built": source == "built", "source": source,
                               "notes": notes, "seconds": round(time.monotonic() - started, 3)})
        return engine, source

    async def _validate_or_rebuild(self, manifest: Manifest, plan: EnginePlan, engine: Engine, source: str,
                                   model_path: Path, validation_path: Path) -> tuple[Engine, str, ValidationResult]:
        """Validate ``engine``. One that came from elsewhere (cache, manifest, another device) and fails is set aside
        (quarantined), and one built here from the verified ONNX is validated before the version is blamed."""
        result = await self._validate(engine, validation_path, manifest, plan, source)
        if result.passed or source == "built":
            return engine, source, result
        self.loader.drop(engine)
        await asyncio.to_thread(self.engines.quarantine, manifest, plan,
                                f"{source} engine failed validation: {result.reason}")
        self._set_state(State.BUILDING)
        engine, source, _ = await asyncio.to_thread(self.loader.obtain, manifest, plan, model_path,
                                                    max_batch_size=self.max_batch_size, local_only=True)
        self._report("built", {"version": manifest.version, "variant": plan.variant.name,
                               "target_key": str(plan.target_key), "built": True, "source": source,
                               "notes": ["rebuilt after the previous engine failed validation"]})
        return engine, source, await self._validate(engine, validation_path, manifest, plan, source)

    async def _validate(self, engine: Engine, validation_path: Path, manifest: Manifest, plan: EnginePlan,
                        source: str) -> ValidationResult:
        """Validate ``engine`` on the version's validation set (accuracy and latency); reported as ``validated``."""
        self._set_state(State.VALIDATING)
        result = await asyncio.to_thread(validate, engine, validation_path, manifest, plan.variant.name,
                                         latency_budget_p99_ms=self.settings.latency_budget_p99_ms, power=self.power)
        self._report("validated", {"version": manifest.version, "source": source, **result.to_dict()})
        return result

    async def _measure(self, trials: _Trials, manifest: Manifest, candidate: _Passed, validation_path: Path) -> None:
        """Time a passing variant (and its energy, where there are power rails); its engine stays open only when it
        is the best so far under ``variant_objective`` (one engine open at a time besides the best: device memory on
        a Jetson is shared)."""
        engine, plan = candidate.engine, candidate.plan
        measured = await asyncio.to_thread(self._time_variant, engine, validation_path, manifest)
        figure = measured.figures(plan.variant.name, str(plan.target_key), candidate.result.value)
        trials.figures.append(figure)
        rank = figure.rank(self.settings.variant_objective)  # the order choose_variant uses
        if trials.passed is not None and rank >= trials.passed.rank:
            self.loader.drop(engine)
            return
        if trials.passed is not None:
            self.loader.drop(trials.passed.engine)
        trials.passed = replace(candidate, rank=rank)

    def _choose_variant(self, manifest: Manifest, plans: list[EnginePlan], cached: VariantChoice | None,
                        trials: _Trials) -> _Passed:
        """Which variant serves (forced, cached, static or measured): remembered when measured, and reported."""
        choice = self._decide(plans, cached, trials.figures)
        passed = trials.passed
        assert passed is not None and passed.plan.variant.name == choice.chosen
        self.last_validation, self.choice = passed.result, choice
        if choice.mode == "measured":
            save_choice(self._choice_dir(manifest), self._candidate_keys(plans), choice)
        self._report("variant_choice", {"version": manifest.version, "target_key": str(passed.plan.target_key),
                                        **choice.to_dict()})
        return passed

    async def _batching_limits(self, engine: Engine, validation_path: Path, manifest: Manifest) -> _Batching:
        """The batcher's limits: the engine's cap (the setting, or less: a fixed-batch model, a TensorRT profile;
        never past it) and the configured delays, or what a sweep on this device chose (``batching_budget_ms``)."""
        max_batch = engine.max_batch_size
        delay_us, company_us = self.max_queue_delay_us, self.settings.company_queue_delay_us
        if self.batching_budget_ms is not None:
            tuned = await asyncio.to_thread(self._tune, engine, validation_path, manifest)
            max_batch, delay_us = tuned.max_batch_size, tuned.max_queue_delay_us
            slack_us = (tuned.budget_ms - tuned.expected_worst_ms) * 1000 + delay_us
            company_us = int(min(company_us, max(0.0, slack_us)))
        self.batching = (max_batch, delay_us)
        return _Batching(max_batch, delay_us, company_us)

    async def _serve_through_triton(self, manifest: Manifest, passed: _Passed, limits: _Batching,
                                    validation_path: Path) -> _Passed:
        """Hand the engine that passed here to Triton: validated again through Triton's own front end under a
        candidate name, and only then Triton's next version of this model. What it held in memory stays held by
        what Triton serves (released when that fails)."""
        assert self.triton is not None
        plan, holder = passed.plan, self.loader.hand_over(passed.engine)
        try:
            candidate = self.triton.candidate(
                passed.engine, self.engines.path(manifest, plan), version=manifest.version, variant=plan.variant.name,
                max_batch_size=limits.max_batch_size, max_queue_delay_us=limits.max_queue_delay_us,
                threads=self.settings.ort_intra_op_threads, spin_wait=self.settings.ort_spin_wait)
            await asyncio.to_thread(passed.engine.close)  # Triton runs it from here on (one copy in memory)
            result = await asyncio.to_thread(self.triton.validate_candidate, candidate, lambda staged: validate(
                staged, validation_path, manifest, plan.variant.name,
                latency_budget_p99_ms=self.settings.latency_budget_p99_ms))
            self._report("validated", {"version": manifest.version, "source": "triton", **result.to_dict()})
            if not result.passed:
                raise ValidationFailed(f"{manifest.name}/{manifest.version} failed validation through Triton "
                                       f"({plan.target_key}): {result.reason}")
            served = await asyncio.to_thread(self.triton.promote, candidate)
        except BaseException:
            self.loader.release(holder)
            raise
        self.loader.adopt(served, holder)
        self.last_validation = result
        return _Passed(plan, served, result, passed.source)

    async def _swap(self, manifest: Manifest, passed: _Passed, limits: _Batching, started: float) -> None:
        """Serve ``passed`` from now on (requests already queued on the old model finish there; new ones go to the
        new model at once), report it, remember it as the last good version, and let the cache evict the rest."""
        name, version, plan = manifest.name, manifest.version, passed.plan
        batcher = DynamicBatcher(passed.engine, max_batch_size=limits.max_batch_size,
                                 max_queue_delay_us=limits.max_queue_delay_us,
                                 company_delay_us=limits.company_delay_us, on_batch=self._on_batch)
        holder = self.loader.hand_over(passed.engine)
        old = await self.slot.swap(ServingModel(name, version, manifest, plan, passed.engine, batcher, passed.result,
                                                release_memory=lambda: self.loader.release(holder)))
        self._set_state(State.SERVING)
        self._report("serving", {"version": version, "variant": plan.variant.name, "target_key": str(plan.target_key),
                                 "validation": passed.result.to_dict(), "previous": old.version if old else None,
                                 "seconds": round(time.monotonic() - started, 3)})
        self.cache.save_state(name, {"desired": self.desired[1], "version": version})
        keep = {(name, version)} | ({(old.name, old.version)} if old else set()) | self._keep_others()
        await asyncio.to_thread(self.cache.evict, keep)

    # --- Triton as the data plane ----------------------------------------------------------------------------
    async def reload_into_triton(self) -> None:
        """After tritonserver restarted: load this model's last good version again (it is still on disk)."""
        if self.serving is None or self.paused or self.triton is None:
            return
        try:
            await asyncio.to_thread(self.triton.reload)
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
        choice = choose_variant(figures, self.settings.variant_objective)
        assert choice is not None  # at least one candidate passed, or _bring_up raised
        return choice

    def _time_variant(self, engine: Engine, validation_path: Path, manifest: Manifest) -> VariantMeasure:
        inputs = read_validation_set(validation_path, manifest, engine).inputs
        sample = {k: v[:1] for k, v in inputs.items()}
        return measure_variant(engine, sample, engine.max_batch_size,
                               budget_s=self.settings.variant_choice_budget_s, power=self.power)

    def _tune(self, engine: Engine, validation_path: Path, manifest: Manifest) -> BatchingChoice:
        """Sweep batch sizes on this device and choose the batcher's limits (reported as ``batch_sweep``)."""
        inputs = read_validation_set(validation_path, manifest, engine).inputs
        points = sweep(engine, {k: v[:1] for k, v in inputs.items()}, engine.max_batch_size, power=self.power)
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
            except Exception as exc:  # the loop must outlive anything a cycle raises
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
        if self.triton is not None:
            await asyncio.to_thread(self.triton.unload)
        self._set_state(State.UNLOADED)
        self._report("unloaded", {"version": self.desired_version})

    async def close(self, *, retire: bool = False) -> None:
        """Drain and release the serving model; ``retire`` (it left the desired set): Triton drops it too."""
        await self.slot.unload()
        if retire and self.triton is not None:
            await asyncio.to_thread(self.triton.unload, remove=True)
