"""File descriptors for ``creditgate serve``: raise the soft ``RLIMIT_NOFILE`` toward the
hard limit, and warn when even that cannot hold what the config asks for.

Every proxied call holds two descriptors for its whole length: the client's socket and
the upstream connection (an SSE stream for minutes). ``upstream_max_connections`` streams
therefore need twice that many, plus some for the rest of the process (listening socket,
Redis and Postgres connections, logs). The soft limit is often 1,024 while the hard limit
is far higher (systemd: 524,288; Docker: 1,048,576); past the soft limit ``accept()`` and
``connect()`` fail with EMFILE, which a client sees as a refused or dropped connection
rather than a clear answer. Raising the soft limit needs no privilege; raising the hard
one does, so that is left to the operator, with a warning that says how.
"""

from __future__ import annotations

import logging

__all__ = ["HEADROOM", "needed_open_files", "raise_open_files_limit"]

HEADROOM = 256
"""Descriptors for everything but the proxied calls (see the module docstring)."""

log = logging.getLogger("creditgate.server")


def needed_open_files(upstream_connections: int) -> int:
    """Descriptors a process needs to carry ``upstream_connections`` calls at once."""
    return 2 * upstream_connections + HEADROOM


def raise_open_files_limit(upstream_connections: int) -> tuple[int, int] | None:
    """Raise this process's soft open-files limit to its hard limit; warn (on the
    ``creditgate.server`` logger) when the result is below
    :func:`needed_open_files`. Returns (soft limit now, needed), or None where there is
    no ``resource`` module (Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    needed = needed_open_files(upstream_connections)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit cannot be the soft one on Linux (nr_open caps it): ask for
    # what is needed instead.
    target = max(soft, needed) if hard == resource.RLIM_INFINITY else hard
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.debug("could not raise the open-files limit to %d: %s", target, exc)
    if soft < needed:
        log.warning(
            "the open-files limit (%d, hard limit %d) cannot hold upstream_max_connections=%d:"
            " each upstream connection and its client socket take a descriptor, %d in all with"
            " %d to spare; past the limit new connections fail. Raise the hard limit"
            " (ulimit -Hn, systemd LimitNOFILE=, docker run --ulimit nofile=N:N) or lower"
            " upstream_max_connections to %d",
            soft, hard, upstream_connections, needed, HEADROOM,
            max(1, (soft - HEADROOM) // 2),
        )  # fmt: skip
    return soft, needed
