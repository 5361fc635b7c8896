"""The wire contract's routing table: each bridge → device message type has one topic and QoS."""

from __future__ import annotations

import typing

import pytest

from firmware_protocol import (
    DEVICE_TOPIC_KINDS,
    BridgeMessage,
    BridgeStatus,
    Endpointing,
    EndReason,
    ErrorCode,
    Listening,
    Route,
    SpeechEnded,
    TopicKind,
    Transcript,
    device_route,
)
from firmware_protocol import Error as ErrorMessage


def test_every_bridge_message_but_the_status_has_an_out_topic() -> None:
    assert set(DEVICE_TOPIC_KINDS) == set(typing.get_args(BridgeMessage)) - {BridgeStatus}
    assert all(kind.value.startswith("out/") for kind in DEVICE_TOPIC_KINDS.values())


def test_partials_go_at_qos_0_everything_else_at_qos_1() -> None:
    def transcript(final: bool) -> Transcript:
        return Transcript(session=1, final=final, text="hi", backend="b", start_ms=0, end_ms=10)

    assert device_route(transcript(final=False)) == Route(TopicKind.TRANSCRIPT, 0)
    assert device_route(transcript(final=True)) == Route(TopicKind.TRANSCRIPT, 1)
    listening = Listening(session=1, endpointing=Endpointing.SERVER_VAD, sample_rate=16000)
    assert device_route(listening) == Route(TopicKind.SESSION, 1)
    assert device_route(SpeechEnded(session=1, offset_ms=5, reason=EndReason.SILENCE)) == Route(TopicKind.VAD, 1)
    error = ErrorMessage(code=ErrorCode.TOO_MANY_SESSIONS, message="busy", retryable=True)
    assert device_route(error) == Route(TopicKind.ERROR, 1)
    with pytest.raises(KeyError):
        device_route(BridgeStatus(state="online", version="0", instance="i", protocol=1))
