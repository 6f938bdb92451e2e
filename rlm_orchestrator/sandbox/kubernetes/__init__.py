"""The Kubernetes backend: a sandbox pod per session, through the Kubernetes API.

api.py is the narrow client surface (and its lightkube implementation), pods.py the pod,
ownership.py the orchestrator Leases that own the pods, provider.py the provider and its
warm pool.
"""

from rlm_orchestrator.sandbox.kubernetes.provider import KubernetesProvider

__all__ = ["KubernetesProvider"]
