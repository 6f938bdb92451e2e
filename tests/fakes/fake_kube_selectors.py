"""The fake Kubernetes API server's label and field selectors, and what a list or watch selects.

- Label selectors in the apiserver's syntax: ``a=b``, ``a==b``, ``a!=b``, ``a in (x,y)``,
  ``a notin (x)``, ``a``, ``!a``, ``a>1``, ``a<1``, comma-joined (all must hold). As in
  Kubernetes, ``!=`` and ``notin`` also match objects without the label.
- Field selectors: ``path=value``, ``path==value``, ``path!=value``, comma-joined, over the
  paths a kind supports (others are rejected, as the apiserver does). Backslash escapes in
  values are not modelled.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from tests.fakes.fake_kube_objects import JsonDict, Kind, bad_request

__all__ = ["FieldSelector", "LabelSelector", "Selection", "field_value"]

_SET_RE = re.compile(r"^([^\s!=<>(),]+)\s+(in|notin)\s*\((.*)\)$", re.S)
_BINARY_RE = re.compile(r"^([^\s!=<>(),]+)\s*(==|=|!=|<|>)\s*([^\s!=<>(),]*)$")
_KEY_RE = re.compile(r"^[^\s!=<>(),]+$")
Requirement = Callable[[Mapping[str, str]], bool]


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses: ``a in (x,y),b`` has two requirements."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value is not None and re.fullmatch(r"-?\d+", value) else None


def _requirement(text: str) -> Requirement:
    if match := _SET_RE.match(text):
        key, op, inner = match.groups()
        values = {v.strip() for v in inner.split(",")}
        if values == {""}:
            raise ValueError(f"for 'in', 'notin' operators, values set can't be empty: {text!r}")
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if match := _BINARY_RE.match(text):
        key, op, value = match.groups()
        if op in ("=", "=="):
            return lambda labels: labels.get(key) == value
        if op == "!=":
            return lambda labels: labels.get(key) != value
        if (bound := _int_or_none(value)) is None:
            raise ValueError(f"for 'Gt', 'Lt' operators, the value must be an integer: {text!r}")

        def compare(labels: Mapping[str, str]) -> bool:
            number = _int_or_none(labels.get(key))
            return number is not None and (number > bound if op == ">" else number < bound)

        return compare
    if text.startswith("!") and _KEY_RE.match(key := text[1:].strip()):
        return lambda labels: key not in labels
    if _KEY_RE.match(text):
        return lambda labels: text in labels
    raise ValueError(f"unable to parse requirement: {text!r}")


class LabelSelector:
    """A parsed label selector; the empty string selects everything."""

    def __init__(self, text: str | None = None) -> None:
        self.text = (text or "").strip()
        parts = _split_top_level(self.text) if self.text else []
        if any(not p for p in parts):
            raise ValueError(f"unable to parse requirement: empty term in {self.text!r}")
        self._requirements = [_requirement(p) for p in parts]

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        return all(req(labels or {}) for req in self._requirements)


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The value of a dotted field path as a field selector sees it ("" when absent)."""
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


class FieldSelector:
    """A parsed field selector over the paths in `supported`."""

    def __init__(self, text: str | None, supported: frozenset[str]) -> None:
        self.text = (text or "").strip()
        self._terms: list[tuple[str, bool, str]] = []  # (path, equal?, value)
        for part in self.text.split(",") if self.text else []:
            match = re.match(r"^\s*([^\s!=]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
            if match is None:
                raise ValueError(f"invalid field selector term: {part!r}")
            path, op, value = match.groups()
            if path not in supported:
                raise ValueError(f'field label not supported: "{path}"')
            self._terms.append((path, op != "!=", value))

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return all((field_value(obj, p) == v) == eq for p, eq, v in self._terms)


class Selection:
    """What a list or watch selects: a kind, maybe one namespace, label and field selectors
    (400 BadRequest for a selector that does not parse)."""

    def __init__(self, kind: Kind, namespace: str | None, labels: str | None, fields: str | None):
        try:
            self.labels = LabelSelector(labels)
            self.fields = FieldSelector(fields, kind.field_labels)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        self.kind, self.namespace = kind, namespace or None

    def matches(self, obj: JsonDict) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self.labels.matches(meta.get("labels")) and self.fields.matches(obj)
