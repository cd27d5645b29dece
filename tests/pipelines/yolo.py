"""Real ultralytics YOLO exports for the tests: YOLOv8n, YOLO11n and YOLOv10n built from their yaml configs (random
weights, nothing downloaded), exported to ONNX as people export them — opset 17 or 18, 320 or 640 pixels, a fixed
batch of 1 or ``dynamic=True`` (batch, height and width).

ultralytics is AGPL-3.0 and a test-only tool: it lives in its own venv, ``.tools/ultralytics`` (``make test``
installs it; it needs torchvision, which cannot sit beside the project's CPU torch), and only this file's
``__main__`` part runs there. edgeloop itself never imports it. The tests talk to one export worker per session
(:class:`Exporter`): a process in that venv that reads one JSON request a line on stdin and answers one JSON line,
so torch and ultralytics load once.

Random weights give a degenerate detector: every BatchNorm keeps its initial statistics, the features are ~0, and
every anchor of every image gets the same box and a class score of ~1e-4 — no detections, and no difference between
images for a negative control to see. So before exporting, the worker gathers BatchNorm statistics on random images
(the same uniform [0, 1) noise the tests feed) and sets the class-score biases so FP32 scores reach ~0.5–0.99 on a
few dozen to a few hundred anchors per image: detections exist and differ between images.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ULTRA_PY = ROOT / ".tools" / "ultralytics" / "bin" / "python"
FAMILIES = ("yolov8n", "yolo11n", "yolov10n")
END2END = {"yolov10n"}
"""Exported with the NMS-free one-to-one head (``nms=False``): ``[batch, 300, 6]``; the others give the raw
``[batch, 4 + 80, anchors]`` head that needs NMS after it."""
SEED = 0
BATCHNORM_BATCHES = 2
"""Forward passes of 4 random 320-pixel images that set the BatchNorm statistics."""
SCORE_SIGMAS = 4.5
"""Class-score logits are shifted so that their mean + this many standard deviations sits at 0 (score 0.5)."""
EXPORT_TIMEOUT_S = 300.0
OFFLINE_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0"}
"""ultralytics never goes online (no update check, no analytics sync) and never pip-installs a missing package."""


@dataclass(frozen=True)
class ExportSpec:
    """One ultralytics ONNX export."""

    family: str
    opset: int = 17
    imgsz: int = 640
    dynamic: bool = False

    @property
    def end2end(self) -> bool:
        return self.family in END2END

    @property
    def slug(self) -> str:
        return f"{self.family}-op{self.opset}-{self.imgsz}-{'dynamic' if self.dynamic else 'b1'}"


class ExporterError(RuntimeError):
    """The export worker failed; the message ends with the last lines of its log."""


class Exporter:
    """Exports on demand through one worker process in ``.tools/ultralytics``, each spec once per session."""

    def __init__(self, python: Path, work: Path) -> None:
        self.python, self.work = python, work
        self.cache: dict[ExportSpec, Path] = {}
        self.seconds: dict[ExportSpec, float] = {}
        """Wall time of each export (ultralytics' export, not counting the model build)."""
        self.build_seconds: dict[str, float] = {}
        """Wall time of building each family's model (random init, BatchNorm statistics, biases)."""
        self._process: subprocess.Popen | None = None
        self._log = work / "exporter.log"

    def _start(self) -> subprocess.Popen:
        if self._process is not None and self._process.poll() is not None:  # exited: start another
            self._process = None
        if self._process is None:
            env = {**os.environ, **OFFLINE_ENV, "YOLO_CONFIG_DIR": str(self.work / "ultralytics-settings")}
            self._process = subprocess.Popen(
                [str(self.python), str(Path(__file__).resolve()), str(self.work)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=self._log.open("ab"), env=env, cwd=self.work)
        return self._process

    def _tail(self) -> str:
        lines = self._log.read_text(errors="replace").strip().splitlines() if self._log.exists() else []
        return " | ".join(lines[-5:])

    def export(self, spec: ExportSpec) -> Path:
        """The ONNX file of ``spec`` (exported the first time it is asked for)."""
        if spec in self.cache:
            return self.cache[spec]
        process = self._start()
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write((json.dumps(asdict(spec)) + "\n").encode())
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], EXPORT_TIMEOUT_S)
        line = process.stdout.readline() if ready else b""
        if not line:  # a worker that hangs or died is replaced at the next request
            process.kill()
            process.wait()
            self._process = None
            raise ExporterError(f"the ultralytics export of {spec.slug} gave no answer "
                                f"({'timed out' if not ready else 'the worker exited'}): {self._tail()}")
        answer = json.loads(line)
        if "error" in answer:
            raise ExporterError(f"the ultralytics export of {spec.slug} failed: {answer['error']}")
        self.cache[spec] = Path(answer["path"])
        self.seconds[spec] = answer["export_s"]
        if answer.get("build_s") is not None:
            self.build_seconds[spec.family] = answer["build_s"]
        return self.cache[spec]

    def close(self) -> None:
        if self._process is not None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


# --- the worker: runs in .tools/ultralytics ----------------------------------------------------------------------


def _build(family: str):  # -> an ultralytics YOLO object
    """``family`` from its yaml config, random weights (seeded), BatchNorm statistics from random images and
    class-score biases set so FP32 scores reach ~0.5–0.99 on some anchors of each image."""
    import torch
    from ultralytics import YOLO

    torch.manual_seed(SEED)
    yolo = YOLO(f"{family}.yaml")
    net = yolo.model
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the passes below
    net.train()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for _ in range(BATCHNORM_BATCHES):
            net(torch.rand(4, 3, 320, 320, generator=generator))
    net.eval()
    head = net.model[-1]
    last = [branch[-1] for branch in [*head.cv3, *(getattr(head, "one2one_cv3", None) or [])]]
    with torch.no_grad():
        raw = net(torch.rand(4, 3, 320, 320, generator=generator))
        raw = raw[0] if isinstance(raw, (list, tuple)) else raw
        if isinstance(raw, dict):  # an end-to-end head in eval mode answers both branches' raw outputs
            raw = raw.get("one2one", raw)
        logits = torch.logit(raw[:, 4:, :].clamp(1e-7, 1 - 1e-7)) if raw.shape[1] > 6 else None
        if logits is None:
            raise ValueError(f"{family}: unexpected raw output {tuple(raw.shape)}")
        shift = float(logits.mean() + SCORE_SIGMAS * logits.std())
        for conv in last:
            conv.bias.sub_(shift)
    return yolo


def _serve(work: Path) -> None:
    """Answer export requests (one JSON :class:`ExportSpec` a line on stdin) with ``{"path", "export_s",
    "build_s"}`` or ``{"error"}`` lines; everything ultralytics prints goes to stderr."""
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # ultralytics and torch print to stdout: send all of it to the log
    sys.stdout = sys.stderr
    models = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        spec = ExportSpec(**json.loads(line))
        try:
            build_s = None
            if spec.family not in models:
                started = time.perf_counter()
                models[spec.family] = _build(spec.family)
                build_s = time.perf_counter() - started
            started = time.perf_counter()
            written = models[spec.family].export(format="onnx", opset=spec.opset, imgsz=spec.imgsz,
                                                 dynamic=spec.dynamic, simplify=True,
                                                 nms=False if spec.end2end else None, device="cpu")
            export_s = time.perf_counter() - started
            path = work / f"{spec.slug}.onnx"
            os.replace(written, path)
            answer = {"path": str(path), "export_s": export_s, "build_s": build_s}
        except Exception as exc:  # noqa: BLE001 - the test that asked reports it
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        protocol.write(json.dumps(answer) + "\n")
        protocol.flush()


if __name__ == "__main__":
    _serve(Path(sys.argv[1]))
