"""The narrow Kubernetes API the provider uses, and its implementation over lightkube.

Everything the provider does to a cluster goes through `KubeApi`: six verbs on two kinds
(Pods and coordination.k8s.io Leases) in one namespace, objects as plain JSON dicts. The
in-memory fake of the tests implements the same surface from the other side (over HTTP), and
the RBAC Role in deploy/kubernetes grants exactly these verbs.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

from rlm_orchestrator.exceptions import SandboxError

Kind = Literal["Pod", "Lease"]
JsonObject = dict[str, Any]


class KubeApiError(SandboxError):
    """The API server refused a request (`status_code` is its HTTP status; 0: not reached at
    all). `code`, as on every SandboxError, is the gRPC status a server would answer with."""

    def __init__(self, status_code: int, reason: str, message: str) -> None:
        super().__init__(f"Kubernetes API: {status_code} {reason}: {message}")
        self.status_code = status_code
        self.reason = reason

    @property
    def conflict(self) -> bool:
        """A precondition (resourceVersion) failed, or the name is taken."""
        return self.status_code == 409

    @property
    def not_found(self) -> bool:
        return self.status_code == 404


class KubeApi(Protocol):
    """One namespace of a cluster, as the provider needs it."""

    namespace: str

    async def create(self, kind: Kind, obj: JsonObject) -> JsonObject: ...

    async def get(self, kind: Kind, name: str) -> JsonObject: ...

    async def list(self, kind: Kind, labels: Mapping[str, str]) -> list[JsonObject]: ...

    async def patch(self, kind: Kind, name: str, patch: JsonObject) -> JsonObject:
        """A JSON merge patch; `metadata.resourceVersion` in it is a precondition (409)."""
        ...

    async def delete(self, kind: Kind, name: str) -> None:
        """Delete, cascading (in the background) to the objects it owns."""
        ...

    def watch(
        self, kind: Kind, *, name: str, resource_version: str
    ) -> AsyncGenerator[tuple[str, JsonObject], None]:
        """(event type, object) for one object, from after `resource_version`, until closed."""
        ...

    async def aclose(self) -> None: ...


class LightkubeApi:
    """`KubeApi` over lightkube's AsyncClient (in-cluster config, or a kubeconfig file)."""

    # Watches are re-opened this often: below lightkube's 10 s read timeout, so a quiet
    # watch ends cleanly on the server's side and lightkube resumes it from where it was.
    WATCH_SERVER_TIMEOUT = 5

    def __init__(
        self,
        namespace: str,
        *,
        kubeconfig: Path | None = None,
        context: str | None = None,
        transport: Any = None,
    ) -> None:
        import lightkube
        from lightkube.resources.coordination_v1 import Lease
        from lightkube.resources.core_v1 import Pod

        self.namespace = namespace
        if kubeconfig is not None:
            config = lightkube.KubeConfig.from_file(kubeconfig).get(context)
        else:
            # In the cluster: the pod's service account; else KUBECONFIG or ~/.kube/config.
            config = lightkube.KubeConfig.from_env().get(context)
        self._client = lightkube.AsyncClient(
            config=config, namespace=namespace, transport=transport, field_manager="rlm"
        )
        self._kinds: dict[str, Any] = {"Pod": Pod, "Lease": Lease}

    async def create(self, kind: Kind, obj: JsonObject) -> JsonObject:
        resource = self._kinds[kind].from_dict(obj)
        _keep_micro_times(resource, obj)
        with _translated("create", kind):
            # The client's namespace applies (the manifests carry none).
            created = await self._client.create(resource)
        return _as_dict(created)

    async def get(self, kind: Kind, name: str) -> JsonObject:
        with _translated("get", kind):
            found = await self._client.get(self._kinds[kind], name, namespace=self.namespace)
        return _as_dict(found)

    async def list(self, kind: Kind, labels: Mapping[str, str]) -> list[JsonObject]:
        with _translated("list", kind):
            return [
                _as_dict(item)
                async for item in self._client.list(
                    self._kinds[kind], namespace=self.namespace, labels=dict(labels)
                )
            ]

    async def patch(self, kind: Kind, name: str, patch: JsonObject) -> JsonObject:
        from lightkube.types import PatchType

        with _translated("patch", kind):
            patched = await self._client.patch(
                self._kinds[kind],
                name,
                patch,
                namespace=self.namespace,
                patch_type=PatchType.MERGE,
            )
        return _as_dict(patched)

    async def delete(self, kind: Kind, name: str) -> None:
        from lightkube.types import CascadeType

        with _translated("delete", kind):
            await self._client.delete(
                self._kinds[kind], name, namespace=self.namespace, cascade=CascadeType.BACKGROUND
            )

    async def watch(
        self, kind: Kind, *, name: str, resource_version: str
    ) -> AsyncGenerator[tuple[str, JsonObject], None]:
        events = self._client.watch(
            self._kinds[kind],
            namespace=self.namespace,
            fields={"metadata.name": name},
            resource_version=resource_version,
            server_timeout=self.WATCH_SERVER_TIMEOUT,
        )
        with _translated("watch", kind):
            async for event_type, obj in events:
                yield event_type, _as_dict(obj)

    async def aclose(self) -> None:
        await self._client.close()


# A Lease's MicroTimes: the API server parses them with exactly six fractional digits.
_MICRO_TIMES = ("acquireTime", "renewTime")


def _keep_micro_times(resource: Any, obj: JsonObject) -> None:
    """Sends the caller's MicroTime strings as they are: the typed model holds a datetime,
    which msgspec writes without a fraction when its microseconds are 0 (a 400 then)."""
    spec = obj.get("spec")
    if not isinstance(spec, dict) or getattr(resource, "spec", None) is None:
        return
    for field in _MICRO_TIMES:
        if isinstance(spec.get(field), str) and hasattr(resource.spec, field):
            setattr(resource.spec, field, spec[field])  # msgspec does not check a set


def _as_dict(obj: Any) -> JsonObject:
    result: JsonObject = obj.to_dict()
    return result


# What to fix, for the failures a deployment (rather than a race) causes.
_HINTS = {
    0: "the Kubernetes API server cannot be reached: check `kubeconfig` / `context`, or that "
    "the orchestrator runs in the cluster with its service account",
    401: "the API server refused the credentials (kubeconfig, or the service-account token)",
    403: "the orchestrator's service account lacks this permission in the sandbox namespace: "
    "apply the Role of deploy/kubernetes/overlays/pod-per-session/rbac.yaml",
}


def _error(code: int, reason: str, doing: str) -> KubeApiError:
    hint = _HINTS.get(code)
    return KubeApiError(code, reason, f"{doing}; {hint}" if hint else doing)


@contextlib.contextmanager
def _translated(verb: str, kind: str) -> Iterator[None]:
    """lightkube's and httpx's errors as KubeApiError, saying what was being done."""
    import httpx2
    from lightkube import ApiError

    try:
        yield
    except ApiError as exc:
        status = exc.status
        code, reason = int(status.code or 0), str(status.reason or "")
        raise _error(code, reason, f"{verb} {kind}: {status.message}") from exc
    except httpx2.HTTPStatusError as exc:
        # A watch's error answer is streamed: lightkube raises it without decoding its Status.
        response = exc.response
        doing = f"{verb} {kind}: {response.url}"
        raise _error(response.status_code, response.reason_phrase, doing) from exc
    except httpx2.HTTPError as exc:
        raise _error(0, type(exc).__name__, f"{verb} {kind}: {exc}") from exc
