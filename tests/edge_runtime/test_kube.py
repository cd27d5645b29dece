"""Kubernetes integration with the official client against a small HTTP stand-in for the API server.

There is no API server on this machine, so ``FakeKubeAPI`` answers the five calls we make (read/patch/list nodes,
list DaemonSets) with the request paths, patch content type and JSON shapes of the real Kubernetes API (v1 Node,
NodeList, apps/v1 DaemonSetList). Everything above the HTTP layer — the kubernetes client's serialization, our
code — is real. The rollout test stands in for helm with a script, since `helm upgrade` needs that API server too.
"""

from __future__ import annotations

import json
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client

from edge_runtime.report.kube import NodeReporter
from edgeloop_core.errors import ConfigError, RolloutFailed
from edgeloop_core.fleet import daemonset_rollouts, fleet_nodes, rollout


def node(name: str, labels: dict[str, str], annotations: dict[str, str] | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": "1", "labels": labels,
                         "annotations": annotations or {}},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                       "lastHeartbeatTime": "2026-11-24T00:00:00Z",
                                       "lastTransitionTime": "2026-11-24T00:00:00Z"}]}}


class FakeKubeAPI:
    def __init__(self) -> None:
        self.nodes = {
            "orin-1": node("orin-1", {"edgeloop.io/device-class": "jetson", "edgeloop.io/ring": "canary"}),
            "orin-2": node("orin-2", {"edgeloop.io/device-class": "jetson", "edgeloop.io/ring": "stable"}),
            "gpu-box": node("gpu-box", {"kubernetes.io/os": "linux"}),
        }
        self.patches: list[tuple[str, str, dict]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                selector = parse_qs(url.query).get("labelSelector", [""])[0]
                if url.path == "/api/v1/nodes":
                    self._send(200, {"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "1"},
                                     "items": [n for n in api.nodes.values() if api.selects(n, selector)]})
                elif url.path.startswith("/api/v1/nodes/"):
                    name = url.path.rsplit("/", 1)[1]
                    if name in api.nodes:
                        self._send(200, api.nodes[name])
                    else:
                        self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                         "reason": "NotFound", "code": 404, "message": f'nodes "{name}" not found'})
                elif url.path == "/apis/apps/v1/namespaces/edgeloop/daemonsets":
                    self._send(200, {"apiVersion": "apps/v1", "kind": "DaemonSetList", "metadata": {}, "items": [
                        {"metadata": {"name": "canary-edge-runtime", "namespace": "edgeloop"},
                         "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": "edge-runtime"}},
                                  "template": {"metadata": {}, "spec": {"containers": [{"name": "edge-runtime"}]}}},
                         "status": {"currentNumberScheduled": 1, "desiredNumberScheduled": 1,
                                    "numberMisscheduled": 0, "numberReady": 0, "updatedNumberScheduled": 1,
                                    "numberUnavailable": 1}}]})
                else:
                    self._send(404, {"kind": "Status", "code": 404})

            def do_PATCH(self) -> None:
                name = urlparse(self.path).path.rsplit("/", 1)[1]
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.patches.append((name, self.headers["Content-Type"], body))
                api.nodes[name]["metadata"]["annotations"].update(body["metadata"]["annotations"])
                self._send(200, api.nodes[name])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def selects(item: dict, selector: str) -> bool:
        labels = item["metadata"]["labels"]
        for term in filter(None, selector.split(",")):
            key, _, value = term.partition("=")
            if key not in labels or (value and labels[key] != value):
                return False
        return True

    def api_client(self) -> client.ApiClient:
        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        return client.ApiClient(configuration)


@pytest.fixture
def kube():
    fake = FakeKubeAPI()
    yield fake
    fake.server.shutdown()


def test_node_labels_in_annotations_out(kube):
    reporter = NodeReporter("orin-1", client.CoreV1Api(kube.api_client()))
    assert reporter.labels()["edgeloop.io/device-class"] == "jetson"
    reporter.report({"state": "serving", "desired_version": "v2", "serving_version": "v2",
                     "target_key": "trt10.3-sm87-l4t36.4-int8-b1x8x16", "validation": "passed top1 0.99"})
    name, content_type, body = kube.patches[-1]
    assert name == "orin-1" and content_type == "application/strategic-merge-patch+json"
    assert body["metadata"]["annotations"]["edgeloop.io/serving-version"] == "v2"
    assert set(kube.nodes["orin-1"]["metadata"]["annotations"]) >= {"edgeloop.io/state", "edgeloop.io/updated-at"}


def test_missing_node_is_a_clear_error(kube):
    from edgeloop_core.errors import StoreUnavailable

    with pytest.raises(StoreUnavailable) as info:
        NodeReporter("ghost", client.CoreV1Api(kube.api_client())).labels()
    assert "404" in str(info.value)


def test_fleet_view_and_daemonset_rollout_state(kube):
    core = client.CoreV1Api(kube.api_client())
    NodeReporter("orin-2", core).report({"state": "failed", "desired_version": "v3", "validation": "failed: below"})
    nodes = fleet_nodes(core)
    assert [(n.name, n.ring, n.ready) for n in nodes] == [("orin-1", "canary", True), ("orin-2", "stable", True)]
    assert nodes[1].get("state") == "failed" and nodes[1].get("desired-version") == "v3"
    (daemonset,) = daemonset_rollouts(kube.api_client(), "edgeloop")
    assert daemonset == {"name": "canary-edge-runtime", "desired": 1, "updated": 1, "ready": 0, "unavailable": 1}


def _fake_helm(tmp_path, upgrade_seconds: float, upgrade_rc: int = 0):
    """A stand-in for the helm binary that logs its arguments (helm upgrade needs a real API server)."""
    script = tmp_path / "helm"
    log = tmp_path / "helm.log"
    script.write_text(f"""#!/bin/sh
echo "$@" >> {log}
if [ "$1" = "upgrade" ]; then sleep {upgrade_seconds}; exit {upgrade_rc}; fi
exit 0
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script), log


def test_rollout_rolls_back_when_a_device_fails_validation(kube, tmp_path):
    core = client.CoreV1Api(kube.api_client())
    helm, log = _fake_helm(tmp_path, upgrade_seconds=30)
    timer = threading.Timer(0.5, lambda: NodeReporter("orin-1", core).report(
        {"state": "failed", "desired_version": "v9", "validation": "failed: top1_accuracy 0.10 below 0.98"}))
    timer.start()
    with pytest.raises(RolloutFailed) as info:
        rollout("canary", "helm/edge-runtime", namespace="edgeloop", api=core, helm=helm, ring="canary",
                sets=["model.version=v9"], poll_s=0.1, timeout_s=60)
    assert "orin-1 failed validation" in str(info.value) and "rolled back" in str(info.value)
    calls = log.read_text().splitlines()
    assert calls[0].startswith("upgrade --install canary helm/edge-runtime --namespace edgeloop --wait")
    assert "--set model.version=v9" in calls[0]
    assert calls[-1] == "rollback canary --namespace edgeloop --wait"


def test_rollout_waits_for_the_devices_to_swap_in_place_and_succeeds(kube, tmp_path):
    core = client.CoreV1Api(kube.api_client())
    helm, log = _fake_helm(tmp_path, upgrade_seconds=0.1)  # no pod restarts: helm returns at once
    timer = threading.Timer(0.6, lambda: NodeReporter("orin-2", core).report(
        {"state": "serving", "desired": "v2", "desired_version": "v2", "serving_version": "v2"}))
    timer.start()
    nodes = rollout("stable", "helm/edge-runtime", namespace="edgeloop", api=core, helm=helm, ring="stable",
                    sets=["model.version=v2"], poll_s=0.05, timeout_s=30)
    assert [n.name for n in nodes] == ["orin-2"] and nodes[0].get("serving-version") == "v2"
    assert "rollback" not in log.read_text()


def test_rollout_rolls_back_when_devices_never_converge_or_helm_fails(kube, tmp_path):
    core = client.CoreV1Api(kube.api_client())
    helm, log = _fake_helm(tmp_path, upgrade_seconds=0.1)
    with pytest.raises(RolloutFailed) as stuck:
        rollout("stable", "helm/edge-runtime", namespace="edgeloop", api=core, helm=helm, ring="stable",
                sets=["model.version=v3"], poll_s=0.05, timeout_s=1)
    assert "orin-2 did not report serving v3" in str(stuck.value) and "rolled back" in str(stuck.value)
    (tmp_path / "failing").mkdir()
    helm, log = _fake_helm(tmp_path / "failing", 0.1, upgrade_rc=1)
    with pytest.raises(RolloutFailed) as info:
        rollout("stable", "helm/edge-runtime", namespace="edgeloop", api=core, helm=helm, poll_s=0.05)
    assert "timed out" in str(info.value) and log.read_text().splitlines()[-1].startswith("rollback stable")


def test_rollout_of_one_model_moves_its_version_only_and_waits_for_that_model(kube, tmp_path):
    """A device serving two models: the rollout keeps the release's values but one model's version (from `helm get
    values`), and converges on that model's state in the `models` annotation while the other keeps failing."""
    core = client.CoreV1Api(kube.api_client())
    current = {"models": [{"name": "digits-cnn", "version": "stable"}, {"name": "kws", "version": "v1"}],
               "ring": "stable"}
    script = tmp_path / "helm"
    log = tmp_path / "helm.log"
    script.write_text(f"""#!/bin/sh
echo "$@" >> {log}
if [ "$1" = "get" ]; then echo '{json.dumps(current)}'; exit 0; fi
if [ "$1" = "upgrade" ]; then cp "$(echo "$@" | sed 's/.* -f \\([^ ]*\\).*/\\1/')" {tmp_path}/given.json; exit 0; fi
exit 0
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    timer = threading.Timer(0.5, lambda: NodeReporter("orin-2", core).report({"ready": False, "models": [
        {"model_name": "digits-cnn", "state": "failed", "desired": "stable", "desired_version": "v7",
         "serving_version": "v6", "validation": "failed: top1_accuracy 0.10"},
        {"model_name": "kws", "state": "serving", "desired": "v2", "desired_version": "v2", "serving_version": "v2"},
    ]}))
    timer.start()
    nodes = rollout("stable", "helm/edge-runtime", namespace="edgeloop", api=core, helm=str(script), ring="stable",
                    model="kws", version="v2", poll_s=0.05, timeout_s=30)
    assert nodes[0].model("kws")["serving_version"] == "v2" and nodes[0].get("state") == "failed"
    given = json.loads((tmp_path / "given.json").read_text())
    assert given["models"] == [{"name": "digits-cnn", "version": "stable"}, {"name": "kws", "version": "v2"}]
    assert "rollback" not in log.read_text()
    with pytest.raises(ConfigError, match="does not serve model 'other'"):
        rollout("stable", "helm/edge-runtime", namespace="edgeloop", api=core, helm=str(script),
                model="other", version="v2", poll_s=0.05, timeout_s=5)
