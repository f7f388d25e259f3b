"""Fuzz the token and admin APIs from their OpenAPI document (schemathesis).

The gateway runs under uvicorn against the real Redis (unique key prefix) and a throwaway
Postgres, with its in-server sync job. Every operation gets up to 25 generated requests,
with a valid API key (token API) or the admin token (admin API). Checked: no 5xx, every
status code, content type, header and body is the one the document declares.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings

from gateway.commands.server import GatewayApp
from gateway.http.openapi import openapi_document
from gateway.ledger.migrate import migrate
from gateway.metering.gate import CreditGate
from tests.support.api_support import ADMIN, ADMIN_TOKEN, PREFIX, REDIS, auth, clean_prefix
from tests.support.pg import admin_execute, drop_database, dsn_for, requires_postgres, unique_name
from tests.support.reference import reference_config
from tests.support.upstream_app import serve_in_thread

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import checks as st_checks  # noqa: E402
from schemathesis.specs.openapi import checks as oas_checks  # noqa: E402

pytestmark = requires_postgres

CHECKS = [
    st_checks.not_a_server_error,
    oas_checks.status_code_conformance,
    oas_checks.content_type_conformance,
    oas_checks.response_headers_conformance,
    oas_checks.response_schema_conformance,
]


async def _setup(prefix: str, dsn: str) -> tuple[Any, str]:
    await admin_execute(f'CREATE DATABASE "{dsn.rsplit("/", 1)[1]}"')
    await migrate(dsn)
    config = reference_config(
        redis_url=REDIS, key_prefix=prefix, database_url=dsn, admin_token=ADMIN_TOKEN,
        # Schemathesis also sends requests without our credentials (auth checks); the
        # per-address throttle of bad credentials would then 429 everything after them.
        identity={"api_keys": True, "trusted_headers": False, "bad_credentials_per_minute": 0},
        # The alert endpoints answer for real (not 501); nothing listens at the URL.
        alerts={"webhook_url": "http://127.0.0.1:9/hook",
                "webhook_secret": "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"},
    )  # fmt: skip
    gate = CreditGate(config)
    await gate.set_plan("acme", "enterprise")
    _, key = await gate.create_key("acme")  # org-level: user_id in bodies is accepted
    for feature in ("lead_generation", "general_insights"):
        assert (await gate.charge("acme", feature, user="alice")).ok
    await gate.grant("acme", "goal_generation", 10, reference="fuzz-seed")
    await gate.close()
    return config, key


@pytest.fixture(scope="module")
def deployment() -> Iterator[tuple[str, str]]:
    """(base URL, API key) of a served gateway with an enterprise org 'acme'."""
    prefix = f"cgt{uuid.uuid4().hex[:10]}"
    name = unique_name()
    try:
        config, key = asyncio.run(_setup(prefix, dsn_for(name)))
        with serve_in_thread(GatewayApp(CreditGate(config), sync=True)) as url:
            yield url, key
    finally:
        asyncio.run(drop_database(name))
        asyncio.run(clean_prefix(prefix))


# The document depends only on the config, so it is built here, at collection time (a lazy
# schemathesis.pytest.from_fixture does not work with pytest 9); the first test proves the
# served document is this very one.
DOCUMENT = openapi_document(reference_config(admin_token=ADMIN_TOKEN))
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_the_served_document_is_the_fuzzed_one(deployment: tuple[str, str]) -> None:
    url, _ = deployment
    served = httpx.get(f"{url}{PREFIX}/openapi.json").json()
    assert served == DOCUMENT
    # 19, the five of contract A10 (teams, users, a key's team and caps) and the four of
    # A11 (alert rules, deliveries, resend).
    assert len([op for item in served["paths"].values() for op in item if op != "parameters"]) == 28


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_api_conforms_to_its_openapi_document(case: Any, deployment: tuple[str, str]) -> None:
    url, key = deployment
    headers = ADMIN if case.path.startswith("/admin") else auth(key)
    case.call_and_validate(base_url=url, headers=headers, checks=CHECKS)
