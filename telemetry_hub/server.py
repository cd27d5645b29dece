"""The hub's gRPC service (``edgeloop.telemetry.v1.TelemetryHub``) with bearer-token authentication.

Two kinds of token: a device token is bound to one device id (``device:token``) and may only report as that
device; a reader token (``HUB_READ_TOKENS``) may read the fleet and report nothing. Tokens are looked up by their
sha256, never compared one by one. TLS (and mutual TLS) with ``HUB_TLS_*``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.exc import OperationalError

from edgeloop_core.errors import AccessDenied, ConfigError, HubAuthError, InvalidInput, Overloaded, StoreUnavailable
from edgeloop_core.protos import telemetry_pb2 as pb
from edgeloop_core.protos import telemetry_pb2_grpc
from edgeloop_core.rpc_errors import ErrorMapping
from edgeloop_core.tls import HubTls, TlsFiles
from telemetry_hub.admission import AdmissionLimit, HubMetrics
from telemetry_hub.store import HubStore, IncomingEvent, Ingested


class HubSettings(BaseSettings):
    """Settings of ``edgeloop hub serve``; every field reads ``HUB_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="HUB_", extra="forbid")

    database_url: str = Field("sqlite:///hub.sqlite", description="SQLAlchemy URL (SQLite, or postgresql+psycopg://)")
    bind_address: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(50052, ge=0, le=65535, description="gRPC port (0: pick one)")
    tokens: SecretStr | None = Field(None, description="comma-separated device tokens, each `device:token`")
    tokens_file: Path | None = Field(None, description="file with one `device:token` per line")
    read_tokens: SecretStr | None = Field(
        None, description="comma-separated tokens that may read the fleet (edgeloop fleet status) and report nothing")
    tls_cert_file: Path | None = Field(None, description="server certificate (PEM): set with tls_key_file for TLS")
    tls_key_file: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca_file: Path | None = Field(
        None, description="CA (PEM) for client certificates: set, every device must present one (mutual TLS)")
    max_concurrent_rpcs: int = Field(
        1024, gt=0, description="the ceiling of the adaptive admission limit: calls in progress at once at most. "
                                "Under it the limit follows the latency of admitted calls (see "
                                "admission_target_latency_ms); calls past the limit get RESOURCE_EXHAUSTED at once "
                                "(devices back off) instead of queueing until they time out")
    admission_target_latency_ms: float = Field(
        50.0, gt=0, description="the latency (ms) an admitted Report call should finish within: while calls do, the "
                                "admission limit grows (to max_concurrent_rpcs); when they take longer it shrinks, to "
                                "about the hub's measured capacity (calls/s) × this. Far below a device's 10 s "
                                "deadline, above a healthy hub's p99")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port (admission limit, calls in "
                                                             "flight, refusals); 0: off")
    stats_retention_days: int = Field(
        14, ge=1, description="days of stats kept at 5-minute resolution (rollups per device and model); also how "
                              "old a stats event may be stamped and still be kept. State changes are kept for good")
    stats_raw_retention_hours: float = Field(
        1.0, ge=0.1, description="hours raw stats events are kept after their stamp and their arrival: the window a "
                                 "resend is recognised in (a device resends within its back-off, at most a minute) "
                                 "and a device's recent stats can be read one by one; older ones live in the "
                                 "rollups only")
    stats_hourly_retention_days: int = Field(
        90, ge=1, description="days of stats kept at hourly resolution (at least stats_retention_days)")
    rollup_interval_s: float = Field(
        60.0, gt=0, description="how often raw stats are rolled up (what arrived up to 2 minutes before) and raw "
                                "stats past their window deleted")
    maintenance_interval_s: float = Field(
        3600.0, gt=0, description="how often each tier's retention runs (and PostgreSQL's day partitions are made "
                                  "ahead)")
    otlp_endpoint: str | None = Field(
        None, description="OpenTelemetry collector, OTLP/gRPC (e.g. http://otel-collector:4317; https:// for TLS): "
                          "set, one replica pushes the fleet's latest state there as gauges")
    otlp_interval_s: float = Field(60.0, gt=0, description="how often the fleet's gauges are pushed over OTLP")
    max_connection_age_s: float = Field(
        300.0, gt=0, description="connections are closed (gracefully) after this long, so devices spread again over "
                                 "the replicas behind a Service")


log = logging.getLogger(__name__)

READER = None
"""The principal of a reader token (it is bound to no device)."""


def token_digest(token: str) -> str:
    """The key tokens are looked up by: their sha256 (the table never holds a token, and lookup takes no scan)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Tokens:
    """sha256(token) → the device id it is bound to, or :data:`READER` for a fleet reader."""

    by_digest: dict[str, str | None]

    def who(self, presented: str) -> str | None:
        """The device id (or READER) of ``presented``; :class:`HubAuthError` for an unknown or empty token."""
        digest = token_digest(presented) if presented else ""
        if digest not in self.by_digest:
            raise HubAuthError("missing or unknown token")
        return self.by_digest[digest]


def load_tokens(settings: HubSettings) -> Tokens:
    """Device tokens (each bound: ``device:token``) and reader tokens. At least one device token is required."""
    lines: list[str] = []
    if settings.tokens is not None:
        lines += settings.tokens.get_secret_value().split(",")
    if settings.tokens_file is not None:
        try:
            lines += Path(settings.tokens_file).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read tokens file {settings.tokens_file}: {exc.strerror}") from exc
    tokens: dict[str, str | None] = {}
    for line in (x.strip() for x in lines):
        if not line or line.startswith("#"):
            continue
        device, sep, token = line.rpartition(":")
        if not sep or not device or not token:
            raise ConfigError("every device token must be bound to its device as `device:token` (an unbound token "
                              "could report as any device); fleet readers use HUB_READ_TOKENS")
        tokens[token_digest(token)] = device
    if not tokens:
        raise ConfigError("the hub needs device tokens: set HUB_TOKENS or HUB_TOKENS_FILE")
    if settings.read_tokens is not None:
        for token in (t.strip() for t in settings.read_tokens.get_secret_value().split(",")):
            if token:
                if token_digest(token) in tokens:
                    raise ConfigError("a reader token must differ from every device token")
                tokens[token_digest(token)] = READER
    return Tokens(tokens)


class GroupWriter:
    """Group commit: the Report calls that arrive while a transaction is being written are written together in the
    next one (:meth:`HubStore.ingest_many`), and each call is answered once its events are committed. Under load the
    groups grow by themselves, so the database cost per call falls as the load rises; when idle a call is written
    at once. A group that fails is retried call by call, so one bad call fails alone."""

    def __init__(self, store: HubStore, max_calls: int = 256) -> None:
        self.store = store
        self.max_calls = max_calls
        self._queue: asyncio.Queue[tuple[str, list[IncomingEvent], asyncio.Future]] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.groups = 0
        self.calls = 0

    async def submit(self, device_id: str, batch: list[IncomingEvent]) -> Ingested:
        """Queue one call's events for the next group; returns what they came to once committed."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((device_id, batch, future))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._write_forever(), name="hub-group-writer")
        return await future

    async def _write_forever(self) -> None:
        while True:
            items = [await self._queue.get()]
            while len(items) < self.max_calls and not self._queue.empty():
                items.append(self._queue.get_nowait())
            items = [i for i in items if not i[2].done()]  # callers that gave up (deadline, cancel) are skipped
            if not items:
                continue
            self.groups += 1
            self.calls += len(items)
            try:
                results: list[Any] = await asyncio.to_thread(self.store.ingest_many, [(d, b) for d, b, _ in items])
            except Exception as exc:  # noqa: BLE001 - isolate the bad call: the others must not fail with it
                if len(items) == 1:
                    results = [exc]
                else:
                    results = []
                    for device_id, batch, _ in items:
                        try:
                            results.append(await asyncio.to_thread(self.store.ingest, device_id, batch))
                        except Exception as one:  # noqa: BLE001 - handed to that call, mapped by ErrorMapping
                            results.append(one)
            for (_, _, future), result in zip(items, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class TelemetryServicer(telemetry_pb2_grpc.TelemetryHubServicer):
    """Report (ingest, grouped into shared transactions) and FleetStatus over :class:`HubStore`, behind an admission
    limit of our own (:class:`~telemetry_hub.admission.AdmissionLimit`, adaptive): grpc.aio's
    ``maximum_concurrent_rpcs`` stops refusing after the first wave of overload (grpc/grpc#41531), so calls past the
    limit are refused here, at once, with RESOURCE_EXHAUSTED."""

    def __init__(self, store: HubStore, tokens: Tokens, admission: AdmissionLimit | None = None) -> None:
        self.store = store
        self.tokens = tokens
        self.writer = GroupWriter(store)
        self.admission = admission or AdmissionLimit(1024, 0.05)

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        started = self.admission.acquire()
        if started is None:
            raise Overloaded(f"the hub has {self.admission.in_flight} calls in progress, its limit now: retry after "
                             f"a back-off")
        overloaded = False
        try:
            yield
        except (StoreUnavailable, OperationalError):  # the database could not keep up (or is gone): back off too
            overloaded = True
            raise
        finally:
            self.admission.release(started, overloaded=overloaded)

    def _authenticate(self, context: grpc.aio.ServicerContext, device_id: str | None) -> None:
        """``device_id`` set: the caller must hold that device's token; ``None``: a reader token."""
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        principal = self.tokens.who(header.removeprefix("Bearer ").strip())
        if device_id is None and principal is not READER:
            raise AccessDenied("a device token cannot read the fleet: use a reader token (HUB_READ_TOKENS)")
        if device_id is not None and principal != device_id:
            raise AccessDenied(f"this token may not report as device {device_id!r}")

    async def Report(self, request: pb.ReportRequest, context: grpc.aio.ServicerContext) -> pb.ReportResponse:  # noqa: N802
        with self._admitted():
            self._authenticate(context, request.device_id)
            batch = [IncomingEvent(e.id, e.kind, e.timestamp_ms, e.payload_json) for e in request.events]
            done = await self.writer.submit(request.device_id, batch)
            return pb.ReportResponse(acknowledged_ids=done.ids, duplicates=done.duplicates,
                                     stats_out_of_window=done.out_of_window, clock_skew_ms=done.clock_skew_ms or 0)

    async def FleetStatus(self, request: pb.FleetStatusRequest, context: grpc.aio.ServicerContext) -> pb.FleetStatusResponse:  # noqa: N802,E501
        self._authenticate(context, None)
        if request.page_size < 0:
            raise InvalidInput("page_size must not be negative")
        size = min(request.page_size or PAGE_SIZE, MAX_PAGE_SIZE)
        filters = {"state": request.state, "model_name": request.model_name, "version": request.version,
                   "stale_since_ms": request.stale_since_ms}
        after = None
        if request.page_token:
            try:
                device, model = json.loads(request.page_token)
                after = (str(device), str(model))
            except (ValueError, TypeError) as exc:
                raise InvalidInput("page_token is not one this hub handed out") from exc
        rows = await asyncio.to_thread(self.store.fleet, limit=size + 1, after=after, **filters)
        more, rows = len(rows) > size, rows[:size]
        token = json.dumps([rows[-1]["device_id"], rows[-1]["model_name"]]) if more else ""
        response = pb.FleetStatusResponse(next_page_token=token, devices=[device_status(r) for r in rows])
        if not request.page_token:  # the summary comes first, with the first page
            counts = await asyncio.to_thread(self.store.fleet_summary, **filters)
            for state, count in counts.items():
                response.state_counts[state] = count
            response.total = sum(counts.values())
        return response


def device_status(r: Any) -> pb.DeviceStatus:  # noqa: ANN401 - a row mapping of HubStore.fleet
    """One row of :meth:`HubStore.fleet` as a DeviceStatus (feedback counts only when they are of the serving
    version: another version's are not this one's accuracy)."""
    serving = r["serving_version"] or ""
    feedback = r["feedback_version"] == serving != ""
    return pb.DeviceStatus(
        device_id=r["device_id"], model_name=r["model_name"] or "", target_key=r["target_key"] or "",
        desired_version=r["desired_version"] or "", serving_version=serving, state=r["state"] or "",
        validation_result=r["validation_result"] or "", p50_ms=r["p50_ms"] or 0.0, p99_ms=r["p99_ms"] or 0.0,
        last_seen_ms=r["last_seen_ms"] or 0, facts_json=r["facts_json"] or "{}",
        batching_json=r["batching_json"] or "", variant_json=r["variant_json"] or "",
        drift_json=r["drift_json"] or "", stats_out_of_window=r["stats_out_of_window"] or 0,
        clock_skew_ms=r["clock_skew_ms"] or 0, clock_skew_known=r["clock_skew_ms"] is not None,
        serving_since_ms=(r["serving_since_ms"] or 0) if serving else 0,
        feedback_labels=r["feedback_labels"] if feedback else 0, feedback_known=r["feedback_known"] if feedback else 0,
        feedback_correct=r["feedback_correct"] if feedback else 0)


async def start_hub(settings: HubSettings, store: HubStore | None = None) -> tuple[grpc.aio.Server, int, HubStore]:
    """Start the hub; returns ``(server, bound port, store)``."""
    store = store or HubStore(settings.database_url, stats_retention_days=settings.stats_retention_days,
                              raw_retention_hours=settings.stats_raw_retention_hours,
                              hourly_retention_days=settings.stats_hourly_retention_days)
    age_ms = int(settings.max_connection_age_s * 1000)
    server = grpc.aio.server(options=[("grpc.max_connection_age_ms", age_ms),
                                      ("grpc.max_connection_age_grace_ms", min(age_ms, 30_000)),
                                      # calls the event loop has not picked up yet (not the calls in progress,
                                      # which the admission limit sizes): past these, gRPC cancels the newest at
                                      # once (a device backs off) instead of letting them age behind a busy loop
                                      ("grpc.server.max_pending_requests", PENDING_CALLS),
                                      ("grpc.server.max_pending_requests_hard_limit", 2 * PENDING_CALLS),
                                      ("grpc.server_max_unrequested_time_in_server", 1)])
    metrics = HubMetrics()
    admission = AdmissionLimit(settings.max_concurrent_rpcs, settings.admission_target_latency_ms / 1000, metrics)
    servicer = TelemetryServicer(store, load_tokens(settings), admission)
    ErrorMapping().add_servicer(telemetry_pb2_grpc.add_TelemetryHubServicer_to_server, servicer, server)
    address = f"{settings.bind_address}:{settings.port}"
    if settings.tls_cert_file or settings.tls_key_file:
        if not (settings.tls_cert_file and settings.tls_key_file):
            raise ConfigError("set both HUB_TLS_CERT_FILE and HUB_TLS_KEY_FILE for TLS")
        tls = TlsFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
        port = server.add_secure_port(address, tls.credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"cannot bind the hub to {settings.bind_address}:{settings.port}: is the port in use?")
    await server.start()
    if settings.metrics_port:
        try:
            metrics.serve(settings.bind_address, settings.metrics_port)
        except OSError as exc:
            await server.stop(0)
            raise ConfigError(f"cannot serve the hub's metrics on {settings.bind_address}:{settings.metrics_port}: "
                              f"{exc.strerror}") from exc

    maintenance = asyncio.get_running_loop().create_task(maintain(store, settings), name="hub-maintenance")
    fleet_metrics = None
    if settings.otlp_endpoint:
        from telemetry_hub.otlp import FleetMetrics

        fleet_metrics = FleetMetrics(store, settings.otlp_endpoint, settings.otlp_interval_s)
    grpc_stop = server.stop

    async def stop(grace: float | None) -> None:  # stopping the hub stops its maintenance, writer and export too
        maintenance.cancel()
        await grpc_stop(grace)
        await servicer.writer.close()
        if fleet_metrics is not None:
            await asyncio.to_thread(fleet_metrics.close)

    server.stop = stop
    return server, port, store


async def maintain(store: HubStore, settings: HubSettings) -> None:
    """The hub's background loop: every ``rollup_interval_s`` roll raw stats up (and trim them), every
    ``maintenance_interval_s`` apply each tier's retention. Every replica may run it (both are safe to run at once).
    A failure is logged and the next round tries again; the hub keeps serving."""
    loop = asyncio.get_running_loop()
    retained_at = loop.time()
    while True:
        await asyncio.sleep(min(settings.rollup_interval_s, settings.maintenance_interval_s))
        try:
            done = await asyncio.to_thread(store.roll_up)
            if done["rows"] or done["trimmed"]:
                log.info("stats rollup: %s", done)
        except Exception as exc:  # noqa: BLE001 - the next round tries again (the watermark says where)
            log.warning("stats rollup failed: %s", exc)
        if loop.time() - retained_at < settings.maintenance_interval_s:
            continue
        retained_at = loop.time()
        try:
            log.info("retention: %s", await asyncio.to_thread(store.apply_retention))
        except Exception as exc:  # noqa: BLE001 - the next round tries again; the hub keeps serving
            log.warning("retention failed: %s", exc)


PENDING_CALLS = 256
"""Calls gRPC holds for the event loop to pick up, at most (then it cancels the newest at once): a burst that arrives
faster than the loop picks calls up waits here, about 0.1 s of a whole-core hub's pick-up rate (64 cancelled bursts a
hub had the headroom for); a call that waits here longer than 1 s is cancelled anyway."""
PAGE_SIZE = MAX_PAGE_SIZE = 1000
"""Devices per FleetStatus reply: a page of 1000 is about 1 MB, far below gRPC's 4 MiB default."""


async def fleet_pages(address: str, token: str, tls: HubTls | None = None, **filters: str | int | None,
                      ) -> AsyncIterator[pb.FleetStatusResponse]:
    """Yield FleetStatus replies page by page (the first carries ``state_counts`` and ``total``)."""
    channel = grpc.aio.secure_channel(address, tls.credentials()) if tls else grpc.aio.insecure_channel(address)
    async with channel:
        stub = telemetry_pb2_grpc.TelemetryHubStub(channel)
        token_page = ""
        while True:
            try:
                reply = await stub.FleetStatus(pb.FleetStatusRequest(page_token=token_page, **filters),
                                               metadata=(("authorization", f"Bearer {token}"),), timeout=30)
            except grpc.aio.AioRpcError as exc:
                _raise_for(exc, address)
            yield reply
            if not reply.next_page_token:
                return
            token_page = reply.next_page_token


def _raise_for(exc: grpc.aio.AioRpcError, address: str) -> None:
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        raise HubAuthError(f"the hub at {address} refused the token") from exc
    if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
        raise AccessDenied(f"the hub at {address}: {exc.details()}") from exc
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        raise StoreUnavailable(f"the hub at {address} answered RESOURCE_EXHAUSTED ({exc.details()}): it is "
                               f"overloaded, or a reply is larger than the client accepts; retry later") from exc
    raise StoreUnavailable(f"cannot reach the telemetry hub at {address} ({exc.code().name})") from exc


async def fleet_status(address: str, token: str, tls: HubTls | None = None, **filters: str | int | None,
                       ) -> list[pb.DeviceStatus]:
    """Every device's state the filters select, from the hub at ``address`` (with a reader token), page by page."""
    devices: list[pb.DeviceStatus] = []
    async for reply in fleet_pages(address, token, tls, **filters):
        devices.extend(reply.devices)
    return devices

