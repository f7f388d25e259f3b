"""Request ids: the id of a metered request's hold, its audit event and its log lines."""

from __future__ import annotations

import os
from collections.abc import Iterator

__all__ = ["new_request_id"]


class _RequestIds:
    """Request ids: 32 hex characters, unique across processes and time, and cheap.

    A random 80-bit prefix per process (drawn again in a forked child and when the
    counter runs out) followed by a 48-bit counter: one ``next()`` and one format per id,
    where ``uuid4()`` costs a ``getrandom`` syscall and a UUID object. Ids are unique, not
    unguessable; nothing relies on a request id being secret (holds are settled by the
    process that took them, from its own memory).
    """

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = ""
        self._counter: Iterator[int] = iter(())
        self.reseed()
        # A child forked with this module loaded (gunicorn --preload) must not repeat ids.
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        """Draw a new process prefix and restart the counter."""
        self._prefix = os.urandom(10).hex()
        self._counter = iter(range(1 << 48))

    def __call__(self) -> str:
        return self.next_id()

    def next_id(self) -> str:
        """A new request id (``new_request_id`` is this bound method: cheaper to call)."""
        for n in self._counter:
            return f"{self._prefix}{n:012x}"
        self.reseed()  # 2**48 ids from one prefix: take a new one
        return self.next_id()


new_request_id = _RequestIds().next_id
"""Return a new request id (32 lowercase hex characters, like ``uuid4().hex``)."""
