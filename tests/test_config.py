"""Configuration: EchoKit's [asr] accepted as is, every problem reported with its line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from firmware_protocol import Endpointing
from service.config import (
    ConfigError,
    ElevenLabsSettings,
    OpenAISettings,
    ParaformerSettings,
    PocketsphinxSettings,
    load_config,
    parse_config,
)

CONFIG_DIR = Path(__file__).parent.parent / "config"


def test_defaults_match_echokit() -> None:
    config = parse_config("")
    vad = config.asr.vad
    assert (vad.threshold, vad.min_speech_duration_ms, vad.max_silence_duration_ms, vad.hangover_ms) == (
        0.5,
        400,
        200,
        500,
    )
    assert vad.effective_neg_threshold == pytest.approx(0.35)
    assert config.asr.platform == "pocketsphinx"
    assert config.session.endpointing is Endpointing.SERVER_VAD
    assert config.mqtt.topic_prefix == "echokit"


def test_echokit_asr_section_is_accepted_as_is() -> None:
    text = """
[asr]
platform = "pocketsphinx"
url = "https://api.groq.com/openai/v1/audio/transcriptions"
api_key = "gsk_xxx"
lang = "en"
model = "whisper-large-v3"
prompt = "Hello\\n(noise)\\n"
vad_url = "http://localhost:9093/v1/audio/vad"

[asr.vad]
threshold = 0.6
hangover_ms = 300
"""
    config = parse_config(text)
    assert config.asr.vad.threshold == 0.6 and config.asr.vad.hangover_ms == 300
    assert config.asr.vad.effective_neg_threshold == pytest.approx(0.45)


def test_every_problem_is_listed_with_line_and_field() -> None:
    text = """[mqtt]
url = "http://broker"
[asr]
platform = "telepathy"
[asr.vad]
threshold = 1.5
min_speech_duration_ms = "long"
[session]
max_sessions = 0
bogus = 1
[devices]
allow = ["ok_id", "not ok!"]
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "bridge.toml")
    found = {(p.field, p.line) for p in caught.value.problems}
    assert found == {
        ("mqtt.url", 2),
        ("asr.platform", 4),
        ("asr.vad.threshold", 6),
        ("asr.vad.min_speech_duration_ms", 7),
        ("session.max_sessions", 9),
        ("session.bogus", 10),
        ("devices.allow[1]", 12),
    }
    assert "bridge.toml:6: asr.vad.threshold" in str(caught.value)


def test_broken_toml_names_the_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config('[mqtt]\nurl = "mqtt://x"\npassword = "unterminated\n', "broken.toml")
    (problem,) = caught.value.problems
    assert problem.line == 3 and problem.field == "<toml>"


def test_environment_variables_fill_secrets_and_missing_ones_are_named() -> None:
    text = '[mqtt]\nurl = "mqtt://h:1883"\nusername = "${USER_X}"\npassword = "${PASS_X}"\n'
    config = parse_config(text, env={"USER_X": "bridge", "PASS_X": "s3cret"})
    assert (config.mqtt.username, config.mqtt.password) == ("bridge", "s3cret")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env={"USER_X": "bridge"})
    (problem,) = caught.value.problems
    assert problem.field == "mqtt.password" and problem.line == 4 and "PASS_X" in problem.message


@pytest.mark.parametrize("platform", ["openai", "OpenAI", "whisper", "Whisper", "paraformer_v2", "elevenlabs"])
def test_echokit_platform_spellings_are_accepted(platform: str) -> None:
    assert parse_config(f'[asr]\nplatform = "{platform}"\n').asr.platform == platform


def test_fallbacks_are_checked_one_by_one_with_their_lines() -> None:
    text = """[asr]
platform = "openai"

[[asr.fallback]]
platform = "pocketsphinx"
timeout_s = -1

[[asr.fallback]]
platform = "carrier-pigeon"
[asr.fallback.vad]
threshold = 7
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    found = {(p.field, p.line) for p in caught.value.problems}
    assert found == {
        ("asr.fallback[0].timeout_s", 6),
        ("asr.fallback[1].platform", 9),
        ("asr.fallback[1].vad.threshold", 11),
    }


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_examples_are_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MQTT_PASSWORD", "OPENAI_API_KEY", "GROQ_API_KEY", "GATEWAY_API_KEY", "DASHSCOPE_API_KEY"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("ELEVENLABS_API_KEY", "x")
    load_config(path)


def test_check_config_command_exits_non_zero_and_lists_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[asr.vad]\nthreshold = 2\n[session]\nmax_sessions = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "check-config", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert f"{bad}:2: asr.vad.threshold" in result.stderr
    assert f"{bad}:4: session.max_sessions" in result.stderr
    good = tmp_path / "good.toml"
    good.write_text('[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n')
    ok = subprocess.run(
        [sys.executable, "-m", "service.cli", "check-config", str(good)], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "OK" in ok.stdout


def test_a_password_in_a_bad_url_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config('[mqtt]\nurl = "http://bridge:hunter2@broker:1883"\n')
    (problem,) = caught.value.problems
    assert problem.field == "mqtt.url" and "hunter2" not in str(caught.value) and "***" in problem.message


def test_a_devices_table_is_checked_with_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text('[asr.vad]\nwebrtc_mode = 2\n\n[devices.garage]\nvad_engine = "webrtc"\nwebrtc_mode = 7\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = caught.value.problems
    assert (problem.field, problem.line) == ("devices.garage.webrtc_mode", 6) and "<= 3" in problem.message
    assert str(problem).startswith(f"{path}:6: devices.garage.webrtc_mode: ")
    path.write_text(path.read_text().replace("webrtc_mode = 7", "webrtc_mode = 0"))
    config = load_config(path)
    assert config.devices.tuning["garage"].webrtc_mode == 0 and config.asr.vad.webrtc_mode == 2


@pytest.mark.parametrize(
    ("platform", "settings"),
    [
        ("pocketsphinx", PocketsphinxSettings),
        ("openai", OpenAISettings),
        ("Whisper", OpenAISettings),
        ("paraformer_v2", ParaformerSettings),
        ("elevenlabs", ElevenLabsSettings),
    ],
)
def test_the_platform_chooses_the_settings_struct(platform: str, settings: type) -> None:
    config = parse_config(f'[asr]\nplatform = "{platform}"\ntimeout_s = 4\n[[asr.fallback]]\nplatform = "openai"\n')
    assert type(config.asr.backend) is settings and config.asr.backend.timeout_s == 4
    assert type(config.asr.fallback[0].backend) is OpenAISettings and config.asr.fallback[0].backend.timeout_s == 10


def test_our_keys_of_another_platform_are_errors_with_their_lines() -> None:
    text = """[asr]
platform = "openai"
stream = true
decoders = 3
[[asr.fallback]]
platform = "pocketsphinx"
mode = "batch"
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "bridge.toml")
    found = {(p.field, p.line) for p in caught.value.problems}
    assert found == {("asr.decoders", 4), ("asr.fallback[0].mode", 7)}
    assert "bridge.toml:4: asr.decoders: a setting of platform pocketsphinx, not of 'openai'" in str(caught.value)


def test_echokits_paraformer_token_is_accepted_under_any_platform() -> None:
    config = parse_config('[asr]\nplatform = "whisper"\nparaformer_token = "sk-left-over"\n')
    assert isinstance(config.asr.backend, OpenAISettings)


def test_an_unparsable_broker_url_is_a_problem_not_a_crash() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config('[mqtt]\nurl = "mqtt://bridge:hunter2@[broker"\n')
    (problem,) = caught.value.problems
    assert problem.field == "mqtt.url" and "hunter2" not in problem.message


URL_SECRETS = ("hunter2", "tok3n-query")


@pytest.mark.parametrize(
    "bad",
    [
        "ftp://bridge:hunter2@host:1/?token=tok3n-query",  # a URL of the wrong kind
        "http://bridge:hunter2@[host/?token=tok3n-query",  # a URL that does not parse at all
        "http://bridge:hunter2@host:port/?token=tok3n-query",  # a malformed port
    ],
    ids=["wrong-scheme", "unparsable", "bad-port"],
)
def test_check_config_never_echoes_a_secret_of_any_url_field(tmp_path: Path, bad: str) -> None:
    """Every URL field at once: each is reported with its line, none with its password or query token."""
    path = tmp_path / "secrets.toml"
    path.write_text(
        f'[mqtt]\nurl = "{bad}"\n'
        f'[asr]\nplatform = "openai"\nurl = "{bad}"\nvad_url = "{bad}"\nvad_realtime_url = "{bad}"\n'
        f'[[asr.fallback]]\nplatform = "elevenlabs"\nurl = "{bad}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "check-config", str(path)], capture_output=True, text=True
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output
    for field in ("mqtt.url", "asr.vad_url", "asr.vad_realtime_url"):
        assert f": {field}: " in output, output
    if bad != "ftp://bridge:hunter2@host:1/?token=tok3n-query":  # a wrong scheme is the backend's to refuse
        assert ": asr.url: " in output and ": asr.fallback[0].url: " in output, output
    assert not any(secret in output for secret in URL_SECRETS), output


def test_run_refuses_a_malformed_asr_url_without_echoing_its_secrets(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        '[mqtt]\nurl = "mqtt://127.0.0.1:1"\n[metrics]\nenabled = false\n'
        '[asr]\nplatform = "openai"\napi_key = "sk-never-shown"\nurl = "bridge:hunter2@host/v1?token=tok3n-query"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "run", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "asr.url" in output and "Traceback" not in output, output
    assert not any(secret in output for secret in (*URL_SECRETS, "sk-never-shown")), output
