"""Path normalisation: the security-critical half of routing.

Security rests on one rule: the path that is matched is the path that is forwarded. The
raw request path is decoded exactly once and normalised (:func:`normalize_path`), matched,
and the same normalised path is re-encoded canonically (:func:`encode_path`) for the
upstream. So ``/api/%76%31/leads//generate/`` and ``/api/v1/x/../leads/generate`` meter
and reach the same handler as ``/api/v1/leads/generate``. Spellings whose meaning differs
between servers (an encoded ``/`` or ``\\``, NUL and control characters, invalid escapes or
UTF-8) are refused outright with :class:`BadPath` instead of guessed at.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, unquote_to_bytes

__all__ = ["AmbiguousPath", "BadPath", "encode_path", "normalize_path", "strip_path_params"]


class BadPath(ValueError):
    """A request path that creditgate refuses to interpret (answered with 400)."""


class AmbiguousPath(BadPath):
    """A path that matches no route as written but a metered one once its ``;`` path
    parameters are dropped, as Java servlet containers (Tomcat, Jetty, Spring) do before
    routing: forwarding it would let such an upstream serve a metered route uncharged
    (``/api/v1/leads/generate;x``, ``/public/..;/api/v1/leads/generate``). Always refused."""


# What sends a path down the slow path: escapes, backslashes, dot segments (and anything
# else starting with "/."), empty segments, a trailing slash, and every byte outside
# printable ASCII. Most real paths have none of these and are returned as they are.
_NEEDS_WORK = re.compile(rb"[^\x21-\x7e]|%|\\|//|/\.|./$")
_ESCAPE = re.compile(rb"%(..)?", re.DOTALL)
_HEX = frozenset(b"0123456789abcdefABCDEF")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
# Decoded characters that are refused: '/' and '\\' would change the segment structure
# between servers; controls (C0, DEL, C1) have no business in a path.
_FORBIDDEN_ESCAPED = frozenset([*range(0x20), 0x7F, 0x2F, 0x5C])
_C1 = re.compile("[\x80-\x9f]")


def normalize_path(raw: bytes | str) -> str:
    """Decode and normalise a raw request path (no query string); raise :class:`BadPath`.

    Percent-decodes once, removes dot segments (``..`` never climbs above the root),
    collapses repeated slashes and drops a trailing slash. A ``str`` is taken to be the
    raw (still encoded) form. The result contains decoded characters (``%25`` becomes ``%``),
    so feed it to :func:`encode_path`, not back to this function.
    """
    if isinstance(raw, str):
        try:
            data = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise BadPath("path is not valid Unicode") from None
    else:
        data = raw
    if not data.startswith(b"/"):
        raise BadPath("path must start with '/'")
    if _NEEDS_WORK.search(data) is None:
        return data.decode("ascii")
    if b"\\" in data:
        raise BadPath("backslash in path")
    if _CONTROL.search(data) is not None:
        raise BadPath("control character in path")
    if b"%" in data:
        for match in _ESCAPE.finditer(data):
            pair = match.group(1)
            if pair is None or pair[0] not in _HEX or pair[1] not in _HEX:
                raise BadPath("invalid percent escape in path")
            if int(pair, 16) in _FORBIDDEN_ESCAPED:
                raise BadPath(f"forbidden percent escape %{pair.decode('ascii')} in path")
        data = unquote_to_bytes(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath("path is not valid UTF-8") from None
    if not text.isascii() and _C1.search(text) is not None:
        raise BadPath("control character in path")
    return _join_segments(text.split("/"))


def _join_segments(segments: Iterable[str]) -> str:
    """Join decoded segments into a path: empty and ``.`` segments dropped, ``..`` removing
    the one before it (never climbing above the root), no trailing slash."""
    out: list[str] = []
    for segment in segments:
        if segment == "" or segment == ".":
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return "/" + "/".join(out)


def strip_path_params(path: str) -> str:
    """A normalised path as a servlet container routes it: each segment cut at its first
    ``;`` (``/a;x=1/b`` -> ``/a/b``; ``/a/..;/b`` -> ``/b``)."""
    return _join_segments(segment.split(";", 1)[0] for segment in path.split("/"))


# RFC 3986 pchar minus '%' (unreserved and alphanumerics are always kept by quote()).
_SAFE = "/:@!$&'()*+,;="
_PLAIN = re.compile(r"[A-Za-z0-9/:@!$&'()*+,;=\-._~]*")


def encode_path(path: str) -> bytes:
    """The canonical percent-encoding of a normalised path, to forward upstream."""
    if _PLAIN.fullmatch(path) is not None:
        return path.encode("ascii")
    return quote(path, safe=_SAFE, encoding="utf-8", errors="strict").encode("ascii")
