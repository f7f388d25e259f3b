"""Redis URLs: the one parser, used both when a config is checked (``redis_url``,
gateway/config/checks.py) and when the connection is built (gateway/redisio/connect.py),
so a URL ``check-config`` accepts is exactly a URL ``serve`` can use.

Forms (``?option=value`` may follow any but ``memory://``):
- ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS): one server;
- ``redis-cluster://[[user]:password@]host[:port][,host[:port]...]``, ``rediss-cluster://``:
  a Redis Cluster, every listed node a seed (any one that answers gives the slot map);
- ``memory://[name]``: an in-process fakeredis server shared by every URL with that name.
Options: ``timeout`` (seconds), ``connections`` (sockets of the pipelined client per
server), ``ssl_cert_reqs`` (``required``/``optional``/``none``) and ``ssl_ca_certs`` (a CA
bundle path) for TLS. The scheme, the credentials and the options are written once, for
every seed; a ``@``, ``,`` or ``/`` inside a user name or password is percent-encoded.

Standard library only: it sits in the bottom layer so that the config checks (layer 3)
can use it without importing the Redis client (layer 4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote

__all__ = ["DEFAULT_PORT", "RedisURL", "parse_redis_url", "redact_url"]

DEFAULT_PORT = 6379
_SCHEMES: dict[str, tuple[Literal["single", "cluster", "memory"], bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "redis-cluster": ("cluster", False),
    "rediss-cluster": ("cluster", True),
    "memory": ("memory", False),
}
_SCHEME_LIST = "redis://, rediss://, redis-cluster://, rediss-cluster:// or memory://"
_CERT_REQS = ("required", "optional", "none")
_OPTIONS = ("timeout", "connections", "ssl_cert_reqs", "ssl_ca_certs")
# What a host name (or IPv6 literal, brackets removed) may not contain: anything that
# would make it a URL of its own, and whitespace (a pasted list with "h1, h2").
_BAD_HOST = re.compile(r"[\s/@?#\[\],]")
_EMBEDDED_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")


@dataclass(frozen=True, slots=True)
class RedisURL:
    """A parsed Redis URL (see the module docstring); ``nodes`` are the seeds, in order."""

    kind: Literal["single", "cluster", "memory"]
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()
    db: int = 0
    username: str | None = None
    password: str | None = None
    name: str = ""
    timeout: float | None = None
    connections: int = 1
    ssl_cert_reqs: str = "required"
    ssl_ca_certs: str | None = None


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: never echo a password in a message."""
    return re.sub(r"(://[^:/@,]*:)[^@]*@", r"\1***@", url)


def _parse_host(text: str, url: str, where: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"redis URL {url!r}: bad IPv6 address {text!r}{where}")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
        if ":" in port_text:  # an IPv6 literal needs brackets: [::1]:6379
            raise ValueError(
                f"redis URL {url!r}: bad host {text!r}{where} (write an IPv6 address"
                " in brackets: [::1]:6379)"
            )
    if not host:
        raise ValueError(f"redis URL {url!r}: missing host name{where}")
    if _BAD_HOST.search(host):
        raise ValueError(f"redis URL {url!r}: bad host name {host!r}{where}")
    if not port_text:
        if text.endswith(":"):
            raise ValueError(f"redis URL {url!r}: empty port for host {host!r}{where}")
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"redis URL {url!r}: bad port {port_text!r} for host {host!r}{where}")
    return host, int(port_text)


def _seeds(netloc: str, kind: str, shown: str) -> tuple[tuple[str, int], ...]:
    parts = netloc.split(",")
    if kind == "single" and len(parts) > 1:
        raise ValueError(
            f"redis URL {shown!r}: several hosts need redis-cluster:// or rediss-cluster://"
        )
    nodes: list[tuple[str, int]] = []
    for index, part in enumerate(parts, 1):
        # Name the seed in errors only when there are several: "seed 2 of 3".
        where = f" (seed {index} of {len(parts)})" if len(parts) > 1 else ""
        if not part.strip():
            if len(parts) == 1:
                raise ValueError(f"redis URL {shown!r}: missing host name")
            raise ValueError(f"redis URL {shown!r}: seed {index} of {len(parts)} is empty")
        node = _parse_host(part, shown, where)
        if node in nodes:
            raise ValueError(
                f"redis URL {shown!r}: seed {node[0]}:{node[1]} is listed twice{where}"
            )
        nodes.append(node)
    return tuple(nodes)


def parse_redis_url(url: str) -> RedisURL:
    """Parse a Redis URL; a bad one raises ``ValueError`` saying what is wrong with it
    (the password hidden)."""
    shown = redact_url(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"redis URL {shown!r}: missing scheme; use {_SCHEME_LIST}")
    if scheme.lower() not in _SCHEMES:
        raise ValueError(f"redis URL {shown!r}: unknown scheme {scheme!r}; use {_SCHEME_LIST}")
    kind, tls = _SCHEMES[scheme.lower()]
    if _EMBEDDED_SCHEME.search(rest.partition("?")[0]):
        # redis-cluster://h1:7000,redis://h2:7001: one scheme, written once, for every seed.
        raise ValueError(
            f"redis URL {shown!r}: a second scheme inside the URL; write the scheme once,"
            f" before every seed: {scheme}://host1:port1,host2:port2"
        )
    rest, _, query = rest.partition("?")
    if "#" in rest or "#" in query:
        raise ValueError(f"redis URL {shown!r}: fragments ('#') are not allowed")
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        options[key] = _option(key, value, tls, kind, shown)
    if kind == "memory":
        return RedisURL("memory", name=rest.strip("/"), **options)

    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        if "," in userinfo:
            raise ValueError(
                f"redis URL {shown!r}: credentials go once, before the first seed"
                " (redis-cluster://user:password@host1:port1,host2:port2); a ',' in a"
                " password is written %2C"
            )
        user, colon, secret = userinfo.partition(":")
        if not colon:
            raise ValueError(
                f"redis URL {shown!r}: user name without a password; "
                "write redis://user:password@host or redis://:password@host"
            )
        username, password = unquote(user) or None, unquote(secret)
    if not netloc:
        raise ValueError(f"redis URL {shown!r}: missing host name")
    nodes = _seeds(netloc, kind, shown)
    path = path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"redis URL {shown!r}: database must be a number, not {path!r}")
    db = int(path or 0)
    if kind == "cluster" and db:
        raise ValueError(f"redis URL {shown!r}: Redis Cluster has only database 0")
    return RedisURL(kind, tls, nodes, db=db, username=username, password=password, **options)


def _option(key: str, value: str, tls: bool, kind: str, shown: str) -> Any:
    if kind == "memory" or key not in _OPTIONS:
        known = "" if kind == "memory" else f"; known: {', '.join(_OPTIONS)}"
        raise ValueError(f"redis URL {shown!r}: unknown option {key!r}{known}")
    if key.startswith("ssl_") and not tls:
        raise ValueError(
            f"redis URL {shown!r}: option {key!r} needs rediss:// or rediss-cluster:// (TLS)"
        )
    bad = ValueError(f"redis URL {shown!r}: bad value {value!r} for option {key!r}")
    if key == "timeout":
        try:
            seconds = float(value)
        except ValueError:
            raise bad from None
        if not 0 < seconds < float("inf"):
            raise bad
        return seconds
    if key == "connections":
        if not value.isdigit() or int(value) < 1:
            raise bad
        return int(value)
    if not value or (key == "ssl_cert_reqs" and value not in _CERT_REQS):
        raise bad
    return value
