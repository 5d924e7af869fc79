"""Which cells an export takes: ``--select``, ``--classes``, deterministic for a seed.

A selection is computed slide by slide (`Selector.add`) and finished once
(`Selector.result`), so it never holds more than one slide's candidates plus
the ``N`` kept so far. Methods (``--select METHOD:N``):

- ``least-confident:N``: the ``N`` cells of lowest `confidence` over all slides;
- ``margin:N``: the ``N`` cells of smallest top-1 minus top-2 probability;
- ``random:N``: ``N`` cells drawn uniformly (a hash of seed and ``cell_id``,
  so the draw does not depend on the order slides are read);
- ``stratified:N``: up to ``N`` random cells per (slide, label) stratum;
- no ``--select``: every cell that passes ``--classes``.

A cell's confidence is its ``wbc_type`` classifier's top-1 probability when
it is a classified WBC (the label annotators correct) and its detector
confidence otherwise; its margin is the ``wbc_type`` top-1 minus top-2
probability, or the detector confidence where there is no second choice.
Ties are broken by ``cell_id``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from batch.errors import ConfigError

__all__ = ["METHODS", "SELECTION_COLUMNS", "Selection", "Selector", "cell_labels", "parse_select"]

#: Selection methods of ``--select METHOD:N``.
METHODS = ("least-confident", "margin", "random", "stratified")
#: Columns of ``selection.parquet`` (beside the export).
SELECTION_COLUMNS = (
    "slide_id", "cell_id", "det_class", "label", "det_confidence", "wbc_type_confidence",
    "score", "rank", "method", "x0", "y0", "x1", "y1",
)
#: The classifier whose label and confidence a WBC is ranked and exported by.
WBC_CLASSIFIER = "wbc_type"


@dataclass(frozen=True)
class Selection:
    """A parsed ``--select`` value: the method and its ``N`` (``None``: take all)."""

    method: str | None = None
    n: int = 0


def parse_select(text: str | None) -> Selection:
    """Parse ``METHOD:N`` (``None`` or empty: every cell)."""
    if not text:
        return Selection()
    method, _, count = text.partition(":")
    if method not in METHODS or not count.isdigit() or int(count) < 1:
        raise ConfigError(
            f"--select must be METHOD:N with METHOD one of {', '.join(METHODS)} and N >= 1; "
            f"got {text!r}"
        )
    return Selection(method, int(count))


def cell_labels(cells: pd.DataFrame) -> pd.Series:
    """Each cell's label: its ``wbc_type`` label for a classified WBC, else its detector class."""
    col = f"{WBC_CLASSIFIER}_label"
    det = cells["det_class"].astype(str)
    if col not in cells:
        return det
    wbc = cells[col]
    return det.where(wbc.isna() | (det != "WBC"), wbc.astype(str))


def _confidence(cells: pd.DataFrame) -> np.ndarray:
    det = cells["det_confidence"].to_numpy(np.float64)
    col = f"{WBC_CLASSIFIER}_confidence"
    if col not in cells:
        return det
    wbc = pd.to_numeric(cells[col], errors="coerce").to_numpy(np.float64)
    return np.where(np.isnan(wbc), det, wbc)


def _margin(cells: pd.DataFrame) -> np.ndarray:
    out = cells["det_confidence"].to_numpy(np.float64).copy()
    col = f"{WBC_CLASSIFIER}_probs"
    if col not in cells:
        return out
    for i, probs in enumerate(cells[col]):
        if probs is not None and len(probs) >= 2:
            top = np.sort(np.asarray(probs, dtype=np.float64))[::-1]
            out[i] = top[0] - top[1]
    return out


def _draw(seed: int, cell_ids: Sequence[str]) -> np.ndarray:
    """A uniform number in [0, 1) per cell from (seed, cell_id): order-independent."""
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{seed}:{c}".encode(), digest_size=8).digest(), "big")
            / 2**64
            for c in cell_ids
        ],
        dtype=np.float64,
    )


class Selector:
    """Streaming selection over a run's slides.

    Parameters
    ----------
    selection
        The parsed ``--select``.
    classes
        Keep cells whose detector class or label is one of these (None: all).
    seed
        Seed of ``random`` and ``stratified`` draws.
    """

    def __init__(
        self, selection: Selection, classes: Sequence[str] | None = None, seed: int = 0
    ) -> None:
        self.selection = selection
        self.classes = set(classes) if classes else None
        self.seed = seed
        self._kept: list[pd.DataFrame] = []

    def _scored(self, cells: pd.DataFrame) -> pd.DataFrame:
        frame = cells.assign(label=cell_labels(cells))
        if self.classes is not None:
            frame = frame[frame["det_class"].isin(self.classes) | frame["label"].isin(self.classes)]
        method = self.selection.method
        if method in (None, "least-confident"):
            score = _confidence(frame)
        elif method == "margin":
            score = _margin(frame)
        else:
            score = _draw(self.seed, frame["cell_id"].astype(str).tolist())
        wbc_conf = f"{WBC_CLASSIFIER}_confidence"
        return pd.DataFrame(
            {
                "slide_id": frame["slide_id"].astype(str),
                "cell_id": frame["cell_id"].astype(str),
                "det_class": frame["det_class"].astype(str),
                "label": frame["label"].astype(str),
                "det_confidence": frame["det_confidence"].astype(np.float64),
                "wbc_type_confidence": (
                    pd.to_numeric(frame[wbc_conf], errors="coerce").astype(np.float64)
                    if wbc_conf in frame
                    else np.nan
                ),
                "score": score,
                "method": method or "all",
                **{k: frame[k].astype(np.float64) for k in ("x0", "y0", "x1", "y1")},
            }
        )

    def add(self, cells: pd.DataFrame) -> None:
        """Take one slide's cells into account (needs ``det_class``, ``det_confidence``, box, ids)."""
        scored = self._scored(cells)
        method, n = self.selection.method, self.selection.n
        if method == "stratified":
            scored = (
                scored.sort_values(["score", "cell_id"])
                .groupby(["slide_id", "label"], sort=False)
                .head(n)
            )
        self._kept.append(scored)
        if method in ("least-confident", "margin", "random"):
            merged = pd.concat(self._kept, ignore_index=True)
            self._kept = [merged.sort_values(["score", "cell_id"]).head(n)]

    def result(self) -> pd.DataFrame:
        """The chosen cells, ranked (``rank`` 0 = first to review), with their scores."""
        columns = list(SELECTION_COLUMNS)
        if not self._kept:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
        chosen = pd.concat(self._kept, ignore_index=True)
        if self.selection.method == "stratified":
            chosen = chosen.sort_values(["slide_id", "label", "score", "cell_id"])
        else:
            chosen = chosen.sort_values(["score", "cell_id"])
        chosen = chosen.reset_index(drop=True)
        chosen["rank"] = np.arange(len(chosen), dtype=np.int64)
        return chosen[columns]
