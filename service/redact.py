"""Secret redaction, in one place: what a URL or a server's text may show in a log, an error or a message.

URLs in the configuration can carry credentials (``mqtt://user:pass@host``, ``ws://host/?token=…``)
and servers echo keys back in error bodies. Everything the bridge prints or publishes about a
backend or a broker goes through :func:`redact_url`, :func:`url_host` or a :class:`Redactor`.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"


def url_host(url: str, default: str = "") -> str:
    """``host[:port]`` of ``url``: never its userinfo, path or query (any may hold a key)."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return default
    return netloc.rpartition("@")[2] or default


def redact_url(url: str) -> str:
    """``url`` with its password (or lone userinfo) and every query value masked; the rest as written.

    Text that is not a URL at all is returned unchanged except for what looks like userinfo.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return _mask_userinfo(url)
    if not parts.netloc:  # no host: not a URL (``user:pw@host`` parses as scheme ``user``)
        return _mask_userinfo(url)
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if colon else f"{MASK}@{hostport}"
    query = parts.query
    if query:
        query = urlencode([(key, MASK) for key, _ in parse_qsl(query, keep_blank_values=True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str) -> tuple[str, ...]:
    """What in ``url`` is secret (its password or lone userinfo, its query values), for a :class:`Redactor`.

    A client library's error may quote them out of the URL they came in; masking the URL alone
    would not catch that.
    """
    head, _, query = url.partition("?")
    netloc = (head.partition("://")[2] or head).partition("/")[0]  # by hand: urlsplit refuses some URLs
    user, colon, password = netloc.rpartition("@")[0].partition(":")
    values = [value for _, value in parse_qsl(query.partition("#")[0], keep_blank_values=True)]
    return tuple(value for value in (password if colon else user, *values) if len(value) >= 4)


def _mask_userinfo(text: str) -> str:
    """A string urlsplit cannot take: its userinfo and its whole query (``?…``) masked, the rest as written."""
    text, question, _ = text.partition("?")
    query = f"?{MASK}" if question else ""
    head, at, tail = text.rpartition("@")
    if not at:
        return text + query
    scheme, sep, _ = head.partition("://")
    return (f"{scheme}{sep}{MASK}@{tail}" if sep else f"{MASK}@{tail}") + query


class Redactor:
    """Masks known secrets (API keys, tokens) in server text before it reaches a log or a device."""

    def __init__(self, *secrets: str) -> None:
        self._secrets = tuple(sorted((s for s in secrets if s), key=len, reverse=True))

    def __call__(self, text: str, limit: int | None = None) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text if limit is None else text[:limit]
