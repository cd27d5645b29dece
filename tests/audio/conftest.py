"""A small keyword-spotting data set in the Google Speech Commands layout, spoken by Debian's espeak-ng."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
VOICES = ("en+m1", "en+m3", "en+f1", "en+f3", "en-us+m2", "en-us+f2")
SPEEDS = (130, 165, 200)


def _speak(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    import io
    import wave

    from scipy.signal import resample_poly

    from edge_runtime.features import MelConfig, fit_length

    raw = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
                         capture_output=True, check=True, timeout=30).stdout
    with wave.open(io.BytesIO(raw)) as wav:
        rate = wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    samples = resample_poly(samples, 16000, rate).astype(np.float32)
    return fit_length(samples, MelConfig())


@pytest.fixture(scope="session")
def speech_commands(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng; .ci/run installs it)")
    from edge_runtime.features import write_wav

    root = tmp_path_factory.mktemp("speech_commands")
    rng = np.random.default_rng(0)
    validation, testing = [], []
    for word in WORDS:
        (root / word).mkdir()
        clips = [(v, s) for v in VOICES for s in SPEEDS]
        for index, (voice, speed) in enumerate(clips):
            name = f"{voice.replace('+', '_')}_{speed}_nohash_{index}.wav"
            write_wav(root / word / name, _speak(word, voice, speed, int(rng.integers(35, 65))))
            # the held-out clips: one voice per split, never seen in training
            if voice == "en+f3":
                validation.append(f"{word}/{name}")
            elif voice == "en-us+m2":
                testing.append(f"{word}/{name}")
    (root / "validation_list.txt").write_text("\n".join(validation) + "\n")
    (root / "testing_list.txt").write_text("\n".join(testing) + "\n")
    (root / "_background_noise_").mkdir()
    t = np.arange(16000 * 4) / 16000
    write_wav(root / "_background_noise_" / "white_noise.wav", 0.3 * rng.standard_normal(len(t)))
    hum = 0.2 * np.sin(2 * np.pi * 50 * t) + 0.05 * rng.standard_normal(len(t))
    write_wav(root / "_background_noise_" / "hum.wav", hum)
    return root
