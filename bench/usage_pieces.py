"""Instructions per call of each piece of a usage cost's read, counted by valgrind.

    .venv/bin/python bench/usage_pieces.py                         # this tree, every piece
    .venv/bin/python bench/usage_pieces.py --tree /tmp/before --tree . --only read-openai2k

bench/usage_instructions.py counts whole requests; this counts the pieces a usage-charged
request adds, each alone: the usage read (``usage_from_json``) of each answer of
bench/usage_tap.py's BODIES and of its ~900-byte answer, the decode alone
(``jsonload.loads``), the hold of ``reserve: auto`` (``VariableCost.hold`` on
bench/usage_tap.py's request) and the price. Per tree and piece, two runs under callgrind,
one calling the piece ``--calls`` times and one calling it 0 times (the same imports and
set-up): the difference over ``--calls`` is one call's instructions. The loop's own cost
(~0.1 k per call) is in every figure alike. Python's hash seed is fixed (PYTHONHASHSEED=0),
so a run repeats to within a few instructions per call, whatever the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

_HERE = Path(__file__).resolve().parent
PIECES = (
    "read-openai900",
    "read-openai2k",
    "read-openai30k",
    "read-anthropic",
    "read-gemini",
    "read-anthropic900",
    "read-anthropic30k",
    "read-gemini900",
    "read-gemini30k",
    "loads-openai2k",
    "loads-openai30k",
    "hold-auto",
    "price",
)


_RESIZED = {
    "anthropic900": ("anthropic", 470),
    "anthropic30k": ("anthropic", 29600),
    "gemini900": ("gemini", 300),
    "gemini30k": ("gemini", 29400),
}
"""Answers of bench/usage_tap.py's BODIES at other sizes: (body, characters of its text)."""


def _resized(name: str) -> bytes:
    """The ``_RESIZED`` answer ``name``: its text changed, its layout kept (built here, so
    that every tree under test counts the same bytes)."""
    from bench.usage_tap import BODIES, _prose

    base, chars = _RESIZED[name]
    doc = json.loads(BODIES[base])
    if base == "anthropic":
        doc["content"][0]["text"] = _prose(chars)
        return json.dumps(doc, separators=(",", ":")).encode()
    doc["candidates"][0]["content"]["parts"][0]["text"] = _prose(chars)
    return json.dumps(doc, indent=2).encode()


def _piece(name: str) -> Callable[[], object]:
    """The call counted for ``name`` (imports from the tree under test)."""
    from bench.usage_tap import BODIES, CHAT_REQUEST, CHAT_RESPONSE

    if name.startswith(("read-", "loads-")):
        from gateway.usage import usage_from_json
        from gateway.usage.jsonload import loads

        kind, _, body_name = name.partition("-")
        if body_name == "openai900":
            body = CHAT_RESPONSE
        elif body_name in _RESIZED:
            body = _resized(body_name)
        else:
            body = BODIES[body_name]
        if kind == "loads":
            return lambda: loads(body)
        provider = "openai" if body_name == "openai900" else "auto"
        if usage_from_json(body, provider) is None:
            raise RuntimeError(f"{name}: no usage read")
        return lambda: usage_from_json(body, provider)
    from gateway.config.costs import CostSpec
    from gateway.metering.usage_tap import VariableCost
    from gateway.usage import PriceTable, usage_from_json

    prices = PriceTable.from_mapping(
        {
            "gpt-4o-mini*": {"input": 1, "cached_input": 0.5, "output": 4},
            "default": {"input": 2, "output": 8},
        }
    )
    if name == "hold-auto":
        spec = CostSpec("usage", 1000, None, True, None, "openai", None, None, "charge_reserve")
        cost = VariableCost(spec, prices, 0.0)
        return lambda: cost.hold(CHAT_REQUEST, "/auto/v1/chat/completions")
    if name == "price":
        usage = usage_from_json(CHAT_RESPONSE, "openai")
        assert usage is not None
        return lambda: prices.cost(usage, 1000)
    raise SystemExit(f"unknown piece {name!r}")


def _child(name: str, calls: int) -> None:
    call = _piece(name)
    for _ in range(calls):
        call()


def _count(tree: Path, name: str, calls: int) -> int:
    # Imported here: a child runs this file with an older tree first on its path.
    from bench.callgrind import child_instructions

    return child_instructions(tree, _HERE / "usage_pieces.py", [name, str(calls)], fixed_hash=True)


def main() -> None:
    """Print instructions per call of each piece, per tree."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tree", action="append", type=Path, help="a checkout (repeatable)")
    parser.add_argument("--only", action="append", help=f"a piece of {', '.join(PIECES)}")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, os.getcwd())  # the tree under test
        _child(args.child[0], int(args.child[1]))
        return
    trees = args.tree or [_HERE.parent]
    print(f"instructions per call (callgrind, {args.calls} calls minus 0; lower is better)")
    for name in args.only or PIECES:
        figures = []
        for tree in trees:
            per = (_count(tree, name, args.calls) - _count(tree, name, 0)) / args.calls
            figures.append(f"{tree!s:<24} {per / 1000:7.2f} k")
        print(f"  {name:<16} " + "  ".join(figures), flush=True)


if __name__ == "__main__":
    main()
