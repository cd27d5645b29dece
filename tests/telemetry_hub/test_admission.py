"""Admission sized from what the hub measures: a burst the hub has headroom for is taken in (a constant 64 refused
it), a hub whose calls take longer than the target refuses the excess at once, and refusals are counted in
Prometheus."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
import uuid

import grpc
import pytest

from edgeloop_core.protos import telemetry_pb2 as pb
from edgeloop_core.protos import telemetry_pb2_grpc
from telemetry_hub.admission import INITIAL_LIMIT, MIN_LIMIT, AdmissionLimit
from telemetry_hub.server import HubSettings, start_hub
from telemetry_hub.store import HubStore


def test_the_limit_grows_while_calls_are_fast_and_backs_off_once_per_target_when_slow():
    now = [0.0]
    limit = AdmissionLimit(200, 0.05, clock=lambda: now[0])
    assert limit.limit == INITIAL_LIMIT
    for _ in range(500):  # fast calls: +1 each, up to the ceiling
        started = limit.acquire()
        now[0] += 0.001
        limit.release(started)
    assert limit.limit == 200
    held = [limit.acquire() for _ in range(200)]
    assert limit.acquire() is None and limit.refused == 1  # at the limit: refused, counted
    now[0] += 0.2  # every one of them took 200 ms, four times the target
    for started in held:
        limit.release(started)
    assert limit.limit == 180  # cut once for the whole window of slow calls, not 200 times
    for _ in range(100):  # slow calls spread over time: a cut per target latency, down to the floor
        started = limit.acquire()
        now[0] += 0.06
        limit.release(started)
    assert limit.limit == MIN_LIMIT
    started = limit.acquire()
    limit.release(started, overloaded=True)
    assert limit.limit == MIN_LIMIT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _call(stub, device: str) -> str:
    request = pb.ReportRequest(device_id=device, events=[pb.Event(
        id=str(uuid.uuid4()), device_id=device, kind="stats", timestamp_ms=int(time.time() * 1000),
        payload_json="{}")])
    try:
        await stub.Report(request, metadata=(("authorization", "Bearer tok"),), timeout=10)
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    (line,) = [x for x in text.splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


class DistantStore(HubStore):
    """The real store, each transaction 30 ms longer (a database a few hops away): calls pile up behind a write, and
    still finish well within a 1 s target (even on a loaded test machine)."""

    delay_s = 0.03

    def ingest_many(self, calls):
        time.sleep(self.delay_s)
        return super().ingest_many(calls)


class SlowStore(DistantStore):
    """Each transaction 120 ms longer: a database that cannot keep up with the target."""

    delay_s = 0.12


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_burst_past_the_old_constant_is_admitted_and_a_slow_hub_refuses_and_counts(backend, tmp_path, request):
    if backend == "sqlite":
        fast, slow = (cls(f"sqlite:///{tmp_path / f'{cls.__name__}.sqlite'}") for cls in (DistantStore, SlowStore))
    else:
        url = request.getfixturevalue("own_schema_store").engine.url.render_as_string(hide_password=False)
        fast, slow = DistantStore(url), SlowStore(url)

    async def scenario(store: HubStore, warm_up: int, burst: int) -> tuple[list[str], float, float]:
        metrics_port = free_port()
        settings = HubSettings(database_url="sqlite://", port=0, tokens="jetson-1:tok", metrics_port=metrics_port,
                               admission_target_latency_ms=1000 if store is fast else 50)
        server, port, _ = await start_hub(settings, store)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = telemetry_pb2_grpc.TelemetryHubStub(channel)
                for _ in range(warm_up // 30):  # traffic the hub measures itself on, 30 calls at a time
                    assert set(await asyncio.gather(*(_call(stub, "jetson-1") for _ in range(30)))) == {"OK"}
                codes = await asyncio.gather(*(_call(stub, "jetson-1") for _ in range(burst)))
            return codes, _metric(metrics_port, "edgeloop_hub_admission_refused_total"), \
                _metric(metrics_port, "edgeloop_hub_admission_limit")
        finally:
            await server.stop(0)

    codes, refused, limit = asyncio.run(scenario(fast, 300, 3 * INITIAL_LIMIT))
    # 192 at once, piling up behind 30 ms writes: a constant 64 refused about half of them
    assert codes == ["OK"] * 3 * INITIAL_LIMIT and refused == 0
    assert limit > 3 * INITIAL_LIMIT
    codes, refused, limit = asyncio.run(scenario(slow, 30, 100))
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes  # refused at once, not queued into the deadline
    assert refused == codes.count("RESOURCE_EXHAUSTED") and limit < INITIAL_LIMIT
    if backend == "postgresql":
        fast.engine.dispose()
        slow.engine.dispose()
