"""The problem document every API error answers (RFC 9457, gateway.core.problem builds it)."""

from __future__ import annotations

from typing import Annotated, NotRequired

from typing_extensions import TypedDict

from gateway.http.models.fields import Documented

__all__ = ["Problem", "ProblemField"]

_TIME = Documented({"type": "string", "format": "date-time"})


class ProblemField(TypedDict):
    """One refused value of a 422 ``invalid_request``."""

    field: str
    message: str


class Problem(TypedDict):
    """``type``, ``title``, ``status``, ``detail`` and ``code``, plus the facts that apply."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    feature: NotRequired[str]
    cost: NotRequired[int]
    balance: NotRequired[int]
    refresh_at: NotRequired[Annotated[str, _TIME]]
    retry_after: NotRequired[int]
    plan: NotRequired[str]
    errors: NotRequired[list[ProblemField]]
