"""Action recognition on a stream: a sliding window of frames sent to a served clip model through shared memory.

    .venv/bin/python examples/clip_client.py VIDEO --model NAME [--url 127.0.0.1:8001] [--stride 2]
        [--clip-layout NCTHW|NTCHW] [--labels left,right,...] [--actions OUT.jsonl] [--output OUT.avi]
        [--scale 0.00392] [--max-frames N]

Each frame of ``VIDEO`` (read with OpenCV) is resized to the model's frame size (``INTER_AREA``), made grey or RGB
to match its channels and scaled by ``--scale``; the last ``T`` frames (``T`` from the model's input shape) form the
window. Every ``--stride`` frames, once ``T`` frames are in hand, the window is written into a system shared-memory
region registered with the server once, and inferred with an Open Inference Protocol request that names the region
instead of carrying the pixels (tritonclient's ``set_shared_memory``); the class scores come back through a region
of their own. The input's layout is ``[batch, channels, frames, height, width]`` (``NCTHW``, the default) or
``[batch, frames, channels, height, width]`` (``NTCHW``, ``--clip-layout``): a 5-D shape alone cannot tell them
apart when the frames and channels are both small (the manifest's preprocessing records it).

Each window's action goes to ``--actions`` as one JSON line: ``window``, ``start_frame``, ``end_frame`` (inclusive),
``start_s``, ``end_s`` (the video's timestamps at its frame rate), ``action``, ``score`` (softmax of the outputs
when they are not probabilities already) and ``latency_ms`` (from the window's last frame in hand to its action).
``--output`` gets the video with the latest action written on each frame (frames enlarged to at least 256 pixels
high, so the label can be read). At the end it prints windows/s and the last-frame-to-action latency, p50 and p99.
Errors are one line on stderr and exit status 1; the shared-memory regions are released on every path.
System shared memory needs the client on the same machine as the server (``/dev/shm``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeloop_core.errors import ConfigError, EdgeloopError, ModelNotFound, ServingError
from examples.video_client import (
    CONNECT_TIMEOUT_S,
    SharedRegion,
    _reason,
    open_video,
    open_writer,
    read_frames,
)

if TYPE_CHECKING:
    import cv2
    import tritonclient.grpc as triton
    from numpy.typing import NDArray

    Frame = NDArray[np.uint8]

DEFAULT_URL = "127.0.0.1:8001"
"""The edge runtime's gRPC endpoint on this machine (``EDGE_GRPC_PORT``)."""
CLIP_LAYOUTS = ("NCTHW", "NTCHW")
RENDER_HEIGHT = 256
"""The rendered video's frames are enlarged to at least this many pixels high (models see small frames)."""


@dataclass(frozen=True)
class ClipInput:
    """The model's clip input: name, layout (``NCTHW`` or ``NTCHW``), frames per window, channels (1 or 3) and frame
    size in pixels; FP32."""

    name: str
    layout: str
    frames: int
    channels: int
    height: int
    width: int

    @property
    def shape(self) -> list[int]:
        """One window's tensor shape (batch 1)."""
        if self.layout == "NCTHW":
            return [1, self.channels, self.frames, self.height, self.width]
        return [1, self.frames, self.channels, self.height, self.width]

    @property
    def byte_size(self) -> int:
        """Bytes of one window's tensor (FP32)."""
        return int(np.prod(self.shape)) * 4

    @classmethod
    def from_metadata(cls, name: str, datatype: str, shape: Sequence[int], layout: str) -> ClipInput:
        """The spec of a fixed-size 5-D FP32 input in ``layout``; :class:`ConfigError` in one line for any other."""
        dims = [int(d) for d in shape]
        if layout not in CLIP_LAYOUTS:
            raise ConfigError(f"--clip-layout {layout!r} is not one of {', '.join(CLIP_LAYOUTS)}")
        if datatype != "FP32":
            raise ConfigError(f"input {name!r} is {datatype}: this client sends FP32 clips")
        if len(dims) != 5 or min(dims[1:]) < 1:
            raise ConfigError(f"input {name!r} has shape {dims}: a clip model takes [batch, C, T, H, W] or "
                              "[batch, T, C, H, W] with every size but the batch fixed")
        channels, frames = (dims[1], dims[2]) if layout == "NCTHW" else (dims[2], dims[1])
        if channels not in (1, 3):
            raise ConfigError(f"input {name!r} of shape {dims} has {channels} channels in {layout}: this client "
                              "makes grey (1) or RGB (3) frames; is --clip-layout right?")
        return cls(name, layout, frames, channels, dims[3], dims[4])


def frame_tensor(frame: Frame, spec: ClipInput, scale: float) -> np.ndarray:
    """``frame`` (BGR, as OpenCV reads it) as float32 ``[channels, height, width]``: resized to the model's frame
    size (area interpolation), grey or RGB, times ``scale``."""
    import cv2

    height, width = frame.shape[:2]
    resized = frame if (width, height) == (spec.width, spec.height) else cv2.resize(
        frame, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
    if spec.channels == 1:
        pixels = cv2.cvtColor(resized, cv2.COLOR_BGR2GRAY)[None] if resized.ndim == 3 else resized[None]
    else:
        pixels = resized[:, :, ::-1].transpose(2, 0, 1)
    return pixels.astype(np.float32) * scale


class SlidingWindow:
    """The last ``spec.frames`` frame tensors; :meth:`tensor` lays them out as the model's input (batch 1)."""

    def __init__(self, spec: ClipInput) -> None:
        self.spec = spec
        self.frames: deque[np.ndarray] = deque(maxlen=spec.frames)

    def push(self, tensor: np.ndarray) -> None:
        """Add one frame's ``[channels, height, width]`` tensor (the oldest leaves when full)."""
        self.frames.append(tensor)

    @property
    def full(self) -> bool:
        """Whether a whole window is in hand."""
        return len(self.frames) == self.spec.frames

    def tensor(self) -> np.ndarray:
        """``[1, C, T, H, W]`` (``NCTHW``) or ``[1, T, C, H, W]`` (``NTCHW``), float32, contiguous."""
        stacked = np.stack(self.frames)  # [T, C, H, W]
        if self.spec.layout == "NCTHW":
            stacked = stacked.transpose(1, 0, 2, 3)
        return np.ascontiguousarray(stacked[None], dtype=np.float32)


@dataclass(frozen=True)
class WindowAction:
    """One window's action: its frames (inclusive), their times at the video's frame rate, the action and score,
    and the latency from its last frame in hand to the action (ms)."""

    window: int
    start_frame: int
    end_frame: int
    start_s: float
    end_s: float
    action: str
    score: float
    latency_ms: float

    def to_json(self) -> str:
        """One JSON line (no newline)."""
        return json.dumps({"window": self.window, "start_frame": self.start_frame, "end_frame": self.end_frame,
                           "start_s": round(self.start_s, 4), "end_s": round(self.end_s, 4), "action": self.action,
                           "score": round(self.score, 4), "latency_ms": round(self.latency_ms, 3)})


def class_scores(outputs: np.ndarray) -> np.ndarray:
    """One window's class scores: ``outputs`` as they are when they are probabilities (non-negative, summing to
    1), else their softmax."""
    values = np.asarray(outputs, dtype=np.float64).reshape(-1)
    if values.min() >= 0 and abs(values.sum() - 1.0) < 1e-3:
        return values
    exp = np.exp(values - values.max())
    return exp / exp.sum()


@dataclass
class Summary:
    """A run over a video: frames read, windows inferred, wall seconds, each window's last-frame-to-action ms."""

    frames: int = 0
    windows: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def windows_per_s(self) -> float:
        """Windows (clips) per second over the whole run."""
        return self.windows / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        """The ``q``-th percentile of the last-frame-to-action latency, ms."""
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else 0.0

    def lines(self) -> list[str]:
        """What the client prints at the end."""
        return [f"frames: {self.frames}, windows: {self.windows} in {self.seconds:.2f} s: "
                f"{self.windows_per_s:.1f} clips/s",
                f"latency, last frame of a window to its action: p50 {self.percentile_ms(50):.2f} ms, "
                f"p99 {self.percentile_ms(99):.2f} ms"]


def process(frames: Iterable[Frame], infer: Callable[[np.ndarray], np.ndarray], spec: ClipInput, *,
            stride: int = 1, fps: float = 8.0, scale: float = 1 / 255, labels: Sequence[str] = (),
            on_window: Callable[[WindowAction], None] | None = None,
            on_frame: Callable[[int, Frame, WindowAction | None], None] | None = None) -> Summary:
    """Slide a window of ``spec.frames`` frames over ``frames``, one step per frame; every ``stride`` frames once
    the window is full, ``infer`` it (the served model, or in-process ONNX Runtime for a comparison) and hand the
    :class:`WindowAction` to ``on_window``; every frame goes to ``on_frame`` with the latest action (None before the
    first)."""
    if stride < 1 or fps <= 0:
        raise ConfigError(f"need --stride >= 1 and a frame rate > 0 (got {stride}, {fps})")
    window, summary, latest = SlidingWindow(spec), Summary(), None
    started = time.perf_counter()
    for index, frame in enumerate(frames):
        in_hand = time.perf_counter()
        window.push(frame_tensor(frame, spec, scale))
        summary.frames += 1
        first = index - spec.frames + 1
        if window.full and first % stride == 0:
            scores = class_scores(infer(window.tensor()))
            best = int(scores.argmax())
            latency = (time.perf_counter() - in_hand) * 1e3
            latest = WindowAction(summary.windows, first, index, first / fps, (index + 1) / fps,
                                  labels[best] if best < len(labels) else str(best), float(scores[best]), latency)
            summary.windows += 1
            summary.latencies_ms.append(latency)
            if on_window is not None:
                on_window(latest)
        if on_frame is not None:
            on_frame(index, frame, latest)
    summary.seconds = time.perf_counter() - started
    return summary


def render(frame: Frame, action: WindowAction | None) -> Frame:
    """``frame`` enlarged to at least :data:`RENDER_HEIGHT` pixels high (nearest neighbour: the pixels the model
    saw), with the latest action and its score written at the top."""
    import cv2

    factor = max(1, -(-RENDER_HEIGHT // frame.shape[0]))
    big = cv2.resize(frame, (frame.shape[1] * factor, frame.shape[0] * factor), interpolation=cv2.INTER_NEAREST)
    if big.ndim == 2:
        big = cv2.cvtColor(big, cv2.COLOR_GRAY2BGR)
    text = f"{action.action} {action.score:.2f}" if action else "..."
    cv2.rectangle(big, (0, 0), (big.shape[1], 28), (0, 0, 0), -1)
    cv2.putText(big, text, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 255, 255), 1, cv2.LINE_AA)
    return big


# --- the server ----------------------------------------------------------------------------------------------------
def connect(url: str, model: str, layout: str) -> tuple[triton.InferenceServerClient, ClipInput, str, int]:
    """A client for ``url``, ``model``'s clip input, and its (first) output's name and number of classes;
    :class:`ServingError` in one line when the server cannot be reached, :class:`ModelNotFound` when it does not
    serve ``model``, :class:`ConfigError` for a model without one clip input and a ``[batch, classes]`` output."""
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url)
    try:
        client.is_server_live(client_timeout=CONNECT_TIMEOUT_S)
        try:
            metadata = client.get_model_metadata(model, client_timeout=CONNECT_TIMEOUT_S)
        except InferenceServerException as exc:
            raise ModelNotFound(f"{url} does not serve model {model!r} ({_reason(exc)})") from exc
        if len(metadata.inputs) != 1:
            raise ConfigError(f"model {model!r} has {len(metadata.inputs)} inputs: this client sends one clip")
        first, output = metadata.inputs[0], metadata.outputs[0]
        spec = ClipInput.from_metadata(first.name, first.datatype, list(first.shape), layout)
        dims = [int(d) for d in output.shape]
        if len(dims) != 2 or dims[1] < 2 or output.datatype != "FP32":
            raise ConfigError(f"output {output.name!r} of model {model!r} is {output.datatype} {dims}: this client "
                              "reads FP32 class scores, [batch, classes]")
    except InferenceServerException as exc:
        client.close()
        raise ServingError(f"cannot reach the inference server at {url} ({_reason(exc)}): is the edge runtime "
                           "running there? (--url)") from exc
    except EdgeloopError:
        client.close()
        raise
    return client, spec, output.name, dims[1]


class ServedClipModel:
    """A served clip model called with one window's tensor, which travels through a :class:`SharedRegion`; the
    class scores come back through a region of their own."""

    def __init__(self, stack: contextlib.ExitStack, client: triton.InferenceServerClient, model: str,
                 spec: ClipInput, output: str, classes: int) -> None:
        import tritonclient.grpc as triton

        self.client, self.model, self.classes = client, model, classes
        self.window = stack.enter_context(SharedRegion(client, spec.byte_size, "clip"))
        self.scores = stack.enter_context(SharedRegion(client, classes * 4, "out0"))
        self.tensor = triton.InferInput(spec.name, spec.shape, "FP32")
        self.tensor.set_shared_memory(self.window.name, spec.byte_size)
        self.requested = triton.InferRequestedOutput(output)
        self.requested.set_shared_memory(self.scores.name, self.scores.byte_size)

    def __call__(self, tensor: np.ndarray) -> np.ndarray:
        from tritonclient.utils import InferenceServerException

        self.window.write(tensor)
        try:
            self.client.infer(self.model, [self.tensor], outputs=[self.requested])
        except InferenceServerException as exc:
            raise ServingError(f"inference on {self.model!r} failed ({_reason(exc)})") from exc
        return self.scores.read(np.float32, [1, self.classes])[0]


def run(args: argparse.Namespace) -> Summary:
    """The app: open the video and the server, infer every ``--stride``-th window through shared memory, write
    the actions and the rendered video; everything it opened is closed on every path."""
    capture, fps, _ = open_video(args.video)
    labels = [label for label in args.labels.split(",") if label] if args.labels else []
    with contextlib.ExitStack() as stack:
        stack.callback(capture.release)
        client, spec, output, classes = connect(args.url, args.model, args.clip_layout)
        stack.callback(client.close)
        model = ServedClipModel(stack, client, args.model, spec, output, classes)
        sink: IO[str] | None = stack.enter_context(open(args.actions, "w")) if args.actions else None
        writer: list[cv2.VideoWriter] = []

        def on_frame(index: int, frame: Frame, action: WindowAction | None) -> None:
            if args.output is None:
                return
            drawn = render(frame, action)
            if not writer:
                writer.append(open_writer(args.output, fps, (drawn.shape[1], drawn.shape[0])))
                stack.callback(writer[0].release)
            writer[0].write(drawn)

        summary = process(read_frames(capture, args.max_frames), model, spec, stride=args.stride, fps=fps,
                          scale=args.scale, labels=labels,
                          on_window=(lambda w: sink.write(w.to_json() + "\n")) if sink else None, on_frame=on_frame)
    return summary


def parser() -> argparse.ArgumentParser:
    """The command line."""
    cli = argparse.ArgumentParser(prog="clip_client", description=__doc__.splitlines()[0])
    cli.add_argument("video", type=Path, help="the video file to read (anything OpenCV's FFmpeg reads)")
    cli.add_argument("--model", required=True, help="the served clip model's name")
    cli.add_argument("--url", default=DEFAULT_URL, help=f"the edge runtime's gRPC address (default {DEFAULT_URL})")
    cli.add_argument("--stride", type=int, default=1, help="frames between the starts of two windows (default 1)")
    cli.add_argument("--clip-layout", choices=CLIP_LAYOUTS, default="NCTHW",
                     help="the input's layout, as the manifest's preprocessing says (default NCTHW)")
    cli.add_argument("--labels", default="", help="class names, comma-separated, in class order")
    cli.add_argument("--actions", type=Path, default=None, help="write each window's action as JSON lines here")
    cli.add_argument("--output", type=Path, default=None,
                     help="write the video with the latest action on each frame (.avi: MJPG, .mp4: mp4v)")
    cli.add_argument("--scale", type=float, default=1 / 255, help="pixel value × this (default 1/255)")
    cli.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    """Run the app; one line on stderr and exit status 1 on an error we can name."""
    args = parser().parse_args(argv)
    try:
        summary = run(args)
    except EdgeloopError as exc:
        print(f"clip_client: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the regions were released on the way out
        print("clip_client: interrupted", file=sys.stderr)
        return 130
    for line in summary.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
