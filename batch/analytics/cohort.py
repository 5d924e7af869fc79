"""Cohort tables: per-slide metrics grouped by a slide-metadata column, and group comparisons.

The unit of a comparison is the slide (cells of one slide are not
independent). For each metric: the median per group, the difference of each
group's median from the reference group's (the first by name) with a
percentile bootstrap 95 % interval (slides resampled within each group), and
a rank test: Mann-Whitney U for two groups, Kruskal-Wallis H for more.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from batch.analytics.source import RunOutputs
from batch.analytics.tables import blast_fractions, differential, slide_counts
from batch.errors import ConfigError

__all__ = ["slide_metrics", "cohort_table", "compare_groups", "bootstrap_median_difference"]

#: Bootstrap resamples per comparison, and the fixed seed (the report is reproducible).
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def slide_metrics(src: RunOutputs) -> pd.DataFrame:
    """One row per committed slide: counts, blast fraction, each WBC type's fraction, median
    morphometrics (a failed slide has no figures, not zero cells, so it stays out)."""
    counts = slide_counts(src)
    counts = counts[counts.status == "committed"]
    blasts = blast_fractions(src)[["slide_id", "blast_fraction"]]
    diff = differential(src)
    frac = (
        diff.pivot_table(index="slide_id", columns="wbc_type", values="fraction", fill_value=0.0)
        .add_prefix("frac_")
        .reset_index()
    )
    allm = src.con.execute(
        """SELECT slide_id, median(nucleus_area_um2) AS median_nucleus_area_um2,
                  median(nc_ratio) AS median_nc_ratio FROM wbc GROUP BY slide_id"""
    ).df()
    out = counts.merge(blasts, on="slide_id", how="left")
    out = out.merge(frac, on="slide_id", how="left").merge(allm, on="slide_id", how="left")
    return out


def bootstrap_median_difference(
    a: np.ndarray, b: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float, float]:
    """``median(b) - median(a)`` and its percentile bootstrap 95 % interval."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    ra = np.median(rng.choice(a, size=(resamples, a.size), replace=True), axis=1)
    rb = np.median(rng.choice(b, size=(resamples, b.size), replace=True), axis=1)
    d = rb - ra
    lo, hi = np.percentile(d, [2.5, 97.5])
    return (float(np.median(b) - np.median(a)), float(lo), float(hi))


def _rank_test(groups: list[np.ndarray]) -> tuple[str, float, float]:
    groups = [g[np.isfinite(g)] for g in groups]
    groups = [g for g in groups if g.size]
    if len(groups) < 2:
        return ("none", math.nan, math.nan)
    pooled = np.concatenate(groups)
    if np.all(pooled == pooled[0]):
        return ("none", math.nan, 1.0)
    if len(groups) == 2:
        r = stats.mannwhitneyu(groups[0], groups[1], alternative="two-sided")
        return ("mann_whitney_u", float(r.statistic), float(r.pvalue))
    r = stats.kruskal(*groups)
    return ("kruskal_wallis_h", float(r.statistic), float(r.pvalue))


def metric_columns(metrics: pd.DataFrame) -> list[str]:
    """The numeric per-slide metrics a comparison covers."""
    fixed = ["n_wbc", "n_wbc_counted", "blast_fraction", "median_nucleus_area_um2", "median_nc_ratio"]
    fracs = sorted(c for c in metrics.columns if c.startswith("frac_"))
    return [c for c in fixed + fracs if c in metrics.columns]


def cohort_table(metrics: pd.DataFrame, by: str) -> pd.DataFrame:
    """Per group: slides, and median / IQR of every metric (long table)."""
    _check_by(metrics, by)
    rows: list[dict[str, Any]] = []
    for group, sub in metrics.groupby(by, dropna=False, sort=True):
        for m in metric_columns(metrics):
            v = sub[m].to_numpy(dtype=np.float64)
            v = v[np.isfinite(v)]
            q1, med, q3 = np.percentile(v, [25, 50, 75]) if v.size else (math.nan,) * 3
            rows.append(
                {by: str(group), "metric": m, "slides": len(sub), "n": int(v.size),
                 "median": float(med), "q1": float(q1), "q3": float(q3)}
            )  # fmt: skip
    return pd.DataFrame(rows)


def compare_groups(metrics: pd.DataFrame, by: str) -> pd.DataFrame:
    """Each metric: every group's median minus the reference group's, bootstrap CI, rank test."""
    _check_by(metrics, by)
    labels = sorted(str(g) for g in metrics[by].dropna().unique())
    keyed = metrics.assign(_group=metrics[by].astype(str))
    rows: list[dict[str, Any]] = []
    for m in metric_columns(metrics):
        values = [keyed.loc[keyed._group == g, m].to_numpy(dtype=np.float64) for g in labels]
        test, statistic, p = _rank_test(values)
        for g, v in zip(labels[1:], values[1:], strict=True):
            d, lo, hi = bootstrap_median_difference(values[0], v)
            rows.append(
                {"metric": m, "reference": labels[0], "group": g, "median_difference": d,
                 "ci_low": lo, "ci_high": hi, "test": test, "statistic": statistic, "p_value": p}
            )  # fmt: skip
    return pd.DataFrame(rows)


def _check_by(metrics: pd.DataFrame, by: str) -> None:
    if by not in metrics.columns:
        raise ConfigError(
            f"--by {by!r}: no such slide column; the slides rows have {sorted(metrics.columns)}"
        )
