"""The orchestrator as a gRPC server: Orchestrator and LMRouter services, health, reflection."""
