"""Quality measures that the pipeline's gate and the device's validation share, so both judge a model the same way.

A model is judged by its task (:class:`~edgeloop_core.contract.Task`), never by one number over a concatenation of
different quantities:

* classifiers: top-1 against labels, or, without labels, top-1 agreement with the FP32 model;
* detectors: COCO mAP@0.5 against labels, or, without labels, the F1 of boxes matched to the FP32 model's after
  decoding and NMS (:mod:`edgeloop_core.detection`);
* anything else: each output, and each declared slice of one, compared with the FP32 model's on its own
  (:func:`tensor_agreement`); a slice that collapsed (all zeros, or no variation left across samples) scores 0.

Every label-free comparison has a negative control (:func:`negative_control`): the same metric on shuffled pairings
of the same outputs. When that still reaches the threshold the validation set cannot tell right from wrong for this
model, and the import says so instead of passing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from edgeloop_core.contract import OutputSlice, Task

    Arrays = dict[str, NDArray[np.generic]]

COLLAPSE_RATIO = 1e-6
"""A part whose variance across samples falls below this share of the reference's has collapsed."""
CONTROL_MARGIN = 0.1
"""The negative control must lie at least this far below the pass threshold for a set to judge a model."""
LABEL_FREE_METRICS = ("output_agreement", "top1_agreement", "tensor_agreement", "detection_f1")
LABEL_FREE_CANDIDATES: dict[str, tuple[str, ...]] = {
    "classification": ("top1_agreement", "tensor_agreement"),
    "keyword_spotting": ("top1_agreement", "tensor_agreement"),
    "detection": ("detection_f1", "tensor_agreement"),
}
"""Label-free metrics per task kind, the task's own first: the next is taken where the first's negative control
shows the held-out set cannot judge with it (a detector that finds nothing on it yet, a classifier that gives
every held-out input one class); kinds not named here use ``tensor_agreement``."""


def output_agreement(reference: Arrays, got: Arrays) -> float:
    """Schema-2 manifests' metric: mean per-sample cosine similarity over every output (1.0: the same direction).

    Kept only to read versions published before tasks existed; it cannot tell a detector whose scores vanished (the
    box coordinates dominate the cosine) nor a server that answers with another sample's output."""
    scores = []
    for name, ref in reference.items():
        a = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
        b = np.asarray(got[name], dtype=np.float64).reshape(len(ref), -1)
        denominator = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        scores.append(np.where(denominator > 0, (a * b).sum(axis=1) / np.maximum(denominator, 1e-30), 1.0))
    return float(np.mean(np.concatenate(scores)))


@dataclass(frozen=True)
class PartScore:
    """One output, or one declared slice of one, compared on its own."""

    part: str
    score: float
    collapsed: bool = False
    reason: str = ""


@dataclass(frozen=True)
class Agreement:
    """Every part's score; the value is the worst part's (a model is as good as its worst output)."""

    parts: tuple[PartScore, ...]

    @property
    def value(self) -> float:
        """The lowest part score (1.0 for a model with no outputs to compare)."""
        return min((p.score for p in self.parts), default=1.0)

    def worst(self) -> PartScore | None:
        """The part that set :attr:`value`."""
        return min(self.parts, key=lambda p: p.score, default=None)

    def describe(self) -> str:
        """One line: each part and its score, collapsed parts with why."""
        return "; ".join(f"{p.part} {p.score:.4f}" + (f" ({p.reason})" if p.reason else "") for p in self.parts)


def _sliced(value: NDArray[np.generic], cut: OutputSlice) -> NDArray[np.generic]:
    if cut.axis >= value.ndim:
        raise ValueError(f"slice {cut.name!r} takes axis {cut.axis} of {cut.output!r}, which has {value.ndim} axes")
    index: list[slice] = [slice(None)] * value.ndim
    index[cut.axis] = slice(cut.start, cut.stop)
    return value[tuple(index)]


def parts_of(outputs: Arrays, slices: Sequence[OutputSlice] = ()) -> dict[str, NDArray[np.generic]]:
    """Each output as one part, except outputs with declared slices: those are split into their slices (named
    ``output[slice]``), so different quantities in one tensor are never judged as one."""
    sliced = {cut.output for cut in slices}
    parts = {name: value for name, value in outputs.items() if name not in sliced}
    for cut in slices:
        if cut.output not in outputs:
            raise ValueError(f"slice {cut.name!r} names output {cut.output!r}, which the model does not have")
        parts[f"{cut.output}[{cut.name}]"] = _sliced(np.asarray(outputs[cut.output]), cut)
    return parts


def _part_score(name: str, reference: NDArray[np.generic], got: NDArray[np.generic]) -> PartScore:
    """Centred cosine per sample: both sides minus the reference's mean over the samples, so what every sample
    shares (a bias, a constant box grid) cannot make different samples look alike."""
    count = len(reference)
    a = np.asarray(reference, dtype=np.float64).reshape(count, -1)
    b = np.asarray(got, dtype=np.float64).reshape(count, -1)
    if a.shape != b.shape:
        return PartScore(name, 0.0, True, f"shape {tuple(np.shape(got))} instead of {tuple(np.shape(reference))}")
    if not np.all(np.isfinite(b)):
        return PartScore(name, 0.0, True, "not finite")
    spread_a, spread_b = float(a.var(axis=0).sum()), float(b.var(axis=0).sum())
    if np.abs(a).max(initial=0.0) > 0 and np.abs(b).max(initial=0.0) == 0:
        return PartScore(name, 0.0, True, "collapsed: all zeros")
    if spread_a > 0 and spread_b <= COLLAPSE_RATIO * spread_a:
        return PartScore(name, 0.0, True, "collapsed: no variation across samples")
    mean = a.mean(axis=0)
    a, b = a - mean, b - mean
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_at_mean = (np.linalg.norm(a, axis=1) < 1e-12) & (np.linalg.norm(b, axis=1) < 1e-12)
    cosine = np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-300), np.where(both_at_mean, 1.0, 0.0))
    return PartScore(name, float(np.mean(cosine)))


def tensor_agreement(reference: Arrays, got: Arrays, slices: Sequence[OutputSlice] = ()) -> Agreement:
    """Each output (or declared slice) of ``got`` against ``reference`` on its own; see :func:`_part_score`."""
    want, have = parts_of(reference, slices), parts_of(got, slices)
    missing = sorted(set(want) - set(have))
    scores = [PartScore(name, 0.0, True, "missing") for name in missing]
    scores += [_part_score(name, want[name], have[name]) for name in want if name in have]
    return Agreement(tuple(scores))


def classifier_output(outputs: Arrays, task: Task) -> NDArray[np.generic]:
    """The scores a classifier's top-1 is taken from: the ``logits`` role, else its only (or first) output."""
    name = task.roles.get("logits") or next(iter(outputs))
    return np.asarray(outputs[name]).reshape(len(outputs[name]), -1)


def top1_accuracy(outputs: Arrays, labels: NDArray[np.generic], task: Task) -> float:
    """Share of samples whose highest score is the label."""
    return float((classifier_output(outputs, task).argmax(axis=1) == np.asarray(labels).reshape(-1)).mean())


def top1_agreement(reference: Arrays, got: Arrays, task: Task) -> float:
    """Share of samples whose top-1 class is the FP32 model's."""
    return float((classifier_output(reference, task).argmax(axis=1) == classifier_output(got, task).argmax(axis=1))
                 .mean())


def derangement(count: int, seed: int = 0) -> NDArray[np.intp]:
    """A seeded permutation that moves every index (for ``count`` ≥ 2): the pairing of a negative control."""
    if count < 2:
        return np.arange(count)
    order = np.random.default_rng(seed).permutation(count)
    shifted = np.empty(count, dtype=np.intp)
    shifted[order] = np.roll(order, 1)  # each sample takes the next one's place in a random cycle
    return shifted


def label_free_value(metric: str, reference: Arrays, got: Arrays, task: Task) -> float:
    """A label-free metric of ``got`` against ``reference`` (the FP32 model's outputs on the same inputs); 0.0 when
    any output or declared slice of ``got`` collapsed, whatever the metric (a collapse always fails)."""
    if metric != "output_agreement" and any(p.collapsed for p in tensor_agreement(reference, got, task.slices).parts):
        return 0.0
    if metric == "top1_agreement":
        return top1_agreement(reference, got, task)
    if metric == "tensor_agreement":
        return tensor_agreement(reference, got, task.slices).value
    if metric == "output_agreement":
        return output_agreement(reference, got)
    if metric == "detection_f1":
        from edgeloop_core.detection import decode, detection_f1

        return detection_f1(decode(reference, task), decode(got, task))
    raise ValueError(f"{metric!r} is not a label-free metric (one of {', '.join(LABEL_FREE_METRICS)})")


def negative_control(metric: str, reference: Arrays, task: Task, seed: int = 0) -> float:
    """The metric of the reference against itself with samples paired wrongly (each with another one's outputs):
    what a server that answers with another request's output would score."""
    count = len(next(iter(reference.values())))
    order = derangement(count, seed)
    return label_free_value(metric, reference, {k: np.asarray(v)[order] for k, v in reference.items()}, task)


def check_informative(metric: str, control: float, threshold: float) -> str | None:
    """Why a validation set cannot judge a model with ``metric`` at ``threshold`` (its negative control reaches too
    close to it), or ``None`` when it can."""
    if control > threshold - CONTROL_MARGIN:
        return (f"the validation set cannot tell right from wrong with {metric}: outputs paired with the wrong "
                f"samples still score {control:.4f} against a threshold of {threshold:.4f}; give labels, or more "
                f"varied validation inputs")
    return None


def default_metric(task: Task, has_labels: bool) -> str:
    """The metric a task is judged by: against labels where the validation set has them, else against FP32."""
    if task.kind == "detection":
        return "detection_map50" if has_labels else "detection_f1"
    if task.kind in ("classification", "keyword_spotting"):
        return "top1_accuracy" if has_labels else "top1_agreement"
    return "tensor_agreement"
