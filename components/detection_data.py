"""A synthetic detection set the project generates itself: filled shapes pasted onto cluttered, noisy backgrounds.

Every image (``image_size`` squared, one grey channel in [0, 1]) holds one to ``max_objects`` shapes of
:data:`SHAPES` (ellipse, rectangle, triangle, cross), each 10 to 24 pixels across with its own aspect ratio,
brightness and position, never overlapping another. The background is a brightness gradient, Gaussian noise and
clutter (thin lines and small blobs, smaller than any object): a detector must find the shapes, not merely bright
pixels. Boxes are the tight pixel bounds of each shape as drawn.

Deterministic: the same seed gives the same images and annotations, bit for bit, on any machine (numpy's PCG64 and
float arithmetic only). Fast: the 2,200 images of the default splits take under a second.

Labels come in two forms:

* COCO (:func:`coco_labels`): ``images``, ``annotations`` (1-based ids, ``bbox`` as x, y, w, h in pixels, ``area``,
  ``iscrowd``) and ``categories`` (``id`` = class index), what :func:`edgeloop_core.detection.detection_map` and
  the device's ``detection_map50`` read;
* box tables (:func:`box_table`): ``float32 [images, max_objects, 5]`` rows of ``class, x1, y1, x2, y2``, padded
  with class -1: an array the training loop batches like class labels (``DatasetSplits.y_train``).

:func:`components.data.load_synthetic_detection` makes the pipeline's splits from it (``data_uri=
synthetic-detection``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeloop_core.errors import ConfigError

SHAPES = ("ellipse", "rectangle", "triangle", "cross")
"""The classes, in class-index order."""
IMAGE_SIZE = 64
"""Side of each image in pixels."""
MAX_OBJECTS = 4
"""Most shapes in one image (and rows of a box table)."""
OBJECT_SIZE = (10, 24)
"""Smallest and largest side of a shape's box, in pixels."""
SPLIT_SIZES = (1600, 300, 300)
"""Images in the train, validation and test splits."""
PAD_CLASS = -1
"""Class of an unused box-table row."""


def is_box_table(y: np.ndarray) -> bool:
    """Whether ``y`` holds detection box tables (``[samples, objects, 5]``) rather than one class per sample."""
    return np.ndim(y) == 3


def _shape_mask(kind: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean ``[height, width]`` mask of one filled shape that touches all four sides of its box."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = (xs + 0.5) / width, (ys + 0.5) / height  # pixel centres in [0, 1]
    if kind == "ellipse":
        mask = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif kind == "rectangle":
        mask = np.ones((height, width), dtype=bool)
    elif kind == "triangle":  # apex at the top, somewhere along the top edge
        apex = rng.uniform(0.3, 0.7)
        left = u >= apex * (1.0 - v)
        right = u <= apex + (1.0 - apex) * v
        mask = left & right
    elif kind == "cross":
        arm = rng.uniform(0.28, 0.4) / 2
        mask = (np.abs(u - 0.5) <= arm) | (np.abs(v - 0.5) <= arm)
    else:
        raise ConfigError(f"unknown shape {kind!r}")
    return mask


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A gradient, noise, and clutter (lines and blobs smaller than any object)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) / size
    gx, gy = rng.uniform(-0.25, 0.25, size=2)
    image = rng.uniform(0.15, 0.45) + gx * (xs - 0.5) + gy * (ys - 0.5)
    for _ in range(rng.integers(2, 6)):  # thin lines across the image
        x0, y0, x1, y1 = rng.uniform(0, size, size=4)
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        px = np.clip(np.round(np.linspace(x0, x1, steps)).astype(int), 0, size - 1)
        py = np.clip(np.round(np.linspace(y0, y1, steps)).astype(int), 0, size - 1)
        image[py, px] = rng.uniform(0.4, 0.9)
    for _ in range(rng.integers(3, 9)):  # small blobs, at most 4 pixels across
        side = int(rng.integers(2, 5))
        x, y = rng.integers(0, size - side, size=2)
        image[y : y + side, x : x + side] = rng.uniform(0.4, 0.9)
    return image


def _place(size: int, width: int, height: int, taken: list[tuple[int, int, int, int]],
           rng: np.random.Generator) -> tuple[int, int] | None:
    """A top-left corner where a ``width`` x ``height`` box overlaps no box in ``taken`` (with a 1-pixel gap)."""
    for _ in range(30):
        x, y = int(rng.integers(0, size - width + 1)), int(rng.integers(0, size - height + 1))
        if all(x + width + 1 <= x1 or x1 + w1 + 1 <= x or y + height + 1 <= y1 or y1 + h1 + 1 <= y
               for x1, y1, w1, h1 in taken):
            return x, y
    return None


def generate_image(rng: np.random.Generator, *, size: int = IMAGE_SIZE,
                   max_objects: int = MAX_OBJECTS) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """One image (float32 ``[size, size]`` in [0, 1]) and its objects: ``(class index, [x, y, w, h])`` in pixels."""
    image = _background(size, rng)
    objects: list[tuple[int, list[int]]] = []
    taken: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(len(SHAPES)))
        side = rng.uniform(*OBJECT_SIZE)
        aspect = rng.uniform(0.75, 1.33)
        width = int(np.clip(round(side * np.sqrt(aspect)), *OBJECT_SIZE))
        height = int(np.clip(round(side / np.sqrt(aspect)), *OBJECT_SIZE))
        corner = _place(size, width, height, taken, rng)
        if corner is None:  # no room left: fewer objects in this image
            continue
        x, y = corner
        mask = _shape_mask(SHAPES[label], width, height, rng)
        region = image[y : y + height, x : x + width]
        region[mask] = rng.uniform(0.75, 1.0)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box = [x + int(cols[0]), y + int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        taken.append((x, y, width, height))
        objects.append((label, box))
    image = image + rng.normal(0.0, 0.06, size=image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), objects


def generate(count: int, *, seed: int | Sequence[int] = 0, size: int = IMAGE_SIZE,
             max_objects: int = MAX_OBJECTS) -> tuple[np.ndarray, dict[str, Any]]:
    """``count`` images as float32 ``[count, 1, size, size]`` and their COCO labels (see :func:`coco_labels`);
    ``seed`` is anything :func:`numpy.random.default_rng` takes (an int, or a list of ints)."""
    if count <= 0 or max_objects <= 0:
        raise ConfigError(f"need a positive image count and max_objects (got {count}, {max_objects})")
    if size < 2 * OBJECT_SIZE[1]:
        raise ConfigError(f"images must be at least {2 * OBJECT_SIZE[1]} pixels across, got {size}")
    rng = np.random.default_rng(seed)
    images, per_image = [], []
    for _ in range(count):
        image, objects = generate_image(rng, size=size, max_objects=max_objects)
        images.append(image)
        per_image.append(objects)
    return np.stack(images)[:, None], coco_labels(per_image, size)


def coco_labels(per_image: Sequence[Sequence[tuple[int, Sequence[float]]]], size: int) -> dict[str, Any]:
    """COCO-format labels of images ``1..n`` (``size`` squared) from each image's ``(class, [x, y, w, h])``."""
    annotations = []
    for image_id, objects in enumerate(per_image, start=1):
        for label, box in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0})
    return {
        "images": [{"id": i, "width": size, "height": size, "file_name": f"{i:06d}.png"}
                   for i in range(1, len(per_image) + 1)],
        "annotations": annotations,
        "categories": [{"id": index, "name": name} for index, name in enumerate(SHAPES)],
    }


def box_table(labels: dict[str, Any], max_objects: int = MAX_OBJECTS) -> np.ndarray:
    """COCO labels as a float32 ``[images, max_objects, 5]`` table of ``class, x1, y1, x2, y2`` rows (class -1:
    unused), in the order of ``labels["images"]``."""
    rows = {image["id"]: i for i, image in enumerate(labels["images"])}
    table = np.zeros((len(rows), max_objects, 5), dtype=np.float32)
    table[:, :, 0] = PAD_CLASS
    used = np.zeros(len(rows), dtype=np.int64)
    for annotation in labels["annotations"]:
        row = rows[annotation["image_id"]]
        if used[row] >= max_objects:
            raise ConfigError(f"image {annotation['image_id']} has more than {max_objects} objects")
        x, y, w, h = annotation["bbox"]
        table[row, used[row]] = (annotation["category_id"], x, y, x + w, y + h)
        used[row] += 1
    return table


def table_to_coco(table: np.ndarray, size: int, names: Sequence[str]) -> dict[str, Any]:
    """The COCO labels of a box table (the inverse of :func:`box_table`): what a split's ``y`` stands for;
    ``names`` are the class names, in class-index order."""
    per_image = [[(int(row[0]), [float(row[1]), float(row[2]), float(row[3] - row[1]), float(row[4] - row[2])])
                  for row in boxes if row[0] != PAD_CLASS] for boxes in np.asarray(table)]
    labels = coco_labels(per_image, size)
    labels["categories"] = [{"id": index, "name": name} for index, name in enumerate(names)]
    return labels
