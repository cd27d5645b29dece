"""Publish a ready ONNX model as it is: one FP32 variant, validated on the device against its own outputs.

What an example or a benchmark needs to put a model in front of the edge runtime without running the pipeline (no
training, no quantisation, no gate): the model's outputs on ``inputs`` become the validation set's reference, so the
device validates the variant it builds against the model itself. ``components/import_onnx.py`` is the path for a
user's model (intake checks, quantised variants, the gate); this is the shortest path to a signed version.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgeloop_core.contract import Manifest, Task
    from edgeloop_core.store import ObjectStore


def publish_onnx_as_is(store: ObjectStore, signing_key: Ed25519PrivateKey, onnx_path: Path, name: str, task: Task,
                       inputs: dict[str, np.ndarray], *, work: Path, labels: list[str] | None = None,
                       metric: str = "detection_f1", version: str = "v1", channel: str = "stable") -> Manifest:
    """Publish ``onnx_path`` as version ``version`` of ``name`` on ``channel``, signed with ``signing_key``.

    ``inputs`` (input name → batch) is the validation set; ``metric`` is how the device compares its outputs with the
    reference (``detection_f1`` for a detector, as the video example and ``bench/video`` use it). A staging folder is
    made under ``work`` (which must exist). Returns the signed manifest.
    """
    import onnxruntime as ort

    from components.intake import tensor_specs
    from components.publish import publish_version
    from edgeloop_core.contract import ArtifactLayout, Manifest, Preprocessing, Validation, Variant, sha256_file

    stage = work / f"stage-{name}-{version}"
    stage.mkdir()
    shutil.copy(onnx_path, stage / "fp32.onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs), strict=True))
    np.savez(stage / "validation.npz", **{f"input:{k}": v for k, v in inputs.items()},
             **{f"reference:{k}": v for k, v in outputs.items()})
    refs = {f: dict(zip(("sha256", "size_bytes"), sha256_file(stage / f), strict=True))
            for f in ("fp32.onnx", "validation.npz")}
    specs_in, specs_out = tensor_specs(stage / "fp32.onnx")
    manifest = Manifest(
        name=name, version=version, created_at=datetime.now(timezone.utc), inputs=specs_in, outputs=specs_out,
        task=task, labels=labels or [], preprocessing=Preprocessing(kind="image", layout="NCHW", scale=1 / 255),
        variants=[Variant(file="fp32.onnx", name="fp32", precision="fp32", backends=["tensorrt", "onnxruntime"],
                          **refs["fp32.onnx"])],
        validation=Validation(file="validation.npz", metric=metric, num_samples=len(next(iter(inputs.values()))),
                              reference={"fp32": 1.0}, tolerance=0.02, **refs["validation.npz"]))
    return publish_version(store, manifest, stage, signing_key, layout=ArtifactLayout(), channel=channel)
