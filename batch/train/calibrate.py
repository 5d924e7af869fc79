"""Calibrate a trained WBC classifier on labelled data and record it in its model card.

`train_classifier` already fits a temperature on its own validation split.
This job does the same for a model trained elsewhere, or re-fits one on
other held-out data: it prepares an ImageFolder exactly as ``hemaray eval
classifier`` does (`batch.eval.classifier.load_labelled_crops`, the model
card's scale, re-crop and margins), fits one temperature on the model's own
probabilities (`batch.eval.calibration.fit_temperature`), and rewrites the
card next to the weights (JSON, markdown, and the copy embedded in the
checkpoint, so the file's SHA-256, and with it the pipeline's
``NAME_version`` column, changes with its probabilities) with
``extra.temperature`` and what it was fitted on: the folder, the number of
images per class, how they were chosen and a digest of their file list.

Fit on data the model will not be evaluated on: a temperature fitted on the
test set makes that set's ECE look better than it is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batch.eval.calibration import (
    DEFAULT_BINS,
    calibration_report,
    diagram_panels,
    fit_temperature,
)
from batch.eval.classifier import load_labelled_crops
from batch.models import ModelCard, shipped_or_path, write_model_card
from batch.plot import plot_reliability
from batch.stages.classify import WbcClassifier
from batch.train.classifier_card import set_calibration, write_classifier_markdown

__all__ = ["build_parser", "calibrate_classifier", "file_list_digest", "main"]

log = logging.getLogger(__name__)

#: Stated on a card this job had to create (the weights came without one).
NEW_CARD_NOTE = (
    "Card created by the calibration job: the weights had none, so scale, input mode "
    "and training data are unknown."
)


def file_list_digest(files: Sequence[str | Path], root: str | Path) -> str:
    """SHA-256 of the sorted file paths relative to ``root``: which images, not their bytes.

    Paths are taken as listed (symbolic links are not followed), so a folder
    of links to a dataset's files digests like a copy of them.
    """
    rel = sorted(Path(f).relative_to(Path(root)).as_posix() for f in files)
    return hashlib.sha256("\n".join(rel).encode()).hexdigest()


def calibrate_classifier(
    model: str | Path,
    data: str | Path,
    *,
    mpp: float | None = None,
    limit_per_class: int | None = None,
    device: str = "cpu",
    bins: int = DEFAULT_BINS,
    png: str | Path | None = None,
    write: bool = True,
    command: str = "",
    description: str = "",
) -> dict[str, Any]:
    """Fit a temperature for ``model`` on the ImageFolder ``data`` and store it in its card.

    Parameters
    ----------
    model
        Local ``.pt`` (or a shipped name, ``wbc_type``); its sidecar card is rewritten.
    data
        ``data/<class>/*`` with folders named after the model's labels.
    mpp, limit_per_class
        As for ``hemaray eval classifier`` (`load_labelled_crops`).
    device
        Inference device.
    bins
        Equal-width bins of the ECE.
    png
        Also write the reliability diagram of the fitting data there.
    write
        False: report only, leave the card alone.
    command
        The command line, recorded in the card.
    description
        What ``data`` is, in words, recorded in the card (e.g. "the model's
        own val split, reproduced with seed 0").

    Returns
    -------
    dict
        ``temperature``, ``fitted_on`` and the ECE / NLL before and after on ``data``.
    """
    weights = Path(shipped_or_path(str(model)))
    if "://" in str(model) or weights.suffix != ".pt":
        raise ValueError(f"model must be a local .pt file whose card can be rewritten, got {model}")
    clf = WbcClassifier(weights, name=weights.stem, device=device, temperature=1.0)
    previous = clf.card.extra.get("temperature") if clf.card else None
    crops = load_labelled_crops(clf, data, mpp=mpp, limit_per_class=limit_per_class)
    raw = clf.probabilities(crops.crops, crops.masks, calibrated=False)
    temperature = fit_temperature(raw, crops.labels)
    report = calibration_report(raw, crops.labels, temperature, bins=bins)
    per_class = Counter(clf.class_names[i] for i in crops.labels)
    fitted_on = {
        "data": str(Path(data).resolve()),
        **({"description": description} if description else {}),
        "n": len(crops.labels),
        "images_per_class": dict(sorted(per_class.items())),
        "selection": (
            f"the first {limit_per_class} images (by name) of each class folder"
            if limit_per_class
            else "every image of each class folder"
        ),
        "file_list_sha256": file_list_digest(crops.files, data),
        "source_mpp": crops.source_mpp,
        "command": command,
    }
    result: dict[str, Any] = {
        "model": str(weights),
        "temperature": temperature,
        "previous_temperature": previous,
        "fitted_on": fitted_on,
        **{k: v for k, v in report.items() if k not in ("bins", "temperature")},
        "written": write,
    }
    if png is not None:
        result["reliability_png"] = str(
            plot_reliability(
                diagram_panels(report, temperature),
                png,
                f"{weights.stem}: fitting data {Path(data).name} (n={report['n']})",
            )
        )
    if write:
        card = clf.card or ModelCard(
            name=weights.stem,
            task="classify",
            class_names=list(clf.class_names),
            notes=[NEW_CARD_NOTE],
        )
        set_calibration(card, temperature, fitted_on, report)
        write_model_card(card, weights, embed=True, markdown=False)
        write_classifier_markdown(weights)
        log.info("wrote temperature %g to %s", temperature, weights.with_suffix(".json"))
    return result


def build_parser() -> argparse.ArgumentParser:
    """The ``calibrate_classifier`` command line."""
    p = argparse.ArgumentParser(
        prog="calibrate_classifier",
        description=(
            "Fit a WBC classifier's temperature on a labelled ImageFolder (held-out data, "
            "not the test set) and write it into the model card next to the weights."
        ),
    )
    p.add_argument(
        "--model", required=True, help="the classifier .pt (its .json card is rewritten)"
    )
    p.add_argument("--data", required=True, type=Path, help="ImageFolder <class>/<img> to fit on")
    p.add_argument(
        "--mpp", type=float, help="mpp of the images (default: the card's source_mpp, as eval)"
    )
    p.add_argument("--limit", type=int, help="at most this many images per class (first by name)")
    p.add_argument("--device", default="cpu", help="cpu | cuda:0 | auto")
    p.add_argument("--bins", type=int, default=DEFAULT_BINS, help="ECE bins (equal width)")
    p.add_argument("--png", type=Path, help="also write a reliability diagram (before / after)")
    p.add_argument(
        "--describe", default="", help="what the data are, for the card (which split, how chosen)"
    )
    p.add_argument("--dry-run", action="store_true", help="report only; leave the card alone")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints one JSON object; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv_list)
    result = calibrate_classifier(
        args.model,
        args.data,
        mpp=args.mpp,
        limit_per_class=args.limit,
        device=args.device,
        bins=args.bins,
        png=args.png,
        write=not args.dry_run,
        command="python jobs/calibrate_classifier.py " + shlex.join(argv_list),
        description=args.describe,
    )
    print(json.dumps(result, indent=2))
    return 0
