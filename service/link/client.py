"""One way to turn ``mqtt://host[:port]`` / ``mqtts://host[:port]`` into an aiomqtt client.

The bridge's link, the device simulator and ``tail`` all connect through :func:`mqtt_client`,
so TLS (the system trust store, or a given CA file), the port defaults (1883, 8883 with TLS),
credentials and the clean-session rules are the same everywhere.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

import aiomqtt
from paho.mqtt import client as paho_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SCHEMES = ("mqtt", "mqtts")
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where a broker URL points: host, port (the scheme's default when absent), and whether TLS."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Raise ``ValueError`` for anything but ``mqtt://`` / ``mqtts://`` with a valid port."""
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise ValueError(f"expected mqtt://host[:port] or mqtts://host[:port], got {url!r}")
        return cls(parts.hostname or "localhost", parts.port or DEFAULT_PORTS[parts.scheme], parts.scheme == "mqtts")


def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """Verify the broker's certificate (and host name) against ``ca_file``, else the system store."""
    return ssl.create_default_context(cafile=ca_file or None)


def mqtt_client(
    url: str,
    *,
    identifier: str,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
    protocol: Literal[3, 5] = 3,
    keepalive_s: int = 60,
    will: aiomqtt.Will | None = None,
    timeout_s: float = 10,
) -> aiomqtt.Client:
    """A clean session on either MQTT version: 3.1.1 clean session, or 5 clean start with expiry 0.

    Nothing survives a disconnect, so the broker queues nothing for a client that is gone.
    """
    address = BrokerAddress.parse(url)
    v5 = protocol == 5
    connect_properties = None
    if v5:
        connect_properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect_properties.SessionExpiryInterval = 0
    return aiomqtt.Client(
        hostname=address.host,
        port=address.port,
        username=username or None,
        password=password or None,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        clean_start=True if v5 else paho_client.MQTT_CLEAN_START_FIRST_ONLY,  # paho: v5 only
        clean_session=None if v5 else True,
        properties=connect_properties,
        keepalive=keepalive_s,
        tls_context=tls_context(ca_file) if address.tls else None,
        will=will,
        timeout=timeout_s,
    )
