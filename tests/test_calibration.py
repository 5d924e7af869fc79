"""Temperature scaling and the expected calibration error, on synthetic probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from batch.eval.calibration import (
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
)
from batch.plot import plot_reliability
from batch.stages.classify import apply_temperature

#: Samples and classes of the synthetic sets: enough for the fit to be within a few per cent.
N, C = 6000, 5
TRUE_T = 2.5


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def calibrated() -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that are right by construction: each label is drawn from its own row."""
    rng = np.random.default_rng(0)
    probs = _softmax(rng.normal(0.0, 2.0, (N, C)))
    u = rng.random(N)[:, None]
    labels = (u > probs.cumsum(axis=1)).sum(axis=1)
    return probs, np.minimum(labels, C - 1)


def test_temperature_fit_recovers_a_known_temperature(
    calibrated: tuple[np.ndarray, np.ndarray],
) -> None:
    probs, labels = calibrated
    # Logits multiplied by T: what an over-confident model whose true temperature is T gives.
    over = apply_temperature(probs, 1.0 / TRUE_T)
    t = fit_temperature(over, labels)
    assert t == pytest.approx(TRUE_T, rel=0.06)
    np.testing.assert_allclose(apply_temperature(over, TRUE_T), probs, atol=1e-5)
    # The fitted T minimises the NLL: nudging it either way does not help.
    nll = negative_log_likelihood(over, labels, t)
    assert nll <= negative_log_likelihood(over, labels, t * 1.05)
    assert nll <= negative_log_likelihood(over, labels, t / 1.05)
    # Already calibrated data need no scaling.
    assert fit_temperature(probs, labels) == pytest.approx(1.0, abs=0.06)


def test_ece_of_calibrated_and_over_confident_data(
    calibrated: tuple[np.ndarray, np.ndarray],
) -> None:
    probs, labels = calibrated
    assert expected_calibration_error(probs, labels) < 0.025
    over = apply_temperature(probs, 1.0 / TRUE_T)
    report = calibration_report(over, labels, fit_temperature(over, labels))
    assert report["ece_before"] > 0.1
    assert report["ece"] < 0.03 < report["ece_before"]
    assert report["nll"] < report["nll_before"]
    assert sum(b["count"] for b in report["bins"]["after"]) == N


def test_reliability_bins_by_hand() -> None:
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.3, 0.7], [0.5, 0.5]])
    labels = np.array([0, 1, 1, 0])
    bins = reliability_bins(probs, labels, bins=10)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 1, 0, 1, 0, 1, 1]
    # A bin is (low, high]: 0.9 is in (0.8, 0.9] (wrong), 0.95 in (0.9, 1] (right),
    # 0.5 in (0.4, 0.5] (a tie goes to class 0: right).
    assert bins[8]["confidence"] == pytest.approx(0.9) and bins[8]["accuracy"] == 0.0
    assert bins[9]["confidence"] == pytest.approx(0.95) and bins[9]["accuracy"] == 1.0
    assert bins[4]["confidence"] == pytest.approx(0.5) and bins[4]["accuracy"] == 1.0
    assert bins[0]["confidence"] is None and bins[0]["accuracy"] is None
    ece = (abs(0.0 - 0.9) + abs(1.0 - 0.95) + abs(1.0 - 0.7) + abs(1.0 - 0.5)) / 4
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(ece)


def test_temperature_keeps_the_argmax_and_one_is_the_identity() -> None:
    rng = np.random.default_rng(1)
    probs = _softmax(rng.normal(0.0, 3.0, (50, 4))).astype(np.float32)
    probs[0] = [1.0, 0.0, 0.0, 0.0]  # a float32 softmax that underflowed
    for t in (0.3, 1.7, 8.0):
        scaled = apply_temperature(probs, t)
        assert np.isfinite(scaled).all()
        np.testing.assert_allclose(scaled.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(scaled.argmax(axis=1), probs.argmax(axis=1))
    np.testing.assert_array_equal(apply_temperature(probs, 1.0), probs)
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(probs, 0.0)
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(probs, np.full(50, 4))


def test_reliability_diagram_png(calibrated: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    probs, labels = calibrated
    report = calibration_report(apply_temperature(probs, 0.4), labels, 2.5)
    out = plot_reliability(
        {"before": report["bins"]["before"], "after": report["bins"]["after"]},
        tmp_path / "r.png",
        "synthetic",
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
