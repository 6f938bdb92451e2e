"""Decoding a request body into the kind's types, as the apiserver does first (400 BadRequest).

The apiserver decodes every body it is to store (a create's, a PUT's, a patch's result) into
the kind's Go types before validating anything. What does not decode is refused with 400
BadRequest, ``Lease in version "v1" cannot be handled as a Lease: <why>``, worded as Go's:

- a value of the wrong JSON type: ``json: cannot unmarshal string into Go struct field
  LeaseSpec.spec.leaseDurationSeconds of type int32`` (the first one, as Go reports);
- an integer with a fraction or out of its type's range: ``... cannot unmarshal number 1.5 ...``;
- a quantity that does not parse (``memory: "lots"``): ``quantities must match the regular
  expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'``;
- a Time or MicroTime that its layout does not parse; a MicroTime needs exactly six
  fractional digits: ``parsing time "2026-11-29T10:00:00Z" as
  "2006-01-02T15:04:05.000000Z07:00": cannot parse "Z" as ".000000"``.

Unknown fields (case matters), by the request's ``fieldValidation``: ``Strict``, 400 ``strict
decoding error: unknown field "spec.foo"``; ``Warn`` (the default), dropped with one
``unknown field "spec.foo"`` warning each; ``Ignore``, dropped. The types are those of the
OpenAPI schemas that kubernetes-validate ships (a dev dependency), its newest Kubernetes.
Not modelled: duplicate fields, base64 of a Secret's ``data``, a number's exact spelling.
"""

from __future__ import annotations

import calendar
import functools
import importlib.resources
import json
import re
from typing import Any

from tests.fakes.fake_kube_objects import JsonDict, Kind, bad_request

__all__ = ["FIELD_VALIDATION", "decode", "go_time_error", "quantity_error"]

FIELD_VALIDATION = ("Ignore", "Warn", "Strict")
_SCHEMAS = {
    "pods": "io.k8s.api.core.v1.Pod",
    "leases": "io.k8s.api.coordination.v1.Lease",
    "secrets": "io.k8s.api.core.v1.Secret",
}
_QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
_TIME = "io.k8s.apimachinery.pkg.apis.meta.v1.Time"
_MICRO_TIME = "io.k8s.apimachinery.pkg.apis.meta.v1.MicroTime"
_INT_OR_STRING = "io.k8s.apimachinery.pkg.util.intstr.IntOrString"
_GO_NAMES = {
    _QUANTITY: "resource.Quantity",
    _TIME: "v1.Time",
    _MICRO_TIME: "v1.MicroTime",
    _INT_OR_STRING: "intstr.IntOrString",
}
_INT_RANGES = {"int32": 2**31, "int64": 2**63}


@functools.cache
def _definitions() -> dict[str, Any]:
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    versions = [d.name for d in root.iterdir() if re.fullmatch(r"v[\d.]+-local", d.name)]
    newest = max(versions, key=lambda v: [int(n) for n in v[1:-6].split(".")])
    definitions: dict[str, Any] = json.loads((root / newest / "_definitions.json").read_text())
    return dict(definitions["$defs"])


class _Abort(Exception):
    """An error that ends decoding at once (a custom unmarshaller's), not saved for later."""


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _types(schema: JsonDict) -> list[str]:
    types = schema.get("type")
    return [t for t in (types if isinstance(types, list) else [types]) if t and t != "null"]


def _go_type(schema: JsonDict) -> str:
    """How Go names the type a schema describes (``v1.LeaseSpec``, ``int32``, ``[]string``)."""
    if ref := schema.get("$ref"):
        name = ref.rsplit("/", 1)[-1]
        return _GO_NAMES.get(name) or ".".join(name.split(".")[-2:])
    types = _types(schema)
    if types == ["string"]:
        return "[]uint8" if schema.get("format") == "byte" else "string"
    if types == ["integer"]:
        return str(schema.get("format") or "int64")
    if types == ["array"]:
        return "[]" + _go_type(schema.get("items") or {})
    if types == ["object"] and isinstance(schema.get("additionalProperties"), dict):
        return "map[string]" + _go_type(schema["additionalProperties"])
    return {"number": "float64", "boolean": "bool"}.get(str(types[0]) if types else "", "any")


class _Decoder:
    def __init__(self) -> None:
        self.definitions = _definitions()
        self.type_error: str | None = None  # Go saves the first, goes on, then reports it
        self.unknown: list[str] = []

    def mismatch(self, shown: str, go_type: str, context: tuple[str, tuple[str, ...]]) -> str:
        struct, fields = context
        if struct:
            into = f"Go struct field {struct}.{'.'.join(fields)}"
            return f"json: cannot unmarshal {shown} into {into} of type {go_type}"
        return f"json: cannot unmarshal {shown} into Go value of type {go_type}"

    def save(self, message: str) -> None:
        self.type_error = self.type_error or message

    def value(self, schema: JsonDict, value: Any, path: str, context: Any) -> Any:
        """`value` as decoded (unknown fields dropped); `path` names it for a strict error,
        `context` (the struct, the field names from the top) for a type error."""
        if value is None:
            return None  # null sets Go's zero value, whatever the type
        name = str(schema.get("$ref") or "").rsplit("/", 1)[-1]
        if name in (_QUANTITY, _TIME, _MICRO_TIME, _INT_OR_STRING):
            self.special(name, value, context)
            return value
        go_type = _go_type({"$ref": name} if name else schema)
        if name:
            schema = self.definitions[name]
        types = _types(schema)
        if "properties" in schema:
            if not isinstance(value, dict):
                self.save(self.mismatch(_json_kind(value), go_type, context))
                return None
            struct = name.rsplit(".", 1)[-1]
            decoded = {}
            for key, item in value.items():
                field = f"{path}.{key}" if path else key
                if key not in schema["properties"]:
                    self.unknown.append(field)
                    continue
                inner = (struct, (*context[1], key))
                decoded[key] = self.value(schema["properties"][key], item, field, inner)
            return decoded
        if types == ["array"]:
            if not isinstance(value, list):
                self.save(self.mismatch(_json_kind(value), go_type, context))
                return None
            items = schema.get("items") or {}
            return [self.value(items, v, f"{path}[{i}]", context) for i, v in enumerate(value)]
        if types == ["object"] and isinstance(schema.get("additionalProperties"), dict):
            if not isinstance(value, dict):
                self.save(self.mismatch(_json_kind(value), go_type, context))
                return None
            inner_schema = schema["additionalProperties"]
            return {
                k: self.value(inner_schema, v, f"{path}.{k}", context) for k, v in value.items()
            }
        self.scalar(types[0] if len(types) == 1 else None, go_type, value, context)
        return value

    def scalar(self, kind: str | None, go_type: str, value: Any, context: Any) -> None:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        fits = {
            "string": isinstance(value, str),
            "boolean": isinstance(value, bool),
            "number": number,
            "integer": number,
        }.get(kind or "", True)
        if not fits:
            self.save(self.mismatch(_json_kind(value), go_type, context))
        elif kind == "integer":
            bound = _INT_RANGES.get(go_type, 2**63)
            if isinstance(value, float) or not -bound <= value < bound:
                self.save(self.mismatch(f"number {value}", go_type, context))

    def special(self, name: str, value: Any, context: Any) -> None:
        """The types with an UnmarshalJSON of their own: their errors end decoding."""
        if name == _QUANTITY:
            text = value if isinstance(value, str) else json.dumps(value)
            if why := quantity_error(text.strip()):
                raise _Abort(why)
        elif name == _INT_OR_STRING:
            if not isinstance(value, str) and (
                isinstance(value, bool) or not isinstance(value, int)
            ):
                raise _Abort(self.mismatch(_json_kind(value), "int32", context))
        elif not isinstance(value, str):
            raise _Abort(self.mismatch(_json_kind(value), "string", context))
        elif why := go_time_error(value, micro=name == _MICRO_TIME):
            raise _Abort(why)


def decode(k: Kind, obj: Any, field_validation: str, warnings: list[str]) -> Any:
    """`obj` as the apiserver decodes it for kind `k`: unknown fields dropped (each one a
    warning appended to `warnings` under Warn); 400 BadRequest if it does not decode."""
    if field_validation not in FIELD_VALIDATION:
        raise bad_request(f"fieldValidation must be one of {', '.join(FIELD_VALIDATION)}")
    if not isinstance(obj, dict):
        return obj  # refused by the caller, as no object at all
    decoder = _Decoder()
    failed = f'{k.kind} in version "{k.version}" cannot be handled as a {k.kind}: '
    schema = {"$ref": f"#/$defs/{_SCHEMAS[k.plural]}"}
    try:
        decoded = decoder.value(schema, obj, "", ("", ()))
    except _Abort as exc:
        raise bad_request(failed + str(exc)) from None
    if decoder.type_error:
        raise bad_request(failed + decoder.type_error)
    unknown = [f'unknown field "{field}"' for field in decoder.unknown]
    if unknown and field_validation == "Strict":
        raise bad_request(failed + "strict decoding error: " + ", ".join(unknown))
    if field_validation == "Warn":
        warnings.extend(unknown)
    return decoded


# ---------------------------------------------------------------------------- quantities
_QUANTITY_FORMAT = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
_SUFFIXES = {"", "n", "u", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}


def quantity_error(text: str) -> str | None:
    """Why ``resource.ParseQuantity`` refuses `text`, in its words (None: it parses)."""
    match = re.fullmatch(_QUANTITY_FORMAT, text)
    if match is None:
        return f"quantities must match the regular expression '{_QUANTITY_FORMAT}'"
    number, suffix = match.groups()
    if not re.fullmatch(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)", number):
        return "unable to parse numeric part of quantity"
    exponent = re.fullmatch(r"[eE][-+]?[0-9]+", suffix)
    if suffix not in _SUFFIXES and not exponent:
        return "unable to parse quantity's suffix"
    return None


# ---------------------------------------------------------------------------- times
_FIXED = {"2006": r"\d{4}", "01": r"\d{2}", "02": r"\d{2}", "15": r"\d{1,2}", "04": r"\d{2}"}
_LAYOUT = ["2006", "-", "01", "-", "02", "T", "15", ":", "04", ":", "05", "Z07:00"]
_MICRO_LAYOUT = [*_LAYOUT[:-1], ".000000", "Z07:00"]


def go_time_error(value: str, *, micro: bool) -> str | None:
    """Why Go's ``time.Parse`` refuses `value` with metav1.Time's layout (RFC 3339) or
    MicroTime's (RFC 3339 with exactly six fractional digits), in its words."""
    layout = _MICRO_LAYOUT if micro else _LAYOUT
    whole, rest, numbers = "".join(layout), value, []
    head = f"parsing time {json.dumps(value, ensure_ascii=False)}"
    for element in layout:
        cannot = f'{head} as "{whole}": cannot parse {json.dumps(rest)} as "{element}"'
        if element == "05":
            match = re.match(r"\d{2}([.,]\d+)?" if not micro else r"\d{2}", rest)
        elif element == ".000000":
            match = re.match(r"[.,]\d{6}", rest)
        elif element == "Z07:00":
            match = re.match(r"Z|[+-]\d{2}:\d{2}", rest)
        elif element in _FIXED:
            match = re.match(_FIXED[element], rest)
        else:
            match = re.match(re.escape(element), rest)
        if match is None:
            return cannot
        if element in ("2006", "01", "02", "15", "04", "05"):
            numbers.append(int(match.group()[: 4 if element == "2006" else 2]))
        rest = rest[match.end() :]
    if rest:
        return f"{head}: extra text: {json.dumps(rest)}"
    year, month, day, hour, minute, second = numbers
    for what, number, top in (("month", month, 12), ("hour", hour, 23), ("minute", minute, 59)):
        if not (1 if what == "month" else 0) <= number <= top:
            return f"{head}: {what} out of range"
    if second > 59:
        return f"{head}: second out of range"
    if not 1 <= day <= calendar.monthrange(year, month)[1]:
        return f"{head}: day out of range"
    return None
