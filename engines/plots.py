"""The bar chart the engine benchmarks share: one group of bars per batch size, one bar per engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def batch_bars(names: list[str], batches: list[int], title: str, ylabel: str, path: Path
               ) -> Iterator[tuple[Any, Callable[[int], list[float]], float]]:
    """Yields (axes, the bar positions of the i-th name across the batches, bar width) to draw bars on;
    labels, grid and legend are added and the PNG written when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        yield ax, lambda i: [b + (i - (len(names) - 1) / 2) * width for b in range(len(batches))], width
        ax.set_xticks(range(len(batches)), [f"batch {n}" for n in batches])
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
