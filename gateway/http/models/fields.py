"""Field types shared by the API models: each validates one kind of value and says in the
OpenAPI document what it accepts, from the same numbers.

Each is an ``Annotated`` marker (``Annotated[int, BodyInt(1, 1000)]``) with pydantic's
two hooks: ``__get_pydantic_core_schema__`` wraps the plain type in a validator that
raises the API's own messages (``must be an integer``, ``must be between 1 and 1000``...),
and ``__get_pydantic_json_schema__`` writes the matching schema. Body fields answer 422
with these messages per field; query parameters answer 400 (gateway.http.inputs).

Conventions kept from the hand-written parsers: JSON has one number type, so ``5.0`` is
the integer 5 (but ``true`` and ``"5"`` are not integers); text must be storable in
Postgres (valid UTF-8, no NUL); an empty query parameter counts as absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler, ValidationInfo
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from gateway.core.ids import ID_PATTERN, ID_RULE, valid_id

__all__ = [
    "ERROR_TYPE",
    "LATE_ERROR_TYPE",
    "BodyInt",
    "ConfigName",
    "Documented",
    "Ident",
    "Moment",
    "OneOf",
    "QueryDay",
    "QueryInt",
    "Storable",
    "Text",
    "fail",
    "storable",
]

#: The ``type`` of the errors these validators raise; their message is the API's own.
ERROR_TYPE = "creditgate"
#: The same for checks against the config or the clock, which the APIs have always listed
#: after the errors of the values' form (gateway.http.inputs keeps that order).
LATE_ERROR_TYPE = "creditgate_late"


def fail(message: str, *, late: bool = False) -> PydanticCustomError:
    """A validation error whose message is ``message`` as is."""
    kind = LATE_ERROR_TYPE if late else ERROR_TYPE
    return PydanticCustomError(kind, "{message}", {"message": message})


def storable(text: str) -> bool:
    """Whether Postgres text can hold ``text`` (valid UTF-8, no NUL): JSON allows both."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON)
        return False
    return True


class _Marker:
    """Base of the markers: a before-validator and a fixed JSON schema."""

    def schema(self) -> JsonSchemaValue:
        raise NotImplementedError

    def check(self, value: Any) -> Any:
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_before_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return self.schema()


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise fail("must be a string")
    if not storable(value):
        raise fail("must be UTF-8 text without NUL characters")
    return value


@dataclass(frozen=True, slots=True)
class Text(_Marker):
    """A non-empty string of at most ``max_length`` characters."""

    max_length: int

    def check(self, value: Any) -> str:
        text = _text(value)
        if not 0 < len(text) <= self.max_length:
            raise fail(f"must be 1-{self.max_length} characters")
        return text

    def schema(self) -> JsonSchemaValue:
        return {"type": "string", "minLength": 1, "maxLength": self.max_length}


@dataclass(frozen=True, slots=True)
class Ident(_Marker):
    """An org or user id (gateway.core.ids)."""

    def check(self, value: Any) -> str:
        text = _text(value)
        if not valid_id(text):
            raise fail(f"must be {ID_RULE}")
        return text

    def schema(self) -> JsonSchemaValue:
        return {"type": "string", "pattern": ID_PATTERN}


@dataclass(frozen=True, slots=True)
class BodyInt(_Marker):
    """An integer in [lo, hi] in a JSON body."""

    lo: int
    hi: int

    def check(self, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON has one number type: 5.0 is the integer 5
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("must be an integer")
        if not self.lo <= value <= self.hi:
            raise fail(f"must be between {self.lo} and {self.hi}")
        return value

    def schema(self) -> JsonSchemaValue:
        return {"type": "integer", "minimum": self.lo, "maximum": self.hi}


@dataclass(frozen=True, slots=True)
class Moment:
    """An ISO 8601 date-time with a time zone, as a UTC datetime.

    ``future``: it must also be after the validation context's ``now`` (a UTC datetime).
    """

    future: bool = False

    def check(self, value: Any, info: ValidationInfo) -> datetime:
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                parsed = None
            if parsed is not None and parsed.utcoffset() is not None:
                moment = parsed.astimezone(UTC)
                now = (info.context or {}).get("now")
                if self.future and now is not None and moment <= now:
                    raise fail("must be in the future", late=True)
                return moment
        raise fail("must be an ISO 8601 date-time with a time zone")

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.with_info_before_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "format": "date-time"}


@dataclass(frozen=True, slots=True)
class ConfigName:
    """A name the deployment's config defines (``plans`` or ``buckets``).

    The config comes as the validation context (``{"config": Config}``); the document
    enumerates the names (gateway.http.openapi fills in ``x-config``).
    """

    kind: str  # "plans" | "buckets" | "features"
    sort: bool = True  # the document lists the names sorted, or in config order
    # False: only documented; the handler refuses an unknown name itself (unknown_feature).
    strict: bool = True

    def check(self, value: str, info: ValidationInfo) -> str:
        config = (info.context or {}).get("config")
        if config is not None and self.strict:
            names = getattr(config, self.kind)
            if value not in names:
                raise fail(f"unknown {self.kind[:-1]} (known: {', '.join(names)})", late=True)
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.with_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"x-config": self.kind, "x-config-sorted": self.sort}


@dataclass(frozen=True, slots=True)
class QueryInt(_Marker):
    """An integer query parameter in [lo, hi]."""

    lo: int
    hi: int

    def check(self, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise fail("must be an integer") from None
            if not self.lo <= value <= self.hi:
                raise fail(f"must be between {self.lo} and {self.hi}")
        return value

    def schema(self) -> JsonSchemaValue:
        return {"type": "integer", "minimum": self.lo, "maximum": self.hi}


@dataclass(frozen=True, slots=True)
class QueryDay(_Marker):
    """A ``YYYY-MM-DD`` query parameter."""

    def check(self, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return date.fromisoformat(value)
            except ValueError:
                raise fail("must be a date (YYYY-MM-DD)") from None
        return value

    def schema(self) -> JsonSchemaValue:
        return {"type": "string", "format": "date"}


@dataclass(frozen=True, slots=True)
class OneOf(_Marker):
    """One of a few fixed words."""

    words: tuple[str, ...]

    def check(self, value: Any) -> Any:
        if value not in self.words:
            raise fail(f"must be {' or '.join(self.words)}")
        return value

    def schema(self) -> JsonSchemaValue:
        return {"enum": list(self.words)}


@dataclass(frozen=True, slots=True)
class Storable(_Marker):
    """Any text Postgres can store."""

    def check(self, value: Any) -> Any:
        return _text(value)

    def schema(self) -> JsonSchemaValue:
        return {"type": "string"}


@dataclass(frozen=True, slots=True, eq=False)  # hashed by identity: it holds a dict
class Documented:
    """No check; the document says ``schema`` (for values the handler validates itself,
    and for response fields whose format the type does not carry)."""

    json_schema: dict[str, Any]

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return handler(source)

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return dict(self.json_schema)
