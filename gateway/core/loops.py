"""The running event loop, found without a system call per lookup.

On CPython 3.11, ``asyncio.get_running_loop()`` calls ``getpid()`` every time (to tell a
forked child from its parent): a real system call since glibc 2.25, ~1 µs on a host with
the kernel's speculative-execution mitigations, and the proxy's short request made two of
them (the charge's Redis socket check and the proxy's upstream client lookup). 3.12 and
later keep the loop in the thread state and make no system call.

:func:`running_loop` answers the same without it, from the thread's async generator hooks:
every asyncio and uvloop loop sets them to its own methods while it runs in a thread and
restores the previous ones when it stops, and they are per thread. So when the hooks are
the methods of a loop of a type asyncio has named as a running loop before, and that loop
is running, it is the one running in this thread. Anything else (no loop yet, hooks set by
other code, a loop type not seen yet) asks asyncio. A forked child forgets the types, so
it gets asyncio's answer (no running loop).
"""

from __future__ import annotations

import asyncio
import os
import sys

_TYPES: set[type] = set()  # the loop types asyncio has named as running
_hooks = sys.get_asyncgen_hooks


def running_loop() -> asyncio.AbstractEventLoop:
    """``asyncio.get_running_loop()``: the same loop, or the same RuntimeError."""
    loop = getattr(_hooks()[0], "__self__", None)
    if type(loop) in _TYPES and loop.is_running():  # type: ignore[union-attr]
        return loop  # type: ignore[return-value]
    loop = asyncio.get_running_loop()  # raises RuntimeError outside a running loop
    _TYPES.add(type(loop))
    return loop


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_TYPES.clear)
