"""Just enough of Helm's template language to render the async forwarder container of llm-engine's chart.

Covers what that part of ``charts/model-engine/templates/service_template_config_map.yaml`` uses: trim
markers (``{{-``, ``-}}``), comments, ``if``/``else if``/``else``/``end``, ``with``, variables (``$x``,
``$x.a.b``, ``$.Values.a``, ``.`` inside ``with``), string literals, the functions ``eq``, ``ne``, ``and``,
``or``, ``not`` and the pipes ``quote`` and ``nindent N``. Anything else raises, so a chart change that this
renderer cannot follow fails the test instead of being rendered wrongly.
"""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"{{(-?)(.*?)(-?)}}", re.S)
_WORD = re.compile(r'"(?:[^"\\]|\\.)*"|\(|\)|\||[^\s()|]+')


def _tokens(text: str) -> list[tuple[str, str]]:
    parts: list[list[str]] = []
    position = 0
    for match in _ACTION.finditer(text):
        parts.append(["text", text[position:match.start()]])
        parts.append(["action", match.group(2).strip(), match.group(1), match.group(3)])
        position = match.end()
    parts.append(["text", text[position:]])
    for index, part in enumerate(parts):
        if part[0] == "action":
            if part[2] == "-":
                parts[index - 1][1] = parts[index - 1][1].rstrip()
            if part[3] == "-":
                parts[index + 1][1] = parts[index + 1][1].lstrip()
    return [(part[0], part[1]) for part in parts]


def _truthy(value: Any) -> bool:
    return value not in (None, False, "", 0) and value != {} and value != []


def _lookup(value: Any, path: list[str]) -> Any:
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


class _Scope:
    def __init__(self, root: dict[str, Any], variables: dict[str, Any], dot: Any) -> None:
        self.root, self.variables, self.dot = root, variables, dot

    def term(self, word: str) -> Any:
        if word.startswith('"'):
            return word[1:-1]
        if re.fullmatch(r"-?\d+", word):
            return int(word)
        if word == ".":
            return self.dot
        if word.startswith("$."):
            return _lookup(self.root, word[2:].split("."))
        if word.startswith("$"):
            name, *path = word.split(".")
            if name not in self.variables:
                raise KeyError(f"template variable {name} is not given")
            return _lookup(self.variables[name], path)
        if word.startswith("."):
            return _lookup(self.dot, word[1:].split("."))
        raise ValueError(f"unsupported template term {word!r}")

    def evaluate(self, expression: str) -> Any:
        words = _WORD.findall(expression)
        value, rest = self._pipeline(words)
        if rest:
            raise ValueError(f"cannot parse {expression!r}")
        return value

    def _pipeline(self, words: list[str]) -> tuple[Any, list[str]]:
        value, words = self._command(words)
        while words and words[0] == "|":
            function, *words = words[1:]
            if function == "quote":
                value = '"' + str(value if value is not None else "").replace('"', '\\"') + '"'
            elif function == "nindent":
                width, words = self._operand(words)
                value = "\n" + "\n".join((" " * width + line) if line else line for line in str(value).split("\n"))
            else:
                raise ValueError(f"unsupported pipe {function}")
        return value, words

    def _command(self, words: list[str]) -> tuple[Any, list[str]]:
        head, *rest = words
        functions = {"eq": 2, "ne": 2, "and": -1, "or": -1, "not": 1}
        if head not in functions:
            return self._operand(words)
        arguments: list[Any] = []
        while rest and rest[0] not in ("|", ")"):
            argument, rest = self._operand(rest)
            arguments.append(argument)
        if head == "eq":
            return arguments[0] == arguments[1], rest
        if head == "ne":
            return arguments[0] != arguments[1], rest
        if head == "not":
            return not _truthy(arguments[0]), rest
        if head == "and":
            return all(_truthy(a) for a in arguments), rest
        return any(_truthy(a) for a in arguments), rest

    def _operand(self, words: list[str]) -> tuple[Any, list[str]]:
        if words[0] == "(":
            value, rest = self._pipeline(words[1:])
            assert rest and rest[0] == ")", words
            return value, rest[1:]
        return self.term(words[0]), words[1:]


def render(text: str, root: dict[str, Any], variables: dict[str, Any]) -> str:
    """Render ``text`` with ``.Values`` and friends in ``root`` (``$.Values``) and ``variables`` (``$name``)."""
    tokens = _tokens(text)
    output, index = _block(tokens, 0, _Scope(root, variables, root), stop=())
    assert index == len(tokens), "unbalanced template"
    return output


def _block(tokens: list[tuple[str, str]], index: int, scope: _Scope, stop: tuple[str, ...]) -> tuple[str, int]:
    """Render from ``index`` until an action starting with one of ``stop`` (returned unconsumed)."""
    out: list[str] = []
    while index < len(tokens):
        kind, body = tokens[index]
        if kind == "text":
            out.append(body)
            index += 1
            continue
        if body.startswith("/*"):
            index += 1
            continue
        if body.split(" ", 1)[0] in stop or (body.startswith("else") and "else" in stop):
            return "".join(out), index
        if body.startswith(("if ", "with ")):
            rendered, index = _conditional(tokens, index, scope)
            out.append(rendered)
            continue
        out.append("" if (value := scope.evaluate(body)) is None else str(value))
        index += 1
    return "".join(out), index


def _conditional(tokens: list[tuple[str, str]], index: int, scope: _Scope) -> tuple[str, int]:
    """An ``if``/``with`` action at ``index`` with its branches; returns the chosen branch and the index after ``end``."""
    chosen: str | None = None
    _, body = tokens[index]
    keyword, expression = body.split(" ", 1)
    while True:
        value = scope.evaluate(expression) if expression is not None else True
        inner = _Scope(scope.root, scope.variables, value if keyword == "with" else scope.dot)
        rendered, index = _block(tokens, index + 1, inner, stop=("end", "else"))
        if chosen is None and _truthy(value):
            chosen = rendered
        _, body = tokens[index]
        if body == "end":
            return chosen or "", index + 1
        if body == "else":
            keyword, expression = "if", None
        elif body.startswith("else if "):
            keyword, expression = "if", body[len("else if "):]
        else:
            raise ValueError(f"unsupported branch {body!r}")
