"""Reading a creditgate config file: YAML with duplicate-key detection and size limits,
syntax errors in words (:mod:`.yaml_errors`), then ``${VAR}`` / ``${VAR:-default}``
expansion of every string value (step 1 of :mod:`.loader`). Knows nothing of the schema."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from gateway.config.yaml_errors import explain


class ConfigError(Exception):
    """The config is invalid: ``errors`` holds every problem found, one line each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class _Loader(yaml.SafeLoader):
    """SafeLoader that reports duplicate keys (PyYAML silently keeps the last one)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, int, str]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, yaml.Mark] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                mark = key_node.start_mark
                first = seen.setdefault(key_node.value, mark)
                if first is not mark:
                    self.duplicates.append(
                        (
                            mark.line + 1,
                            mark.column + 1,
                            f"duplicate key {key_node.value!r} (first defined on line"
                            f" {first.line + 1})",
                        )
                    )
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """The mapping of settings in ``text``; syntax errors say what is wrong in words, as
    ``source:line:column: message`` (the form editors and terminals link to the place)."""
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # the reader checks the characters here already
        tree = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        problem = explain(exc, text)
        raise ConfigError(
            [f"{source}:{problem.line}:{problem.column}: {problem.message}"]
        ) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - text.rfind("\n", 0, exc.position)
        raise ConfigError(
            [f"{source}:{line}:{column}: character #x{exc.character:04x} is not allowed in YAML"]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: YAML error: {exc}"]) from None
    except RecursionError:
        raise ConfigError([f"{source}: YAML nested too deeply"]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if loader.duplicates:
        raise ConfigError(
            [f"{source}:{line}:{col}: {what}" for line, col, what in loader.duplicates]
        )
    if tree is None:
        raise ConfigError([f"{source}: the file is empty (expected a mapping of settings)"])
    if not isinstance(tree, dict):
        raise ConfigError(
            [f"{source}: the top level must be a mapping of settings, got {show_value(tree)}"]
        )
    return tree


_REF = re.compile(r"\$\$\{|\$\{([^{}]*)(\})?")
_REF_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_MAX_NODES = 100_000
_MAX_DEPTH = 64


class Expander:
    """Expands ``${VAR}`` in every string value of the parsed tree (keys are left alone).

    Records, per key path, the variables that were unset so that a required value that
    ends up empty can name its variable.
    """

    def __init__(
        self, env: Mapping[str, str], unset: dict[str, list[str]], problems: list[str]
    ) -> None:
        self.env, self.unset, self.problems = env, unset, problems
        self.budget = _MAX_NODES  # YAML aliases can make a tiny file an exponential tree
        self.stopped = False

    def walk(self, node: Any, loc: tuple[Any, ...]) -> Any:
        if self.stopped:
            return None
        self.budget -= 1
        if self.budget < 0 or len(loc) > _MAX_DEPTH:
            self.stopped = True  # one message, then stop walking
            self.problems.append(
                f"the document is too large (over {_MAX_NODES} values: exploding YAML aliases?)"
                if self.budget < 0
                else f"{fmt_loc(loc[:_MAX_DEPTH])}: nested too deeply"
            )
            return None
        if isinstance(node, str):
            return self.expand(node, loc) if "${" in node else node
        if isinstance(node, dict):
            return {k: self.walk(v, (*loc, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [self.walk(v, (*loc, i)) for i, v in enumerate(node)]
        return node

    def expand(self, value: str, loc: tuple[Any, ...]) -> str:
        path = fmt_loc(loc)

        def substitute(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            body = _REF_BODY.fullmatch(m.group(1))
            if m.group(2) is None or body is None:
                self.problems.append(
                    f"{path}: bad variable reference {m.group(0)!r}"
                    " (use ${NAME} or ${NAME:-default}; write $${ for a literal ${)"
                )
                return m.group(0)
            name, default = body.group(1), body.group(2)
            value = self.env.get(name)
            if default is not None:
                return value or default
            if value is None:
                self.unset.setdefault(path, []).append(name)
            return value or ""

        return _REF.sub(substitute, value)


KEY_PLAIN = re.compile(r"[A-Za-z0-9_\-]+")


def fmt_loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
            continue
        part = part if isinstance(part, str) else str(part)  # YAML keys may be any scalar
        if KEY_PLAIN.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += "[" + repr(part).replace("'", '"') + "]"
    return out or "(top level)"


def show_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return text if isinstance(value, str) else f"{type(value).__name__} {text}"
