"""This node in Kubernetes (works against k3s): the runtime reads its node's labels and writes its state as
``edgeloop.io/*`` node annotations (:mod:`edgeloop_core.fleet` holds their names and reads them back), so
``kubectl get nodes`` and ``edgeloop fleet status --kube`` show the fleet."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from edgeloop_core.fleet import MODEL_FIELDS, PREFIX, api_errors, core_api, summary_state

log = logging.getLogger(__name__)


class NodeReporter:
    """This node's labels in, the runtime's state out as ``edgeloop.io/*`` annotations."""

    def __init__(self, node_name: str, api: Any = None) -> None:  # noqa: ANN401 - kubernetes' CoreV1Api, imported lazily
        self.node_name = node_name
        self.api = api or core_api()

    def labels(self) -> dict[str, str]:
        """The node's labels (device class, ring, ...)."""
        with api_errors(f"reading node {self.node_name}"):
            return dict(self.api.read_node(self.node_name).metadata.labels or {})

    def report(self, status: dict[str, Any]) -> None:
        """Patch the annotations from a status snapshot: the repository's (``models``: one status per model) or one
        model's (strategic merge: other annotations stay)."""
        models = [m for m in status["models"] if isinstance(m, dict)] if "models" in status else [status]
        per_model = {str(m.get("model_name") or ""): {f: m.get(f) or "" for f in MODEL_FIELDS} for m in models}
        values = {
            "state": summary_state([m.get("state") or "" for m in models if not m.get("paused")]),
            "models": json.dumps(per_model, sort_keys=True, separators=(",", ":")),
            "updated-at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        only = models[0] if len(models) == 1 else {}
        values.update({
            "desired": only.get("desired") or "",
            "desired-version": only.get("desired_version") or "",
            "serving-version": only.get("serving_version") or "",
            "target-key": only.get("target_key") or "",
            "validation": only.get("validation") or "",
        })
        body = {"metadata": {"annotations": {PREFIX + k: v for k, v in values.items()}}}
        with api_errors(f"annotating node {self.node_name}"):
            self.api.patch_node(self.node_name, body)



