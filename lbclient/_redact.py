"""URLs in what lbclient says: a password never shows.

What lives here: :func:`redact`, applied to every URL lbclient puts in a message, an attempt's
outcome or a span. What may not: anything else.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact"]


def redact(text: str) -> str:
    """``text`` (a URL, or a message holding one) with any URL password replaced."""
    if "@" not in text:
        return text
    return " ".join(_redact_url(word) for word in text.split(" "))


def _redact_url(word: str) -> str:
    if "@" not in word or "://" not in word:
        return word
    try:
        parts = urlsplit(word)
        password = parts.password
    except ValueError:
        return word
    if not password:
        return word
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:[secure]@{hostport}"))
