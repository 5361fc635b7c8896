"""Noticing that another client keeps taking the bridge's client id, instead of flapping silently.

A broker disconnects the older of two connections with the same client id. MQTT 5 says so
(reason 0x8E "Session taken over"); on 3.1.1 the socket just closes, so the sign is a connection
the broker ends soon after it was accepted, several times in a row, with reconnects that succeed
(a broker restart fails to reconnect at least once in between).
"""

from __future__ import annotations

SHORT_LIVED_S = 5.0
"""A connection lost sooner than this after its CONNACK counts towards a suspected takeover."""
IN_A_ROW = 3
"""Short-lived connections in a row (with no failed connect between them) that mean a takeover."""


class TakeoverWatch:
    HINT = (
        "another client connected with this bridge's client id (or, on a broker with "
        "use_username_as_clientid, with its username): give every bridge instance its own client id "
        "and broker user, and stop whatever reuses them (deploy/README.md)"
    )

    def __init__(self) -> None:
        self._streak = 0

    @property
    def suspected(self) -> bool:
        """While true, reconnects keep backing off instead of starting over from the first delay."""
        return self._streak > 0

    def closed(self, reason: str, lived_s: float) -> bool:
        """A connection that was up ended (``reason`` as paho words it): whether it was taken over."""
        if "taken over" in reason.lower():
            self._streak += 1
            return True
        self._streak = self._streak + 1 if lived_s < SHORT_LIVED_S else 0
        return self._streak >= IN_A_ROW

    def failed(self) -> None:
        """A connect attempt failed: the broker is away, not contested."""
        self._streak = 0
