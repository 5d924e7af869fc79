"""Pictures people look at (matplotlib, Agg backend).

``plot_plan``: tile plans over thumbnails. ``plot_reliability``: a
classifier's reliability diagram before and after calibration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from batch.tiling import TilePlan  # noqa: E402

__all__ = ["plot_plan", "plot_reliability"]

THUMB_SIDE = 1024


def plot_plan(slide: Any, plan: TilePlan, out: str | Path) -> Path:
    """Draw kept (green) and skipped (red) tile cores over the slide's thumbnail."""
    thumb = slide.thumbnail(THUMB_SIDE)
    f = thumb.shape[1] / slide.info.width  # level-0 px -> thumbnail px
    fig, ax = plt.subplots(figsize=(10, 10 * thumb.shape[0] / thumb.shape[1]))
    ax.imshow(thumb)
    for tasks, colour in ((plan.tasks, "lime"), (plan.skipped, "red")):
        for t in tasks:
            ax.add_patch(
                Rectangle(
                    (t.core_x0 * f, t.core_y0 * f),
                    (t.core_x1 - t.core_x0) * f,
                    (t.core_y1 - t.core_y0) * f,
                    fill=False,
                    edgecolor=colour,
                    linewidth=0.6,
                )
            )
    ax.set_title(
        f"{plan.slide_id}: level {plan.level}, {len(plan.tasks)} tiles kept, "
        f"{len(plan.skipped)} skipped ({plan.skip_fraction:.0%})"
    )
    ax.set_axis_off()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_reliability(
    panels: Mapping[str, Sequence[Mapping[str, Any]]], out: str | Path, title: str = ""
) -> Path:
    """Reliability diagrams side by side: accuracy vs confidence per bin, with bin counts.

    Parameters
    ----------
    panels
        Panel title -> bins as `batch.eval.calibration.reliability_bins` gives
        them (``low``, ``high``, ``count``, ``confidence``, ``accuracy``), e.g.
        ``{"before (T = 1)": ..., "after (T = 1.8)": ...}``.
    out
        PNG path.
    title
        Figure title.

    Each panel: bars of the bins' accuracy, a dot at each bin's mean
    confidence (on the diagonal when calibrated), the diagonal itself, and
    below it the number of samples per bin.
    """
    fig, axes = plt.subplots(
        2,
        len(panels),
        figsize=(4.2 * len(panels), 5.6),
        gridspec_kw={"height_ratios": [3, 1]},
        squeeze=False,
        sharex=True,
    )
    for col, (name, bins) in enumerate(panels.items()):
        top, bottom = axes[0, col], axes[1, col]
        full = [b for b in bins if b["count"]]
        width = [b["high"] - b["low"] for b in full]
        left = [b["low"] for b in full]
        top.bar(left, [b["accuracy"] for b in full], width=width, align="edge",
                color="tab:blue", edgecolor="black", linewidth=0.5, label="accuracy")  # fmt: skip
        top.plot([b["confidence"] for b in full], [b["confidence"] for b in full], "o",
                 color="tab:red", markersize=3, label="mean confidence")  # fmt: skip
        top.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.set_title(name, fontsize=10)
        bottom.bar(left, [b["count"] for b in full], width=width, align="edge",
                   color="grey", edgecolor="black", linewidth=0.5)  # fmt: skip
        for b in full:
            bottom.text((b["low"] + b["high"]) / 2, b["count"], str(b["count"]),
                        ha="center", va="bottom", fontsize=6)  # fmt: skip
        bottom.set_xlabel("confidence (top-class probability)")
        bottom.set_ylabel("samples")
        bottom.margins(y=0.25)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=3, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.95))  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
