"""The sandbox pod: its manifest, its labels, and what its status says.

The pod is locked down like the fleet's agents (deploy/kubernetes/base/agents.yaml): no
service-account token, no service links, non-root, read-only root filesystem, no
capabilities, RuntimeDefault seccomp, an in-memory size-capped /work, resources, a hard
`activeDeadlineSeconds`, and the NetworkPolicies of the sandbox namespace (nothing out). Its
readiness probe is the kubelet's own gRPC probe, on the agent's plaintext health-only port.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from rlm_orchestrator.config.backends import PodConfig
from rlm_orchestrator.sandbox.kubernetes.api import JsonObject
from rlm_orchestrator.sandbox.launch import (
    CONTAINER_STATE_DIR,
    CONTAINER_WORKDIR,
    MOUNTED_TLS_CERT,
    MOUNTED_TLS_KEY,
    TLS_MOUNT,
    TOKEN_ENV,
    AgentLaunch,
)

MANAGED_BY = "app.kubernetes.io/managed-by"
NAME = "app.kubernetes.io/name"
STATE = "rlm.sandbox/state"  # idle (in the warm pool), leased, or retiring
TEMPLATE = "rlm.sandbox/template"  # hash of the pod's spec: pools only share equal pods
ROLE = "rlm.sandbox/role"
SESSION = "rlm.sandbox/session"
LEASED_BY = "rlm.sandbox/leased-by"
OUR_LABELS = {MANAGED_BY: "rlm-orchestrator", NAME: "rlm-sandbox"}

# Container waiting reasons after which the pod will not start by itself.
FATAL_WAITING = {
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
    "RunContainerError",
}


def restricted_security_context() -> JsonObject:
    return {
        "runAsNonRoot": True,
        "runAsUser": 65534,
        "runAsGroup": 65534,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def agent_args(options: PodConfig, memory_limit_mb: int = 0) -> list[str]:
    tls = bool(options.tls_secret)
    return AgentLaunch(
        listen=f"0.0.0.0:{options.port}",
        health_listen=f"0.0.0.0:{options.health_port}",
        workdir=CONTAINER_WORKDIR,
        state_dir=CONTAINER_STATE_DIR,
        tls_cert=MOUNTED_TLS_CERT if tls else None,
        tls_key=MOUNTED_TLS_KEY if tls else None,
        memory_limit_mb=memory_limit_mb,
    ).args()


def pod_spec(options: PodConfig, memory_limit_mb: int = 0) -> JsonObject:
    container: JsonObject = {
        "name": "agent",
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "args": agent_args(options, memory_limit_mb),
        "ports": [
            {"name": "grpc", "containerPort": options.port, "protocol": "TCP"},
            {"name": "health", "containerPort": options.health_port, "protocol": "TCP"},
        ],
        # Probed often at first: a session is waiting for exactly this.
        "readinessProbe": {
            "grpc": {"port": options.health_port},
            "periodSeconds": 1,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": options.cpu_request, "memory": options.memory_request},
            "limits": {"cpu": options.cpu_limit, "memory": options.memory_limit},
        },
        "securityContext": restricted_security_context(),
        "volumeMounts": [{"name": "work", "mountPath": "/work"}],
    }
    volumes: list[JsonObject] = [
        {"name": "work", "emptyDir": {"medium": "Memory", "sizeLimit": options.work_size_limit}}
    ]
    if options.token_secret:
        # The agent reads it, then removes it from its environment before user code runs.
        container["env"] = [
            {
                "name": TOKEN_ENV,
                "valueFrom": {
                    "secretKeyRef": {"name": options.token_secret, "key": options.token_secret_key}
                },
            }
        ]
    if options.tls_secret:
        container["volumeMounts"].append({"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True})
        volumes.append(
            {
                "name": "tls",
                "secret": {
                    "secretName": options.tls_secret,
                    "defaultMode": 0o440,
                    "items": [
                        {"key": "tls.crt", "path": "tls.crt"},
                        {"key": "tls.key", "path": "tls.key"},
                    ],
                },
            }
        )
    spec: JsonObject = {
        "restartPolicy": "Never",
        "serviceAccountName": options.service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "activeDeadlineSeconds": options.active_deadline_seconds,
        "terminationGracePeriodSeconds": 5,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65534,
            "runAsGroup": 65534,
            "fsGroup": 65534,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if options.runtime_class:
        spec["runtimeClassName"] = options.runtime_class
    if options.node_selector:
        spec["nodeSelector"] = dict(options.node_selector)
    if options.tolerations:
        spec["tolerations"] = list(options.tolerations)
    return spec


def template_hash(spec: JsonObject) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def sandbox_pod(
    spec: JsonObject, *, state: str, owner: JsonObject, annotations: dict[str, str]
) -> JsonObject:
    """A pod manifest owned by an orchestrator's Lease (its deletion takes the pod along)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "rlm-sandbox-",
            "labels": {**OUR_LABELS, STATE: state, TEMPLATE: template_hash(spec)},
            "annotations": annotations,
            "ownerReferences": [owner],
        },
        "spec": spec,
    }


@dataclass(frozen=True)
class PodReadiness:
    """What a pod's status says about whether a session can use it."""

    ready: bool
    ip: str | None
    failure: str | None  # why it will never be ready, when it will not
    summary: str  # for messages: phase, conditions, container state


def readiness(pod: JsonObject) -> PodReadiness:
    status = pod.get("status") or {}
    phase = status.get("phase", "Pending")
    ip = status.get("podIP")
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conditions.get("Ready", {}).get("status") == "True"
    details = [f"phase {phase}"]
    failure = None
    scheduled = conditions.get("PodScheduled", {})
    if scheduled.get("status") == "False":
        details.append(f"unscheduled: {scheduled.get('reason')}: {scheduled.get('message', '')}")
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        waiting, terminated = state.get("waiting"), state.get("terminated")
        if waiting:
            reason = waiting.get("reason", "")
            details.append(f"waiting: {reason}: {waiting.get('message', '')}".rstrip(": "))
            if reason in FATAL_WAITING:
                failure = f"{reason}: {waiting.get('message', '')}".rstrip(": ")
        if terminated:
            failure = (
                f"agent exited ({terminated.get('reason', '')}, code "
                f"{terminated.get('exitCode')}): {terminated.get('message', '')}"
            ).rstrip(": ")
    if phase in ("Failed", "Succeeded") and (status.get("reason") or failure is None):
        # The pod's own reason (DeadlineExceeded, Evicted) says more than its container's.
        reason = status.get("reason") or phase
        failure = f"pod {phase.lower()}: {reason}: {status.get('message', '')}".rstrip(": ")
    if pod.get("metadata", {}).get("deletionTimestamp"):
        failure = "pod is being deleted"
    return PodReadiness(
        ready=ready and bool(ip) and failure is None,
        ip=ip,
        failure=failure,
        summary="; ".join(details),
    )
