"""One model's versions in the supervised tritonserver's repository (``serving_engine`` triton).

An engine that passed validation on the device enters Triton as a candidate under another name
(:data:`~edge_runtime.serve.triton.dataplane.CANDIDATE_SUFFIX`) and is validated again through Triton's own front
end; only then is it written as the model's next version and loaded (Triton swaps versions once the new one loaded;
the old one serves until then, and stays when the load fails). The reconciler decides what passed and what is
reported; this room writes the files and makes the calls.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_runtime.build.engines.onnxruntime import intra_op_threads, spins
from edge_runtime.serve.triton.dataplane import (
    CANDIDATE_SUFFIX,
    TritonEngine,
    TritonServer,
    next_version_number,
    prune_versions,
    remove_model,
    write_model,
)
from edgeloop_core.errors import EdgeloopError, EngineError
from edgeloop_core.files import write_atomic

if TYPE_CHECKING:
    from edge_runtime.build.engines.base import Engine, TensorInfo
    from edge_runtime.validate import ValidationResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TritonCandidate:
    """An engine to hand to Triton: what :func:`~edge_runtime.serve.triton.dataplane.write_model` writes for it, and
    the memory it held when it was loaded on the device (bytes)."""

    engine_path: Path
    platform: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    max_batch_size: int
    max_queue_delay_us: int
    edgeloop_version: str
    variant: str
    threads: int
    spin: bool
    backend: str
    memory_bytes: int = 0

    def files(self) -> dict[str, Any]:
        """The keyword arguments of ``write_model`` (all but the memory figure)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "memory_bytes"}

    def engine(self, server: TritonServer, name: str, *, memory_bytes: int = 0) -> TritonEngine:
        """An engine whose runs go through Triton's model ``name``."""
        return TritonEngine(server, name, max_batch_size=self.max_batch_size, platform=self.platform,
                            memory_bytes=memory_bytes, inputs=self.inputs, outputs=self.outputs)


class TritonModel:
    """Model ``name`` in the supervised tritonserver: a candidate's check, its promotion to the model's next
    version, the reload after tritonserver restarted, and the unload. Blocking: call it from a worker thread."""

    def __init__(self, server: TritonServer, name: str) -> None:
        self.server = server
        self.name = name

    def candidate(self, engine: Engine, engine_path: Path, *, version: str, variant: str, max_batch_size: int,
                  max_queue_delay_us: int, threads: int, spin_wait: bool | None) -> TritonCandidate:
        """What Triton needs to run ``engine`` (read it before the engine is closed: Triton runs it from then on).
        ``threads`` and ``spin_wait`` are the ONNX Runtime settings the builtin engine reads."""
        return TritonCandidate(engine_path, engine.platform, engine.inputs, engine.outputs, max_batch_size,
                               max_queue_delay_us, version, variant, intra_op_threads(threads), spins(spin_wait),
                               self.server.install.ort_backend, int(getattr(engine, "memory_bytes", 0) or 0))

    def validate_candidate(self, candidate: TritonCandidate,
                           check: Callable[[Engine], ValidationResult]) -> ValidationResult:
        """Load ``candidate`` under the candidate name, run ``check`` on it through Triton, and take it out again
        (whatever happened)."""
        staged_name = self.name + CANDIDATE_SUFFIX
        try:
            write_model(self.server.repo, staged_name, 1, **candidate.files())
            self.server.load(staged_name)
            return check(candidate.engine(self.server, staged_name))
        finally:
            try:
                self.server.unload(staged_name)
            except EdgeloopError as exc:
                log.warning("could not unload %s from Triton: %s", staged_name, exc)
            remove_model(self.server.repo, staged_name)

    def promote(self, candidate: TritonCandidate) -> TritonEngine:
        """Write ``candidate`` as the model's next version and load it; once Triton serves it, remove the older
        versions. A failure (a full disk, a load that fails) leaves the repository, and what Triton serves, as it
        was."""
        model_dir = self.server.repo / self.name
        previous = (model_dir / "config.pbtxt").read_text() if (model_dir / "config.pbtxt").exists() else None
        number = next_version_number(model_dir)
        try:
            write_model(self.server.repo, self.name, number, **candidate.files())  # leaves nothing behind on failure
            self.server.load(self.name)
            if not self.server.model_ready(self.name, str(number)):
                raise EngineError(f"Triton loaded {self.name} but version {number} is not ready")
        except BaseException:
            shutil.rmtree(model_dir / str(number), ignore_errors=True)  # Triton keeps serving the old version
            if previous is not None:
                write_atomic(model_dir / "config.pbtxt", previous.encode())
            raise
        prune_versions(self.server.repo, self.name, keep=number)
        served = candidate.engine(self.server, self.name, memory_bytes=candidate.memory_bytes)
        served.version = str(number)
        return served

    def reload(self) -> None:
        """Load the model's last good version again (after tritonserver restarted: it is still on disk)."""
        self.server.load(self.name)

    def unload(self, *, remove: bool = False) -> None:
        """Triton stops serving the model (when tritonserver runs); ``remove`` (it left the desired set): its
        folder goes too."""
        if not self.server.running():
            return
        try:
            self.server.unload(self.name)
        except EdgeloopError as exc:
            log.warning("could not unload %s from Triton: %s", self.name, exc)
        if remove:
            remove_model(self.server.repo, self.name)
