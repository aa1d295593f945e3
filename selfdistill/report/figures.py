"""What every figure of the report shares: matplotlib set up without a display, the colours and
markers, the `Figure` the report embeds, PNG encoding and the stage labels of an axis."""

from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: the figure modules take `plt` from here, never a display
import matplotlib.pyplot as plt  # noqa: E402

# 12 colours and 9 markers: cycles of different lengths, so that up to 36 lines differ in colour
# or marker (a comparison of 9 methods is common).
COLORS = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#000080",
    "#808000",
]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h", "p"]  # not "*": the starting model's


@dataclass
class Figure:
    key: str
    title: str
    caption: str
    png: bytes


def png(fig) -> bytes:
    """The figure as PNG bytes; closes it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def stage_labels(tasks: list[str]) -> list[str]:
    """Axis labels of the models along a stream: the starting model, then after each task."""
    return ["start"] + [f"after {k}: {t}" for k, t in enumerate(tasks, 1)]


def finished_methods(results: dict) -> list[tuple[str, dict]]:
    """(name, summary) of every method with at least one finished seed, in results.json's order."""
    return [(name, entry["summary"]) for name, entry in results["methods"].items() if entry["summary"]]
