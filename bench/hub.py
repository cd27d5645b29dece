"""Hub benchmark: the telemetry hub under a simulated fleet, on SQLite, one PostgreSQL hub and two replicas.

    .venv/bin/python bench/hub.py [--rates 50,200,1000,3000] [--seconds 10] [--devices 10000]
                                  [--fleet-sizes 1000,10000,50000] [--hub-cpu 0.3]
                                  [--capped-rates 150,300,450,600,750] [--fleet-processes 2]
                                  [--quick] [--readme PATH] [--plot PATH]

Each hub is ``edgeloop hub serve`` in its own process pinned to core 0 (PostgreSQL, when used, runs where the
kernel puts it); this process, the load generator, is pinned to core 1 (both through ``bench/harness.py``). The
load is open-loop, as a fleet's is: single-event ``Report`` calls (a ``stats`` event of a random device, with that
device's token) started at the offered rate whatever the hub answers, each with the runtime sender's 10 s deadline
and, on ``RESOURCE_EXHAUSTED``, ``CANCELLED``, ``UNAVAILABLE`` or a deadline, up to three retries after a jittered
back-off. Two replicas share the load call by call. Reported per backend and offered rate: accepted events/s,
p50/p99 of the accepted calls, errors by code (after retries), hub CPU per accepted event, and, checked in the
database by event id, events lost (acknowledged but not stored) and stored twice. Then ``fleet status`` against
fleets of 1k/10k/50k devices (rows written straight into the database): time to the first page and to the whole
fleet (target for 50k: ≤ 0.5 s in total). Then the tail: ``--tail-rate`` calls/s on one whole-core PostgreSQL hub,
``--tail-runs`` runs (a fresh hub each, warmed up for ``--tail-warmup`` seconds at that rate, not measured) of
``--tail-repeats`` measurements of ``--seconds``, p99 and refusals per second (the hub's own Prometheus counter) of
each (target: p99 ≤ 30 ms at 1,000 calls/s in every one). Then the stats footprint per device-day on PostgreSQL: the
runtime's stats of ``--footprint-devices`` devices over ``--footprint-hours`` hours, rolled up as the hub does,
bytes per row of each table from ``pg_total_relation_size`` (target: ≤ 10% of raw; small counts overstate the
rollups' bytes per row, pages being 8 kB). Every table has a refusals-per-second column (the hub's
``edgeloop_hub_admission_refused_total``). Needs PostgreSQL for two of the three backends, the tail and the footprint
(``EDGELOOP_TEST_POSTGRES_URL``, which ``.ci/run`` sets up); without it those rows are skipped.

On two cores the load generator cannot offer 3× what a whole-core hub takes (it saturates its own core first), nor
can two hubs on one core add capacity. So overload and scale-out run with each hub held to ``--hub-cpu`` of a core
by a CFS quota (what a pod's CPU limit is; needs root and a writable cgroup tree, else skipped and said): a ramp
to one hub's peak; 3× that peak as single-event calls retried three times, and as a fleet of simulated devices
that send through the runtime's own ``TelemetrySender`` (stats every 10 s into an outbox, batches of up to 200,
exponential back-off with jitter; ``--fleet-processes`` load-generator processes on both cores, as one cannot start
that many senders); and two such hubs on the doubled ramp, one on each core, as replicas on two nodes would be.
Writes its section of ``bench/README.md`` (``bench/report.py``) and a plot; ``--quick`` runs every part with short,
small loads and writes into a copy of the README. Never part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402 - after the path the benchmarks import from
    CLIENT_CORE,
    EDGELOOP,
    SERVER_CORE,
    ServerProcess,
    cgroups_writable,
    cpu_seconds,
    free_port,
    pin_load_generator,
)
from bench.report import BenchRun  # noqa: E402

POSTGRES_URL = os.environ.get("EDGELOOP_TEST_POSTGRES_URL",
                              "postgresql+psycopg://edgeloop:edgeloop@127.0.0.1:5432/edgeloop")
RETRIED = {"RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}
REFUSED = ("RESOURCE_EXHAUSTED", "CANCELLED")
REFUSED_METRIC = "edgeloop_hub_admission_refused_total"
"""The hub's own count of the calls its admission limit refused (Prometheus)."""
"""How an overloaded hub turns a call away: past its in-flight limit (RESOURCE_EXHAUSTED), or past gRPC's bound on
calls the hub has not picked up yet (CANCELLED)."""
STATS_PAYLOAD = json.dumps({"ready": True, "models": [{"model_name": "digits-cnn", "state": "serving", "p50_ms": 0.4}]})
"""What every simulated ``stats`` event carries (a device serving one model)."""


class Hub(ServerProcess):
    """``edgeloop hub serve`` on the database at ``url``, pinned to ``core`` (and held to ``cpu`` of it, when given),
    accepting calls once made."""

    def __init__(self, url: str, tokens_file: Path, reader: str, log: Path, cpu: float | None = None,
                 core: int = SERVER_CORE) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        env = {**os.environ, "HUB_DATABASE_URL": url, "HUB_TOKENS_FILE": str(tokens_file), "HUB_READ_TOKENS": reader,
               "HUB_PORT": str(self.port), "HUB_BIND_ADDRESS": "127.0.0.1", "HUB_METRICS_PORT": str(self.metrics_port)}
        super().__init__([str(EDGELOOP), "hub", "serve"], log, env, core, cpu)
        try:
            self.wait_port(self.port, timeout_s=60)
            self.wait_port(self.metrics_port, timeout_s=60)  # its /metrics may come up after the gRPC port
        except RuntimeError:
            self.stop()
            raise

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric(self, name: str) -> float:
        """A sample of the hub's own Prometheus metrics (``/metrics``), e.g. its count of refusals."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise RuntimeError(f"the hub's /metrics has no {name}")


async def offer(addresses: list[str], tokens: dict[str, str], rate: float, seconds: float) -> dict:
    """Start single-event Report calls at ``rate``/s for ``seconds`` (open loop); returns what happened."""
    import grpc

    from edgeloop_core.protos import telemetry_pb2 as pb
    from edgeloop_core.protos import telemetry_pb2_grpc

    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = [telemetry_pb2_grpc.TelemetryHubStub(c) for c in channels]
    devices = list(tokens)
    latencies: list[float] = []
    refusals: list[float] = []  # ms until each refusal (it should come at once)
    errors: dict[str, int] = {}
    details: dict[str, str] = {}
    acked: list[str] = []
    acked_at: list[float] = []  # when each accepted call was answered
    sent = 0
    rng = random.Random(0)

    now_ms = int(time.time() * 1000)

    def make(index: int) -> tuple[pb.ReportRequest, tuple]:
        device = devices[rng.randrange(len(devices))]
        event = pb.Event(id=str(uuid.uuid4()), device_id=device, kind="stats", timestamp_ms=now_ms + index,
                         payload_json=STATS_PAYLOAD)
        return pb.ReportRequest(device_id=device, events=[event]), (("authorization", f"Bearer {tokens[device]}"),)

    # every call is made before the clock starts: the load generator shares this machine, and what it spends on
    # its own side is taken from what it can offer
    calls = [make(i) for i in range(int(rate * seconds) + 1)]

    async def one(index: int) -> None:
        request, metadata = calls[index]
        delay = 0.5
        for attempt in range(4):
            started = time.perf_counter()
            try:
                reply = await stubs[index % len(stubs)].Report(request, metadata=metadata, timeout=10)
                done = time.perf_counter()
                latencies.append((done - started) * 1e3)
                acked.extend(reply.acknowledged_ids)
                acked_at.append(done)
                return
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                if code in REFUSED:
                    refusals.append((time.perf_counter() - started) * 1e3)
                if code not in RETRIED or attempt == 3:
                    errors[code] = errors.get(code, 0) + 1
                    details.setdefault(code, f"{exc.details()} | {exc.debug_error_string()[:300]} | attempt {attempt}")
                    return
                await asyncio.sleep(delay * (0.5 + rng.random()))
                delay *= 2

    tasks = []
    started = time.perf_counter()
    interval = 1.0 / rate
    while True:
        due = started + sent * interval
        now = time.perf_counter()
        if now - started >= seconds or sent >= len(calls):
            break
        if due > now:
            await asyncio.sleep(due - now)
        tasks.append(asyncio.ensure_future(one(sent)))
        sent += 1
    offered_seconds = time.perf_counter() - started
    await asyncio.gather(*tasks)
    for channel in channels:
        await channel.close()
    # throughput while the load is offered: the retries that finish after it (seconds later, under overload)
    # would otherwise stretch the time the accepted calls are divided by
    in_window = sum(1 for t in acked_at if t < started + offered_seconds)
    return {"sent": sent, "offered_rate": sent / offered_seconds, "acked": acked, "latencies": latencies,
            "accepted_rate": in_window / offered_seconds, "offered_seconds": offered_seconds,
            "refusals": refusals,
            "errors": errors, "details": details}


def audit(url: str, acked: list[str]) -> tuple[int, int]:
    """(acknowledged ids not stored, ids stored more than once) in the hub's database."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        stored = list(conn.execute(text("SELECT id FROM stats UNION ALL SELECT id FROM events")).scalars())
    engine.dispose()
    kept = set(stored)
    return sum(1 for i in set(acked) if i not in kept), len(stored) - len(kept)


def reset(url: str) -> None:
    """Empty the hub's tables. On PostgreSQL by TRUNCATE: deleting the previous run's rows would leave dead tuples
    that autovacuum then cleans up during the next run, on the same two cores."""
    from sqlalchemy import text

    from telemetry_hub.store import HubStore, device_models, devices, events, rollup_state, rollups, stats

    store = HubStore(url)
    tables = (events, stats, device_models, devices, rollup_state, *rollups.values())
    with store.engine.begin() as conn:
        if store.engine.dialect.name == "postgresql":
            conn.execute(text("TRUNCATE " + ", ".join(t.name for t in tables)))
        else:
            for table in tables:
                conn.execute(table.delete())
    store.engine.dispose()


def postgres_reachable() -> bool:
    try:
        from sqlalchemy import create_engine, text

        engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 2})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:  # noqa: BLE001 - no PostgreSQL here, whatever the reason: its rows are skipped
        return False


def fill_fleet(url: str, size: int) -> None:
    """``size`` devices with one model each, as ingests leave them (written straight into the tables)."""
    from telemetry_hub.store import HubStore, device_models, devices

    reset(url)
    store = HubStore(url)
    now = int(time.time() * 1000)
    with store.engine.begin() as conn:
        for start in range(0, size, 5000):
            ids = [f"jetson-{i:06d}" for i in range(start, min(size, start + 5000))]
            conn.execute(devices.insert(), [{"device_id": d, "last_seen_ms": now, "facts_json": "{}"} for d in ids])
            conn.execute(device_models.insert(), [
                {"device_id": d, "model_name": "digits-cnn", "state": "failed" if i % 97 == 0 else "serving",
                 "desired_version": "v2", "serving_version": "v2", "target_key": "trt10.3-sm87-orin-nx",
                 "validation_result": "passed top1_accuracy 0.9944 (ref 0.9944 ± 0.0100) int8-qdq",
                 "p50_ms": 0.4, "p99_ms": 1.2, "last_seen_ms": now, "batching_json": "", "variant_json": ""}
                for i, d in enumerate(ids, start)])
    if store.engine.dialect.name == "postgresql":  # after a bulk load, as PostgreSQL's docs advise: fresh planner
        with store.engine.begin() as conn:  # statistics (a fleet that grows by ingests gets them from autovacuum)
            conn.exec_driver_sql("ANALYZE devices, device_models")
    store.engine.dispose()


async def time_fleet_status(address: str, reader: str) -> tuple[float, float, int]:
    """(ms to the first page, ms to the whole fleet, rows)."""
    from telemetry_hub.server import fleet_pages

    started = time.perf_counter()
    first = None
    rows = 0
    async for page in fleet_pages(address, reader):
        first = first if first is not None else (time.perf_counter() - started) * 1e3
        rows += len(page.devices)
    return first or 0.0, (time.perf_counter() - started) * 1e3, rows


class MemoryOutbox:
    """The runtime's :class:`Outbox` contract (``device_id``, ``pending(limit)`` oldest first,
    ``acknowledge``, ``count``) in memory: a simulated fleet has too many devices for a SQLite file each. The sending
    is the runtime's own :class:`~edge_runtime.report.telemetry.TelemetrySender`."""

    def __init__(self, device_id: str, acknowledged: list[tuple[float, str]]) -> None:
        self.device_id = device_id
        self._events: dict[str, object] = {}
        self._acknowledged = acknowledged  # (when, event id) of every event the hub acknowledged, shared by the fleet

    def add(self, event: object) -> None:
        self._events[event.id] = event

    def pending(self, limit: int = 200) -> list:
        return list(self._events.values())[:limit]

    def acknowledge(self, ids: list[str]) -> None:
        now = time.perf_counter()
        for i in ids:
            if self._events.pop(i, None) is not None:
                self._acknowledged.append((now, i))

    def count(self) -> int:
        return len(self._events)


async def simulate_fleet(address: str, tokens: dict[str, str], interval_s: float, measured_from: float,
                         stop: float) -> dict:
    """One device per entry of ``tokens``, each adding a stats event every ``interval_s`` (jittered start, from
    ``measured_from - interval_s`` on, ``time.perf_counter`` which every process shares) to its outbox until
    ``stop``, and sending it as the runtime does (:class:`TelemetrySender`: at once when not backing off, batches of
    up to 200, a 10 s deadline, exponential back-off with jitter on any failure); all share one channel. Returns
    the events offered and acknowledged from ``measured_from`` on, every acknowledged id, what waits in outboxes at
    ``stop``, and the failures the senders saw (code → ms until each failed send failed)."""
    import logging

    import grpc

    from edge_runtime.report.telemetry import TelemetrySender
    from edgeloop_core.protos import telemetry_pb2 as pb

    logging.getLogger("edge_runtime.report.telemetry").setLevel(logging.ERROR)  # a warning per backing-off device
    channel = grpc.aio.insecure_channel(address)
    acknowledged: list[tuple[float, str]] = []
    outboxes = [MemoryOutbox(d, acknowledged) for d in tokens]
    senders = [TelemetrySender(o, address, tokens[o.device_id], interval_s=3600) for o in outboxes]
    failed: dict[str, list[float]] = {}
    for sender in senders:
        sender._channel = channel  # one shared connection, not one per simulated device
        flush = sender.flush

        async def timed(flush: Callable[[], Awaitable[int]] = flush) -> int:
            started = time.perf_counter()
            try:
                return await flush()
            except grpc.aio.AioRpcError as exc:
                failed.setdefault(exc.code().name, []).append((time.perf_counter() - started) * 1e3)
                raise
        sender.flush = timed
    rng = random.Random(os.getpid())
    offered = 0

    async def device(outbox: MemoryOutbox, sender: TelemetrySender) -> None:
        nonlocal offered
        await asyncio.sleep(max(0.0, measured_from - interval_s - time.perf_counter()) + rng.random() * interval_s)
        while (now := time.perf_counter()) < stop:
            outbox.add(pb.Event(id=str(uuid.uuid4()), device_id=outbox.device_id, kind="stats",
                                timestamp_ms=int(time.time() * 1000), payload_json=STATS_PAYLOAD))
            offered += now >= measured_from
            sender.wake()
            await asyncio.sleep(min(interval_s, stop - now))

    sending = [asyncio.ensure_future(s.run_forever()) for s in senders]
    await asyncio.gather(*(device(o, s) for o, s in zip(outboxes, senders, strict=True)))
    for task in sending:
        task.cancel()
    await asyncio.wait(sending, timeout=30)  # bounded: a sender that outlived its cancellation must not hang the bench
    await channel.close()
    return {"offered": offered, "acked": [i for _, i in acknowledged],
            "accepted": sum(1 for when, _ in acknowledged if measured_from <= when < stop),
            "queued": sum(o.count() for o in outboxes), "failed": failed}


def _fleet_share(address: str, tokens: dict[str, str], interval_s: float, measured_from: float, stop: float) -> dict:
    """One load-generator process's share of a simulated fleet (run in a process pool)."""
    os.sched_setaffinity(0, {SERVER_CORE, CLIENT_CORE})  # the hub is held to its CPU limit, not to a core of its own
    return asyncio.run(simulate_fleet(address, tokens, interval_s, measured_from, stop))


def run_fleet(address: str, tokens: dict[str, str], interval_s: float, seconds: float, processes: int) -> dict:
    """:func:`simulate_fleet` split over ``processes`` load-generator processes (one Python process cannot start
    3× a hub's peak of senders), measured over the same ``seconds``; their results summed."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    names = list(tokens)
    shares = [{d: tokens[d] for d in names[i::processes]} for i in range(processes)]
    measured_from = time.perf_counter() + 5.0 + interval_s  # time for the processes to start
    stop = measured_from + seconds
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_fleet_share, [address] * processes, shares, [interval_s] * processes,
                                [measured_from] * processes, [stop] * processes))
    failed: dict[str, list[float]] = {}
    for result in results:
        for code, ms in result["failed"].items():
            failed.setdefault(code, []).extend(ms)
    return {"offered": sum(r["offered"] for r in results) / seconds,
            "accepted": sum(r["accepted"] for r in results) / seconds,
            "acked": [i for r in results for i in r["acked"]], "queued": sum(r["queued"] for r in results),
            "failed": failed}


def measure_rate(label: str, url: str, replicas: int, rate: float, seconds: float, tokens: dict[str, str],
                 tokens_file: Path, reader: str, work: Path, cpu: float | None = None) -> dict:
    """``replicas`` hubs on ``url`` (each held to ``cpu`` of a core, when given) offered ``rate`` calls/s; one row."""
    if not url.startswith("sqlite"):
        reset(url)
    # whole-core hubs share the server core (they show how replicas split the load); CPU-limited ones get a core
    # each, as replicas on two nodes would: two quotas and PostgreSQL on one core starve each other
    with contextlib.ExitStack() as running:  # every hub started is stopped, even when a later one fails to start
        logs = [work / f"{label.replace(' ', '-')}-{rate:.0f}-{n}.log" for n in range(replicas)]
        hubs = [running.enter_context(Hub(url, tokens_file, reader, log, cpu,
                                          SERVER_CORE if cpu is None else (SERVER_CORE, CLIENT_CORE)[n % 2]))
                for n, log in enumerate(logs)]
        cpu_before = sum(cpu_seconds(h.pid) for h in hubs)
        refused_before = sum(h.metric(REFUSED_METRIC) for h in hubs)
        result = asyncio.run(offer([h.address for h in hubs], tokens, rate, seconds))
        used = sum(cpu_seconds(h.pid) for h in hubs) - cpu_before
        hub_refused = sum(h.metric(REFUSED_METRIC) for h in hubs) - refused_before
    lost, twice = audit(url, result["acked"])
    accepted = len(result["acked"])
    lat = np.array(result["latencies"]) if result["latencies"] else np.array([0.0])
    refused = np.array(result["refusals"]) if result["refusals"] else np.array([0.0])
    row = {"backend": label, "offered": result["offered_rate"], "accepted": result["accepted_rate"],
           "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
           "refusal_p50": float(np.percentile(refused, 50)), "errors": result["errors"],
           "cpu_us": used / max(accepted, 1) * 1e6, "lost": lost, "twice": twice,
           "refused_per_s": hub_refused / result["offered_seconds"],
           "client_refused_per_s": len(result["refusals"]) / result["offered_seconds"]}
    print(f"{label:20s} offered {row['offered']:7.0f}/s accepted {row['accepted']:7.0f}/s "
          f"p50 {row['p50']:7.1f} ms p99 {row['p99']:8.1f} ms refused {row['refused_per_s']:.1f}/s (hub) "
          f"{row['client_refused_per_s']:.1f}/s (calls) errors {row['errors']} "
          f"cpu/event {row['cpu_us']:.0f} µs lost {lost} twice {twice} {result['details']}", flush=True)
    return row


def fleet_overload(label: str, rate: float, args: argparse.Namespace, tokens: dict[str, str], tokens_file: Path,
                   reader: str, work: Path) -> dict:
    """One CPU-limited hub under a simulated fleet offering ``rate`` stats events/s (devices at a 10 s interval)."""
    interval = 10.0
    fleet = dict(list(tokens.items())[: int(rate * interval)])  # as many as there are tokens; offered/s says
    devices = len(fleet)
    reset(POSTGRES_URL)
    hub = Hub(POSTGRES_URL, tokens_file, reader, work / "fleet-overload.log", args.hub_cpu)
    try:
        cpu_before = cpu_seconds(hub.pid)
        # longer than the other runs: the first refusals send every device into its back-off at once, and the
        # fleet needs a while to settle into what a sustained overload looks like
        result = run_fleet(hub.address, fleet, interval, 6 * args.seconds, args.fleet_processes)
        used = cpu_seconds(hub.pid) - cpu_before
    finally:
        hub.stop()
    lost, twice = audit(POSTGRES_URL, result["acked"])
    accepted = len(result["acked"])
    errors = {f"{code} (sends)": len(ms) for code, ms in result["failed"].items()}
    refused = [ms for code in REFUSED for ms in result["failed"].get(code, [])] or [0.0]
    row = {"backend": label, "offered": result["offered"], "accepted": result["accepted"], "p50": None,
           "p99": None, "refusal_p50": float(np.percentile(refused, 50)), "errors": errors,
           "cpu_us": used / max(accepted, 1) * 1e6, "lost": lost, "twice": twice, "queued": result["queued"],
           "devices": devices,
           "refused_by": {code: float(np.percentile(ms, 50)) for code, ms in result["failed"].items()
                          if code in REFUSED}}
    print(f"{label}: {devices} devices offered {row['offered']:.0f} events/s, accepted {row['accepted']:.0f}/s, "
          f"{result['queued']} waiting in outboxes, failed sends {errors}, lost {lost} twice {twice}",
          flush=True)
    return row


def tail_runs(args: argparse.Namespace, tokens: dict[str, str], tokens_file: Path, reader: str,
              work: Path) -> list[dict]:
    """The tail at ``--tail-rate`` calls/s on one PostgreSQL hub with a whole core: ``--tail-runs`` runs (each a
    fresh hub process on an emptied database, warmed up for ``--tail-warmup`` s at the same rate first, not
    measured) of ``--tail-repeats`` measurements of ``--seconds`` each, one row per
    measurement (p50/p99 of the accepted calls, refusals per second by the hub's own counter)."""
    rows = []
    for run in range(1, args.tail_runs + 1):
        reset(POSTGRES_URL)
        with Hub(POSTGRES_URL, tokens_file, reader, work / f"tail-{run}.log") as hub:
            if args.tail_warmup > 0:  # connections, the database's caches: a hub just started, not measured
                asyncio.run(offer([hub.address], tokens, args.tail_rate, args.tail_warmup))
            for repeat in range(1, args.tail_repeats + 1):
                before = hub.metric(REFUSED_METRIC)
                result = asyncio.run(offer([hub.address], tokens, args.tail_rate, args.seconds))
                refused = hub.metric(REFUSED_METRIC) - before
                lat = np.array(result["latencies"]) if result["latencies"] else np.array([0.0])
                row = {"run": run, "repeat": repeat, "offered": result["offered_rate"],
                       "accepted": result["accepted_rate"], "p50": float(np.percentile(lat, 50)),
                       "p99": float(np.percentile(lat, 99)), "refused_per_s": refused / result["offered_seconds"],
                       "errors": result["errors"]}
                rows.append(row)
                print(f"tail run {run}.{repeat}: offered {row['offered']:.0f}/s accepted {row['accepted']:.0f}/s "
                      f"p50 {row['p50']:.1f} ms p99 {row['p99']:.1f} ms refused {row['refused_per_s']:.1f}/s "
                      f"errors {row['errors']}", flush=True)
    return rows


def stats_footprint(args: argparse.Namespace) -> dict:
    """What stats cost per device-day on PostgreSQL: ``--footprint-devices`` devices × ``--footprint-hours`` hours
    of the runtime's stats (a Jetson serving one model) every 30 s, ingested and rolled up as the hub does, each
    table's bytes per row measured (:func:`telemetry_hub.footprint.bytes_per_row`) and scaled to a device-day at the
    hub's default retentions (raw 1 h, 5-minute buckets 14 days)."""
    from telemetry_hub.footprint import STATS_INTERVAL_S, TYPICAL_STATS_PAYLOAD, bytes_per_row, per_device_day
    from telemetry_hub.server import HubSettings
    from telemetry_hub.store import ROLLUP_LAG_MS, HubStore, IncomingEvent

    reset(POSTGRES_URL)
    defaults = HubSettings.model_fields
    raw_hours = defaults["stats_raw_retention_hours"].default
    fine_days = defaults["stats_retention_days"].default
    store = HubStore(POSTGRES_URL)
    try:
        hour_ms = 3_600_000
        start = (int(time.time() * 1000) - args.footprint_hours * hour_ms) // hour_ms * hour_ms
        per_call = 240  # two hours of one device's stats a call
        stamps = [start + i * STATS_INTERVAL_S * 1000 for i in range(args.footprint_hours * 3600 // STATS_INTERVAL_S)]
        for device in range(args.footprint_devices):
            for first in range(0, len(stamps), per_call):
                store.ingest(f"jetson-{device:05d}", [
                    IncomingEvent(str(uuid.uuid4()), "stats", ts, TYPICAL_STATS_PAYLOAD)
                    for ts in stamps[first:first + per_call]])
        rolled = store.roll_up(now_ms=int(time.time() * 1000) + ROLLUP_LAG_MS + 1)
        sizes = bytes_per_row(store)
    finally:
        store.engine.dispose()
    reset(POSTGRES_URL)
    day = per_device_day(sizes, raw_retention_hours=raw_hours, fine_days=fine_days)
    result = {**day, "sizes": sizes, "raw_rows": rolled["rows"], "raw_hours": raw_hours, "fine_days": fine_days,
              "payload_bytes": len(TYPICAL_STATS_PAYLOAD)}
    print(f"stats footprint: bytes/row {({k: round(v) for k, v in sizes.items()})}; per device-day raw "
          f"{day['raw'] / 1e6:.2f} MB, rolled up {day['rolled_up'] / 1e3:.1f} kB ({day['ratio']:.1%})", flush=True)
    return result


def ramp_up(measure: Callable[[float], dict], ramp: list[float], extra: int = 3) -> list[dict]:
    """``measure`` (one row) at each rate of ``ramp``, then at further steps of the ramp's last step while the hubs
    still take what they are offered (≥ 95%), at most ``extra`` more: so the peak is a saturation, not the end of
    the ramp."""
    rows = [measure(rate) for rate in ramp]
    step = ramp[-1] - ramp[-2] if len(ramp) > 1 else ramp[-1]
    for n in range(1, extra + 1):
        if rows[-1]["accepted"] < 0.95 * rows[-1]["offered"]:
            break
        rows.append(measure(ramp[-1] + n * step))
    return rows


def overload_and_scale_out(args: argparse.Namespace, tokens: dict[str, str], everyone: dict[str, str],
                           tokens_file: Path, reader: str, work: Path) -> list[dict]:
    """Hubs held to ``--hub-cpu`` of a core each (a pod's CPU limit), so that 3× one hub's saturation and two hubs'
    peak are loads the load generator can offer: a ramp to one hub's saturation, 3× that peak, and the ramp
    doubled for two hubs (each ramp goes on until the hubs saturate)."""
    one = f"PostgreSQL, 1 hub @ {args.hub_cpu:g} core"
    two = f"PostgreSQL, 2 hubs @ {args.hub_cpu:g} core each"
    ramp = [float(r) for r in args.capped_rates.split(",")]

    def capped(label: str, replicas: int) -> Callable[[float], dict]:
        return lambda rate: measure_rate(label, POSTGRES_URL, replicas, rate, args.seconds, tokens, tokens_file,
                                         reader, work, args.hub_cpu)

    rows = ramp_up(capped(one, 1), ramp)
    peak = max(r["accepted"] for r in rows)
    if peak <= 0:  # nothing to take 3× of: the hub is broken, not saturated
        raise RuntimeError(f"{one} accepted nothing on the whole ramp (errors: {rows[-1]['errors']})")
    rows.append(capped(one, 1)(3 * peak))
    rows.append(fleet_overload(f"{one}, fleet of runtime senders", 3 * peak, args, everyone, tokens_file, reader,
                               work))
    rows += ramp_up(capped(two, 2), [2 * rate for rate in ramp])
    return rows


QUICK = {"rates": "50,200", "seconds": 2.0, "devices": 1000, "fleet_sizes": "1000", "capped_rates": "50,100",
         "fleet_processes": 1, "tail_rate": 200.0, "tail_runs": 2, "tail_repeats": 2, "footprint_devices": 10,
         "footprint_hours": 2}
FULL = {"rates": "50,200,1000,3000", "seconds": 10.0, "devices": 10_000, "fleet_sizes": "1000,10000,50000",
        "capped_rates": "150,300,450,600,750", "fleet_processes": 2, "tail_rate": 1000.0, "tail_runs": 3,
        "tail_repeats": 3, "footprint_devices": 200, "footprint_hours": 6}
"""The load of a ``--quick`` run (every part, short and small) and of a full one, where an option does not say."""


def fleet_status_rows(sizes: list[int], have_postgres: bool, tokens_file: Path, reader: str,
                      work: Path) -> list[dict]:
    """``fleet status`` against fleets of each size, on SQLite and (when reachable) PostgreSQL: one row each."""
    rows = []
    for size in sizes:
        for backend in ("sqlite", "postgresql"):
            if backend == "postgresql" and not have_postgres:
                continue
            url = f"sqlite:///{work / f'fleet-{size}.sqlite'}" if backend == "sqlite" else POSTGRES_URL
            fill_fleet(url, size)
            with Hub(url, tokens_file, reader, work / f"fleet-{backend}-{size}.log") as hub:
                first, whole, count = asyncio.run(time_fleet_status(hub.address, reader))
            rows.append({"backend": backend, "size": size, "first_ms": first, "all_ms": whole, "rows": count})
            print(f"fleet status, {backend}, {size} devices: first page {first:.0f} ms, all {whole:.0f} ms "
                  f"({count} rows)", flush=True)
    return rows


def tables(rows: list[dict], capped: list[dict], fleet_rows: list[dict], skipped: list[str],
           args: argparse.Namespace) -> str:
    """The markdown tables and the notes under them."""
    lines = ["| backend | offered events/s | accepted events/s | p50 ms | p99 ms | refused/s | "
             "errors (after retries) | hub CPU µs/event | lost | stored twice |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "0"
        lines.append(f"| {r['backend']} | {r['offered']:.0f} | {r['accepted']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                     f"{r['refused_per_s']:.1f} | {errors} | {r['cpu_us']:.0f} | {r['lost']} | {r['twice']} |")
    if capped:
        lines += ["", "Each hub held to a CPU limit (as a pod's), so that 3× overload and two replicas are loads the "
                  "load generator can offer:", "", "| hubs | offered events/s | accepted events/s | p50 ms | p99 ms | "
                  "refused after (p50 ms) | refused/s | errors (after retries) | hub CPU µs/event | lost | "
                  "stored twice |", "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for r in capped:
            errors = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "0"
            refused = f"{r['refusal_p50']:.1f}" if r["refusal_p50"] else ""  # 0: nothing was refused
            p50 = "" if r["p50"] is None else f"{r['p50']:.1f}"
            p99 = "" if r["p99"] is None else f"{r['p99']:.1f}"
            per_s = f"{r['refused_per_s']:.1f}" if "refused_per_s" in r else ""  # a fleet's: by code, below
            lines.append(f"| {r['backend']} | {r['offered']:.0f} | {r['accepted']:.0f} | {p50} | {p99} | {refused} | "
                         f"{per_s} | {errors} | {r['cpu_us']:.0f} | {r['lost']} | {r['twice']} |")
    lines += ["", "| fleet status | devices | first page ms | whole fleet ms | rows |", "|---|---:|---:|---:|---:|"]
    for f in fleet_rows:
        lines.append(f"| {f['backend']} | {f['size']} | {f['first_ms']:.0f} | {f['all_ms']:.0f} | {f['rows']} |")
    peaks: dict[str, float] = {}
    for r in rows:
        peaks[r["backend"]] = max(peaks.get(r["backend"], 0.0), r["accepted"])
    lines.append("")
    for backend, peak in peaks.items():
        lines.append(f"- {backend}: peak {peak:.0f} accepted events/s")
    if "PostgreSQL, 1 hub" in peaks and "PostgreSQL, 2 hubs" in peaks:
        lines.append(f"- two replicas ÷ one: {peaks['PostgreSQL, 2 hubs'] / peaks['PostgreSQL, 1 hub']:.2f}x "
                     "(both on the same server core, so this shows they share the load, not that they add cores)")
    if capped:
        lines += capped_notes(capped, args)
    for reason in skipped:
        lines.append(f"- skipped: {reason}")
    return "\n".join(lines)


PAGING_TARGET_MS = 500.0
"""Paging a fleet of 50,000 devices, every page: at most this long in total (issue #25)."""
TAIL_TARGET_MS = 30.0
"""p99 of the accepted calls at 1,000 calls/s on a whole core, in every tail measurement."""
FOOTPRINT_TARGET = 0.10
"""Stats per device-day with rollups: at most this share of raw stats'."""


def tail_and_footprint(tail: list[dict], footprint: dict | None, fleet_rows: list[dict],
                       args: argparse.Namespace) -> str:
    """The tail runs' table, and the paging and footprint figures against their targets."""
    lines = [""]
    if tail:
        lines += [f"p99 at {args.tail_rate:.0f} calls/s on one PostgreSQL hub with a whole core: {args.tail_runs} runs "
                  f"(a fresh hub each, after {args.tail_warmup:g} s of warm-up) of {args.tail_repeats} measurements "
                  f"of {args.seconds:g} s:", "",
                  "| run | offered calls/s | accepted calls/s | p50 ms | p99 ms | refused/s | errors (after retries) |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in tail:
            errors = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "0"
            lines.append(f"| {r['run']}.{r['repeat']} | {r['offered']:.0f} | {r['accepted']:.0f} | {r['p50']:.1f} | "
                         f"{r['p99']:.1f} | {r['refused_per_s']:.1f} | {errors} |")
        worst = max(r["p99"] for r in tail)
        verdict = "met" if worst <= TAIL_TARGET_MS and args.tail_rate >= 1000 else "NOT met"
        lines += ["", f"- tail: worst p99 {worst:.1f} ms over {len(tail)} measurements, "
                      f"{max(r['refused_per_s'] for r in tail):.1f} refusals/s at most "
                      f"(target: p99 ≤ {TAIL_TARGET_MS:.0f} ms at 1,000 calls/s in every one: {verdict})"]
    for f in fleet_rows:
        if f["size"] >= 50_000:
            verdict = "met" if f["all_ms"] <= PAGING_TARGET_MS else "NOT met"
            lines.append(f"- paging {f['size']:,} devices on {f['backend']}: {f['all_ms']:.0f} ms in total "
                         f"(target ≤ {PAGING_TARGET_MS:.0f} ms: {verdict})")
    if footprint:
        sizes = footprint["sizes"]
        verdict = "met" if footprint["ratio"] <= FOOTPRINT_TARGET else "NOT met"
        lines.append(f"- stats footprint per device-day on PostgreSQL ({footprint['raw_rows']:,} stats of the runtime, "
                     f"{footprint['payload_bytes']} bytes of JSON each, every 30 s): raw stats "
                     f"{sizes['stats']:.0f} bytes/row, {footprint['raw'] / 1e6:.2f} MB per device-day (what the hub "
                     f"kept for every day before rollups); with rollups (raw {footprint['raw_hours']:g} h, 5-minute "
                     f"buckets {sizes['stats_5m']:.0f} bytes/row for {footprint['fine_days']} days, hourly "
                     f"{sizes['stats_1h']:.0f} bytes/row) {footprint['rolled_up'] / 1e3:.1f} kB per device-day, "
                     f"{footprint['ratio']:.1%} of raw (target ≤ {FOOTPRINT_TARGET:.0%}: {verdict}); a day held at an "
                     f"hour only: {footprint['hourly'] / 1e3:.1f} kB")
    return "\n".join(lines)


def capped_notes(capped: list[dict], args: argparse.Namespace) -> list[str]:
    """What the CPU-limited runs say: one hub's peak, 3× it as a retry storm and as a fleet, two hubs ÷ one."""
    one = [r for r in capped if " 1 hub " in r["backend"] and "fleet" not in r["backend"]]
    two = [r for r in capped if " 2 hubs " in r["backend"]]
    fleet = next(r for r in capped if "fleet" in r["backend"])
    peak_one = max(r["accepted"] for r in one[:-1])
    over = one[-1]
    refusals = "; ".join(f"{code} after {ms:.0f} ms (p50)" for code, ms in sorted(fleet["refused_by"].items()))
    return [f"- one hub @ {args.hub_cpu:g} core: peak {peak_one:.0f} accepted events/s; offered 3x that "
            f"({over['offered']:.0f}/s) as single-event calls retried 3 times, it accepts "
            f"{over['accepted']:.0f}/s, {over['accepted'] / peak_one:.0%} of its peak, refusing the rest "
            f"after {over['refusal_p50']:.1f} ms (p50)",
            f"- a fleet of {fleet['devices']} runtime senders (stats every 10 s; outbox, batches, back-off) "
            f"offered {fleet['offered']:.0f} events/s ({fleet['offered'] / peak_one:.1f}x the peak, from "
            f"{args.fleet_processes} load-generator processes): {fleet['accepted']:.0f} events/s accepted, "
            f"{fleet['accepted'] / peak_one:.0%} of the peak; the rest refused ({refusals}) and sent again "
            f"after a back-off, {fleet['queued']} events still in outboxes at the end; {fleet['lost']} lost, "
            f"{fleet['twice']} stored twice",
            f"- two hubs @ {args.hub_cpu:g} core each ÷ one: {max(r['accepted'] for r in two) / peak_one:.2f}x"]


def parse_args() -> tuple[argparse.Namespace, BenchRun]:
    """The options; those a ``--quick`` run shortens default to :data:`QUICK`, else to :data:`FULL`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", help=f"offered calls/s (default {FULL['rates']}; --quick: {QUICK['rates']})")
    parser.add_argument("--seconds", type=float,
                        help=f"seconds per offered rate (default {FULL['seconds']:g}; --quick: {QUICK['seconds']:g})")
    parser.add_argument("--devices", type=int, help=f"devices the single-event load picks among (default "
                                                    f"{FULL['devices']}; --quick: {QUICK['devices']})")
    parser.add_argument("--fleet-sizes", help=f"fleets for fleet status (default {FULL['fleet_sizes']}; "
                                              f"--quick: {QUICK['fleet_sizes']})")
    parser.add_argument("--backends", default="sqlite,postgresql,postgresql-2")
    parser.add_argument("--hub-cpu", type=float, default=0.3,
                        help="CPU limit (cores) of each hub in the overload and scale-out runs (0: skip them)")
    parser.add_argument("--capped-rates", help="the ramp for one CPU-limited hub, two hubs get twice each rate "
                                               f"(default {FULL['capped_rates']}; --quick: {QUICK['capped_rates']})")
    parser.add_argument("--fleet-processes", type=int,
                        help="load-generator processes that share the simulated fleet of runtime senders "
                             f"(default {FULL['fleet_processes']}; --quick: {QUICK['fleet_processes']})")
    parser.add_argument("--tail-rate", type=float,
                        help="calls/s of the tail runs on one whole-core PostgreSQL hub "
                             f"(default {FULL['tail_rate']:g}; --quick: {QUICK['tail_rate']:g})")
    parser.add_argument("--tail-runs", type=int, help="tail runs, each a fresh hub (default "
                                                      f"{FULL['tail_runs']}; --quick: {QUICK['tail_runs']}; 0: skip)")
    parser.add_argument("--tail-repeats", type=int, help="measurements of --seconds per tail run "
                                                         f"(default {FULL['tail_repeats']}; --quick: "
                                                         f"{QUICK['tail_repeats']})")
    parser.add_argument("--tail-warmup", type=float, default=2.0,
                        help="seconds at --tail-rate before each tail run's measurements (not measured)")
    parser.add_argument("--footprint-devices", type=int, help="devices of the stats footprint measurement (default "
                                                              f"{FULL['footprint_devices']}; --quick: "
                                                              f"{QUICK['footprint_devices']}; 0: skip)")
    parser.add_argument("--footprint-hours", type=int, help="hours of stats per device there (default "
                                                            f"{FULL['footprint_hours']}; --quick: "
                                                            f"{QUICK['footprint_hours']})")
    BenchRun.add_options(parser, "hub")
    args = parser.parse_args()
    run = BenchRun.from_args("hub", args, parser)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args, run


def main() -> None:
    args, run = parse_args()
    pin_load_generator("the hub")
    rates = [float(r) for r in args.rates.split(",")]
    rows: list[dict] = []
    capped: list[dict] = []
    skipped: list[str] = []
    have_postgres = postgres_reachable()
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-hub-") as tmp:
        work = Path(tmp)
        # the single-event load picks among --devices devices; the simulated fleet may need more
        everyone = {f"dev-{i:05d}": uuid.uuid4().hex for i in range(max(args.devices, 30_000))}
        tokens = dict(list(everyone.items())[: args.devices])
        tokens_file = work / "tokens"
        tokens_file.write_text("".join(f"{d}:{t}\n" for d, t in everyone.items()))
        reader = uuid.uuid4().hex
        for backend in args.backends.split(","):
            if backend.startswith("postgresql") and not have_postgres:
                skipped.append(f"{backend}: no PostgreSQL at {POSTGRES_URL.split('@')[-1]}")
                continue
            replicas = 2 if backend.endswith("-2") else 1
            label = {"sqlite": "SQLite, 1 hub", "postgresql": "PostgreSQL, 1 hub",
                     "postgresql-2": "PostgreSQL, 2 hubs"}[backend]
            for rate in rates:
                url = f"sqlite:///{work / f'hub-{rate:.0f}.sqlite'}" if backend == "sqlite" else POSTGRES_URL
                rows.append(measure_rate(label, url, replicas, rate, args.seconds, tokens, tokens_file, reader, work))
        if args.hub_cpu and have_postgres:
            why = cgroups_writable()
            if why:
                skipped.append(f"CPU-limited hubs: {why}")
            else:
                capped.extend(overload_and_scale_out(args, tokens, everyone, tokens_file, reader, work))
        fleet_rows = fleet_status_rows([int(s) for s in args.fleet_sizes.split(",")], have_postgres, tokens_file,
                                       reader, work)
        tail: list[dict] = []
        footprint = None
        if have_postgres:
            if args.tail_runs:
                tail = tail_runs(args, tokens, tokens_file, reader, work)
            if args.footprint_devices:
                footprint = stats_footprint(args)
            reset(POSTGRES_URL)
        else:
            skipped.append("the tail runs and the stats footprint: they need PostgreSQL")

    table = tables(rows, capped, fleet_rows, skipped, args) + tail_and_footprint(tail, footprint, fleet_rows, args)
    print(table)
    write_plot(rows + capped, run.plot)
    run.finish(table)


def write_plot(rows: list[dict], path: Path) -> None:
    """Accepted against offered events/s, a line per backend and hub count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend]
        ax.plot([r["offered"] for r in mine], [r["accepted"] for r in mine], marker="o", label=backend)
    top = max([r["offered"] for r in rows] or [1])
    ax.plot([0, top], [0, top], color="grey", linestyle=":", label="accepted = offered")
    ax.set_xlabel("offered events/s (single-event calls)")
    ax.set_ylabel("accepted events/s")
    ax.set_title("telemetry hub: hub on one core, load generator on the other")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
