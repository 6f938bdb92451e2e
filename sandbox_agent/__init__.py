"""The rlm sandbox agent: runs RLM code blocks for an orchestrator over gRPC.

Kept free of heavy imports on purpose: the worker process imports this package too.
"""

# The version of the whole distribution (pyproject.toml reads it here; CHANGELOG.md).
__version__ = "0.1.0"

# The environment variable that holds the bearer token callers must send (the agent reads it
# and removes it before user code runs). One name everywhere: the orchestrator reads the
# agents' token from the same variable (rlm_orchestrator.sandbox.launch), and deploy/ sets it.
TOKEN_ENV = "RLM_AGENT_TOKEN"
