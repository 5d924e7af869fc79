"""The report: every analytics table at once, as terminal text and as one JSON object."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from batch.analytics.cohort import cohort_table, compare_groups, slide_metrics
from batch.analytics.source import RunOutputs, dumps
from batch.analytics.tables import (
    blast_fractions,
    confidence_histograms,
    differential,
    failures_by_stage,
    morphometrics,
    runs_table,
    slide_counts,
)

__all__ = ["Report", "build_report", "format_report", "report_json"]


@dataclass
class Report:
    """The figures of one report (pandas frames); ``cohort`` / ``comparison`` only with ``by``."""

    slides: pd.DataFrame
    differential: pd.DataFrame
    blasts: pd.DataFrame
    morphometrics: pd.DataFrame
    confidence: pd.DataFrame
    failures: pd.DataFrame
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)
    by: str | None = None
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)
    cohort: pd.DataFrame = field(default_factory=pd.DataFrame)
    comparison: pd.DataFrame = field(default_factory=pd.DataFrame)

    def summary(self) -> pd.DataFrame:
        """The index table: one row per slide with counts, blast fraction, call, failures."""
        b = self.blasts[
            ["slide_id", "n_blasts", "blast_fraction", "ci_low", "ci_high", "all_subtype_call"]
        ]
        return self.slides.merge(b, on="slide_id", how="left")


def build_report(src: RunOutputs, *, by: str | None = None) -> Report:
    """Compute every table over ``src``; with ``by`` also the cohort table and group comparisons."""
    rep = Report(
        slides=slide_counts(src),
        differential=differential(src),
        blasts=blast_fractions(src),
        morphometrics=morphometrics(src),
        confidence=confidence_histograms(src),
        failures=failures_by_stage(src),
        runs=runs_table(src),
        by=by,
    )
    if by is not None:
        rep.metrics = slide_metrics(src)
        rep.cohort = cohort_table(rep.metrics, by)
        rep.comparison = compare_groups(rep.metrics, by)
    return rep


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {str(k): (None if (isinstance(v, float) and v != v) else v) for k, v in row.items()}
        for row in df.to_dict(orient="records")
    ]


def report_json(rep: Report) -> str:
    """One JSON object: every table as a list of records."""
    obj: dict[str, Any] = {
        "slides": _records(rep.summary()),
        "differential": _records(rep.differential),
        "morphometrics": _records(rep.morphometrics),
        "confidence": _records(rep.confidence),
        "failures": _records(rep.failures),
        "runs": _records(rep.runs),
    }
    if rep.by is not None:
        obj.update(
            by=rep.by,
            cohort=_records(rep.cohort),
            comparison=_records(rep.comparison),
        )
    return dumps(obj)


def _block(title: str, df: pd.DataFrame) -> str:
    body = df.to_string(index=False, float_format=lambda v: f"{v:.3f}") if len(df) else "(none)"
    return f"== {title} ==\n{body}\n"


def format_report(rep: Report) -> str:
    """The report as readable terminal tables."""
    s = rep.summary()
    cols = ["slide_id", "status", "tiles_done", "n_rbc", "n_wbc", "n_platelet", "n_wbc_counted",
            "blast_fraction", "ci_low", "ci_high", "all_subtype_call", "n_failures"]  # fmt: skip
    if rep.by and rep.by in s.columns:
        cols.insert(1, rep.by)
    diff = rep.differential.pivot_table(
        index="slide_id", columns="wbc_type", values="n", fill_value=0, aggfunc="sum"
    )
    if len(diff):
        diff.insert(0, "n_counted", diff.sum(axis=1))
        diff = diff.reset_index()
    parts = [
        _block("slides", s[[c for c in cols if c in s.columns]]),
        _block("WBC differential (counted WBCs per type)", pd.DataFrame(diff)),
        _block(
            "morphometrics per WBC type (median, IQR)",
            rep.morphometrics[["wbc_type", "metric", "unit", "n", "median", "q1", "q3", "iqr"]],
        ),
        _block("failures by stage and error type", rep.failures),
        _block("runs", rep.runs.drop(columns=["out"], errors="ignore")),
    ]
    if rep.by is not None:
        wide = rep.cohort.pivot_table(index="metric", columns=rep.by, values="median")
        parts.append(_block(f"cohort by {rep.by} (median per group)", wide.reset_index()))
        parts.append(_block(f"group comparison by {rep.by}", rep.comparison))
    return "\n".join(parts)
