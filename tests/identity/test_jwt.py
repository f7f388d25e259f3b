"""JWT identification (gateway.identity.jwt through gateway.identity.identifier): HS256
with a secret,
RS256/ES256 with a JWKS served by a local HTTP server, claim checks, caching, key rotation.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import fakeredis
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.config import IdentityConfig, JwtConfig
from gateway.core.errors import IdentityUnavailable
from gateway.core.redis_keys import KeySpace
from gateway.identity.identifier import Identifier, Identity, IdentityFailure
from tests.support.identity_helpers import Clock, FakeStore, bearer, run_without_suspending, scope

SECRET = "super-secret-jwt-token-with-at-least-32-characters"


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "user-1", "org_id": "org-1", "exp": int(time.time()) + 3600}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def hs(payload: dict[str, Any], secret: str = SECRET, **kw: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", **kw)


def make(
    clock: Callable[[], float] | None = None, trusted_headers: bool = False, **jwt_config: Any
) -> Identifier:
    bad_per_minute = jwt_config.pop("bad_per_minute", 30)
    config = IdentityConfig(
        jwt=JwtConfig(**{"secret": SECRET, **jwt_config}),
        trusted_headers=trusted_headers,
        bad_credentials_per_minute=bad_per_minute,
    )
    return Identifier(
        config,
        keyspace=KeySpace("t"),
        redis=fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()),
        store=FakeStore(),
        clock=clock or Clock(),
    )


async def fail(ident: Identifier, token: str | bytes, **kw: Any) -> IdentityFailure:
    result = await ident.identify(scope(bearer(token), **kw))
    assert isinstance(result, IdentityFailure), result
    return result


# --- HS256 ----------------------------------------------------------------------------


async def test_hs256_token_names_org_and_user() -> None:
    result = await make().identify(scope(bearer(hs(claims()))))
    assert result == Identity("org-1", "user-1", "jwt")


async def test_supabase_style_claims() -> None:
    # Supabase: custom claims under app_metadata, aud "authenticated", role, email...
    token = hs(
        claims(
            org_id=None,
            aud="authenticated",
            role="authenticated",
            app_metadata={"provider": "email", "org_id": "org-sb"},
        )
    )
    ident = make(org_claim="app_metadata.org_id")
    assert await ident.identify(scope(bearer(token))) == Identity("org-sb", "user-1", "jwt")
    missing = await fail(ident, hs(claims(app_metadata={"provider": "email"})))
    assert missing.status == 401 and "app_metadata.org_id" in missing.detail


async def test_numeric_org_claim_and_absent_user() -> None:
    result = await make().identify(scope(bearer(hs(claims(org_id=42, sub=None)))))
    assert result == Identity("42", None, "jwt")


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        (claims(exp=int(time.time()) - 10), "expired"),
        (claims(exp=None), "exp"),
        # A year ahead: the parameters are built at collection, and a long suite outlasts minutes.
        (claims(nbf=int(time.time()) + 365 * 86400), "not valid yet"),
        (claims(org_id=None), "org_id"),
        (claims(org_id=""), "org_id"),
        (claims(org_id="has space"), "org_id"),
        (claims(org_id=True), "org_id"),
        (claims(org_id={"nested": 1}), "org_id"),
        (claims(sub="x" * 201), "sub"),
    ],
)
async def test_unacceptable_claims_are_401(payload: dict[str, Any], detail: str) -> None:
    result = await fail(make(), hs(payload))
    assert result.status == 401 and detail in result.detail


async def test_wrong_signature_is_401() -> None:
    result = await fail(make(), hs(claims(), secret="another-secret-of-at-least-32-bytes!!"))
    assert result.status == 401 and "signature" in result.detail


async def test_tampered_payload_is_401() -> None:
    header, _, signature = hs(claims()).split(".")
    forged = jwt.utils.base64url_encode(json.dumps(claims(org_id="victim")).encode()).decode()
    result = await fail(make(), f"{header}.{forged}.{signature}")
    assert result.status == 401


@pytest.mark.parametrize("algorithms", [["HS256"], ["HS256", "none"], ["none"]])
async def test_alg_none_is_never_accepted(algorithms: list[str]) -> None:
    token = jwt.encode(claims(), "", algorithm="none")
    if algorithms == ["none"]:
        with pytest.raises(ValueError, match="no algorithm"):
            make(algorithms=algorithms)
        return
    result = await fail(make(algorithms=algorithms), token)
    assert result.status == 401 and "algorithm" in result.detail


@pytest.mark.parametrize(
    "token",
    ["a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9", "eyJ9.eyJ9.eyJ9", "x" * 5000, "\u00e9.\u00e9.\u00e9"],
)
async def test_garbage_tokens_are_401(token: str) -> None:
    result = await fail(make(), token.encode("utf-8"))
    assert result.status == 401


async def test_audience_and_issuer_when_configured() -> None:
    ident = make(audience="authenticated", issuer="https://x.supabase.co/auth/v1")
    good = claims(aud="authenticated", iss="https://x.supabase.co/auth/v1")
    assert isinstance(await ident.identify(scope(bearer(hs(good)))), Identity)
    for bad in (
        {**good, "aud": "anon"},
        {k: v for k, v in good.items() if k != "aud"},
        {**good, "iss": "https://evil.example"},
    ):
        assert (await fail(ident, hs(bad))).status == 401
    # Without a configured audience, a token's aud is not a reason to refuse it.
    assert isinstance(await make().identify(scope(bearer(hs(claims(aud="x"))))), Identity)


async def test_leeway_accepts_recently_expired_tokens() -> None:
    token = hs(claims(exp=int(time.time()) - 5))
    assert (await fail(make(), token)).status == 401
    assert isinstance(await make(leeway_seconds=60).identify(scope(bearer(token))), Identity)


# --- caching --------------------------------------------------------------------------


async def test_verified_token_is_cached_until_a_bounded_expiry() -> None:
    clock = Clock()
    ident = make(clock)
    token = hs(claims(exp=int(time.time()) + 30))
    first = await ident.identify(scope(bearer(token)))
    assert ident.stats.jwt_verifications == 1
    for _ in range(10):
        assert run_without_suspending(ident.identify(scope(bearer(token)))) == first
    assert ident.stats.jwt_verifications == 1 and ident.stats.jwt_cache_hits == 10
    clock.advance(31)  # past the token's exp: the entry is gone, the token is checked again
    await ident.identify(scope(bearer(token)))
    assert ident.stats.jwt_verifications == 2
    long_lived = hs(claims(exp=int(time.time()) + 3600))
    await ident.identify(scope(bearer(long_lived)))
    clock.advance(60.01)  # long-lived tokens: re-verified at least every minute
    await ident.identify(scope(bearer(long_lived)))
    assert ident.stats.jwt_verifications == 4


async def test_cached_token_is_refused_once_expired_in_real_time() -> None:
    ident = make(time.monotonic)
    exp = int(time.time()) + 2  # whole seconds: at least 1 s left to verify it
    token = hs(claims(exp=exp))
    assert isinstance(await ident.identify(scope(bearer(token))), Identity)
    await asyncio.sleep(max(0.0, exp - time.time()) + 0.05)
    assert (await fail(ident, token)).status == 401


# --- precedence and throttling -----------------------------------------------------------


async def test_api_key_beats_jwt_and_jwt_beats_trusted_headers() -> None:
    ident = make(trusted_headers=True)
    store = ident.keys._store
    assert isinstance(store, FakeStore)
    key, _ = store.add(org="from-key")
    headers = [*bearer(hs(claims(org_id="from-jwt"))), (b"x-api-key", key.encode())]
    result = await ident.identify(scope(headers))
    assert isinstance(result, Identity) and result.org == "from-key"
    headers = [*bearer(hs(claims(org_id="from-jwt"))), (b"x-org-id", b"from-header")]
    result = await ident.identify(scope(headers))
    assert isinstance(result, Identity) and result.org == "from-jwt"


async def test_bad_tokens_are_throttled_but_known_good_ones_pass() -> None:
    ident = make(bad_per_minute=3)
    good = hs(claims())
    assert isinstance(await ident.identify(scope(bearer(good))), Identity)
    # A validly signed token lacking an org is not a guess: it does not count.
    for _ in range(5):
        assert (await fail(ident, hs(claims(org_id=None)))).status == 401
    for _ in range(3):
        assert (await fail(ident, hs(claims(), secret="x" * 40))).status == 401
    verifications = ident.stats.jwt_verifications
    throttled = await fail(ident, hs(claims(sub="new-user")))
    assert throttled.status == 429 and throttled.retry_after == 20
    assert ident.stats.jwt_verifications == verifications  # nothing verified
    assert isinstance(await ident.identify(scope(bearer(good))), Identity)


# --- JWKS (RS256 / ES256) -------------------------------------------------------------------


class JwksServer:
    """Serves ``self.keys`` as a JWKS at ``self.url``; counts hits; ``fail`` gives 500."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.hits = 0
        self.fail = False
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits += 1
                body = json.dumps({"keys": owner.keys}).encode()
                self.send_response(500 if owner.fail else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


def public_jwk(private: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = RSAAlgorithm if alg.startswith(("RS", "PS")) else ECAlgorithm
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(private.public_key()))
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def signed(private: Any, kid: str, alg: str = "RS256", **extra: Any) -> str:
    return jwt.encode(claims(**extra), private, algorithm=alg, headers={"kid": kid})


async def test_rs256_via_jwks_fetches_once(
    jwks: JwksServer, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    jwks.keys = [public_jwk(rsa_keys[0], "k1", "RS256")]
    ident = make(secret=None, jwks_url=jwks.url, algorithms=["RS256"])
    for i in range(5):
        result = await ident.identify(scope(bearer(signed(rsa_keys[0], "k1", sub=f"u{i}"))))
        assert result == Identity("org-1", f"u{i}", "jwt")
    assert jwks.hits == 1
    # A token signed by a key the JWKS does not hold is refused, whatever kid it claims.
    assert (await fail(ident, signed(rsa_keys[1], "k1", sub="forged"))).status == 401


async def test_es256_via_jwks(jwks: JwksServer) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    jwks.keys = [public_jwk(private, "ec1", "ES256")]
    ident = make(secret=None, jwks_url=jwks.url, algorithms=["ES256"])
    token = signed(private, "ec1", alg="ES256")
    assert await ident.identify(scope(bearer(token))) == Identity("org-1", "user-1", "jwt")


async def test_unknown_kid_refreshes_at_most_once_a_minute(
    jwks: JwksServer, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    clock = Clock()
    jwks.keys = [public_jwk(rsa_keys[0], "k1", "RS256")]
    ident = make(clock, secret=None, jwks_url=jwks.url, algorithms=["RS256"])
    assert isinstance(await ident.identify(scope(bearer(signed(rsa_keys[0], "k1")))), Identity)
    # Rotation: the issuer publishes k2 and starts signing with it.
    jwks.keys.append(public_jwk(rsa_keys[1], "k2", "RS256"))
    clock.advance(61)
    assert isinstance(await ident.identify(scope(bearer(signed(rsa_keys[1], "k2")))), Identity)
    assert jwks.hits == 2
    # Made-up kids: one refresh per minute at most.
    for i in range(5):
        clock.advance(10)
        assert (await fail(ident, signed(rsa_keys[1], f"bogus{i}"))).status == 401
    assert jwks.hits == 2
    clock.advance(11)  # 61 s after the last fetch
    assert (await fail(ident, signed(rsa_keys[1], "bogus-late"))).status == 401
    assert jwks.hits == 3


async def test_key_removed_from_jwks_stops_working_after_max_age(
    jwks: JwksServer, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    clock = Clock()
    jwks.keys = [public_jwk(rsa_keys[0], "k1", "RS256"), public_jwk(rsa_keys[1], "k2", "RS256")]
    ident = make(clock, secret=None, jwks_url=jwks.url, algorithms=["RS256"])
    assert isinstance(await ident.identify(scope(bearer(signed(rsa_keys[0], "k1")))), Identity)
    jwks.keys = [public_jwk(rsa_keys[1], "k2", "RS256")]
    clock.advance(301)
    assert (await fail(ident, signed(rsa_keys[0], "k1", sub="after"))).status == 401
    assert jwks.hits == 2


async def test_jwks_down_at_first_use_is_unavailable_then_recovers(
    jwks: JwksServer, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    clock = Clock()
    jwks.keys = [public_jwk(rsa_keys[0], "k1", "RS256")]
    jwks.fail = True
    ident = make(clock, secret=None, jwks_url=jwks.url, algorithms=["RS256"])
    token = signed(rsa_keys[0], "k1")
    for _ in range(3):
        with pytest.raises(IdentityUnavailable):
            await ident.identify(scope(bearer(token)))
    assert jwks.hits == 1  # retries are spaced out
    assert ident.stats.bad_credentials == 0
    jwks.fail = False
    clock.advance(5)
    assert isinstance(await ident.identify(scope(bearer(token))), Identity)
    # Later outages keep the keys already known.
    jwks.fail = True
    clock.advance(301)
    result = await ident.identify(scope(bearer(signed(rsa_keys[0], "k1", sub="u2"))))
    assert isinstance(result, Identity)


async def test_hs256_signed_with_the_public_key_is_refused(
    jwks: JwksServer, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    jwks.keys = [public_jwk(rsa_keys[0], "k1", "RS256")]
    # Config asks for both, but no secret is set: HS* has no key source and is refused.
    ident = make(secret=None, jwks_url=jwks.url, algorithms=["RS256", "HS256"])
    pem = (
        rsa_keys[0]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    result = await fail(ident, _hmac_token(pem))
    assert result.status == 401 and "algorithm" in result.detail


def _hmac_token(key: bytes) -> str:
    # PyJWT refuses to HMAC-sign with a PEM key, so build the token by hand.
    enc = jwt.utils.base64url_encode
    signing_input = (
        enc(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
        + b"."
        + enc(json.dumps(claims()).encode())
    )
    signature = enc(hmac.new(key, signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + signature).decode()


def test_config_without_usable_algorithm_is_an_error() -> None:
    with pytest.raises(ValueError, match="no algorithm"):
        make(algorithms=["RS256"])  # RS256 needs jwks_url, only a secret is set
