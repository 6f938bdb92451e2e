"""`python -m rlm_orchestrator`: the `rlm-orchestrator` command."""

try:
    from rlm_orchestrator.cli import main
except KeyboardInterrupt:  # Ctrl-C while the CLI loads: no traceback of the import
    raise SystemExit(130) from None

if __name__ == "__main__":
    main()
