"""Python bytecodes executed per request, by source file and by function.

``sys.settrace`` opcode events, no valgrind: deterministic for the same code and inputs,
and it says which Python function a part's instructions come from (bench/hotpath_parts.py
and bench/proxy_parts.py ``opcodes``). Only Python is counted, not C.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

__all__ = ["OpcodeCount"]


def _short(path: str) -> str:
    """A source path without its site-packages or checkout prefix."""
    for marker in ("site-packages/", "/gateway/", "/bench/", "/lib/python3.11/"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return ("gateway/" if marker == "/gateway/" else "") + tail
    return path


class OpcodeCount:
    """Counts opcodes per (file, function) between :meth:`start` and :meth:`stop`."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def _tracer(self, frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            self.counts[(code.co_filename, code.co_qualname)] += 1
        return self._tracer

    def start(self) -> None:
        """Forget what was counted and count from now on (this thread)."""
        self.counts.clear()
        sys.settrace(self._tracer)

    def stop(self) -> None:
        """Stop counting."""
        sys.settrace(None)

    def report(self, label: str, requests: int, top: int) -> None:
        """Print the bytecodes per request in all, by file (25) and by function (``top``)."""
        counts = self.counts
        by_file: Counter[str] = Counter()
        for (filename, _), c in counts.items():
            by_file[_short(filename)] += c
        print(
            f"\n{label}: {sum(counts.values()) / requests:.0f} bytecodes per request (Python only)"
        )
        for filename, c in by_file.most_common(25):
            print(f"  {c / requests:7.1f}  {filename}")
        print("  top functions:")
        for (filename, func), c in counts.most_common(top):
            print(f"  {c / requests:7.1f}  {_short(filename)}:{func}")
