"""``creditgate demo``: run as a subprocess on embedded services only, then Ctrl-C (SIGINT).

The demo needs no Redis and no Postgres: it gets a fresh data folder and an environment
without any CREDITGATE_* variable, and serves on a free port. It must print a key that
works, keep balances across a restart, exit 0 on SIGINT and leave no process behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

CREDITGATE = Path(sys.executable).parent / "creditgate"
READY_LINE = "Ctrl-C stops everything."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: its parent is private (0700), and run as root the
    # embedded server runs as `nobody`, who must be able to reach the folder.
    path = Path(tempfile.mkdtemp(prefix="cgdemo-"))
    path.chmod(0o755)
    yield path / "data"
    shutil.rmtree(path, ignore_errors=True)


class Demo:
    """A running ``creditgate demo`` and what it printed."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITGATE_")}
        self.proc = subprocess.Popen(
            [str(CREDITGATE), "demo", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, text=True,
        )  # fmt: skip
        self.output: list[str] = []

    def wait_ready(self, timeout: float = 90) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            if line.strip() == READY_LINE:
                return "".join(self.output)
        self.stop()
        raise AssertionError("demo did not become ready:\n" + "".join(self.output))

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def interrupt(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=timeout)
        self.output.append(out)
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def printed(text: str, label: str) -> str:
    match = re.search(rf"^  {label}:\s+(\S+)", text, re.MULTILINE)
    assert match, f"no {label!r} in:\n{text}"
    return match.group(1)


def quest(base: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{base}/api/v1/goals/g1/quests", headers=headers, timeout=10)


def assert_gone(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            alive = p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        assert not alive, f"left behind: {p}"


def test_demo_serves_with_embedded_services_and_stops_cleanly(data_dir: Path) -> None:
    port = free_port()
    demo = Demo("--port", str(port), "--data-dir", str(data_dir))
    try:
        text = demo.wait_ready()
        base, key = printed(text, "gateway"), printed(text, "API key")
        assert base == f"http://127.0.0.1:{port}"
        assert f"curl -i -X POST {base}/api/v1/goals/g1/quests" in text
        assert "/api/v1/tokens/dashboard" in text
        auth = {"Authorization": f"Bearer {key}"}
        first, second = quest(base, auth), quest(base, auth)
        assert first.status_code == 200, first.text
        assert first.json()["org"] == "demo"
        assert (first.headers["x-tokens-remaining"], second.headers["x-tokens-remaining"]) == (
            "17", "14",
        )  # fmt: skip
        assert quest(base, {"Authorization": "Bearer cg_" + "x" * 43}).status_code == 401
        children = demo.descendants()
        assert any("postgres" in p.name() for p in children)
        assert demo.interrupt() == 0, "".join(demo.output)
        assert "creditgate demo stopped" in "".join(demo.output)
        assert_gone(children)
    finally:
        demo.stop()

    # A second run starts from the ledger: same key, same balance.
    again = Demo("--port", str(port), "--data-dir", str(data_dir))
    try:
        text = again.wait_ready()
        assert printed(text, "API key") == key
        resp = quest(base, {"Authorization": f"Bearer {key}"})
        assert resp.headers["x-tokens-remaining"] == "11"
        children = again.descendants()
        assert again.interrupt() == 0
        assert_gone(children)
    finally:
        again.stop()


def test_demo_without_postgres(data_dir: Path) -> None:
    port = free_port()
    demo = Demo("--port", str(port), "--no-postgres", "--data-dir", str(data_dir))
    try:
        text = demo.wait_ready()
        base = printed(text, "gateway")
        assert "X-Org-Id: demo" in text
        resp = quest(base, {"X-Org-Id": "demo"})
        assert resp.status_code == 200 and resp.headers["x-tokens-remaining"] == "17"
        assert demo.interrupt() == 0
    finally:
        demo.stop()
    assert not data_dir.exists()  # nothing written without Postgres


def test_demo_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        demo = Demo("--port", str(port), "--no-postgres")
        out, _ = demo.proc.communicate(timeout=60)
    assert demo.proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="the root case")
def test_demo_as_root_refuses_a_data_dir_nobody_can_reach() -> None:
    private = Path(tempfile.mkdtemp(prefix="cgdemo-private-"))  # 0700, owned by root
    try:
        demo = Demo("--port", str(free_port()), "--data-dir", str(private / "data"))
        out, _ = demo.proc.communicate(timeout=60)
        assert demo.proc.returncode == 2, out
        assert "PostgreSQL refuses to run as root" in out
        assert "cannot reach the data folder" in out and "--data-dir" in out
        assert not (private / "data" / "pgdata").exists()
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_demo_help_says_where_its_data_goes_and_that_it_takes_no_config() -> None:
    """`creditgate demo --help` names both default data folders (root's differs, see
    gateway/commands/demo.py) and says the demo builds its own config."""
    from click.testing import CliRunner

    from gateway.commands.cli import main
    from gateway.commands.demo import ROOT_DATA_DIR

    result = CliRunner().invoke(main, ["demo", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "~/.creditgate/demo" in text
    assert str(ROOT_DATA_DIR) in text
    assert "its own config" in text
