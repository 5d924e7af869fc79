"""Detector evaluation: the pipeline's own detector stage scored on a labelled set.

``eval_detector`` (``hemaray eval detector``) runs ``CellDetector``, with its
resampling to the trained mpp, over a YOLO or Pascal VOC set
(`batch.datasets.detection`) and reports, overall and per class, precision,
recall, F1, AP50 and AP50-95 (definitions: `batch.eval.metrics`).
``evaluate_images`` does the scoring on already-read images; detector
training reports its validation metrics with it. With ``errors_dir``,
``eval_detector`` also writes every error at the operating point
(``detection_errors``: missed labels and false boxes, each with what
overlaps it from the other side) to ``errors.json`` and one contact sheet per
class and kind (``WBC_missed.png`` ...), where a person tells the model's
errors from the labels'.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from batch.config import DetectConfig
from batch.datasets.detection import LabeledImage, read_detection_dataset
from batch.eval.metrics import AP_CONF, detection_errors, detection_metrics
from batch.stages.detect import CellDetector, Detections, estimate_mpp_from_rbc

__all__ = ["eval_detector", "evaluate_images", "write_error_sheets"]

log = logging.getLogger(__name__)


def evaluate_images(
    detector: CellDetector,
    images: Sequence[LabeledImage],
    *,
    mpp: float | str | None = None,
    conf: float | None = None,
    errors: bool = False,
) -> dict[str, Any]:
    """Detection metrics of ``detector`` on labelled images.

    AP is measured the way ultralytics validates and COCO scores detectors:
    on every class each box scores (``CellDetector.detect(per_class=True)``),
    so a cell the network ranks second as a WBC still counts on the WBC
    precision-recall curve at that score. Precision, recall, F1 and the
    errors are the operating point of a run: one label per box, at ``conf``.
    The one-label AP is reported beside (``map50_one_label``,
    ``per_class.*.ap50_one_label``).

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
    errors
        Also list every error at that threshold (``detection_errors``, each
        with its image's ``path``) under ``errors``.

    Returns
    -------
    dict
        ``detection_metrics`` output plus ``mpp_mode``, ``mpp_median`` and
        ``mpp_unresolved`` (images whose scale could not be estimated and
        were used as given).
    """
    names = list(detector.class_names)
    preds: list[tuple[Any, Any, Any]] = []
    candidates: list[tuple[Any, Any, Any]] = []
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
        every = detector.detect([rgb], image_mpp, conf=AP_CONF, per_class=True)[0]
        candidates.append((every.boxes, every.class_ids, every.scores))
        keep = [i for i, c in enumerate(im.classes) if c in names]
        skipped_classes.update(c for c in im.classes if c not in names)
        gts.append(
            (im.boxes[keep], np.asarray([names.index(im.classes[i]) for i in keep], np.int64))
        )
    if skipped_classes:
        log.warning(
            "ground-truth classes unknown to the model ignored: %s", sorted(skipped_classes)
        )
    operating = detector.conf if conf is None else conf
    result = detection_metrics(preds, gts, names, conf=operating, candidates=candidates)
    if errors:
        result["errors"] = [
            {**e, "path": str(images[e["image"]].path)}
            for e in detection_errors(preds, gts, names, conf=operating)
        ]
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
    errors_dir: str | Path | None = None,
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
    errors_dir
        Write every error at the operating threshold here: ``errors.json``
        and contact sheets (``write_error_sheets``).

    Returns
    -------
    dict
        ``map50``, ``map50_95``, ``precision``, ``recall``, ``f1``,
        ``per_class.{RBC,WBC,platelet}.{ap50, ap50_95, precision, recall, f1,
        n_gt, n_pred}``, ``n_images``, ``split``, ``data``, ``model``,
        ``model_sha256``, ``trained_mpp``, ``mpp_mode``, ``runtime`` (the one
        that ran) and ``runtime_choice`` (why, when ``auto`` chose it); with
        ``errors_dir``, ``errors`` (``{class: {missed, false}}`` counts) and
        ``errors_dir``.
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
    result = evaluate_images(detector, images, mpp=mpp, conf=conf, errors=errors_dir is not None)
    if errors_dir is not None:
        listed = result.pop("errors")
        write_error_sheets(listed, images, errors_dir)
        result["errors"] = {
            name: {kind: sum(e["class"] == name and e["kind"] == kind for e in listed)
                   for kind in ("missed", "false")}
            for name in detector.class_names
        }  # fmt: skip
        result["errors_dir"] = str(errors_dir)
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


#: Context around an error in its contact-sheet cell: the box's size times this on each side.
SHEET_CONTEXT = 0.6
#: Contact-sheet cell side (px) and cells per row; at most SHEET_MAX cells per sheet.
SHEET_CELL, SHEET_COLUMNS, SHEET_MAX = 192, 8, 96


def write_error_sheets(
    errors: Sequence[dict[str, Any]], images: Sequence[LabeledImage], out_dir: str | Path
) -> list[Path]:
    """``errors.json`` and one PNG per class and kind (``WBC_missed.png``, ``WBC_false.png`` ...).

    Each cell shows the error in its context, its box in green, and a
    caption naming the nearest box of the other side: "box RBC iou 0.87 p
    0.76" under a missed label (a kept prediction, its score), "p 0.84, label
    RBC iou 0.89" under a false box (its score, then the label). The JSON
    lists every error with its image path; each sheet holds the first
    :data:`SHEET_MAX` of its kind.
    """
    import cv2

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "errors.json").write_text(json.dumps(list(errors), indent=1))
    written = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in errors:
        groups.setdefault((e["class"], e["kind"]), []).append(e)
    pixels: dict[int, Any] = {}
    for (name, kind), group in sorted(groups.items()):
        cells = []
        for e in group[:SHEET_MAX]:
            if e["image"] not in pixels:
                pixels[e["image"]] = images[e["image"]].read_rgb()
            cells.append(_sheet_cell(pixels[e["image"]], e))
        rows = [cells[i : i + SHEET_COLUMNS] for i in range(0, len(cells), SHEET_COLUMNS)]
        blank = np.full_like(cells[0], 255)
        sheet = np.concatenate(
            [np.concatenate(r + [blank] * (SHEET_COLUMNS - len(r)), axis=1) for r in rows], axis=0
        )
        path = out / f"{name}_{kind}.png"
        cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
        written.append(path)
    return written


def _sheet_cell(rgb: np.ndarray, error: dict[str, Any]) -> np.ndarray:
    """The error's box and its context, scaled to a square cell, with a caption."""
    import cv2

    x0, y0, x1, y1 = error["box"]
    pad = SHEET_CONTEXT * max(x1 - x0, y1 - y0)
    h, w = rgb.shape[:2]
    cx0, cy0 = int(max(0, x0 - pad)), int(max(0, y0 - pad))
    cx1, cy1 = int(min(w, x1 + pad)), int(min(h, y1 + pad))
    crop = np.ascontiguousarray(rgb[cy0:cy1, cx0:cx1])
    scale = (SHEET_CELL - 24) / max(crop.shape[0], crop.shape[1], 1)
    crop = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))))
    p0 = (round((x0 - cx0) * scale), round((y0 - cy0) * scale))
    p1 = (round((x1 - cx0) * scale), round((y1 - cy0) * scale))
    cv2.rectangle(crop, p0, p1, (0, 200, 0), 2)
    cell = np.full((SHEET_CELL, SHEET_CELL, 3), 255, np.uint8)
    cell[: crop.shape[0], : crop.shape[1]] = crop
    near = error["nearest"]
    other = "label" if error["kind"] == "false" else "box"
    text = f"no {other} near" if near is None else f"{other} {near['class']} iou {near['iou']:.2f}"
    if near is not None and near["score"] is not None:
        text += f" p {near['score']:.2f}"
    if error["score"] is not None:
        text = f"p {error['score']:.2f}, " + text
    cv2.putText(cell, text, (3, SHEET_CELL - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                cv2.LINE_AA)  # fmt: skip
    return cell
