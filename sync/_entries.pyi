from typing import Any

def decode_v2(
    entries: list[Any], times: Any, kinds: frozenset[str], max_digits: int, /
) -> (
    tuple[
        list[Any],
        list[Any],
        list[list[str]],
        list[str],
        list[str],
        bool,
        bool,
        list[tuple[int, str]],
    ]
    | None
): ...
