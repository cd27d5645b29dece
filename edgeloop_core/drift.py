"""Field statistics for drift: what a model meets on a device, beside what it was trained on.

The pipeline summarises the training data through the model (:func:`build_baseline`) and writes the summary into
the manifest; the device counts what it serves into the same bins (:class:`FieldCounts`) and sends the counts with
its stats; the hub compares the two (:func:`divergence`) per device and model, and ``fleet status`` shows it.

Every statistic is a histogram over bins the baseline fixes, so one measure compares them all: the Jensen–Shannon
distance (base 2, from SciPy: 0 for the same distribution, 1 for disjoint ones). The features:

* ``input:<name>:c<k>:mean`` and ``input:<name>:c<k>:std``: each sample's mean and standard deviation over channel
  ``k`` of an input with channels on axis 1 (an NCHW image, a ``[batch, 1, mels, frames]`` spectrogram; at most
  :data:`MAX_CHANNELS`), or over the whole sample for a flat input (``c0``); binned at the training data's deciles.
  A brighter or darker camera moves the mean, noise or blur moves the standard deviation.
* ``class``: the top-1 class (classifiers and keyword spotters), one bin per class.
* ``confidence``: the top-1 probability (softmax of the scores unless they already sum to 1), ten bins over [0, 1].

The per-channel mean and standard deviation over all samples are kept as moments too (``FieldCounts.moments``), for
people who read numbers rather than histograms.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from edgeloop_core.contract.field import FeatureBaseline, FieldBaseline

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from edgeloop_core.contract import Task

    Arrays = dict[str, NDArray[np.generic]]

MAX_CHANNELS = 8
"""Inputs with more channels than this on axis 1 are summarised as one flat channel (a feature vector, not pixels)."""
CONFIDENCE_EDGES = tuple(round(0.1 * i, 1) for i in range(1, 10))
"""Inner edges of the confidence histogram: ten bins over [0, 1]."""
DECILES = tuple(0.1 * i for i in range(1, 10))
CLASSIFIER_KINDS = ("classification", "keyword_spotting")


def _channel_values(value: NDArray[np.generic]) -> list[tuple[NDArray[np.float64], NDArray[np.float64]]]:
    """Per channel: each sample's mean and standard deviation."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim >= 3 and array.shape[1] <= MAX_CHANNELS:
        per_channel = array.reshape(array.shape[0], array.shape[1], -1)
    else:
        per_channel = array.reshape(array.shape[0], 1, -1)
    return [(per_channel[:, k].mean(axis=1), per_channel[:, k].std(axis=1)) for k in range(per_channel.shape[1])]


def _top1(outputs: Arrays, task: Task) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """Top-1 class and its probability per sample."""
    name = task.roles.get("logits") or next(iter(outputs))
    scores = np.asarray(outputs[name], dtype=np.float64).reshape(len(outputs[name]), -1)
    sums = scores.sum(axis=1)
    if not (np.all(scores >= 0) and np.allclose(sums, 1.0, atol=1e-3)):
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        scores = shifted / shifted.sum(axis=1, keepdims=True)
    return scores.argmax(axis=1), scores.max(axis=1)


def feature_values(inputs: Arrays, outputs: Arrays | None, task: Task | None) -> dict[str, NDArray[np.float64]]:
    """Each feature's value per sample (see the module docstring), for one batch."""
    values: dict[str, NDArray[np.float64]] = {}
    for name, value in inputs.items():
        if np.asarray(value).dtype.kind not in "fiub" or np.asarray(value).ndim < 2:
            continue  # strings, or no sample axis: nothing to summarise
        for k, (means, stds) in enumerate(_channel_values(value)):
            values[f"input:{name}:c{k}:mean"] = means
            values[f"input:{name}:c{k}:std"] = stds
    if outputs and task is not None and task.kind in CLASSIFIER_KINDS:
        classes, confidence = _top1(outputs, task)
        values["class"] = classes.astype(np.float64)
        values["confidence"] = confidence
    return values


def _counts(values: NDArray[np.float64], feature: FeatureBaseline) -> NDArray[np.int64]:
    bins = len(feature.proportions)
    if feature.edges is None:
        index = np.clip(values.astype(np.int64), 0, bins - 1)
    else:
        index = np.searchsorted(np.asarray(feature.edges), values, side="right")
    return np.bincount(index, minlength=bins).astype(np.int64)


def build_baseline(inputs: Arrays, outputs: Arrays | None, task: Task | None,
                   num_classes: int | None = None) -> FieldBaseline:
    """The training data's baseline: deciles of each input feature as bin edges, the class and confidence
    histograms of the model's outputs on it. ``inputs``/``outputs`` are whole data sets (or a large sample);
    ``num_classes`` defaults to the width of the classifier's scores."""
    features: dict[str, FeatureBaseline] = {}
    values = feature_values(inputs, outputs, task)
    samples = len(next(iter(values.values()))) if values else 0
    if samples == 0:
        raise ValueError("a field baseline needs at least one sample with a numeric input")
    for name, column in values.items():
        if name == "class" and outputs and task is not None:
            scores = outputs[task.roles.get("logits") or next(iter(outputs))]
            bins = num_classes or int(np.prod(np.asarray(scores).shape[1:]))
            feature = FeatureBaseline(edges=None, proportions=[0.0] * bins)
        elif name == "confidence":
            feature = FeatureBaseline(edges=list(CONFIDENCE_EDGES), proportions=[0.0] * (len(CONFIDENCE_EDGES) + 1))
        else:
            edges = sorted({float(e) for e in np.quantile(column, DECILES)})
            feature = FeatureBaseline(edges=edges, proportions=[0.0] * (len(edges) + 1))
        counts = _counts(column, feature)
        features[name] = FeatureBaseline(edges=feature.edges, proportions=[float(c) / samples for c in counts])
    return FieldBaseline(samples=samples, features=features)


class FieldCounts:
    """What a device served, counted into a baseline's bins; :meth:`take` hands the counts over and starts anew.

    Not thread-safe: one owner adds (the serving side's statistics thread) and takes."""

    def __init__(self, baseline: FieldBaseline) -> None:
        self.baseline = baseline
        self.samples = 0
        self.counts = {name: np.zeros(len(f.proportions), dtype=np.int64) for name, f in baseline.features.items()}
        self._moments: dict[str, tuple[int, float, float]] = {}  # feature -> (n, mean, M2), Welford

    def add(self, inputs: Arrays, outputs: Arrays | None, task: Task | None) -> None:
        """Count one batch (inputs as the model received them, outputs as it gave them)."""
        values = feature_values(inputs, outputs, task)
        for name, column in values.items():
            feature = self.baseline.features.get(name)
            if feature is None:
                continue
            self.counts[name] += _counts(column, feature)
            if name.endswith(":mean"):
                self._welford(name, column)
        if values:
            self.samples += len(next(iter(values.values())))

    def _welford(self, name: str, column: NDArray[np.float64]) -> None:
        n, mean, m2 = self._moments.get(name, (0, 0.0, 0.0))
        batch_n, batch_mean = len(column), float(column.mean())
        batch_m2 = float(((column - batch_mean) ** 2).sum())
        total = n + batch_n
        delta = batch_mean - mean
        self._moments[name] = (total, mean + delta * batch_n / total, m2 + batch_m2 + delta ** 2 * n * batch_n / total)

    def moments(self) -> dict[str, tuple[float, float]]:
        """Per ``input:<name>:c<k>``: the mean over samples of each sample's mean, and its standard deviation."""
        return {name.removesuffix(":mean"): (mean, math.sqrt(m2 / n) if n else 0.0)
                for name, (n, mean, m2) in self._moments.items()}

    def take(self) -> dict[str, list[int]]:
        """The counts so far (feature -> per-bin count), then zero."""
        taken = {name: [int(c) for c in counts] for name, counts in self.counts.items()}
        for counts in self.counts.values():
            counts[:] = 0
        self.samples = 0
        self._moments.clear()
        return taken


def divergence(baseline: FieldBaseline, counts: dict[str, list[int]]) -> dict[str, float]:
    """Jensen–Shannon distance (base 2, in [0, 1]) per feature between the baseline and the field's counts; features
    with no field samples, or unknown to the baseline, are left out."""
    from scipy.spatial.distance import jensenshannon

    result: dict[str, float] = {}
    for name, field in counts.items():
        feature = baseline.features.get(name)
        if feature is None or len(field) != len(feature.proportions) or sum(field) == 0:
            continue
        result[name] = float(jensenshannon(np.asarray(feature.proportions), np.asarray(field, dtype=np.float64),
                                           base=2))
    return result
