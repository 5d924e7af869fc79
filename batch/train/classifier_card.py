"""A WBC classifier's model card: its calibration fields and its markdown.

Written by training (`batch.train.classifier`) and by the calibration job
(`batch.train.calibrate`), read by inference (`batch.stages.classify`):

- ``extra["temperature"]`` (`TEMPERATURE_KEY`): the temperature every
  probability of the classifier is scaled by; absent means 1.0;
- ``extra["calibration"]`` (`CALIBRATION_KEY`): how and on what data it was
  fitted (``fitted_on``: data, split / selection, number of images), and the
  ECE / NLL on that data before and after;
- ``metrics[split]["calibration"]``: ECE / NLL before and after on each
  evaluated split, each stating the temperature it was measured with.

``write_classifier_markdown`` renders ``<stem>.md`` from the sidecar JSON,
metrics tables and calibration included.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from batch.models import ModelCard, render_card_markdown
from batch.stages.classify import TEMPERATURE_KEY

__all__ = [
    "CALIBRATION_KEY",
    "CALIBRATION_METHOD",
    "TEMPERATURE_KEY",
    "metrics_markdown",
    "set_calibration",
    "write_classifier_markdown",
]

#: Model card ``extra`` key of the calibration record.
CALIBRATION_KEY = "calibration"
#: Stated in the calibration record.
CALIBRATION_METHOD = (
    "temperature scaling: one T > 0 minimising the NLL of softmax(log(p) / T) "
    "(Guo et al. 2017); the predicted class is unchanged"
)


def set_calibration(
    card: ModelCard,
    temperature: float,
    fitted_on: dict[str, Any],
    fit_report: dict[str, Any],
) -> ModelCard:
    """Store a fitted temperature and where it came from in ``card`` (in place; returned).

    Parameters
    ----------
    card
        The classifier's card.
    temperature
        The fitted ``T``.
    fitted_on
        What it was fitted on: at least ``data`` and ``n`` (images), and how
        they were chosen (``split`` / ``selection``).
    fit_report
        `batch.eval.calibration.calibration_report` of the fitting data
        (its reliability bins are left out of the card).
    """
    card.extra[TEMPERATURE_KEY] = float(temperature)
    card.extra[CALIBRATION_KEY] = {
        "method": CALIBRATION_METHOD,
        "fitted_on": dict(fitted_on),
        "fit": {k: v for k, v in fit_report.items() if k != "bins"},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return card


def _calibration_line(c: dict[str, Any]) -> str:
    return (
        f"Calibration (top-label ECE, {c.get('n_bins', '?')} bins): {c['ece_before']:.3f} "
        f"uncalibrated, {c['ece']:.3f} at T = {c['temperature']:g}; NLL "
        f"{c['nll_before']:.3f} -> {c['nll']:.3f}"
    )


def metrics_markdown(metrics: dict[str, Any]) -> str:
    """The classification metrics of a card, one section per split, as markdown."""
    lines = ["## Classification metrics", ""]
    for split, m in metrics.items():
        if not isinstance(m, dict) or "accuracy" not in m:
            continue
        lines += [
            f"### {split}: {m['n']} images, {m.get('n_groups', '?')} groups ({m.get('split_note', '')})",
            "",
            f"accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}, "
            f"macro FNR {m['false_negative_rate_macro']:.3f}, MAE over class indices "
            f"{m['mae_class_index']:.3f} (seed 000's MAE; meaningful only for ordered labels)",
            "",
            "| class | precision | recall | F1 | FNR | support |",
            "| - | - | - | - | - | - |",
        ]
        for c, v in m["per_class"].items():
            fnr = "-" if v["false_negative_rate"] is None else f"{v['false_negative_rate']:.3f}"
            lines.append(
                f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {fnr} | {v['support']} |"
            )
        bg = m.get("by_group")
        if bg:
            lines += [
                "",
                f"Per group ({bg['n']} groups; {bg['note']}): accuracy {bg['accuracy']:.3f}, "
                f"macro F1 {bg['macro_f1']:.3f}",
            ]
        mb = m.get("malignant_vs_benign")
        if mb and mb.get("false_negative_rate") is not None:
            lines += [
                "",
                f"Malignant vs benign: false-negative rate {mb['false_negative_rate']:.3f} "
                f"({mb['n_malignant']} malignant, {mb['n_benign']} benign)",
            ]
        if isinstance(m.get(CALIBRATION_KEY), dict):
            lines += ["", _calibration_line(m[CALIBRATION_KEY])]
        lines.append("")
    return "\n".join(lines) + "\n"


def _temperature_markdown(extra: dict[str, Any]) -> str:
    if TEMPERATURE_KEY not in extra:
        return ""
    rec = extra.get(CALIBRATION_KEY, {})
    where = rec.get("fitted_on", {})
    lines = [
        "## Calibration",
        "",
        f"Temperature T = {float(extra[TEMPERATURE_KEY]):g}; every probability the classifier "
        "returns is softmax(log(p) / T) of the model's own p.",
    ]
    if isinstance(rec.get("fit"), dict):
        lines += ["", _calibration_line(rec["fit"]) + " (on the fitting data)."]
    if where:
        lines += ["", f"Fitted on ({rec.get('created', '')}):", ""]
        lines += [f"- {k}: {v}" for k, v in where.items()]
    return "\n".join(lines) + "\n\n"


def write_classifier_markdown(weights: Path) -> Path:
    """Write ``<stem>.md`` for a classifier from its sidecar card JSON (metrics tables included)."""
    data = json.loads(weights.with_suffix(".json").read_text())
    sha = data.pop("sha256", None)
    card = ModelCard.from_dict(data)
    md = render_card_markdown(ModelCard(**{**asdict(card), "metrics": {}}))
    md += "\n" + _temperature_markdown(card.extra) + metrics_markdown(card.metrics)
    md += f"\nSHA-256 of `{weights.name}`: `{sha}`\n"
    out = weights.with_suffix(".md")
    out.write_text(md)
    return out
