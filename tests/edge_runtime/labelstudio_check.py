"""Checks an `edgeloop data export-labelstudio` project with Label Studio's own SDK (label-studio-sdk), run by
``.tools/labelstudio/bin/python`` (the SDK pins numpy and opencv versions the project's venv cannot take, so it has
a venv of its own; see the Makefile). Not a test module: tests/edge_runtime/test_field_data.py runs it.

Usage: ``python labelstudio_check.py CONFIG.xml TASKS.json EXPORT.json``. Prints one JSON object: how many tasks,
predictions and annotations the SDK's ``LabelInterface`` accepted, the errors it found, and the SDK's own sample
annotation for the config (the shape a person's annotation takes in an export)."""

from __future__ import annotations

import json
import sys

from label_studio_sdk.label_interface import LabelInterface


def main(config_path: str, tasks_path: str, export_path: str) -> None:
    with open(config_path) as fh:
        interface = LabelInterface(fh.read())
    with open(tasks_path) as fh:
        tasks = json.load(fh)
    with open(export_path) as fh:
        exported = json.load(fh)
    errors: list[str] = []
    predictions = annotations = 0
    for i, task in enumerate(tasks):
        for tag in interface.objects:  # each object tag's $variable must be in the task's data
            if tag.value_is_variable and task["data"].get(tag.value_name) is None:
                errors.append(f"task {i}: no data.{tag.value_name} for <{tag.tag}>")
        for prediction in task.get("predictions", []):
            errors += [f"task {i} prediction: {e}" for e in interface.validate_prediction(prediction,
                                                                                          return_errors=True)]
            predictions += 1
    for i, task in enumerate(exported):
        for annotation in task.get("annotations", []):
            if annotation.get("result"):
                if not interface.validate_annotation(annotation):
                    errors.append(f"export task {i}: annotation {annotation.get('id')} refused")
                annotations += 1
    print(json.dumps({"tasks": len(tasks), "predictions": predictions, "annotations": annotations, "errors": errors,
                      "sample_annotation": interface.generate_sample_annotation()}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
