"""The synthetic detection set: valid COCO labels, deterministic, and box tables the training loop can batch."""

from __future__ import annotations

import numpy as np
import pytest

from components.data import calibration_indices, class_histogram, load_dataset, load_synthetic_detection
from components.detection_data import (
    IMAGE_SIZE,
    MAX_OBJECTS,
    OBJECT_SIZE,
    SHAPES,
    box_table,
    generate,
    table_to_coco,
)
from edgeloop_core.detection import Detections, detection_map
from edgeloop_core.errors import ConfigError


@pytest.fixture(scope="module")
def sample():
    return generate(200, seed=7)


def test_the_labels_are_coco_that_a_coco_evaluator_reads(sample):
    from faster_coco_eval import COCO

    images, labels = sample
    assert images.shape == (200, 1, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert [i["id"] for i in labels["images"]] == list(range(1, 201))
    assert all(i["width"] == i["height"] == IMAGE_SIZE for i in labels["images"])
    assert labels["categories"] == [{"id": i, "name": n} for i, n in enumerate(SHAPES)]
    annotations = labels["annotations"]
    assert [a["id"] for a in annotations] == list(range(1, len(annotations) + 1))
    per_image = np.bincount([a["image_id"] for a in annotations], minlength=201)[1:]
    assert per_image.min() >= 1 and per_image.max() <= MAX_OBJECTS and per_image.mean() > 2  # several per image
    assert {a["category_id"] for a in annotations} == set(range(len(SHAPES)))
    for a in annotations:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= IMAGE_SIZE and y + h <= IMAGE_SIZE
        assert OBJECT_SIZE[0] - 2 <= max(w, h) <= OBJECT_SIZE[1] and a["area"] == w * h and a["iscrowd"] == 0
    sizes = [max(a["bbox"][2:]) for a in annotations]
    assert min(sizes) <= 12 and max(sizes) >= 22  # varying sizes
    truth = COCO(labels)  # the evaluator's own loader accepts it
    assert len(truth.getAnnIds()) == len(annotations) and sorted(truth.getCatIds()) == [0, 1, 2, 3]


def test_boxes_are_the_drawn_shapes(sample):
    images, labels = sample
    inside, outside = [], []
    for a in labels["annotations"]:
        x, y, w, h = (int(v) for v in a["bbox"])
        image = images[a["image_id"] - 1, 0]
        inside.append(image[y : y + h, x : x + w].mean())
        above, below = image[max(y - 2, 0) : y, x : x + w], image[y + h : y + h + 2, x : x + w]
        ring = np.concatenate([above.ravel(), below.ravel()])
        outside.append(ring.mean() if ring.size else np.nan)
    assert np.mean(inside) > np.nanmean(outside) + 0.2  # the shapes are brighter than what surrounds their boxes


def test_the_same_seed_gives_the_same_set_and_another_seed_another(sample):
    images, labels = sample
    again_images, again_labels = generate(200, seed=7)
    assert np.array_equal(images, again_images) and again_labels == labels
    other_images, other_labels = generate(200, seed=8)
    assert not np.array_equal(images, other_images) and other_labels != labels
    first = load_synthetic_detection(sizes=(40, 10, 10))
    second = load_synthetic_detection(sizes=(40, 10, 10))
    assert first.fingerprint() == second.fingerprint()
    assert not np.array_equal(first.x_train[:10], first.x_test)  # each split from its own seed


def test_box_tables_round_trip_to_the_same_coco_labels(sample):
    images, labels = sample
    table = box_table(labels)
    assert table.shape == (200, MAX_OBJECTS, 5) and table.dtype == np.float32
    assert set(np.unique(table[..., 0])) <= {-1.0, 0.0, 1.0, 2.0, 3.0}
    assert table_to_coco(table, IMAGE_SIZE, SHAPES) == labels
    # perfect detections score mAP 1.0 against these labels; detections moved to the wrong images score 0
    found = [Detections(rows[rows[:, 0] >= 0, 1:].astype(np.float64), np.ones(int((rows[:, 0] >= 0).sum())),
                        rows[rows[:, 0] >= 0, 0].astype(np.int64)) for rows in table]
    assert detection_map(found, labels)[0] == pytest.approx(1.0)
    assert detection_map(found[1:] + found[:1], labels)[0] < 0.05
    with pytest.raises(ConfigError) as crowded:
        box_table(labels, max_objects=1)
    assert "more than 1 objects" in str(crowded.value)


def test_the_pipeline_loads_it_by_name_with_box_tables_that_calibrate_and_count():
    data = load_dataset("synthetic-detection")
    assert data.task == "detection" and data.source == "synthetic-detection"
    assert data.labels == list(SHAPES) and data.input_shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (1600, 300, 300)
    assert data.y_train.shape == (1600, MAX_OBJECTS, 5)
    rows = calibration_indices(data.y_train, 512, seed=0)  # no single class per row: a seeded random sample
    assert len(rows) == len(set(rows.tolist())) == 512 and rows.max() < 1600
    assert np.array_equal(rows, calibration_indices(data.y_train, 512, seed=0))
    histogram = class_histogram(data.y_train[rows], data.labels)
    assert set(histogram) == set(SHAPES) and sum(histogram.values()) == int((data.y_train[rows, :, 0] >= 0).sum())
    assert load_dataset("digits").task == "classification"
