"""Audio features shared by the pipeline and the edge: 16 kHz mono WAV → log-mel spectrogram, in numpy only (no
torchaudio), so a client on the device computes exactly what the model was trained on. The parameters travel in
the manifest's ``preprocessing.params``."""

from __future__ import annotations

import wave
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeloop_core.errors import InvalidInput


@dataclass(frozen=True)
class MelConfig:
    """Log-mel settings (the Speech Commands convention: 25 ms windows, 10 ms hop, 1 s clips)."""

    sample_rate: int = 16000
    n_fft: int = 400
    hop: int = 160
    n_mels: int = 40
    clip_seconds: float = 1.0
    f_min: float = 20.0
    f_max: float = 7600.0

    @property
    def frames(self) -> int:
        """Frames per clip (1 + (samples - n_fft) // hop)."""
        return 1 + (int(self.sample_rate * self.clip_seconds) - self.n_fft) // self.hop

    def to_params(self) -> dict[str, Any]:
        """For ``Preprocessing.params``."""
        return {k: v for k, v in asdict(self).items()}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> MelConfig:
        """From ``Preprocessing.params`` (unknown keys ignored)."""
        return cls(**{k: type(getattr(cls(), k))(v) for k, v in params.items() if k in cls.__dataclass_fields__})


def _mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def mel_filterbank(config: MelConfig) -> npt.NDArray[np.float32]:
    """Triangular filters, shape ``(n_mels, n_fft // 2 + 1)``."""
    bins = config.n_fft // 2 + 1
    freqs = np.linspace(0, config.sample_rate / 2, bins)
    edges = 700.0 * (10 ** (np.linspace(_mel(np.array(config.f_min)), _mel(np.array(config.f_max)),
                                         config.n_mels + 2) / 2595.0) - 1.0)
    bank = np.zeros((config.n_mels, bins), dtype=np.float32)
    for m in range(config.n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        rising = (freqs - lo) / max(mid - lo, 1e-9)
        falling = (hi - freqs) / max(hi - mid, 1e-9)
        bank[m] = np.clip(np.minimum(rising, falling), 0.0, None)
    return bank


def fit_length(samples: np.ndarray, config: MelConfig) -> np.ndarray:
    """Zero-pad or centre-crop to exactly one clip."""
    target = int(config.sample_rate * config.clip_seconds)
    if len(samples) >= target:
        start = (len(samples) - target) // 2
        return samples[start : start + target]
    return np.pad(samples, (0, target - len(samples)))


def log_mel(samples: np.ndarray, config: MelConfig = MelConfig()) -> npt.NDArray[np.float32]:
    """``(1, n_mels, frames)`` float32 log-mel energies of one clip (float samples in [-1, 1])."""
    x: npt.NDArray[np.float32] = fit_length(np.asarray(samples, dtype=np.float32), config)
    frames = np.lib.stride_tricks.sliding_window_view(x, config.n_fft)[:: config.hop][: config.frames]
    spectrum = np.abs(np.fft.rfft(frames * np.hanning(config.n_fft).astype(np.float32), axis=1)) ** 2
    mel = spectrum @ mel_filterbank(config).T
    return np.expand_dims(np.log(mel + 1e-6).T, 0).astype(np.float32)


def read_wav(path: str | Path, config: MelConfig = MelConfig()) -> np.ndarray:
    """16-bit PCM mono WAV at the configured rate → float samples; anything else is an InvalidInput."""
    try:
        with wave.open(str(path), "rb") as wav:
            rate, channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
            raw = wav.readframes(wav.getnframes())
    except (OSError, wave.Error, EOFError) as exc:
        raise InvalidInput(f"{path}: not a readable WAV file ({exc})") from exc
    if rate != config.sample_rate or channels != 1 or width != 2:
        raise InvalidInput(f"{path}: {rate} Hz, {channels} channel(s), {8 * width}-bit; the model expects "
                           f"{config.sample_rate} Hz mono 16-bit PCM")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int = 16000) -> None:
    """Float samples in [-1, 1] → 16-bit PCM mono WAV."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm.tobytes())
