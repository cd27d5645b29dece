"""What ``bench/serve.py`` states about a run: the pinning check stops a run where a thread escaped its core, and
issue 25's targets read PASS or FAIL from the run's own rows ("not measured" where a row is missing)."""

from __future__ import annotations

import os
import threading

import pytest

from bench.harness import NotPinnedError, parse_cpu_list, thread_affinities, verify_pinned
from bench.serve import EDGELOOP_TRITON, EchoFloor, KServeTuned, Triton, acceptance


def test_cpu_lists_parse_as_the_kernel_writes_them():
    assert parse_cpu_list("0") == {0}
    assert parse_cpu_list("0-2,5,7-8\n") == {0, 1, 2, 5, 7, 8}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores to pin a thread elsewhere")
def test_a_thread_that_pins_itself_elsewhere_stops_the_run():
    """What ONNX Runtime does with its default thread count: a worker sets its own affinity to another core."""
    mine = os.sched_getaffinity(0)
    core, other = sorted(mine)[:2]
    assert verify_pinned(os.getpid(), mine, "this process") == len(thread_affinities(os.getpid()))
    pinned, done = threading.Event(), threading.Event()

    def escape() -> None:
        os.sched_setaffinity(0, {other})  # this thread only
        pinned.set()
        done.wait(10)

    worker = threading.Thread(target=escape)
    worker.start()
    pinned.wait(10)
    try:
        with pytest.raises(NotPinnedError) as caught:
            verify_pinned(os.getpid(), {core}, "the server")
    finally:
        done.set()
        worker.join()
    message = str(caught.value)
    assert message.startswith("the server: ") and f"on [{other}]" in message and "\n" not in message


def _row(server: str, model: str, c: int, rps: float, p50: float = 1.0, p99: float = 1.0, cpu_us: float = 100.0):
    return {"server": server, "model": model, "concurrency": c, "rps": rps, "p50": p50, "p99": p99,
            "cpu_us": cpu_us, "threads": 3}


def test_targets_pass_and_fail_by_the_rows():
    rows = [_row("edgeloop", "small", 32, 4000, cpu_us=200), _row(KServeTuned.name, "small", 32, 2500, cpu_us=450),
            _row(EchoFloor.name, "small", 32, 5000, cpu_us=150),
            _row("edgeloop", "small", 1, 1800, p50=0.50, p99=1.1), _row(KServeTuned.name, "small", 1, 1800, p50=0.54),
            _row("edgeloop", "large", 32, 570, p50=58, p99=90),
            _row(EDGELOOP_TRITON["edgeloop"], "small", 32, 9000), _row(Triton.name, "small", 32, 8500)]
    lines = acceptance(rows, {"small": (14000, 18000), "large": (661, 627)})
    # 1.6x tuned KServe, but 1.33x the echo floor's CPU: neither
    assert lines[0].startswith("- target, small model at c=32") and ": FAIL (1.60x tuned KServe; 1.33x" in lines[0]
    assert ": PASS (p50 0.50 ms against 0.54 ms, p99 1.10 ms)" in lines[1]
    assert ": FAIL (0.862x, p99 1.55x p50)" in lines[2]  # fast enough, but the tail is too long
    assert ": FAIL (1.06x)" in lines[3] and ": not measured (no rows)" in lines[4]


def test_a_triton_target_no_server_can_reach_is_said_so_not_passed():
    # large, compute-bound: in-process ORT serves 661/s, Triton alone 605/s: 1.1x Triton would beat the model itself
    rows = [_row(EDGELOOP_TRITON["edgeloop"], "large", 32, 612), _row(Triton.name, "large", 32, 605),
            _row(EDGELOOP_TRITON["edgeloop"], "small", 32, 9000), _row(Triton.name, "small", 32, 8500)]
    lines = acceptance(rows, {"small": (14000, 18000), "large": (661, 627)})
    assert ": FAIL (1.06x)" in lines[3]  # small: the model would allow it, so it is a failure
    assert ": OUT OF REACH (1.01x; in-process ONNX Runtime itself, the most any server can serve, is 1.093x" in lines[4]


def test_a_missing_row_is_not_measured_never_a_pass():
    lines = acceptance([_row("edgeloop", "small", 1, 1800, p50=0.4, p99=0.5)], {"small": (14000, 18000)})
    assert all(": not measured (" in line for line in lines), lines
