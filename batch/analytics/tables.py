"""Per-slide and per-type tables over opened run outputs (`batch.analytics.source`).

Every function is one DuckDB query (aggregates stream over the Parquet) and
returns a pandas frame. WBC figures count the WBCs that vote in the slide's
calls (`batch.calls.counted_wbcs`); the blast fraction, its interval and the
ALL call are the slides table's own (`batch.calls.SlideTally`), not recomputed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from batch.analytics.source import RunOutputs
from batch.calls import wilson_interval

__all__ = [
    "MORPHOMETRICS",
    "wilson_interval",
    "slide_counts",
    "differential",
    "blast_fractions",
    "morphometrics",
    "confidence_histograms",
    "failures_by_stage",
    "runs_table",
]

#: Morphometric columns and their units, in report order.
MORPHOMETRICS = {
    "nucleus_area_um2": "um^2",
    "cell_area_um2": "um^2",
    "nc_ratio": "ratio",
    "nucleus_circularity": "0-1",
}
#: Bins of the confidence histograms over [0, 1].
CONFIDENCE_BINS = 20


def slide_counts(src: RunOutputs) -> pd.DataFrame:
    """One row per slide: status, tiles, cells per detector class, counted WBCs, failures."""
    meta = "".join(f', s."{c}"' for c in src.metadata_columns)
    return src.con.execute(
        f"""
        WITH c AS (
            SELECT slide_id,
                   count(*) FILTER (WHERE det_class = 'RBC') AS n_rbc,
                   count(*) FILTER (WHERE det_class = 'WBC') AS n_wbc,
                   count(*) FILTER (WHERE det_class = 'platelet') AS n_platelet,
                   count(*) AS n_cells
            FROM cells GROUP BY slide_id),
        w AS (SELECT slide_id, count(*) AS n_wbc_counted FROM wbc GROUP BY slide_id),
        f AS (SELECT slide_id, count(*) AS n_failures FROM failures GROUP BY slide_id),
        ids AS (SELECT slide_id FROM slides UNION SELECT slide_id FROM failures)
        SELECT ids.slide_id, coalesce(s.status, 'failed') AS status,
               s.tiles_planned, s.tiles_skipped, s.tiles_done,
               coalesce(c.n_cells, 0) AS n_cells, coalesce(c.n_rbc, 0) AS n_rbc,
               coalesce(c.n_wbc, 0) AS n_wbc, coalesce(c.n_platelet, 0) AS n_platelet,
               coalesce(w.n_wbc_counted, 0) AS n_wbc_counted,
               coalesce(f.n_failures, 0) AS n_failures, s.slide_uri, s.mpp{meta}
        FROM ids
        LEFT JOIN slides s USING (slide_id)
        LEFT JOIN c USING (slide_id)
        LEFT JOIN w USING (slide_id)
        LEFT JOIN f USING (slide_id)
        ORDER BY ids.slide_id
        """
    ).df()


def differential(src: RunOutputs) -> pd.DataFrame:
    """Long table ``slide_id, wbc_type, n, n_counted, fraction`` over counted WBCs."""
    return src.con.execute(
        """
        WITH t AS (
            SELECT slide_id, coalesce(wbc_type_label, 'unlabelled') AS wbc_type, count(*) AS n
            FROM wbc GROUP BY slide_id, wbc_type)
        SELECT slide_id, wbc_type, n, sum(n) OVER (PARTITION BY slide_id) AS n_counted,
               n / sum(n) OVER (PARTITION BY slide_id) AS fraction
        FROM t ORDER BY slide_id, wbc_type
        """
    ).df()


def blast_fractions(src: RunOutputs) -> pd.DataFrame:
    """Per slide: blasts, counted leukocytes, blast fraction with its 95 % Wilson interval, ALL call.

    Read from the slides table, which `batch.calls.SlideTally` fills for
    ``hemaray run`` and ``hemaray eval images`` alike: one aggregation. Slides
    without counted leukocytes (or failed) have NaN figures and no call.
    """
    df = src.con.execute(
        """
        SELECT slide_id, coalesce(n_blasts, 0) AS n_blasts,
               coalesce(n_wbc_counted, 0) AS n_wbc_counted, blast_fraction,
               blast_fraction_low AS ci_low, blast_fraction_high AS ci_high, all_subtype_call
        FROM slides ORDER BY slide_id
        """
    ).df()
    df["n_blasts"] = df["n_blasts"].astype(int)
    df["n_wbc_counted"] = df["n_wbc_counted"].astype(int)
    for col in ("blast_fraction", "ci_low", "ci_high"):
        df[col] = df[col].astype(float)
    return df


def morphometrics(src: RunOutputs, *, per_slide: bool = False) -> pd.DataFrame:
    """Median and IQR of each morphometric per WBC type (and per slide if ``per_slide``)."""
    keys = "slide_id, wbc_type" if per_slide else "wbc_type"
    parts = []
    for col in MORPHOMETRICS:
        parts.append(
            f"""SELECT {keys}, '{col}' AS metric, count("{col}") AS n,
                   quantile_cont("{col}", 0.5) AS median,
                   quantile_cont("{col}", 0.25) AS q1, quantile_cont("{col}", 0.75) AS q3
            FROM (SELECT *, coalesce(wbc_type_label, 'unlabelled') AS wbc_type FROM wbc)
            GROUP BY {keys}"""
        )
    df = src.con.execute(" UNION ALL ".join(parts) + f" ORDER BY {keys}, metric").df()
    df["iqr"] = df["q3"] - df["q1"]
    df["unit"] = df["metric"].map(MORPHOMETRICS)
    return df


def confidence_histograms(src: RunOutputs) -> pd.DataFrame:
    """Counts per confidence bin (``bin_low``) per ``source``: ``detector: <class>`` over all
    cells, ``classifier: wbc_type`` / ``classifier: all_subtype`` over the counted WBCs."""
    b = CONFIDENCE_BINS
    binned = f"least(floor({{c}} * {b}), {b - 1}) / {b}"
    df = src.con.execute(
        f"""
        SELECT 'detector: ' || det_class AS source, {binned.format(c="det_confidence")} AS bin_low,
               count(*) AS n
        FROM cells WHERE det_confidence IS NOT NULL GROUP BY ALL
        UNION ALL
        SELECT 'classifier: wbc_type', {binned.format(c="wbc_type_confidence")}, count(*)
        FROM wbc WHERE wbc_type_confidence IS NOT NULL GROUP BY ALL
        UNION ALL
        SELECT 'classifier: all_subtype', {binned.format(c="all_subtype_confidence")}, count(*)
        FROM wbc WHERE all_subtype_confidence IS NOT NULL GROUP BY ALL
        ORDER BY source, bin_low
        """
    ).df()
    df["bin_low"] = np.round(df["bin_low"].astype(float), 6)
    return df


def failures_by_stage(src: RunOutputs) -> pd.DataFrame:
    """Failed attempts per stage and error type, with the slides they hit."""
    return src.con.execute(
        """
        SELECT stage, error_type, count(*) AS attempts, count(DISTINCT slide_id) AS slides,
               string_agg(DISTINCT slide_id, ', ') AS slide_ids
        FROM failures GROUP BY ALL ORDER BY attempts DESC, stage, error_type
        """
    ).df()


def runs_table(src: RunOutputs) -> pd.DataFrame:
    """One row per run (from the run manifests): when, how long, tiles, tiles/s, slides."""
    rows = []
    for m in src.runs:
        seconds = float(m.get("seconds") or 0.0)
        tiles = int(m.get("tiles") or 0)
        rows.append({
            "run_id": m.get("run_id"), "out": m.get("out"), "started_at": m.get("started_at"),
            "seconds": seconds, "tiles": tiles, "tiles_per_s": tiles / seconds if seconds else None,
            "committed": len(m.get("committed") or []), "skipped": len(m.get("skipped") or []),
            "failed": len(m.get("failed") or {}),
        })  # fmt: skip
    cols = ["run_id", "out", "started_at", "seconds", "tiles", "tiles_per_s", "committed",
            "skipped", "failed"]  # fmt: skip
    return pd.DataFrame(rows, columns=cols)
