"""What the fake API server's validation refuses (422 Invalid), worded as the apiserver's.

The rules of ``ValidateObjectMeta``, ``ValidatePod`` and ``ValidatePodUpdate`` a client of this
project can trip, each a ``FieldError`` with the apiserver's field path and message:

- names: a DNS-1123 subdomain (``metadata.name``), name or generateName required;
- labels: qualified names and label values;
- owner references: apiVersion (with a version), kind, name and uid set; at most one with
  ``controller: true``;
- a pod's containers: at least one; each named by a DNS-1123 label, unique across
  ``containers`` and ``initContainers``, with an image;
- a pod update: the spec changes only in images and a lower activeDeadlineSeconds.

Wrong types, unknown fields and unparsable quantities or times are refused before this, when
the body is decoded (``fake_kube_schema``, 400).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from tests.fakes.fake_kube_objects import FieldError, JsonDict, Kind

__all__ = [
    "create_errors",
    "dns1123_label",
    "dns1123_subdomain",
    "label_errors",
    "meta_errors",
    "owner_reference_errors",
    "pod_spec_errors",
    "pod_update_errors",
]

_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN_FMT = _LABEL_FMT + r"(\." + _LABEL_FMT + ")*"
_QUALIFIED_FMT = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_VALUE_FMT = "(" + _QUALIFIED_FMT + ")?"
_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character"
)
_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
    "or '.', and must start and end with an alphanumeric character"
)
_QUALIFIED_MSG = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
    "alphanumeric character"
)
_LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' "
    "or '.', and must start and end with an alphanumeric character"
)


def _regex_error(message: str, fmt: str, *examples: str) -> str:
    """Go's ``validation.RegexError``, double space after the first example included."""
    if examples:
        message += " (e.g. " + "".join(
            f"{' or ' if i else ''}'{e}', " for i, e in enumerate(examples)
        )
        return message + f"regex used for validation is '{fmt}')"
    return message + f" (regex used for validation is '{fmt}')"


def _matches(fmt: str, value: str) -> bool:
    return re.fullmatch(fmt, value) is not None


def dns1123_label(value: str) -> list[str]:
    """``validation.IsDNS1123Label``: why `value` is no DNS-1123 label (empty: it is one)."""
    errors = ["must be no more than 63 characters"] if len(value) > 63 else []
    if not _matches(_LABEL_FMT, value):
        errors.append(_regex_error(_LABEL_MSG, _LABEL_FMT, "my-name", "123-abc"))
    return errors


def dns1123_subdomain(value: str) -> list[str]:
    """``validation.IsDNS1123Subdomain``."""
    errors = ["must be no more than 253 characters"] if len(value) > 253 else []
    if not _matches(_SUBDOMAIN_FMT, value):
        errors.append(_regex_error(_SUBDOMAIN_MSG, _SUBDOMAIN_FMT, "example.com"))
    return errors


def _qualified_name(value: str) -> list[str]:
    """``validation.IsQualifiedName``: a label key (an optional DNS subdomain prefix and /)."""
    parts, errors = value.split("/"), []
    example = _regex_error(_QUALIFIED_MSG, _QUALIFIED_FMT, "MyName", "my.name", "123-abc")
    if len(parts) > 2:
        suffix = " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        return [f"a qualified name {example}{suffix}"]
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix:
            errors.append("prefix part must be non-empty")
        errors += [f"prefix part {why}" for why in dns1123_subdomain(prefix) if prefix]
    name = parts[-1]
    if not name:
        errors.append("name part must be non-empty")
    elif len(name) > 63:
        errors.append("name part must be no more than 63 characters")
    if not _matches(_QUALIFIED_FMT, name):
        errors.append(f"name part {example}")
    return errors


def label_errors(labels: Any, field: str = "metadata.labels") -> list[FieldError]:
    """``ValidateLabels``: each key a qualified name, each value a label value."""
    errors: list[FieldError] = []
    for key, value in (labels or {}).items() if isinstance(labels, dict) else ():
        errors += [FieldError.invalid(field, key, why) for why in _qualified_name(key)]
        value = value or ""
        if len(value) > 63:
            errors.append(FieldError.invalid(field, value, "must be no more than 63 characters"))
        if not _matches(_LABEL_VALUE_FMT, value):
            why = _regex_error(_LABEL_VALUE_MSG, _LABEL_VALUE_FMT, "MyValue", "my_value", "12345")
            errors.append(FieldError.invalid(field, value, why))
    return errors


def _group_version(api_version: str) -> tuple[str, str]:
    """``schema.ParseGroupVersion``, with ("", "") for what it cannot parse."""
    if api_version.count("/") > 1:
        return "", ""
    group, _, version = api_version.rpartition("/")
    return group, version


def owner_reference_errors(refs: Any, field: str = "metadata.ownerReferences") -> list[FieldError]:
    """``ValidateOwnerReferences``: every reference complete, at most one controller. The
    field has no index: the apiserver names the list, not the entry."""
    errors: list[FieldError] = []
    controller = ""
    for ref in refs if isinstance(refs, list) else ():
        ref = ref if isinstance(ref, dict) else {}
        if not _group_version(ref.get("apiVersion") or "")[1]:
            value = ref.get("apiVersion") or ""
            errors.append(
                FieldError.invalid(f"{field}.apiVersion", value, "version must not be empty")
            )
        for key in ("kind", "name", "uid"):
            if not ref.get(key):
                errors.append(FieldError.invalid(f"{field}.{key}", "", f"{key} must not be empty"))
        if ref.get("controller") is True:
            this = f"{ref.get('kind') or ''}/{ref.get('name') or ''}"
            if controller:
                why = (
                    'Only one reference can have Controller set to true. Found "true" in '
                    f"references for {controller} and {this}"
                )
                errors.append(FieldError.invalid(field, refs, why))
            else:
                controller = this
    return errors


def meta_errors(name: str, meta: JsonDict) -> list[FieldError]:
    """``ValidateObjectMeta`` (for a create; an update checks the same but the name)."""
    errors: list[FieldError] = []
    if not name:
        errors.append(FieldError.required("metadata.name", "name or generateName is required"))
    else:
        errors += [
            FieldError.invalid("metadata.name", name, why) for why in dns1123_subdomain(name)
        ]
    errors += label_errors(meta.get("labels"))
    errors += owner_reference_errors(meta.get("ownerReferences"))
    return errors


def pod_spec_errors(spec: Any) -> list[FieldError]:
    """The containers of ``ValidatePodSpec``: at least one; names DNS-1123 labels, unique
    (init containers' names against every other container's too); images set."""
    spec = spec if isinstance(spec, dict) else {}
    containers = spec.get("containers")
    errors: list[FieldError] = []
    if not containers:
        errors.append(FieldError.required("spec.containers"))
    names: set[str] = set()
    for field in ("containers", "initContainers"):
        if field == "initContainers":
            # Regular containers are checked among themselves first, then init against all.
            names = {str(c.get("name")) for c in containers or [] if isinstance(c, dict)}
        for i, container in enumerate(spec.get(field) or []):
            container = container if isinstance(container, dict) else {}
            path, name = f"spec.{field}[{i}]", container.get("name") or ""
            if not name:
                errors.append(FieldError.required(f"{path}.name"))
            else:
                errors += [FieldError.invalid(f"{path}.name", name, w) for w in dns1123_label(name)]
            if name in names:
                errors.append(FieldError.duplicate(f"{path}.name", name))
            names.add(name)
            if not container.get("image"):
                errors.append(FieldError.required(f"{path}.image"))
    return errors


def create_errors(k: Kind, name: str, body: JsonDict) -> list[FieldError]:
    """Why the apiserver would refuse to create `body` as `name` (422 Invalid)."""
    errors = meta_errors(name, body.get("metadata") or {})
    if k.plural == "pods":
        errors += pod_spec_errors(body.get("spec"))
    return errors


def pod_update_errors(old: JsonDict, new: JsonDict) -> list[FieldError]:
    """What a pod update may not change in the spec (a simplified ``ValidatePodUpdate``)."""
    if new == old:
        return []
    errors = pod_spec_errors(new)
    probe = copy.deepcopy(new)  # the new spec with every allowed change undone
    for field in ("containers", "initContainers"):
        before, after = old.get(field) or [], probe.get(field) or []
        if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
            for b, a in zip(before, after, strict=True):
                if isinstance(b, dict) and isinstance(a, dict) and a.get("image"):
                    a["image"] = b.get("image")
    was, now = old.get("activeDeadlineSeconds"), new.get("activeDeadlineSeconds")
    if was != now:
        path = "spec.activeDeadlineSeconds"
        if now is None:
            why = "must not update from a positive integer to nil value"
            return [*errors, FieldError.invalid(path, now, why)]
        if not 0 <= now <= 2**31 - 1:
            why = "must be between 0 and 2147483647, inclusive"
            return [*errors, FieldError.invalid(path, now, why)]
        if was is not None and now > was:
            why = "must be less than or equal to previous value"
            return [*errors, FieldError.invalid(path, now, why)]
        probe["activeDeadlineSeconds"] = was
        if was is None:
            del probe["activeDeadlineSeconds"]
    if probe != old:
        why = (
            "pod updates may not change fields other than `spec.containers[*].image`,"
            "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`"
        )
        errors.append(FieldError.forbidden("spec", why))
    return errors
