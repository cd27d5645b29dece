"""Hub benchmark: the telemetry hub under a simulated fleet, on SQLite, one PostgreSQL hub and two replicas.

    .venv/bin/python bench/hub.py [--rates 50,200,1000,3000] [--seconds 10] [--devices 10000]
                                  [--fleet-sizes 1000,10000,50000] [--out bench/hub.md] [--plot bench/hub.png]

Each hub is ``edgeloop hub serve`` in its own process pinned to core 0 (PostgreSQL, when used, runs where the
kernel puts it); this process, the load generator, is pinned to core 1. The load is open-loop, as a fleet's is:
single-event ``Report`` calls (a ``stats`` event of a random device, with that device's token) started at the offered
rate whatever the hub answers, each with the runtime sender's 10 s deadline and, on ``RESOURCE_EXHAUSTED``,
``UNAVAILABLE`` or a deadline, up to three retries after a jittered back-off. Two replicas share the load call by
call. Reported per backend and offered rate: accepted events/s, p50/p99 of the accepted calls, errors by code
(after retries), hub CPU per accepted event, and, checked in the database by event id, events lost (acknowledged
but not stored) and stored twice. Then ``fleet status`` against fleets of 1k/10k/50k devices (rows written
straight into the database): time to the first page and to the whole fleet. Needs PostgreSQL for two of the
three backends (``EDGELOOP_TEST_POSTGRES_URL``, which ``.ci/run`` sets up); without it those rows are skipped.
Never part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve import cpu_seconds, free_port  # noqa: E402 - after the path the benchmarks import from

SERVER_CORE, CLIENT_CORE = 0, 1
POSTGRES_URL = os.environ.get("EDGELOOP_TEST_POSTGRES_URL",
                              "postgresql+psycopg://edgeloop:edgeloop@127.0.0.1:5432/edgeloop")
RETRIED = {"RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}


class Hub:
    """``edgeloop hub serve`` pinned to the server core."""

    def __init__(self, url: str, tokens_file: Path, reader: str, log: Path) -> None:
        self.port = free_port()
        env = {**os.environ, "HUB_DATABASE_URL": url, "HUB_TOKENS_FILE": str(tokens_file), "HUB_READ_TOKENS": reader,
               "HUB_PORT": str(self.port), "HUB_BIND_ADDRESS": "127.0.0.1"}
        self.process = subprocess.Popen(["taskset", "-c", str(SERVER_CORE), str(ROOT / ".venv/bin/edgeloop"), "hub",
                                         "serve"], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                        start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"the hub did not start: {log.read_text()[-500:]}") from None
                time.sleep(0.2)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()


async def offer(addresses: list[str], tokens: dict[str, str], rate: float, seconds: float) -> dict:
    """Start single-event Report calls at ``rate``/s for ``seconds`` (open loop); returns what happened."""
    import grpc

    from edge_runtime.protos import telemetry_pb2 as pb
    from edge_runtime.protos import telemetry_pb2_grpc

    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = [telemetry_pb2_grpc.TelemetryHubStub(c) for c in channels]
    devices = list(tokens)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    details: dict[str, str] = {}
    acked: list[str] = []
    sent = 0
    rng = random.Random(0)

    async def one(index: int) -> None:
        device = devices[rng.randrange(len(devices))]
        event = pb.Event(id=str(uuid.uuid4()), device_id=device, kind="stats", timestamp_ms=int(time.time() * 1000),
                         payload_json=json.dumps({"ready": True, "models": [{"model_name": "digits-cnn",
                                                                             "state": "serving", "p50_ms": 0.4}]}))
        request = pb.ReportRequest(device_id=device, events=[event])
        metadata = (("authorization", f"Bearer {tokens[device]}"),)
        delay = 0.5
        for attempt in range(4):
            started = time.perf_counter()
            try:
                reply = await stubs[index % len(stubs)].Report(request, metadata=metadata, timeout=10)
                latencies.append((time.perf_counter() - started) * 1e3)
                acked.extend(reply.acknowledged_ids)
                return
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
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
        if now - started >= seconds:
            break
        if due > now:
            await asyncio.sleep(due - now)
        tasks.append(asyncio.ensure_future(one(sent)))
        sent += 1
    offered_seconds = time.perf_counter() - started
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    return {"sent": sent, "offered_rate": sent / offered_seconds, "acked": acked, "latencies": latencies,
            "errors": errors, "details": details, "elapsed": elapsed}


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
    from telemetry_hub.store import HubStore, device_models, devices, events, stats

    store = HubStore(url)
    with store.engine.begin() as conn:
        for table in (events, stats, device_models, devices):
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
    except Exception:  # noqa: BLE001 - no PostgreSQL here: its rows are skipped
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


def main() -> None:  # noqa: C901, PLR0915 - one script, three backends
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="50,200,1000,3000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--fleet-sizes", default="1000,10000,50000")
    parser.add_argument("--backends", default="sqlite,postgresql,postgresql-2")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "hub.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "hub.png")
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs two cores: one for the hub, one for the load generator")
    os.sched_setaffinity(0, {CLIENT_CORE})
    rates = [float(r) for r in args.rates.split(",")]
    rows: list[dict] = []
    fleet_rows: list[dict] = []
    skipped: list[str] = []
    have_postgres = postgres_reachable()
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-hub-") as tmp:
        work = Path(tmp)
        tokens = {f"dev-{i:05d}": uuid.uuid4().hex for i in range(args.devices)}
        tokens_file = work / "tokens"
        tokens_file.write_text("".join(f"{d}:{t}\n" for d, t in tokens.items()))
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
                if backend != "sqlite":
                    reset(url)
                hubs = [Hub(url, tokens_file, reader, work / f"{backend}-{rate:.0f}-{n}.log") for n in range(replicas)]
                try:
                    cpu_before = sum(cpu_seconds(h.process.pid) for h in hubs)
                    result = asyncio.run(offer([h.address for h in hubs], tokens, rate, args.seconds))
                    cpu = sum(cpu_seconds(h.process.pid) for h in hubs) - cpu_before
                finally:
                    for hub in hubs:
                        hub.stop()
                lost, twice = audit(url, result["acked"])
                accepted = len(result["acked"])
                lat = np.array(result["latencies"]) if result["latencies"] else np.array([0.0])
                row = {"backend": label, "offered": result["offered_rate"], "accepted": accepted / result["elapsed"],
                       "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                       "errors": result["errors"], "cpu_us": cpu / max(accepted, 1) * 1e6, "lost": lost,
                       "twice": twice, "sent": result["sent"]}
                rows.append(row)
                print(f"{label:20s} offered {row['offered']:7.0f}/s accepted {row['accepted']:7.0f}/s "
                      f"p50 {row['p50']:7.1f} ms p99 {row['p99']:8.1f} ms errors {row['errors']} "
                      f"cpu/event {row['cpu_us']:.0f} µs lost {lost} twice {twice} {result['details']}", flush=True)
        for size in [int(s) for s in args.fleet_sizes.split(",")]:
            for backend in ("sqlite", "postgresql"):
                if backend == "postgresql" and not have_postgres:
                    continue
                url = f"sqlite:///{work / f'fleet-{size}.sqlite'}" if backend == "sqlite" else POSTGRES_URL
                fill_fleet(url, size)
                hub = Hub(url, tokens_file, reader, work / f"fleet-{backend}-{size}.log")
                try:
                    first, whole, count = asyncio.run(time_fleet_status(hub.address, reader))
                finally:
                    hub.stop()
                fleet_rows.append({"backend": backend, "size": size, "first_ms": first, "all_ms": whole,
                                   "rows": count})
                print(f"fleet status, {backend}, {size} devices: first page {first:.0f} ms, all {whole:.0f} ms "
                      f"({count} rows)", flush=True)
        if have_postgres:
            reset(POSTGRES_URL)

    lines = ["| backend | offered events/s | accepted events/s | p50 ms | p99 ms | errors (after retries) | "
             "hub CPU µs/event | lost | stored twice |", "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "0"
        lines.append(f"| {r['backend']} | {r['offered']:.0f} | {r['accepted']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                     f"{errors} | {r['cpu_us']:.0f} | {r['lost']} | {r['twice']} |")
    lines += ["", "| fleet status | devices | first page ms | whole fleet ms | rows |", "|---|---:|---:|---:|---:|"]
    for f in fleet_rows:
        lines.append(f"| {f['backend']} | {f['size']} | {f['first_ms']:.0f} | {f['all_ms']:.0f} | {f['rows']} |")
    peaks = {}
    for r in rows:
        peaks[r["backend"]] = max(peaks.get(r["backend"], 0.0), r["accepted"])
    lines.append("")
    for backend, peak in peaks.items():
        lines.append(f"- {backend}: peak {peak:.0f} accepted events/s")
    if "PostgreSQL, 1 hub" in peaks and "PostgreSQL, 2 hubs" in peaks:
        lines.append(f"- two replicas ÷ one: {peaks['PostgreSQL, 2 hubs'] / peaks['PostgreSQL, 1 hub']:.2f}x "
                     "(both on the same server core, so this shows they share the load, not that they add cores)")
    for reason in skipped:
        lines.append(f"- skipped: {reason}")
    table = "\n".join(lines)
    print(table)
    args.out.write_text(table + "\n")
    write_plot(rows, args.plot)
    print(f"wrote {args.out} and {args.plot}")


def write_plot(rows: list[dict], path: Path) -> None:
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
