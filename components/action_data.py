"""A synthetic action set the project generates itself: one object per clip that moves, turns, grows or stays,
over a cluttered, noisy background.

Every clip is :data:`FRAMES` grey frames of :data:`FRAME_SIZE` squared, laid out ``[channels, frames, height,
width]`` (``C, T, H, W``, one channel, values in [0, 1]) — the layout of PyTorch's ``Conv3d`` and ONNX's ``Conv``,
so the clip model needs no transpose in front. The action (:data:`ACTIONS`) is what the object does over the clip:

* ``left``, ``right``, ``up``, ``down``: it moves 1.2 to 2 pixels a frame in that direction;
* ``rotate``: it turns 12 to 18 degrees a frame (a square or a bar: a disc looks the same at every angle);
* ``grow``: its size grows 7 to 11% a frame;
* ``stay``: it keeps still.

The object is a :data:`SHAPES` (square, disc or bar), 7 to 12 pixels across, brighter or darker than its
surroundings. The background is a brightness gradient with static clutter (blobs and thin lines) that does not
move, and each frame gets its own Gaussian noise: an action is something that changes *between* frames, which no
single frame can tell.

Deterministic: the same seed gives the same clips, bit for bit (numpy's PCG64 and float arithmetic only). Fast: the
default splits (1,750 clips) take about a second. :func:`generate_video` strings clips of known actions into one
longer video (the streaming client's test), :func:`components.data.load_synthetic_actions` makes the pipeline's
splits (``data_uri=synthetic-actions``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgeloop_core.errors import ConfigError

ACTIONS = ("left", "right", "up", "down", "rotate", "grow", "stay")
"""The classes, in class-index order."""
SHAPES = ("square", "disc", "bar")
"""The objects that act."""
FRAMES = 8
"""Frames in one clip (T)."""
FRAME_SIZE = 32
"""Side of each frame in pixels."""
FPS = 8.0
"""The frame rate the clips stand for (frames per second): a clip is one second of video."""
SPLIT_SIZES = (1050, 210, 490)
"""Clips in the train, validation and test splits (split by seed: no clip is in two splits)."""


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A gradient with static clutter: blobs and thin lines smaller than the object, the same in every frame."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) / size
    gx, gy = rng.uniform(-0.2, 0.2, size=2)
    image = rng.uniform(0.3, 0.5) + gx * (xs - 0.5) + gy * (ys - 0.5)
    for _ in range(rng.integers(2, 5)):  # small blobs
        cx, cy = rng.uniform(0, size, size=2)
        radius = rng.uniform(1.0, 2.5)
        image = np.where((xs * size - cx) ** 2 + (ys * size - cy) ** 2 <= radius**2, rng.uniform(0.1, 0.9), image)
    for _ in range(rng.integers(1, 3)):  # a thin line across part of the frame
        x0, y0, x1, y1 = rng.uniform(0, size, size=4)
        for t in np.linspace(0.0, 1.0, 2 * size):
            image[int(y0 + t * (y1 - y0)) % size, int(x0 + t * (x1 - x0)) % size] = rng.uniform(0.1, 0.9)
    return image


def _object_mask(shape: str, cx: float, cy: float, side: float, angle: float, size: int) -> np.ndarray:
    """Coverage in [0, 1] of ``shape`` centred at ``(cx, cy)`` (pixels), ``side`` pixels across, turned ``angle``
    radians; edges are blended over about one pixel so that sub-pixel motion shows."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = xs - cx, ys - cy
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    if shape == "disc":
        inside = side / 2 - np.hypot(u, v)
    else:
        half_w, half_h = (side / 2, side / 2) if shape == "square" else (side / 2, side / 5)
        inside = np.minimum(half_w - np.abs(u), half_h - np.abs(v))
    return np.clip(inside + 0.5, 0.0, 1.0)


def _trajectory(action: str, frames: int, size: int, rng: np.random.Generator,
                side: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: the object's centre x and y (pixels), side (pixels) and angle (radians)."""
    t = np.arange(frames, dtype=np.float64)
    speed = rng.uniform(1.2, 2.0)
    direction = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}.get(action, (0, 0))
    travel = speed * (frames - 1)
    reach = side * (1.7 if action == "grow" else 0.8)
    # start where the whole path stays inside the frame
    lo_x = reach + (travel if direction[0] < 0 else 0)
    hi_x = size - reach - (travel if direction[0] > 0 else 0)
    lo_y = reach + (travel if direction[1] < 0 else 0)
    hi_y = size - reach - (travel if direction[1] > 0 else 0)
    # a path longer than the frame allows (long video segments) is centred: it leaves the frame a little at each end
    x0 = rng.uniform(lo_x, hi_x) if hi_x > lo_x else (lo_x + hi_x) / 2
    y0 = rng.uniform(lo_y, hi_y) if hi_y > lo_y else (lo_y + hi_y) / 2
    xs, ys = x0 + direction[0] * speed * t, y0 + direction[1] * speed * t
    sides = side * (1.0 + rng.uniform(0.07, 0.11)) ** t if action == "grow" else np.full(frames, side)
    turn = np.deg2rad(rng.uniform(12.0, 18.0)) * rng.choice([-1.0, 1.0]) if action == "rotate" else 0.0
    angles = rng.uniform(0.0, np.pi) + turn * t
    return xs, ys, sides, angles


def render_clip(action: str, rng: np.random.Generator, *, frames: int = FRAMES, size: int = FRAME_SIZE,
                noise: float = 0.04) -> np.ndarray:
    """One clip of ``action`` as float32 ``[frames, size, size]`` in [0, 1]."""
    if action not in ACTIONS:
        raise ConfigError(f"unknown action {action!r}: choose one of {', '.join(ACTIONS)}")
    shape = str(rng.choice(SHAPES[::2] if action == "rotate" else SHAPES))
    side = rng.uniform(7.0, 12.0)
    background = _background(size, rng)
    level = rng.uniform(0.75, 1.0) if rng.random() < 0.7 else rng.uniform(0.0, 0.12)
    clip = np.empty((frames, size, size), dtype=np.float64)
    for index, (x, y, s, a) in enumerate(zip(*_trajectory(action, frames, size, rng, side), strict=True)):
        coverage = _object_mask(shape, x, y, s, a, size)
        clip[index] = background * (1.0 - coverage) + level * coverage
    clip += rng.normal(0.0, noise, size=clip.shape)
    return np.clip(clip, 0.0, 1.0).astype(np.float32)


def generate(count: int, seed: int | Sequence[int] = 0, *, frames: int = FRAMES,
             size: int = FRAME_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``count`` clips, the actions taking turns (balanced classes) in a seeded random order: float32 ``[count, 1,
    frames, size, size]`` (``N, C, T, H, W``) and int64 action indices into :data:`ACTIONS`."""
    if count <= 0 or frames < 2 or size < 16:
        raise ConfigError(f"need count > 0, frames >= 2 and size >= 16 (got {count}, {frames}, {size})")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % len(ACTIONS)).astype(np.int64)
    clips = np.stack([render_clip(ACTIONS[label], rng, frames=frames, size=size) for label in labels])
    return clips[:, None], labels


def generate_video(actions: Sequence[str], seed: int | Sequence[int] = 0, *, frames_per_segment: int = 16,
                   size: int = FRAME_SIZE) -> np.ndarray:
    """A video of one segment per action in ``actions``, each ``frames_per_segment`` frames of its own object and
    background: float32 ``[segments * frames_per_segment, size, size]`` in [0, 1]. The motion per frame is the
    clips' (:func:`render_clip`), so a model trained on clips recognises every window inside a segment."""
    rng = np.random.default_rng(seed)
    return np.concatenate([render_clip(a, rng, frames=frames_per_segment, size=size) for a in actions])
