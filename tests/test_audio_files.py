"""The simulator's WAV reader: 16 kHz mono passes through, 16-bit stereo/44.1 kHz is converted."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from service.tools.device_sim import main as device_main
from service.wav import UnsupportedAudio, read_wav_16k_mono, wav_bytes


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


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_resampling_neither_wraps_around_nor_drifts(tmp_path: Path, rate: int) -> None:
    """Silence, then a tone to the file's last sample: the start stays silent, the end stays in phase.

    The length (1.2345 s) is no whole number of 16 kHz samples, as with most real files.
    """
    t = np.arange(int(rate * 1.2345)) / rate
    with wave.open(str(tmp_path / "tone.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(np.where(t >= 0.5, np.sin(2 * np.pi * 440 * t) * 10000, 0).astype("<i2").tobytes())
    out = read_wav_16k_mono(tmp_path / "tone.wav").astype(float)
    assert len(out) == round(len(t) * 16000 / rate)
    assert np.max(np.abs(out[:800])) <= 1  # the first 50 ms: nothing of the tone at the other end
    tail = slice(len(out) - 1600, len(out) - 160)  # 100 ms, short of the filter's own edge at the very end
    ideal = np.sin(2 * np.pi * 440 * np.arange(len(out))[tail] / 16000) * 10000
    snr_db = 10 * np.log10(np.sum(ideal**2) / np.sum((ideal - out[tail]) ** 2))
    assert snr_db > 60


def test_round_trip_16k_mono(tmp_path: Path) -> None:
    pcm = (np.random.default_rng(1).standard_normal(1600) * 1000).astype(np.int16)
    (tmp_path / "a.wav").write_bytes(wav_bytes(pcm))
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
