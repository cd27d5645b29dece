"""The model repository: every model this device serves, each with its own life cycle, behind one endpoint.

Desired state is a set of models (see :mod:`edge_runtime.fetch.desired`). Each has its own :class:`ModelRuntime` (its
own reconcile loop, back-off, state, batcher and telemetry) so one model failing never touches the others; they
share one store, one cache and size cap, one engine provider (one build at a time) and one memory budget.

The repository's own loop watches the desired file: a model added there starts its life cycle, a model removed
there is drained and released, and every model re-reads its entry at once when the file changes.

Readiness (``ready_policy``): ``all`` — every desired model (those not unloaded through the repository API) is
validated and serving its desired version; ``any`` — at least one is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from edge_runtime.build.device import DeviceFacts
from edge_runtime.fetch.desired import DesiredModels
from edge_runtime.lifecycle import CycleResult, ModelRuntime
from edge_runtime.report.events import Reporter, describe
from edge_runtime.resources import DeviceResources
from edge_runtime.serve.slot import ServingModel
from edge_runtime.settings import EdgeSettings
from edgeloop_core.contract import check_name
from edgeloop_core.errors import ModelNotFound
from edgeloop_core.store import ObjectStore

log = logging.getLogger(__name__)
TRITON_UNANSWERED = 3
"""ServerLive failures in a row (each waits up to 2 s, a look a second) after which a running tritonserver counts
as hung and is killed and restarted."""


def _serves(stubs: set[tuple[str, str]], name: str, version: str) -> bool:
    """A live stub of this Triton version of model ``name``, or of a newer one (Triton swapping to what the runtime is
    about to serve); a version edgeloop does not know yet counts as served."""
    return not version.isdigit() or any(n == name and v.isdigit() and int(v) >= int(version) for n, v in stubs)


class ModelRepository:
    """The device's models, by name. All coroutines run on one event loop."""

    def __init__(self, settings: EdgeSettings, facts: DeviceFacts, *, store: ObjectStore | None = None,
                 report: Reporter | None = None,
                 on_batch: Callable[[str, int, float], None] | None = None) -> None:
        self.shared = DeviceResources.create(settings, facts, store)
        self.desired = DesiredModels(settings)
        self._report = report or (lambda kind, payload: None)
        self._on_batch = on_batch
        self.runtimes: dict[str, ModelRuntime] = {}
        """Model name → its life cycle, in the order the desired state lists them."""
        self._tasks: dict[str, asyncio.Task] = {}
        self._listeners: list[Callable[[], None]] = []
        self._heartbeat = time.monotonic()
        self.triton_up = False
        """tritonserver runs and holds every serving model (engine triton)."""
        self._triton_retry_at = 0.0
        self._triton_delay = settings.retry_initial_s
        self._triton_unanswered = 0
        """ServerLive calls tritonserver failed in a row while its process ran."""
        self._stubs_missing: dict[str, float] = {}
        """Model → when its Python-backend stub was first seen missing (missing at a later look is a fault)."""
        self._stub_backoff: dict[str, tuple[float, float]] = {}
        """Model → (next reload allowed at, the delay after that one) while its stub stays dead."""
        try:
            names = list(self.desired.read())
        except Exception as exc:  # noqa: BLE001 - the settings' models start; the loop reports the file's problem
            log.warning("the desired state does not read: %s", describe(exc))
            names = [e.name for e in settings.desired_models()]
        for name in names:
            self._add(name)

    # --- the set of models ---------------------------------------------------------------------------------------
    @property
    def settings(self) -> EdgeSettings:
        return self.shared.settings

    @property
    def facts(self) -> DeviceFacts:
        return self.shared.facts

    @property
    def triton(self) -> Any:  # noqa: ANN401 - edge_runtime.serve.triton.dataplane.TritonServer, imported only when used
        """The supervised tritonserver (``serving_engine`` triton), else ``None``."""
        return self.shared.triton

    @facts.setter
    def facts(self, value: DeviceFacts) -> None:
        self.shared.facts = value

    def _add(self, name: str) -> ModelRuntime:
        on_batch = self._on_batch
        runtime = ModelRuntime(name, self.shared, self.desired, report=self._report,
                               on_batch=(lambda rows, seconds: on_batch(name, rows, seconds)) if on_batch else None,
                               keep=lambda: self.keeps(excluding=name))
        for listener in self._listeners:
            runtime.on_change(listener)
        self.runtimes[name] = runtime
        return runtime

    def keeps(self, excluding: str = "") -> set[tuple[str, str]]:
        """Versions the cache must keep for every model (but ``excluding``): serving, desired, being brought up."""
        kept: set[tuple[str, str]] = set()
        for name, runtime in self.runtimes.items():
            if name != excluding:
                kept |= runtime.keeps()
        return kept

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every state change of any model (health, metrics, node annotations)."""
        self._listeners.append(listener)
        for runtime in self.runtimes.values():
            runtime.on_change(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:  # a hook must not break the repository
                log.exception("state listener failed")

    def only(self) -> ModelRuntime:
        """The life cycle of the one model this device serves (the simple case); ModelNotFound when it serves
        several or none."""
        if len(self.runtimes) != 1:
            raise ModelNotFound(f"this device serves {len(self.runtimes)} models: name one of "
                                f"{sorted(self.runtimes)}")
        return next(iter(self.runtimes.values()))

    def runtime(self, name: str) -> ModelRuntime:
        """The life cycle of model ``name``, or ModelNotFound naming what this device serves."""
        runtime = self.runtimes.get(name)
        if runtime is None:
            served = ", ".join(repr(n) for n in self.runtimes) or "none"
            raise ModelNotFound(f"model {name!r} is not served here (this device serves {served})")
        return runtime

    # --- state -----------------------------------------------------------------------------------------------
    def active(self) -> list[ModelRuntime]:
        """The desired models: all but those unloaded through the repository API."""
        return [r for r in self.runtimes.values() if not r.paused]

    def ready(self) -> bool:
        """Server readiness by ``ready_policy`` (see the module docstring); with Triton serving, also that
        tritonserver runs."""
        active = self.active()
        if not active or (self.triton is not None and not self.triton_up):
            return False
        ready = [r.ready() for r in active]
        return all(ready) if self.settings.ready_policy == "all" else any(ready)

    def status(self) -> dict[str, Any]:
        """A snapshot for telemetry and the CLI: readiness, and each model's status."""
        status = {"ready": self.ready(), "ready_policy": self.settings.ready_policy,
                  "models": [r.status() for r in self.runtimes.values()]}
        if self.triton is not None:
            status["triton"] = {"running": self.triton_up, "restarts": self.triton.restarts,
                                "grpc_port": self.triton.grpc_port, "metrics_port": self.triton.metrics_port}
        return status

    def index(self) -> list[dict[str, Any]]:
        """Every model with its status (the repository index)."""
        return [r.status() for r in self.runtimes.values()]

    def beat(self) -> None:
        self._heartbeat = time.monotonic()

    def wedged(self) -> bool:
        """The repository's loop or any model's loop has been silent past ``liveness_timeout_s``."""
        if time.monotonic() - self._heartbeat > self.settings.liveness_timeout_s:
            return True
        return any(r.wedged() for r in self.runtimes.values())

    def loops_alive(self) -> bool:
        """No model's loop has ended (only cancellation ends one)."""
        return not any(task.done() for task in self._tasks.values())

    # --- serving -------------------------------------------------------------------------------------------------
    def model(self, name: str, version: str = "") -> ServingModel:
        """The serving model called ``name`` (and ``version`` when given), or the right error."""
        return self.runtime(name).model(name, version)

    # --- the repository API ----------------------------------------------------------------------------------
    async def load(self, name: str, version: str | None = None) -> CycleResult:
        """Serve ``name`` now (added to the desired set when no source lists it), pinned to ``version`` when given;
        returns when that cycle ends (its error, when it fails)."""
        check_name(name, "model name")
        self.desired.pin(name, version)
        runtime = self.runtimes.get(name) or self._add(name)
        self._start(runtime)
        self._changed()
        return await runtime.load()

    async def unload(self, name: str) -> None:
        """Stop serving ``name``; the others are untouched. It stays unloaded until a load request."""
        await self.runtime(name).unload()

    # --- the loop ----------------------------------------------------------------------------------------------
    def _start(self, runtime: ModelRuntime) -> None:
        task = self._tasks.get(runtime.name)
        if task is None or task.done():
            self._tasks[runtime.name] = asyncio.get_running_loop().create_task(
                runtime.run_forever(), name=f"edgeloop-model-{runtime.name}")

    async def _retire(self, name: str) -> None:
        """Model ``name`` left the desired set: stop its loop, drain and release it."""
        runtime = self.runtimes.pop(name)
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await runtime.close(retire=True)
        self._report("removed", {"model_name": name, "version": runtime.desired_version})
        self._changed()

    async def sync(self) -> None:
        """Bring the set of life cycles to the desired set and wake every model to re-read its entry. A desired file
        that does not read is reported; the models keep what they serve."""
        self.desired.mark_seen()  # before reading: an edit from now on is noticed as a change
        try:
            desired = self.desired.read()
        except Exception as exc:  # noqa: BLE001 - a bad file must not stop the repository
            reason = describe(exc)
            log.warning("the desired state does not read: %s", reason)
            self._report("failed", {"error": reason, "error_kind": type(exc).__name__, "scope": "desired state"})
            for runtime in self.runtimes.values():
                runtime.wake()  # each reports the failure under its own name too
            return
        for name in [n for n in self.runtimes if n not in desired]:
            await self._retire(name)
        for name in desired:
            if name not in self.runtimes:
                self._add(name)
                self._changed()
        for runtime in self.runtimes.values():
            self._start(runtime)
            if not runtime.paused:
                runtime.wake()

    async def start_triton(self) -> None:
        """Start tritonserver (engine triton) before any model loads; EngineError with its log if it cannot."""
        if self.triton is not None and not self.triton.running():
            await asyncio.to_thread(self.triton.start)
            self.triton_up = True
            self._changed()

    async def _watch_triton(self) -> None:
        """tritonserver exiting, or no longer answering ServerLive (hung, stopped) at :data:`TRITON_UNANSWERED`
        looks in a row, is a fault like any other: reported, (killed and) restarted with back-off, and every model's
        last good version loaded into it again."""
        if self.triton is None:
            return
        hung = None
        if self.triton_up and self.triton.running():
            if await asyncio.to_thread(self.triton.live):
                self._triton_unanswered = 0
                await self._watch_stubs()
                return
            self._triton_unanswered += 1
            if self._triton_unanswered < TRITON_UNANSWERED:
                return
            hung = f"tritonserver stopped answering (ServerLive failed {self._triton_unanswered} times in a row)"
            await asyncio.to_thread(self.triton.stop, 0)  # SIGTERM, then SIGKILL at once: a hung one ignores SIGTERM
        if self.triton_up:  # it was running: it died, or hung and was killed
            self.triton_up = False
            self._triton_unanswered = 0
            reason = hung or f"tritonserver exited (code {self.triton.exit_code()}): {self.triton.log_tail(2)}"
            log.error("%s; restarting it in %.1fs", reason, self._triton_delay)
            self._report("failed", {"error": reason, "error_kind": "EngineError", "scope": "triton"})
            self._triton_retry_at = time.monotonic() + self._triton_delay
            self._changed()
        if time.monotonic() < self._triton_retry_at:
            return
        try:
            await asyncio.to_thread(self.triton.stop)  # off the event loop: it may wait for the process to end
            await asyncio.to_thread(self.triton.start)
        except Exception as exc:  # noqa: BLE001 - try again after the back-off
            self._triton_delay = min(self._triton_delay * 2, self.settings.retry_max_s)
            self._triton_retry_at = time.monotonic() + self._triton_delay
            self._report("failed", {"error": f"tritonserver did not restart: {describe(exc)}",
                                    "error_kind": type(exc).__name__, "scope": "triton"})
            return
        self.triton.restarts += 1
        self.triton_up = True
        self._triton_delay = self.settings.retry_initial_s
        for runtime in self.runtimes.values():
            with contextlib.suppress(Exception):  # reported by the runtime; its loop retries
                await runtime.reload_into_triton()
        self._report("triton_restarted", {"restarts": self.triton.restarts})
        self._changed()

    async def _watch_stubs(self) -> None:
        """A Python-backend model whose stub died leaves tritonserver running and the model "ready" while every
        request to it fails ("Stub process is not healthy"). Missing at two looks in a row, it is reported and the model
        loaded again, which starts a new stub (with back-off while that does not help). edgeloop's own backend has no
        stubs: a crash there takes tritonserver down, which :meth:`_watch_triton` handles."""
        if self.triton.install.ort_backend != "python":
            return
        expected = {name: (runtime, str(getattr(runtime.serving.engine, "version", "")))
                    for name, runtime in self.runtimes.items()
                    if runtime.serving is not None and not runtime.paused
                    and getattr(runtime.serving.engine, "platform", "") != "tensorrt_plan"}
        alive = await asyncio.to_thread(self.triton.python_stubs) if expected else set()
        if alive is not None and not all(_serves(alive, name, version) for name, (_, version) in expected.items()):
            alive = await asyncio.to_thread(self.triton.python_stubs, True)  # new stubs since, or a dead one
        if alive is None:  # no /proc: nothing to go by
            return
        now = time.monotonic()
        for name in set(self._stubs_missing) - set(expected):
            self._stubs_missing.pop(name)
            self._stub_backoff.pop(name, None)
        for name, (runtime, version) in expected.items():
            if _serves(alive, name, version):
                self._stubs_missing.pop(name, None)
                self._stub_backoff.pop(name, None)
                continue
            if self._stubs_missing.setdefault(name, now) == now:
                continue  # first look
            retry_at, delay = self._stub_backoff.get(name, (0.0, self.settings.retry_initial_s))
            if now < retry_at:
                continue
            self._stub_backoff[name] = (now + delay, min(delay * 2, self.settings.retry_max_s))
            reason = (f"the Triton Python-backend stub of {name} (Triton version {version}) died, so every request to "
                      f"it failed: loading it again")
            log.error("%s", reason)
            self._report("failed", {"model_name": name, "version": runtime.serving.version, "error": reason,
                                    "error_kind": "EngineError", "scope": "triton"})
            with contextlib.suppress(Exception):  # reported by the runtime; tried again after the back-off
                # unloaded first: Triton skips loading a model whose files did not change, dead stub or not
                await asyncio.to_thread(self.triton.unload, name)
                await runtime.reload_into_triton()

    async def run_forever(self, period_s: float = 1.0) -> None:
        """Start every model's loop, then watch the desired file (and the loops, and tritonserver) every
        ``period_s``."""
        await self.sync()
        while True:
            self.beat()
            try:
                await self._watch_triton()
                if self.desired.changed():
                    await self.sync()
                for name, task in list(self._tasks.items()):
                    if task.done() and name in self.runtimes:  # only a bug ends a model's loop: say so, start again
                        error = task.exception() if not task.cancelled() else None
                        log.error("the life-cycle loop of %s ended (%s): starting it again", name,
                                  describe(error) if error else "cancelled")
                        self._start(self.runtimes[name])
            except Exception as exc:  # the repository's loop outlives anything
                log.exception("repository loop: %s", describe(exc))
            await asyncio.sleep(period_s)

    async def close(self) -> None:
        """Stop every loop; drain and release every model; stop tritonserver."""
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for runtime in self.runtimes.values():
            await runtime.close()
        if self.triton is not None:
            self.triton_up = False
            await asyncio.to_thread(self.triton.stop)
