"""Video benchmark: frames/s of a served detector at 320×320 (the edge runtime's gRPC endpoint, frames through system
shared memory) against in-process ONNX Runtime on the same frames, the ratio measured in the same run.

    .venv/bin/python bench/video.py [--frames 120] [--rounds 7] [--patience 4] [--quick] [--readme PATH] [--plot PATH]

The detector is a YOLOv8n (Ultralytics' architecture: C2f blocks, SPPF, a PAN neck, the decoupled head with DFL;
3.2 M parameters, ~2.2 GFLOPs at 320×320) built here in PyTorch with random weights (its class biases set so that
a few dozen boxes per frame pass the 0.25 score threshold, so NMS has work), exported to ONNX (opset 17, dynamic
batch) like an Ultralytics export: one output ``[batch, 84, 2100]``. It is published twice, FP32: **raw** (the
app decodes and suppresses with :func:`edgeloop_core.detection.decode`) and **NMS in the model**
(:func:`components.nms.append_nms`: the app receives ``boxes``, ``scores``, ``classes``, ``num_detections``).

The frames: a synthetic camera video, 640×360, of shapes moving over a textured background, decoded into memory
before anything is timed. Each path runs the example app's own loop (``examples/video_client.py``: letterbox to
320×320, infer, decode, map the boxes back, draw) over the same frames; only the inference call differs:

* **edgeloop**: ``edgeloop edge serve`` (builtin server, ONNX Runtime, one intra-op thread, batching off: one
  camera sends one frame at a time) pinned to core 0; the app, this process, pinned to core 1, each frame and each
  output through registered system shared-memory regions (tritonclient);
* **in-process ONNX Runtime**: the same ONNX file in an ``InferenceSession`` in this process (one intra-op and one
  inter-op thread, no spinning, as the runtime configures it on a small CPU), the loop pinned to core 0.

The paths alternate in short rounds of ``--frames`` frames, so a busy neighbour slows both alike; and since a
neighbour on a 2-core machine slows the served path (two processes, two cores) more than the in-process one, the
run goes on (up to ``--patience`` × ``--rounds`` pairs) until ``--rounds`` pairs were quiet (others, from
``/proc/stat`` less this process and the server, kept at most 10% of the cores busy), and only those count when
there are enough. Each row is a path's median round among the pairs that count, its ratio the median of their
ratios. Reported: frames/s, end-to-end latency per frame p50/p99, the model call's p50, the CPU the serving side
used per frame (server process, from /proc; in-process: ONNX Runtime's runs), and edgeloop ÷ in-process. The threads
and cores are checked, not assumed: every thread of the server must be allowed core 0 only, and neither side may use
more than one core's worth of CPU. Writes its section of ``bench/README.md`` (``bench/report.py``) and a plot;
``--quick`` runs one pair of 30-frame rounds into a copy of the README.

The clip model (action recognition, :mod:`components.clip_model`) gets rows of its own: trained here through the
pipeline's functions on the generated action set, each of its variants (FP32 dense, pruned FP32, FP16, CPU INT8)
published as a model and measured with the streaming client's loop (``examples/clip_client.py``: a window of 8
frames every 2, through shared memory) on a video of 4 × ``--frames`` frames of generated actions, against the same
file in in-process ONNX Runtime, alternating for ``--rounds`` pairs: clips/s, the latency from a window's last frame
to its action, edgeloop ÷ in-process, and each variant's speed-up against FP32 dense beside the Jetson Nano study's
average (16%).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402 - after the path the benchmarks import from
    SERVER_CORE,
    cpu_seconds,
    local_store,
    on_core,
    pin_load_generator,
)
from bench.report import BenchRun  # noqa: E402

if TYPE_CHECKING:
    from torch import nn

    from edgeloop.local_s3 import LocalS3
    from edgeloop_core.contract import Task
    from edgeloop_core.store import ObjectStore
    from examples.clip_client import ClipInput
    from examples.video_client import InputSpec

SIZE = 320
"""The detector's input, pixels (square)."""
CLASSES = 80
FRAME_SIZE = (640, 360)
"""The camera's frames, width × height: letterboxed to :data:`SIZE` by the app."""
TARGET_DETECTIONS = 30
"""Boxes per frame above the score threshold that the class biases are set for (before NMS)."""
QUICK = {"frames": 30, "rounds": 1, "patience": 1}
FULL = {"frames": 120, "rounds": 7, "patience": 4}
"""``--frames``, ``--rounds`` and ``--patience`` of a ``--quick`` run and of a full one, unless given."""
QUIET = 0.10
"""A pair of rounds is quiet when others kept at most this share of the machine's cores busy during both."""
MIN_QUIET_PAIRS = 3
"""Fewer quiet pairs than this (or than ``--rounds``, if fewer), and every pair counts."""
MODELS = {"detector": "raw", "detector-nms": "NMS in the model"}
"""Published model name → how its rows are labelled."""


# --- the detector -------------------------------------------------------------------------------------------------
def yolov8n(num_classes: int = CLASSES) -> nn.Module:
    """YOLOv8n's architecture (width 0.25, depth 0.33) with random weights, in eval mode: input ``[b, 3, H, W]`` in
    [0, 1], output ``[b, 4 + classes, anchors]`` (``cx, cy, w, h`` in input pixels, sigmoid class scores)."""
    import torch
    from torch import nn

    class Conv(nn.Sequential):
        def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1) -> None:
            super().__init__(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())

    class Bottleneck(nn.Module):
        def __init__(self, c: int, shortcut: bool) -> None:
            super().__init__()
            self.cv1, self.cv2, self.add = Conv(c, c, 3), Conv(c, c, 3), shortcut

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.cv2(self.cv1(x))
            return x + y if self.add else y

    class C2f(nn.Module):
        def __init__(self, cin: int, cout: int, n: int, shortcut: bool) -> None:
            super().__init__()
            self.c = cout // 2
            self.cv1, self.cv2 = Conv(cin, 2 * self.c), Conv((2 + n) * self.c, cout)
            self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            parts = list(self.cv1(x).chunk(2, 1))
            parts.extend(m(parts[-1]) for m in self.m)
            return self.cv2(torch.cat(parts, 1))

    class SPPF(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.cv1, self.cv2, self.pool = Conv(c, c // 2), Conv(c * 2, c), nn.MaxPool2d(5, 1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = [self.cv1(x)]
            y.extend(self.pool(y[-1]) for _ in range(3))
            return self.cv2(torch.cat(y, 1))

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(Conv(3, 16, 3, 2), Conv(16, 32, 3, 2), C2f(32, 32, 1, True))
            self.p3 = nn.Sequential(Conv(32, 64, 3, 2), C2f(64, 64, 2, True))
            self.p4 = nn.Sequential(Conv(64, 128, 3, 2), C2f(128, 128, 2, True))
            self.p5 = nn.Sequential(Conv(128, 256, 3, 2), C2f(256, 256, 1, True), SPPF(256))
            self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
            self.top4, self.top3 = C2f(384, 128, 1, False), C2f(192, 64, 1, False)
            self.down3, self.bottom4 = Conv(64, 64, 3, 2), C2f(192, 128, 1, False)
            self.down4, self.bottom5 = Conv(128, 128, 3, 2), C2f(384, 256, 1, False)
            self.box = nn.ModuleList(nn.Sequential(Conv(c, 64, 3), Conv(64, 64, 3), nn.Conv2d(64, 64, 1))
                                     for c in (64, 128, 256))
            self.cls = nn.ModuleList(nn.Sequential(Conv(c, 80, 3), Conv(80, 80, 3), nn.Conv2d(80, num_classes, 1))
                                     for c in (64, 128, 256))
            self.register_buffer("bins", torch.arange(16, dtype=torch.float32).view(1, 1, 16, 1))

        def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
            p3 = self.p3(self.stem(x))
            p4 = self.p4(p3)
            p5 = self.p5(p4)
            t4 = self.top4(torch.cat([self.up(p5), p4], 1))
            n3 = self.top3(torch.cat([self.up(t4), p3], 1))
            n4 = self.bottom4(torch.cat([self.down3(n3), t4], 1))
            return [n3, n4, self.bottom5(torch.cat([self.down4(n4), p5], 1))]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            boxes, scores = [], []
            for level, (feature, stride) in enumerate(zip(self.levels(x), (8, 16, 32), strict=True)):
                b, _, h, w = feature.shape
                dfl = self.box[level](feature).view(b, 4, 16, h * w).softmax(2)
                ltrb = (dfl * self.bins).sum(2)  # [b, 4, cells]: distances to the sides, in strides
                ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype),
                                        indexing="ij")
                centre = torch.stack([xs.flatten(), ys.flatten()]) + 0.5
                top_left, bottom_right = centre - ltrb[:, :2], centre + ltrb[:, 2:]
                boxes.append(torch.cat([(top_left + bottom_right) / 2, bottom_right - top_left], 1) * stride)
                scores.append(self.cls[level](feature).flatten(2).sigmoid())
            return torch.cat([torch.cat(boxes, 2), torch.cat(scores, 2)], 1)

    return Detector().eval()


def export_detector(path: Path, calibration: np.ndarray, seed: int = 0) -> Path:
    """:func:`yolov8n` with random weights (``seed``), its class biases shifted so that ~:data:`TARGET_DETECTIONS`
    anchors per frame of ``calibration`` pass a 0.25 score, exported like an Ultralytics export (``images`` →
    ``output0``, opset 17, dynamic batch)."""
    import warnings

    import torch

    torch.manual_seed(seed)
    model = yolov8n()
    x = torch.from_numpy(calibration)
    with torch.no_grad():
        # batch-norm statistics from the frames (random weights shrink activations layer by layer otherwise, and
        # every score would be the same): each layer's output then has unit variance, as in a trained network
        for layer in model.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.momentum = None  # a plain average over the calibration batch
        model.train()
        model(x)
        model.eval()
        best = model(x)[:, 4:].max(1).values  # [frames, anchors]
        quantile = 1 - TARGET_DETECTIONS / best.shape[1]
        cut = torch.quantile(torch.logit(best.clamp(1e-6, 1 - 1e-6)), quantile)
        for head in model.cls:
            head[-1].bias += float(torch.logit(torch.tensor(0.25)) - cut)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x[:1],), str(path), input_names=["images"], output_names=["output0"],
                              dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}}, opset_version=17,
                              dynamo=False)
    return path


# --- the frames ----------------------------------------------------------------------------------------------------
def camera_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` BGR frames of :data:`FRAME_SIZE`: shapes moving over a textured background, written as an mp4v
    video and read back (so they carry a codec's artefacts, as a camera's do)."""
    import cv2

    from examples.video_client import open_video, read_frames

    rng = np.random.default_rng(seed)
    width, height = FRAME_SIZE
    background = cv2.GaussianBlur(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), (0, 0), 6)
    shapes = [(rng.integers(0, width), rng.integers(0, height), rng.integers(20, 90), rng.integers(-6, 7),
               rng.integers(-4, 5), tuple(int(c) for c in rng.integers(0, 255, 3))) for _ in range(8)]
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-video-") as tmp:
        path = Path(tmp) / "camera.mp4"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, FRAME_SIZE)
        for index in range(count):
            frame = background.copy()
            for x, y, size, dx, dy, colour in shapes:
                cx, cy = int((x + dx * index) % width), int((y + dy * index) % height)
                cv2.rectangle(frame, (cx, cy), (cx + int(size), cy + int(size) // 2), colour, -1)
                cv2.circle(frame, (cx, cy), int(size) // 3, colour[::-1], -1)
            writer.write(frame)
        writer.release()
        capture, _, _ = open_video(path)
        try:
            return list(read_frames(capture))
        finally:
            capture.release()


# --- publishing ---------------------------------------------------------------------------------------------------
def publish_detector(store: ObjectStore, work: Path, name: str, onnx: Path, task: Task, inputs: np.ndarray) -> None:
    """Publish ``onnx`` as version ``v1`` of ``name`` on channel ``stable``: one FP32 variant, validated on the device
    by detection F1 against its own outputs on ``inputs``, signed with the benchmark's key."""
    from edgeloop_core.contract import load_signing_key
    from examples.publish_onnx import publish_onnx_as_is

    publish_onnx_as_is(store, load_signing_key(work / "keys" / "signing-key.pem"), onnx, name, task,
                       {"images": inputs}, work=work)


# --- measuring ----------------------------------------------------------------------------------------------------
@dataclass
class Round:
    """One pass of the app's loop over the frames on one path."""

    fps: float
    p50_ms: float
    p99_ms: float
    call_p50_ms: float
    cpu_ms: float
    """CPU of the serving side per frame, ms: the server's process tree; in-process, ONNX Runtime's runs."""
    cores: float
    """CPU of the serving process over the wall time (in-process: this whole process): at most 1 when one core's
    worth is all it used."""
    detections: float
    """Mean detections per frame after NMS."""
    others: float
    """CPU busy outside this benchmark (this process and the server), as a share of all cores: other load."""


@dataclass
class Measured:
    """Rounds of one model on one path."""

    model: str
    path: str
    rounds: list[Round] = field(default_factory=list)

    def median(self, pairs: list[int]) -> Round:
        """The round of median frames/s among the rounds of ``pairs``."""
        picked = sorted((self.rounds[i] for i in pairs), key=lambda r: r.fps)
        return picked[len(picked) // 2]


def quiet_pairs(served: Measured, local: Measured) -> list[int]:
    """The pairs of rounds during which others kept at most :data:`QUIET` of the cores busy."""
    return [i for i, (a, b) in enumerate(zip(served.rounds, local.rounds, strict=True))
            if max(a.others, b.others) <= QUIET]


def machine_busy_s() -> float:
    """CPU seconds every core of this machine has been busy since boot (``/proc/stat``: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def other_load(busy_s: float, ours_s: float, seconds: float) -> float:
    """The share of all cores that others kept busy: machine-busy CPU seconds less ours, over the wall time."""
    return max(0.0, busy_s - ours_s) / (seconds * (os.cpu_count() or 1))


def timed(infer: Callable[[np.ndarray], dict[str, np.ndarray]], calls: list[float]
          ) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """``infer``, appending each call's duration (ms) to ``calls``."""

    def call(tensor: np.ndarray) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        try:
            return infer(tensor)
        finally:
            calls.append((time.perf_counter() - started) * 1e3)

    return call


def one_round(frames: list[np.ndarray], infer: Callable[[np.ndarray], dict[str, np.ndarray]], spec: InputSpec,
              task: Task, serving_cpu: Callable[[], float], process_cpu: Callable[[], float],
              server_cpu: Callable[[], float]) -> Round:
    """The app's loop (``examples.video_client.process``) over copies of ``frames`` after a warm-up of 10;
    ``serving_cpu`` reads the CPU seconds spent serving, ``process_cpu`` those of the serving process, and
    ``server_cpu`` the server's (to tell other load from ours)."""
    from examples.video_client import process

    process((f.copy() for f in frames[:10]), infer, spec, task)
    calls: list[float] = []
    readings = (serving_cpu(), process_cpu(), server_cpu(), time.process_time(), machine_busy_s())
    summary = process((f.copy() for f in frames), timed(infer, calls), spec, task)
    serving, whole, server, mine, busy = (after - before for after, before in zip(
        (serving_cpu(), process_cpu(), server_cpu(), time.process_time(), machine_busy_s()), readings, strict=True))
    return Round(fps=summary.fps, p50_ms=summary.percentile_ms(50), p99_ms=summary.percentile_ms(99),
                 call_p50_ms=float(np.percentile(calls, 50)), cpu_ms=serving / summary.frames * 1e3,
                 cores=whole / summary.seconds, detections=summary.detections / summary.frames,
                 others=other_load(busy, server + mine, summary.seconds))


class InProcess:
    """The model in an ONNX Runtime session in this process, one intra-op and one inter-op thread, no spinning (as
    the runtime configures it on a CPU of four cores or fewer); :attr:`cpu_s` sums the CPU of its runs (with one
    intra-op thread ONNX Runtime runs on the calling thread)."""

    def __init__(self, onnx: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        self.cpu_s = 0.0

    def __call__(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        started = time.thread_time()
        values = self.session.run(self.names, {"images": tensor})
        self.cpu_s += time.thread_time() - started
        return dict(zip(self.names, values, strict=True))


def server_affinity(pid: int) -> set[str]:
    """The core lists every thread of process ``pid`` is allowed to run on (``{"0"}`` when all are pinned)."""
    lists = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    lists.add(line.split(":", 1)[1].strip())
    return lists


def measure_model(name: str, onnx: Path, frames: list[np.ndarray], rounds: int, patience: int, s3: LocalS3,
                  work: Path, problems: list[str]) -> list[Measured]:
    """Both paths for one published model, alternating round by round: at least ``rounds`` pairs, and more (up to
    ``patience`` × ``rounds``) until ``rounds`` of them were quiet."""
    from bench.serve import Edgeloop
    from examples.video_client import connect, detection_task, open_detector

    server = Edgeloop(s3, "bench", name, work, max_batch=1, log_name=f"edgeloop-{name}")
    served, local = Measured(name, "edgeloop"), Measured(name, "in-process")
    try:
        server.ready()
        client, model = connect(server.address, name)
        spec, session = model.spec, InProcess(onnx)
        with contextlib.ExitStack() as regions:
            detector, shapes = open_detector(regions, client, model)
            task = detection_task(shapes)
            server_cpu = functools.partial(cpu_seconds, server.pid)
            while len(served.rounds) < rounds or (len(quiet_pairs(served, local)) < rounds
                                                   and len(served.rounds) < rounds * patience):
                served.rounds.append(one_round(frames, detector, spec, task, server_cpu, server_cpu, server_cpu))
                with on_core(SERVER_CORE):
                    local.rounds.append(one_round(frames, session, spec, task, lambda: session.cpu_s,
                                                  time.process_time, server_cpu))
                print(f"  {name}: edgeloop {served.rounds[-1].fps:.1f} frames/s, in-process "
                      f"{local.rounds[-1].fps:.1f} frames/s (other load {served.rounds[-1].others:.0%}, "
                      f"{local.rounds[-1].others:.0%})", flush=True)
        allowed = server_affinity(server.pid)
        if allowed != {str(SERVER_CORE)}:
            problems.append(f"{name}: the server's threads may run on cores {sorted(allowed)}, not only "
                            f"{SERVER_CORE}")
        client.close()
    finally:
        server.stop()
    for path in (served, local):
        busiest = max(r.cores for r in path.rounds)
        if busiest > 1.1:
            problems.append(f"{name}, {path.path}: used {busiest:.2f} cores: ONNX Runtime's threads are not fixed")
    return [served, local]


# --- the report ---------------------------------------------------------------------------------------------------
def counted(results: list[Measured], model: str) -> tuple[Measured, Measured, list[int]]:
    """``model``'s two paths and the pairs that count: the quiet ones when there are enough, else all."""
    served, local = (next(r for r in results if r.model == model and r.path == path)
                     for path in ("edgeloop", "in-process"))
    quiet = quiet_pairs(served, local)
    enough = min(MIN_QUIET_PAIRS, len(served.rounds))
    return served, local, quiet if len(quiet) >= enough else list(range(len(served.rounds)))


def tables(results: list[Measured], frames: int, problems: list[str]) -> str:
    """The markdown table and the notes under it."""
    lines = ["| model | path | frames/s | p50 ms | p99 ms | model call p50 ms | serving CPU ms/frame | "
             "detections/frame | ÷ in-process ORT |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for model in dict.fromkeys(r.model for r in results):
        served, local, pairs = counted(results, model)
        ratios = [served.rounds[i].fps / local.rounds[i].fps for i in pairs]
        for result, ratio in ((served, statistics.median(ratios)), (local, 1.0)):
            m = result.median(pairs)
            label = "edgeloop, gRPC + shared memory" if result is served else "in-process ONNX Runtime"
            lines.append(f"| {MODELS[model]} | {label} | {m.fps:.1f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | "
                         f"{m.call_p50_ms:.2f} | {m.cpu_ms:.2f} | {m.detections:.1f} | {ratio:.2f}x |")
        others = [max(served.rounds[i].others, local.rounds[i].others) for i in pairs]
        quiet = len(quiet_pairs(served, local))
        which = (f"the {len(pairs)} quiet ones of {len(served.rounds)} pairs count" if quiet >= len(pairs)
                 else f"all {len(pairs)} pairs count ({quiet} quiet)")
        notes.append(f"- {MODELS[model]}: {which}; edgeloop ÷ in-process per pair {min(ratios):.2f}–"
                     f"{max(ratios):.2f}x; others kept {min(others):.0%}–{max(others):.0%} of the cores busy meanwhile")
    lines.append("")
    lines.append(f"- {frames} frames per round, the paths alternating round by round; a pair is quiet when others kept "
                 f"at most {QUIET:.0%} of the machine's cores busy during both rounds; each row is the path's median "
                 "round among the pairs that count, its ratio the median of their ratios")
    lines.extend(notes)
    lines.extend(f"- check failed: {p}" for p in problems)
    return "\n".join(lines)


def write_plot(results: list[Measured], path: Path) -> None:
    """Frames/s per model, a bar per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    models = list(dict.fromkeys(r.model for r in results))
    for offset, kind in ((-0.2, "edgeloop"), (0.2, "in-process")):
        values = [next(r for r in results if r.model == m and r.path == kind).median(counted(results, m)[2]).fps
                  for m in models]
        ax.bar([i + offset for i in range(len(models))], values, width=0.4,
               label="edgeloop (gRPC + shared memory)" if kind == "edgeloop" else "in-process ONNX Runtime")
    ax.set_xticks(range(len(models)), [MODELS[m] for m in models])
    ax.set_ylabel("frames/s (YOLOv8n, 320×320, one core)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- the clip model (action recognition) --------------------------------------------------------------------------
CLIP_VARIANTS = ("fp32-dense", "fp32", "fp16", "int8-ort")
"""The variants of the clip model measured: FP32 dense is the baseline each speed-up is against."""
CLIP_STRIDE = 2
"""Frames between two windows of the streaming client."""
STUDY_SPEEDUP = 1.16
"""The published Jetson Nano study's average speed-up of optimized video action models (16%), quoted beside ours."""


@dataclass
class ClipRound:
    """One pass of the streaming client's loop over the video on one path."""

    clips_per_s: float
    p50_ms: float
    p99_ms: float
    """Latency from the last frame of a window in hand to its action, ms."""


def clip_variants(work: Path) -> tuple[Path, np.ndarray]:
    """Train the clip model through the pipeline's functions (15 epochs, prune to 75% of the FLOPs, QAT, export) on
    the generated action set; the variants' folder and a validation batch of clips."""
    from components.data import calibration_indices, load_synthetic_actions
    from components.export import export_variants
    from components.prune import prune_model
    from components.qat import quantize_aware_train
    from components.train import train_model

    data = load_synthetic_actions()
    dense, _, _ = train_model(data, arch="r2plus1d", epochs=15, lr=0.004, progress=False)
    import copy

    pruned, _ = prune_model(copy.deepcopy(dense), data, keep_fraction=0.75, finetune_epochs=6, progress=False)
    quantized, _ = quantize_aware_train(copy.deepcopy(pruned), data, epochs=3, calibration_samples=256,
                                        progress=False)
    rows = calibration_indices(data.y_train, 256)
    export_variants(dense, pruned, quantized, x_check=data.x_test, x_calibration=data.x_train[rows],
                    out_dir=work / "clips")
    return work / "clips", data.x_test[:64]


def clip_video(frames: int, seed: int = 0) -> list[np.ndarray]:
    """A video of the generator's actions (16-frame segments), 64x64 BGR frames, decoded into memory."""
    import cv2

    from components.action_data import ACTIONS, generate_video

    segments = -(-frames // 16)
    actions = [ACTIONS[i % len(ACTIONS)] for i in range(segments)]
    video = np.round(generate_video(actions, seed)[:frames] * 255).astype(np.uint8)
    return [cv2.cvtColor(cv2.resize(f, (64, 64), interpolation=cv2.INTER_NEAREST), cv2.COLOR_GRAY2BGR)
            for f in video]


def clip_round(frames: list[np.ndarray], infer: Callable[[np.ndarray], np.ndarray], spec: ClipInput) -> ClipRound:
    """The streaming client's loop (``examples.clip_client.process``, stride :data:`CLIP_STRIDE`) after a warm-up."""
    from examples.clip_client import process

    process(frames[:16], infer, spec, stride=CLIP_STRIDE)
    summary = process(frames, infer, spec, stride=CLIP_STRIDE)
    return ClipRound(summary.windows_per_s, summary.percentile_ms(50), summary.percentile_ms(99))


class InProcessClip(InProcess):
    """The clip model in this process's ONNX Runtime (threads as :class:`InProcess`): the first output's row."""

    def __call__(self, tensor: np.ndarray) -> np.ndarray:  # type: ignore[override]
        return self.session.run(self.names[:1], {"input": tensor})[0][0]


def measure_clip_variant(name: str, onnx: Path, frames: list[np.ndarray], rounds: int, s3: LocalS3,
                         work: Path) -> tuple[list[ClipRound], list[ClipRound]]:
    """The served path (``edgeloop edge serve``, batching off, windows through shared memory) and in-process ONNX
    Runtime for one published variant, alternating round by round."""
    from bench.serve import Edgeloop
    from examples.clip_client import ServedClipModel, connect

    server = Edgeloop(s3, "bench", name, work, max_batch=1, log_name=f"edgeloop-{name}")
    served: list[ClipRound] = []
    local: list[ClipRound] = []
    try:
        server.ready()
        client, spec, output, classes = connect(server.address, name, "NCTHW")
        session = InProcessClip(onnx)
        with contextlib.ExitStack() as regions:
            model = ServedClipModel(regions, client, name, spec, output, classes)
            for _ in range(rounds):
                served.append(clip_round(frames, model, spec))
                with on_core(SERVER_CORE):
                    local.append(clip_round(frames, session, spec))
                print(f"  {name}: edgeloop {served[-1].clips_per_s:.1f} clips/s, in-process "
                      f"{local[-1].clips_per_s:.1f} clips/s", flush=True)
        client.close()
    finally:
        server.stop()
    return served, local


def measure_clips(frames: int, rounds: int, work: Path, s3: LocalS3, store: ObjectStore) -> str:
    """Publish each clip variant as a model of its own, measure both paths, and the markdown table."""
    from edgeloop_core.contract import Task, load_signing_key
    from examples.publish_onnx import publish_onnx_as_is

    folder, validation = clip_variants(work)
    video = clip_video(frames)
    measured = {}
    for variant in CLIP_VARIANTS:
        name = f"clips-{variant}"
        publish_onnx_as_is(store, load_signing_key(work / "keys" / "signing-key.pem"), folder / f"{variant}.onnx",
                           name, Task(), {"input": validation}, work=work, metric="top1_agreement")
        measured[variant] = measure_clip_variant(name, folder / f"{variant}.onnx", video, rounds, s3, work)
    return clip_table(measured, len(video))


def clip_table(measured: dict[str, tuple[list[ClipRound], list[ClipRound]]], frames: int) -> str:
    """Per variant and path: median clips/s and latency; edgeloop ÷ in-process; speed-up against FP32 dense."""
    def median(rounds: list[ClipRound]) -> ClipRound:
        return sorted(rounds, key=lambda r: r.clips_per_s)[len(rounds) // 2]

    lines = ["| clip variant | path | clips/s | last frame → action p50 ms | p99 ms | ÷ in-process ORT | "
             "speed-up vs fp32-dense |", "|---|---|---:|---:|---:|---:|---:|"]
    base = {path: median(measured["fp32-dense"][i]).clips_per_s for i, path in enumerate(("served", "local"))}
    gains = []
    for variant, (served, local) in measured.items():
        ratio = statistics.median(a.clips_per_s / b.clips_per_s for a, b in zip(served, local, strict=True))
        for path, rounds in (("served", served), ("local", local)):
            m = median(rounds)
            speedup = m.clips_per_s / base[path]
            if variant != "fp32-dense" and path == "served":
                gains.append(speedup)
            label = "edgeloop, gRPC + shared memory" if path == "served" else "in-process ONNX Runtime"
            lines.append(f"| {variant} | {label} | {m.clips_per_s:.1f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | "
                         f"{ratio if path == 'served' else 1.0:.2f}x | {speedup:.2f}x |")
    lines.append("")
    lines.append(f"- the (2+1)D clip model (8 frames of 32x32, NCTHW) on a {frames}-frame video of the generated "
                 f"actions, a window every {CLIP_STRIDE} frames, batch 1, one ONNX Runtime thread on this CPU; "
                 f"optimized variants served: {statistics.mean(gains):.2f}x fp32-dense on average (the Jetson Nano "
                 f"study: {STUDY_SPEEDUP:.2f}x for its video action models, on a GPU with TensorRT)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, help=f"frames per round (default {FULL['frames']}; --quick: "
                                                   f"{QUICK['frames']})")
    parser.add_argument("--rounds", type=int, help=f"pairs of rounds (one per path) wanted quiet (default "
                                                   f"{FULL['rounds']}; --quick: {QUICK['rounds']})")
    parser.add_argument("--patience", type=int, help=f"measure up to this many times --rounds pairs waiting for "
                                                     f"quiet ones (default {FULL['patience']}; --quick: "
                                                     f"{QUICK['patience']})")
    BenchRun.add_options(parser, "video")
    args = parser.parse_args()
    run = BenchRun.from_args("video", args, parser)
    defaults = QUICK if args.quick else FULL
    count, rounds = args.frames or defaults["frames"], args.rounds or defaults["rounds"]
    patience = args.patience or defaults["patience"]
    pin_load_generator("the edge runtime")

    from components.nms import append_nms
    from edgeloop_core.contract import Task
    from edgeloop_core.detection import layout_slices
    from examples.video_client import InputSpec, letterbox

    frames = camera_frames(count)
    spec = InputSpec("images", "FP32", "NCHW", SIZE, SIZE)
    inputs = np.concatenate([letterbox(frame, spec, 1 / 255)[0] for frame in frames[:: max(1, count // 8)]])
    results: list[Measured] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-video-") as tmp:
        work = Path(tmp)
        raw = export_detector(work / "detector.onnx", inputs)
        task = Task(kind="detection", layout="yolov8", num_classes=CLASSES)
        task = task.model_copy(update={"slices": layout_slices(task, "output0")})
        onnx = {"detector": (raw, task)}
        onnx["detector-nms"] = (work / "detector-nms.onnx", append_nms(raw, work / "detector-nms.onnx", task))
        with local_store(work) as (s3, store):
            for name, (path, model_task) in onnx.items():
                publish_detector(store, work, name, path, model_task, inputs)
                results.extend(measure_model(name, path, frames, rounds, patience, s3, work, problems))
            clips = measure_clips(4 * count, rounds, work, s3, store)
    table = tables(results, len(frames), problems) + "\n\n" + clips
    print(table)
    write_plot(results, run.plot)
    run.finish(table)


if __name__ == "__main__":
    main()
