"""One problem+json builder (gateway.core.problem) with two adapters that answer alike."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.core.problem import problem_body, problem_response, send_problem

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"


async def _sent(*args: Any, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    messages: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        messages.append(message)

    await send_problem(send, *args, **kwargs)
    start, body = messages
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    assert body["more_body"] is False
    return start["status"], headers, body["body"]


@pytest.mark.parametrize(
    ("facts", "retry"),
    [({}, None), ({"retry_after": 3}, "3"), ({"retry_after": 2.1}, "3"), ({"cost": 5}, None)],
)
async def test_the_asgi_and_the_starlette_adapter_answer_the_same(
    facts: dict[str, Any], retry: str | None
) -> None:
    args = (429, "rate_limited", "Too many", "slow down")
    status, headers, body = await _sent(*args, headers=[(b"x-extra", b"1")], **facts)
    response = problem_response(*args, headers={"X-Extra": "1"}, **facts)
    assert status == response.status_code == 429
    assert body == response.body == problem_body(*args, **facts)
    got = {k.decode(): v.decode() for k, v in response.raw_headers}
    for h in (headers, got):
        assert h["content-type"] == "application/problem+json"
        assert h["content-length"] == str(len(body))
        assert h["x-extra"] == "1"
        assert h.get("retry-after") == retry
    assert json.loads(body)["code"] == "rate_limited"


async def test_a_retry_after_the_caller_set_is_kept() -> None:
    _, headers, _ = await _sent(503, "unavailable", "U", "d", headers=[(b"Retry-After", b"9")],
                                retry_after=1)  # fmt: skip
    assert headers["Retry-After"] == "9" and "retry-after" not in headers
    response = problem_response(503, "unavailable", "U", "d", headers={"retry-after": "9"},
                                retry_after=1)  # fmt: skip
    assert [v for k, v in response.raw_headers if k == b"retry-after"] == [b"9"]


def test_no_other_module_builds_a_problem_document() -> None:
    # The media type and the body builder appear in code (not docstrings) only in
    # gateway/core/problem.py; everyone else answers through its two adapters.
    offenders = []
    for path in GATEWAY.rglob("*.py"):
        if path == GATEWAY / "core" / "problem.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            text = node.value if isinstance(node, ast.Constant) else None
            where = f"{path.relative_to(GATEWAY)}:{getattr(node, 'lineno', 0)}"
            if isinstance(text, str | bytes) and id(node) not in docstrings:
                raw = text if isinstance(text, str) else text.decode("latin-1")
                if "problem+json" in raw:
                    offenders.append(where)
            if isinstance(node, ast.Name | ast.Attribute) and (
                getattr(node, "id", None) in ("problem_body", "PROBLEM_CONTENT_TYPE")
                or getattr(node, "attr", None) in ("problem_body", "PROBLEM_CONTENT_TYPE")
            ):
                offenders.append(where)
    # The OpenAPI document names the media type of its error responses.
    assert [o for o in offenders if not o.startswith("http/openapi.py")] == []
