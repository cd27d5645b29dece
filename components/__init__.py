"""The pipeline's steps as plain, testable functions (``components/<step>.py``) and their thin KFP v2 wrappers
(:mod:`components.steps`)."""
