"""The engine provider: the one place that decides which engine file is loaded, and trusts none because it exists.

For a plan it looks, in order, at the local cache, a prebuilt engine the signed manifest lists, an engine an
identical device shared (only with a valid signature by a fleet build key this device trusts), and otherwise
builds one here. Whatever the source, the file's sha256 is recorded when it arrives (``<engine>.record.json``) and
checked again before every load; an engine whose digest differs, that does not load, or that the caller reports as
failing validation is set aside in ``quarantine/`` with the reason and rebuilt from the verified ONNX file.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, ValidationError

from edge_runtime.build.engines.base import Engine
from edge_runtime.build.engines.select import EnginePlan, build_engine
from edge_runtime.fetch.cache import RECORD_SUFFIX, ArtifactCache, download_resumable
from edgeloop_core.contract import ArtifactLayout, EngineRef, Manifest, Signature, sha256_file
from edgeloop_core.contract.signing import check_signature, make_signature
from edgeloop_core.errors import ContractError, EdgeloopError, EngineError
from edgeloop_core.files import write_atomic

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from edgeloop_core.store import ObjectStore

log = logging.getLogger(__name__)


class SharedEngineRecord(BaseModel):
    """What a device that shares an engine vouches for, signed with the fleet build key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    variant: str
    target_key: str
    file: str
    sha256: str
    size_bytes: int
    built_by: str = ""
    built_at: datetime | None = None
    signature: Signature | None = None

    def canonical_bytes(self) -> bytes:
        """What is signed: sorted-key compact JSON of every field except ``signature``."""
        return json.dumps(self.model_dump(mode="json", exclude={"signature"}), sort_keys=True,
                          separators=(",", ":")).encode()


class EngineProvider:
    """See the module docstring. Runs in a worker thread (blocking I/O and builds)."""

    def __init__(self, cache: ArtifactCache, store: ObjectStore, layout: ArtifactLayout, *, device_id: str,
                 max_batch_size: int, share: bool = False, fetch_attempts: int = 8,
                 fleet_keys: list[Ed25519PublicKey] | None = None,
                 fleet_signing_key: Ed25519PrivateKey | None = None, ort_threads: int = 0,
                 ort_spin: bool | None = None) -> None:
        self.ort_threads, self.ort_spin = ort_threads, ort_spin
        self.cache, self.store, self.layout = cache, store, layout
        self.device_id = device_id
        self.max_batch_size = max_batch_size
        self.share = share
        self.fetch_attempts = fetch_attempts
        self.fleet_keys = fleet_keys or []
        self.fleet_signing_key = fleet_signing_key
        self._build_lock = threading.Lock()
        """One engine built or loaded at a time on this device, whichever model asks: a TensorRT build takes the GPU
        and gigabytes of shared memory on a Jetson, and a load's memory is measured alone. Downloads (a prebuilt or
        shared engine) run outside it, so a slow S3 holds up no other model."""

    # --- where the engine file lives ---------------------------------------------------------------------------
    def path(self, manifest: Manifest, plan: EnginePlan) -> Path:
        """The cache path of the engine for ``plan``."""
        return self.cache.engine_path(manifest.name, manifest.version, str(plan.target_key), plan.engine_file)

    @staticmethod
    def _record_path(path: Path) -> Path:
        return path.with_name(path.name + RECORD_SUFFIX)

    def _record(self, path: Path, source: str) -> None:
        digest, size = sha256_file(path)
        write_atomic(self._record_path(path), json.dumps({"sha256": digest, "size_bytes": size, "source": source,
                                                          "recorded_at": datetime.now(timezone.utc).isoformat()}
                                                         ).encode())

    def recorded_memory(self, manifest: Manifest, plan: EnginePlan) -> int | None:
        """The memory the engine for ``plan`` held when it was last loaded here (``None``: never loaded)."""
        try:
            value = json.loads(self._record_path(self.path(manifest, plan)).read_text()).get("memory_bytes")
        except (OSError, ValueError, AttributeError):
            return None
        return int(value) if isinstance(value, int) and value >= 0 else None

    def record_memory(self, manifest: Manifest, plan: EnginePlan, nbytes: int) -> None:
        """Remember what the engine for ``plan`` holds once loaded, next to its digest."""
        record_path = self._record_path(self.path(manifest, plan))
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            return  # no record: the engine is not trusted, so its figure is not kept either
        if isinstance(record, dict) and record.get("memory_bytes") != nbytes:
            write_atomic(record_path, json.dumps({**record, "memory_bytes": int(nbytes)}).encode())

    def _intact(self, path: Path) -> str:
        """Empty when ``path`` still has the digest recorded for it; else why not."""
        try:
            record = json.loads(self._record_path(path).read_text())
        except (OSError, ValueError):
            return "no digest was recorded for it"
        digest, size = sha256_file(path)
        if size != record.get("size_bytes") or digest != record.get("sha256"):
            return f"its sha256 {digest[:12]}… ({size} bytes) differs from the one recorded when it arrived"
        return ""

    def quarantine(self, manifest: Manifest, plan: EnginePlan, reason: str) -> None:
        """Set the cached engine for ``plan`` aside (it failed validation, say) so the next call rebuilds it."""
        path = self.path(manifest, plan)
        if path.exists():
            self.cache.quarantine(path, reason)

    # --- obtaining one -------------------------------------------------------------------------------------------
    def obtain(self, manifest: Manifest, plan: EnginePlan, model_path: Path, *,
               local_only: bool = False, max_batch_size: int | None = None) -> tuple[Engine, str, list[str]]:
        """``(engine, source, notes)``: ``source`` is cache, manifest, shared or built; ``notes`` says what was set
        aside on the way (quarantined engines, refused shared ones). ``local_only`` skips prebuilt and shared
        engines (after one of them failed validation, only an engine built here is tried). ``max_batch_size``:
        the model's own cap (default: the device's)."""
        return self._obtain(manifest, plan, model_path, local_only, max_batch_size or self.max_batch_size)

    def _obtain(self, manifest: Manifest, plan: EnginePlan, model_path: Path, local_only: bool,
                batch: int) -> tuple[Engine, str, list[str]]:
        path, notes = self.path(manifest, plan), []
        if path.exists():
            problem = self._intact(path)
            if not problem:
                try:
                    return self._load(plan, model_path, path, batch), "cache", notes
                except EngineError as exc:
                    problem = f"it does not load: {exc}"
            self.cache.quarantine(path, problem)
            notes.append(f"cached engine set aside: {problem}")
        source = "" if local_only else (self._fetch_prebuilt(manifest, plan, path, notes)
                                        or self._fetch_shared(manifest, plan, path, notes))
        if source:
            try:
                return self._load(plan, model_path, path, batch), source, notes
            except EngineError as exc:
                self.cache.quarantine(path, f"{source} engine does not load: {exc}")
                notes.append(f"{source} engine set aside: it does not load ({exc})")
        timing = self.cache.root / "engines" / "timing" / plan.timing_cache_file if plan.backend == "tensorrt" else None
        with self._build_lock:
            self.cache.note_progress(manifest.name)  # the wait for the lock is over: the build starts
            engine, _ = build_engine(plan, model_path, path, max_batch_size=batch, timing_cache=timing,
                                     ort_threads=self.ort_threads, ort_spin=self.ort_spin)
        self.cache.note_progress(manifest.name)  # a build step finished: liveness counts it as life
        notes.extend(f"TensorRT: {m}" for m in getattr(engine, "build_messages", []))
        self._record(path, "built")
        if self.share:
            self._share(manifest, plan, path)
        return engine, "built", notes

    def _load(self, plan: EnginePlan, model_path: Path, path: Path, max_batch_size: int) -> Engine:
        with self._build_lock:
            engine, built = build_engine(plan, model_path, path, max_batch_size=max_batch_size,
                                         ort_threads=self.ort_threads, ort_spin=self.ort_spin)
        assert not built  # the file exists: this only loads
        return engine

    def _fetch_prebuilt(self, manifest: Manifest, plan: EnginePlan, path: Path, notes: list[str]) -> str:
        """A prebuilt engine the signed manifest lists for this target key and variant (its sha256 is signed)."""
        ref = manifest.engine_for(str(plan.target_key), plan.variant.name)
        if ref is None or Path(ref.file).name != plan.engine_file:
            return ""
        try:
            download_resumable(self.store, self.layout.file_key(manifest.name, manifest.version, ref.file), path, ref,
                               attempts=self.fetch_attempts, on_chunk=lambda _: self.cache.note_progress(manifest.name))
        except EdgeloopError as exc:
            notes.append(f"prebuilt engine not used: {exc}")
            return ""
        self._record(path, "manifest")
        return "manifest"

    def _fetch_shared(self, manifest: Manifest, plan: EnginePlan, path: Path, notes: list[str]) -> str:
        """An engine an identical device shared, only with a valid fleet-key signature naming exactly this
        model, version, variant and target key."""
        if not self.share or not self.fleet_keys:
            return ""
        target = str(plan.target_key)
        record_key = self.layout.engine_key(manifest.name, manifest.version, target, plan.record_file)
        try:
            record = SharedEngineRecord.model_validate_json(self.store.get_bytes(record_key))
            check_signature(record.signature, record.canonical_bytes(), self.fleet_keys,
                            f"shared engine {manifest.name}/{manifest.version}/{target}/{plan.variant.name}")
            wanted = (manifest.name, manifest.version, plan.variant.name, target, plan.engine_file)
            if (record.name, record.version, record.variant, record.target_key, record.file) != wanted:
                raise ContractError(f"the shared engine's record describes {record.name}/{record.version}/"
                                    f"{record.variant} on {record.target_key}, not this engine")
            ref = EngineRef(file=f"engines/{target}/{plan.engine_file}", sha256=record.sha256,
                            size_bytes=record.size_bytes, built_by=record.built_by)
            download_resumable(self.store, self.layout.engine_key(manifest.name, manifest.version, target,
                                                                  plan.engine_file), path, ref,
                               attempts=self.fetch_attempts, on_chunk=lambda _: self.cache.note_progress(manifest.name))
        except ValidationError as exc:
            notes.append(f"shared engine refused: its record is not valid ({exc.errors()[0]['msg']})")
            return ""
        except EdgeloopError as exc:
            if "does not exist" not in str(exc):
                notes.append(f"shared engine refused: {exc}")
            return ""
        self._record(path, "shared")
        return "shared"

    def _share(self, manifest: Manifest, plan: EnginePlan, path: Path) -> None:
        """Upload an engine built here with a record signed by the fleet build key (no key: nothing shared)."""
        if self.fleet_signing_key is None:
            log.warning("share_engines is on but no engine_signing_key_file is set: not sharing %s", path.name)
            return
        target = str(plan.target_key)
        digest, size = sha256_file(path)
        record = SharedEngineRecord(name=manifest.name, version=manifest.version, variant=plan.variant.name,
                                    target_key=target, file=plan.engine_file, sha256=digest, size_bytes=size,
                                    built_by=self.device_id, built_at=datetime.now(timezone.utc))
        record = record.model_copy(update={"signature": make_signature(self.fleet_signing_key,
                                                                       record.canonical_bytes())})
        try:
            self.store.put_file(self.layout.engine_key(manifest.name, manifest.version, target, plan.engine_file),
                                path)
            self.store.put_bytes(self.layout.engine_key(manifest.name, manifest.version, target, plan.record_file),
                                 record.model_dump_json().encode(), content_type="application/json")
        except EdgeloopError as exc:  # sharing is a courtesy: this device serves regardless
            log.warning("could not share the engine for %s: %s", target, exc)
