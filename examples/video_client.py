"""A camera-style app on the edge runtime: detections drawn into a video, frames sent through shared memory.

    .venv/bin/python examples/video_client.py VIDEO --model NAME [--url 127.0.0.1:8001] [--output OUT.mp4]
        [--layout auto|separate|yolov8|yolov5|end2end] [--score-threshold 0.25] [--iou-threshold 0.45]
        [--scale 0.00392] [--labels person,car,...] [--detections OUT.jsonl] [--max-frames N]

Each frame of ``VIDEO`` (read with OpenCV) is letterboxed to the model's input (its size, datatype and channel
order from the server's model metadata; RGB, scaled by ``--scale``), written into a system shared-memory region
registered with the server once, and inferred with an Open Inference Protocol request that names the region instead
of carrying the pixels (tritonclient's ``set_shared_memory``); the server writes each output into a region of its
own too, so neither frames nor raw heads travel through gRPC. A model served with NMS appended (the ``separate``
layout: ``boxes``, ``scores``, ``classes``, ``num_detections``) gives the detections ready to draw; a raw
YOLOv5/v8/v11 head is decoded here with :func:`edgeloop_core.detection.decode` (the same decode and NMS the device
validates with). The layout is told by the output names and shapes (from the metadata, or from one grey frame's
outputs where the metadata leaves dimensions open) unless ``--layout`` says it. Boxes are mapped back to the frame
and drawn into ``--output`` (``.mp4``: mp4v; ``.avi``: MJPG).

At the end it prints frames/s (frames over the wall time of the whole run: read, send, infer, decode, draw, write)
and the end-to-end latency per frame (from the frame in hand to its annotated frame written), p50 and p99. Errors
are one line on stderr and exit status 1; the shared-memory region is unregistered and unlinked on every path.
System shared memory needs the client on the same machine as the server (``/dev/shm``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from edgeloop_core.contract import Task
from edgeloop_core.detection import Detections, decode
from edgeloop_core.errors import ConfigError, EdgeloopError, ModelNotFound, ServingError

if TYPE_CHECKING:
    import cv2
    import tritonclient.grpc as triton
    from numpy.typing import NDArray

    Frame = NDArray[np.uint8]

DEFAULT_URL = "127.0.0.1:8001"
"""The edge runtime's gRPC endpoint on this machine (``EDGE_GRPC_PORT``)."""
LAYOUTS = ("auto", "separate", "yolov8", "yolov5", "end2end")
ROLE_WORDS = {"boxes": ("box",), "scores": ("score", "conf"), "classes": ("class", "label"),
              "num_detections": ("num", "count")}
"""Output names of the separate layout, by the words in them (as the import recognises them)."""
PALETTE = ((0, 255, 255), (255, 255, 0), (255, 0, 255), (0, 165, 255), (255, 255, 255), (128, 255, 0),
           (255, 128, 128), (0, 128, 255), (200, 200, 0), (160, 0, 255))
"""Box colours (BGR) by class: none of them a pure red, green or blue."""
PAD_VALUE = 114
"""Grey of the letterbox's borders, as YOLO exports are trained with."""
NUMPY_TYPES = {"FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8}
"""Input datatypes this client can fill from an 8-bit frame."""
RAW_SCORE_THRESHOLD = 0.25
"""A raw head's boxes at or below this score are not detections (unless ``--score-threshold`` says otherwise)."""
CONNECT_TIMEOUT_S = 5.0
"""How long the first call waits for the server before saying it cannot reach it."""


# --- the model's input, and frames shaped for it ------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """The model's image input: name, OIP datatype, channel layout (``NCHW`` or ``NHWC``), size in pixels."""

    name: str
    datatype: str
    layout: str
    height: int
    width: int

    @property
    def shape(self) -> list[int]:
        """One frame's tensor shape (batch 1)."""
        return [1, 3, self.height, self.width] if self.layout == "NCHW" else [1, self.height, self.width, 3]

    @property
    def byte_size(self) -> int:
        """Bytes of one frame's tensor."""
        return int(np.prod(self.shape)) * np.dtype(NUMPY_TYPES[self.datatype]).itemsize

    @classmethod
    def from_metadata(cls, name: str, datatype: str, shape: Sequence[int]) -> InputSpec:
        """The spec of a ``[batch, 3, H, W]`` or ``[batch, H, W, 3]`` input; :class:`ConfigError` for any other."""
        dims = [int(d) for d in shape]
        if datatype not in NUMPY_TYPES:
            raise ConfigError(f"input {name!r} is {datatype}: this client fills {', '.join(NUMPY_TYPES)} inputs")
        if len(dims) == 4 and dims[1] == 3 and min(dims[2:]) > 0:
            return cls(name, datatype, "NCHW", dims[2], dims[3])
        if len(dims) == 4 and dims[3] == 3 and min(dims[1:3]) > 0:
            return cls(name, datatype, "NHWC", dims[1], dims[2])
        raise ConfigError(f"input {name!r} has shape {dims}: this client needs a fixed-size 3-channel image "
                          "input, [batch, 3, H, W] or [batch, H, W, 3]")


@dataclass(frozen=True)
class Letterbox:
    """How a frame was fitted into the model's input: scaled by ``scale``, then offset by ``pad_x``/``pad_y``
    pixels (the borders)."""

    scale: float
    pad_x: float
    pad_y: float

    def to_frame(self, boxes: NDArray[np.float64], width: int, height: int) -> NDArray[np.float64]:
        """``[n, 4]`` x1, y1, x2, y2 in model-input pixels to the frame's pixels, clipped to the frame."""
        mapped = (np.asarray(boxes, dtype=np.float64) - [self.pad_x, self.pad_y, self.pad_x, self.pad_y]) / self.scale
        return np.clip(mapped, 0, [width, height, width, height])


def letterbox(frame: Frame, spec: InputSpec, scale: float) -> tuple[np.ndarray, Letterbox]:
    """``frame`` (BGR, as OpenCV reads it) resized to fit the model's input with its aspect ratio kept, centred on a
    grey canvas, as RGB in the input's layout and datatype (float inputs multiplied by ``scale``), batch 1."""
    import cv2

    height, width = frame.shape[:2]
    ratio = min(spec.width / width, spec.height / height)
    new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
    resized = frame if (new_w, new_h) == (width, height) else cv2.resize(frame, (new_w, new_h),
                                                                          interpolation=cv2.INTER_LINEAR)
    pad_x, pad_y = (spec.width - new_w) // 2, (spec.height - new_h) // 2
    canvas = np.full((spec.height, spec.width, 3), PAD_VALUE, dtype=np.uint8)
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized
    rgb = canvas[:, :, ::-1]
    pixels = rgb.transpose(2, 0, 1) if spec.layout == "NCHW" else rgb
    dtype = NUMPY_TYPES[spec.datatype]
    tensor = pixels.astype(dtype) if dtype == np.uint8 else (pixels.astype(np.float32) * scale).astype(dtype)
    return np.ascontiguousarray(tensor[None]), Letterbox(ratio, pad_x, pad_y)


# --- what the outputs mean -----------------------------------------------------------------------------------------
def separate_roles(outputs: Sequence[tuple[str, Sequence[int]]]) -> dict[str, str]:
    """Roles of outputs named like an NMS-appended model's (``boxes``, ``scores``, ``classes``,
    ``num_detections``); empty when there are no boxes and scores among them."""
    roles: dict[str, str] = {}
    for role, words in ROLE_WORDS.items():
        for name, _ in outputs:
            if name not in roles.values() and any(word in name.lower() for word in words):
                roles[role] = name
                break
    return roles if {"boxes", "scores"} <= set(roles) else {}


def detection_task(outputs: Sequence[tuple[str, Sequence[int]]], layout: str = "auto", *,
                   score_threshold: float | None = None, iou_threshold: float = 0.45) -> Task:
    """The detection task of a model with ``outputs`` (name, shape): ``layout`` as given, or told by the outputs
    (``auto``); :class:`ConfigError` in one line when it cannot be told or does not fit. ``score_threshold``
    unset: none for the separate layout (the model applied its own), 0.25 for raw heads."""
    roles = separate_roles(outputs)
    if layout == "auto":
        layout = "separate" if roles else _single_output_layout(outputs)
    if layout == "separate":
        if not roles:
            raise ConfigError(f"--layout separate needs outputs named like boxes and scores, the model has "
                              f"{[name for name, _ in outputs]}")
        return Task(kind="detection", layout="separate", roles=roles, score_threshold=score_threshold or 0.0,
                    iou_threshold=iou_threshold)
    score_threshold = RAW_SCORE_THRESHOLD if score_threshold is None else score_threshold
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if len(outputs) != 1:
        return Task(kind="detection", layout=layout, roles={"detections": outputs[0][0]},
                    score_threshold=score_threshold, iou_threshold=iou_threshold)
    return Task(kind="detection", layout=layout, score_threshold=score_threshold, iou_threshold=iou_threshold)


def output_shapes(outputs: Sequence[tuple[str, Sequence[int]]], infer: Callable[[np.ndarray], dict[str, np.ndarray]],
                  spec: InputSpec) -> list[tuple[str, list[int]]]:
    """``outputs`` (name, shape from the metadata) with every dimension known: where the metadata leaves one
    open (exports with dynamic axes say ``[-1, -1, -1]``), one grey frame is inferred and its outputs' shapes used."""
    if all(d > 0 for _, shape in outputs for d in list(shape)[1:]):
        return [(name, [int(d) for d in shape]) for name, shape in outputs]
    grey = np.full((spec.height, spec.width, 3), PAD_VALUE, dtype=np.uint8)
    got = infer(letterbox(grey, spec, 1 / 255)[0])
    return [(name, [-1, *got[name].shape[1:]]) for name, _ in outputs]


def _single_output_layout(outputs: Sequence[tuple[str, Sequence[int]]]) -> str:
    shapes = [[int(d) for d in shape] for _, shape in outputs]
    if len(shapes) == 1 and len(shapes[0]) == 3 and min(shapes[0][1:]) > 0:
        rows, cols = shapes[0][1:]
        if rows > 4 and cols > rows * 4:
            return "yolov8"
        if cols == 6 and rows <= 1000:
            return "end2end"
        if cols > 5 and rows > cols:
            return "yolov5"
    raise ConfigError(f"cannot tell the detection layout of outputs {[(n, list(s)) for n, s in outputs]}: pass "
                      f"--layout ({', '.join(LAYOUTS[1:])})")


# --- the server ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServedModel:
    """What the server's metadata says of a model: its image input, its outputs (name, shape; -1 where open) and
    their OIP datatypes."""

    name: str
    spec: InputSpec
    outputs: list[tuple[str, list[int]]]
    datatypes: dict[str, str]


def connect(url: str, model: str) -> tuple[triton.InferenceServerClient, ServedModel]:
    """A client for ``url``, and ``model``'s metadata; :class:`ServingError` in one line when the server cannot be
    reached, :class:`ModelNotFound` when it does not serve ``model``, :class:`ConfigError` for a model without one
    image input."""
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
            raise ConfigError(f"model {model!r} has {len(metadata.inputs)} inputs: this client sends one image")
        first = metadata.inputs[0]
        spec = InputSpec.from_metadata(first.name, first.datatype, list(first.shape))
    except InferenceServerException as exc:
        client.close()
        raise ServingError(f"cannot reach the inference server at {url} ({_reason(exc)}): is the edge runtime "
                           "running there? (--url)") from exc
    except EdgeloopError:
        client.close()
        raise
    outputs = [(o.name, [int(d) for d in o.shape]) for o in metadata.outputs]
    return client, ServedModel(model, spec, outputs, {o.name: o.datatype for o in metadata.outputs})


def _reason(exc: Exception) -> str:
    status = getattr(exc, "status", lambda: None)()
    message = (getattr(exc, "message", lambda: None)() or str(exc)).splitlines()[0]
    return f"{status}: {message[:160]}" if status else message[:160]


class SharedRegion:
    """A system shared-memory region of ``byte_size`` bytes under ``/dev/shm``, registered with the server under a
    name of its own (``purpose`` ends it: ``frame``, ``out0``, ...).

    A context manager: leaving the block (or :meth:`close`) unregisters the region and unlinks it, whatever
    happened inside."""

    def __init__(self, client: triton.InferenceServerClient, byte_size: int, purpose: str) -> None:
        import tritonclient.utils.shared_memory as shm

        self.client, self.byte_size = client, byte_size
        self.name = f"edgeloop-video-{os.getpid()}-{secrets.token_hex(3)}-{purpose}"
        self.key = f"/{self.name.replace('-', '_')}"
        self.handle = shm.create_shared_memory_region(self.name, self.key, byte_size)
        self.registered = False
        try:
            client.register_system_shared_memory(self.name, self.key, byte_size)
            self.registered = True
        except Exception as exc:
            self.close()
            raise ServingError(f"the server refused the shared-memory region {self.key} ({_reason(exc)}): system "
                               "shared memory needs the client on the server's machine") from exc

    def write(self, tensor: np.ndarray) -> None:
        """Put ``tensor``'s bytes at the start of the region."""
        import tritonclient.utils.shared_memory as shm

        shm.set_shared_memory_region(self.handle, [tensor])

    def read(self, dtype: type[np.generic], shape: Sequence[int]) -> np.ndarray:
        """A copy of the tensor of ``dtype`` and ``shape`` at the start of the region."""
        import tritonclient.utils.shared_memory as shm

        return np.array(shm.get_contents_as_numpy(self.handle, dtype, list(shape)))

    def close(self) -> None:
        """Unregister (if registered; a server gone away is no error here) and unlink the region."""
        import tritonclient.utils.shared_memory as shm
        from tritonclient.utils import InferenceServerException

        if self.handle is None:
            return
        if self.registered:
            with contextlib.suppress(InferenceServerException):
                self.client.unregister_system_shared_memory(self.name, client_timeout=CONNECT_TIMEOUT_S)
            self.registered = False
        shm.destroy_shared_memory_region(self.handle)
        self.handle = None

    def __enter__(self) -> SharedRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServedDetector:
    """A served model called with one frame's tensor, which travels through a :class:`SharedRegion`; returns every
    output as a numpy array by name, read from its own region once :meth:`share_outputs` gave it one (until then,
    from the response)."""

    def __init__(self, client: triton.InferenceServerClient, model: ServedModel, frame: SharedRegion) -> None:
        import tritonclient.grpc as triton

        self.client, self.model, self.frame = client, model.name, frame
        self.tensor = triton.InferInput(model.spec.name, model.spec.shape, model.spec.datatype)
        self.tensor.set_shared_memory(frame.name, model.spec.byte_size)
        self.requested = {name: triton.InferRequestedOutput(name) for name, _ in model.outputs}
        self.shared: dict[str, tuple[SharedRegion, type[np.generic], list[int]]] = {}

    def share_outputs(self, regions: dict[str, tuple[SharedRegion, type[np.generic], list[int]]]) -> None:
        """From now on the server writes each named output (dtype, batch-1 shape) into its region."""
        for name, (region, _, _) in regions.items():
            self.requested[name].set_shared_memory(region.name, region.byte_size)
        self.shared.update(regions)

    def __call__(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        from tritonclient.utils import InferenceServerException

        self.frame.write(tensor)
        try:
            result = self.client.infer(self.model, [self.tensor], outputs=list(self.requested.values()))
        except InferenceServerException as exc:
            raise ServingError(f"inference on {self.model!r} failed ({_reason(exc)})") from exc
        return {name: self.shared[name][0].read(*self.shared[name][1:]) if name in self.shared
                else result.as_numpy(name) for name in self.requested}


def open_detector(stack: contextlib.ExitStack, client: triton.InferenceServerClient, model: ServedModel
                  ) -> tuple[ServedDetector, list[tuple[str, list[int]]]]:
    """``model`` over shared memory: a region for the frame and one for each output of a fixed size, each released
    when ``stack`` closes; and the outputs' shapes (where the metadata leaves them open, those of one grey frame's
    outputs)."""
    from tritonclient.utils import triton_to_np_dtype

    detector = ServedDetector(client, model, stack.enter_context(SharedRegion(client, model.spec.byte_size, "frame")))
    shapes = output_shapes(model.outputs, detector, model.spec)
    regions = {}
    for index, (name, shape) in enumerate(shapes):
        dtype = triton_to_np_dtype(model.datatypes[name])
        if dtype is None or dtype is np.object_:  # BYTES: no fixed size, it stays in the response
            continue
        batch_one = [1, *shape[1:]]
        size = int(np.prod(batch_one)) * np.dtype(dtype).itemsize
        regions[name] = (stack.enter_context(SharedRegion(client, size, f"out{index}")), dtype, batch_one)
    detector.share_outputs(regions)
    return detector, shapes


# --- the loop ------------------------------------------------------------------------------------------------------
@dataclass
class Summary:
    """A run over a video: frames, wall seconds, each frame's end-to-end latency (ms), detections found."""

    frames: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    detections: int = 0

    @property
    def fps(self) -> float:
        """Frames per second over the whole run."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        """The ``q``-th percentile of the per-frame latency, ms."""
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else 0.0

    def lines(self) -> list[str]:
        """What the client prints at the end."""
        return [f"frames: {self.frames} in {self.seconds:.2f} s: {self.fps:.1f} frames/s",
                f"latency per frame, end to end (frame read to annotated frame written): "
                f"p50 {self.percentile_ms(50):.2f} ms, p99 {self.percentile_ms(99):.2f} ms",
                f"detections: {self.detections}"]


def draw(frame: Frame, found: Detections, boxes: NDArray[np.float64], labels: Sequence[str]) -> None:
    """Draw ``boxes`` (frame pixels) with their class and score into ``frame``, in place."""
    import cv2

    for box, score, klass in zip(boxes, found.scores, found.classes, strict=True):
        colour = PALETTE[int(klass) % len(PALETTE)]
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(frame, (x1, y1), (x2, y2), colour, 2)
        name = labels[int(klass)] if 0 <= int(klass) < len(labels) else str(int(klass))
        cv2.putText(frame, f"{name} {score:.2f}", (x1, max(10, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1,
                    cv2.LINE_AA)


def process(frames: Iterable[Frame], infer: Callable[[np.ndarray], dict[str, np.ndarray]], spec: InputSpec,
            task: Task, *, scale: float = 1 / 255, labels: Sequence[str] = (),
            on_frame: Callable[[int, Frame, Detections, NDArray[np.float64]], None] | None = None) -> Summary:
    """Each frame: letterbox, ``infer``, decode by ``task``, map the boxes back, draw, hand to ``on_frame`` (index,
    annotated frame, detections, boxes in frame pixels). ``infer`` is the served model or, for a comparison,
    in-process ONNX Runtime."""
    summary = Summary()
    started = time.perf_counter()
    for index, frame in enumerate(frames):
        frame_started = time.perf_counter()
        tensor, fitted = letterbox(frame, spec, scale)
        (found,) = decode(infer(tensor), task)
        boxes = fitted.to_frame(found.boxes, frame.shape[1], frame.shape[0])
        draw(frame, found, boxes, labels)
        if on_frame is not None:
            on_frame(index, frame, found, boxes)
        summary.latencies_ms.append((time.perf_counter() - frame_started) * 1e3)
        summary.frames += 1
        summary.detections += len(found)
    summary.seconds = time.perf_counter() - started
    return summary


def read_frames(capture: cv2.VideoCapture, limit: int | None = None) -> Iterator[Frame]:
    """The frames of an open capture (at most ``limit``)."""
    count = 0
    while limit is None or count < limit:
        ok, frame = capture.read()
        if not ok:
            return
        count += 1
        yield frame


def open_video(path: Path) -> tuple[cv2.VideoCapture, float, tuple[int, int]]:
    """An OpenCV capture of ``path``, its frames/s and (width, height); :class:`ConfigError` when it is missing or
    unreadable."""
    import cv2

    if not path.is_file():
        raise ConfigError(f"{path}: no such video file")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ConfigError(f"{path}: OpenCV cannot read this video (not a video, or a codec it lacks)")
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    return capture, capture.get(cv2.CAP_PROP_FPS) or 30.0, size


def open_writer(path: Path, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    """A video writer for ``path``: MJPG for ``.avi``, mp4v otherwise; :class:`ConfigError` when it cannot open."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "MJPG" if path.suffix.lower() == ".avi" else "mp4v"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, size)
    if not writer.isOpened():
        raise ConfigError(f"{path}: OpenCV cannot write a {codec} video there (try an .avi or .mp4 name)")
    return writer


def run(args: argparse.Namespace) -> Summary:
    """The app: open the video and the server, send every frame through shared memory, write the annotated video;
    everything it opened is closed (the shared-memory regions released) on every path."""
    capture, fps, size = open_video(args.video)
    with contextlib.ExitStack() as stack:
        stack.callback(capture.release)
        client, model = connect(args.url, args.model)
        stack.callback(client.close)
        writer = open_writer(args.output, fps, size)
        stack.callback(writer.release)
        detector, shapes = open_detector(stack, client, model)
        task = detection_task(shapes, args.layout, score_threshold=args.score_threshold,
                              iou_threshold=args.iou_threshold)
        sink = stack.enter_context(open(args.detections, "w")) if args.detections else None
        labels = [label for label in args.labels.split(",") if label] if args.labels else []
        summary = process(read_frames(capture, args.max_frames), detector, model.spec, task, scale=args.scale,
                          labels=labels,
                          on_frame=lambda i, frame, found, boxes: _write(writer, sink, i, frame, found, boxes))
    return summary


def _write(writer: cv2.VideoWriter, sink: IO[str] | None, index: int, frame: Frame, found: Detections,
           boxes: NDArray[np.float64]) -> None:
    writer.write(frame)
    if sink is not None:
        sink.write(json.dumps({"frame": index, "boxes": np.round(boxes, 2).tolist(),
                               "scores": np.round(found.scores, 4).tolist(), "classes": found.classes.tolist()})
                   + "\n")


def parser() -> argparse.ArgumentParser:
    """The command line."""
    cli = argparse.ArgumentParser(prog="video_client", description=__doc__.splitlines()[0])
    cli.add_argument("video", type=Path, help="the video file to read (anything OpenCV's FFmpeg reads)")
    cli.add_argument("--model", required=True, help="the served model's name")
    cli.add_argument("--url", default=DEFAULT_URL, help=f"the edge runtime's gRPC address (default {DEFAULT_URL})")
    cli.add_argument("--output", type=Path, default=Path("detections.mp4"),
                     help="the annotated video to write (.mp4: mp4v, .avi: MJPG; default detections.mp4)")
    cli.add_argument("--layout", choices=LAYOUTS, default="auto",
                     help="how the outputs are laid out (default: told by their names and shapes)")
    cli.add_argument("--score-threshold", type=float, default=None,
                     help=f"boxes at or below this score are dropped (default: {RAW_SCORE_THRESHOLD} for raw heads, "
                          "none for a model with NMS appended, which applied the threshold its manifest records)")
    cli.add_argument("--iou-threshold", type=float, default=0.45, help="raw heads: NMS overlap threshold")
    cli.add_argument("--scale", type=float, default=1 / 255, help="float inputs: pixel value × this (default 1/255)")
    cli.add_argument("--labels", default="", help="class names, comma-separated, for the drawn labels")
    cli.add_argument("--detections", type=Path, default=None,
                     help="also write each frame's detections (frame pixels) as JSON lines here")
    cli.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    """Run the app; one line on stderr and exit status 1 on an error we can name."""
    args = parser().parse_args(argv)
    try:
        summary = run(args)
    except EdgeloopError as exc:
        print(f"video_client: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the regions were released on the way out
        print("video_client: interrupted", file=sys.stderr)
        return 130
    for line in summary.lines():
        print(line)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
