"""The fake Kubernetes API server's patches, by Content-Type.

- RFC 7386 JSON merge patch (``merge_patch``) and RFC 6902 JSON patch (``json_patch``: add,
  remove, replace, move, copy, test).
- A "strategic" merge patch is a merge patch: lists are replaced and ``$patch``-style
  directives are refused (strategic-merge list semantics are not modelled).
- ``patcher`` checks a PATCH body as the apiserver does (415 for another media type, 400 for a
  malformed body) and applies it; a patch that does not apply (a failed ``test`` too) is 422
  Invalid, as in Kubernetes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from tests.fakes.fake_kube_objects import ApiError, JsonDict, bad_request

__all__ = [
    "JSON_PATCH",
    "MERGE_PATCH",
    "STRATEGIC_MERGE_PATCH",
    "PatchTestFailed",
    "json_patch",
    "merge_patch",
    "patcher",
]

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"


def patcher(patch: Any, content_type: str) -> Callable[[JsonDict], Any]:
    """What applies `patch` (a PATCH body of `content_type`) to an object, leaving it as is;
    raises now for a body the server would refuse whatever the object."""
    content_type = content_type.split(";")[0].strip().lower()
    if content_type not in (MERGE_PATCH, STRATEGIC_MERGE_PATCH, JSON_PATCH):
        accepted = f"{JSON_PATCH}, {MERGE_PATCH}, {STRATEGIC_MERGE_PATCH}"
        message = "the body of the request was in an unknown format - accepted media types "
        raise ApiError(415, "UnsupportedMediaType", f"{message}include: {accepted}")
    if not isinstance(patch, list if content_type == JSON_PATCH else dict):
        raise bad_request(f"the body is no valid {content_type} document")
    if content_type == STRATEGIC_MERGE_PATCH and _has_directive(patch):
        raise bad_request("strategic merge patch directives are not modelled by the fake")

    def apply(current: JsonDict) -> Any:
        try:
            if content_type == JSON_PATCH:
                return json_patch(current, patch)
            return merge_patch(copy.deepcopy(current), patch)
        except ValueError as exc:
            message = f"the server rejected our request due to an error in our request: {exc}"
            raise ApiError(422, "Invalid", message) from None

    return apply


def _has_directive(patch: Any) -> bool:
    """Whether a strategic merge patch uses ``$patch``, ``$retainKeys`` and the like."""
    if isinstance(patch, dict):
        return any(str(k).startswith("$") or _has_directive(v) for k, v in patch.items())
    return isinstance(patch, list) and any(_has_directive(v) for v in patch)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class PatchTestFailed(ValueError):
    """A JSON patch ``test`` operation did not hold."""


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise ValueError(f"invalid JSON pointer: {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _index(container: list[Any], token: str, *, insert: bool = False) -> int:
    if insert and token == "-":
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise ValueError(f"invalid array index: {token!r}")
    index = int(token)
    if index > len(container) or (index == len(container) and not insert):
        raise ValueError(f"array index out of range: {index}")
    return index


def _resolve(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        if isinstance(doc, dict):
            if token not in doc:
                raise ValueError(f"path not found: {token!r}")
            doc = doc[token]
        elif isinstance(doc, list):
            doc = doc[_index(doc, token)]
        else:
            raise ValueError(f"cannot descend into a scalar at {token!r}")
    return doc


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent, last = _resolve(doc, tokens[:-1]), tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, insert=True), value)
    else:
        raise ValueError(f"cannot add to a scalar at {last!r}")
    return doc


def _remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise ValueError("cannot remove the whole document")
    parent, last = _resolve(doc, tokens[:-1]), tokens[-1]
    if isinstance(parent, dict) and last in parent:
        del parent[last]
    elif isinstance(parent, list):
        parent.pop(_index(parent, last))
    else:
        raise ValueError(f"path not found: {last!r}")
    return doc


def json_patch(document: Any, operations: Any) -> Any:
    """RFC 6902, applied to a copy of `document`; the first failing operation aborts all."""
    if not isinstance(operations, list):
        raise ValueError("a JSON patch must be a list of operations")
    doc = copy.deepcopy(document)
    for op in operations:
        if not isinstance(op, dict) or not isinstance(op.get("op"), str) or "path" not in op:
            raise ValueError(f"invalid JSON patch operation: {op!r}")
        name, tokens = op["op"], _pointer(op["path"])
        if name in ("add", "replace", "test") and "value" not in op:
            raise ValueError(f"JSON patch operation {name!r} needs a value")
        if name == "test":
            if _resolve(doc, tokens) != op["value"]:
                raise PatchTestFailed(f"testing value {op['path']} failed")
        elif name == "add":
            doc = _add(doc, tokens, copy.deepcopy(op["value"]))
        elif name == "remove":
            doc = _remove(doc, tokens)
        elif name == "replace":
            value = copy.deepcopy(op["value"])
            doc = _add(_remove(doc, tokens), tokens, value) if tokens else value
        elif name in ("move", "copy"):
            source = _pointer(op.get("from"))
            value = copy.deepcopy(_resolve(doc, source))
            if name == "move":
                doc = _remove(doc, source)
            doc = _add(doc, tokens, value)
        else:
            raise ValueError(f"unknown JSON patch operation: {name!r}")
    return doc
