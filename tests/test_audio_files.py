"""The simulator's WAV reader: 16 kHz mono passes through, 16-bit stereo/44.1 kHz is converted."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from service.tools.device_sim import main as device_main
from service.wav import UnsupportedAudio, read_wav_16k_mono, write_wav


def test_resamples_and_downmixes_16_bit(tmp_path: Path) -> None:
    t = np.arange(44100) / 44100
    tone = (np.sin(2 * np.pi * 440 * t) * 10000).astype(np.int16)
    stereo = np.stack([tone, tone], axis=1)
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(44100)
        wav.writeframes(stereo.tobytes())
    out = read_wav_16k_mono(path)
    assert len(out) == 16000
    spectrum = np.abs(np.fft.rfft(out.astype(float)))
    assert abs(int(np.argmax(spectrum)) - 440) <= 1  # 1 Hz bins over one second
    assert 9000 < np.max(np.abs(out[100:-100])) < 11000


def test_round_trip_16k_mono(tmp_path: Path) -> None:
    pcm = (np.random.default_rng(1).standard_normal(1600) * 1000).astype(np.int16)
    write_wav(tmp_path / "a.wav", pcm)
    np.testing.assert_array_equal(read_wav_16k_mono(tmp_path / "a.wav"), pcm)


def test_unsupported_files_get_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eight_bit = tmp_path / "8bit.wav"
    with wave.open(str(eight_bit), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(1)
        wav.setframerate(8000)
        wav.writeframes(bytes(800))
    with pytest.raises(UnsupportedAudio, match=r"8-bit.*sox"):
        read_wav_16k_mono(eight_bit)
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    assert device_main(["send", str(text), "--device", "x", "--broker", "mqtt://127.0.0.1:9"]) == 2
    assert "not a PCM WAV file" in capsys.readouterr().err
