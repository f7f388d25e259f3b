"""The access log: one JSON line per metered request on ``creditgate.access``, when enabled."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.core.logs import ACCESS_LOGGER, JsonFormatter, uvicorn_log_config
from gateway.metering.gate import CreditGate
from tests.support.edge_apps import Calls, edge_config, in_middleware_mode, target_app

ORG = {"X-Org-Id": "acme", "X-User-Id": "u1"}


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    """What the access logger writes, formatted as ``creditgate serve`` formats it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(ACCESS_LOGGER)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_one_line_per_metered_request(
    redisgate: CreditGate, access_lines: io.StringIO
) -> None:
    config = edge_config(redisgate.config, access_log=True)
    async with in_middleware_mode(config, target_app(Calls())) as (http, _):
        r = await http.post("/generate", headers=ORG)
        assert r.status_code == 200
        assert lines(access_lines) and len(lines(access_lines)) == 1
        (line,) = lines(access_lines)
        assert r.headers["x-creditgate-request-id"] == line["request_id"]
        assert line["logger"] == "creditgate.access" and line["level"] == "info"
        assert line["msg"] == "POST /generate 200"
        assert {k: line[k] for k in ("method", "route", "org", "user", "feature")} == {
            "method": "POST", "route": "/generate", "org": "acme", "user": "u1",
            "feature": "goal_generation",
        }  # fmt: skip
        assert (line["status"], line["cost"], line["refunded"]) == (200, 3, False)
        assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0

        r = await http.get("/status/503", headers=ORG)
        assert r.status_code == 503
        refunded = lines(access_lines)[-1]
        assert (refunded["status"], refunded["cost"], refunded["refunded"]) == (503, 0, True)
        assert refunded["route"] == "/status/{code}"

        r = await http.get("/anything", headers=ORG)  # unmetered: no line
        assert r.status_code == 200
        assert len(lines(access_lines)) == 2


async def test_refusals_are_logged_with_their_code(
    redisgate: CreditGate, access_lines: io.StringIO
) -> None:
    config = edge_config(redisgate.config, access_log=True)
    async with in_middleware_mode(config, target_app(Calls())) as (http, gate):
        await gate.set_plan("acme", "starter")
        assert (await http.post("/generate", headers=ORG)).status_code == 403
        assert (await http.post("/generate")).status_code == 401
    refused, unknown = lines(access_lines)
    assert (refused["status"], refused["code"], refused["cost"], refused["org"]) == (
        403, "feature_not_in_plan", 0, "acme",
    )  # fmt: skip
    assert (unknown["status"], unknown["code"], unknown["org"]) == (401, "unauthenticated", None)


async def test_off_by_default(
    redisgate: CreditGate, access_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDITGATE_ACCESS_LOG", raising=False)
    async with in_middleware_mode(edge_config(redisgate.config), target_app(Calls())) as (http, _):
        assert (await http.post("/generate", headers=ORG)).status_code == 200
    assert access_lines.getvalue() == ""


async def test_enabled_from_the_environment(
    redisgate: CreditGate, access_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDITGATE_ACCESS_LOG", "1")
    async with in_middleware_mode(edge_config(redisgate.config), target_app(Calls())) as (http, _):
        assert (await http.post("/generate", headers=ORG)).status_code == 200
    assert len(lines(access_lines)) == 1


def test_servers_write_it_as_json_whatever_the_log_format() -> None:
    config = uvicorn_log_config(fmt="text")
    access = config["loggers"][ACCESS_LOGGER]
    handler = config["handlers"][access["handlers"][0]]
    assert config["formatters"][handler["formatter"]]["()"].endswith("JsonFormatter")
    assert access["propagate"] is False and access["level"] == "INFO"
