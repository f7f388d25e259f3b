"""Every documented ``redis_url`` form through the CLI: ``creditgate check-config`` accepts
or refuses it (each refusal a ``file: redis_url: ...`` line), and ``creditgate serve``
starts on it and answers a metered request (issue 10, item 1).

The bug: the README's own cluster URL with several seeds was refused at load by a generic
URL parser ("Port could not be cast to integer value"). Servers here are real: a 3-master
cluster, a password-protected and a TLS redis-server started by the tests, the shared
Redis, a TLS-only 3-master cluster (``rediss-cluster://``), and ``memory://``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from tests.support.redis_servers import (
    Cluster,
    RedisServer,
    TLSFiles,
    free_ports,
    make_tls_files,
    start_cluster,
    start_redis,
)
from tests.support.services import redis_url
from tests.support.upstream_app import app as echo_upstream
from tests.support.upstream_app import serve_in_thread

COST = 3
ALLOCATION = 10


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with start_cluster(free_ports(3, 7410, 7499, cluster=True)) as c:
        yield c


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with serve_in_thread(echo_upstream) as url:
        yield url


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def dead_ports(count: int) -> list[int]:
    """Ports nothing listens on (connecting is refused at once)."""
    return free_ports(count, 7500, 7599)


def write_config(tmp_path: Path, url: str, upstream: str, **extra: object) -> Path:
    data: dict[str, object] = {
        "redis_url": url,
        "database_url": "",
        "upstream": upstream,
        "key_prefix": f"cgt{uuid.uuid4().hex[:10]}",
        "identity": {"trusted_headers": True},
        "features": {"f": {"cost": COST}},
        "plans": {"starter": {"allocations": {"f": ALLOCATION}}},
        "routes": [{"method": "GET", "path": "/echo/{rest:path}", "feature": "f"}],
        # Few enough for any open-files limit: no warning about it in the logs read here.
        "upstream_max_connections": 100,
        **extra,
    }
    path = tmp_path / f"c-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CREDITGATE_")}


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.commands.cli", "check-config", str(path)],
        capture_output=True, text=True, timeout=60, env=environment(),
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(path: Path, tmp_path: Path) -> Iterator[tuple[str | None, subprocess.Popen[bytes], Path]]:
    """Run ``creditgate serve``; yield its base URL once /healthz answers (None if the
    command exited first), the process and the file its stderr goes to."""
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.commands.cli", "serve", "--config", str(path),
             "--port", str(port), "--no-sync", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, env=environment(),
        )  # fmt: skip
    base: str | None = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                base = None
                break
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"serve did not start: {log.read_text()}"
            time.sleep(0.1)
        yield base, proc, log
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def assert_meters(base: str) -> None:
    """Two metered requests: each charged COST from the org's ALLOCATION in this Redis."""
    org = f"org-{uuid.uuid4().hex[:8]}"
    for n in (1, 2):
        r = httpx.get(f"{base}/echo/x", headers={"X-Org-Id": org, "X-User-Id": "u"}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["path"] == "/echo/x"
        assert r.headers["x-tokens-cost"] == str(COST)
        assert r.headers["x-tokens-remaining"] == str(ALLOCATION - n * COST)


# -- check-config ------------------------------------------------------------------------

ACCEPTED = [
    "redis://127.0.0.1:6379/0",
    "redis://cache",
    "redis://:s3cret@127.0.0.1:6380/2?timeout=0.5&connections=2",
    "redis://app:s3cret@[::1]:6379",
    "rediss://cache.internal:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem",
    "redis-cluster://127.0.0.1:7410,127.0.0.1:7411,127.0.0.1:7412",  # the README's own
    "redis-cluster://127.0.0.1:7410",
    "redis-cluster://app:p%2Cw@a:7000,b,[::1]:7002?timeout=1",
    "rediss-cluster://cache.internal:7000",
    "rediss-cluster://:pw@a:7000,b:7001?ssl_cert_reqs=none",
    "memory://",
    "memory://tenant-a",
]


@pytest.mark.parametrize("url", ACCEPTED)
def test_check_config_accepts_every_documented_form(tmp_path: Path, url: str) -> None:
    path = write_config(tmp_path, url, "http://127.0.0.1:9000")
    proc = check_config(path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{path}: ok\n", "")


def test_check_config_accepts_the_design_default_from_the_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path, "${CGTEST_UNSET_REDIS_URL:-redis://127.0.0.1:6379/0}", "http://h")
    assert check_config(path).returncode == 0


REFUSED = [
    ("redis-cluster://127.0.0.1:7410,,127.0.0.1:7412", "seed 2 of 3 is empty"),
    ("redis-cluster://127.0.0.1:7410,127.0.0.1:7411,", "seed 3 of 3 is empty"),
    ("redis-cluster://:7410,127.0.0.1:7411", "missing host name (seed 1 of 2)"),
    (
        "redis-cluster://127.0.0.1:7410,127.0.0.1:74x1",
        "bad port '74x1' for host '127.0.0.1' (seed 2 of 2)",
    ),
    ("redis-cluster://127.0.0.1:7410,127.0.0.1:", "empty port for host '127.0.0.1' (seed 2 of 2)"),
    ("redis-cluster://127.0.0.1:0", "bad port '0' for host '127.0.0.1'"),
    ("redis://127.0.0.1:99999/0", "bad port '99999' for host '127.0.0.1'"),
    ("redis://", "missing host name"),
    ("redis://:6379/0", "missing host name"),
    (
        "redis-cluster://127.0.0.1:7410,redis://127.0.0.1:7411",
        "a second scheme inside the URL; write the scheme once, before every seed:"
        " redis-cluster://host1:port1,host2:port2",
    ),
    (
        "rediss-cluster://a:7000,rediss://b:7001",
        "a second scheme inside the URL; write the scheme once, before every seed:"
        " rediss-cluster://host1:port1,host2:port2",
    ),
    ("redis://127.0.0.1:7410,127.0.0.1:7411", "several hosts need redis-cluster://"
     " or rediss-cluster://"),
    ("redis-cluster://a:7000, b:7001", "bad host name ' b' (seed 2 of 2)"),
    ("redis-cluster://a:7000,a:7000", "seed a:7000 is listed twice (seed 2 of 2)"),
    ("redis-cluster://::1:7000", "bad host '::1:7000' (write an IPv6 address in brackets:"
     " [::1]:6379)"),
    (
        "redis-cluster://a:7000,app:pw@b:7001",
        "credentials go once, before the first seed (redis-cluster://user:password@host1:port1,"
        "host2:port2); a ',' in a password is written %2C",
    ),
    ("redis-cluster://a:7000,b:7001/3", "Redis Cluster has only database 0"),
    ("redis-cluster://a:7000?ssl_cert_reqs=none", "option 'ssl_cert_reqs' needs rediss:// or"
     " rediss-cluster:// (TLS)"),
    ("rediss-cluster://a:7000?ssl_cert_reqs=maybe", "bad value 'maybe' for option 'ssl_cert_reqs'"),
    ("redis-cluster://a:7000?retries=3", "unknown option 'retries'; known: timeout, connections,"
     " ssl_cert_reqs, ssl_ca_certs"),
    ("cluster://a:7000", "unknown scheme 'cluster'; use redis://, rediss://, redis-cluster://,"
     " rediss-cluster:// or memory://"),
    ("127.0.0.1:6379", "missing scheme; use redis://, rediss://, redis-cluster://,"
     " rediss-cluster:// or memory://"),
    ("memory://x?timeout=1", "unknown option 'timeout'"),
]  # fmt: skip


# Where what precedes an "@" may hold a password, the message hides it.
SHOWN = {"redis-cluster://a:7000,app:pw@b:7001": "redis-cluster://a:***@b:7001"}


@pytest.mark.parametrize(("url", "problem"), REFUSED)
def test_check_config_refuses_a_malformed_url_naming_file_and_key(
    tmp_path: Path, url: str, problem: str
) -> None:
    path = write_config(tmp_path, url, "http://127.0.0.1:9000")
    proc = check_config(path)
    assert proc.returncode == 1
    shown = SHOWN.get(url, url)
    assert proc.stderr == f"{path}: redis_url: redis URL {shown!r}: {problem}\n"


def test_a_refused_url_never_shows_its_password(tmp_path: Path) -> None:
    path = write_config(tmp_path, "redis-cluster://app:hunter2@a:7000,b:x", "http://h")
    proc = check_config(path)
    assert proc.returncode == 1 and "hunter2" not in proc.stderr
    assert proc.stderr == (
        f"{path}: redis_url: redis URL 'redis-cluster://app:***@a:7000,b:x':"
        " bad port 'x' for host 'b' (seed 2 of 2)\n"
    )


def test_an_unset_redis_url_variable_is_named(tmp_path: Path) -> None:
    path = write_config(tmp_path, "${CGTEST_UNSET_REDIS_URL}", "http://h")
    proc = check_config(path)
    assert proc.returncode == 1
    assert proc.stderr == (
        f"{path}: redis_url: empty (environment variable CGTEST_UNSET_REDIS_URL is not set)\n"
    )


# -- serve ---------------------------------------------------------------------------------


def test_serve_on_the_readme_cluster_url_with_three_seeds(
    tmp_path: Path, cluster: Cluster, upstream: str
) -> None:
    url = cluster.url
    assert url.count(",") == 2  # redis-cluster://h1:p1,h2:p2,h3:p3, as in the README
    path = write_config(tmp_path, url, upstream)
    assert check_config(path).returncode == 0
    with serve(path, tmp_path) as (base, _, log):
        assert base is not None, log.read_text()
        assert_meters(base)
        assert log.read_text() == ""  # no seed warning: every seed answered


def test_serve_starts_with_one_seed_down_among_three(
    tmp_path: Path, cluster: Cluster, upstream: str
) -> None:
    (dead,) = dead_ports(1)
    live = [f"127.0.0.1:{s.port}" for s in cluster.servers[1:]]
    # The dead seed first: the one every client tries first.
    path = write_config(tmp_path, f"redis-cluster://127.0.0.1:{dead}," + ",".join(live), upstream)
    with serve(path, tmp_path) as (base, _, log):
        assert base is not None, log.read_text()
        assert_meters(base)
        lines = log.read_text().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"warning: {path}: redis_url: seed 127.0.0.1:{dead}: ")
        assert lines[0].endswith("(the cluster was reached through another seed)")


def test_serve_refuses_to_start_with_every_seed_down(tmp_path: Path, upstream: str) -> None:
    ports = dead_ports(3)
    url = "redis-cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    path = write_config(tmp_path, url, upstream)
    assert check_config(path).returncode == 0  # well-formed: only serve connects
    with serve(path, tmp_path) as (base, proc, log):
        assert base is None
        assert proc.wait(timeout=30) == 2
    lines = log.read_text().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(
        f"error: {path}: redis_url: no seed of the Redis Cluster answered at {url}: "
    )
    for port in ports:  # each seed named, with why
        assert f"127.0.0.1:{port}: ConnectionError: " in line
    assert "Traceback" not in line


def test_serve_refuses_an_unreachable_single_redis_unless_fail_open(
    tmp_path: Path, upstream: str
) -> None:
    (dead,) = dead_ports(1)
    url = f"redis://127.0.0.1:{dead}/0"
    path = write_config(tmp_path, url, upstream)
    with serve(path, tmp_path) as (base, proc, log):
        assert base is None and proc.wait(timeout=30) == 2
    assert log.read_text().startswith(f"error: {path}: redis_url: no Redis answered at {url}: ")
    # fail_open asks for availability without Redis: it starts, says so, passes uncharged.
    path = write_config(tmp_path, url, upstream, fail_open=True)
    with serve(path, tmp_path) as (base, _, log):
        assert base is not None, log.read_text()
        assert log.read_text().startswith(f"warning: {path}: redis_url: no Redis answered")
        r = httpx.get(f"{base}/echo/x", headers={"X-Org-Id": "acme"}, timeout=10)
        assert r.status_code == 200 and "x-tokens-cost" not in r.headers


def test_serve_on_the_shared_redis(tmp_path: Path, upstream: str) -> None:
    url = redis_url()
    path = write_config(tmp_path, url, upstream)
    with serve(path, tmp_path) as (base, _, log):
        assert base is not None, log.read_text()
        assert_meters(base)
    prefix = yaml.safe_load(path.read_text())["key_prefix"]
    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        assert keys  # the charges landed in this Redis
        client.delete(*keys)


def test_serve_with_a_password(tmp_path: Path, upstream: str) -> None:
    (port,) = free_ports(1, 7600, 7699)
    with start_redis(port, password="p@ss,w/rd") as server:
        url = f"redis://:p%40ss%2Cw%2Frd@127.0.0.1:{port}/3?timeout=1"
        path = write_config(tmp_path, url, upstream)
        assert check_config(path).returncode == 0
        with serve(path, tmp_path) as (base, _, log):
            assert base is not None, log.read_text()
            assert_meters(base)
        with server.client(db=3) as client:
            assert client.dbsize() > 0  # database 3 of the URL, reached with the password
        # A wrong password: serve says so, exit 2.
        path = write_config(tmp_path, f"redis://:wrong@127.0.0.1:{port}/0", upstream)
        with serve(path, tmp_path) as (base, proc, log):
            assert base is None and proc.wait(timeout=30) == 2
        text = log.read_text()
        assert "wrong" not in text and ":***@" in text and "AuthenticationError" in text


def test_serve_over_tls(tmp_path: Path, upstream: str, tls: TLSFiles) -> None:
    (port,) = free_ports(1, 7600, 7699)
    with start_redis(port, tls=tls) as server:
        assert isinstance(server, RedisServer)
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tls.ca}"
        path = write_config(tmp_path, url, upstream)
        assert check_config(path).returncode == 0
        with serve(path, tmp_path) as (base, _, log):
            assert base is not None, log.read_text()
            assert_meters(base)
        # Without the CA the certificate is not trusted: a clear error, exit 2.
        path = write_config(tmp_path, f"rediss://127.0.0.1:{port}/0", upstream)
        with serve(path, tmp_path) as (base, proc, log):
            assert base is None and proc.wait(timeout=30) == 2
        assert "certificate verify failed" in log.read_text()


def test_serve_on_a_tls_cluster(tmp_path: Path, upstream: str, tls: TLSFiles) -> None:
    with start_cluster(free_ports(3, 7410, 7499, cluster=True), tls=tls) as tls_cluster:
        url = f"{tls_cluster.url}?ssl_ca_certs={tls.ca}&timeout=2"
        assert url.startswith("rediss-cluster://127.0.0.1:") and url.count(",") == 2
        path = write_config(tmp_path, url, upstream)
        assert check_config(path).returncode == 0
        with serve(path, tmp_path) as (base, _, log):
            assert base is not None, log.read_text()
            assert_meters(base)
            assert log.read_text() == ""


def test_serve_in_memory(tmp_path: Path, upstream: str) -> None:
    path = write_config(tmp_path, "memory://forms", upstream)
    with serve(path, tmp_path) as (base, _, log):
        assert base is not None, log.read_text()
        assert_meters(base)
