"""Which names and sizes are acceptable, so every route and backend rejects the same input."""

from __future__ import annotations

import base64
import re

from agentbus.core.errors import PayloadTooLarge, ValidationFailed

# Spaces and tenants end up inside Redis hash tags and log lines: keep them plain.
SPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Keys allow path-like structure for prefix listings; no whitespace, quotes or braces.
KEY_RE = re.compile(r"^[A-Za-z0-9._~:@+=/-]+$")
SESSION_RE = re.compile(r"^[A-Za-z0-9._:@-]{0,128}$")


def check_space(space: str) -> str:
    if not SPACE_RE.fullmatch(space):
        raise ValidationFailed(
            "invalid space name: use 1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit",
            code="invalid_space",
            space=space[:200],
        )
    return space


def check_key(key: str, *, max_len: int) -> str:
    if not key or len(key) > max_len:
        raise ValidationFailed(f"invalid key: length must be 1-{max_len} characters", code="invalid_key", key=key[:200])
    if not KEY_RE.fullmatch(key):
        raise ValidationFailed(
            "invalid key: allowed characters are A-Z a-z 0-9 and . _ ~ : @ + = / -",
            code="invalid_key",
            key=key[:200],
        )
    if key == "history" or key.endswith("/history"):
        raise ValidationFailed(
            "invalid key: a key may not end in a 'history' segment (that path shows a shard's history)",
            code="invalid_key",
            key=key[:200],
        )
    return key


def check_prefix(prefix: str, *, max_len: int) -> str:
    if prefix == "":
        return prefix
    return check_key(prefix, max_len=max_len)


def check_session(session: str) -> str:
    if not SESSION_RE.fullmatch(session):
        raise ValidationFailed(
            "invalid X-Agent-Session: up to 128 characters of A-Z a-z 0-9 . _ : @ -",
            code="invalid_session",
        )
    return session


def check_value_size(encoded_len: int, *, key: str, max_bytes: int) -> None:
    if encoded_len > max_bytes:
        raise PayloadTooLarge(
            f"value of {key!r} is {encoded_len} bytes encoded; the limit is {max_bytes}",
            code="value_too_large",
            key=key,
            limit=max_bytes,
        )


def encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """Cursors are what :func:`encode_cursor` made; anything else is refused, not skipped."""
    try:
        pad = "=" * (-len(cursor) % 4)
        key = base64.b64decode(cursor + pad, altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationFailed("invalid cursor", code="invalid_cursor") from exc
    if not key or not KEY_RE.fullmatch(key):
        raise ValidationFailed("invalid cursor", code="invalid_cursor")
    return key
