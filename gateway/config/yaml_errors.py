"""PyYAML's syntax errors in plain words, at the line and column a person would fix.

PyYAML reports what its parser expected (``expected <block end>, but found '<block mapping
start>'``), which is true but says little to someone who indented a line by one space too
many. :func:`explain` recognises the usual mistakes (indentation, tabs, unclosed quotes and
brackets, a ``: `` inside a value, a list item among keys) from the error and the text, and
says what is wrong in words; anything else keeps PyYAML's own description.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

__all__ = ["SyntaxProblem", "explain"]


@dataclass(frozen=True, slots=True)
class SyntaxProblem:
    """What is wrong, and where: 1-based line and column."""

    line: int
    column: int
    message: str


_FOUND = re.compile(r"but found '(.*)'$")
_VALUE_COLON = re.compile(r":\s")
_KEY = re.compile(r"((?:-\s+)*)([^\s#:][^:#]*?)\s*:(\s|$)")


@dataclass(frozen=True, slots=True)
class _Line:
    """One line of the file: its number (1-based), indentation and text."""

    number: int
    indent: int
    text: str

    @property
    def key(self) -> tuple[int, str, bool] | None:
        """(column of the key, the key, whether a value follows it) for ``key: value`` or
        ``- key: value`` lines; None for other lines."""
        match = _KEY.match(self.text, self.indent)
        if match is None:
            return None
        value = self.text[match.end() :].split(" #", 1)[0].strip()
        return self.indent + len(match.group(1)), match.group(2), bool(value)


def _lines(text: str) -> list[_Line]:
    out = []
    for number, raw in enumerate(text.split("\n"), start=1):
        stripped = raw.lstrip(" ")
        out.append(_Line(number, len(raw) - len(stripped), raw))
    return out


def _content_above(lines: list[_Line], number: int) -> list[_Line]:
    """The non-blank, non-comment lines before line ``number``, nearest first."""
    return [
        line
        for line in reversed(lines[: number - 1])
        if line.text.strip() and not line.text.lstrip().startswith("#")
    ]


def _indentation(lines: list[_Line], number: int) -> SyntaxProblem:
    """A line that belongs to no mapping above it: indented too far, or between levels."""
    line = lines[number - 1]
    above = _content_above(lines, number)
    where = (number, line.indent + 1)
    previous = next((ln for ln in above if ln.key is not None), None)
    if previous is not None and previous.key is not None:
        column, key, has_value = previous.key
        if line.indent > column:
            why = (
                f" ({key!r} on line {previous.number} already has a value)"
                if has_value
                else f" (under {key!r} on line {previous.number})"
            )
            return SyntaxProblem(
                *where, f"bad indentation: this line is indented more than the key above it"
                f" expects{why}"
            )  # fmt: skip
    # The indentation levels in use above: every key column on the way up to the top.
    levels: list[int] = []
    for candidate in above:
        if candidate.key is not None and (not levels or candidate.key[0] < levels[-1]):
            levels.append(candidate.key[0])
    shown = sorted(set(levels))
    listed = ", ".join(map(str, shown[:-1])) + f" or {shown[-1]}" if len(shown) > 1 else ""
    if listed:
        detail = f" (the keys above are indented by {listed})"
    elif shown:
        detail = f" (the keys above are indented by {shown[0]})"
    else:
        detail = ""
    return SyntaxProblem(
        *where, f"bad indentation: this line is indented by {line.indent} spaces,"
        f" which lines up with no key above it{detail}"
    )  # fmt: skip


def explain(exc: yaml.MarkedYAMLError, text: str) -> SyntaxProblem:
    """``exc`` (raised while reading ``text``) as a problem in words, at a line and column."""
    problem, context = exc.problem or "", exc.context or ""
    at, opened = exc.problem_mark or exc.context_mark, exc.context_mark
    lines = _lines(text)
    line_no, column = (at.line + 1, at.column + 1) if at is not None else (1, 1)
    line = lines[min(line_no, len(lines)) - 1]

    if "found character '\\t'" in problem:
        if not line.text[: column - 1].strip():
            return SyntaxProblem(
                line_no, column,
                "a tab character is not allowed for indentation: indent with spaces",
            )  # fmt: skip
        return SyntaxProblem(line_no, column, "a tab character is not allowed here: use spaces")
    if "found character" in problem and "that cannot start any token" in problem:
        char = problem.split("'")[1] if "'" in problem else "?"
        return SyntaxProblem(
            line_no, column, f"a value cannot start with {char!r}: put the value in quotes"
        )
    if "quoted scalar" in context and opened is not None and "found unexpected" in problem:
        quote = lines[opened.line].text[opened.column : opened.column + 1] or '"'
        return SyntaxProblem(
            opened.line + 1, opened.column + 1,
            f"unclosed quote: the string that starts here has no closing {quote}",
        )  # fmt: skip
    if "found unknown escape character" in problem:
        char = problem.rsplit("'", 2)[-2] if problem.count("'") >= 2 else "?"
        return SyntaxProblem(
            line_no, column - 1 if column > 1 else column,
            f"unknown escape '\\{char}' in a double-quoted string:"
            " write '\\\\' for a backslash, or use single quotes",
        )  # fmt: skip
    if context.startswith("while parsing a flow") and opened is not None:
        opening, closing, what = (
            ("[", "]", "list") if "sequence" in context else ("{", "}", "mapping")
        )
        return SyntaxProblem(
            opened.line + 1, opened.column + 1,
            f"unclosed {opening!r}: the {what} opened here has no matching {closing!r}"
            " (or a ',' is missing between two entries)",
        )  # fmt: skip
    if problem == "mapping values are not allowed here":
        if line_no > 1 and not _VALUE_COLON.search(line.text[: column - 1] + " "):
            # The whole line was read as more text of the value above it: it is
            # indented past the key above, whose value is already given.
            return _indentation(lines, line_no)
        return SyntaxProblem(
            line_no, column, "a ': ' inside a value: put the whole value in quotes"
        )
    if problem == "sequence entries are not allowed here":
        return SyntaxProblem(line_no, column, "a list item ('- ') must start its own line")
    found = _FOUND.search(problem)
    if problem.startswith("expected <block end>") and found is not None:
        token = found.group(1)
        if token == "-":
            return SyntaxProblem(
                line_no, column, "a list item ('- ') where a key was expected:"
                " one level cannot mix keys and list items"
            )  # fmt: skip
        if token in ("]", "}"):
            return SyntaxProblem(
                line_no, column, f"unmatched {token!r}: nothing was opened for it to close"
            )
        starts_line = column == line.indent + 1
        if "block collection" in context and opened is not None and starts_line:
            if line.indent == opened.column:
                return SyntaxProblem(
                    line_no, column, "a key where a list item ('- ') was expected:"
                    " one level cannot mix keys and list items"
                )  # fmt: skip
            return _indentation(lines, line_no)
        if starts_line:
            return _indentation(lines, line_no)
        return SyntaxProblem(
            line_no, column, "unexpected text after a value: put the whole value in quotes"
        )
    if "found undefined alias" in problem:
        name = problem.rsplit("'", 2)[-2] if problem.count("'") >= 2 else "?"
        return SyntaxProblem(
            line_no, column, f"unknown alias '*{name}': no anchor '&{name}' is defined before it"
        )
    if "could not determine a constructor for the tag" in problem:
        tag = problem.rsplit("'", 2)[-2] if problem.count("'") >= 2 else "?"
        return SyntaxProblem(
            line_no, column, f"the tag {tag.replace('tag:yaml.org,2002:', '!!')!r} is not allowed:"
            " values are strings, numbers, booleans, lists and mappings"
        )  # fmt: skip
    if "found unhashable key" in problem:
        return SyntaxProblem(line_no, column, "a key must be a plain value, not a list or mapping")
    if "but found another document" in problem:
        return SyntaxProblem(
            line_no, column, "a second document ('---'): a config file holds one document"
        )
    where = f" ({context} at line {opened.line + 1}, column {opened.column + 1})" if opened else ""
    return SyntaxProblem(line_no, column, f"YAML syntax error: {problem or context}{where}")
