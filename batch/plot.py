"""Pictures people look at: tile plans over thumbnails (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from batch.tiling import TilePlan  # noqa: E402

__all__ = ["plot_plan"]

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
