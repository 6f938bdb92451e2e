"""`run`'s options that describe the model (the root's, and the sub-model's with it): its
limits, its prices, the code fences it writes; kept apart from cli.py's commands so that each
stays readable. Each maps to a backend_kwargs key (or RLM argument) of the same meaning
(config/lm.py, config/fences.py) and to a RunSettings field (config/run.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from rlm_orchestrator.config.lm import DEFAULT_MAX_TOKENS

MaxTokensOption = Annotated[
    int | None,
    typer.Option(
        help="Output tokens per model call (root and sub-calls); 0 sends none, leaving the "
        "provider's default. A reply cut there is marked (sub-calls) or not run half-written "
        "(root).",
        show_default=str(DEFAULT_MAX_TOKENS),
    ),
]
ContextWindowOption = Annotated[
    int | None,
    typer.Option(
        help="The model's context window in tokens, for a local or unknown model: older turns "
        "are compacted to stay inside it.",
        show_default="litellm's model table, else learned from the server",
    ),
]
RequestTimeoutOption = Annotated[
    float | None,
    typer.Option(
        help="Seconds one model call may take (each retry gets as long).", show_default="600"
    ),
]
InputCostOption = Annotated[
    float | None,
    typer.Option(
        help="USD per input token of the root and sub model, for a model litellm has no "
        "price for (a local one): what --max-cost counts. Replaces litellm's price."
    ),
]
OutputCostOption = Annotated[
    float | None,
    typer.Option(help="USD per output token of the root and sub model (as above)."),
]
CodeFencesOption = Annotated[
    str | None,
    typer.Option(
        help="Languages of the fenced blocks that run, comma-separated: repl,python also "
        "runs ```python blocks (for a model that never writes ```repl).",
        show_default="repl",
    ),
]
