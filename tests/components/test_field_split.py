"""The field split and mix (components/field_data.py), pure: connected groups by device and capture group, the
label precedence, the slice's invariants over several layouts, determinism, the ratio arithmetic; and the dataset
artifact's field slice (components/data.py) saved, loaded and fingerprinted, old files included."""

from __future__ import annotations

import json
from itertools import permutations

import numpy as np
import pytest

from components.data import DatasetSplits, load_digits_dataset
from components.field_data import (
    FieldData,
    FieldSample,
    FieldSplit,
    app_values,
    connected_groups,
    field_rows,
    mix_field,
    mix_indices,
    pick_label,
    split_field,
)
from edgeloop_core.errors import ConfigError


def samples_of(layout: dict[tuple[str, str], list[str | None]]) -> list[FieldSample]:
    """(device, group) -> the label source of each of its samples (None: unlabelled)."""
    out = []
    for (device, group), sources in layout.items():
        for i, source in enumerate(sources):
            out.append(FieldSample(id=f"{device}-{group}-{i}:0", device=device, group=group,
                                   label=None if source is None else i % 3, source=source))
    return out


LAYOUTS = {
    "devices only": {("d1", ""): ["app"] * 10, ("d2", ""): ["human"] * 6 + ["teacher"] * 5,
                     ("d3", ""): ["app", "teacher", None] * 4, ("d4", ""): ["teacher"] * 8},
    "a speaker on two devices": {("d1", "alice"): ["app"] * 5, ("d2", "alice"): ["app"] * 5 + ["teacher"] * 3,
                                 ("d2", ""): ["human"] * 4, ("d3", "bob"): ["app"] * 6, ("d4", "carol"): ["app"] * 7,
                                 ("d4", ""): ["teacher"] * 4},
    "speakers everywhere": {(f"d{i % 3}", f"s{i}"): ["app", "human", "teacher", None] for i in range(12)},
    "many small devices": {(f"jetson-{i:02d}", ""): ["app"] * (1 + i % 4) + ["teacher"] * (i % 2)
                           for i in range(20)},
}


def owners(samples: list[FieldSample], indices: list[int]) -> tuple[set[str], set[str]]:
    chosen = [samples[i] for i in indices]
    return {s.device for s in chosen}, {s.group for s in chosen if s.group}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.6])
def test_the_slice_takes_whole_groups_and_only_trusted_labels(name, fraction):
    samples = samples_of(LAYOUTS[name])
    split = split_field(samples, fraction, seed=7)
    assert split.slice and split.train  # every layout has two or more connected groups
    train_devices, train_groups = owners(samples, split.train)
    slice_devices, slice_groups = owners(samples, split.slice + split.dropped)
    assert not train_devices & slice_devices and not train_groups & slice_groups  # no device or speaker on both sides
    assert {samples[i].source for i in split.slice} <= {"app", "human"}  # never a teacher's label in the slice
    assert {samples[i].source for i in split.dropped} == ({"teacher"} if split.dropped else set())
    assert not {samples[i].id for i in split.train} & {samples[i].id for i in split.slice}
    labelled = {i for i, s in enumerate(samples) if s.label is not None}
    assert set(split.train) | set(split.slice) | set(split.dropped) == labelled  # unlabelled: in neither
    trusted = sum(s.source in ("app", "human") for s in samples)
    assert any(samples[i].source in ("app", "human") for i in split.train)  # a trusted group stays in training
    components = connected_groups(samples)
    largest = max(sum(1 for c2, s in zip(components, samples, strict=True) if c2 == c and s.source in ("app", "human"))
                  for c in set(components))
    assert abs(len(split.slice) - fraction * trusted) <= largest  # as near the fraction as whole groups allow


def test_a_speaker_shared_by_two_devices_joins_them_into_one_group():
    samples = samples_of(LAYOUTS["a speaker on two devices"])
    components = connected_groups(samples)
    of = {(s.device, s.group): c for s, c in zip(samples, components, strict=True)}
    assert of[("d1", "alice")] == of[("d2", "alice")] == of[("d2", "")]  # d1 and d2 through alice
    assert of[("d4", "carol")] == of[("d4", "")] != of[("d3", "bob")]
    assert len(set(components)) == 3
    for seed in range(20):  # whichever way the hash order falls, d1 and d2 stay together
        split = split_field(samples, 0.4, seed=seed)
        sides = [{samples[i].device for i in split.train}, {samples[i].device for i in split.slice + split.dropped}]
        assert not ({"d1", "d2"} & sides[0] and {"d1", "d2"} & sides[1])


def test_the_split_is_deterministic_whatever_the_order_and_changes_with_the_seed():
    samples = samples_of(LAYOUTS["many small devices"])
    first = split_field(samples, 0.3, seed=1)
    picked = {samples[i].id for i in first.slice}
    for order in list(permutations(range(4)))[:6]:
        shuffled = [s for k in order for j, s in enumerate(samples) if j % 4 == k]
        again = split_field(shuffled, 0.3, seed=1)
        assert {shuffled[i].id for i in again.slice} == picked
    assert any({samples[i].id for i in split_field(samples, 0.3, seed=s).slice} != picked for s in range(2, 8))


def test_the_slice_size_follows_the_fraction_in_whole_groups():
    samples = samples_of({(f"d{i}", ""): ["app"] * 10 for i in range(10)})
    for fraction, expected in ((0.1, 10), (0.3, 30), (0.5, 50), (0.9, 90)):
        assert len(split_field(samples, fraction, seed=3).slice) == expected


def test_one_group_gives_no_slice_and_says_why():
    samples = samples_of({("d1", "alice"): ["app"] * 5, ("d2", "alice"): ["human"] * 3 + ["teacher"] * 2})
    split = split_field(samples, 0.3, seed=0)
    assert split.slice == [] and split.dropped == [] and len(split.train) == 10
    assert "no field slice" in split.note and "1 connected group" in split.note
    only_teacher_elsewhere = samples_of({("d1", ""): ["app"] * 4, ("d2", ""): ["teacher"] * 9})
    split = split_field(only_teacher_elsewhere, 0.5, seed=0)
    assert split.slice == [] and len(split.train) == 13  # a group with no trusted label cannot be a slice


def test_human_beats_app_beats_teacher():
    assert pick_label({"teacher": 1, "app": 2, "human": 3}) == (3, "human")
    assert pick_label({"teacher": 1, "app": 2}) == (2, "app")
    assert pick_label({"teacher": 1}) == (1, "teacher")
    assert pick_label({}) is None


def test_an_apps_label_names_samples_by_the_batch():
    assert app_values(4, 1) == [(0, 4)]
    assert app_values(4, 3) == []  # one class for a batch of three: which sample? none
    assert app_values([1, None, 2], 3) == [(0, 1), (2, 2)]
    assert app_values([1, 2], 3) == []


def test_the_ratio_arithmetic():
    assert field_rows(700, 0.3) == 300  # 300 / (700 + 300) = 0.3
    assert field_rows(1099, 0.3) == 471
    assert field_rows(100, 0.5) == 100
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError) as caught:
            field_rows(100, bad)
        assert "field_ratio must be in (0, 1)" in str(caught.value)
    picks = mix_indices(5, 1000, seed=1)
    assert len(picks) == 1000 and set(picks.tolist()) == set(range(5))  # resampled with replacement
    assert np.array_equal(picks, mix_indices(5, 1000, seed=1)) and not np.array_equal(picks, mix_indices(5, 1000, 2))


def small_data() -> DatasetSplits:
    x = np.arange(40 * 4, dtype=np.float32).reshape(40, 1, 2, 2)
    y = np.arange(40, dtype=np.int64) % 3
    return DatasetSplits(x[:28], y[:28], x[28:34], y[28:34], x[34:], y[34:], labels=["a", "b", "c"],
                         preprocessing=load_digits_dataset().preprocessing, source="test")


def test_mixing_puts_field_rows_in_training_and_the_slice_apart():
    data = small_data()
    samples = samples_of({("d1", ""): ["app"] * 6 + ["teacher"] * 2, ("d2", ""): ["human"] * 5 + ["teacher"]})
    field = FieldData(samples=samples, x=[np.full((1, 2, 2), 1000 + i, np.float32) for i in range(len(samples))])
    split = split_field(samples, 0.4, seed=0)
    mixed, parts = mix_field(data, field, split, ratio=0.3, seed=0)
    assert len(mixed.x_train) == 28 + 12 and parts["train"]["rows_in_train"] == 12  # 12 / 40 = 0.3
    assert np.array_equal(mixed.x_train[:28], data.x_train) and (mixed.x_train[28:] >= 1000).all()
    assert np.array_equal(mixed.x_test, data.x_test) and np.array_equal(mixed.x_val, data.x_val)
    slice_ids = set(parts["slice"]["ids"])
    assert slice_ids and not slice_ids & set(parts["train"]["ids"])
    assert len(mixed.x_field) == len(mixed.y_field) == parts["slice"]["samples"] == len(parts["slice"]["device_of_row"])
    assert "teacher" not in parts["slice"]["label_sources"]
    field_values = {float(v) for v in mixed.x_train[28:, 0, 0, 0]}
    assert not field_values & {float(v) for v in mixed.x_field[:, 0, 0, 0]}  # no slice item trains
    with pytest.raises(ConfigError) as caught:
        mix_field(data, FieldData(samples=[], x=[]), FieldSplit([], [], []), ratio=0.3, seed=0)
    assert "no labelled field samples" in str(caught.value) and "\n" not in str(caught.value)


def test_the_field_slice_is_saved_loaded_and_fingerprinted_and_old_files_still_load(tmp_path):
    data = small_data()
    assert data.x_field.shape == (0, 1, 2, 2) and data.y_field.dtype == np.int64 and not data.has_field_slice
    before = data.fingerprint()
    data.save(tmp_path / "plain.npz")
    with np.load(tmp_path / "plain.npz") as npz:
        assert "x_field" not in npz.files  # no field data: the file is what it always was
    old = tmp_path / "old.npz"  # written as before the field slice existed
    meta = {"labels": data.labels, "preprocessing": data.preprocessing.model_dump(mode="json"), "source": "old"}
    np.savez(old, x_train=data.x_train, y_train=data.y_train, x_val=data.x_val, y_val=data.y_val,
             x_test=data.x_test, y_test=data.y_test, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    loaded = DatasetSplits.load(old)
    assert loaded.fingerprint() == before and loaded.x_field.shape == (0, 1, 2, 2)

    data.x_field, data.y_field = np.ones((3, 1, 2, 2), np.float32), np.array([0, 2, 1], np.int64)
    assert data.has_field_slice and data.fingerprint() != before
    data.save(tmp_path / "field.npz")
    again = DatasetSplits.load(tmp_path / "field.npz")
    assert np.array_equal(again.x_field, data.x_field) and again.y_field.tolist() == [0, 2, 1]
    assert again.fingerprint() == data.fingerprint()
    with pytest.raises(ConfigError) as caught:
        DatasetSplits(data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test, labels=data.labels,
                      preprocessing=data.preprocessing, source="x", x_field=np.ones((2, 1, 2, 2)), y_field=np.zeros(1))
    assert "2 inputs but 1 labels" in str(caught.value)
