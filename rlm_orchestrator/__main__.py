"""`python -m rlm_orchestrator`: the `rlm-orchestrator` command."""

from rlm_orchestrator.cli import main

if __name__ == "__main__":
    main()
