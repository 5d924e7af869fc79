"""Write a run output with one big synthetic slide's cells, for scale checks of readers (one-off).

Running the pipeline on a slide big enough for 100,000 cells takes long on a
small machine; what ``hemaray export --format qupath`` and ``hemaray report``
read is only the run's tables. This writes them directly, through the
pipeline's own writer (`batch.run.sink.SlideWriter`, the run's cells schema
with the shipped classifiers' label sets): ``--cells`` rows of realistic
content (RBC / WBC / platelet boxes on a jittered grid over the slide, WBC
measurements, ``wbc_type`` and ``all_subtype`` labels and probabilities,
ids from `batch.ids.cell_ids`) and a committed ``slides`` row.

No pixels are written: ``slide_uri`` is ``--slide`` (default: a path that
does not exist). The QuPath export does not open the slide; pixel formats
(coco, imagefolder, ...) need ``--slide`` to be a real slide at least
``--width`` x ``--height``.

Example: the QuPath export's peak memory on a 100,000-cell slide::

    python jobs/scale_cells.py --out /tmp/scale/out --cells 100000
    /usr/bin/time -v hemaray export /tmp/scale/out --format qupath --to /tmp/scale/qupath
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch.config import load_config  # noqa: E402
from batch.ids import cell_ids  # noqa: E402
from batch.run.provenance import label_sets  # noqa: E402
from batch.run.sink import ROW_GROUP_ROWS, OutputStore, cells_schema  # noqa: E402

#: Share of each detector class among the cells (a marrow-like smear: many WBCs).
CLASS_SHARES = {"RBC": 0.6, "WBC": 0.3, "platelet": 0.1}
#: Box side in level-0 pixels at 0.25 um/px, by class (mean, spread).
BOX_PX = {"RBC": (30.0, 3.0), "WBC": (48.0, 8.0), "platelet": (10.0, 2.0)}
MPP = 0.25


def synthetic_cells(
    slide_id: str, n: int, width: int, height: int, labels: dict[str, list[str]], seed: int
) -> pa.Table:
    """``n`` cells of one slide with every column of the run's cells schema."""
    rng = np.random.default_rng(seed)
    classes = rng.choice(list(CLASS_SHARES), size=n, p=list(CLASS_SHARES.values()))
    side = np.sqrt(width * height / n)  # one cell per grid square, jittered within it
    cols = int(np.ceil(width / side))
    idx = np.arange(n)
    cx = (idx % cols + rng.uniform(0.2, 0.8, n)) * side
    cy = (idx // cols + rng.uniform(0.2, 0.8, n)) * side
    size = np.array([rng.normal(*BOX_PX[c]) for c in classes]).clip(4, None)
    x0, y0 = (cx - size / 2).clip(0, width), (cy - size / 2).clip(0, height)
    x1, y1 = (cx + size / 2).clip(0, width), (cy + size / 2).clip(0, height)
    boxes = np.stack([x0, y0, x1, y1], axis=1)
    wbc = classes == "WBC"
    n_wbc = int(wbc.sum())

    def per_wbc(values: np.ndarray) -> np.ndarray:
        out = np.full(n, np.nan)
        out[wbc] = values
        return out

    columns: dict[str, object] = {
        "cell_id": cell_ids(slide_id, boxes, list(classes), "scale"),
        "level": np.zeros(n, np.int16),
        "tile_row": (cy // 1024).astype(np.int32),
        "tile_col": (cx // 1024).astype(np.int32),
        "x0": x0, "y0": y0, "x1": x1, "y1": y1, "cx": (x0 + x1) / 2, "cy": (y0 + y1) / 2,
        "mpp": np.full(n, MPP),
        "det_class": classes,
        "det_confidence": rng.uniform(0.25, 1.0, n).astype(np.float32),
        "cell_area_um2": per_wbc(rng.normal(120, 25, n_wbc).clip(30, None)),
        "nucleus_area_um2": per_wbc(rng.normal(60, 15, n_wbc).clip(10, None)),
        "nc_ratio": per_wbc(rng.uniform(0.3, 4.0, n_wbc)),
        "nucleus_circularity": per_wbc(rng.uniform(0.4, 1.0, n_wbc)),
        "nucleus_solidity": per_wbc(rng.uniform(0.7, 1.0, n_wbc)),
        "nucleus_mean_a": per_wbc(rng.normal(25, 5, n_wbc)),
        "nucleus_mean_b": per_wbc(rng.normal(-20, 5, n_wbc)),
        "detector_version": ["scale0000000"] * n,
    }  # fmt: skip
    for name, names in labels.items():
        runs_on = wbc if name == "wbc_type" else wbc & (rng.uniform(size=n) < 0.2)
        k = int(runs_on.sum())
        probs = rng.dirichlet(np.full(len(names), 0.3), size=k).astype(np.float32)
        top = probs.argmax(axis=1)
        label = np.full(n, None, dtype=object)
        label[runs_on] = np.array(names, dtype=object)[top]
        conf = np.full(n, np.nan, np.float32)
        conf[runs_on] = probs.max(axis=1)
        lists: list[list[float] | None] = [None] * n
        for i, p in zip(np.flatnonzero(runs_on), probs.tolist(), strict=True):
            lists[i] = p
        columns[f"{name}_label"] = label
        columns[f"{name}_confidence"] = conf
        columns[f"{name}_probs"] = pa.array(lists, pa.list_(pa.float32()))
        columns[f"{name}_version"] = [None if lab is None else "scale0000000" for lab in label]
    return pa.table(columns)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run output folder to write (or s3:// prefix)")
    p.add_argument("--cells", type=int, default=100_000, help="cells on the slide")
    p.add_argument("--slide-id", default="scale_0001")
    p.add_argument("--slide", default=None, help="slide_uri of the slides row (pixels)")
    p.add_argument("--width", type=int, default=16_000, help="level-0 width the cells cover")
    p.add_argument("--height", type=int, default=16_000, help="level-0 height the cells cover")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    started = time.perf_counter()
    labels = label_sets(load_config(None, []))
    table = synthetic_cells(args.slide_id, args.cells, args.width, args.height, labels, args.seed)
    store = OutputStore(args.out)
    writer = store.slide_writer(args.slide_id, cells_schema(labels, export_crops=False))
    for batch in table.to_batches(ROW_GROUP_ROWS):
        writer.write(batch)
    classes = table.column("det_class").to_numpy(zero_copy_only=False)
    uri = args.slide or f"{args.out.rstrip('/')}/no-pixels/{args.slide_id}.tiff"
    writer.commit(
        {
            "slide_id": args.slide_id, "slide_uri": uri, "status": "committed",
            "format": "tiff", "width": args.width, "height": args.height, "levels": 1,
            "mpp": MPP, "mpp_source": "config", "level_used": 0,
            "n_rbc": int((classes == "RBC").sum()), "n_wbc": int((classes == "WBC").sum()),
            "n_platelet": int((classes == "platelet").sum()),
        }  # fmt: skip
    )
    print(json.dumps({"out": args.out, "slide_id": args.slide_id, "cells": table.num_rows,
                      "seconds": round(time.perf_counter() - started, 1)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
