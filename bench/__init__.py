"""Benchmarks of rlm-orchestrator against the seed (groknroll==2.0.0). Run: `make bench`."""
