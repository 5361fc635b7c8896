"""Secret redaction: what a URL or a server's text may show in a log, an error or a device message."""

from __future__ import annotations

import pytest

from service.redact import MASK, Redactor, redact_url, url_host, url_secrets


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mqtt://bridge:hunter2@broker:1883", "mqtt://bridge:***@broker:1883"),
        ("mqtts://tok3n@broker", "mqtts://***@broker"),
        ("mqtt://bridge:@broker", "mqtt://bridge:***@broker"),
        (
            "ws://vad:9093/v1/audio/realtime_vad?token=s3cret&lang=en",
            "ws://vad:9093/v1/audio/realtime_vad?token=***&lang=***",
        ),
        ("http://u:p@[::1]:8000/v1/audio/vad?k=v", "http://u:***@[::1]:8000/v1/audio/vad?k=***"),
        ("https://api.openai.com/v1/audio/transcriptions", "https://api.openai.com/v1/audio/transcriptions"),
        (
            "wss://dashscope.aliyuncs.com/api-ws/v1/inference#frag",
            "wss://dashscope.aliyuncs.com/api-ws/v1/inference#frag",
        ),
    ],
)
def test_redact_url_masks_userinfo_secrets_and_query_values(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_malformed_port_still_hides_the_userinfo() -> None:
    shown = redact_url("http://bridge:hunter2@broker:notaport/x")
    assert "hunter2" not in shown and "bridge" not in shown
    assert shown == f"http://{MASK}@broker:notaport/x"


@pytest.mark.parametrize("text", ["", "not a url", "127.0.0.1:9000/v1/audio/transcriptions", "/just/a/path"])
def test_text_that_is_not_a_url_is_left_alone(text: str) -> None:
    assert redact_url(text) == text


def test_non_url_text_with_userinfo_is_masked() -> None:
    assert "pw" not in redact_url("user:pw@host")


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("mqtts://bridge:hunter2@broker.example:8883/x?token=t", "broker.example:8883"),
        ("http://[::1]:8000/v1/audio/vad", "[::1]:8000"),
        ("wss://api.elevenlabs.io", "api.elevenlabs.io"),
        ("http://u:p@h:notaport/", "h:notaport"),
    ],
)
def test_url_host_is_host_and_port_only(url: str, host: str) -> None:
    assert url_host(url) == host


@pytest.mark.parametrize("text", ["", "not a url", "/path/only", "http://[::1/broken"])
def test_url_host_falls_back_to_the_default(text: str) -> None:
    assert url_host(text, "the ASR server") == "the ASR server"


def test_redactor_masks_every_secret_longest_first() -> None:
    redact = Redactor("abc", "abcdef", "")
    assert redact("key abcdef, then abc") == f"key {MASK}, then {MASK}"
    assert redact("nothing secret") == "nothing secret"


def test_redactor_cuts_after_masking() -> None:
    redact = Redactor("sk_0123456789")
    assert redact("Invalid key sk_0123456789 given", 16) == f"Invalid key {MASK} "[:16]
    assert "sk_0" not in redact("x" * 10 + "sk_0123456789", 12)


def test_an_empty_redactor_changes_nothing() -> None:
    assert Redactor()("text with *** already") == "text with *** already"
    assert Redactor("")("") == ""


@pytest.mark.parametrize(
    "url",
    ["http://u:hunter2@x:abc/?key=tok9", "wss://u:hunter2@[x/?token=tok9", "user:hunter2@host/?token=tok9"],
)
def test_a_url_that_does_not_parse_hides_its_userinfo_and_its_query(url: str) -> None:
    shown = redact_url(url)
    assert "hunter2" not in shown and "tok9" not in shown and shown.endswith(f"?{MASK}")


@pytest.mark.parametrize(
    ("url", "secrets"),
    [
        ("http://u:hunter2@x:8000/v1?key=tok9&lang=en", ("hunter2", "tok9")),
        ("wss://u:hunter2@[x/?token=tok9", ("hunter2", "tok9")),
        ("mqtts://tok3n@broker", ("tok3n",)),
        ("https://api.openai.com/v1/audio/transcriptions", ()),
    ],
)
def test_url_secrets_feed_a_redactor_that_masks_them_wherever_they_are_quoted(url: str, secrets: tuple) -> None:
    assert url_secrets(url) == secrets
    quoted = f"client said: bad credentials {' '.join(secrets)} for {url}"
    assert not any(secret in Redactor(*url_secrets(url))(quoted) for secret in secrets)
