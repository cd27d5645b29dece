"""Field statistics for drift (edgeloop_core.drift): the training data's baseline against what a device serves."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from edgeloop_core.contract import Task
from edgeloop_core.drift import FieldBaseline, FieldCounts, build_baseline, divergence

TASK = Task(kind="classification", num_classes=10)


def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]  # [n, 1, 8, 8] in [0, 1]
    return images, data.target


def scores(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A classifier's logits: right 90% of the time, confident where right."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, (len(images), 10)).astype(np.float32)
    logits[np.arange(len(images)), labels] += 4.0
    return logits


def served(counts: FieldCounts, images: np.ndarray, labels: np.ndarray, batch: int = 16) -> None:
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        counts.add({"x": chunk}, {"logits": scores(chunk, labels[start:start + batch], start)}, TASK)


def test_the_training_distribution_stays_near_and_a_shifted_one_moves_away() -> None:
    images, labels = digits()
    train, field = slice(0, 1200), slice(1200, None)
    baseline = build_baseline({"x": images[train]}, {"logits": scores(images[train], labels[train])}, TASK, 10)
    assert set(baseline.features) == {"input:x:c0:mean", "input:x:c0:std", "class", "confidence"}
    assert all(abs(sum(f.proportions) - 1) < 1e-9 for f in baseline.features.values())

    same = FieldCounts(baseline)
    served(same, images[field], labels[field])
    near = divergence(baseline, same.take())
    assert max(near.values()) < 0.2, near

    darker = FieldCounts(baseline)  # a camera that lost half its light, with sensor noise
    noise = np.random.default_rng(1).normal(0, 0.15, images[field].shape).astype(np.float32)
    served(darker, np.clip(images[field] * 0.5 + noise, 0, 1), labels[field])
    far = divergence(baseline, darker.take())
    assert far["input:x:c0:mean"] > 0.4 and far["input:x:c0:std"] > 0.3, far

    one_class = FieldCounts(baseline)  # a scene that shows only one thing
    ones = labels[field] == 1
    served(one_class, images[field][ones], labels[field][ones])
    assert divergence(baseline, one_class.take())["class"] > 0.5


def test_counts_are_taken_once_and_the_baseline_survives_the_manifest_round_trip() -> None:
    images, labels = digits()
    baseline = build_baseline({"x": images[:500]}, {"logits": scores(images[:500], labels[:500])}, TASK, 10)
    again = FieldBaseline.model_validate_json(baseline.model_dump_json())
    assert again == baseline
    counts = FieldCounts(again)
    served(counts, images[500:600], labels[500:600])
    assert counts.samples == 100
    mean, std = counts.moments()["input:x:c0"]
    assert 0 < mean < 1 and std > 0
    taken = counts.take()
    assert sum(taken["class"]) == 100 and counts.samples == 0 and sum(counts.take()["class"]) == 0
    assert divergence(baseline, {"class": [0] * 10, "nonsense": [1, 2]}) == {}  # no samples, unknown: left out


def test_rgb_inputs_get_a_feature_per_channel_and_strings_none() -> None:
    rgb = np.random.default_rng(0).random((64, 3, 16, 16), dtype=np.float32)
    baseline = build_baseline({"image": rgb, "tags": np.array([["a"]] * 64)}, None, None)
    assert sorted(baseline.features) == [f"input:image:c{k}:{s}" for k in range(3) for s in ("mean", "std")]
    with pytest.raises(ValueError, match="at least one sample"):
        build_baseline({"tags": np.array([["a"]] * 4)}, None, None)
