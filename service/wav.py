"""PCM and WAV: the one WAV writer and reader of the bridge and its tools.

Recognisers upload 16 kHz mono 16-bit WAVs (:func:`wav_bytes`, the file EchoKit uploads: RIFF, a
16-byte ``fmt `` chunk, PCM); the device simulator reads any 16-bit WAV (:func:`read_wav_16k_mono`).
"""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import soxr

from firmware_protocol import SAMPLE_RATE


class UnsupportedAudio(ValueError):
    pass


def read_wav_16k_mono(path: str | Path) -> np.ndarray:
    """Read a PCM WAV; down-mix and resample 16-bit input; refuse what would need guessing."""
    try:
        with wave.open(str(path), "rb") as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            data = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise UnsupportedAudio(
            f"{path}: not a PCM WAV file ({exc}); convert it: sox IN -r 16000 -c 1 -b 16 OUT.wav"
        ) from None
    if width != 2:
        raise UnsupportedAudio(
            f"{path}: {8 * width}-bit samples; only 16-bit PCM is read. Convert: sox {path} -r 16000 -c 1 -b 16 out.wav"
        )
    samples = np.frombuffer(data, dtype="<i2").reshape(-1, channels).astype(np.float64)
    mono = samples.mean(axis=1)
    if rate != SAMPLE_RATE:  # libsoxr, high quality: a band-limited filter, no wrap-around at the file's ends
        mono = soxr.resample(mono, rate, SAMPLE_RATE)
    pcm: np.ndarray = np.clip(np.round(mono), -32768, 32767).astype(np.int16)
    return pcm


def wav_bytes(pcm: np.ndarray) -> bytes:
    """A 16 kHz mono 16-bit PCM WAV of ``pcm`` (int16 samples), as bytes."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(pcm.astype("<i2", copy=False).tobytes())
    return buffer.getvalue()
