"""The device's cache of artifacts and engines: resumable, verified downloads placed atomically, a size cap with
least-recently-used eviction, and a record of what was last served so a restart needs no network.

Layout under ``root``::

    artifacts/<name>/<version>/manifest.json, <files>      verified copies (partial downloads end in .part)
    engines/<name>/<version>/<target-key>/<variant>.plan   built engines (TensorRT plans; <variant>.ort.onnx: ORT)
    engines/<name>/<version>/variant-choice.json           which variant this device chose, and the figures
    engines/<name>/<version>/<target-key>/<variant>.plan.record.json   the engine's sha256, recorded when it arrived
    engines/timing/<trt version>-<device>.cache            TensorRT timing cache (per TensorRT build and device)
    quarantine/<timestamp>-<file>, .reason                  engines set aside: failed their digest, load or validation
    channels.json                                          the highest channel-pointer sequence accepted, per channel
    pointer-capture.json                                   {model: capture policy} of the last pointer accepted
    state.json                                             {"models": {name: {"desired", "version"}}} last good

Every writer goes through :func:`write_atomic` (temp file, fsync, rename, fsync of the folder), so a power cut
leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeloop_core.contract import ArtifactLayout, FileRef, Manifest, verify_file
from edgeloop_core.errors import CacheFull, ConfigError, DigestMismatch, EdgeloopError, StoreError, StoreUnavailable
from edgeloop_core.files import no_space_is_cache_full, place, write_atomic

if TYPE_CHECKING:
    from edgeloop_core.contract.captures import CapturePolicy
    from edgeloop_core.store import ObjectStore

log = logging.getLogger(__name__)
_CHUNK_BYTES = 64 << 10
"""One read of a download's body: each counts as progress (liveness), so it must arrive well within
``liveness_timeout_s`` even on a slow link (64 KiB in 1,800 s is 36 bytes/s)."""
_HEADROOM_BYTES = 16 << 20
"""Free disk left after a download: SQLite (the outbox) and the engine build need room to write too."""
POINTER_CAPTURE_FILE = "pointer-capture.json"
"""Under the cache root: each model's field-capture policy from the channel pointer this device last accepted for
it (only models whose pointer carries one), read by the desired state (:mod:`edge_runtime.fetch.desired`)."""
RECORD_SUFFIX = ".record.json"
"""Next to each engine: the sha256 it had when it was built or verified, re-checked before every load."""


def _transient_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    return StoreError, BotoCoreError, HTTPError, ConnectionError, TimeoutError



def load_pointer_captures(root: Path) -> dict[str, Any]:
    """Model → capture policy (as JSON) recorded from accepted channel pointers under cache root ``root``; ``{}``
    when none was recorded or the file does not read."""
    try:
        data = json.loads((Path(root) / POINTER_CAPTURE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


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
                with no_space_is_cache_full(dest), open(part, "ab") as fh:
                    for chunk in body.iter_chunks(_CHUNK_BYTES):
                        fh.write(chunk)
                        if on_chunk is not None:
                            on_chunk(len(chunk))
                    fh.flush()
                    os.fsync(fh.fileno())
            try:
                verify_file(part, ref)
            except DigestMismatch:
                part.unlink(missing_ok=True)
                raise
            place(part, dest)
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
        self._records = threading.RLock()
        self._progress: dict[str, float] = {}
        """Model name → when (``time.monotonic()``) its last download chunk arrived or engine build step ended."""
        """Several models' life cycles share this cache: one read-modify-write of state.json/channels.json (and
        one eviction) at a time."""
        try:
            with no_space_is_cache_full(self.root):
                self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the cache folder {self.root}: {exc.strerror} (set EDGE_CACHE_DIR to a "
                              f"writable folder)") from exc

    def note_progress(self, name: str) -> None:
        """Model ``name``'s download or build moved on just now (liveness counts it as life)."""
        self._progress[name] = time.monotonic()

    def progress_at(self, name: str) -> float:
        """When (``time.monotonic()``, seconds) model ``name``'s work last moved on; 0.0 when it never did."""
        return self._progress.get(name, 0.0)

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
        """Make every file in ``refs`` present and verified; returns ``(paths by file, bytes downloaded)``. Every
        chunk that arrives is progress for ``manifest.name`` (:meth:`note_progress`), then goes to ``on_chunk``."""
        directory = self.version_dir(manifest.name, manifest.version)
        paths, downloaded = {}, 0

        def arrived(nbytes: int) -> None:
            self.note_progress(manifest.name)
            if on_chunk is not None:
                on_chunk(nbytes)

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
                               attempts=attempts, on_chunk=arrived)
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

    def reserve(self, manifest: Manifest, refs: list[FileRef], keep: set[tuple[str, str]]) -> int:
        """Make room for the files in ``refs`` that are not here yet, before downloading them.

        Evicts least recently used versions (never ``keep``) until the download fits under ``max_bytes``, then
        checks the disk itself. Raises :class:`CacheFull` with the figures when it cannot fit: nothing is
        downloaded, the serving version is untouched, and the next cycle tries again (space may be freed
        meanwhile). Returns the bytes still to download.
        """
        directory = self.version_dir(manifest.name, manifest.version)
        needed = 0
        for ref in refs:
            dest, part = directory / ref.file, directory / (ref.file + ".part")
            if dest.exists() and dest.stat().st_size == ref.size_bytes:
                continue
            needed += ref.size_bytes - (part.stat().st_size if part.exists() else 0)
        if needed <= 0:
            return 0
        if self.size_bytes() + needed > self.max_bytes:
            self.evict(keep, target_bytes=max(0, self.max_bytes - needed))
        used = self.size_bytes()
        if used + needed > self.max_bytes:
            raise CacheFull(
                f"{manifest.name}/{manifest.version} needs {needed / 2**20:.1f} MiB more, but the cache holds "
                f"{used / 2**20:.1f} MiB of its {self.max_bytes / 2**20:.1f} MiB cap in versions it must keep or "
                f"other files: free space under {self.root} or raise EDGE_CACHE_MAX_BYTES")
        free = shutil.disk_usage(self.root).free
        if needed + _HEADROOM_BYTES > free:
            raise CacheFull(
                f"{manifest.name}/{manifest.version} needs {needed / 2**20:.1f} MiB plus "
                f"{_HEADROOM_BYTES / 2**20:.0f} MiB of headroom (the outbox and engine builds write too), but the "
                f"disk under {self.root} has {free / 2**20:.1f} MiB free: free space on the device")
        return needed

    def sweep_temporary(self) -> list[Path]:
        """Remove temporary files a killed process left behind (``.tmp``, ``.build-*``); ``.part`` files stay, they
        resume downloads. Call at start-up, before anything writes."""
        removed = []
        for path in self.root.rglob(".*"):
            if path.is_file() and (path.name.endswith(".tmp") or path.name.startswith(".build-")):
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def quarantine(self, path: Path, reason: str) -> Path:
        """Set a bad engine (and its digest record) aside with the reason, so it is never loaded again."""
        folder = self.root / "quarantine"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{path.parent.name}-{path.name}"
        os.replace(path, target)
        record = path.with_name(path.name + RECORD_SUFFIX)
        if record.exists():
            record.unlink()
        write_atomic(target.with_name(target.name + ".reason"), reason.encode())
        log.warning("quarantined %s: %s", path, reason)
        return target

    def load_sequences(self) -> dict[str, int]:
        """The highest channel-pointer sequence accepted so far, by ``<name>/<channel>``."""
        try:
            data = json.loads((self.root / "channels.json").read_text())
            return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except (OSError, ValueError, TypeError):
            return {}

    def record_sequence(self, name: str, channel: str, sequence: int) -> None:
        """Remember that ``name``'s ``channel`` reached ``sequence`` (never lowered)."""
        with self._records:
            sequences = self.load_sequences()
            key = f"{name}/{channel}"
            if sequence > sequences.get(key, 0):
                sequences[key] = sequence
                write_atomic(self.root / "channels.json", json.dumps(sequences, sort_keys=True).encode())

    def record_pointer_capture(self, name: str, capture: CapturePolicy | None) -> None:
        """Remember the capture policy of the pointer just accepted for model ``name`` (``None``: it carries none,
        or ``name`` is pinned to a version); written only when it changed. Call it only with a verified pointer's
        policy: what it records switches capture on."""
        with self._records:
            policies = load_pointer_captures(self.root)
            wanted = capture.model_dump(mode="json") if capture is not None else None
            if policies.get(name) == wanted:
                return
            if wanted is None:
                policies.pop(name, None)
            else:
                policies[name] = wanted
            write_atomic(self.root / POINTER_CAPTURE_FILE, json.dumps(policies, sort_keys=True).encode())
            log.info("capture policy from the channel pointer of %s: %s", name,
                     "none" if capture is None else capture.model_dump_json(exclude_defaults=True))

    def save_state(self, name: str, state: dict[str, Any]) -> None:
        """Remember what serves for model ``name`` (its last good version), for a restart without network."""
        with self._records:
            models = self._states()
            models[name] = state
            write_atomic(self.root / "state.json", json.dumps({"models": models}, sort_keys=True).encode())

    def load_state(self, name: str) -> dict[str, Any] | None:
        """What :meth:`save_state` wrote last for model ``name``."""
        return self._states().get(name)

    def _states(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads((self.root / "state.json").read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        if isinstance(data.get("name"), str):  # written before several models: {"name", "desired", "version"}
            return {data["name"]: {k: v for k, v in data.items() if k != "name"}}
        models = data.get("models")
        return {str(k): v for k, v in models.items() if isinstance(v, dict)} if isinstance(models, dict) else {}

    def size_bytes(self) -> int:
        """Bytes under the cache root (files another life cycle renames or removes meanwhile are skipped)."""
        total = 0
        for path in self.root.rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file():
                    total += path.stat().st_size
        return total

    def evict(self, keep: set[tuple[str, str]], target_bytes: int | None = None) -> list[tuple[str, str]]:
        """Remove least recently used versions (artifacts and engines) until under ``target_bytes`` (default: the
        cap); never ``keep``."""
        target = self.max_bytes if target_bytes is None else target_bytes
        removed: list[tuple[str, str]] = []
        with self._records:
            versions = []
            for d in (self.root / "artifacts").glob("*/*"):
                with contextlib.suppress(OSError):
                    if d.is_dir():
                        versions.append((d.stat().st_mtime, d.parent.name, d.name))
            for _, name, version in sorted(versions):
                if self.size_bytes() <= target:
                    break
                if (name, version) in keep:
                    continue
                shutil.rmtree(self.version_dir(name, version), ignore_errors=True)
                shutil.rmtree(self.root / "engines" / name / version, ignore_errors=True)
                removed.append((name, version))
        return removed
