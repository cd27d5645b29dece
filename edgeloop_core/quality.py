"""Quality measures that the pipeline's gate and the device's validation share, so both judge a model the same way."""

from __future__ import annotations

import numpy as np


def output_agreement(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    """Mean per-sample cosine similarity over every output (1.0: the same direction as the reference)."""
    scores = []
    for name, ref in reference.items():
        a = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
        b = np.asarray(got[name], dtype=np.float64).reshape(len(ref), -1)
        denominator = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        scores.append(np.where(denominator > 0, (a * b).sum(axis=1) / np.maximum(denominator, 1e-30), 1.0))
    return float(np.mean(np.concatenate(scores)))

