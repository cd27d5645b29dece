"""A small keyword-spotting data set in the Google Speech Commands layout, spoken by Debian's espeak-ng."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeloop.speech import espeak_available, make_speech_commands


@pytest.fixture(scope="session")
def speech_commands(tmp_path_factory) -> Path:
    if not espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng; .ci/run installs it)")
    return make_speech_commands(tmp_path_factory.mktemp("speech_commands"))
