"""The fleet as Kubernetes shows it: the ``edgeloop.io/*`` node labels and annotations (the contract between a
device, which writes its state there, and whoever reads the fleet), reading the fleet's nodes and DaemonSets, and a
rollout that drives ``helm upgrade`` and rolls back when a device fails validation. Through the official client,
which works against k3s."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeloop_core.errors import ConfigError, RolloutFailed, StoreUnavailable

if TYPE_CHECKING:
    from kubernetes.client import ApiClient, CoreV1Api, V1DaemonSet

log = logging.getLogger(__name__)

PREFIX = "edgeloop.io/"


DEVICE_CLASS_LABEL = PREFIX + "device-class"


RING_LABEL = PREFIX + "ring"


ANNOTATIONS = ("state", "desired", "desired-version", "serving-version", "target-key", "validation", "updated-at",
               "models")
"""``state`` sums the device up (failed when any model failed, serving when every one serves); ``models`` holds each
model's state as JSON; the others describe the model when the device serves exactly one (as before several)."""


MODEL_FIELDS = ("state", "desired", "desired_version", "serving_version", "target_key", "validation")


def summary_state(states: Sequence[str]) -> str:
    """One state for a device from its models' states (``paused`` models left out by the caller)."""
    if not states:
        return "unloaded"
    if "failed" in states:
        return "failed"
    if all(s == "serving" for s in states):
        return "serving"
    return next(s for s in states if s != "serving")


def core_api(api_client: ApiClient | None = None) -> CoreV1Api:
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
def api_errors(what: str) -> Iterator[None]:
    """Kubernetes client and connection errors become ours, with the cause kept."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as exc:
        raise StoreUnavailable(f"Kubernetes API refused {what}: {exc.status} {exc.reason}") from exc
    except HTTPError as exc:
        raise StoreUnavailable(f"cannot reach the Kubernetes API for {what}") from exc


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

    def models(self) -> dict[str, dict[str, str]]:
        """Each model's state (the ``models`` annotation); a node annotated before several models: its one model
        from the flat annotations, under the name ``""``."""
        try:
            data = json.loads(self.get("models") or "null")
        except ValueError:
            data = None
        if isinstance(data, dict):
            return {str(k): v for k, v in data.items() if isinstance(v, dict)}
        if not self.get("state"):
            return {}
        return {"": {"state": self.get("state"), "desired": self.get("desired"),
                     "desired_version": self.get("desired-version"), "serving_version": self.get("serving-version"),
                     "target_key": self.get("target-key"), "validation": self.get("validation")}}

    def model(self, name: str | None) -> dict[str, str]:
        """Model ``name``'s state (``None``: the device's only model, or its summary)."""
        models = self.models()
        if name is None:
            if len(models) == 1:
                return next(iter(models.values()))
            return {"state": self.get("state"), "validation": self.get("validation")}
        return models.get(name, {})


def fleet_nodes(api: CoreV1Api, label_selector: str = DEVICE_CLASS_LABEL) -> list[NodeState]:
    """Nodes carrying the device-class label, with their edgeloop annotations."""
    with api_errors("listing nodes"):
        nodes = api.list_node(label_selector=label_selector).items
    result = []
    for node in nodes:
        if node.metadata is None or node.metadata.name is None:  # the API names every node; nothing to show if not
            continue
        labels = node.metadata.labels or {}
        conditions = (node.status.conditions or []) if node.status else []
        ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
        result.append(NodeState(node.metadata.name, labels.get(DEVICE_CLASS_LABEL, ""), labels.get(RING_LABEL, ""),
                                ready, {k: v for k, v in (node.metadata.annotations or {}).items()
                                        if k.startswith(PREFIX)}))
    return sorted(result, key=lambda n: n.name)


def daemonset_rollouts(api_client: ApiClient, namespace: str) -> list[dict[str, Any]]:
    """Rollout state of the edge-runtime DaemonSets in ``namespace`` (one per ring)."""
    from kubernetes import client

    apps = client.AppsV1Api(api_client)
    with api_errors(f"listing DaemonSets in {namespace}"):
        items = apps.list_namespaced_daemon_set(namespace, label_selector="app.kubernetes.io/name=edge-runtime").items
    return [_rollout_state(d) for d in items]


def _rollout_state(daemonset: V1DaemonSet) -> dict[str, Any]:
    """One DaemonSet's figures; one the controller has not counted yet (no status): zeros."""
    status = daemonset.status
    name = daemonset.metadata.name if daemonset.metadata else None
    if status is None:
        return {"name": name, "desired": 0, "updated": 0, "ready": 0, "unavailable": 0}
    return {"name": name, "desired": status.desired_number_scheduled,
            "updated": status.updated_number_scheduled or 0, "ready": status.number_ready,
            "unavailable": status.number_unavailable or 0}


def _model_converged(model: dict[str, str], wanted: str | None) -> bool:
    return (model.get("state") == "serving" and bool(model.get("serving_version"))
            and model.get("serving_version") == model.get("desired_version")
            and (wanted is None or wanted in (model.get("desired"), model.get("serving_version"))))


def _converged(node: NodeState, wanted: str | None, model: str | None = None) -> bool:
    """The node serves the version it resolved, and it resolved what the rollout asked for: for ``model``, or for
    its only model, or (several models, none named) for every model."""
    models = node.models()
    if model is None and len(models) > 1:
        return all(_model_converged(m, None) for m in models.values())
    return _model_converged(node.model(model), wanted)


def model_version_values(release: str, namespace: str, model: str, version: str, *, helm: str = "helm",
                         run: Callable[..., Any] = subprocess.run) -> dict[str, Any]:
    """The release's values with ``model``'s version set to ``version`` and nothing else changed: ``helm get
    values --all`` (what the release runs now), then the model's entry in ``models`` (or ``model`` when the
    release serves one model). ConfigError when the release does not serve ``model``."""
    from edgeloop_core.contract import check_name

    check_name(model, "model name")
    check_name(version, "version")
    result = run([helm, "get", "values", release, "--namespace", namespace, "--all", "--output", "json"],
                 capture_output=True, text=True, check=False)
    if result.returncode != 0:
        said = (result.stderr or result.stdout or "").strip().splitlines()
        raise ConfigError(f"cannot read the values of release {release}: {said[-1] if said else 'helm failed'}")
    try:
        values = json.loads(result.stdout or "{}") or {}
    except ValueError as exc:
        raise ConfigError(f"helm printed values for {release} that are not JSON") from exc
    models = values.get("models") or []
    if models:
        entry = next((m for m in models if isinstance(m, dict) and m.get("name") == model), None)
        if entry is None:
            names = ", ".join(str(m.get("name")) for m in models if isinstance(m, dict))
            raise ConfigError(f"release {release} does not serve model {model!r} (its models: {names})")
        entry["version"] = version
    elif (values.get("model") or {}).get("name") == model:
        values["model"]["version"] = version
    else:
        raise ConfigError(f"release {release} does not serve model {model!r} (it serves "
                          f"{(values.get('model') or {}).get('name')!r})")
    return values


def rollout(
    release: str,
    chart: str,
    *,
    namespace: str,
    api: CoreV1Api,
    helm: str = "helm",
    values: Sequence[str] = (),
    sets: Sequence[str] = (),
    timeout_s: float = 900.0,
    poll_s: float = 5.0,
    ring: str | None = None,
    model: str | None = None,
    version: str | None = None,
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

    With ``model`` and ``version``, only that model moves: the release keeps every value it has (``helm get
    values``) but that model's version, and convergence and failure are read from that model's state on each
    node; the device's other models are not touched.
    """
    import tempfile

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    argv = [helm, "upgrade", "--install", release, chart, "--namespace", namespace, "--wait",
            "--timeout", f"{int(timeout_s)}s"]
    wanted = next((item.split("=", 1)[1] for item in sets if item.startswith("model.version=")), None)
    scratch = tempfile.TemporaryDirectory(prefix="edgeloop-rollout-")
    if model is not None or version is not None:
        if not (model and version):
            raise ConfigError("name both the model and its version to move one model")
        moved = Path(scratch.name) / "model-version.json"
        moved.write_text(json.dumps(model_version_values(release, namespace, model, version, helm=helm, run=run)))
        values = [str(moved), *values]
        wanted = version
    for file in values:
        argv += ["-f", file]
    for item in sets:
        argv += ["--set", item]
    selector = DEVICE_CLASS_LABEL + (f",{RING_LABEL}={ring}" if ring else "")
    deadline = time.monotonic() + timeout_s
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    failure = None
    while True:
        nodes = fleet_nodes(api, selector)
        for node in nodes:
            watched = node.model(model)
            if watched.get("state") == "failed" and node.get("updated-at") >= started:
                of = f" of {model}" if model else ""
                failure = f"node {node.name} failed validation{of}: {watched.get('validation') or 'see its telemetry'}"
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
            waiting = [n.name for n in nodes if not _converged(n, wanted, model)]
            if not waiting:
                break
            if time.monotonic() > deadline:
                failure = f"timed out: {', '.join(waiting)} did not report serving {wanted or 'the desired version'}"
                break
        time.sleep(poll_s)
    scratch.cleanup()
    if failure is not None:
        rollback = run([helm, "rollback", release, "--namespace", namespace, "--wait"], capture_output=True,
                       text=True, check=False)
        outcome = "rolled back" if rollback.returncode == 0 else f"rollback FAILED too ({rollback.stderr.strip()})"
        raise RolloutFailed(f"{release}: {failure}; {outcome}")
    return fleet_nodes(api, selector)

