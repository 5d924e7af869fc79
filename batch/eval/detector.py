"""Detector evaluation: the pipeline's own detector stage scored on a labelled set.

``eval_detector`` (``hemaray eval detector``) runs ``CellDetector``, with its
resampling to the trained mpp, over a YOLO or Pascal VOC set
(`batch.datasets.detection`) and reports, overall and per class, precision,
recall, F1, AP50 and AP50-95 (definitions: `batch.eval.metrics`).
``evaluate_images`` does the scoring on already-read images; detector
training reports its validation metrics with it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from batch.config import DetectConfig
from batch.datasets.detection import LabeledImage, read_detection_dataset
from batch.eval.metrics import AP_CONF, detection_metrics
from batch.stages.detect import CellDetector, Detections, estimate_mpp_from_rbc

__all__ = ["eval_detector", "evaluate_images"]

log = logging.getLogger(__name__)


def evaluate_images(
    detector: CellDetector,
    images: Sequence[LabeledImage],
    *,
    mpp: float | str | None = None,
    conf: float | None = None,
) -> dict[str, Any]:
    """Detection metrics of ``detector`` on labelled images.

    Parameters
    ----------
    detector
        The detector stage to evaluate.
    images
        Labelled images (`batch.datasets.detection.read_detection_dataset`).
    mpp
        Scale of the images: a number for all of them; otherwise an image's
        own known ``mpp`` if it has one, else, with ``"labels"`` or None,
        the scale its labelled RBCs give (``estimate_mpp_from_rbc``; an
        oracle for the scale only, so the metrics measure detection), or with
        ``"auto"`` the detector's own estimate (``CellDetector.estimate_mpp``,
        experimental: see its docstring).
    conf
        Operating threshold for precision / recall / F1 (default: the detector's).

    Returns
    -------
    dict
        ``detection_metrics`` output plus ``mpp_mode``, ``mpp_median`` and
        ``mpp_unresolved`` (images whose scale could not be estimated and
        were used as given).
    """
    names = list(detector.class_names)
    preds: list[tuple[Any, Any, Any]] = []
    gts: list[tuple[Any, Any]] = []
    used_mpp: list[float] = []
    unresolved = 0
    skipped_classes: set[str] = set()
    for im in images:
        rgb = im.read_rgb()
        image_mpp: float | None
        if isinstance(mpp, (int, float)):
            image_mpp = float(mpp)
        elif im.mpp is not None:
            image_mpp = im.mpp  # the image's own, known scale
        elif mpp is None or mpp == "labels":
            image_mpp = estimate_mpp_from_rbc(
                im.boxes, im.classes, image_shape=(im.height, im.width)
            )
        elif mpp == "auto":
            image_mpp = detector.estimate_mpp(rgb)
        else:
            raise ValueError(f"mpp must be a number, 'labels', 'auto' or None; got {mpp!r}")
        if image_mpp is None:
            unresolved += 1
        else:
            used_mpp.append(image_mpp)
        det: Detections = detector.detect([rgb], image_mpp, conf=AP_CONF)[0]
        preds.append((det.boxes, det.class_ids, det.scores))
        keep = [i for i, c in enumerate(im.classes) if c in names]
        skipped_classes.update(c for c in im.classes if c not in names)
        gts.append(
            (im.boxes[keep], np.asarray([names.index(im.classes[i]) for i in keep], np.int64))
        )
    if skipped_classes:
        log.warning(
            "ground-truth classes unknown to the model ignored: %s", sorted(skipped_classes)
        )
    result = detection_metrics(preds, gts, names, conf=detector.conf if conf is None else conf)
    result["mpp_mode"] = "labels" if mpp is None else mpp
    result["mpp_median"] = float(np.median(used_mpp)) if used_mpp else None
    result["mpp_unresolved"] = unresolved
    return result


def _select_split(
    images: Sequence[LabeledImage], split: str | None
) -> tuple[list[LabeledImage], str]:
    present = {im.split for im in images}
    if split is None:
        split = "val" if "val" in present else "all" if "all" in present else sorted(present)[0]
    chosen = [im for im in images if im.split == split]
    if not chosen:
        raise ValueError(f"no images in split {split!r}; splits present: {sorted(present)}")
    return chosen, split


def eval_detector(
    data_dir: str | Path,
    model: str | Path | CellDetector | None = None,
    *,
    mpp: float | str | None = None,
    split: str | None = None,
    conf: float | None = None,
    device: str = "auto",
    batch_size: int = 8,
    max_images: int | None = None,
    storage_options: dict[str, Any] | None = None,
    runtime: str = DetectConfig.runtime,
) -> dict[str, Any]:
    """Evaluate a detector on a labelled YOLO or Pascal VOC set.

    Parameters
    ----------
    data_dir
        VOC (``Annotations/``, ``JPEGImages/``, optional ``ImageSets/val.txt``)
        or YOLO (``images/``, ``labels/``, optional ``train``/``val``
        subfolders, ``data.yaml`` with class names).
    model
        A ``CellDetector``, a weights path / URL, or None for the shipped detector.
    mpp
        Microns per pixel of the images (a number); None or ``"labels"``: each
        image's scale from its labelled RBCs (the sets carry no scale);
        ``"auto"``: the detector's own estimate (experimental). See
        ``evaluate_images``.
    split
        Which split to evaluate; default ``val`` if present, else the whole set.
    conf
        Operating confidence threshold for precision / recall / F1.
    device, batch_size, runtime
        Passed to ``CellDetector`` when ``model`` is not one (``runtime``:
        ``detect.runtime``'s values, default a run's, ``auto``;
        `batch.stages.runtime`, `batch.stages.autoruntime`).
    max_images
        Evaluate only the first N images of the split (sorted by path).
    storage_options
        fsspec options for a remote ``model``.

    Returns
    -------
    dict
        ``map50``, ``map50_95``, ``precision``, ``recall``, ``f1``,
        ``per_class.{RBC,WBC,platelet}.{ap50, ap50_95, precision, recall, f1,
        n_gt, n_pred}``, ``n_images``, ``split``, ``data``, ``model``,
        ``model_sha256``, ``trained_mpp``, ``mpp_mode``, ``runtime`` (the one
        that ran) and ``runtime_choice`` (why, when ``auto`` chose it).
    """
    detector = (
        model
        if isinstance(model, CellDetector)
        else CellDetector(
            model, device=device, batch_size=batch_size, storage_options=storage_options,
            runtime=runtime,
        )  # fmt: skip
    )
    images, split = _select_split(read_detection_dataset(data_dir), split)
    images = sorted(images, key=lambda im: str(im.path))
    if max_images is not None:
        images = images[:max_images]
    result = evaluate_images(detector, images, mpp=mpp, conf=conf)
    result.update(
        {
            "split": split,
            "data": str(data_dir),
            "model": str(detector.weights_path),
            "model_sha256": detector.sha256,
            "trained_mpp": detector.trained_mpp,
            "runtime": detector.runtime,
            "runtime_choice": (
                detector.runtime_choice.reason if detector.runtime_choice else "set explicitly"
            ),
        }
    )
    return result
