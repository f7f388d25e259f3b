"""The fake providers' Starlette app: routes, request recording, gates, errors."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp

from tests.support.fake_providers import anthropic_messages, gemini, openai_chat, openai_responses
from tests.support.fake_providers.control import Behaviour, Provider, RecordedRequest
from tests.support.fake_providers.wire import Call, JsonAnswer
from tests.support.upstream_app import serve_in_thread


class FakeProviders:
    """OpenAI, Anthropic and Gemini upstreams in one app (see the package docstring).

    ``requests`` lists every request received, in order (appended by the server thread).
    """

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[RecordedRequest] = []
        self._gates: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._serials = itertools.count(1)
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/messages", self._messages, methods=["POST"]),
                Route("/v1beta/models/{target}", self._gemini, methods=["POST"]),
                Route("/v1/models/{target}", self._gemini, methods=["POST"]),
            ]
        )

    # -- what tests call -------------------------------------------------------------------
    def gate(self, name: str) -> threading.Event:
        with self._lock:
            return self._gates.setdefault(name, threading.Event())

    def release(self, name: str) -> None:
        """Let the streams waiting at gate ``name`` go on."""
        self.gate(name).set()

    def find(self, *, path: str | None = None, gate: str | None = None) -> list[RecordedRequest]:
        """The requests received on ``path`` and/or with ``X-Fake-Gate: gate``."""
        return [
            r
            for r in list(self.requests)
            if (path is None or r.path == path)
            and (gate is None or (r.behaviour is not None and r.behaviour.gate == gate))
        ]

    def only(self, *, path: str | None = None, gate: str | None = None) -> RecordedRequest:
        """The one request matching (AssertionError if there are none or several)."""
        found = self.find(path=path, gate=gate)
        assert len(found) == 1, f"expected one request, got {len(found)}: {found}"
        return found[0]

    def clear(self) -> None:
        self.requests.clear()

    # -- handlers ----------------------------------------------------------------------------
    async def _chat(self, request: Request) -> ASGIApp:
        return await self._handle(request, "openai", "chat", openai_chat.answer)

    async def _responses(self, request: Request) -> ASGIApp:
        return await self._handle(request, "openai", "responses", openai_responses.answer)

    async def _messages(self, request: Request) -> ASGIApp:
        return await self._handle(request, "anthropic", "messages", anthropic_messages.answer)

    async def _gemini(self, request: Request) -> ASGIApp:
        model, _, method = request.path_params["target"].partition(":")
        alt = request.query_params.get("alt")
        if method not in ("generateContent", "streamGenerateContent"):
            return JsonAnswer(await self._record(request, "gemini", method), {}, status=404)
        return await self._handle(
            request, "gemini", method, lambda call: gemini.answer(call, method, alt), model
        )

    async def _record(self, request: Request, provider: Provider, api: str) -> RecordedRequest:
        body = await request.body()
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]]
        record = RecordedRequest(
            method=request.method,
            path=request.url.path,
            query=request.scope["query_string"].decode("latin-1"),
            headers={k.lower(): v for k, v in raw},
            raw_headers=raw,
            body=body,
            json=document,
            provider=provider,
            api=api,
        )
        self.requests.append(record)
        return record

    async def _handle(
        self,
        request: Request,
        provider: Provider,
        api: str,
        build: Callable[[Call], ASGIApp],
        model: str | None = None,
    ) -> ASGIApp:
        record = await self._record(request, provider, api)
        serial = next(self._serials)
        document = record.json
        if not isinstance(document, dict):
            return JsonAnswer(record, _error(provider, 400, serial), status=400)
        behaviour = Behaviour.from_headers(record.headers, record.body)
        record.behaviour = behaviour
        if behaviour.mode.startswith("error-"):
            status = int(behaviour.mode.removeprefix("error-"))
            headers = {"retry-after": "1"} if status == 429 else {}
            body = _error(provider, status, serial)
            return JsonAnswer(record, body, status=status, headers=headers)
        requested = model or document.get("model")
        call = Call(
            record=record,
            behaviour=behaviour,
            body=document,
            model=behaviour.model or (requested if isinstance(requested, str) else "unknown"),
            serial=serial,
            gate_event=self.gate,
        )
        return build(call)


def _error(provider: Provider, status: int, serial: int) -> dict[str, Any]:
    if provider == "anthropic":
        return anthropic_messages.error_body(status, serial)
    if provider == "gemini":
        return gemini.error_body(status)
    return openai_chat.error_body(status)


@contextlib.contextmanager
def serve_fake_providers() -> Iterator[FakeProviders]:
    """Serve a fresh :class:`FakeProviders` over TCP (uvicorn in a thread); ``.url`` is set."""
    fake = FakeProviders()
    with serve_in_thread(fake.app) as url:
        fake.url = url
        yield fake
