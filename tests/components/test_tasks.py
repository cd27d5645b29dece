"""Declared output slices: what --slice accepts, and what it refuses in one line."""

from __future__ import annotations

import pytest

from components.tasks import parse_slices, with_slices
from edgeloop_core.contract import Task
from edgeloop_core.errors import ConfigError


def test_slices_parse_with_and_without_an_end():
    head, tail = parse_slices("boxes=output0:1:0:4, scores=output0:1:4")
    assert (head.name, head.output, head.axis, head.start, head.stop) == ("boxes", "output0", 1, 0, 4)
    assert (tail.name, tail.stop) == ("scores", None)
    (colon,) = parse_slices("a=logits/out:0:1:0:4")  # an output name with a colon, its stop given
    assert (colon.output, colon.axis, colon.start, colon.stop) == ("logits/out:0", 1, 0, 4)
    assert parse_slices("") == []


@pytest.mark.parametrize("text", ["boxes", "boxes=output0", "boxes=output0:x:0", "boxes=output0:0:0:4",
                                  "=output0:1:0", "boxes=output0:1:-1"])
def test_a_slice_that_is_not_one_is_refused_in_one_line(text):
    with pytest.raises(ConfigError) as info:
        parse_slices(text)
    assert "name=output:axis:start[:stop]" in str(info.value) and "\n" not in str(info.value)


def test_a_slice_of_an_output_the_model_lacks_is_refused():
    with pytest.raises(ConfigError) as info:
        with_slices(Task(kind="raw"), parse_slices("a=nope:1:0"), ["output0"])
    assert str(info.value) == "--slice a names an output the model does not have (outputs: output0)"
    declared = with_slices(Task(kind="raw"), parse_slices("a=output0:1:0:2"), ["output0"])
    assert [s.name for s in declared.slices] == ["a"]
