"""Hatchling build hook: compiles the optional C extensions ``gateway.usage._topscan`` and
``sync._entries``.

The extensions only make things cheaper: reading usage from JSON answers
(gateway/usage/topscan.py) and the sync job's decode of stream entries (sync/batch.py);
everything works without them. So a build where compiling fails (no C compiler, no Python
headers, an unknown platform) says why on stderr and goes on with a pure-Python wheel,
and ``CREDITGATE_PURE_PYTHON=1`` at build time skips compiling altogether.

It is compiled with the C compiler Python was built with (``sysconfig``), plain C99 against
the Python headers, no other library. A standard wheel gets each compiled module added next
to its source's place (``gateway/usage/``, ``sync/``) and a platform tag; an editable install
(``pip install -e .``) gets them compiled in place, next to their sources, where the source
tree's packages find them (ignored by git, see .gitignore). One that fails to compile is
left out alone (its package then runs its pure-Python form).
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

# (source, the package directory its module goes to, the module's name)
_EXTENSIONS = (
    (Path("gateway/usage/_topscan.c"), "gateway/usage", "_topscan"),
    (Path("sync/_entries.c"), "sync", "_entries"),
)


class TopscanBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Compiles the extensions into the wheel when it can, and builds a pure wheel when not."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        """Compile the extensions (see the module docstring)."""
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
        built = False
        for source, module_dir, module in _EXTENSIONS:
            name = module + suffix
            if version == "editable":
                target = root / module_dir / name
            else:
                target = Path(tempfile.mkdtemp(prefix="creditgate-build-")) / name
            if not self._compile(root / source, target):
                continue
            if version != "editable":
                build_data["force_include"][str(target)] = f"{module_dir}/{name}"
            built = True
        if built:
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
