"""The camera-style example app (examples/video_client.py) against the real edge runtime: a generated video of moving
shapes, a published detector whose boxes follow a rule on them (raw YOLOv8 output, and the same with NMS appended),
frames through system shared memory, an annotated output video; and its one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeloop_core.contract import Task
from edgeloop_core.detection import layout_slices
from examples.video_client import InputSpec, Letterbox, detection_task, letterbox
from tests.edge_runtime.conftest import RunningEdge, free_port
from tests.examples.shapes import (
    CLASSES,
    SIZE,
    publish_detector,
    read_video,
    shape_positions,
    shapes_detector,
    write_video,
)

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "examples" / "video_client.py"
RAW, NMS = "shapes-raw", "shapes-nms"
FRAMES = 60
SPEC = InputSpec("images", "FP32", "NCHW", SIZE, SIZE)


def run_client(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLIENT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def server_regions(edge) -> dict:
    import tritonclient.grpc as triton

    return triton.InferenceServerClient(edge.address).get_system_shared_memory_status(as_json=True).get("regions", {})


def shm_objects() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("edgeloop_video_*")}


# --- without a server -----------------------------------------------------------------------------------------------
def test_a_frame_is_letterboxed_and_its_boxes_mapped_back():
    frame = np.zeros((360, 640, 3), dtype=np.uint8)
    frame[100:200, 300:400] = (0, 0, 255)  # a red patch (BGR)
    tensor, fitted = letterbox(frame, SPEC, 1 / 255)
    assert tensor.shape == (1, 3, SIZE, SIZE) and tensor.dtype == np.float32
    assert fitted == Letterbox(0.5, 0, 70)
    assert tensor[0, :, 0, 0].tolist() == pytest.approx([114 / 255] * 3)  # the grey border
    assert tensor[0, :, 70 + 75, 175].tolist() == pytest.approx([1.0, 0.0, 0.0])  # RGB: red first
    np.testing.assert_allclose(fitted.to_frame(np.array([[150.0, 120.0, 200.0, 170.0]]), 640, 360),
                               [[300.0, 100.0, 400.0, 200.0]])
    np.testing.assert_allclose(fitted.to_frame(np.array([[-10.0, 0.0, 400.0, 300.0]]), 640, 360),
                               [[0.0, 0.0, 640.0, 360.0]])  # clipped to the frame


def test_the_layout_is_told_by_the_outputs_or_the_flag():
    separate = [("boxes", [-1, 100, 4]), ("scores", [-1, 100]), ("classes", [-1, 100]), ("num_detections", [-1])]
    task = detection_task(separate)
    assert (task.layout, task.roles["num_detections"], task.score_threshold) == ("separate", "num_detections", 0.0)
    assert detection_task([("output0", [-1, 84, 2100])]).layout == "yolov8"
    assert detection_task([("output0", [-1, 25200, 85])]).layout == "yolov5"
    assert detection_task([("output0", [-1, 300, 6])]).layout == "end2end"
    raw = detection_task([("output0", [-1, 84, 2100])], score_threshold=0.5, iou_threshold=0.6)
    assert (raw.score_threshold, raw.iou_threshold) == (0.5, 0.6)
    from edgeloop_core.errors import ConfigError

    with pytest.raises(ConfigError) as unknown:
        detection_task([("logits", [-1, 10])])
    assert "pass --layout" in str(unknown.value)
    assert detection_task([("logits", [-1, 84, -1])], "yolov8").layout == "yolov8"


@pytest.mark.integration
def test_a_missing_video_or_an_unreachable_server_is_one_line(tmp_path):
    missing = run_client(str(tmp_path / "nope.mp4"), "--model", RAW)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [f"video_client: error: {tmp_path / 'nope.mp4'}: no such video file"]

    video = write_video(tmp_path / "shapes.mp4", frames=3)
    before = shm_objects()
    nobody = run_client(str(video), "--model", RAW, "--url", f"127.0.0.1:{free_port()}")
    assert nobody.returncode == 1
    lines = nobody.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("video_client: error: cannot reach the inference server at 127.0.0.1:")
    assert "is the edge runtime running there?" in lines[0]
    assert shm_objects() <= before


# --- against the edge runtime ---------------------------------------------------------------------------------------
@pytest.fixture
def video(tmp_path) -> Path:
    return write_video(tmp_path / "shapes.mp4", frames=FRAMES)


@pytest.fixture
def edge(tmp_path, store, signing_key, edge_settings, video):
    """The rule-based detector published twice: raw (YOLOv8 layout, decoded by the client) and with NMS appended
    (boxes, scores, classes, num_detections); both validated by detection F1 on frames of the video."""
    from components.nms import append_nms

    raw = shapes_detector(tmp_path / "shapes.onnx")
    task = Task(kind="detection", layout="yolov8", num_classes=len(CLASSES), score_threshold=0.25)
    task = task.model_copy(update={"slices": layout_slices(task, "output0")})
    nms_task = append_nms(raw, tmp_path / "shapes-nms.onnx", task)
    inputs = np.concatenate([letterbox(frame, SPEC, 1 / 255)[0] for frame in read_video(video)[::6]])
    publish_detector(store, signing_key, raw, RAW, task, inputs)
    publish_detector(store, signing_key, tmp_path / "shapes-nms.onnx", NMS, nms_task, inputs)
    running = RunningEdge(edge_settings(store.bucket, models=[{"name": RAW}, {"name": NMS}]), store=store)
    running.wait_ready()
    yield running
    running.stop()


def _detections(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_drawn(source: list[np.ndarray], drawn: list[np.ndarray], found: list[dict]) -> None:
    """Every reported box is drawn (its edges differ from the source frame), and nothing away from the boxes and
    their labels changed."""
    for before, after, frame in zip(source, drawn, found, strict=True):
        diff = np.abs(after.astype(np.int16) - before.astype(np.int16)).max(axis=2)
        near = np.zeros(diff.shape, dtype=bool)
        for x1, y1, x2, y2 in np.round(frame["boxes"]).astype(int):
            edge = np.concatenate([diff[y1, x1:x2], diff[min(y2, SIZE - 1), x1:x2], diff[y1:y2, x1],
                                   diff[y1:y2, min(x2, SIZE - 1)]])
            assert edge.mean() > 60, f"frame {frame['frame']}: box {(x1, y1, x2, y2)} not drawn ({edge.mean():.1f})"
            near[max(0, y1 - 20) : y2 + 6, max(0, x1 - 6) : x2 + 90] = True  # the box, its label above it
        if (~near).any():
            assert diff[~near].mean() < 6, f"frame {frame['frame']}: pixels away from every box changed"


def test_the_client_draws_the_served_detections_into_its_output_video(edge, video, tmp_path):
    source = read_video(video)
    before = shm_objects()
    results = {}
    for model in (RAW, NMS):
        output, found = tmp_path / f"{model}.mp4", tmp_path / f"{model}.jsonl"
        done = run_client(str(video), "--model", model, "--url", edge.address, "--output", str(output),
                          "--detections", str(found), "--labels", ",".join(CLASSES))
        assert done.returncode == 0, done.stderr
        rate = re.search(r"^frames: (\d+) in [\d.]+ s: ([\d.]+) frames/s$", done.stdout, re.M)
        latency = re.search(r"^latency per frame, end to end .*: p50 ([\d.]+) ms, p99 ([\d.]+) ms$", done.stdout,
                            re.M)
        assert rate and latency, done.stdout
        assert int(rate.group(1)) == FRAMES and float(rate.group(2)) > 0
        assert 0 < float(latency.group(1)) <= float(latency.group(2))
        drawn = read_video(output)
        assert len(drawn) == FRAMES and drawn[0].shape == (SIZE, SIZE, 3)
        results[model] = _detections(found)
        assert [f["frame"] for f in results[model]] == list(range(FRAMES))
        assert sum(len(f["boxes"]) for f in results[model]) >= FRAMES * 3  # every shape, in every frame
        for frame in results[model]:  # each box sits on a shape of its class
            shapes = shape_positions(frame["frame"], FRAMES)
            for (x1, y1, x2, y2), klass in zip(frame["boxes"], frame["classes"], strict=True):
                sx1, sy1, sx2, sy2 = shapes[klass]
                assert sx1 - 32 <= (x1 + x2) / 2 <= sx2 + 32 and sy1 - 32 <= (y1 + y2) / 2 <= sy2 + 32
        _check_drawn(source, drawn, results[model])
    for raw, nms in zip(results[RAW], results[NMS], strict=True):  # in-graph NMS gives what the client's decode gives
        assert raw["classes"] == nms["classes"]
        np.testing.assert_allclose(raw["boxes"], nms["boxes"], atol=0.02)
        np.testing.assert_allclose(raw["scores"], nms["scores"], atol=2e-4)
    assert server_regions(edge) == {}
    assert shm_objects() <= before  # the clients' regions unlinked


def test_the_shared_memory_regions_are_released_on_ctrl_c_and_when_the_server_goes_away(edge, video, tmp_path,
                                                                                      monkeypatch, capsys):
    import examples.video_client as client

    original = client.read_frames
    args = [str(video), "--model", NMS, "--url", edge.address, "--output", str(tmp_path / "out.mp4")]
    before = shm_objects()

    def interrupted_after_three_frames(capture, limit=None):
        for index, frame in enumerate(original(capture, limit)):
            if index == 3:
                raise KeyboardInterrupt
            yield frame

    monkeypatch.setattr(client, "read_frames", interrupted_after_three_frames)
    assert client.main(args) == 130
    assert capsys.readouterr().err.strip() == "video_client: interrupted"
    assert server_regions(edge) == {}  # unregistered on the server
    assert shm_objects() <= before  # and unlinked here

    def server_stops_after_five_frames(capture, limit=None):
        for index, frame in enumerate(original(capture, limit)):
            if index == 5:
                assert len(server_regions(edge)) == 5  # the client's regions: the frame, four outputs
                edge.stop()
            yield frame

    monkeypatch.setattr(client, "read_frames", server_stops_after_five_frames)
    assert client.main(args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"video_client: error: inference on '{NMS}' failed")
    assert shm_objects() <= before
