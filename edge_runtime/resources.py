"""The device's shared resources: opened once by :class:`~edge_runtime.repository.ModelRepository`, read by each
model's :class:`~edge_runtime.lifecycle.ModelRuntime`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge_runtime.build.device import DeviceFacts
from edge_runtime.build.engines.provider import EngineProvider
from edge_runtime.build.memory import MemoryBudget
from edge_runtime.fetch.cache import ArtifactCache
from edge_runtime.settings import EdgeSettings
from edgeloop_core.contract import ArtifactLayout, load_signing_key, load_verify_key, load_verify_keys
from edgeloop_core.store import ObjectStore


@dataclass
class DeviceResources:
    """What every model's life cycle on this device shares: one store, one cache with one size cap, one engine
    provider (one build at a time), the trusted keys, and one memory budget."""

    settings: EdgeSettings
    facts: DeviceFacts
    store: ObjectStore
    layout: ArtifactLayout
    cache: ArtifactCache
    trusted: list[Any]
    engines: EngineProvider
    memory: MemoryBudget
    triton: Any = None
    """The supervised :class:`TritonServer` when ``serving_engine`` is ``triton``."""

    @classmethod
    def create(cls, settings: EdgeSettings, facts: DeviceFacts, store: ObjectStore | None = None) -> DeviceResources:
        """Open the cache (sweeping what a killed process left half-written), the store and the keys."""
        store = store or ObjectStore(settings.s3_bucket, endpoint_url=settings.s3_endpoint_url,
                                     connect_timeout_s=settings.s3_connect_timeout_s,
                                     read_timeout_s=settings.s3_read_timeout_s, max_attempts=settings.s3_max_attempts)
        layout = ArtifactLayout(settings.s3_prefix)
        cache = ArtifactCache(settings.cache_dir, settings.cache_max_bytes)
        cache.sweep_temporary()
        engines = EngineProvider(
            cache, store, layout, device_id=settings.device_id, max_batch_size=settings.max_batch_size,
            share=settings.share_engines, fetch_attempts=settings.fetch_attempts,
            fleet_keys=[load_verify_key(settings.engine_verify_key_file)] if settings.engine_verify_key_file else [],
            fleet_signing_key=(load_signing_key(settings.engine_signing_key_file)
                               if settings.engine_signing_key_file else None),
            ort_threads=settings.ort_intra_op_threads, ort_spin=settings.ort_spin_wait)
        triton = None
        if settings.serving_engine == "triton":
            from edge_runtime.serve.triton.dataplane import TritonServer, find_triton

            work = cache.root / "triton"
            install = find_triton(settings.triton_home, settings.triton_python, work, settings.triton_backend)
            triton = TritonServer(install, work / "models",
                                  bind_address=settings.bind_address, grpc_port=settings.grpc_port,
                                  metrics_port=settings.triton_metrics_port, log_path=work / "tritonserver.log")
        return cls(settings, facts, store, layout, cache, load_verify_keys(settings.verify_key_file), engines,
                   MemoryBudget(settings.memory_budget_bytes, settings.memory_reserve_bytes), triton)
