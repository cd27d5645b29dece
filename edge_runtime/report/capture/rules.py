"""Hard-example rules, by the model's declared task (a policy's ``hard_examples``): evaluated by the capture worker,
never on the request path."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from edgeloop_core.contract.captures import HardExamples, check_expression
from edgeloop_core.contract.manifest import Task
from edgeloop_core.errors import ConfigError


def softmax(values: np.ndarray) -> np.ndarray:
    """Probabilities along the last axis: ``values`` as they are when they already are probabilities (each row
    non-negative, summing to 1), else their softmax (logits)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size and values.min() >= 0 and np.allclose(values.sum(axis=-1), 1.0, atol=1e-3):
        return values
    shifted = np.exp(values - values.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def margin(values: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability of each row (1: certain, 0: a tie)."""
    probabilities = np.sort(softmax(values), axis=-1)
    if probabilities.shape[-1] < 2:
        return np.ones(probabilities.shape[:-1])
    return probabilities[..., -1] - probabilities[..., -2]


def entropy(values: np.ndarray) -> np.ndarray:
    """Entropy of each row's class probabilities over log(classes): 0 certain, 1 uniform."""
    probabilities = softmax(values)
    classes = probabilities.shape[-1]
    if classes < 2:
        return np.zeros(probabilities.shape[:-1])
    return -(probabilities * np.log(np.clip(probabilities, 1e-12, None))).sum(axis=-1) / np.log(classes)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "abs": np.abs, "max": np.max, "min": np.min, "mean": np.mean, "sum": np.sum, "std": np.std,
    "softmax": softmax, "entropy": entropy, "margin": margin, "count": np.count_nonzero,
}
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: np.add, ast.Sub: np.subtract, ast.Mult: np.multiply, ast.Div: np.divide, ast.Pow: np.power,
    ast.Lt: np.less, ast.LtE: np.less_equal, ast.Gt: np.greater, ast.GtE: np.greater_equal, ast.Eq: np.equal,
    ast.NotEq: np.not_equal,
}


def evaluate_expression(tree: ast.AST, names: dict[str, np.ndarray]) -> Any:  # noqa: ANN401 - array or number
    """The value of a checked expression (:func:`check_expression`) with the outputs as ``names``."""
    node = tree.body if isinstance(tree, ast.Expression) else tree
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise KeyError(f"the expression names {node.id!r}, which is not an output of this model")
        return names[node.id]
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](evaluate_expression(node.left, names), evaluate_expression(node.right, names))
    if isinstance(node, ast.Compare):
        left, result = evaluate_expression(node.left, names), True
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = evaluate_expression(right_node, names)
            result = np.logical_and(result, _BINARY[type(op)](left, right))
            left = right
        return result
    if isinstance(node, ast.BoolOp):
        values = [bool(np.any(evaluate_expression(v, names))) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.UnaryOp):
        value = evaluate_expression(node.operand, names)
        return (not np.any(value)) if isinstance(node.op, ast.Not) else (-value if isinstance(node.op, ast.USub)
                                                                          else value)
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)
        return FUNCTIONS[node.func.id](*(evaluate_expression(a, names) for a in node.args))
    if isinstance(node, ast.Subscript):
        return evaluate_expression(node.value, names)[_index(node.slice, names)]
    raise ValueError(f"{type(node).__name__} is not allowed in a capture expression")


def _index(node: ast.AST, names: dict[str, np.ndarray]) -> Any:  # noqa: ANN401 - a numpy index
    if isinstance(node, ast.Slice):
        parts = (node.lower, node.upper, node.step)
        return slice(*(None if p is None else int(evaluate_expression(p, names)) for p in parts))
    if isinstance(node, ast.Tuple):
        return tuple(_index(e, names) for e in node.elts)
    return int(evaluate_expression(node, names))


class HardExampleRules:
    """A policy's ``hard_examples`` made ready to run against one model's task."""

    def __init__(self, rules: HardExamples, task: Task) -> None:
        self.rules, self.task = rules, task
        self.tree = check_expression(rules.expression) if rules.expression else None
        self.function = load_entry_point(rules.entry_point) if rules.entry_point else None

    def judge(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> tuple[str, float] | None:
        """``(rule, score)`` of the first rule that finds this request hard, ``None`` when none does."""
        r = self.rules
        if (r.margin_below is not None or r.entropy_above is not None) and self.task.kind in (
                "classification", "keyword_spotting"):
            logits = classifier_logits(outputs, self.task)
            if r.margin_below is not None and (low := float(margin(logits).min())) < r.margin_below:
                return "margin", low
            if r.entropy_above is not None and (high := float(entropy(logits).max())) > r.entropy_above:
                return "entropy", high
        if r.uncertain_band is not None and self.task.kind == "detection":
            share = uncertain_share(outputs, self.task, r.uncertain_band)
            if share > r.uncertain_share_above:
                return "uncertain_band", share
        if self.tree is not None and np.any(evaluate_expression(self.tree, outputs)):
            return "expression", 1.0
        if self.function is not None and np.any(self.function(outputs, inputs)):
            return "entry_point", 1.0
        return None


def classifier_logits(outputs: dict[str, np.ndarray], task: Task) -> np.ndarray:
    """The classifier's scores, ``[batch, classes]``: the output its task names as ``logits``, else the first."""
    name = task.roles.get("logits") or next(iter(outputs))
    values = np.asarray(outputs[name], dtype=np.float64)
    return values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(1, -1)


def uncertain_share(outputs: dict[str, np.ndarray], task: Task, band: tuple[float, float]) -> float:
    """The largest share, over the request's images, of boxes scoring above ``band[0]`` whose score is below
    ``band[1]`` (decoded as the gate does, :func:`edgeloop_core.detection.decode`); 0 without boxes."""
    from edgeloop_core.detection import decode

    low, high = band
    shares = [float((d.scores < high).mean()) for d in decode(outputs, task.model_copy(
        update={"score_threshold": low})) if len(d)]
    return max(shares, default=0.0)


def load_entry_point(spec: str) -> Callable[..., Any]:
    """The function ``module:function`` names; a ConfigError that says what is missing otherwise."""
    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"capture entry_point {spec!r} cannot be loaded on this device: {exc}") from exc
    if not callable(function):
        raise ConfigError(f"capture entry_point {spec!r} is not a function")
    return function  # type: ignore[no-any-return]
