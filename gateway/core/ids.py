"""What an organization or user id may be: one rule, checked at every entry point.

An id is 1 to 200 printable ASCII characters without spaces (``!`` to ``~``). Ids travel
in HTTP headers (``X-Creditgate-Org``), Redis keys and log lines, so control characters,
whitespace and non-ASCII text are refused. The ledger states the same rule for org ids as
a CHECK on ``organizations.id`` (migrations/0005_org_ids_and_creation.sql); its user id
columns take any text without NUL, a superset. So an id accepted here is never refused by
the sync job, which would dead-letter the event and leave a charge without its ledger row.

Where it is checked: the library (``CreditGate.check/charge/balance/stats/set_plan/grant/
create_key``: :class:`InvalidId`, a ``ValueError``), the token and admin APIs (422
``invalid_request`` for a path or body value, 400 ``bad_request`` for a query parameter),
the CLI's ORG/``--org``/``--user`` arguments (exit 2), the Stripe webhook (an event naming
no valid org is ignored), and the identity layer (API key rows, JWT claims, trusted
headers and the middleware's ``scope["state"]``: 401).
"""

from __future__ import annotations

__all__ = ["ID_PATTERN", "ID_RULE", "MAX_ID_LENGTH", "InvalidId", "check_id", "valid_id"]

MAX_ID_LENGTH = 200
#: The rule as a regular expression (the OpenAPI document's ``pattern``, the ledger CHECK).
ID_PATTERN = f"^[!-~]{{1,{MAX_ID_LENGTH}}}$"
#: The rule in words, for error messages.
ID_RULE = f"1-{MAX_ID_LENGTH} printable ASCII characters without spaces"


class InvalidId(ValueError):
    """An org or user id that breaks the id rule; nothing was read or charged."""


def valid_id(value: object) -> bool:
    """Whether ``value`` is a usable org or user id (see the module docstring)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_LENGTH
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )


def check_id(value: object, what: str = "org") -> str:
    """Return ``value`` if it is a valid id, else raise :class:`InvalidId` naming ``what``."""
    if valid_id(value):
        assert isinstance(value, str)
        return value
    shown = (
        repr(value) if not isinstance(value, str) or len(value) <= 40 else repr(value[:40]) + "..."
    )
    raise InvalidId(f"{what} id {shown} is not valid: it must be {ID_RULE}")
