"""The streaming action client (examples/clip_client.py) without a server: the clip input read from a model's
metadata, the sliding window's layout and stride, the generated action video's segments, and one-line errors.
The client against the real edge runtime and a trained clip model is in tests/pipelines/test_clip_pipeline.py
(it shares that module's pipeline run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from components.action_data import ACTIONS, FRAME_SIZE, generate, generate_video, render_clip
from edgeloop_core.errors import ConfigError
from examples.clip_client import ClipInput, SlidingWindow, class_scores, frame_tensor, process

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "examples" / "clip_client.py"


def test_the_clip_input_comes_from_the_metadata_in_either_layout():
    assert ClipInput.from_metadata("input", "FP32", [-1, 1, 8, 32, 32], "NCTHW") == ClipInput(
        "input", "NCTHW", 8, 1, 32, 32)
    spec = ClipInput.from_metadata("frames", "FP32", [-1, 16, 3, 24, 40], "NTCHW")
    assert (spec.frames, spec.channels, spec.height, spec.width) == (16, 3, 24, 40)
    assert spec.shape == [1, 16, 3, 24, 40] and spec.byte_size == 16 * 3 * 24 * 40 * 4
    for shape, layout, words in [([-1, 3, 32, 32], "NCTHW", "a clip model takes"),
                                 ([-1, 1, -1, 32, 32], "NCTHW", "every size but the batch"),
                                 ([-1, 8, 1, 32, 32], "NCTHW", "is --clip-layout right?")]:
        with pytest.raises(ConfigError) as info:
            ClipInput.from_metadata("input", "FP32", shape, layout)
        assert words in str(info.value) and "\n" not in str(info.value)


def test_the_window_keeps_the_last_frames_in_order_and_lays_them_out():
    for layout, axis in (("NCTHW", 2), ("NTCHW", 1)):
        spec = ClipInput("input", layout, 4, 1, 2, 2)
        window = SlidingWindow(spec)
        for value in range(6):
            window.push(np.full((1, 2, 2), value, np.float32))
        tensor = window.tensor()
        assert tensor.shape == tuple(spec.shape) and tensor.flags["C_CONTIGUOUS"]
        assert np.moveaxis(tensor, axis, 1)[0, :, 0, 0, 0].tolist() == [2, 3, 4, 5]  # the last four, oldest first


def test_frames_are_resized_grey_and_scaled():
    frame = np.zeros((64, 64, 3), np.uint8)
    frame[:32, :32] = 255
    tensor = frame_tensor(frame, ClipInput("input", "NCTHW", 8, 1, 32, 32), 1 / 255)
    assert tensor.shape == (1, 32, 32) and tensor.dtype == np.float32
    assert tensor[0, 0, 0] == pytest.approx(1.0) and tensor[0, 31, 31] == 0.0


def test_windows_follow_the_stride_and_the_frame_rate():
    spec = ClipInput("input", "NCTHW", 8, 1, 32, 32)
    frames = [np.full((32, 32, 3), 10 * i, np.uint8) for i in range(20)]
    seen: list[np.ndarray] = []

    def infer(tensor):  # class 1 when the window's last frame is brighter than its first
        seen.append(tensor)
        return np.array([0.0, 1.0]) if tensor[0, 0, -1].mean() > tensor[0, 0, 0].mean() else np.array([1.0, 0.0])

    windows = []
    summary = process(frames, infer, spec, stride=3, fps=10.0, labels=["same", "brighter"], on_window=windows.append)
    assert [w.start_frame for w in windows] == [0, 3, 6, 9, 12] and [w.end_frame for w in windows][-1] == 19
    assert windows[1].start_s == pytest.approx(0.3) and windows[1].end_s == pytest.approx(1.1)
    assert {w.action for w in windows} == {"brighter"} and summary.windows == 5 and summary.frames == 20
    assert len(summary.latencies_ms) == 5 and seen[0].shape == (1, 1, 8, 32, 32)
    with pytest.raises(ConfigError):
        process(frames, infer, spec, stride=0)


def test_scores_are_probabilities():
    assert class_scores(np.array([0.2, 0.8])).tolist() == [0.2, 0.8]
    scores = class_scores(np.array([1.0, 3.0]))
    assert scores.sum() == pytest.approx(1.0) and scores[1] > 0.8


def test_the_generator_is_deterministic_balanced_and_split_by_seed():
    x, y = generate(70, seed=[0, 0])
    again, _ = generate(70, seed=[0, 0])
    other, _ = generate(70, seed=[0, 1])
    assert x.shape == (70, 1, 8, FRAME_SIZE, FRAME_SIZE) and x.dtype == np.float32
    assert np.array_equal(x, again) and not np.array_equal(x, other)
    assert np.bincount(y).tolist() == [10] * len(ACTIONS) and 0.0 <= x.min() and x.max() <= 1.0
    rng = np.random.default_rng(0)
    still = render_clip("stay", rng, noise=0.0)
    assert np.abs(np.diff(still, axis=0)).max() == 0.0  # nothing moves in a clip of "stay"
    moving = render_clip("right", rng, noise=0.0)
    columns = [np.average(np.arange(FRAME_SIZE), weights=np.abs(f - moving[0]).sum(0) + 1e-9) for f in moving[1:]]
    assert columns[-1] > columns[0]  # what changes moves to the right
    video = generate_video(["left", "grow"], seed=1, frames_per_segment=12)
    assert video.shape == (24, FRAME_SIZE, FRAME_SIZE)
    with pytest.raises(ConfigError):
        render_clip("jump", rng)


def test_errors_are_one_line(tmp_path):
    missing = subprocess.run([sys.executable, str(CLIENT), str(tmp_path / "none.avi"), "--model", "m"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0
    assert "no such video file" in missing.stderr
    import cv2

    writer = cv2.VideoWriter(str(tmp_path / "v.avi"), cv2.VideoWriter_fourcc(*"FFV1"), 8, (32, 32))
    for _ in range(3):
        writer.write(np.zeros((32, 32, 3), np.uint8))
    writer.release()
    down = subprocess.run([sys.executable, str(CLIENT), str(tmp_path / "v.avi"), "--model", "m", "--url",
                           "127.0.0.1:9"], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert down.returncode == 1 and down.stderr.strip().count("\n") == 0 and "cannot reach" in down.stderr
