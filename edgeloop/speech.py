"""A small keyword-spotting data set in the Google Speech Commands layout, spoken by Debian's ``espeak-ng``.

Ten keywords, six voices, three speeds; one voice held out for validation and one for testing (never heard in
training), plus two background-noise recordings. The tests and ``bench/variants.py`` use it; nothing here is
downloaded.

:func:`speak_field` makes the *field* for the keyword-spotting flywheel: the same words from speakers of a voice family
the data set never uses. espeak-ng builds a voice from a language (an accent) and a variant; the data set's voices are
the default formant synthesiser's ``m``/``f`` variants in ``en`` and ``en-us``, while a field speaker is one of
:data:`FIELD_ACCENTS` (other English accents) with a variant of the ``klatt`` family (Dennis Klatt's cascade/parallel
formant synthesiser, a different voice source and formant model), so neither the accent nor the family of any field
speaker was heard in training.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from edgeloop_core.errors import ConfigError

WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
VOICES = ("en+m1", "en+m3", "en+f1", "en+f3", "en-us+m2", "en-us+f2")
SPEEDS = (130, 165, 200)
VALIDATION_VOICE, TEST_VOICE = "en+f3", "en-us+m2"
FIELD_ACCENTS = ("en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
"""English accents of espeak-ng that :data:`VOICES` never use (Scottish, Caribbean, New York, RP, Lancaster, West
Midlands)."""
FIELD_FAMILY = "klatt"
"""The held-out variant family: ``klatt``, ``klatt2`` ... ``klatt6``."""
FIELD_SPEAKERS = tuple(f"{accent}+{FIELD_FAMILY}{'' if i == 0 else i + 1}" for i, accent in enumerate(FIELD_ACCENTS))
"""Six field speakers (``en-gb-scotland+klatt``, ``en-029+klatt2``, ...): one accent and one Klatt variant each."""


def espeak_available() -> bool:
    """Whether ``espeak-ng`` is on the PATH."""
    return shutil.which("espeak-ng") is not None


def speak(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One second of 16 kHz mono float32 audio of ``word``."""
    import io
    import wave

    from scipy.signal import resample_poly

    from edgeloop_core.features import MelConfig, fit_length

    raw = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
                         capture_output=True, check=True, timeout=30).stdout
    with wave.open(io.BytesIO(raw)) as wav:
        rate = wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    samples = resample_poly(samples, 16000, rate).astype(np.float32)
    return fit_length(samples, MelConfig())


def voice_family(voice: str) -> tuple[str, str]:
    """``(language, variant family)`` of an espeak-ng voice: ``en-us+m2`` → ``("en-us", "m")``, ``en-029+klatt2`` →
    ``("en-029", "klatt")`` (the variant without its number; ``""`` without a variant)."""
    language, _, variant = voice.partition("+")
    return language, variant.rstrip("0123456789")


def speak_field(speakers: tuple[str, ...] = FIELD_SPEAKERS, *, words: tuple[str, ...] = WORDS,
                speeds: tuple[int, ...] = (140, 175), seed: int = 0) -> list[tuple[str, str, np.ndarray]]:
    """Field clips, ``(speaker, word, one second of 16 kHz float32 audio)`` for each speaker, word and speed (words
    per minute), at a seeded pitch per clip (0..99 scale, 30..70). A speaker whose language or variant family the
    data set uses (:data:`VOICES`) is refused with a ConfigError: the field must be unheard."""
    heard = {voice_family(v)[0] for v in VOICES}, {voice_family(v)[1] for v in VOICES}
    for speaker in speakers:
        language, family = voice_family(speaker)
        if language in heard[0] or family in heard[1]:
            raise ConfigError(f"field speaker {speaker!r} shares its accent or voice family with the training voices "
                              f"({', '.join(VOICES)}): choose an unheard one, e.g. {FIELD_SPEAKERS[0]}")
    if not espeak_available():
        raise ConfigError("espeak-ng is not installed: apt-get install espeak-ng")
    rng = np.random.default_rng(seed)
    return [(speaker, word, speak(word, speaker, speed, int(rng.integers(30, 71))))
            for speaker in speakers for word in words for speed in speeds]


def make_speech_commands(root: Path, *, seed: int = 0) -> Path:
    """Write the data set under ``root`` (created) and return it."""
    if not espeak_available():
        raise ConfigError("espeak-ng is not installed: apt-get install espeak-ng")
    from edgeloop_core.features import write_wav

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    validation, testing = [], []
    for word in WORDS:
        (root / word).mkdir(exist_ok=True)
        clips = [(v, s) for v in VOICES for s in SPEEDS]
        for index, (voice, speed) in enumerate(clips):
            name = f"{voice.replace('+', '_')}_{speed}_nohash_{index}.wav"
            write_wav(root / word / name, speak(word, voice, speed, int(rng.integers(35, 65))))
            if voice == VALIDATION_VOICE:
                validation.append(f"{word}/{name}")
            elif voice == TEST_VOICE:
                testing.append(f"{word}/{name}")
    (root / "validation_list.txt").write_text("\n".join(validation) + "\n")
    (root / "testing_list.txt").write_text("\n".join(testing) + "\n")
    (root / "_background_noise_").mkdir(exist_ok=True)
    t = np.arange(16000 * 4) / 16000
    write_wav(root / "_background_noise_" / "white_noise.wav", 0.3 * rng.standard_normal(len(t)))
    hum = 0.2 * np.sin(2 * np.pi * 50 * t) + 0.05 * rng.standard_normal(len(t))
    write_wav(root / "_background_noise_" / "hum.wav", hum)
    return root
