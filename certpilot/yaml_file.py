"""A YAML file read node by node, so that every complaint names the file and the line.

``YamlReader`` composes a document into PyYAML nodes (which keep their line) and reads mappings,
lists, texts and numbers out of it; anything else raises ``PolicyFileError(source, line, problem)``.
The alert policy (certpilot.alert_policy) and the certificate policy (certpilot.policy) are read with it.
No Prefect, no network here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import yaml

from certpilot.errors import PermanentError

__all__ = ["PolicyFileError", "YamlReader", "line_of"]

_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"


class PolicyFileError(PermanentError):
    """A policy or suppressions file that cannot be used: ``source`` (a path, or where it came from),
    ``line`` (1-based, None when the file is not YAML at all) and ``problem``."""

    def __init__(self, source: str, line: int | None, problem: str) -> None:
        self.source, self.line, self.problem = source, line, problem
        super().__init__(f"{source}:{line}: {problem}" if line else f"{source}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.source, self.line, self.problem))


def line_of(node: yaml.Node) -> int:
    """The 1-based line where ``node`` starts."""
    return int(node.start_mark.line) + 1


class YamlReader:
    """Reads one YAML text from ``source`` (named in every error)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node: yaml.Node | None, problem: str) -> PolicyFileError:
        return PolicyFileError(self.source, line_of(node) if node is not None else None, problem)

    def document(self, text: str) -> yaml.Node:
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            raise PolicyFileError(self.source, mark.line + 1 if mark else None,
                                  f"not valid YAML: {exc.problem or exc.context}") from None
        except yaml.YAMLError as exc:
            raise PolicyFileError(self.source, None, f"not valid YAML: {exc}") from None
        if node is None:
            raise PolicyFileError(self.source, None, "empty file")
        return node

    def mapping(self, node: yaml.Node, what: str, allowed: Sequence[str],
                required: Sequence[str] = ()) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """The keys of a mapping, each with its key and value nodes; only ``allowed`` keys, each once,
        every ``required`` one present."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping with keys {', '.join(allowed)}")
        found: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else ""
            if name not in allowed:
                raise self.fail(key, f"unknown key {name!r} in {what}: expected {', '.join(allowed)}")
            if name in found:
                raise self.fail(key, f"{name!r} given twice in {what}")
            found[name] = (key, value)
        for name in required:
            if name not in found:
                raise self.fail(node, f"{what} needs {name!r}")
        return found

    def pairs(self, node: yaml.Node, what: str) -> list[tuple[yaml.Node, yaml.Node]]:
        """A mapping with keys of the caller's choosing (key and value nodes, in order); a key twice is refused."""
        if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
            return []
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping")
        seen: set[str] = set()
        for key, _ in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else ""
            if name in seen:
                raise self.fail(key, f"{name!r} given twice in {what}")
            seen.add(name)
        return list(node.value)

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list")
        return list(node.value)

    def text(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag == _NULL or not str(node.value).strip():
            raise self.fail(node, f"{what} must be a non-empty text")
        return str(node.value).strip()

    def texts(self, node: yaml.Node, what: str) -> tuple[str, ...]:
        """A list of non-empty texts (a single text is not a list)."""
        return tuple(self.text(item, f"each of {what}") for item in self.sequence(node, what))

    def number(self, node: yaml.Node, what: str) -> float:
        try:
            if not isinstance(node, yaml.ScalarNode):
                raise ValueError
            value = float(node.value)
        except ValueError:
            raise self.fail(node, f"{what} must be a number of days") from None
        if not value > 0:
            raise self.fail(node, f"{what} must be more than 0 days, not {node.value}")
        return value

    def integer(self, node: yaml.Node, what: str, minimum: int = 1) -> int:
        """A whole number of at least ``minimum``."""
        if not isinstance(node, yaml.ScalarNode) or node.tag != _INT:
            shown = node.value if isinstance(node, yaml.ScalarNode) else "a " + node.id
            raise self.fail(node, f"{what} must be a whole number, not {shown!r}")
        value = int(yaml.constructor.SafeConstructor().construct_yaml_int(node))
        if value < minimum:
            raise self.fail(node, f"{what} must be at least {minimum}, not {value}")
        return value

    def boolean(self, node: yaml.Node, what: str) -> bool:
        """true/false (YAML also reads yes/no and on/off as booleans)."""
        if not isinstance(node, yaml.ScalarNode) or node.tag != _BOOL:
            shown = node.value if isinstance(node, yaml.ScalarNode) else "a " + node.id
            raise self.fail(node, f"{what} must be true or false, not {shown!r}")
        return bool(yaml.SafeLoader.bool_values[str(node.value).lower()])

    def is_boolean(self, node: yaml.Node) -> bool:
        return isinstance(node, yaml.ScalarNode) and node.tag == _BOOL

    def when(self, node: yaml.Node, what: str) -> dt.datetime:
        value = self.text(node, what)
        try:
            moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise self.fail(node, f"{what} {value!r} is not an ISO 8601 time such as 2030-01-31T18:00:00Z") from None
        if moment.tzinfo is None:
            raise self.fail(node, f"{what} {value!r} has no time zone: add Z (UTC) or an offset such as +02:00")
        return moment.astimezone(dt.timezone.utc)
