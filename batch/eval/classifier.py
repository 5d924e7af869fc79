"""``hemaray eval classifier``: a WBC classifier on an ImageFolder of single-cell images.

Each image is prepared exactly as the model's training prepared its own
(`batch.stages.preprocess.prepare_crop` with the scale, re-crop and margins
recorded in the model card): a single-cell image like PBC's is resampled to
the trained mpp, its central cell is segmented and re-cropped as the pipeline
crops a detected WBC, and the classifier sees that crop in its input mode.
Metrics are those of the training job (`batch.eval.metrics.classification_metrics`),
plus calibration (`batch.eval.calibration`): the top-label ECE of the model's
own probabilities (``ece_before``, ``T = 1``) and of the calibrated ones the
pipeline writes (``ece``, with the card's temperature), and optionally a
reliability diagram of both.

`load_labelled_crops` (the images of an ImageFolder prepared for a
classifier) is shared with the calibration job (`batch.train.calibrate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from batch.config import SegmentationConfig
from batch.datasets.folders import class_dirs, folder_label, list_images, read_rgb
from batch.eval.calibration import DEFAULT_BINS, calibration_report, diagram_panels
from batch.eval.metrics import classification_metrics
from batch.models import shipped_or_path
from batch.plot import plot_reliability
from batch.stages.classify import WbcClassifier
from batch.stages.preprocess import prepare_crop

__all__ = ["LabelledCrops", "eval_classifier", "load_labelled_crops"]


def _label_of(folder: str, names: list[str]) -> str | None:
    key = folder_label(folder)
    return key if key in names else (folder if folder in names else None)


@dataclass
class LabelledCrops:
    """An ImageFolder's images prepared as a classifier's training prepared its own.

    Attributes
    ----------
    crops, masks
        One crop (and cell mask, None in ``"crop"`` mode) per usable image.
    labels
        Class index (into the classifier's ``class_names``) per crop.
    files
        Source image per crop.
    skipped
        Folders whose name is no label of the model, and unreadable files.
    source_mpp, trained_mpp
        Scale of the images as given, and the model's (None: unknown).
    """

    crops: list[npt.NDArray[np.uint8]] = field(default_factory=list)
    masks: list[npt.NDArray[np.bool_] | None] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    source_mpp: float | None = None
    trained_mpp: float | None = None


def load_labelled_crops(
    clf: WbcClassifier,
    data: str | Path,
    *,
    mpp: float | None = None,
    limit_per_class: int | None = None,
) -> LabelledCrops:
    """Read ``data/<class>/*`` and prepare each image for ``clf`` (`prepare_crop`).

    ``mpp`` is the images' microns per pixel; default: the ``source_mpp`` the
    model was trained from (its card), else the trained mpp (no resampling).
    ``limit_per_class`` keeps the first images (sorted by name) of each folder.

    Raises
    ------
    FileNotFoundError
        If no folder named after a label holds a readable image.
    """
    names = list(clf.class_names)
    card = clf.card
    extra = card.extra if card else {}
    trained = card.trained_mpp if card else None
    source = mpp if mpp is not None else extra.get("source_mpp", trained)
    scale = (source / trained) if (source and trained) else 1.0
    root = Path(data)
    out = LabelledCrops(source_mpp=source, trained_mpp=trained)
    for folder in class_dirs(root):
        label = _label_of(folder.name, names)
        if label is None:
            out.skipped.append(folder.name)
            continue
        files = list_images(folder)
        for path in files[:limit_per_class] if limit_per_class else files:
            rgb = read_rgb(path)
            if rgb is None:
                out.skipped.append(str(path))
                continue
            crop, mask, _ = prepare_crop(
                rgb,
                scale=scale,
                mpp=trained,
                recrop=bool(extra.get("recrop", False)),
                margin=float(extra.get("crop_margin", SegmentationConfig.crop_margin)),
                box_margin=extra.get("box_margin"),
                needs_mask=clf.input_mode != "crop",
            )
            out.crops.append(crop)
            out.masks.append(mask)
            out.labels.append(names.index(label))
            out.files.append(str(path))
    if not out.crops:
        raise FileNotFoundError(f"{root}: no images in folders named after the labels {names}")
    return out


def eval_classifier(
    data: str | Path,
    model: str = "all_subtype",
    *,
    mpp: float | None = None,
    limit_per_class: int | None = None,
    device: str = "auto",
    png: str | Path | None = None,
    bins: int = DEFAULT_BINS,
    runtime: str = "auto",
) -> dict[str, Any]:
    """Accuracy, macro F1, per-class P/R/F1/FNR, MAE, confusion and calibration on ``data``.

    Classification metrics and ``ece`` are those of the calibrated
    probabilities the pipeline writes (the card's temperature; the labels are
    the same either way); ``ece_before`` is the model's own (``T = 1``).
    ``png``: also write a reliability diagram, before and after, there.
    See `load_labelled_crops` for ``mpp`` and ``limit_per_class``; folders
    whose name is not in the model's label set are reported and skipped.
    ``runtime``: ``classify.runtime`` (reported with why it was chosen).
    """
    clf = WbcClassifier(
        shipped_or_path(model), name=Path(model).stem, device=device, runtime=runtime
    )
    names = list(clf.class_names)
    data_ = load_labelled_crops(clf, data, mpp=mpp, limit_per_class=limit_per_class)
    raw = clf.probabilities(data_.crops, data_.masks, calibrated=False)
    probs = clf.calibrate(raw)
    result = classification_metrics(data_.labels, probs.argmax(axis=1).tolist(), names)
    calib = calibration_report(raw, data_.labels, clf.temperature, bins=bins)
    extra = clf.card.extra if clf.card else {}
    result.update(
        model=str(clf.model_path),
        runtime=clf.runtime,
        runtime_reason=clf.runtime_choice.reason,
        input_mode=clf.input_mode,
        source_mpp=data_.source_mpp,
        trained_mpp=data_.trained_mpp,
        skipped=data_.skipped,
        split_note="all images given; PBC and the ALL set name no patients, so no split by patient",
        temperature=clf.temperature,
        temperature_fitted_on=extra.get("calibration", {}).get("fitted_on"),
        ece_before=calib["ece_before"],
        ece=calib["ece"],
        nll_before=calib["nll_before"],
        nll=calib["nll"],
        ece_bins=bins,
    )
    if png is not None:
        result["reliability_png"] = str(
            plot_reliability(
                diagram_panels(calib, clf.temperature),
                png,
                f"{Path(str(clf.model_path)).stem} on {Path(data).name} (n={calib['n']}, "
                f"accuracy {result['accuracy']:.3f})",
            )
        )
    return result
