"""A plain (non-editable) install finds the Lua scripts and SQL migrations."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (built,) = out.glob("creditgate-*.whl")
    return built


def test_wheel_carries_scripts_and_migrations(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    lua = sorted(Path(n).name for n in names if n.startswith("gateway/lua/"))
    sql = sorted(Path(n).name for n in names if n.startswith("gateway/migrations/"))
    assert lua == sorted(p.name for p in (ROOT / "lua").glob("*.lua"))
    assert sql == sorted(p.name for p in (ROOT / "migrations").glob("*.sql"))
    assert any(n.startswith("sync/") for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)


def test_installed_wheel_loads_resources_outside_the_source_tree(
    wheel: Path, tmp_path: Path
) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    probe = (
        "import gateway, gateway.redisio.lua_scripts as s, gateway.ledger.migrate as m;"
        "print(gateway.__file__);"
        "print(s.load('charge').sha, len(s.SCRIPT_NAMES));"
        "[s.load(n) for n in s.SCRIPT_NAMES];"
        "print([x.name for x in m.load_migrations()])"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    where, _, migrations = proc.stdout.splitlines()
    assert where.startswith(str(target)), where  # not the source checkout
    assert "0001_core" in migrations
