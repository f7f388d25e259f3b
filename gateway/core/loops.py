"""The running event loop, found without a system call per lookup.

On CPython 3.11, ``asyncio.get_running_loop()`` calls ``getpid()`` every time (to tell a
forked child from its parent): a real system call since glibc 2.25, and the proxy's short
request made two of them (the charge's Redis socket check and the proxy's upstream client
lookup). 3.12 and later keep the loop in the thread state and make no system call.

:func:`running_loop` answers the same without it, from the thread's async generator hooks:
every asyncio and uvloop loop's ``run_forever`` sets them, per thread, to bound methods of
its own made for that run, and restores the previous ones when the run ends. So while the
thread's first hook is the very object seen with the loop asyncio named last, that run of
that loop is still the one in progress in this thread. Anything else (another run, another
thread's loop, hooks set by other code, no loop) asks asyncio, which also raises outside a
running loop. A forked child forgets what was seen, so it gets asyncio's answer.
"""

from __future__ import annotations

import asyncio
import os
import sys

_hooks = sys.get_asyncgen_hooks
# (the first async generator hook of a loop's run, that loop): the last one asyncio named.
# One tuple, read and replaced whole, so that a thread never pairs one run's hook with
# another's loop. The start value's hook is an object no thread's hooks can be.
_LAST: tuple[object, asyncio.AbstractEventLoop | None] = (object(), None)


def running_loop() -> asyncio.AbstractEventLoop:
    """``asyncio.get_running_loop()``: the same loop, or the same RuntimeError."""
    last = _LAST
    if _hooks()[0] is last[0]:
        return last[1]  # type: ignore[return-value]
    return _ask()


def _ask() -> asyncio.AbstractEventLoop:
    global _LAST
    loop = asyncio.get_running_loop()  # raises RuntimeError outside a running loop
    hook = _hooks()[0]
    if hook is not None and getattr(hook, "__self__", None) is loop:
        _LAST = (hook, loop)  # (the hook kept alive here: its identity is not reused)
    return loop


def _forget() -> None:
    global _LAST
    _LAST = (object(), None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget)
