"""The hub's gRPC service (``edgeloop.telemetry.v1.TelemetryHub``) with bearer-token device authentication."""

from __future__ import annotations

import asyncio
import hmac
from pathlib import Path

import grpc
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from edge_runtime.errors import ConfigError, HubAuthError
from edge_runtime.protos import telemetry_pb2 as pb
from edge_runtime.protos import telemetry_pb2_grpc
from edge_runtime.serve.errors import ErrorInterceptor
from telemetry_hub.store import HubStore, IncomingEvent


class HubSettings(BaseSettings):
    """Settings of ``edgeloop hub serve``; every field reads ``HUB_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="HUB_", extra="forbid")

    database_url: str = Field("sqlite:///hub.sqlite", description="SQLAlchemy URL (SQLite, or postgresql+psycopg://)")
    bind_address: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(50052, ge=0, le=65535, description="gRPC port (0: pick one)")
    tokens: SecretStr | None = Field(None, description="comma-separated device tokens, each `token` or `device:token`")
    tokens_file: Path | None = Field(None, description="file with one `token` or `device:token` per line")


def load_tokens(settings: HubSettings) -> dict[str, str | None]:
    """``token → device id`` (``None``: any device may use it). At least one token is required."""
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
        tokens[token if sep else line] = device if sep else None
    if not tokens:
        raise ConfigError("the hub needs device tokens: set HUB_TOKENS or HUB_TOKENS_FILE")
    return tokens


class TelemetryServicer(telemetry_pb2_grpc.TelemetryHubServicer):
    """Report (ingest) and FleetStatus, each a handful of lines over :class:`HubStore`."""

    def __init__(self, store: HubStore, tokens: dict[str, str | None]) -> None:
        self.store = store
        self.tokens = tokens

    def _authenticate(self, context: grpc.aio.ServicerContext, device_id: str | None) -> None:
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        presented = header.removeprefix("Bearer ").strip()
        for token, bound_device in self.tokens.items():
            if presented and hmac.compare_digest(presented, token):
                if bound_device is not None and device_id is not None and bound_device != device_id:
                    raise HubAuthError(f"this token belongs to another device than {device_id!r}")
                return
        raise HubAuthError("missing or unknown device token")

    async def Report(self, request: pb.ReportRequest, context: grpc.aio.ServicerContext) -> pb.ReportResponse:  # noqa: N802
        self._authenticate(context, request.device_id)
        batch = [IncomingEvent(e.id, e.kind, e.timestamp_ms, e.payload_json) for e in request.events]
        ids, duplicates = await asyncio.to_thread(self.store.ingest, request.device_id, batch)
        return pb.ReportResponse(acknowledged_ids=ids, duplicates=duplicates)

    async def FleetStatus(self, request: pb.FleetStatusRequest, context: grpc.aio.ServicerContext) -> pb.FleetStatusResponse:  # noqa: N802,E501
        self._authenticate(context, None)
        rows = await asyncio.to_thread(self.store.fleet)
        return pb.FleetStatusResponse(devices=[
            pb.DeviceStatus(device_id=r["device_id"], model_name=r["model_name"] or "",
                            target_key=r["target_key"] or "",
                            desired_version=r["desired_version"] or "", serving_version=r["serving_version"] or "",
                            state=r["state"] or "", validation_result=r["validation_result"] or "",
                            p50_ms=r["p50_ms"] or 0.0, p99_ms=r["p99_ms"] or 0.0, last_seen_ms=r["last_seen_ms"] or 0,
                            facts_json=r["facts_json"] or "{}", batching_json=r["batching_json"] or "",
                            variant_json=r["variant_json"] or "")
            for r in rows])


async def start_hub(settings: HubSettings, store: HubStore | None = None) -> tuple[grpc.aio.Server, int, HubStore]:
    """Start the hub; returns ``(server, bound port, store)``."""
    store = store or HubStore(settings.database_url)
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    telemetry_pb2_grpc.add_TelemetryHubServicer_to_server(TelemetryServicer(store, load_tokens(settings)), server)
    port = server.add_insecure_port(f"{settings.bind_address}:{settings.port}")
    if port == 0:
        raise ConfigError(f"cannot bind the hub to {settings.bind_address}:{settings.port}: is the port in use?")
    await server.start()
    return server, port, store


async def fleet_status(address: str, token: str) -> list[pb.DeviceStatus]:
    """Ask the hub at ``address`` for every device's state."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = telemetry_pb2_grpc.TelemetryHubStub(channel)
        try:
            reply = await stub.FleetStatus(pb.FleetStatusRequest(), metadata=(("authorization", f"Bearer {token}"),),
                                           timeout=10)
        except grpc.aio.AioRpcError as exc:
            from edge_runtime.errors import StoreUnavailable

            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise HubAuthError(f"the hub at {address} refused the token") from exc
            raise StoreUnavailable(f"cannot reach the telemetry hub at {address} ({exc.code().name})") from exc
    return list(reply.devices)
