"""One child process under valgrind's callgrind: its total instruction count.

The load-independent measure of the ``bench/*_instructions.py`` and ``bench/*_parts.py``
scripts (callgrind counts instructions, not seconds: the same total for the same binary,
inputs and environment, whatever else the machine is doing). Each script re-runs itself
with ``--child ...`` in the tree under test and compares totals of runs that differ only in
how many times the measured thing happens.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["callgrind_redis_server", "child_instructions"]

_TOTALS = re.compile(r"^(?:summary|totals): (\d+)", re.MULTILINE)


def child_instructions(
    tree: Path, script: Path, args: Sequence[str], *, fixed_hash: bool = False
) -> int:
    """Total instructions of ``python script --child *args``, run in ``tree`` with that
    tree's packages first on the path, under callgrind (children of the child not traced).
    With ``CG_CALLGRIND_KEEP=DIR`` in the environment the whole profile is kept there too
    (``callgrind.<tree>-<script>-<args>.out``: per-function inclusive counts).

    ``fixed_hash`` sets ``PYTHONHASHSEED=0`` (the same dict and set layouts in every run:
    steadier counts for code that hashes strings). Raises :class:`RuntimeError` with the
    end of the child's stderr when it fails, or when callgrind wrote no totals.
    """
    env = {**os.environ, "PYTHONPATH": str(tree)}
    if fixed_hash:
        env["PYTHONHASHSEED"] = "0"
    with tempfile.TemporaryDirectory(prefix="cg-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        done = subprocess.run(
            [
                "valgrind", "--tool=callgrind", "--trace-children=no",
                f"--callgrind-out-file={out}", sys.executable, str(script), "--child", *args,
            ],
            cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(
                f"{script.name} --child {' '.join(args)} failed:\n{done.stderr[-4000:]}"
            )
        text = out.read_text()
        keep = os.environ.get("CG_CALLGRIND_KEEP")
        if keep:  # the whole profile, for callgrind_annotate --inclusive=yes
            name = "-".join([tree.name or "tree", script.stem, *args[:2]]).replace("/", "_")
            Path(keep).mkdir(parents=True, exist_ok=True)
            (Path(keep) / f"callgrind.{name}.out").write_text(text)
        match = _TOTALS.search(text)
        if match is None:
            raise RuntimeError("callgrind wrote no totals")
        return int(match.group(1))


def callgrind_redis_server(workdir: str, port: int) -> subprocess.Popen[bytes]:
    """A redis-server on ``port`` under callgrind, its dumps written to
    ``workdir/cg.out.<pid>`` (``callgrind_control -z`` / ``-d`` mark the measured spans):
    the Redis side of ``bench/lua_instructions.py`` and ``bench/settle_call_instructions.py``."""
    import shutil

    return subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={workdir}/cg.out.%p",
         shutil.which("redis-server") or "redis-server", "--port", str(port),
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
