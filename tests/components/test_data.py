"""Data sets: digits, image folders from a path or an S3 prefix, deterministic splits."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from components.data import DatasetSplits, load_dataset, load_digits_dataset, load_image_folder
from edgeloop_core.errors import ConfigError


def test_digits_split_is_deterministic_stratified_and_disjoint():
    first, again, other = load_digits_dataset(seed=0), load_digits_dataset(seed=0), load_digits_dataset(seed=1)
    assert first.fingerprint() == again.fingerprint()
    assert first.fingerprint() != other.fingerprint()
    assert first.input_shape == (1, 8, 8)
    assert len(first.y_train) + len(first.y_val) + len(first.y_test) == 1797
    assert set(np.unique(first.y_test)) == set(range(10))
    assert 0.0 <= first.x_train.min() and first.x_train.max() <= 1.0
    rows = {r.tobytes() for r in first.x_test}
    assert not rows & {r.tobytes() for r in first.x_train}  # no test image leaks into training


def test_save_and_load_round_trip(tmp_path):
    data = load_digits_dataset()
    data.save(tmp_path / "d.npz")
    loaded = DatasetSplits.load(tmp_path / "d.npz")
    assert loaded.fingerprint() == data.fingerprint()
    assert loaded.labels == data.labels and loaded.preprocessing == data.preprocessing


def _write_image_folder(root, classes=("cat", "dog", "fox"), per_class=20):
    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 60 * index, 20, (12, 12)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")


def test_image_folder_from_a_path(tmp_path):
    _write_image_folder(tmp_path / "imgs")
    data = load_dataset(str(tmp_path / "imgs"), image_size=16)
    assert data.labels == ["cat", "dog", "fox"]
    assert data.input_shape == (1, 16, 16)
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == 60
    # brighter class -> brighter mean, so the labels follow the folders
    means = [data.x_train[data.y_train == k].mean() for k in range(3)]
    assert means == sorted(means)


@pytest.mark.integration
def test_image_folder_from_an_s3_prefix(tmp_path, store, s3_env):
    _write_image_folder(tmp_path / "imgs")
    for path in sorted((tmp_path / "imgs").rglob("*.png")):
        store.put_file(f"datasets/pets/{path.relative_to(tmp_path / 'imgs')}", path)
    from_s3 = load_image_folder(f"s3://{store.bucket}/datasets/pets", image_size=16)
    from_disk = load_image_folder(str(tmp_path / "imgs"), image_size=16)
    assert from_s3.fingerprint() == from_disk.fingerprint()


def test_bad_image_folders_are_config_errors(tmp_path):
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(ConfigError) as single:
        load_dataset(str(tmp_path / "one"))
    assert "at least two" in str(single.value)
    with pytest.raises(ConfigError):
        load_dataset(str(tmp_path / "nowhere"))
    _write_image_folder(tmp_path / "broken", per_class=3)
    (tmp_path / "broken" / "cat" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError) as broken:
        load_dataset(str(tmp_path / "broken"))
    assert "bad.png" in str(broken.value)
