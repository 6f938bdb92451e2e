"""The PNG of a run: every metric that has a target, as its distance to that target.

Bars are value / target for "less than" targets and target / value for "at least" ones, so
that 1.0 is the target for every row and shorter is better; misses are red.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import Metric


def plot(metrics: list[Metric], path: Path, title: str) -> Path | None:
    """Write the chart; None (and no file) when matplotlib is missing or nothing has a target."""
    rows = [m for m in metrics if m.target and m.value and m.target_op and m.passed is not None]
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display here
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ratios = [_ratio(m) for m in rows]
    labels = [f"{m.bench}: {m.name}"[:70] for m in rows]
    figure, axes = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    colors = ["tab:green" if m.passed else "tab:red" for m in rows]
    axes.barh(range(len(rows)), ratios, color=colors)
    axes.axvline(1.0, color="black", linewidth=1)
    axes.set_yticks(range(len(rows)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlim(min([*ratios, 1.0]) / 2, max([*ratios, 1.0]) * 2)
    axes.set_xlabel("distance to target (1 = the target; left of it = better)")
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _ratio(m: Metric) -> float:
    """How far from its target a row is (1 = on it; above 1 = worse)."""
    assert m.value and m.target and m.target_op  # plot() keeps only such rows
    return m.value / m.target if m.target_op.startswith("<") else m.target / m.value
