"""The rlm sandbox agent: runs RLM code blocks for an orchestrator over gRPC.

Kept free of heavy imports on purpose: the worker process imports this package too.
"""

__version__ = "0.1.0"
