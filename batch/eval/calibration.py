"""Confidence calibration of classifiers: temperature scaling and its measurement.

A classifier is *calibrated* when, of the cells it calls with confidence
0.8, 80 % are right. Neural networks trained with cross-entropy tend to be
over-confident. Temperature scaling (Guo et al., "On Calibration of Modern
Neural Networks", ICML 2017) divides the logits by one number ``T > 0``
fitted on labelled validation data; the scaled probabilities are
`batch.stages.classify.apply_temperature` (the same function the classifier
applies at inference), and the predicted class never changes.

- ``fit_temperature``: the ``T`` minimising the mean negative log-likelihood
  of the true labels (a 1-D bounded search over ``log T``);
- ``reliability_bins`` / ``expected_calibration_error``: top-label ECE with
  equal-width confidence bins: ``sum_b n_b / n * |accuracy_b - confidence_b|``;
- ``calibration_report``: ECE and NLL before (``T = 1``) and after scaling,
  what training, the calibration job and ``hemaray eval classifier`` report.

Pure functions over probability arrays and integer labels; no models, no files.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import numpy.typing as npt

from batch.stages.classify import apply_temperature, temperature_log_probs

__all__ = [
    "DEFAULT_BINS",
    "TEMPERATURE_BOUNDS",
    "calibration_report",
    "diagram_panels",
    "expected_calibration_error",
    "fit_temperature",
    "negative_log_likelihood",
    "reliability_bins",
]

log = logging.getLogger(__name__)

#: Equal-width confidence bins of the ECE and the reliability diagram.
DEFAULT_BINS = 15
#: Range searched for the temperature; a fit at either end means the data say little.
TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)
#: Tolerance of the search, in log T (a relative tolerance on T of about 1e-4).
LOG_T_TOLERANCE = 1e-4
#: Decimal places of a reported temperature.
TEMPERATURE_DECIMALS = 4


def _check(
    probs: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or y.ndim != 1 or len(p) != len(y):
        raise ValueError(
            f"expected (N, C) probabilities and N labels, got shapes {p.shape} and {y.shape}"
        )
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(
            f"labels must be class indices in [0, {p.shape[1]}), got {y.min()}..{y.max()}"
        )
    return p, y


def negative_log_likelihood(
    probs: npt.ArrayLike, labels: npt.ArrayLike, temperature: float = 1.0
) -> float:
    """Mean ``-log q(y)`` of the true labels under ``q = softmax(log(p) / T)``."""
    p, y = _check(probs, labels)
    if len(y) == 0:
        raise ValueError("no samples: the negative log-likelihood needs at least one")
    logq = temperature_log_probs(p, temperature)
    return float(-logq[np.arange(len(y)), y].mean())


def fit_temperature(
    probs: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> float:
    """The temperature ``T`` in ``bounds`` minimising the negative log-likelihood.

    Parameters
    ----------
    probs
        ``(N, C)`` uncalibrated probabilities of held-out (validation) data.
    labels
        ``(N,)`` true class indices.
    bounds
        Search range of ``T``; searched on a log scale (bounded Brent).

    Returns
    -------
    float
        The fitted temperature, rounded to ``TEMPERATURE_DECIMALS`` places.
        A fit at a bound is logged as a warning: a validation set the model
        gets all right pushes ``T`` towards 0 (ever sharper), one it gets
        mostly wrong towards the upper bound; neither says much.
    """
    from scipy.optimize import minimize_scalar

    p, y = _check(probs, labels)
    if len(y) == 0:
        raise ValueError("no samples: a temperature needs labelled validation data")
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    res = minimize_scalar(
        lambda log_t: negative_log_likelihood(p, y, math.exp(log_t)),
        bounds=(math.log(lo), math.log(hi)),
        method="bounded",
        options={"xatol": LOG_T_TOLERANCE},
    )
    t = math.exp(float(res.x))
    if min(abs(res.x - math.log(lo)), abs(res.x - math.log(hi))) < 10 * LOG_T_TOLERANCE:
        log.warning(
            "temperature fit reached its bound (T = %.3g, bounds %s) on %d samples; "
            "use more (or harder) validation data",
            t,
            bounds,
            len(y),
        )
    return round(t, TEMPERATURE_DECIMALS)


def reliability_bins(
    probs: npt.ArrayLike, labels: npt.ArrayLike, bins: int = DEFAULT_BINS
) -> list[dict[str, Any]]:
    """Top-label reliability diagram: one entry per equal-width confidence bin.

    A sample falls in bin ``b`` when its top probability is in
    ``(b / bins, (b + 1) / bins]`` (the first bin also takes 0). Each entry
    has ``low``, ``high``, ``count``, ``confidence`` (mean top probability)
    and ``accuracy`` (fraction whose top class is the true one); the last two
    are None for an empty bin.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    p, y = _check(probs, labels)
    conf = p.max(axis=1) if len(p) else np.zeros(0)
    correct = (p.argmax(axis=1) == y) if len(p) else np.zeros(0, bool)
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    out: list[dict[str, Any]] = []
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        out.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": n,
                "confidence": float(conf[sel].mean()) if n else None,
                "accuracy": float(correct[sel].mean()) if n else None,
            }
        )
    return out


def expected_calibration_error(
    probs: npt.ArrayLike, labels: npt.ArrayLike, bins: int = DEFAULT_BINS
) -> float:
    """Top-label ECE: ``sum_b n_b / n * |accuracy_b - confidence_b|`` over equal-width bins."""
    table = reliability_bins(probs, labels, bins)
    n = sum(b["count"] for b in table)
    if n == 0:
        raise ValueError("no samples: the ECE needs at least one")
    return float(
        sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"])
    )


def calibration_report(
    probs: npt.ArrayLike,
    labels: npt.ArrayLike,
    temperature: float,
    *,
    bins: int = DEFAULT_BINS,
    with_bins: bool = True,
) -> dict[str, Any]:
    """ECE and NLL of uncalibrated probabilities (``T = 1``) and of them scaled by ``temperature``.

    Returns ``{"n", "temperature", "ece_before", "ece", "nll_before", "nll",
    "bins"}`` (``bins``, with ``with_bins``: ``{"before": [...], "after": [...]}``
    from `reliability_bins`). Accuracy is the same before and after.
    """
    p, y = _check(probs, labels)
    scaled = apply_temperature(p, temperature)
    report: dict[str, Any] = {
        "n": len(y),
        "temperature": temperature,
        "ece_before": expected_calibration_error(p, y, bins),
        "ece": expected_calibration_error(scaled, y, bins),
        "nll_before": negative_log_likelihood(p, y),
        "nll": negative_log_likelihood(p, y, temperature),
        "n_bins": bins,
    }
    if with_bins:
        report["bins"] = {
            "before": reliability_bins(p, y, bins),
            "after": reliability_bins(scaled, y, bins),
        }
    return report


def diagram_panels(report: dict[str, Any], temperature: float) -> dict[str, Any]:
    """A `calibration_report`'s bins as the two panels of a reliability diagram, legend first."""
    return {
        f"before (T = 1): ECE {report['ece_before']:.3f}": report["bins"]["before"],
        f"after (T = {temperature:g}): ECE {report['ece']:.3f}": report["bins"]["after"],
    }
