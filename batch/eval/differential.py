"""WBC-type accuracy and per-slide figures (differential, blast fraction, ALL call) vs truth.

The synthetic ground truth (`batch.synth`) gives every WBC its ``wbc_type``
(neutrophil, lymphocyte, monocyte, eosinophil, basophil, blast) and blasts
their ALL ``subtype``. Two kinds of score:

* per cell (:func:`wbc_type_scores`): the pipeline's ``wbc_type_label`` of
  each detection matched to a ground-truth WBC against its ``wbc_type``. A
  prediction is right when the strings are equal: a blast called ``blast``,
  a marrow hematogone (``wbc_type`` lymphocyte) called ``lymphocyte``;
* per slide (:func:`slide_scores`): the ``slides`` table's figures against
  the same figures computed from the truth: the differential (share of each
  type among the truth WBCs), the blast fraction (blasts / WBCs) and the ALL
  call (the dominant blast subtype when the blast fraction is at least
  :data:`TRUTH_MIN_BLAST_FRACTION`, else ``"none"``).

A slides table without some of these columns (older runs) gives null
figures for them, never an error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pandas as pd

from batch.calls import NO_ALL_CALL

__all__ = [
    "DIFFERENTIAL_MIN_SHARE",
    "TRUTH_MIN_BLAST_FRACTION",
    "slide_score_lines",
    "slide_scores",
    "truth_slide_figures",
    "wbc_type_scores",
]

#: Blast fraction from which a slide's truth ALL call is its dominant blast subtype (WHO: 20 %).
TRUTH_MIN_BLAST_FRACTION = 0.20
#: Truth share from which a differential class counts in ``differential_max_error_pp``.
DIFFERENTIAL_MIN_SHARE = 0.05
#: Confusion-matrix column of matched WBCs without a predicted type.
MISSING_LABEL = "missing"
_BLAST = "blast"


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def wbc_type_scores(truth: Sequence[Any], pred: Sequence[Any]) -> dict[str, Any] | None:
    """Accuracy, macro recall, per-class recall and confusion of matched WBCs' types.

    ``truth`` and ``pred`` are parallel: the truth ``wbc_type`` and the
    predicted label of each matched pair. Pairs without a truth type are left
    out; a missing prediction counts as wrong (column ``"missing"``). Returns
    None when no pair has a truth type.
    """
    pairs = [
        (str(t), MISSING_LABEL if p is None or pd.isna(p) else str(p))
        for t, p in zip(truth, pred, strict=True)
        if t is not None and not pd.isna(t)
    ]
    if not pairs:
        return None
    confusion: dict[str, dict[str, int]] = {}
    for t, p in pairs:
        row = confusion.setdefault(t, {})
        row[p] = row.get(p, 0) + 1
    recall = {t: row.get(t, 0) / sum(row.values()) for t, row in confusion.items()}
    per_class = {
        t: {"recall": round(recall[t], 4), "support": sum(row.values())}
        for t, row in sorted(confusion.items())
    }
    right = sum(t == p for t, p in pairs)
    return {
        "accuracy": round(right / len(pairs), 4),
        "macro_recall": round(sum(recall.values()) / len(recall), 4),
        "per_class": per_class,
        "confusion": {t: dict(sorted(row.items())) for t, row in sorted(confusion.items())},
        "matched": len(pairs),
    }


def truth_slide_figures(truth: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per slide of ``truth`` (ground-truth rows): WBC count, differential, blast fraction, call.

    Empty when the truth has no ``wbc_type`` column (ground truth written
    before WBC types existed).
    """
    if "wbc_type" not in truth.columns:
        return {}
    wbc = truth[(truth["class"] == "WBC") & truth["wbc_type"].notna()]
    out: dict[str, dict[str, Any]] = {}
    for sid, g in wbc.groupby(wbc["slide_id"].astype(str), sort=True):
        n = len(g)
        shares = g["wbc_type"].astype(str).value_counts() / n
        blasts = g[g["wbc_type"] == _BLAST]
        fraction = len(blasts) / n
        call = NO_ALL_CALL
        subtypes = (
            blasts["subtype"].dropna().astype(str) if "subtype" in g.columns else pd.Series([])
        )
        if fraction >= TRUTH_MIN_BLAST_FRACTION and len(subtypes):
            counts = subtypes.value_counts()
            call = min(counts.index, key=lambda s: (-counts[s], s))  # ties by name
        out[str(sid)] = {
            "n_wbc": n,
            "differential": {k: round(float(v), 6) for k, v in sorted(shares.items())},
            "blast_fraction": fraction,
            "call": call,
        }
    return out


def _parse_differential(value: Any) -> dict[str, float] | None:
    if value is None:
        return None
    parsed = json.loads(value) if isinstance(value, str) else value
    return {str(k): float(v) for k, v in parsed.items()}


def _slide_rows(slides: pd.DataFrame | None) -> dict[str, dict[str, Any]]:
    """The last row per ``slide_id`` of the slides table, as dicts (missing columns absent)."""
    if slides is None or slides.empty or "slide_id" not in slides.columns:
        return {}
    rows = slides.assign(slide_id=slides["slide_id"].astype(str)).drop_duplicates(
        "slide_id", keep="last"
    )
    return {
        str(r["slide_id"]): {str(k): v for k, v in r.items()}
        for r in rows.to_dict(orient="records")
    }


def _get(row: dict[str, Any] | None, key: str) -> Any:
    """``row[key]``, or None when the row or the column is missing or the value is null."""
    value = None if row is None else row.get(key)
    if value is None or (not isinstance(value, (str, dict, list)) and pd.isna(value)):
        return None
    return value


def slide_scores(truth: pd.DataFrame, slides: pd.DataFrame | None) -> dict[str, Any]:
    """Per-slide differential, blast fraction and ALL call: the slides table vs the truth.

    ``slides`` holds one row per slide (``slide_id``, and as far as present
    ``wbc_differential`` (JSON ``{label: fraction}``), ``n_wbc_counted``,
    ``blast_fraction``, ``blast_fraction_low`` / ``_high``,
    ``all_subtype_call``). Returns ``differential`` / ``blast_fraction`` /
    ``calls`` per slide, ``differential_max_error_pp`` (largest absolute
    error, percentage points, over slides and classes whose truth share is at
    least :data:`DIFFERENTIAL_MIN_SHARE`), ``blast_fraction_max_abs_error``
    and ``call_accuracy`` (over the slides with a truth call and a slides row;
    a null predicted call, no WBC counted, counts as wrong). Figures that
    cannot be computed are null.
    """
    figures = truth_slide_figures(truth)
    rows = _slide_rows(slides)
    has = set(slides.columns) if slides is not None else set()
    differential: dict[str, Any] = {}
    blast: dict[str, Any] = {}
    calls: dict[str, Any] = {}
    max_pp: float | None = None
    max_blast: float | None = None
    right = scored = 0
    for sid, fig in figures.items():
        row = rows.get(sid)
        pred = _parse_differential(_get(row, "wbc_differential"))
        errors = None
        if pred is not None:
            labels = sorted(set(fig["differential"]) | set(pred))
            errors = {
                k: round(abs(pred.get(k, 0.0) - fig["differential"].get(k, 0.0)) * 100.0, 2)
                for k in labels
            }
            big = [errors[k] for k, v in fig["differential"].items() if v >= DIFFERENTIAL_MIN_SHARE]
            if big:
                max_pp = max([*big, *([max_pp] if max_pp is not None else [])])
        differential[sid] = {
            "n_truth": fig["n_wbc"],
            "n_counted": _get(row, "n_wbc_counted"),
            "truth": fig["differential"],
            "predicted": pred,
            "abs_error_pp": errors,
        }
        predicted_fraction = _get(row, "blast_fraction")
        low, high = _get(row, "blast_fraction_low"), _get(row, "blast_fraction_high")
        error = None
        if predicted_fraction is not None:
            error = abs(float(predicted_fraction) - fig["blast_fraction"])
            max_blast = error if max_blast is None else max(max_blast, error)
        blast[sid] = {
            "truth": _r(fig["blast_fraction"]),
            "predicted": _r(predicted_fraction),
            "low": _r(low),
            "high": _r(high),
            "abs_error": _r(error),
            "truth_in_interval": (
                bool(float(low) <= fig["blast_fraction"] <= float(high))
                if low is not None and high is not None
                else None
            ),
        }
        predicted_call = _get(row, "all_subtype_call")
        calls[sid] = {"truth": fig["call"], "predicted": predicted_call}
        if row is not None and "all_subtype_call" in has:
            scored += 1
            right += int(predicted_call == fig["call"])
    return {
        "differential": differential,
        "differential_max_error_pp": _r(max_pp, 2),
        "blast_fraction": blast,
        "blast_fraction_max_abs_error": _r(max_blast),
        "calls": calls,
        "call_accuracy": round(right / scored, 4) if scored else None,
        "call_slides": scored,
    }


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.1f}%"


def slide_score_lines(result: dict[str, Any]) -> list[str]:
    """`batch.eval.run.evaluate_run`'s result as a short table people read.

    Detection F1 per class, WBC-type accuracy, and per slide the differential
    next to the generator's truth, the blast fraction (run, with its
    interval) and the ALL call against the truth.
    """
    lines = []
    det = result.get("per_class") or {}
    if det:
        lines.append("detection F1: " + ", ".join(f"{c} {v.get('f1')}" for c, v in det.items()))
    types = result.get("wbc_type")
    if types:
        lines.append(
            f"WBC type on matched WBCs: accuracy {types.get('accuracy')}, "
            f"macro recall {types.get('macro_recall')}"
        )
    blasts, calls = result.get("blast_fraction") or {}, result.get("calls") or {}
    for sid, d in sorted((result.get("differential") or {}).items()):
        lines.append(
            f"{sid}: {d.get('n_counted')} leukocytes counted, {d.get('n_truth')} WBCs in truth"
        )
        pred = d.get("predicted") or {}
        for k in sorted(
            set(d.get("truth") or {}) | set(pred), key=lambda k: -(d["truth"] or {}).get(k, 0)
        ):
            t, p = (d.get("truth") or {}).get(k, 0.0), pred.get(k, 0.0)
            lines.append(
                f"  {k:<14} truth {_pct(t):>6}  run {_pct(p):>6}  ({abs(p - t) * 100:.1f} pp)"
            )
        b = blasts.get(sid) or {}
        lines.append(
            f"  blast fraction truth {_pct(b.get('truth'))}, run {_pct(b.get('predicted'))} "
            f"[{_pct(b.get('low'))}, {_pct(b.get('high'))}]"
        )
        c = calls.get(sid) or {}
        lines.append(f"  ALL call       truth {c.get('truth')}, run {c.get('predicted')}")
    lines.append(
        f"largest differential error (classes >= 5 %): {result.get('differential_max_error_pp')} pp; "
        f"blast fraction error: {result.get('blast_fraction_max_abs_error')}; "
        f"calls right: {result.get('call_accuracy')}"
    )
    return lines
