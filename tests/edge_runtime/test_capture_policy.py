"""Capture policies: the schema in the contract, the desired file's capture blocks, and the hard-example rules by
task (no runtime needed: fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_runtime.fetch.desired import DesiredModels
from edge_runtime.report.capture.budget import Budget
from edge_runtime.report.capture.records import tensor_record
from edge_runtime.report.capture.rules import HardExampleRules, entropy, margin
from edgeloop_core.contract.captures import CaptureLayout, CapturePolicy, HardExamples, shard_name, tensor_array
from edgeloop_core.contract.manifest import Task
from edgeloop_core.errors import ConfigError


def test_capture_blocks_of_the_desired_file_become_policies_and_the_fleet_switch_turns_them_off(
        edge_settings, tmp_path):
    desired = tmp_path / "desired.json"
    desired.write_text(json.dumps({
        "capture": {"spool_max_bytes": 1 << 20},
        "models": [{"name": "digits-cnn", "capture": {"sample_rate": 0.01,
                                                      "hard_examples": {"margin_below": 0.2}}},
                   {"name": "kws"}]}))
    models = DesiredModels(edge_settings("b", desired_file=desired))
    assert set(models.read()) == {"digits-cnn", "kws"}  # the capture block does not upset the model entries
    settings, policies = models.capture_configuration()
    assert settings.enabled and settings.spool_max_bytes == 1 << 20
    assert set(policies) == {"digits-cnn"}  # off by default: kws has no policy
    assert policies["digits-cnn"].sample_rate == 0.01
    assert policies["digits-cnn"].hard_examples.margin_below == 0.2

    desired.write_text(json.dumps({"capture": {"enabled": False},
                                   "models": [{"name": "digits-cnn", "capture": {"sample_rate": 1}}]}))
    settings, policies = models.capture_configuration()
    assert settings.enabled is False and set(policies) == {"digits-cnn"}  # the worker captures nothing then


@pytest.mark.parametrize(("block", "needle"), [
    ({"sample_rate": 2}, "sample_rate"),
    ({"hard_examples": {}}, "names no rule"),
    ({"hard_examples": {"uncertain_band": [0.6, 0.3]}}, "0 <= low < high <= 1"),
    ({"hard_examples": {"expression": "__import__('os').system('x')"}}, "only abs, max"),
    ({"hard_examples": {"expression": "logits.__class__"}}, "Attribute is not allowed"),
    ({"hard_examples": {"entry_point": "not a module"}}, "package.module:function"),
    ({"samplerate": 0.1}, "Extra inputs"),
])
def test_a_bad_capture_block_is_one_readable_config_error(edge_settings, tmp_path, block, needle):
    desired = tmp_path / "desired.json"
    desired.write_text(json.dumps({"models": [{"name": "digits-cnn", "capture": block}]}))
    with pytest.raises(ConfigError) as caught:
        DesiredModels(edge_settings("b", desired_file=desired)).capture_configuration()
    message = str(caught.value)
    assert needle in message and "digits-cnn" in message and "\n" not in message


def test_classifier_rules_margin_and_entropy_on_logits():
    certain = np.array([[10.0, 0.0, 0.0]])
    torn = np.array([[2.0, 2.0, -5.0]])
    assert margin(certain)[0] > 0.99 and margin(torn)[0] < 0.01
    assert entropy(np.array([[0.0, 0.0, 0.0]]))[0] == pytest.approx(1.0)
    rules = HardExampleRules(HardExamples(margin_below=0.1), Task())
    assert rules.judge({}, {"logits": certain}) is None
    fired = rules.judge({}, {"logits": np.concatenate([certain, torn])})  # one hard sample makes a hard request
    assert fired is not None and fired[0] == "margin" and fired[1] < 0.1
    by_entropy = HardExampleRules(HardExamples(entropy_above=0.5), Task())
    assert by_entropy.judge({}, {"logits": torn})[0] == "entropy"
    assert by_entropy.judge({}, {"logits": certain}) is None


def test_detector_rule_counts_boxes_in_the_uncertain_band():
    task = Task(kind="detection", layout="end2end")
    rules = HardExampleRules(HardExamples(uncertain_band=(0.2, 0.5), uncertain_share_above=0.5), task)
    box = [0, 0, 10, 10]
    confident = np.array([[[*box, 0.9, 1], [*box, 0.8, 2], [*box, 0.1, 3]]], np.float32)  # 0.1: not a box at all
    unsure = np.array([[[*box, 0.9, 1], [*box, 0.3, 2], [*box, 0.4, 3]]], np.float32)
    assert rules.judge({}, {"detections": confident}) is None
    fired = rules.judge({}, {"detections": unsure})
    assert fired == ("uncertain_band", pytest.approx(2 / 3))


def test_expression_and_entry_point_rules_for_other_outputs():
    rules = HardExampleRules(HardExamples(expression="max(abs(score)) < 0.2 and count(score[0] > 0) >= 1"), Task())
    assert rules.judge({}, {"score": np.array([[0.1, -0.15]])}) == ("expression", 1.0)
    assert rules.judge({}, {"score": np.array([[0.9, -0.15]])}) is None
    point = HardExampleRules(HardExamples(entry_point="tests.edge_runtime.capture_rule_example:quiet"), Task())
    assert point.judge({"x": np.zeros(1)}, {"y": np.zeros(1)}) == ("entry_point", 1.0)
    assert point.judge({"x": np.zeros(1)}, {"y": np.ones(1)}) is None
    with pytest.raises(ConfigError) as caught:
        HardExampleRules(HardExamples(entry_point="no_such_module_here:judge"), Task())
    assert "cannot be loaded" in str(caught.value)


def test_budgets_cap_items_per_hour_and_bytes_per_day():
    budget = Budget(items_per_hour=2, bytes_per_day=1000)
    budget.spend(0.0, 400)
    budget.spend(1.0, 400)
    assert budget.refusal(2.0, 10) == "budget_items"
    assert budget.refusal(3601.0, 300) == "budget_bytes"  # the hour passed, the day did not
    assert budget.refusal(3601.0, 200) is None
    assert budget.refusal(86401.5, 1000) is None


def test_tensors_round_trip_bit_identical_and_the_layout_keeps_a_device_under_its_prefix():
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    back = tensor_array(tensor_record("input", x))
    assert back.tobytes() == x.tobytes() and back.shape == x.shape
    words = np.array([b"yes", b"", b"no"], dtype=object)
    assert list(tensor_array(tensor_record("text", words))) == [b"yes", b"", b"no"]
    layout = CaptureLayout("fleet")
    from datetime import date

    key = layout.shard_key("jetson-7", "digits-cnn", date(2026, 12, 5), shard_name(["b", "a"]))
    assert key.startswith(layout.device_prefix("jetson-7")) and key.startswith("fleet/captures/jetson-7/models/")
    assert shard_name(["a", "b"]) == shard_name(["b", "a"]) != shard_name(["a"])
    assert CapturePolicy().sample_rate == 0 and CapturePolicy().hard_examples is None  # captures nothing


def test_infer_observers_each_see_every_answer_and_a_failing_one_fails_nothing(caplog):
    from edge_runtime.serve import observers

    class Runtime:  # a served-model set: observers are kept per instance
        pass

    runtime, other, seen = Runtime(), Runtime(), []

    def broken(*args):
        raise RuntimeError("observer bug")

    def watching(request, model, inputs, outputs):
        seen.append(request)

    observers.attach(runtime, broken)
    observers.attach(runtime, watching)
    observers.notify_infer(runtime, "req-1", None, {}, {})  # no exception reaches the request path
    observers.notify_infer(other, "req-2", None, {}, {})
    assert seen == ["req-1"] and "an infer observer failed" in caplog.text
    observers.detach(runtime, broken)
    observers.notify_infer(runtime, "req-3", None, {}, {})
    observers.detach(runtime, watching)
    observers.notify_infer(runtime, "req-4", None, {}, {})
    assert seen == ["req-1", "req-3"]
