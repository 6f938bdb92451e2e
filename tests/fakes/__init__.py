"""Fakes for our own tests (and bench/): never shipped in the wheel.

A fake Kubernetes API server (`fake_kube*.py`) and kubelet (`fake_kubelet.py`, both wired by
`fake_cluster.py`), a fake Modal control plane (`fake_modal*.py`) and a throwaway PKI
(`certs.py`, which needs the openssl binary). They need the dev extra (kubernetes-validate,
modal, lightkube). Users who test against a model use the public scripted LM instead:
`rlm_orchestrator.testing.scripted_lm`.
"""
