"""How a LangGraph ``(namespace, key)`` pair becomes one agentbus shard key, and back.

Layout: ``<root><label_1>/<label_2>/.../<label_n>/<item key>``. Every label and the item
key is one *segment*; a segment keeps the characters agentbus allows in keys except ``/``
and ``~`` verbatim, and writes any other character as ``~XX`` (the hex of each UTF-8
byte). So ``("users", "alice")`` + ``"prefs"`` is ``users/alice/prefs``, an item key
``"a/b c"`` is the one segment ``a~2Fb~20c``, and splitting on ``/`` always recovers the
namespace and the key. Three segments are escaped although their characters are allowed:
the empty string is ``~``, all-dot segments (``.``, ``..``) are ``~2E...`` (URLs would
collapse them), and a final ``history`` is ``~68istory`` (the bus reserves that path).
"""

from __future__ import annotations

import string

_PLAIN = frozenset(string.ascii_letters + string.digits + "._:@+=-")


def encode_segment(text: str) -> str:
    if text == "":
        return "~"
    if set(text) == {"."}:
        return "~2E" * len(text)
    if text == "history":
        return "~68istory"
    out: list[str] = []
    for ch in text:
        if ch in _PLAIN:
            out.append(ch)
        else:
            out.extend(f"~{b:02X}" for b in ch.encode())
    return "".join(out)


def decode_segment(seg: str) -> str:
    if seg == "~":
        return ""
    raw = bytearray()
    i = 0
    while i < len(seg):
        if seg[i] == "~":
            raw += bytes.fromhex(seg[i + 1 : i + 3])
            i += 3
        else:
            raw += seg[i].encode()
            i += 1
    return raw.decode()


def shard_key(root: str, namespace: tuple[str, ...], key: str) -> str:
    """The shard key of item ``key`` in ``namespace`` under the store's ``root``."""
    return root + "/".join([*(encode_segment(label) for label in namespace), encode_segment(key)])


def namespace_prefix(root: str, namespace: tuple[str, ...]) -> str:
    """The listing prefix covering ``namespace`` and every namespace below it."""
    return root + "".join(encode_segment(label) + "/" for label in namespace)


def split_key(root: str, shard: str) -> tuple[tuple[str, ...], str] | None:
    """``(namespace, key)`` of a shard key under ``root``; None for a key this layout did not make."""
    if not shard.startswith(root):
        return None
    try:
        parts = [decode_segment(seg) for seg in shard[len(root) :].split("/")]
    except ValueError:
        return None
    return tuple(parts[:-1]), parts[-1]
