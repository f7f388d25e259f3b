from collections.abc import Callable
from typing import Literal

def scan(body: bytes, keys: tuple[bytes, ...], /) -> bytes | None: ...
def usage(
    body: bytes, mode: int, /
) -> tuple[Literal["openai", "anthropic", "gemini"], str | None, int, int, int, int] | None: ...
def priced(
    body: bytes,
    mode: int,
    memo: dict[str, tuple[int, int, int, int]],
    terms_for: Callable[[str | None], tuple[int, int, int, int]],
    maximum: int | None,
    left: int | None,
    head: list[tuple[bytes, bytes]] | None,
    /,
) -> (
    tuple[
        int,
        tuple[str],
        bytes,
        bytes | None,
        Literal["openai", "anthropic", "gemini"],
        str | None,
        int,
        int,
        int,
        int,
    ]
    | Literal[False]
    | None
): ...
def stream_key(body: bytes | bytearray | memoryview, /) -> bool: ...
