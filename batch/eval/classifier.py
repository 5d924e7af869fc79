"""``hemaray eval classifier``: a WBC classifier on an ImageFolder of single-cell images.

Each image is prepared exactly as the model's training prepared its own
(`batch.stages.preprocess.prepare_crop` with the scale, re-crop and margins
recorded in the model card): a single-cell image like PBC's is resampled to
the trained mpp, its central cell is segmented and re-cropped as the pipeline
crops a detected WBC, and the classifier sees that crop in its input mode.
Metrics are those of the training job (`batch.eval.metrics.classification_metrics`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from batch.config import SegmentationConfig
from batch.datasets.folders import class_dirs, folder_label, list_images, read_rgb
from batch.eval.metrics import classification_metrics
from batch.models import shipped_or_path
from batch.stages.classify import WbcClassifier
from batch.stages.preprocess import prepare_crop

__all__ = ["eval_classifier"]


def _label_of(folder: str, names: list[str]) -> str | None:
    key = folder_label(folder)
    return key if key in names else (folder if folder in names else None)


def eval_classifier(
    data: str | Path,
    model: str = "all_subtype",
    *,
    mpp: float | None = None,
    limit_per_class: int | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Accuracy, macro F1, per-class P/R/F1/FNR, MAE and confusion on ``data``.

    ``mpp`` is the images' microns per pixel; default: the ``source_mpp`` the
    model was trained from (its card), else the trained mpp (no resampling).
    Folders whose name is not in the model's label set are reported and skipped.
    """
    clf = WbcClassifier(shipped_or_path(model), name=Path(model).stem, device=device)
    names = list(clf.class_names)
    card = clf.card
    extra = card.extra if card else {}
    trained = card.trained_mpp if card else None
    source = mpp if mpp is not None else extra.get("source_mpp", trained)
    scale = (source / trained) if (source and trained) else 1.0
    root = Path(data)
    y_true: list[int] = []
    crops: list[npt.NDArray[np.uint8]] = []
    masks: list[npt.NDArray[np.bool_] | None] = []
    skipped: list[str] = []
    for folder in class_dirs(root):
        label = _label_of(folder.name, names)
        if label is None:
            skipped.append(folder.name)
            continue
        files = list_images(folder)
        for path in files[:limit_per_class] if limit_per_class else files:
            rgb = read_rgb(path)
            if rgb is None:
                skipped.append(str(path))
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
            crops.append(crop)
            masks.append(mask)
            y_true.append(names.index(label))
    if not crops:
        raise FileNotFoundError(f"{root}: no images in folders named after the labels {names}")
    _, _, probs = clf.classify(crops, masks)
    result = classification_metrics(y_true, np.asarray(probs).argmax(axis=1).tolist(), names)
    result.update(
        model=str(clf.model_path),
        input_mode=clf.input_mode,
        source_mpp=source,
        trained_mpp=trained,
        skipped=skipped,
        split_note="all images given; PBC and the ALL set name no patients, so no split by patient",
    )
    return result
