"""Redis instructions per settle.lua call of its fixed cost: one item whose hold is gone.

    .venv/bin/python bench/settle_call_instructions.py old=/tmp/before/lua/settle.lua \\
        new=lua/settle.lua [--groups 1,4,8] [--calls 2000]

A private redis-server runs under valgrind's callgrind (as in bench/lua_instructions.py);
each named settle.lua variant is assembled as the loader does (the prelude prepended) and
called ``--calls`` times, pipelined by 100, with one shard's keys and one fixed-cost item
whose hold does not exist: the script reads the holds hash (HMGET) and answers -1, writing
nothing, so what is counted is a call's own cost (the command, its keys and values handed
to Lua, the chunk's setup, the reply), not a settle's. ``--groups`` also runs every variant
that has it in settle.lua's multi-shard form with that many groups of one such item each
(a variant without the form answers an error: leave it out). Three rounds, the variants
alternating; printed: the median per call (and the three figures).
"""

from __future__ import annotations

import argparse
import glob
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median_high as med
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.callgrind import callgrind_redis_server
from bench.lua_cpu import _free_port
from gateway.redisio.lua_scripts import LuaScript, assemble


def _keys(shard: int) -> list[str]:
    return [f"P:{{s{shard}}}:holds", f"P:{{s{shard}}}:holdexp", f"P:{{s{shard}}}:events",
            f"P:{{s{shard}}}:org:a", f"P:{{s{shard}}}:x"]  # fmt: skip


def _call(script: LuaScript, groups: int) -> tuple[Any, ...]:
    """EVALSHA's arguments: the single form (groups 0) or the multi-shard form."""
    if groups == 0:
        return (script.sha, 5, *_keys(0), "1", "1", "rid", "c", "200", "1")
    keys: list[str] = []
    args = ["1", "*"]
    for g in range(groups):
        keys += _keys(g)
        args += ["1", "rid", "c", "200", "1"]
    return (script.sha, len(keys), *keys, *args)


def main() -> None:
    """Start redis-server under callgrind, count, stop it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="name=path of a settle.lua")
    parser.add_argument("--groups", default="", help="multi-shard forms: group counts, 1,4,8")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument(
        "--multi", action="append", default=[],
        help="a variant that has the multi-shard form (repeatable; default: all)",
    )  # fmt: skip
    args = parser.parse_args()
    scripts = {
        name: assemble("settle", Path(path).read_text())
        for name, path in (v.split("=", 1) for v in args.variants)
    }
    runs: list[tuple[str, LuaScript, int]] = [(name, s, 0) for name, s in scripts.items()]
    for g in [int(x) for x in args.groups.split(",") if x]:
        runs += [
            (f"{name} x{g} groups", s, g)
            for name, s in scripts.items()
            if not args.multi or name in args.multi
        ]
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="cg-settlecall-")
    proc = callgrind_redis_server(workdir, port)
    seen: set[str] = set()

    def total() -> int:
        for _ in range(400):
            for path in sorted(set(glob.glob(f"{workdir}/cg.out*")) - seen):
                for line in Path(path).read_text().splitlines():
                    if line.startswith(("totals:", "summary:")):
                        seen.add(path)
                        return int(line.split()[1])
            time.sleep(0.05)
        raise SystemExit("callgrind wrote no dump")

    def control(flag: str) -> None:
        subprocess.run(["callgrind_control", flag, str(proc.pid)], check=True, capture_output=True)

    try:
        client = redis.Redis(port=port)
        for _ in range(600):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        for script in scripts.values():
            client.script_load(script.source)
        counts: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        for rnd in range(3):
            for name, script, groups in runs if rnd % 2 == 0 else runs[::-1]:
                command = _call(script, groups)
                control("-z")
                for _ in range(args.calls // 100):
                    pipe = client.pipeline(transaction=False)
                    for _ in range(100):
                        pipe.evalsha(*command)
                    pipe.execute(raise_on_error=False)
                control("-d")
                counts[name].append(total() / (args.calls // 100 * 100))
        for name, values in counts.items():
            print(f"{name:<24} {med(values):>9.0f} per call  "
                  f"({', '.join(f'{v:.0f}' for v in values)})")  # fmt: skip
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
