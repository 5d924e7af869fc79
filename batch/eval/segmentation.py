"""Nucleus segmentation accuracy against exact masks: Dice and IoU (`batch.eval.metrics`).

`eval_segmentation` reads a folder of plain synthetic images (``.png`` /
``.jpg`` written by ``batch.synth.synth_slides(..., format="png")``) and its
``ground_truth.parquet``, cuts every ground-truth WBC box out of its image
the way the pipeline does (`batch.stages.crop.crop_wbcs`, same margin),
segments the crop (`batch.stages.segment.segment_wbc`) and compares the
nucleus mask with the exact one the generator drew, on the whole crop.

Run it from the command line::

    python -m batch.eval.segmentation --synth-dir out/seg_eval --slides 2 --size 2048 --seed 1
"""

from __future__ import annotations

import argparse
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pandas as pd

from batch.config import SegmentationConfig
from batch.eval.metrics import dice, iou
from batch.stages.crop import crop_regions, crop_wbcs
from batch.stages.segment import segment_wbc

__all__ = [
    "GROUND_TRUTH_FILE",
    "decode_mask",
    "eval_segmentation",
    "main",
    "score_cells",
    "summarize",
]

#: Ground-truth table written by ``batch.synth``.
GROUND_TRUTH_FILE = "ground_truth.parquet"
#: Image suffixes tried for a slide id, in order.
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg")


def decode_mask(png: bytes) -> npt.NDArray[np.bool_]:
    """Decode a ground-truth mask (PNG bytes of a 0/1 ``uint8`` image) to booleans."""
    arr = cv2.imdecode(np.frombuffer(io.BytesIO(png).getvalue(), np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("ground-truth nucleus_mask is not a decodable PNG")
    return np.asarray(arr > 0)


def _image_path(folder: Path, slide_id: str) -> Path:
    for suffix in PLAIN_SUFFIXES:
        p = folder / f"{slide_id}{suffix}"
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"no plain image for slide {slide_id!r} in {folder} (tried {PLAIN_SUFFIXES}); "
        "write the synthetic slides with format='png'"
    )


def eval_segmentation(
    folder: str | Path,
    *,
    margin: float = SegmentationConfig.crop_margin,
    config: SegmentationConfig | None = None,
    use_box: bool = True,
    max_cells: int | None = None,
) -> pd.DataFrame:
    """Per-WBC Dice and IoU of the nucleus mask on a folder of plain synthetic images.

    Parameters
    ----------
    folder
        Holds ``ground_truth.parquet`` and ``<slide_id>.png`` (or ``.jpg``).
    margin
        Crop margin (as in the pipeline).
    config
        Segmentation parameters.
    use_box
        Pass the ground-truth box to `segment_wbc` as ``cell_box`` (the
        pipeline passes the detector box).
    max_cells
        Evaluate at most this many WBCs (the first in table order).

    Returns
    -------
    pandas.DataFrame
        One row per WBC: ``slide_id, object_id, wbc_type, subtype, zone, dice, iou,
        nucleus_area_um2, true_nucleus_area_um2, found``.
    """
    folder = Path(folder)
    gt = pd.read_parquet(folder / GROUND_TRUTH_FILE)
    wbc = gt[(gt["class"] == "WBC") & gt["nucleus_mask"].notna()]
    if max_cells is not None:
        wbc = wbc.head(max_cells)
    rows: list[dict[str, Any]] = []
    for slide_id, cells in wbc.groupby("slide_id", sort=True):
        bgr = cv2.imread(str(_image_path(folder, str(slide_id))), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot read the image of slide {slide_id!r} in {folder}")
        image = np.ascontiguousarray(bgr[..., ::-1], dtype=np.uint8)
        boxes = cells[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.float64)
        crops = crop_wbcs(image, boxes, margin=margin)
        rows += score_cells(cells, crops, margin=margin, config=config, use_box=use_box)
    return pd.DataFrame(rows)


def score_cells(
    cells: pd.DataFrame,
    crops: Sequence[npt.NDArray[np.uint8]],
    *,
    margin: float = SegmentationConfig.crop_margin,
    config: SegmentationConfig | None = None,
    use_box: bool = True,
) -> list[dict[str, Any]]:
    """Segment each ground-truth WBC's crop and score it against the exact nucleus mask.

    ``crops[k]`` is the image inside ``crop_regions`` of ``cells``' k-th box
    (level-0 pixels, same ``margin``), however it was read.
    """
    boxes = cells[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.float64)
    regions = crop_regions(boxes, margin=margin)
    rows: list[dict[str, Any]] = []
    for (_, cell), box, region, crop in zip(cells.iterrows(), boxes, regions, crops, strict=True):
        rx0, ry0 = int(region[0]), int(region[1])
        truth = np.zeros(crop.shape[:2], dtype=bool)
        m = decode_mask(cell["nucleus_mask"])
        ox, oy = int(cell["x0"]) - rx0, int(cell["y0"]) - ry0
        truth[oy : oy + m.shape[0], ox : ox + m.shape[1]] = m
        mpp = float(cell["mpp"])
        cell_box = (box[0] - rx0, box[1] - ry0, box[2] - rx0, box[3] - ry0) if use_box else None
        seg = segment_wbc(crop, mpp=mpp, config=config, cell_box=cell_box)
        rows.append(
            {
                "slide_id": str(cell["slide_id"]),
                "object_id": int(cell["object_id"]),
                "wbc_type": cell.get("wbc_type"),
                "subtype": cell.get("subtype"),
                "zone": cell.get("zone"),
                "dice": dice(seg.nucleus_mask, truth),
                "iou": iou(seg.nucleus_mask, truth),
                "nucleus_area_um2": float(seg.nucleus_mask.sum()) * mpp**2,
                "true_nucleus_area_um2": float(truth.sum()) * mpp**2,
                "found": seg.found,
            }
        )
    return rows


def summarize(per_cell: pd.DataFrame) -> dict[str, Any]:
    """Mean / median Dice and IoU overall, by WBC type, by subtype and by smear zone."""

    def stats(df: pd.DataFrame) -> dict[str, float]:
        return {
            "n": len(df),
            "mean_dice": float(df["dice"].mean()) if len(df) else math.nan,
            "median_dice": float(df["dice"].median()) if len(df) else math.nan,
            "mean_iou": float(df["iou"].mean()) if len(df) else math.nan,
            "median_iou": float(df["iou"].median()) if len(df) else math.nan,
            "found_fraction": float(df["found"].mean()) if len(df) else math.nan,
        }

    out: dict[str, Any] = {"all": stats(per_cell)}
    for key in ("wbc_type", "subtype", "zone"):
        if key in per_cell and per_cell[key].notna().any():
            out[f"by_{key}"] = {str(k): stats(g) for k, g in per_cell.groupby(key, sort=True)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Generate plain synthetic fields (unless they exist) and print Dice / IoU as JSON."""
    p = argparse.ArgumentParser(prog="python -m batch.eval.segmentation", description=__doc__)
    p.add_argument("--synth-dir", type=Path, required=True, help="folder of plain synthetic images")
    p.add_argument("--slides", type=int, default=2)
    p.add_argument("--size", type=int, default=2048, help="width and height of each field (px)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mpp", type=float, default=0.25)
    p.add_argument("--kind", choices=("blood", "marrow"), default="blood")
    p.add_argument("--margin", type=float, default=SegmentationConfig.crop_margin)
    p.add_argument(
        "--out", type=Path, help="write per-cell results (CSV) and the summary (JSON) here"
    )
    args = p.parse_args(argv)
    if not (args.synth_dir / GROUND_TRUTH_FILE).is_file():
        from batch.synth import synth_slides

        synth_slides(
            args.synth_dir,
            slides=args.slides,
            width=args.size,
            height=args.size,
            seed=args.seed,
            mpp=args.mpp,
            kind=args.kind,
            format="png",
        )
    per_cell = eval_segmentation(args.synth_dir, margin=args.margin)
    summary = summarize(per_cell)
    text = json.dumps(summary, indent=2)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        per_cell.to_csv(args.out / "segmentation_per_cell.csv", index=False)
        (args.out / "segmentation_summary.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
