"""The device cache: least recently used versions leave first, the ones in use never do."""

from __future__ import annotations

import os

from edge_runtime.fetch.cache import ArtifactCache


def _version(cache: ArtifactCache, version: str, size: int, age_s: int) -> None:
    directory = cache.version_dir("m", version)
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(b"x" * size)
    engine = cache.engine_path("m", version, "ort1.32-cpu-x86_64-int8", "model.ort.onnx")
    engine.parent.mkdir(parents=True)
    engine.write_bytes(b"y" * size)
    stamp = 1_000_000 + (1000 - age_s)
    os.utime(directory, (stamp, stamp))


def test_eviction_is_lru_and_spares_versions_in_use(tmp_path):
    cache = ArtifactCache(tmp_path, max_bytes=5000)
    for version, age in (("v1", 300), ("v2", 200), ("v3", 100), ("v4", 0)):
        _version(cache, version, 1000, age)  # 2000 bytes each with its engine: 8000 in all
    removed = cache.evict(keep={("m", "v1")})
    assert removed == [("m", "v2"), ("m", "v3")]  # the oldest, v1, is in use
    assert cache.size_bytes() <= 5000
    assert cache.version_dir("m", "v1").exists() and cache.version_dir("m", "v4").exists()
    assert not (tmp_path / "engines" / "m" / "v2").exists()


def test_touch_moves_a_version_to_the_back_of_the_queue(tmp_path):
    cache = ArtifactCache(tmp_path, max_bytes=3000)
    _version(cache, "old", 1000, 500)
    _version(cache, "new", 1000, 0)
    cache.touch("m", "old")
    assert cache.evict(keep=set()) == [("m", "new")]
