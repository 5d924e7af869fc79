"""Report pictures (matplotlib, Agg, PNG): differential bars, blast fraction by group,
morphometric violins per WBC type, confidence histograms, thumbnails with WBC marks.

Each function takes frames from `batch.analytics.tables` (or arrays) and writes one PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from batch.analytics.tables import MORPHOMETRICS  # noqa: E402

__all__ = [
    "type_colours",
    "plot_differential",
    "plot_blast_by_group",
    "plot_morphometrics",
    "plot_confidence",
    "plot_thumbnail_marks",
    "plot_throughput",
]

DPI = 100


def type_colours(types: list[str]) -> dict[str, str]:
    """One stable colour per WBC type (tab10 / tab20 by sorted name)."""
    names = sorted(set(types))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {n: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, n in enumerate(names)}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_differential(diff: pd.DataFrame, colours: dict[str, str], path: Path) -> Path:
    """Stacked horizontal bars: each slide's WBC differential, with the cells it rests on."""
    wide = diff.pivot_table(index="slide_id", columns="wbc_type", values="n", fill_value=0, aggfunc="sum")
    n = max(1, len(wide))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * n))
    left = np.zeros(len(wide))
    totals = wide.sum(axis=1).to_numpy(dtype=float) if len(wide) else np.zeros(0)
    for t in wide.columns:
        frac = wide[t].to_numpy(dtype=float) / np.maximum(totals, 1)
        ax.barh(list(wide.index), frac, left=left, color=colours.get(t, "grey"), label=t)
        left += frac
    for i, total in enumerate(totals):
        ax.text(1.01, i, f"n={int(total)}", va="center", fontsize=8)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("fraction of counted WBCs")
    ax.set_ylabel("slide")
    ax.set_title("WBC differential")
    if len(wide):
        # Beside the bars (below them it covers the axis label when there are few slides).
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.08, 1.0), title="WBC type")
    ax.invert_yaxis()
    return _save(fig, path)


def plot_blast_by_group(blasts: pd.DataFrame, by: str, path: Path) -> Path:
    """Each slide's blast fraction with its 95 % Wilson interval, one column per group."""
    groups = sorted(blasts[by].astype(str).unique())
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(groups), 4))
    for i, g in enumerate(groups):
        sub = blasts[blasts[by].astype(str) == g]
        x = i + np.linspace(-0.15, 0.15, len(sub)) if len(sub) > 1 else np.full(len(sub), float(i))
        y = sub["blast_fraction"].to_numpy(dtype=float)
        lo = y - sub["ci_low"].to_numpy(dtype=float)
        hi = sub["ci_high"].to_numpy(dtype=float) - y
        ax.errorbar(x, y, yerr=[lo, hi], fmt="o", capsize=3)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_xlabel(by)
    ax.set_ylabel("blast fraction (95 % Wilson CI)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Blast fraction by {by}")
    return _save(fig, path)


def plot_morphometrics(values: pd.DataFrame, colours: dict[str, str], path: Path, title: str) -> Path:
    """Violins per WBC type for each morphometric (``values``: ``wbc_type`` + metric columns)."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    types = sorted(values["wbc_type"].unique()) if len(values) else []
    for ax, (col, unit) in zip(axes.ravel(), MORPHOMETRICS.items(), strict=True):
        data, names = [], []
        for t in types:
            v = values.loc[values.wbc_type == t, col].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            if v.size:
                data.append(v)
                names.append(t)
        if data:
            parts = ax.violinplot(data, showmedians=True)
            for body, name in zip(parts["bodies"], names, strict=True):  # type: ignore[attr-defined]
                body.set_facecolor(colours.get(name, "grey"))
                body.set_alpha(0.7)
            ax.set_xticks(range(1, len(names) + 1), [f"{n}\n(n={len(d)})" for n, d in zip(names, data, strict=True)], fontsize=7)
        ax.set_ylabel(f"{col} ({unit})")
        ax.set_xlabel("WBC type")
    fig.suptitle(title)
    return _save(fig, path)


def plot_confidence(conf: pd.DataFrame, path: Path) -> Path:
    """Histograms of detector and classifier confidences (counts per bin, one panel per source)."""
    sources = sorted(conf["source"].unique()) if len(conf) else []
    cols = max(1, min(3, len(sources)))
    rows = max(1, -(-len(sources) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel()[len(sources):]:
        ax.set_visible(False)
    for ax, s in zip(axes.ravel(), sources, strict=False):
        sub = conf[conf.source == s]
        ax.bar(sub["bin_low"], sub["n"], width=0.05, align="edge", color="#4c72b0")
        ax.set_xlim(0, 1)
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_ylabel("cells")
    fig.suptitle("Confidence distributions")
    return _save(fig, path)


def plot_thumbnail_marks(
    thumb: npt.NDArray[np.uint8],
    scale: float,
    wbcs: pd.DataFrame,
    colours: dict[str, str],
    path: Path,
    title: str,
    analysed: list[tuple[float, float, float, float]] | None = None,
) -> Path:
    """The slide's thumbnail with every WBC (``cx``, ``cy`` level-0 px) marked by type.

    ``analysed``: the level-0 tile cores the run analysed (``x0, y0, x1, y1``); their
    union is outlined (the rest of the slide was skipped as background).
    """
    h, w = thumb.shape[:2]
    fig, ax = plt.subplots(figsize=(8, 8 * h / max(w, 1) + 0.8))
    ax.imshow(thumb, extent=(0, w / scale, h / scale, 0))
    if analysed:
        mask = np.zeros((h + 2, w + 2), np.uint8)  # a border of 0 closes the outline
        for x0, y0, x1, y1 in analysed:
            mask[1 + int(round(y0 * scale)) : 1 + int(round(y1 * scale)),
                 1 + int(round(x0 * scale)) : 1 + int(round(x1 * scale))] = 1  # fmt: skip
        ys = (np.arange(h + 2) - 0.5) / scale
        xs = (np.arange(w + 2) - 0.5) / scale
        ax.contour(xs, ys, mask, levels=[0.5], colors="black", linewidths=1.2, linestyles="--")
        ax.plot([], [], "k--", label=f"analysed area ({len(analysed)} tiles)")
    for t, sub in wbcs.groupby("wbc_type"):
        ax.scatter(sub.cx, sub.cy, s=40, facecolors="none", edgecolors=colours.get(str(t), "black"),
                   linewidths=1.5, label=f"{t} ({len(sub)})")  # fmt: skip
    ax.set_xlabel("x (level-0 px)")
    ax.set_ylabel("y (level-0 px)")
    ax.set_title(title)
    if len(wbcs) or analysed:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_throughput(runs: list[dict[str, Any]], path: Path) -> Path | None:
    """Tiles done and tiles per second over each run (the manifests' ``timeline``).

    None when no manifest has a timeline of two points or more (runs of older versions).
    """
    lines = [(str(m.get("run_id")), np.asarray(m.get("timeline") or [], float)) for m in runs]
    lines = [(rid, t) for rid, t in lines if t.ndim == 2 and len(t) >= 2]
    if not lines:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for rid, t in lines:
        sec, tiles = t[:, 0], t[:, 1]
        # Tiles arrive in batches: the count is a step function of time (a jump per batch).
        (line,) = top.step(sec, tiles, where="post", label=rid)
        # Rate over windows of ~5 % of the run, so bursts and stalls show.
        window = max(sec[-1] / 20, 1e-9)
        edges = np.linspace(0.0, sec[-1], 21)
        done = tiles[np.searchsorted(sec, edges, side="right") - 1]
        bottom.stairs(np.diff(done) / window, edges, color=line.get_color())
    bottom.set_ylim(bottom=0)
    top.set_ylabel("tiles done")
    top.legend(fontsize=8, title="run")
    bottom.set_ylabel("tiles / s (per 5 % of the run)")
    bottom.set_xlabel("time since run start (s)")
    fig.suptitle("Throughput over the run")
    return _save(fig, path)
