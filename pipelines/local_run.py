"""Run the retraining pipeline on this machine through ``kfp.local`` and collect what it produced."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeloop_core.contract import Manifest
from edgeloop_core.errors import ConfigError, PipelineFailed

if TYPE_CHECKING:
    from kfp.dsl.graph_component import GraphComponent


@dataclass
class LocalRunResult:
    """What a local run left behind (paths under its own pipeline root)."""

    run_dir: Path
    log_path: Path | None
    decision: str
    version: str | None
    manifest: Manifest | None
    evaluation_path: Path | None
    reason: str = ""
    """Why the plan decided as it did (one line)."""

    def evaluation(self):  # noqa: ANN201 - avoids importing the cloud side at module import
        """The evaluation of every variant, when the run trained."""
        from components.evaluate import Evaluation

        return Evaluation.load(self.evaluation_path) if self.evaluation_path else None


def pipeline_parameters(pipeline: GraphComponent | None = None) -> dict[str, inspect.Parameter]:
    """A pipeline's parameters (the retraining pipeline by default) with their defaults and types, by name."""
    from pipelines.retraining import retraining_pipeline

    return dict(inspect.signature((pipeline or retraining_pipeline).pipeline_func).parameters)


def parse_parameters(pairs: list[str], pipeline: GraphComponent | None = None) -> dict[str, Any]:
    """``["epochs=5", "force_retrain=true"]`` → typed values; unknown names and bad values are a ConfigError."""
    known = pipeline_parameters(pipeline)
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep:
            raise ConfigError(f"--param expects NAME=VALUE, got {pair!r}")
        if name not in known:
            raise ConfigError(f"unknown pipeline parameter {name!r}; known: {', '.join(sorted(known))}")
        kind = known[name].annotation
        try:
            if kind is bool or kind == "bool":
                lowered = raw.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                values[name] = lowered in ("true", "1", "yes")
            elif kind is int or kind == "int":
                values[name] = int(raw)
            elif kind is float or kind == "float":
                values[name] = float(raw)
            else:
                values[name] = raw
        except ValueError:
            raise ConfigError(f"parameter {name}: {raw!r} is not a valid {getattr(kind, '__name__', kind)}") from None
    return values


@contextlib.contextmanager
def _output_to(log_path: Path | None) -> Iterator[None]:
    """Send this process's stdout/stderr (and its children's) to ``log_path`` for the duration."""
    if log_path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    with open(log_path, "ab") as log, open(log_path, "a", buffering=1, encoding="utf-8") as text:
        os.dup2(log.fileno(), 1)  # child processes
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = text  # this process, even where sys.stdout is not fd 1 (pytest, notebooks)
        try:
            yield
        finally:
            text.flush()
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _one(run_dir: Path, pattern: str) -> Path | None:
    found = sorted(run_dir.glob(pattern))
    return found[-1] if found else None


def _failure_reason(log_path: Path | None) -> str:
    """The last exception line a component printed (``SomeError: message``), without the module path."""
    if log_path is None or not log_path.exists():
        return ""
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        head, sep, message = line.strip().partition(": ")
        if sep and head.rsplit(".", 1)[-1].endswith(("Error", "Exception", "Failed", "Invalid", "Exists", "Mismatch",
                                                      "Refused", "Full")):
            return _plain(f"{head.rsplit('.', 1)[-1]}: {message}")
    return ""


def _plain(text: str) -> str:
    """``text`` without terminal colour codes (kfp colours task names in its messages)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def run_local(
    parameters: dict[str, Any], *, runs_dir: str | Path = ".edgeloop/runs", log_to_file: bool = True,
    pipeline: GraphComponent | None = None,
) -> LocalRunResult:
    """Run the pipeline through ``kfp.local`` (SubprocessRunner in this environment) with its own pipeline root.

    Components inherit this process's environment: S3 credentials, ``AWS_ENDPOINT_URL_S3`` and the signing key
    variables. Raises :class:`PipelineFailed` when a task fails (the quality gate included).
    """
    from kfp import local

    from pipelines.retraining import retraining_pipeline

    pipeline = pipeline or retraining_pipeline

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    run_dir = Path(runs_dir).resolve() / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "pipeline.log" if log_to_file else None
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(run_dir), raise_on_error=True)
    try:
        with _output_to(log_path), warnings.catch_warnings():
            # kfp warns that the component image is not a Python image; locally we run in this environment on purpose
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            pipeline(**parameters)
    except Exception as exc:  # kfp.local raises RuntimeError; a failed task may surface as other errors
        reason = _failure_reason(log_path) or _plain(str(exc).splitlines()[0])
        raise PipelineFailed(f"pipeline failed: {reason}", log_path) from exc
    plan_output = _one(run_dir, "*/plan/executor_output.json")
    decision = json.loads(plan_output.read_text())["parameterValues"]["Output"] if plan_output else "train"
    plan_info = _one(run_dir, "*/plan/plan_info")
    reason = str(json.loads(plan_info.read_text()).get("reason", "")) if plan_info else ""
    manifest_path = _one(run_dir, "*/publish*/manifest")
    manifest = Manifest.from_json(manifest_path.read_text()) if manifest_path else None
    return LocalRunResult(
        run_dir=run_dir,
        log_path=log_path,
        decision=decision,
        version=manifest.version if manifest else None,
        manifest=manifest,
        evaluation_path=_one(run_dir, "*/evaluate/evaluation"),
        reason=reason,
    )
