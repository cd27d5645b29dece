"""The same pipeline on a Kubeflow Pipelines cluster: compile to YAML, submit a run, upsert a recurring run."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgeloop_core.errors import ConfigError

if TYPE_CHECKING:
    import kfp


def compile_pipeline(output: str | Path, **cluster: str | int | None) -> Path:
    """Write the pipeline's IR YAML (what the KFP UI, ``kfp run`` and ``Client`` upload).

    ``cluster`` takes :func:`pipelines.retraining.build_pipeline`'s options (``s3_secret``, ``signing_secret``,
    ``train_gpus``).
    """
    from kfp import compiler

    from pipelines.retraining import build_pipeline

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(**cluster), package_path=str(output))
    return output


def kfp_cron(expression: str) -> str:
    """KFP wants six cron fields (seconds first); accept the usual five and prepend ``0``."""
    fields = expression.split()
    if len(fields) == 5:
        return "0 " + expression.strip()
    if len(fields) == 6:
        return expression.strip()
    raise ConfigError(f"--cron needs 5 (or 6, seconds first) fields, got {expression!r}")


class RecurringRunClient(Protocol):
    """The part of ``kfp.Client`` that :func:`upsert_recurring_run` uses."""

    def create_experiment(self, name: str, description: str | None = ..., namespace: str | None = ...) -> Any: ...  # noqa: ANN401 - untyped kfp models
    def list_recurring_runs(self, **kwargs: Any) -> Any: ...  # noqa: ANN401 - untyped kfp models
    def delete_recurring_run(self, recurring_run_id: str) -> Any: ...  # noqa: ANN401 - untyped kfp models
    def create_recurring_run(self, **kwargs: Any) -> Any: ...  # noqa: ANN401 - untyped kfp models


def upsert_recurring_run(
    client: RecurringRunClient,
    *,
    name: str,
    cron: str,
    parameters: dict[str, Any],
    experiment: str = "edgeloop",
    namespace: str | None = None,
    max_concurrency: int = 1,
    cluster: dict[str, Any] | None = None,
) -> Any:  # noqa: ANN401 - untyped kfp models
    """Create the recurring run ``name``, replacing an existing one of that name (never a duplicate).

    KFP cannot edit a recurring run's spec in place, so an existing one is deleted and created again with the
    new cron, parameters and pipeline package; no catch-up runs are scheduled for the gap.
    """
    exp = client.create_experiment(name=experiment, namespace=namespace)
    experiment_id = exp.experiment_id
    existing, token = [], ""
    while True:
        page = client.list_recurring_runs(experiment_id=experiment_id, page_size=100, page_token=token)
        existing.extend(r for r in (page.recurring_runs or []) if r.display_name == name)
        token = page.next_page_token or ""
        if not token:
            break
    for run in existing:
        client.delete_recurring_run(run.recurring_run_id)
    with tempfile.TemporaryDirectory(prefix="edgeloop-kfp-") as tmp:
        package = compile_pipeline(Path(tmp) / "pipeline.yaml", **(cluster or {}))
        return client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=name,
            description="edgeloop scheduled retraining",
            cron_expression=kfp_cron(cron),
            max_concurrency=max_concurrency,
            no_catchup=True,
            pipeline_package_path=str(package),
            params=parameters,
            enabled=True,
        )


def connect(host: str, namespace: str | None = None) -> kfp.Client:
    """A ``kfp.Client`` for ``host`` (auth from the environment as kfp does: KF_PIPELINES_SA_TOKEN_PATH etc.)."""
    import kfp

    return kfp.Client(host=host, namespace=namespace)


def submit_run(host: str, parameters: dict[str, Any], *, experiment: str = "edgeloop", run_name: str | None = None,
               namespace: str | None = None, cluster: dict[str, Any] | None = None) -> str:
    """Submit one run to the cluster at ``host``; returns the run id."""
    from pipelines.retraining import build_pipeline

    client = connect(host, namespace)
    result = client.create_run_from_pipeline_func(
        build_pipeline(**(cluster or {})), arguments=parameters, experiment_name=experiment, run_name=run_name,
        namespace=namespace,
    )
    return str(result.run_id)
