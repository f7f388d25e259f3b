"""An API operation, declared once: the route, the handler, and what the document says.

Each :class:`Operation` names its handler (a module-level function), who may call it
(``security``), the models of its path parameters, query, headers and body, and the model
of each answer. :class:`Endpoint` serves it: it checks the credentials, reads the inputs
with those models (gateway.http.inputs), calls the handler with a :class:`Call`, and
renders the :class:`Reply`, refusing one whose body is not the model the operation
declares for that status. The OpenAPI document (gateway.http.openapi) is generated from
the same operations, so what is documented is what is served.

The deployment reaches the handler as ``call.api`` (an :class:`Api`: the gate and the
admin check), held by the endpoint, so the routes can be mounted in any Starlette app.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.http.admin_auth import AdminAuth
from gateway.http.errors import ApiError, invalid, response_for
from gateway.http.inputs import header_values, json_object, read_query, validate
from gateway.identity.identifier import Identity, IdentityFailure
from gateway.metering.gate import CreditGate

__all__ = [
    "Api",
    "Call",
    "Doc",
    "Endpoint",
    "Operation",
    "Reply",
    "authenticate",
    "routes_of",
]

M = TypeVar("M", bound=BaseModel)


@dataclass(slots=True)
class Api:
    """What every handler of one deployment needs: its gate and its admin check."""

    gate: CreditGate
    admin: AdminAuth
    memo: dict[str, Any] = field(default_factory=dict)  # computed once (the document)

    @classmethod
    def of(cls, gate: CreditGate) -> Api:
        """The API of ``gate``, with the admin token of its config."""
        return cls(gate, AdminAuth.of(gate.config))


@dataclass(frozen=True, slots=True)
class Reply:
    """A handler's JSON answer: ``body`` is the model the operation declares for ``status``
    (None: no body)."""

    body: BaseModel | None
    status: int = 200
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Doc:
    """One documented answer of an operation: a JSON model, or another media type."""

    description: str
    model: type[BaseModel] | None = None
    media: str | None = None  # a non-JSON answer (a page): its media type...
    schema: Mapping[str, Any] | None = None  # ...and schema


@dataclass(slots=True)
class Call:
    """One call of an operation: the request, the deployment, the caller, the inputs."""

    request: Request
    api: Api
    caller: Identity | None
    inputs: tuple[BaseModel, ...]

    @property
    def gate(self) -> CreditGate:
        """The deployment's gate."""
        return self.api.gate

    @property
    def identity(self) -> Identity:
        """The authenticated caller (operations with ``security="key"``)."""
        assert self.caller is not None, "this operation takes no credentials"
        return self.caller

    def parsed(self, model: type[M]) -> M:
        """The input the operation declared as ``model``, already validated."""
        for value in self.inputs:
            if type(value) is model:
                return value
        raise LookupError(f"the operation declares no {model.__name__} input")


Handler = Callable[[Call], Awaitable[Reply | Response]]


@dataclass(frozen=True, slots=True)
class Operation:
    """One documented operation (see the module docstring)."""

    method: str
    path: str  # relative to where its routes are mounted
    handler: Handler
    operation_id: str
    summary: str
    responses: Mapping[int, Doc]
    problems: tuple[int, ...] = ()
    security: Literal["key", "admin", "public"] = "key"
    path_params: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    headers: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    description: str | None = None
    tag: str = "tokens"


async def authenticate(gate: CreditGate, request: Request) -> Identity:
    """The caller's identity, or an ApiError (401, 429); outages propagate (503)."""
    ident = await gate.identifier.identify(request.scope)
    if isinstance(ident, IdentityFailure):
        headers = {"WWW-Authenticate": 'Bearer realm="creditgate"'}
        if ident.status == 429:
            raise ApiError(
                429, "rate_limited", "Too many bad credentials", ident.detail,
                headers=headers, retry_after=ident.retry_after,
            )  # fmt: skip
        raise ApiError(
            ident.status, "unauthenticated", "Unauthenticated", ident.detail, headers=headers
        )
    return ident


class Endpoint:
    """The ASGI app of one operation (see the module docstring)."""

    def __init__(self, operation: Operation, api: Api) -> None:
        self.operation = operation
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await self._answer(request)
        except Exception as exc:
            retry = self.api.gate.config.retry_after_unavailable_seconds
            response = response_for(exc, request, retry)
        await response(scope, receive, send)

    async def _answer(self, request: Request) -> Response:
        op, gate = self.operation, self.api.gate
        caller = None
        if op.security == "key":
            caller = await authenticate(gate, request)
        elif op.security == "admin":
            self.api.admin.authorize(request)
        inputs: list[BaseModel] = []
        if op.query is not None:
            inputs.append(read_query(op.query, request))
        if op.path_params is not None:
            # A bad path is reported before the body is even read.
            path, errors = validate(op.path_params, request.path_params)
            if path is None:
                raise invalid(errors)
            inputs.append(path)
        errors = []
        if op.body is not None:
            now = datetime.fromtimestamp(gate.clock.now_ms() / 1000, tz=UTC)
            context = {"config": gate.config, "now": now}
            body, body_errors = validate(op.body, await json_object(request), context=context)
            errors += body_errors
            if body is not None:
                inputs.append(body)
        if op.headers is not None:
            headers, header_errors = validate(op.headers, header_values(op.headers, request))
            errors += header_errors
            if headers is not None:
                inputs.append(headers)
        if errors:
            raise invalid(errors)
        result = await op.handler(Call(request, self.api, caller, tuple(inputs)))
        return result if isinstance(result, Response) else self._render(result)

    def _render(self, reply: Reply) -> Response:
        doc = self.operation.responses.get(reply.status)
        declared = None if doc is None else doc.model
        if doc is None or type(reply.body) is not (declared or type(None)):
            raise TypeError(
                f"{self.operation.operation_id} answered {reply.status} with"
                f" {type(reply.body).__name__}, not what its operation declares"
            )
        headers = dict(reply.headers or {})
        if reply.body is None:
            return Response(status_code=reply.status, headers=headers)
        content = reply.body.model_dump(by_alias=True)
        return JSONResponse(content, status_code=reply.status, headers=headers)


def routes_of(operations: Iterable[Operation], api: Api) -> list[Route]:
    """One Starlette route per operation, served by its :class:`Endpoint`."""
    return [
        Route(op.path, Endpoint(op, api), methods=[op.method], name=op.operation_id)
        for op in operations
    ]
