"""The one way the benchmarks start, pin, wait for and stop what they measure.

On a machine of two cores the server under test gets core 0 and the load generator (the benchmark's own process)
core 1: :func:`pin_load_generator` once at the start, :class:`ServerProcess` for every server (``edgeloop edge
serve``, ``edgeloop hub serve``, KServe, ``tritonserver``): its own process group pinned with ``taskset``, held to
a fraction of a core when asked (:class:`CpuCap`, what a pod's CPU limit is), its output in a log whose tail every
failure quotes, stopped with SIGTERM and then SIGKILL. :func:`local_store` is the S3 server and signing key the
benchmarks publish to; :func:`edge_in_process` runs the edge runtime inside the benchmark when it must read the
runtime's state rather than measure it. :func:`cpu_seconds` is how a server's CPU is counted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_runtime.app import EdgeApp
    from edge_runtime.settings import EdgeSettings
    from edgeloop.local_s3 import LocalS3
    from edgeloop_core.store import ObjectStore

ROOT = Path(__file__).resolve().parents[1]
EDGELOOP = ROOT / ".venv" / "bin" / "edgeloop"
"""The ``edgeloop`` command of the project's virtualenv (``make`` makes it)."""
SERVER_CORE, CLIENT_CORE = 0, 1
"""The core every server under test is pinned to, and the one the load generator (this process) runs on."""


def pin_load_generator(what: str = "the server") -> None:
    """Pin this process (the load generator) to :data:`CLIENT_CORE`; exit with a reason on a machine of one core."""
    if (os.cpu_count() or 1) < 2:
        sys.exit(f"needs two cores: one for {what}, one for the load generator")
    os.sched_setaffinity(0, {CLIENT_CORE})


@contextlib.contextmanager
def on_core(core: int) -> Iterator[None]:
    """Run the block with this process pinned to ``core`` (say, in-process ONNX Runtime on the server's core),
    then back to where it was."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    """Whether something accepts connections on loopback ``port``."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and every descendant (children of every thread: Triton's stubs, say), seconds."""
    total, ticks = 0.0, os.sysconf("SC_CLK_TCK")
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):  # the process exited while we read it
            continue
    return total


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant (children of every thread), as /proc lists them now."""
    found, pids = [], [pid]
    while pids:
        p = pids.pop()
        if p in found:
            continue
        found.append(p)
        with contextlib.suppress(OSError, ValueError):  # exited while we read it
            for task in Path(f"/proc/{p}/task").iterdir():
                pids.extend(int(c) for c in (task / "children").read_text().split())
    return found


def parse_cpu_list(text: str) -> set[int]:
    """The cores of a kernel CPU list (``0-2,5``: {0, 1, 2, 5})."""
    cores: set[int] = set()
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cores.update(range(int(first), int(last or first) + 1))
    return cores


def thread_affinities(pid: int) -> dict[str, set[int]]:
    """Every thread of ``pid`` and its descendants: ``"<pid>/<tid> <name>"`` → the cores it may run on (each
    thread's ``Cpus_allowed_list`` in ``/proc/<pid>/task/<tid>/status``; a thread that sets its own affinity, as
    ONNX Runtime's workers do unless told their number, shows here)."""
    found: dict[str, set[int]] = {}
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    fields = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines()
                                  if ":" in line)
                    found[f"{p}/{task.name} {fields['Name'].strip()}"] = parse_cpu_list(fields["Cpus_allowed_list"])
    return found


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Every thread of ``pid`` and its descendants: thread id → (the kernel's name for it, CPU seconds, user +
    system). Python threads all carry their process's name here; py-spy's ``--threads`` names them."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[str, float]] = {}
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    text = (task / "stat").read_text()
                    fields = text.rsplit(")", 1)[1].split()
                    found[int(task.name)] = (text[text.index("(") + 1 : text.rindex(")")],
                                             (int(fields[11]) + int(fields[12])) / ticks)
    return found


class NotPinnedError(RuntimeError):
    """A thread of a server under test may run outside the cores it was pinned to: the comparison is void."""


def verify_pinned(pid: int, cores: set[int], what: str) -> int:
    """:class:`NotPinnedError` unless every thread of ``pid`` and its descendants may run only on ``cores``; returns
    how many threads were checked. Call it after a warm-up: thread pools start (and pin themselves) on first use."""
    affinities = thread_affinities(pid)
    if not affinities:
        raise NotPinnedError(f"{what}: no threads found under /proc/{pid} (did it exit?)")
    escaped = {t: c for t, c in affinities.items() if not c <= cores}
    if escaped:
        listed = ", ".join(f"{t} on {sorted(c)}" for t, c in sorted(escaped.items()))
        raise NotPinnedError(f"{what}: {len(escaped)} of {len(affinities)} threads left core(s) {sorted(cores)}: "
                           f"{listed}; the comparison would be unfair, so this run stops")
    return len(affinities)


CGROUP_ROOT = Path("/sys/fs/cgroup/cpu") if Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists() else \
    Path("/sys/fs/cgroup")


class CpuCap:
    """A CPU limit for one process, as a Kubernetes CPU limit is one: a CFS quota (``fraction`` of a core per 10 ms)
    in a cgroup of its own (cgroup v1 ``cpu`` or v2 ``cpu.max``). :func:`cgroups_writable` says whether this machine
    lets us make one (root, a writable cgroup tree)."""

    PERIOD_US = 10_000

    def __init__(self, pid: int, fraction: float) -> None:
        self.path = CGROUP_ROOT / f"edgeloop-bench-{pid}"
        self.path.mkdir()
        quota = int(fraction * self.PERIOD_US)
        if (self.path / "cpu.max").exists():
            (self.path / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
        else:
            (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        (self.path / "cgroup.procs").write_text(str(pid))  # every thread of it, and what it starts later

    def remove(self) -> None:
        """Remove the cgroup once its process has exited (tries for up to 5 s)."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def cgroups_writable() -> str | None:
    """None when :class:`CpuCap` can work here, else why not."""
    probe = CGROUP_ROOT / f"edgeloop-bench-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        return f"cannot make a cgroup under {CGROUP_ROOT} ({exc.strerror}): run as root on a writable cgroup tree"
    if CGROUP_ROOT == Path("/sys/fs/cgroup") and "cpu" not in (CGROUP_ROOT / "cgroup.subtree_control").read_text():
        return "the cgroup v2 cpu controller is not enabled for child groups"
    return None


class ServerProcess:
    """A server in a process group of its own, pinned to ``core`` with ``taskset`` (and held to ``cpu`` of a core
    when given), its output in ``log``. A context manager: leaving the block stops it."""

    def __init__(self, argv: list[str], log: Path, env: Mapping[str, str] | None = None, core: int = SERVER_CORE,
                 cpu: float | None = None) -> None:
        self.argv = argv
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:  # the child keeps its own descriptor
            self.popen = subprocess.Popen(["taskset", "-c", str(core), *argv],
                                          env=dict(os.environ if env is None else env), stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.cap: CpuCap | None = None
        if cpu:
            try:
                self.cap = CpuCap(self.popen.pid, cpu)
            except OSError:
                self.stop()
                raise

    @property
    def pid(self) -> int:
        """The server's process id (``taskset`` execs the server, so it is the server's own)."""
        return self.popen.pid

    def log_tail(self, chars: int = 800) -> str:
        """The end of the server's log, for an error message."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_for(self, check: Callable[[], bool], what: str, timeout_s: float = 120.0, every_s: float = 0.2) -> None:
        """Poll ``check`` until it holds; RuntimeError (with the log's tail) when the server exits first or
        ``timeout_s`` passes. ``what`` names the awaited state in the message ("the model ready")."""
        deadline = time.monotonic() + timeout_s
        program = Path(self.argv[0]).name
        while not check():
            if self.popen.poll() is not None:
                raise RuntimeError(f"{program} exited ({self.popen.returncode}) while we waited for: {what}; "
                                   f"{self.log} ends:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{program}: waited {timeout_s:.0f} s in vain for: {what}; {self.log} ends:\n"
                                   f"{self.log_tail()}")
            time.sleep(every_s)

    def wait_port(self, port: int, timeout_s: float = 120.0) -> None:
        """Until the server accepts connections on ``port``."""
        self.wait_for(lambda: port_open(port), f"port {port} listening", timeout_s)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace_s``; then remove its CPU limit."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        if self.cap is not None:
            self.cap.remove()
            self.cap = None

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def local_store(work: Path, bucket: str = "bench") -> Iterator[tuple[LocalS3, ObjectStore]]:
    """A SeaweedFS S3 server on loopback (files under ``work/s3``) with ``bucket``, and a fresh signing key pair
    under ``work/keys`` (``signing-key.pem``, ``verify-key.pem``); stopped when the block ends."""
    from edgeloop.local_s3 import LocalS3
    from edgeloop_core.contract import generate_signing_key

    generate_signing_key(work / "keys")
    with LocalS3(work / "s3") as s3:
        yield s3, s3.store(bucket)


@contextlib.asynccontextmanager
async def edge_in_process(settings: EdgeSettings, store: ObjectStore, timeout_s: float = 300.0,
                          ) -> AsyncIterator[EdgeApp]:
    """The edge runtime in this process (this machine's device facts), started and ready (every model validated
    and serving) within ``timeout_s``; stopped when the block ends."""
    from edge_runtime.app import EdgeApp, wait_until_ready
    from edge_runtime.build.device import detect

    app = EdgeApp(settings, facts=detect(), store=store)
    await app.start()
    try:
        await wait_until_ready(app, timeout_s=timeout_s)
        yield app
    finally:
        await app.stop(grace_s=1.0)
