"""Compiling for a Kubeflow cluster, and the recurring-run upsert."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import yaml
from kfp import components

from edgeloop_core.errors import ConfigError
from pipelines.cluster import compile_pipeline, kfp_cron, upsert_recurring_run
from pipelines.local_run import parse_parameters


def test_compiled_yaml_loads_back_with_kfp(tmp_path):
    path = compile_pipeline(tmp_path / "pipeline.yaml")
    loaded = components.load_component_from_file(str(path))
    assert loaded.name == "edgeloop-retraining"
    inputs = loaded.component_spec.inputs
    assert {"data_uri", "arch", "epochs", "prune_keep_fraction", "tolerance_points", "bucket", "prefix",
            "channel", "force_retrain"} <= set(inputs)
    assert inputs["tolerance_points"].default == 1.0
    spec = yaml.safe_load(path.read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert {"exec-train", "exec-prune", "exec-qat", "exec-export", "exec-evaluate", "exec-publish"} <= set(executors)
    assert all(e["container"]["image"].startswith("ghcr.io/edgeloop/") for e in executors.values())


def test_parameters_are_typed_and_checked():
    assert parse_parameters(["epochs=5", "force-retrain=true", "lr=0.01", "arch=vit"]) == {
        "epochs": 5, "force_retrain": True, "lr": 0.01, "arch": "vit"}
    for bad in (["epochs=five"], ["nonsense=1"], ["epochs"], ["force_retrain=maybe"]):
        with pytest.raises(ConfigError):
            parse_parameters(bad)


def test_cron_gets_kfp_seconds_field():
    assert kfp_cron("0 3 * * 1") == "0 0 3 * * 1"
    assert kfp_cron("30 0 3 * * 1") == "30 0 3 * * 1"
    with pytest.raises(ConfigError):
        kfp_cron("every monday")


@dataclass
class RecurringRunsDouble:
    """A small stand-in for kfp.Client's recurring-run calls: there is no KFP API server on this machine.

    It keeps the shapes kfp 2.x returns (``experiment_id``, ``recurring_runs``, ``next_page_token``,
    ``recurring_run_id``, ``display_name``) and pages by two to exercise paging.
    """

    runs: dict[str, SimpleNamespace] = field(default_factory=dict)
    created: list[dict] = field(default_factory=list)

    def create_experiment(self, name, description=None, namespace=None):
        return SimpleNamespace(experiment_id=f"exp-{name}")

    def list_recurring_runs(self, experiment_id, page_size, page_token=""):
        items = sorted(self.runs.values(), key=lambda r: r.recurring_run_id)
        start = int(page_token or 0)
        page = items[start : start + 2]
        more = start + 2 < len(items)
        return SimpleNamespace(recurring_runs=page or None, next_page_token=str(start + 2) if more else "")

    def delete_recurring_run(self, recurring_run_id):
        del self.runs[recurring_run_id]

    def create_recurring_run(self, **kwargs):
        run = SimpleNamespace(recurring_run_id=f"rr-{len(self.created)}", display_name=kwargs["job_name"])
        self.runs[run.recurring_run_id] = run
        with open(kwargs["pipeline_package_path"]) as fh:  # the package exists while the call is made
            kwargs["pipeline_name"] = yaml.safe_load(fh)["pipelineInfo"]["name"]
        self.created.append(kwargs)
        return run


def test_schedule_creates_then_updates_without_duplicates():
    client = RecurringRunsDouble()
    for i in range(3):
        other = f"other-{i}"
        client.runs[other] = SimpleNamespace(recurring_run_id=other, display_name=other)
    upsert_recurring_run(client, name="nightly", cron="0 3 * * *", parameters={"epochs": 5})
    upsert_recurring_run(client, name="nightly", cron="0 4 * * *", parameters={"epochs": 8})
    nightly = [r for r in client.runs.values() if r.display_name == "nightly"]
    assert len(nightly) == 1 and len(client.runs) == 4
    latest = client.created[-1]
    assert latest["cron_expression"] == "0 0 4 * * *" and latest["params"] == {"epochs": 8}
    assert latest["max_concurrency"] == 1 and latest["no_catchup"] is True
    assert latest["pipeline_name"] == "edgeloop-retraining"


def test_cluster_wiring_secrets_and_gpus(tmp_path):
    path = compile_pipeline(tmp_path / "p.yaml", s3_secret="edgeloop-s3", signing_secret="edgeloop-signing",
                            train_gpus=1)
    spec, platform = yaml.safe_load_all(path.read_text())
    executors = spec["deploymentSpec"]["executors"]
    for step in ("exec-train", "exec-prune", "exec-qat"):
        assert executors[step]["container"]["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert "resources" not in executors["exec-export"]["container"]
    kube = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in ("exec-load-data", "exec-plan", "exec-publish"):
        env = {k["envVar"] for s in kube[step]["secretAsEnv"] for k in s["keyToEnv"]}
        assert env == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert kube[step]["secretAsEnv"][0]["secretName"] == "edgeloop-s3"
    assert kube["exec-publish"]["secretAsVolume"][0]["mountPath"] == "/etc/edgeloop/signing"
    publish_env = {e["name"]: e["value"] for e in executors["exec-publish"]["container"].get("env", [])}
    assert publish_env["EDGELOOP_SIGNING_KEY_FILE"] == "/etc/edgeloop/signing/signing-key.pem"
    assert components.load_component_from_file(str(path)).name == "edgeloop-retraining"
