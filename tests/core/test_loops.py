"""gateway/core/loops.py: ``running_loop()`` answers as ``asyncio.get_running_loop()`` does,
without asking asyncio (a getpid() system call on CPython 3.11) once it knows the loop."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop

from gateway.core import loops
from gateway.core.loops import running_loop


@pytest.fixture
def asks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the calls of asyncio.get_running_loop that running_loop makes."""
    calls: list[int] = []
    real = asyncio.get_running_loop

    def counting() -> asyncio.AbstractEventLoop:
        calls.append(1)
        return real()

    monkeypatch.setattr(loops.asyncio, "get_running_loop", counting)
    loops._forget()
    yield calls
    loops._forget()


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_same_loop_asked_once(asks: list[int], new_loop: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_event_loop()
        for _ in range(50):
            assert running_loop() is loop
            await asyncio.sleep(0)

    loop = new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert len(asks) == 1  # the first lookup only: the other 49 made no system call


def test_outside_a_loop_raises_as_asyncio(asks: list[int]) -> None:
    with pytest.raises(RuntimeError):
        running_loop()

    async def main() -> asyncio.AbstractEventLoop:
        return running_loop()

    loop = asyncio.run(main())  # known now, but no longer running
    assert loop.is_closed()
    with pytest.raises(RuntimeError):
        running_loop()


def test_stopped_loop_not_taken_for_the_next(asks: list[int]) -> None:
    async def main() -> asyncio.AbstractEventLoop:
        assert running_loop() is asyncio.get_event_loop()
        return running_loop()

    kept = asyncio.new_event_loop()  # stopped but not closed between its runs
    try:
        first = kept.run_until_complete(main())
        second = asyncio.run(main())  # another loop in the same thread
        assert first is kept and second is not kept
        assert kept.run_until_complete(main()) is kept
    finally:
        kept.close()


def test_loop_moved_to_another_thread(asks: list[int]) -> None:
    """A loop first run here, then run in another thread while this thread runs another
    one: this thread gets its own running loop, not the one it knew."""
    moved = uvloop.new_event_loop()
    mine = uvloop.new_event_loop()

    async def find() -> asyncio.AbstractEventLoop:
        return running_loop()

    assert moved.run_until_complete(find()) is moved  # known in this thread now
    started, release = threading.Event(), threading.Event()

    async def hold() -> None:
        started.set()
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)

    other = threading.Thread(target=moved.run_until_complete, args=(hold(),))
    other.start()
    try:
        assert started.wait(5)
        assert moved.is_running()
        assert mine.run_until_complete(find()) is mine
    finally:
        release.set()
        other.join(5)
        moved.close()
        mine.close()


def test_hooks_set_by_other_code_fall_back(asks: list[int]) -> None:
    async def main() -> None:
        loop = asyncio.get_event_loop()
        assert running_loop() is loop
        old = sys.get_asyncgen_hooks()
        sys.set_asyncgen_hooks(firstiter=lambda agen: None)
        try:
            assert running_loop() is loop  # still right, asked again
        finally:
            sys.set_asyncgen_hooks(*old)

    asyncio.run(main())
    assert len(asks) == 2


def test_threads_each_their_own(asks: list[int]) -> None:
    found: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.AbstractEventLoop]] = {}

    async def main(n: int) -> None:
        for _ in range(5):
            await asyncio.sleep(0.001)
            found[n] = (running_loop(), asyncio.get_event_loop())

    threads = [threading.Thread(target=asyncio.run, args=(main(n),)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(found) == 4
    assert all(got is real for got, real in found.values())
    assert len({id(got) for got, _ in found.values()}) == 4


async def test_proxy_backend_lookup_asks_once(asks: list[int]) -> None:
    """The proxy finds its upstream client per request without asking asyncio each time."""
    from gateway.proxy.app import UpstreamProxy

    proxy = UpstreamProxy("http://127.0.0.1:9")
    try:
        first = proxy._backend()  # made here (its own lookup of the loop too)
        asks.clear()
        assert all(proxy._backend() is first for _ in range(20))
        assert asks == []
    finally:
        await proxy.aclose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_asyncio_answer(asks: list[int]) -> None:
    """A child forked inside a running loop: asyncio says no loop runs there (3.11 checks
    the pid), and running_loop, having forgotten the parent's, says the same."""

    async def main() -> int:
        running_loop()  # seen in the parent
        pid = os.fork()
        if pid == 0:  # the child: exit 0 if running_loop raises as asyncio does
            try:
                asyncio.get_running_loop()
                asyncio_raises = False
            except RuntimeError:
                asyncio_raises = True
            try:
                running_loop()
                ours_raises = False
            except RuntimeError:
                ours_raises = True
            os._exit(0 if ours_raises == asyncio_raises else 1)
        return pid

    pid = asyncio.run(main())
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
