"""The device's cache of artifacts and engines: resumable, verified downloads placed atomically, a size cap with
least-recently-used eviction, and a record of what was last served so a restart needs no network.

Layout under ``root``::

    artifacts/<name>/<version>/manifest.json, <files>      verified copies (partial downloads end in .part)
    engines/<name>/<version>/<target-key>/<variant>.plan   built engines (TensorRT plans; <variant>.ort.onnx: ORT)
    engines/<name>/<version>/variant-choice.json           which variant this device chose, and the figures
    engines/<name>/timing.cache                            TensorRT timing cache
    state.json                                             {"name", "version", "variant", "target_key"} last served
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_runtime.contract import ArtifactLayout, FileRef, Manifest, verify_file
from edge_runtime.errors import DigestMismatch, EdgeloopError, StoreError, StoreUnavailable

if TYPE_CHECKING:
    from edge_runtime.store import ObjectStore

log = logging.getLogger(__name__)
_CHUNK_BYTES = 1 << 20


def _transient_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    return StoreError, BotoCoreError, HTTPError, ConnectionError, TimeoutError


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def download_resumable(
    store: ObjectStore,
    key: str,
    dest: Path,
    ref: FileRef,
    *,
    attempts: int = 8,
    backoff_s: float = 0.5,
    backoff_max_s: float = 30.0,
    on_chunk: Callable[[int], None] | None = None,
) -> Path:
    """Download ``key`` to ``dest`` with ranged GETs that resume from ``dest.part``, verify, then rename.

    Transient failures (S3 down, a connection cut mid-body) are retried with exponential back-off; the partial
    file is kept, so the next attempt (or the next cycle, after a restart) continues where this one stopped.
    A digest mismatch is not retried: the bytes in the bucket are not the ones the manifest vouches for.
    """
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    delay, last = backoff_s, None
    for attempt in range(1, attempts + 1):
        try:
            offset = part.stat().st_size if part.exists() else 0
            if offset > ref.size_bytes:
                part.unlink()
                offset = 0
            if offset < ref.size_bytes:
                body = store.open_range(key, offset)
                with open(part, "ab") as fh:
                    for chunk in body.iter_chunks(_CHUNK_BYTES):
                        fh.write(chunk)
                        if on_chunk is not None:
                            on_chunk(len(chunk))
            try:
                verify_file(part, ref)
            except DigestMismatch:
                part.unlink(missing_ok=True)
                raise
            os.replace(part, dest)
            return dest
        except DigestMismatch:
            raise
        except _transient_errors() as exc:
            last = exc
            log.warning("download of %s failed (attempt %d/%d): %s; retrying in %.1fs", key, attempt, attempts,
                        exc, delay)
            if attempt < attempts:
                time.sleep(delay)
                delay = min(delay * 2, backoff_max_s)
    raise StoreUnavailable(
        f"could not download {key} after {attempts} attempts ({last}); the partial file is kept and resumes later"
    ) from last


class ArtifactCache:
    """See the module docstring. ``max_bytes`` caps the whole folder; the versions in use are never evicted."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def version_dir(self, name: str, version: str) -> Path:
        """Where a version's verified files live."""
        return self.root / "artifacts" / name / version

    def engine_path(self, name: str, version: str, target_key: str, file: str) -> Path:
        """Where the engine built for ``target_key`` lives."""
        return self.root / "engines" / name / version / target_key / file

    def cached_manifest(self, name: str, version: str) -> Manifest | None:
        """The manifest saved with a version (already signature-checked when it was saved)."""
        path = self.version_dir(name, version) / "manifest.json"
        if not path.exists():
            return None
        try:
            return Manifest.from_json(path.read_bytes())
        except EdgeloopError:
            return None

    def fetch(
        self,
        store: ObjectStore,
        layout: ArtifactLayout,
        manifest: Manifest,
        refs: list[FileRef],
        *,
        attempts: int = 8,
        on_chunk: Callable[[int], None] | None = None,
    ) -> tuple[dict[str, Path], int]:
        """Make every file in ``refs`` present and verified; returns ``(paths by file, bytes downloaded)``."""
        directory = self.version_dir(manifest.name, manifest.version)
        paths, downloaded = {}, 0
        for ref in refs:
            dest = directory / ref.file
            if dest.exists():
                try:
                    verify_file(dest, ref)
                    paths[ref.file] = dest
                    continue
                except DigestMismatch:
                    dest.unlink()
            download_resumable(store, layout.file_key(manifest.name, manifest.version, ref.file), dest, ref,
                               attempts=attempts, on_chunk=on_chunk)
            downloaded += ref.size_bytes
            paths[ref.file] = dest
        write_atomic(directory / "manifest.json", manifest.to_json().encode())
        self.touch(manifest.name, manifest.version)
        return paths, downloaded

    def touch(self, name: str, version: str) -> None:
        """Mark a version as just used (least-recently-used order)."""
        directory = self.version_dir(name, version)
        if directory.exists():
            os.utime(directory)

    def save_state(self, state: dict[str, Any]) -> None:
        """Remember what is serving, for a restart without network."""
        write_atomic(self.root / "state.json", json.dumps(state).encode())

    def load_state(self) -> dict[str, Any] | None:
        """What :meth:`save_state` wrote last."""
        try:
            return json.loads((self.root / "state.json").read_text())
        except (OSError, ValueError):
            return None

    def size_bytes(self) -> int:
        """Bytes under the cache root."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def evict(self, keep: set[tuple[str, str]]) -> list[tuple[str, str]]:
        """Remove least recently used versions (artifacts and engines) until under the cap; never ``keep``."""
        removed: list[tuple[str, str]] = []
        versions = sorted(
            (d.stat().st_mtime, d.parent.name, d.name)
            for d in (self.root / "artifacts").glob("*/*")
            if d.is_dir()
        )
        for _, name, version in versions:
            if self.size_bytes() <= self.max_bytes:
                break
            if (name, version) in keep:
                continue
            shutil.rmtree(self.version_dir(name, version), ignore_errors=True)
            shutil.rmtree(self.root / "engines" / name / version, ignore_errors=True)
            removed.append((name, version))
        return removed
