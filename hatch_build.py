"""Hatchling build hook: compiles the optional C extension ``gateway.usage._topscan``.

The extension only makes reading usage from JSON answers cheaper (gateway/usage/topscan.py);
everything works without it. So a build where compiling fails (no C compiler, no Python
headers, an unknown platform) says why on stderr and goes on with a pure-Python wheel,
and ``CREDITGATE_PURE_PYTHON=1`` at build time skips compiling altogether.

It is compiled with the C compiler Python was built with (``sysconfig``), plain C99 against
the Python headers, no other library. A standard wheel gets the compiled module added under
``gateway/usage/`` and a platform tag; an editable install (``pip install -e .``) gets it
compiled in place, next to its source, where the source tree's ``gateway`` package finds it
(ignored by git, see .gitignore).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

_SOURCE = Path("gateway/usage/_topscan.c")
_MODULE_DIR = "gateway/usage"


class TopscanBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Compiles ``_topscan.c`` into the wheel when it can, and builds a pure wheel when not."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        """Compile the extension (see the module docstring)."""
        if self.target_name != "wheel":
            return
        if os.environ.get("CREDITGATE_PURE_PYTHON", "") not in ("", "0"):
            self._say("CREDITGATE_PURE_PYTHON is set: not compiling the C extension")
            return
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ""
        if not suffix or sys.platform == "win32":
            self._say("no C extension on this platform: the pure-Python wheel is built")
            return
        root = Path(self.root)
        name = "_topscan" + suffix
        if version == "editable":
            target = root / _MODULE_DIR / name
        else:
            target = Path(tempfile.mkdtemp(prefix="creditgate-build-")) / name
        if not self._compile(root / _SOURCE, target):
            return
        if version != "editable":
            build_data["force_include"][str(target)] = f"{_MODULE_DIR}/{name}"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def _compile(self, source: Path, target: Path) -> bool:
        """Compile and link ``source`` into the shared module ``target``; whether it worked."""
        cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
        include = sysconfig.get_paths()["include"]
        if not (Path(include) / "Python.h").exists():
            self._say(f"no Python headers in {include}: the pure-Python wheel is built")
            return False
        flags = ["-O2", "-std=c99", "-fPIC", "-shared", "-fvisibility=hidden"]
        if sys.platform == "darwin":
            flags += ["-undefined", "dynamic_lookup"]
        command = [*cc, *flags, f"-I{include}", str(source), "-o", str(target)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as error:
            self._say(f"cannot run the C compiler ({error}): the pure-Python wheel is built")
            return False
        if done.returncode != 0:
            self._say(
                f"compiling {source.name} failed: the pure-Python wheel is built\n"
                f"{shlex.join(command)}\n{done.stderr}"
            )
            return False
        return True

    def _say(self, message: str) -> None:
        print(f"creditgate build: {message}", file=sys.stderr)
