"""Kubernetes integration through the official client (works against k3s): the runtime reads its node's labels
and writes its state as node annotations, so ``kubectl get nodes`` (and ``edgeloop fleet status --kube``) shows the
fleet; ``edgeloop fleet rollout`` drives ``helm upgrade`` and rolls back when a device fails validation."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from edge_runtime.errors import ConfigError, RolloutFailed, StoreUnavailable

log = logging.getLogger(__name__)

PREFIX = "edgeloop.io/"
DEVICE_CLASS_LABEL = PREFIX + "device-class"
RING_LABEL = PREFIX + "ring"
ANNOTATIONS = ("state", "desired", "desired-version", "serving-version", "target-key", "validation", "updated-at")


def core_api(api_client: Any = None) -> Any:
    """A CoreV1Api: in-cluster configuration in a pod, else ~/.kube/config (KUBECONFIG)."""
    from kubernetes import client, config

    if api_client is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except (config.ConfigException, FileNotFoundError, TypeError) as exc:
                raise ConfigError("no Kubernetes configuration: run in a pod, or set KUBECONFIG") from exc
    return client.CoreV1Api(api_client)


@contextlib.contextmanager
def _api_errors(what: str) -> Iterator[None]:
    """Kubernetes client and connection errors become ours, with the cause kept."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as exc:
        raise StoreUnavailable(f"Kubernetes API refused {what}: {exc.status} {exc.reason}") from exc
    except HTTPError as exc:
        raise StoreUnavailable(f"cannot reach the Kubernetes API for {what}") from exc


class NodeReporter:
    """This node's labels in, the runtime's state out as ``edgeloop.io/*`` annotations."""

    def __init__(self, node_name: str, api: Any = None) -> None:
        self.node_name = node_name
        self.api = api or core_api()

    def labels(self) -> dict[str, str]:
        """The node's labels (device class, ring, ...)."""
        with _api_errors(f"reading node {self.node_name}"):
            return dict(self.api.read_node(self.node_name).metadata.labels or {})

    def report(self, status: dict[str, Any]) -> None:
        """Patch the annotations from a runtime status snapshot (strategic merge: other annotations stay)."""
        values = {
            "state": status.get("state") or "",
            "desired": status.get("desired") or "",
            "desired-version": status.get("desired_version") or "",
            "serving-version": status.get("serving_version") or "",
            "target-key": status.get("target_key") or "",
            "validation": status.get("validation") or "",
            "updated-at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        body = {"metadata": {"annotations": {PREFIX + k: v for k, v in values.items()}}}
        with _api_errors(f"annotating node {self.node_name}"):
            self.api.patch_node(self.node_name, body)


@dataclass(frozen=True)
class NodeState:
    """One node as the fleet view shows it."""

    name: str
    device_class: str
    ring: str
    ready: bool
    annotations: dict[str, str]

    def get(self, key: str) -> str:
        """An ``edgeloop.io/<key>`` annotation, or empty."""
        return self.annotations.get(PREFIX + key, "")


def fleet_nodes(api: Any, label_selector: str = DEVICE_CLASS_LABEL) -> list[NodeState]:
    """Nodes carrying the device-class label, with their edgeloop annotations."""
    with _api_errors("listing nodes"):
        nodes = api.list_node(label_selector=label_selector).items
    result = []
    for node in nodes:
        labels = node.metadata.labels or {}
        conditions = (node.status.conditions or []) if node.status else []
        ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
        result.append(NodeState(node.metadata.name, labels.get(DEVICE_CLASS_LABEL, ""), labels.get(RING_LABEL, ""),
                                ready, {k: v for k, v in (node.metadata.annotations or {}).items()
                                        if k.startswith(PREFIX)}))
    return sorted(result, key=lambda n: n.name)


def daemonset_rollouts(api_client: Any, namespace: str) -> list[dict[str, Any]]:
    """Rollout state of the edge-runtime DaemonSets in ``namespace`` (one per ring)."""
    from kubernetes import client

    apps = client.AppsV1Api(api_client)
    with _api_errors(f"listing DaemonSets in {namespace}"):
        items = apps.list_namespaced_daemon_set(namespace, label_selector="app.kubernetes.io/name=edge-runtime").items
    return [{"name": d.metadata.name, "desired": d.status.desired_number_scheduled,
             "updated": d.status.updated_number_scheduled or 0, "ready": d.status.number_ready,
             "unavailable": d.status.number_unavailable or 0} for d in items]


def _converged(node: NodeState, wanted: str | None) -> bool:
    """The node serves the version it resolved, and it resolved what the rollout asked for."""
    return (node.get("state") == "serving" and bool(node.get("serving-version"))
            and node.get("serving-version") == node.get("desired-version")
            and (wanted is None or wanted in (node.get("desired"), node.get("serving-version"))))


def rollout(
    release: str,
    chart: str,
    *,
    namespace: str,
    api: Any,
    helm: str = "helm",
    values: Sequence[str] = (),
    sets: Sequence[str] = (),
    timeout_s: float = 900.0,
    poll_s: float = 5.0,
    ring: str | None = None,
    run: Callable[..., Any] = subprocess.run,
) -> list[NodeState]:
    """``helm upgrade --install --wait`` the release, then wait until every node of the ring serves what it asks
    for; on the first node that reports a failed validation after the rollout began, when helm fails, or when the
    nodes have not converged within ``timeout_s``, ``helm rollback`` and raise :class:`RolloutFailed`. Returns the
    ring's nodes on success.

    A model change restarts no pod (the desired file arrives through the ConfigMap volume and each device swaps in
    place after validating), so helm returns at once: convergence is read from the nodes' ``edgeloop.io/*``
    annotations — state ``serving``, the serving version equal to the desired one, and ``desired`` equal to the
    ``model.version`` this rollout sets (when it sets one).
    """
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    argv = [helm, "upgrade", "--install", release, chart, "--namespace", namespace, "--wait",
            "--timeout", f"{int(timeout_s)}s"]
    for file in values:
        argv += ["-f", file]
    for item in sets:
        argv += ["--set", item]
    selector = DEVICE_CLASS_LABEL + (f",{RING_LABEL}={ring}" if ring else "")
    wanted = next((item.split("=", 1)[1] for item in sets if item.startswith("model.version=")), None)
    deadline = time.monotonic() + timeout_s
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    failure = None
    while True:
        nodes = fleet_nodes(api, selector)
        for node in nodes:
            if node.get("state") == "failed" and node.get("updated-at") >= started:
                failure = f"node {node.name} failed validation: {node.get('validation') or 'see its telemetry'}"
                break
        if failure:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)  # helm and anything it started
                process.wait(30)
            break
        if process.poll() is not None:
            if process.returncode != 0:
                output = (process.stdout.read() if process.stdout else "").strip()
                failure = f"helm upgrade failed or timed out: {output.splitlines()[-1] if output else ''}"
                break
            waiting = [n.name for n in nodes if not _converged(n, wanted)]
            if not waiting:
                break
            if time.monotonic() > deadline:
                failure = f"timed out: {', '.join(waiting)} did not report serving {wanted or 'the desired version'}"
                break
        time.sleep(poll_s)
    if failure is not None:
        rollback = run([helm, "rollback", release, "--namespace", namespace, "--wait"], capture_output=True,
                       text=True, check=False)
        outcome = "rolled back" if rollback.returncode == 0 else f"rollback FAILED too ({rollback.stderr.strip()})"
        raise RolloutFailed(f"{release}: {failure}; {outcome}")
    return fleet_nodes(api, selector)
