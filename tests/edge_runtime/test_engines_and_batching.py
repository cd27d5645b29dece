"""Engine selection and target keys, one conformance test over every backend, and dynamic batching."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from edge_runtime.build.device import DeviceFacts, detect, parse_l4t_release
from edge_runtime.build.engines import build_engine, plan_engine
from edge_runtime.serve.batching import DynamicBatcher
from edgeloop_core.errors import ConfigError
from tests.conftest import make_staged_version

CPU = DeviceFacts(arch="x86_64", ort_version="1.31.1", ort_providers=("CPUExecutionProvider",))
ORIN = DeviceFacts(arch="aarch64", ort_version="1.20.0", ort_providers=("CPUExecutionProvider",),
                   trt_version="10.3.0.30", gpu_name="Orin", compute_capability="87", l4t_release="36.4")


def test_l4t_release_is_read_from_nv_tegra_release(tmp_path):
    line = "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: ...\n"
    assert parse_l4t_release(line) == "36.4"
    (tmp_path / "nv_tegra_release").write_text(line)
    facts = detect(tmp_path / "nv_tegra_release")
    assert facts.l4t_release == "36.4" and facts.ort_version and "CPUExecutionProvider" in facts.ort_providers


def test_variant_and_target_key_per_device(tmp_path):
    manifest = make_staged_version(tmp_path)
    cpu = plan_engine(manifest, CPU)
    assert (cpu.backend, cpu.variant.name) == ("onnxruntime", "int8-ort")
    assert str(cpu.target_key) == "ort1.31-cpu-x86_64-int8"
    orin = plan_engine(manifest, ORIN, max_batch_size=32, opt_batch_size=16)
    assert (orin.backend, orin.variant.name) == ("tensorrt", "fp32")  # the staged version has no int8-qdq
    assert str(orin.target_key) == "trt10.3.0.30-sm87-l4t36.4-aarch64-fp32-b1x16x32"
    forced = plan_engine(manifest, ORIN, backend="onnxruntime", variant="fp32")
    assert str(forced.target_key) == "ort1.20-cpu-aarch64-fp32"
    with pytest.raises(ConfigError):
        plan_engine(manifest, CPU, backend="tensorrt")
    with pytest.raises(ConfigError):
        plan_engine(manifest, CPU, variant="int4")


BACKENDS = [
    pytest.param("onnxruntime", id="onnxruntime-cpu"),
    pytest.param("tensorrt", id="tensorrt", marks=pytest.mark.gpu),
    # the strict stand-in (tests/trt_standin.py) at both API levels, so the TensorRT path is held to the same
    # conformance here; the real row above runs it against real TensorRT where a GPU exists
    pytest.param("tensorrt-standin-10.3", id="tensorrt-standin-10.3"),
    pytest.param("tensorrt-standin-11", id="tensorrt-standin-11"),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_conformance(backend, trained, tmp_path, monkeypatch):
    """Every backend builds from the published ONNX, caches the build, and matches ONNX Runtime's reference."""
    if backend.startswith("tensorrt-standin-"):
        from tests import trt_standin

        trt_standin.install(monkeypatch, backend.rsplit("-", 1)[1])
        backend = "tensorrt"
    facts = detect()
    if backend == "tensorrt" and not facts.has_tensorrt:
        pytest.skip("TensorRT and a CUDA GPU are needed; this machine has " + (facts.notes[-1] if facts.notes else
                                                                               "neither"))
    from tests.edge_runtime.conftest import accuracy_of

    manifest_like = make_staged_version(tmp_path / "m")
    plan = plan_engine(manifest_like, facts, backend=backend, variant="fp32")
    path = tmp_path / "engine" / plan.engine_file
    engine, built = build_engine(plan, trained.good["fp32"], path, max_batch_size=16)
    assert built and path.exists()
    again, built_again = build_engine(plan, trained.good["fp32"], path, max_batch_size=16)
    assert not built_again
    x = trained.x_val[:16].astype(np.float32)
    (logits,) = again.infer({engine.inputs[0].name: x}).values()
    reference = accuracy_of(trained.good["fp32"], trained.x_val[:16], trained.y_val[:16])
    assert float((logits.argmax(1) == trained.y_val[:16]).mean()) == pytest.approx(reference, abs=1 / 16)
    engine.close()
    again.close()


def test_dynamic_batching_merges_concurrent_requests(trained, tmp_path):
    from edge_runtime.build.engines.onnxruntime import OrtEngine

    engine = OrtEngine(trained.good["fp32"], max_batch_size=16)
    runs: list[int] = []

    async def scenario():
        batcher = DynamicBatcher(engine, max_batch_size=16, max_queue_delay_us=50_000,
                                 on_batch=lambda rows, _: runs.append(rows))
        x = trained.x_val[:40].astype(np.float32)
        results = await asyncio.gather(*(batcher.infer({"input": x[i : i + 2]}) for i in range(0, 40, 2)))
        await batcher.close()
        return x, results

    x, results = asyncio.run(scenario())
    expected = engine.infer({"input": x})["logits"]
    np.testing.assert_allclose(np.concatenate([r["logits"] for r in results]), expected, rtol=1e-5, atol=1e-5)
    assert sum(runs) == 40 and max(runs) == 16 and len(runs) < 20  # merged, never above the limit


def test_batcher_close_finishes_queued_requests(trained):
    from edge_runtime.build.engines.onnxruntime import OrtEngine

    engine = OrtEngine(trained.good["fp32"], max_batch_size=4)

    async def scenario():
        batcher = DynamicBatcher(engine, max_batch_size=4, max_queue_delay_us=100_000)
        pending = [asyncio.ensure_future(batcher.infer({"input": trained.x_val[i : i + 1].astype(np.float32)}))
                   for i in range(10)]
        await asyncio.sleep(0)
        await batcher.close()
        return [p.result()["logits"].shape for p in pending]

    assert asyncio.run(scenario()) == [(1, 10)] * 10


class _SlowEngine:
    """A real ONNX Runtime engine that takes a fixed extra time per run, so queueing is deterministic."""

    def __init__(self, engine, seconds: float) -> None:
        import time

        self._engine, self._seconds, self._sleep = engine, seconds, time.sleep
        self.inputs, self.outputs, self.max_batch_size = engine.inputs, engine.outputs, engine.max_batch_size
        self.runs: list[int] = []

    def infer(self, inputs):
        self.runs.append(next(iter(inputs.values())).shape[0])
        self._sleep(self._seconds)
        if (next(iter(inputs.values())) < -1e6).any():  # a poisoned request: its own error
            raise ValueError("poisoned input")
        return self._engine.infer(inputs)

    def close(self) -> None:
        self._engine.close()


def test_the_batcher_takes_everything_waiting_and_never_waits_when_idle(trained):
    from edge_runtime.build.engines.onnxruntime import OrtEngine
    from edge_runtime.serve.batching import BatchingCounts

    engine = _SlowEngine(OrtEngine(trained.good["fp32"], max_batch_size=16), 0.02)
    x = trained.x_val[:40].astype(np.float32)

    async def scenario():
        batcher = DynamicBatcher(engine, max_batch_size=16)  # no queue delay
        await batcher.infer({"input": x[:1]})  # alone: runs at once
        alone = BatchingCounts(**vars(batcher.counts))
        busy = asyncio.ensure_future(batcher.infer({"input": x[:1]}))
        while not engine.runs[1:]:  # the engine is running that one now
            await asyncio.sleep(0.001)
        # 20 requests arrive while the engine is busy: the next run takes all it can (16), the one after the rest
        waiting = [batcher.infer({"input": x[i : i + 1]}) for i in range(1, 21)]
        results = [await busy, *await asyncio.gather(*waiting)]
        await batcher.close()
        return alone, batcher.counts, results

    alone, counts, results = asyncio.run(scenario())
    # a lone request ran at once: one batch, one engine run, no wait for company taken
    assert alone == BatchingCounts(requests=1, batches=1, runs=1, waits=0, probes=0, gathered=0)
    assert engine.runs == [1, 1, 16, 4]  # batches formed from what queued while the engine was busy
    assert counts == BatchingCounts(requests=22, batches=4, runs=4, waits=0, probes=0, gathered=0)
    expected = engine._engine.infer({"input": x[:21]})["logits"]
    np.testing.assert_allclose(np.concatenate([r["logits"] for r in results]), expected, rtol=1e-5, atol=1e-5)


def test_a_bad_request_fails_alone_and_big_requests_are_split(trained):
    from edge_runtime.build.engines.onnxruntime import OrtEngine

    engine = _SlowEngine(OrtEngine(trained.good["fp32"], max_batch_size=4), 0.01)
    x = trained.x_val[:12].astype(np.float32)

    async def scenario():
        batcher = DynamicBatcher(engine, max_batch_size=1)  # "batching off": still takes multi-sample requests
        big = await batcher.infer({"input": x[:5]})
        batcher2 = DynamicBatcher(engine, max_batch_size=4)
        poisoned = np.full((1, 1, 8, 8), -1e9, np.float32)
        calls = [batcher2.infer({"input": x[i : i + 1]}) for i in range(3)]
        calls.insert(1, batcher2.infer({"input": poisoned}))
        results = await asyncio.gather(*calls, return_exceptions=True)
        await batcher.close()
        await batcher2.close()
        return big, results

    big, results = asyncio.run(scenario())
    assert big["logits"].shape == (5, 10) and engine.runs[:5] == [1, 1, 1, 1, 1]
    assert isinstance(results[1], ValueError)
    assert all(isinstance(r, dict) and r["logits"].shape == (1, 10) for i, r in enumerate(results) if i != 1)


def test_facts_are_plain_data():
    assert replace(CPU, dla_cores=2).to_dict()["dla_cores"] == 2


async def _serialized_clients(batcher, x, clients: int, rounds: int, accept_s: float) -> list:
    """``clients`` closed-loop clients whose requests reach the batcher one per event-loop turn, each after
    ``accept_s`` of event-loop work: how a Python gRPC server (grpc.aio) hands requests over."""
    import time

    loop = asyncio.get_running_loop()
    arrivals: asyncio.Queue = asyncio.Queue()

    async def acceptor() -> None:
        while True:
            ticket = await arrivals.get()
            time.sleep(accept_s)  # the event loop is busy receiving and decoding this request
            ticket.set_result(None)
            await asyncio.sleep(0)  # the next one comes on a later turn

    async def client(i: int) -> list:
        out = []
        for _ in range(rounds):
            ticket = loop.create_future()
            arrivals.put_nowait(ticket)
            await ticket
            out.append(await batcher.infer({"input": x[i : i + 1]}))
        return out

    accepting = loop.create_task(acceptor())
    try:
        return await asyncio.gather(*(client(i) for i in range(clients)))
    finally:
        accepting.cancel()


def _probe_runs(probes: int) -> int:
    """The runs after which a lone client's ``probes``-th probe comes: intervals from PROBE_EVERY, doubling after each
    probe that found nobody, up to PROBE_EVERY_MAX."""
    from edge_runtime.serve.batching import PROBE_EVERY, PROBE_EVERY_MAX

    return sum(min(PROBE_EVERY_MAX, PROBE_EVERY << i) for i in range(probes))


def _lone_probes(runs: int) -> int:
    """How many probes a lone client's ``runs`` runs take."""
    probes = 0
    while _probe_runs(probes + 1) <= runs:
        probes += 1
    return probes


def test_company_wait_fills_batches_when_requests_trickle_in_and_spares_a_lone_client(trained):
    from edge_runtime.build.engines.onnxruntime import OrtEngine
    from edge_runtime.serve.batching import BatchingCounts

    engine = _SlowEngine(OrtEngine(trained.good["fp32"], max_batch_size=16), 0.0)
    x = trained.x_val[:32].astype(np.float32)

    async def scenario(company_us: int, clients: int, rounds: int) -> tuple[BatchingCounts, list]:
        batcher = DynamicBatcher(engine, max_batch_size=16, company_delay_us=company_us)
        results = await _serialized_clients(batcher, x, clients, rounds, 0.0005)
        await batcher.close()
        return batcher.counts, results

    engine.runs.clear()
    counts, _ = asyncio.run(scenario(0, 32, 8))  # without company_delay_us nobody waits, whatever the clients do
    assert (counts.requests, counts.waits, counts.probes, counts.gathered) == (256, 0, 0, 0)
    assert counts.batches == counts.runs == len(engine.runs) and sum(engine.runs) == 256
    engine.runs.clear()
    # waiting brings company: batches fill. The company wait is generous (0.2 s): what ends a wait is the batch
    # filling, on any machine, not the deadline (only the last waits, when the clients stop, reach it)
    counts, results = asyncio.run(scenario(200_000, 32, 16))
    runs = engine.runs
    # until a probe (every 16 runs without waiting at first; a short look) finds company, runs stay tiny; from then
    # on every batch is full, but the last (what is left when the clients stop)
    assert 16 in runs and set(runs[runs.index(16):-1]) == {16}, runs
    assert 1 <= counts.probes <= 3 and runs.index(16) <= _probe_runs(counts.probes) + 4, (counts, runs)
    # every batch after the first full one followed a wait for company (one may have found its batch full already:
    # no wait needed), and waiting brought requests
    assert counts.waits >= len(runs) - runs.index(16) - 2 and counts.gathered > 0, counts
    expected = engine._engine.infer({"input": x})["logits"]
    for i, answers in enumerate(results):
        for answer in answers:
            np.testing.assert_allclose(answer["logits"][0], expected[i], rtol=1e-5, atol=1e-5)

    engine.runs.clear()
    counts, _ = asyncio.run(scenario(200_000, 1, 600))  # a lone client never brings company: only probes wait
    assert engine.runs == [1] * 600
    # a few probes (ever rarer: none found company), so no wait for company was ever taken
    assert replace(counts, direct=0) == BatchingCounts(requests=600, batches=600, runs=600, waits=0,
                                                       probes=_lone_probes(600), gathered=0)


def test_a_lone_client_runs_on_its_own_turn_and_its_probes_wait_on_no_timer(trained, monkeypatch):
    """Issue 25: a lone client paid a 1 ms timer on every 64th request (the probe for company), and every request
    went through the worker task and back (two event-loop turns). Now a probe is a few event-loop turns and a
    request that finds the engine idle runs on its caller's turn."""
    import edge_runtime.serve.batching as batching
    from edge_runtime.build.engines.onnxruntime import OrtEngine
    from edge_runtime.serve.batching import BatchingCounts

    timed: list[float] = []

    async def recorded_wait(event, timeout):
        timed.append(timeout)
        return await real_wait(event, timeout)

    real_wait = batching.wait_event
    monkeypatch.setattr(batching, "wait_event", recorded_wait)
    monkeypatch.setattr(batching, "INLINE_RUN_S", 1.0)  # every run counts as short, on any machine's load
    engine = _SlowEngine(OrtEngine(trained.good["fp32"], max_batch_size=16, threads=1), 0.0)
    x = trained.x_val[:1].astype(np.float32)

    async def scenario() -> BatchingCounts:
        batcher = DynamicBatcher(engine, max_batch_size=16, company_delay_us=200_000)
        await _serialized_clients(batcher, x, 1, 600, 0.0)
        await batcher.close()
        return batcher.counts

    counts = asyncio.run(scenario())
    probes = _lone_probes(600)  # 16, 32, 64, 128, 256 runs apart: 5, under 1% of the requests
    assert probes == 5
    assert timed == []  # no probe waited on the clock
    # the first request went through the worker (no run measured yet), the probes too; every other ran at once
    assert counts == BatchingCounts(requests=600, batches=600, runs=600, waits=0, probes=probes, gathered=0,
                                    direct=600 - 1 - probes)


def test_values_onnx_runtime_refuses_are_the_request_s_fault_and_fail_alone(tmp_path):
    """A token id outside an embedding table passes every check on names, types and shapes; ONNX Runtime refuses
    it. That is InvalidInput (INVALID_ARGUMENT, with ONNX Runtime's reason), and only its request fails."""
    from edge_runtime.build.engines.onnxruntime import OrtEngine
    from edgeloop_core.errors import InvalidInput
    from tests.onnx_models import embedding_model

    table = np.arange(200, dtype=np.float32).reshape(50, 4)
    engine = OrtEngine(embedding_model(tmp_path / "embed.onnx", table), max_batch_size=8, threads=1)
    ids = [np.array([[i, i + 1, 999 if i == 2 else i + 2]], np.int64) for i in range(5)]

    async def scenario():
        batcher = DynamicBatcher(engine, max_batch_size=8)
        results = await asyncio.gather(*(batcher.infer({"ids": x}) for x in ids), return_exceptions=True)
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert isinstance(results[2], InvalidInput) and "out of data bounds" in str(results[2])
    assert "\n" not in str(results[2])
    assert all(np.array_equal(r["vectors"], table[x]) for i, (x, r) in enumerate(zip(ids, results, strict=True))
               if i != 2)


class _CostEngine:
    """An engine whose runs burn CPU: ``fixed_s`` per run plus ``per_sample_s`` per sample (busy, as a CPU engine
    is, so the run's thread CPU time is its cost)."""

    def __init__(self, fixed_s: float, per_sample_s: float) -> None:
        from edge_runtime.build.engines.base import TensorInfo

        self.fixed_s, self.per_sample_s = fixed_s, per_sample_s
        self.inputs = (TensorInfo("input", "FP32", (-1, 2)),)
        self.outputs = (TensorInfo("output", "FP32", (-1, 2)),)
        self.max_batch_size = 16
        self.runs: list[int] = []

    def infer(self, inputs):
        import time

        x = inputs["input"]
        self.runs.append(x.shape[0])
        started = time.thread_time()
        while time.thread_time() - started < self.fixed_s + self.per_sample_s * x.shape[0]:
            pass
        return {"output": x * 2}


@pytest.mark.parametrize(("fixed_s", "per_sample_s", "limit"), [(0.0, 0.002, 4), (0.002, 0.00005, 16)],
                         ids=["compute-bound: batching does not pay", "batching pays"])
def test_batches_stay_short_where_batching_does_not_pay(fixed_s, per_sample_s, limit):
    """Issue 25: batches of 16 of a compute-bound CNN cost more per sample than runs alone and left the 99th
    percentile at twice the median. Where a sample costs about as much in a batch as alone, batches are kept near
    RUN_S of engine time (here 4 samples of 2 ms); where batching pays, they fill up to max_batch_size."""
    x = np.arange(64, dtype=np.float32).reshape(32, 2)
    engine = _CostEngine(fixed_s, per_sample_s)

    async def scenario():
        batcher = DynamicBatcher(engine, max_batch_size=16)
        await batcher.infer({"input": x[:1]})  # alone: the cost of one sample
        first = await asyncio.gather(*(batcher.infer({"input": x[i : i + 1]}) for i in range(20)))  # a batch
        engine.runs.clear()
        then = await asyncio.gather(*(batcher.infer({"input": x[i : i + 1]}) for i in range(20)))
        await batcher.close()
        return batcher.batch_limit, first + then

    batch_limit, results = asyncio.run(scenario())
    assert batch_limit == limit
    assert max(engine.runs) == limit and sum(engine.runs) == 20, engine.runs
    assert all(np.array_equal(r["output"], x[i % 20 : i % 20 + 1] * 2) for i, r in enumerate(results))
