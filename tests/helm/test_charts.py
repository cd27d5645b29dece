"""The Helm charts, checked with the real tools: helm (lint, template), kubernetes-validate (strict, Kubernetes
1.30+) and checkov; and the rule that only a model change restarts the fleet's pods."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHARTS = ROOT / "helm"
HELM = os.environ.get("EDGELOOP_HELM", str(ROOT / ".tools" / "bin" / "helm"))
CHECKOV = os.environ.get("EDGELOOP_CHECKOV", str(ROOT / ".tools" / "checkov" / "bin" / "checkov"))
KUBERNETES_VERSIONS = ("1.30.0", "1.33.0")

# checkov findings we accept, each with the reason it does not apply.
CHECKOV_ACCEPTED = {
    "CKV_K8S_43": "images are referenced by tag so `helm upgrade --set image.tag` works; pin digests in values for "
                  "production",
    "CKV_K8S_15": "IfNotPresent on purpose: a Jetson on a flaky uplink must restart from its local image",
    "CKV_K8S_11": "no CPU limit on purpose: CFS throttling adds inference latency; CPU is requested",
    "CKV2_K8S_6": "edge pods need no NetworkPolicy to run; clusters that enforce policies add their own",
    "CKV_K8S_25": "only the optional cache-ownership init container adds capabilities (CHOWN/FOWNER, after dropping "
                  "ALL) to hand the node's cache folder to the runtime's user; cache.initOwnership: false drops it",
    "CKV_K8S_35": "S3 credentials and the hub URL arrive as env from existing Secrets, the way boto3 and SQLAlchemy "
                  "read them",
    "CKV_K8S_38": "the runtime's service-account token is mounted on purpose: it reads its node's labels and writes "
                  "its node annotations (RBAC: nodes get/patch)",
    "CKV_K8S_26": "hostPort is opt-in (grpc.hostPort) for apps outside the cluster on the same Jetson",
}

EDGE_VALUES = sorted((CHARTS / "edge-runtime" / "ci").glob("*-values.yaml"))
HUB_VALUES = sorted((CHARTS / "telemetry-hub" / "ci").glob("*-values.yaml"))
MATRIX = [("edge-runtime", v) for v in EDGE_VALUES] + [("telemetry-hub", v) for v in HUB_VALUES]


def helm(*args: str) -> str:
    assert Path(HELM).exists() or shutil.which(HELM), f"helm not found at {HELM}: `make test` installs it"
    result = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(chart: str | Path, values: Path | None = None, *sets: str) -> list[dict]:
    args = ["template", "fleet", str(CHARTS / chart if isinstance(chart, str) else chart), "--namespace", "edgeloop"]
    if values is not None:
        args += ["-f", str(values)]
    for item in sets:
        args += ["--set", item]
    return [doc for doc in yaml.safe_load_all(helm(*args)) if doc]


def pod_template(docs: list[dict]) -> dict:
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    return daemonset["spec"]["template"]


@pytest.mark.parametrize(("chart", "values"), MATRIX, ids=[f"{c}:{v.stem}" for c, v in MATRIX])
def test_lint_and_strict_schema_validation(chart, values):
    helm("lint", "--strict", str(CHARTS / chart), "-f", str(values))
    import kubernetes_validate

    docs = render(chart, values)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD kind: no upstream schema
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(("chart", "values"), MATRIX, ids=[f"{c}:{v.stem}" for c, v in MATRIX])
def test_checkov_finds_nothing_beyond_the_accepted_list(chart, values, tmp_path):
    assert Path(CHECKOV).exists(), f"checkov not found at {CHECKOV}: `make test` installs it"
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(render(chart, values)))
    result = subprocess.run(
        [CHECKOV, "-f", str(rendered), "--framework", "kubernetes", "-o", "json", "--quiet", "--compact",
         "--skip-check", ",".join(CHECKOV_ACCEPTED)],
        capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(result.stdout or "{}")
    reports = report if isinstance(report, list) else [report]
    failed = [(c["check_id"], c["resource"]) for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    assert failed == []
    assert sum(r.get("summary", {}).get("passed", 0) for r in reports) > 10


def test_a_model_version_change_reaches_running_pods_in_place():
    before = render("edge-runtime", None, "model.version=v20261124-0001")
    after = render("edge-runtime", None, "model.version=v20261124-0002")
    # no pod restart: the pod template (and so every Jetson's running runtime) stays as it is ...
    assert pod_template(before) == pod_template(after)
    template = pod_template(after)
    assert not any(k.startswith("checksum/") for k in template["metadata"].get("annotations", {}))
    # ... and the new version arrives through the ConfigMap volume, which the kubelet refreshes (no subPath)
    configmaps = {d["metadata"]["name"]: d for d in after if d["kind"] == "ConfigMap"}
    (desired,) = [json.loads(c["data"]["desired.json"]) for c in configmaps.values() if "desired.json" in c["data"]]
    assert desired == {"model_name": "digits-cnn", "model_version": "v20261124-0002"}
    container = template["spec"]["containers"][0]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert "subPath" not in mounts["desired"] and mounts["desired"]["mountPath"] == "/etc/edgeloop/desired"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["EDGE_DESIRED_FILE"] == "/etc/edgeloop/desired/desired.json" and "EDGE_MODEL_VERSION" not in env
    assert container["livenessProbe"]["grpc"]["service"] == "edgeloop.liveness"
    assert container["readinessProbe"]["grpc"]["service"] == "inference.GRPCInferenceService"


def test_tls_and_repository_control_come_from_secrets():
    docs = render("edge-runtime", None, "tls.existingSecret=edge-tls", "tls.mutual=true",
                  "repositoryControl.enabled=true", "repositoryControl.existingSecret=edge-control",
                  "hub.tlsSecret=hub-ca")
    template = pod_template(docs)
    container = template["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["EDGE_TLS_CERT_FILE"]["value"] == "/etc/edgeloop/tls/tls.crt"
    assert env["EDGE_TLS_CLIENT_CA_FILE"]["value"] == "/etc/edgeloop/tls/ca.crt"
    assert env["EDGE_CONTROL_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "edge-control", "key": "token"}
    assert env["EDGE_HUB_TLS_CA_FILE"]["value"] == "/etc/edgeloop/hub-tls/ca.crt"
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "edge-tls"
    assert volumes["hub-tls"]["secret"]["secretName"] == "hub-ca"
    plain = pod_template(render("edge-runtime"))["spec"]["containers"][0]
    assert not {"EDGE_REPOSITORY_CONTROL", "EDGE_TLS_CERT_FILE", "EDGE_HEALTH_PORT",
                "EDGE_CONTROL_CLIENT_NAMES"} & {e["name"] for e in plain["env"]}


@pytest.mark.parametrize("engine", ["builtin", "triton"])
def test_under_tls_the_probes_still_ask_the_health_service(engine):
    """gRPC probes speak no TLS; TCP checks would pass a wedged loop and an unready device, so with TLS the probes
    ask the same grpc.health.v1 answers on the runtime's plaintext health-only port."""
    container = pod_template(render("edge-runtime", None, "tls.existingSecret=edge-tls", "tls.mutual=true",
                                    f"serving.engine={engine}"))["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["EDGE_HEALTH_PORT"] == "8006"
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["health"] == 8006
    assert "hostPort" not in {p["name"]: p for p in container["ports"]}["health"]
    assert container["readinessProbe"] == {"grpc": {"port": 8006, "service": "inference.GRPCInferenceService"},
                                           "periodSeconds": 5, "failureThreshold": 2}
    liveness = container["livenessProbe"]
    assert liveness["grpc"] == {"port": 8006, "service": "edgeloop.liveness"} and "tcpSocket" not in liveness
    (service,) = [d for d in render("edge-runtime", None, "tls.existingSecret=edge-tls") if d["kind"] == "Service"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}  # the Service leaves it out


def test_devices_get_a_client_certificate_for_a_mutual_tls_hub():
    template = pod_template(render("edge-runtime", CHARTS / "edge-runtime" / "ci" / "hub-mtls-values.yaml"))
    container = template["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["EDGE_HUB_TLS_CA_FILE"] == "/etc/edgeloop/hub-tls/ca.crt"
    assert env["EDGE_HUB_TLS_CERT_FILE"] == "/etc/edgeloop/hub-tls/tls.crt"
    assert env["EDGE_HUB_TLS_KEY_FILE"] == "/etc/edgeloop/hub-tls/tls.key"
    assert env["EDGE_CONTROL_CLIENT_NAMES"] == "edge-admin.ops.example"
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["hub-tls"]["secret"]["secretName"] == "edgeloop-hub-client"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["hub-tls"] == {"name": "hub-tls", "mountPath": "/etc/edgeloop/hub-tls", "readOnly": True}
    # a hub with TLS only: the CA alone, no client certificate
    server_only = pod_template(render("edge-runtime", None, "hub.address=hub:50052", "hub.tlsSecret=hub-ca"))
    server_env = {e["name"]: e.get("value") for e in server_only["spec"]["containers"][0]["env"]}
    assert server_env["EDGE_HUB_TLS_CA_FILE"] == "/etc/edgeloop/hub-tls/ca.crt"
    assert not {"EDGE_HUB_TLS_CERT_FILE", "EDGE_HUB_TLS_KEY_FILE"} & set(server_env)
    # the settings the runtime reads are the ones the chart sets: EDGE_HUB_TLS_* become its mutual-TLS HubTls
    from edge_runtime.settings import EdgeSettings

    names = {f"EDGE_{name.upper()}" for name in EdgeSettings.model_fields}
    assert {k for k in env if k.startswith("EDGE_")} <= names
    refused = subprocess.run([HELM, "template", "x", str(CHARTS / "edge-runtime"), "--set",
                              "repositoryControl.clientNames[0]=a\\,b"], capture_output=True, text=True,
                             timeout=60, check=False)
    assert refused.returncode != 0 and "clientNames" in refused.stderr


def test_chart_only_bump_leaves_the_pod_template_unchanged(tmp_path):
    bumped = tmp_path / "edge-runtime"
    shutil.copytree(CHARTS / "edge-runtime", bumped)
    chart = yaml.safe_load((bumped / "Chart.yaml").read_text())
    chart["version"] = "9.9.9"
    (bumped / "Chart.yaml").write_text(yaml.safe_dump(chart))
    original, new = render("edge-runtime"), render(bumped)
    assert pod_template(original) == pod_template(new)  # or every Jetson restarts and rebuilds at once
    assert [d["metadata"]["labels"]["helm.sh/chart"] for d in new][0] == "edge-runtime-9.9.9"


def test_rings_select_differently_labelled_nodes():
    canary = pod_template(render("edge-runtime", None, "ring=canary"))
    stable = pod_template(render("edge-runtime", None, "ring=stable"))
    assert canary["spec"]["nodeSelector"]["edgeloop.io/ring"] == "canary"
    assert stable["spec"]["nodeSelector"]["edgeloop.io/ring"] == "stable"
    assert canary["spec"]["nodeSelector"]["edgeloop.io/device-class"] == "jetson"


def test_several_models_reach_the_runtime_as_one_desired_file():
    """The `models` list becomes the one ConfigMap the runtime reads, in the runtime's own field names; moving one
    model's version changes that model's entry only and restarts no pod."""
    from edge_runtime.fetch.desired import entries_from
    from edge_runtime.settings import ModelEntry

    values = CHARTS / "edge-runtime" / "ci" / "multi-model-values.yaml"
    before = render("edge-runtime", values)
    after = render("edge-runtime", values, "models[1].version=v20261125-0002")
    assert pod_template(before) == pod_template(after)
    desired = [json.loads(d["data"]["desired.json"]) for d in after
               if d["kind"] == "ConfigMap" and "desired.json" in d["data"]][0]
    entries = entries_from(desired, "in the ConfigMap", [ModelEntry(name="unused")])
    assert [(e.name, e.version, e.max_batch_size) for e in entries] == [
        ("digits-cnn", "stable", None), ("keyword-spotter", "v20261125-0002", 8)]
    env = {e["name"]: e.get("value") for e in pod_template(after)["spec"]["containers"][0]["env"]}
    assert env["EDGE_READY_POLICY"] == "any" and env["EDGE_MEMORY_BUDGET_BYTES"] == "2147483648"
    bad = subprocess.run([HELM, "template", "x", str(CHARTS / "edge-runtime"), "--set", "models[0].name=Bad Name"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0 and "models" in bad.stderr


def test_one_value_switches_the_data_plane_to_triton():
    """serving.engine=triton: Triton takes the inference port, the probes ask edgeloop on its control port."""
    builtin = pod_template(render("edge-runtime", None))["spec"]["containers"][0]
    triton = pod_template(render("edge-runtime", None, "serving.engine=triton"))["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in triton["env"]}
    assert env["EDGE_SERVING_ENGINE"] == "triton" and "EDGE_TRITON_HOME" not in env  # the image's own default
    assert env["EDGE_CONTROL_PORT"] == "8005" and env["EDGE_TRITON_BACKEND"] == "auto"
    python = pod_template(render("edge-runtime", None, "serving.engine=triton", "serving.tritonBackend=python"))
    python_env = {e["name"]: e.get("value") for e in python["spec"]["containers"][0]["env"]}
    assert python_env["EDGE_TRITON_BACKEND"] == "python"
    refused = subprocess.run([HELM, "template", "x", str(CHARTS / "edge-runtime"), "--set", "serving.engine=triton",
                              "--set", "serving.tritonBackend=stub"], capture_output=True, text=True, timeout=60,
                             check=False)
    assert refused.returncode != 0 and "tritonBackend" in refused.stderr
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == {"grpc": 8001, "metrics": 9091,
                                                                         "control": 8005, "triton-metrics": 8002}
    for probe in ("readinessProbe", "livenessProbe"):
        assert triton[probe]["grpc"]["port"] == 8005 and builtin[probe]["grpc"]["port"] == 8001
    assert {e["name"]: e.get("value") for e in builtin["env"]}["EDGE_SERVING_ENGINE"] == "builtin"


def test_the_hub_scales_out_on_postgresql_only():
    docs = render("telemetry-hub", CHARTS / "telemetry-hub" / "ci" / "replicas-values.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert "replicas" not in kinds["Deployment"]["spec"]  # the autoscaler owns the count
    assert kinds["HorizontalPodAutoscaler"]["spec"]["minReplicas"] == 2
    assert kinds["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    env = {e["name"]: e.get("value") for e in kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HUB_STATS_RETENTION_DAYS"] == "14" and env["HUB_MAX_CONNECTION_AGE_S"] == "300"
    refused = subprocess.run([HELM, "template", "x", str(CHARTS / "telemetry-hub"), "--set", "replicas=3"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode != 0 and "SQLite has one writer" in refused.stderr


def test_schema_rejects_bad_values():
    result = subprocess.run([HELM, "template", "x", str(CHARTS / "edge-runtime"), "--set", "model.version=Not Valid"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0 and "model.version" in result.stderr.replace("/", ".")


def test_entrypoints_name_real_commands():
    """Every image's ENTRYPOINT + CMD (and each chart's args) is a command `edgeloop` really has."""
    commands = []
    for dockerfile in sorted((ROOT / "dockerfiles").glob("*.Dockerfile")):
        entry, cmd = [], []
        for line in dockerfile.read_text().splitlines():
            if line.startswith("ENTRYPOINT "):
                entry = json.loads(line.removeprefix("ENTRYPOINT "))
            elif line.startswith("CMD "):
                cmd = json.loads(line.removeprefix("CMD "))
        assert entry, f"{dockerfile.name} has no exec-form ENTRYPOINT"
        commands.append((dockerfile.name, entry + cmd))
    assert len(commands) == 4
    for template in (pod_template(render("edge-runtime")),):
        commands.append(("edge-runtime chart", ["edgeloop", *template["spec"]["containers"][0]["args"]]))
    for name, argv in commands:
        if argv[0] != "edgeloop":
            continue  # the cloud image runs KFP's own command lines
        exe = Path(sys.executable).parent / "edgeloop"
        result = subprocess.run([str(exe), *argv[1:], "--help"], capture_output=True, text=True, timeout=60,
                                check=False)
        assert result.returncode == 0, f"{name}: `{' '.join(argv)}` is not a command: {result.stderr}"


def test_hadolint_passes_on_every_dockerfile():
    hadolint = Path(sys.executable).parent / "hadolint"
    files = sorted(str(p) for p in (ROOT / "dockerfiles").glob("*.Dockerfile"))
    assert len(files) == 4
    result = subprocess.run([str(hadolint), "--config", str(ROOT / "dockerfiles" / ".hadolint.yaml"), *files],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_jetson_pod_gets_its_gpu_groups_host_files_and_runtime_class():
    template = pod_template(render("edge-runtime", None, "jetson.supplementalGroups={44,104}",
                                   "jetson.module=orin-nx"))
    spec = template["spec"]
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["securityContext"]["supplementalGroups"] == [44, 104]
    container = spec["containers"][0]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    for name in ("nv-tegra-release", "device-model"):
        assert mounts[name]["readOnly"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["nv-tegra-release"]["hostPath"] == {"path": "/etc/nv_tegra_release", "type": "File"}
    assert volumes["device-model"]["hostPath"] == {"path": "/proc/device-tree/model", "type": "File"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["EDGE_TEGRA_RELEASE_FILE"] == "/etc/edgeloop/host/nv_tegra_release"
    assert env["EDGE_DEVICE_MODULE"] == "orin-nx" and env["EDGE_ALLOW_CPU_FALLBACK"] == "false"
    # x86 nodes: no GPU groups, no L4T files
    cpu = pod_template(render("edge-runtime", CHARTS / "edge-runtime" / "ci" / "gpu-off-values.yaml"))["spec"]
    assert "supplementalGroups" not in cpu["securityContext"] and "runtimeClassName" not in cpu
    assert not {"nv-tegra-release", "device-model"} & {v["name"] for v in cpu["volumes"]}


def test_the_jetson_image_checks_for_tensorrt_at_build_time_without_importing_it(tmp_path):
    import re as regex

    text = (ROOT / "dockerfiles" / "edge-jetson.Dockerfile").read_text()
    (code,) = regex.findall(r'RUN /opt/edgeloop/bin/python -c "(.+)"', text)
    missing = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "/usr/bin"})
    assert missing.returncode == 1 and "tensorrt Python module is missing" in missing.stderr
    fake = tmp_path / "site" / "tensorrt"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('imported: needs a GPU')\n")
    present = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={"PATH": "/usr/bin", "PYTHONPATH": str(fake.parent)})
    assert present.returncode == 0, present.stderr  # found without being imported


@pytest.mark.parametrize("values", [None, CHARTS / "edge-runtime" / "ci" / "pvc-cache-values.yaml"],
                         ids=["hostPath-cache", "pvc-cache"])
def test_cuda_and_tensorrt_scratch_files_go_to_the_cache_volume_not_the_small_tmp(values):
    """CUDA's JIT compute cache (``CUDA_CACHE_PATH``, default ``~/.nv/ComputeCache``) and temporary files (``TMPDIR``,
    default ``/tmp``) would land in the 256 MiB ``/tmp`` emptyDir, whose limit evicts the pod when passed."""
    spec = pod_template(render("edge-runtime", values))["spec"]
    container = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    cache_dir = env["EDGE_CACHE_DIR"]
    assert mounts[cache_dir] == "cache" and "emptyDir" not in volumes["cache"]
    for variable in ("CUDA_CACHE_PATH", "TMPDIR"):
        assert env[variable].startswith(cache_dir + "/"), f"{variable} is {env[variable]}, outside the cache volume"
    assert volumes[mounts["/tmp"]]["emptyDir"]["sizeLimit"] == "256Mi"  # documented in docs/fleet.md
