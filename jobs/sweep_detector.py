"""Ray job entrypoint: seed 000's detector grid (YOLOv8 sizes x freeze strategies) in parallel.

Logic lives in ``batch.train.sweep``. Example::

    hemaray submit --address http://HEAD:8265 --wait -- jobs/sweep_detector.py \
        --data s3://datasets/txl-pbc --data s3://datasets/bccd \
        --model-template s3://weights/yolov8{size}.pt --epochs 60 --out s3://results/sweep

Writes ``OUT/results.parquet`` and ``OUT/results.csv`` (model, freeze, precision,
recall, f1, map50, map50_95, train time) and each trial's weights under ``OUT/<trial>/``.
"""

from __future__ import annotations

import sys

from batch.train.sweep import main

if __name__ == "__main__":
    sys.exit(main())
