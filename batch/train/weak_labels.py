"""Weak per-cell labels: WBC crops from image-labelled data, labelled with their image's class.

Datasets such as the Kaggle ALL set (``all4``: ``Benign``, ``Early``, ``Pre``,
``Pro``) label whole fields, each holding several cells. `weak_crops` runs the
cell detector over every image, cuts each detected WBC out the way the
pipeline does (`batch.stages.crop.crop_wbcs`, same margin) and writes it to an
ImageFolder under its image's class. Every crop is *weakly* labelled: a
benign lymphocyte in a "Pro" field is still called ``pro_b``.

Crops of one image are correlated (same patient, slide, stain, camera), so
``groups.csv`` (``file,group``) names each crop's source image; pass it to
``train_classifier --groups`` and no image's cells are split between train
and test. When patient ids are unknown (``all4`` has none) this is the best
grouping available: cells of one patient in two different images can still
land in two splits. Say so next to every figure.

Quality: a crop is kept only if the segmentation finds a purple nucleus in
it (area and mean a* thresholds): on ``all4``'s bluish stain the detector
calls many red cells WBCs, and those crops carry no nucleus.

Scale: the detector resamples each image from its mpp to the model's trained
mpp. The mpp comes from ``mpp`` or is estimated from red-cell sizes on a
sample of images (`batch.stages.detect.CellDetector.estimate_mpp`), and the
median is used for the whole set (one camera, one magnification). A set that
mixes magnifications takes ``mpp="image"``: each image's own estimate, as
``hemaray run`` makes it for an image without an mpp, with every crop
resampled to ``crop_mpp``. The ALL 4-class set is such a set (estimates
0.25 / 0.33 / 0.37 um/px at the 10th / 50th / 90th percentile).
"""

from __future__ import annotations

import csv
import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from batch.config import CallsConfig, SegmentationConfig
from batch.datasets.folders import class_dirs, list_images, read_rgb
from batch.stages.crop import crop_regions, crop_wbcs, resize_by
from batch.stages.segment import segment_wbc

__all__ = [
    "DEFAULT_MIN_CONF",
    "DEFAULT_MIN_NUCLEUS_A",
    "DEFAULT_MIN_NUCLEUS_UM2",
    "DEFAULT_MPP_SAMPLES",
    "DetectorLike",
    "PER_IMAGE",
    "WeakCropReport",
    "estimate_dataset_mpp",
    "weak_crops",
]

log = logging.getLogger(__name__)

#: Minimum detector confidence of a WBC box that becomes a crop.
DEFAULT_MIN_CONF = 0.4
#: A crop is kept only if segmentation finds a nucleus at least this large (um^2) and this
#: purple (mean CIELAB a*): the same check a run's calls apply (`batch.config.CallsConfig`).
DEFAULT_MIN_NUCLEUS_UM2 = CallsConfig.min_nucleus_um2
DEFAULT_MIN_NUCLEUS_A = CallsConfig.min_nucleus_a
#: Images per class used to estimate a dataset's mpp.
DEFAULT_MPP_SAMPLES = 8
#: Detector class name of white blood cells.
WBC = "WBC"
#: ``mpp`` value for one estimate per image.
PER_IMAGE = "image"


class DetectorLike(Protocol):
    """What `weak_crops` needs from a detector (`batch.stages.detect.CellDetector`)."""

    @property
    def class_names(self) -> tuple[str, ...]: ...

    def detect(self, tiles: Sequence[npt.NDArray[np.uint8]], mpp: Any = None) -> list[Any]: ...

    def estimate_mpp(self, image: npt.NDArray[np.uint8]) -> float | None: ...


@dataclass
class WeakCropReport:
    """What `weak_crops` wrote."""

    out: Path
    mpp: float | str | None
    images: int = 0
    images_without_wbc: int = 0
    #: Per-image mpp only: images whose scale could not be estimated (skipped).
    images_without_mpp: int = 0
    #: Per-image mpp only: 10th / 50th / 90th percentile of the images' estimates.
    mpp_percentiles: list[float] = field(default_factory=list)
    rejected_no_nucleus: int = 0
    crops_per_label: dict[str, int] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        return {
            "out": str(self.out),
            "mpp": self.mpp,
            "images": self.images,
            "images_without_wbc": self.images_without_wbc,
            "images_without_mpp": self.images_without_mpp,
            "mpp_percentiles": list(self.mpp_percentiles),
            "rejected_no_nucleus": self.rejected_no_nucleus,
            "crops_per_label": dict(self.crops_per_label),
            "unreadable": list(self.unreadable),
        }


def _class_images(data: Path, rename: dict[str, str]) -> list[tuple[str, Path]]:
    items: list[tuple[str, Path]] = []
    for cdir in class_dirs(data):
        label = rename.get(cdir.name, cdir.name)
        items += [(label, f) for f in list_images(cdir, recursive=True)]
    if not items:
        raise FileNotFoundError(f"no images under {str(data)!r}; expected <class>/<image>")
    return items


def estimate_dataset_mpp(
    detector: DetectorLike,
    images: Sequence[Path],
    *,
    samples: int = DEFAULT_MPP_SAMPLES,
    seed: int = 0,
) -> float | None:
    """Median of per-image mpp estimates (from red-cell sizes) over a seeded sample of images."""
    rng = random.Random(seed)
    pick = sorted(rng.sample(list(images), min(samples, len(images))))
    estimates = []
    for p in pick:
        rgb = read_rgb(p)
        if rgb is None:
            continue
        est = detector.estimate_mpp(rgb)
        if est is not None:
            estimates.append(est)
    if not estimates:
        return None
    log.info("mpp estimates from %d images: %s", len(estimates), [round(e, 3) for e in estimates])
    return float(np.median(estimates))


def weak_crops(
    data: str | Path,
    out: str | Path,
    detector: DetectorLike,
    *,
    mpp: float | str | None = None,
    crop_mpp: float | None = None,
    mpp_samples: int = DEFAULT_MPP_SAMPLES,
    margin: float = SegmentationConfig.crop_margin,
    min_conf: float = DEFAULT_MIN_CONF,
    min_nucleus_um2: float | None = DEFAULT_MIN_NUCLEUS_UM2,
    min_nucleus_a: float = DEFAULT_MIN_NUCLEUS_A,
    rename: dict[str, str] | None = None,
    max_per_class: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    rejected_label: str | None = None,
) -> WeakCropReport:
    """Detect WBCs on an image-labelled ImageFolder and write weakly labelled crops.

    Parameters
    ----------
    data
        ``data/<class>/<image>``.
    out
        Output: ``out/<label>/<image stem>__wbc<k>.png``, ``out/groups.csv``
        (``file,group``: group = the source image), ``out/crops.csv`` (one row
        per crop: file, label, source, box, confidence, mpp).
    detector
        A `batch.stages.detect.CellDetector` (or anything with its methods).
    mpp
        Microns per pixel of the images; None: one estimate for the set (see the
        module docstring); ``"image"`` (:data:`PER_IMAGE`): each image's own
        estimate, as ``hemaray run`` makes it for an image without an mpp (sets
        such as ALL 4-class mix magnifications); images without one are skipped.
    crop_mpp
        Resample every crop from its image's mpp to this one (the crops'
        ``mpp`` in crops.csv); needed with per-image mpps, so one set has one scale.
    mpp_samples
        Images used to estimate the mpp.
    margin
        Crop margin (the pipeline's).
    min_conf
        Minimum WBC confidence.
    min_nucleus_um2, min_nucleus_a
        Keep a crop only if `batch.stages.segment.segment_wbc` (with the box)
        finds a nucleus of at least this area and mean a*: drops red cells
        the detector mistakes for WBCs. None (or an unknown mpp) skips the check.
    rename
        Folder name -> label (e.g. `batch.datasets.folders.ALL4_RENAME`).
    max_per_class
        Use at most this many images per class (a seeded sample).
    batch_size
        Images per detector call.
    seed
        Seed of the samples.
    rejected_label
        Write the crops that fail the nucleus check under this label (e.g.
        ``other``: red cells and smudges the detector called WBCs, examples of
        the WBC classifier's artefact class) instead of dropping them; their
        group is their source image too.

    Returns
    -------
    WeakCropReport
    """
    data, out = Path(data), Path(out)
    rename = rename or {}
    items = _class_images(data, rename)
    if max_per_class is not None:
        rng = random.Random(seed)
        by_label: dict[str, list[Path]] = {}
        for label, p in items:
            by_label.setdefault(label, []).append(p)
        items = [
            (label, p)
            for label in sorted(by_label)
            for p in sorted(rng.sample(by_label[label], min(max_per_class, len(by_label[label]))))
        ]
    per_image = mpp == PER_IMAGE
    if isinstance(mpp, str) and not per_image:
        raise ValueError(f"mpp must be a number, None or {PER_IMAGE!r}, got {mpp!r}")
    if per_image and crop_mpp is None:
        raise ValueError("per-image mpps need crop_mpp: one scale for the crops")
    if mpp is None:
        mpp = estimate_dataset_mpp(detector, [p for _, p in items], samples=mpp_samples, seed=seed)
        if mpp is None:
            log.warning("could not estimate the images' mpp; detecting at their given scale")
    if crop_mpp is not None and mpp is None:
        raise ValueError("crop_mpp needs the images' mpp")
    if WBC not in detector.class_names:
        raise ValueError(f"the detector has no {WBC!r} class; its classes: {detector.class_names}")
    wbc_id = detector.class_names.index(WBC)
    # (mpp, min area, min a*) when crops are checked for a nucleus.
    check_nucleus = min_nucleus_um2 is not None and mpp is not None
    if min_nucleus_um2 is not None and mpp is None:
        log.warning("unknown mpp: the nucleus check on crops is skipped")
    report = WeakCropReport(out=out, mpp=mpp)
    estimates: list[float] = []
    counts: Counter[str] = Counter()
    out.mkdir(parents=True, exist_ok=True)
    folders = {label for label, _ in items} | ({rejected_label} if rejected_label else set())
    for label in sorted(folders):
        (out / label).mkdir(exist_ok=True)
    group_rows: list[dict[str, str]] = []
    crop_rows: list[dict[str, Any]] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        loaded = [(label, p, read_rgb(p)) for label, p in chunk]
        for _, p, rgb in loaded:
            if rgb is None:
                report.unreadable.append(str(p))
        ok = [(label, p, rgb) for label, p, rgb in loaded if rgb is not None]
        if per_image:
            scales = [detector.estimate_mpp(rgb) for _, _, rgb in ok]
            report.images_without_mpp += sum(m is None for m in scales)
            ok = [item for item, m in zip(ok, scales, strict=True) if m is not None]
            mpps = [float(m) for m in scales if m is not None]
            estimates += mpps
        else:
            mpps = [mpp] * len(ok)  # type: ignore[list-item]
        if not ok:
            continue
        dets = detector.detect([rgb for _, _, rgb in ok], mpps if per_image else mpp)
        for (label, p, rgb), d, image_mpp in zip(ok, dets, mpps, strict=True):
            report.images += 1
            keep = (np.asarray(d.class_ids) == wbc_id) & (np.asarray(d.scores) >= min_conf)
            boxes = np.asarray(d.boxes, dtype=np.float64)[keep]
            scores = np.asarray(d.scores)[keep]
            if len(boxes) == 0:
                report.images_without_wbc += 1
                continue
            source = p.relative_to(data).as_posix()
            stem = re.sub(r"[^A-Za-z0-9_.-]", "_", p.stem)
            regions = crop_regions(boxes, margin=margin)
            crops = crop_wbcs(rgb, boxes, margin=margin)
            for k, (crop, box, region, score) in enumerate(
                zip(crops, boxes, regions, scores, strict=True)
            ):
                crop_label = label
                if check_nucleus and not _has_nucleus(
                    crop, box, region, image_mpp, min_nucleus_um2, min_nucleus_a  # type: ignore[arg-type]
                ):
                    report.rejected_no_nucleus += 1
                    if rejected_label is None:
                        continue
                    crop_label = rejected_label
                if crop_mpp is not None:
                    crop = resize_by(crop, image_mpp / crop_mpp)
                rel = f"{crop_label}/{stem}__wbc{k}.png"
                if not cv2.imwrite(str(out / rel), np.ascontiguousarray(crop[..., ::-1])):
                    raise OSError(f"could not write {out / rel}")
                counts[crop_label] += 1
                group_rows.append({"file": rel, "group": source})
                crop_rows.append(
                    {
                        "file": rel,
                        "label": crop_label,
                        "source": source,
                        "x0": round(float(box[0]), 1),
                        "y0": round(float(box[1]), 1),
                        "x1": round(float(box[2]), 1),
                        "y1": round(float(box[3]), 1),
                        "confidence": round(float(score), 4),
                        "mpp": crop_mpp if crop_mpp is not None else image_mpp,
                    }
                )
    report.crops_per_label = dict(sorted(counts.items()))
    if estimates:
        report.mpp_percentiles = [round(float(v), 4) for v in np.percentile(estimates, [10, 50, 90])]
    _write_csv(out / "groups.csv", ["file", "group"], group_rows)
    _write_csv(
        out / "crops.csv",
        ["file", "label", "source", "x0", "y0", "x1", "y1", "confidence", "mpp"],
        crop_rows,
    )
    return report


def _has_nucleus(
    crop: npt.NDArray[np.uint8],
    box: npt.NDArray[np.float64],
    region: npt.NDArray[np.int64],
    mpp: float,
    min_area_um2: float,
    min_mean_a: float,
) -> bool:
    cell_box = (
        float(box[0] - region[0]),
        float(box[1] - region[1]),
        float(box[2] - region[0]),
        float(box[3] - region[1]),
    )
    m = segment_wbc(crop, mpp=mpp, cell_box=cell_box).morphometrics()
    return bool(m["nucleus_area_um2"] >= min_area_um2 and m["nucleus_mean_a"] >= min_mean_a)


def _write_csv(path: Path, fields: list[str], rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
