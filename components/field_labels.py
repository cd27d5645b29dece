"""What an app's label means for a captured request (docs/flywheel.md): which samples of the batch it labels and
which class it names. Shared by the teacher (:mod:`components.teacher`: which samples still need a label) and the
field-data step (:mod:`components.field_data`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeloop_core.contract.manifest import Manifest


def app_values(value: Any, batch: int) -> list[tuple[int, Any]]:  # noqa: ANN401 - any JSON value
    """``(sample, value)`` pairs an app's label gives: one value labels a batch of one; a list as long as the batch
    labels each sample (None: that sample unlabelled); anything else labels nothing."""
    if isinstance(value, list):
        return [(i, v) for i, v in enumerate(value) if v is not None] if len(value) == batch else []
    return [(0, value)] if batch == 1 and value is not None else []


def class_of(value: Any, manifest: Manifest) -> str | None:  # noqa: ANN401 - any JSON value
    """A captured label's class name: an index into the answering manifest's labels, or a class name itself."""
    names = manifest.labels
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return names[value] if 0 <= value < len(names) else None
    if isinstance(value, str):
        if value in names:
            return value
        return class_of(int(value), manifest) if value.strip().isdigit() else None
    return None
