"""Ray job entrypoint: train the cell detector. Logic lives in ``batch.train.detector``.

Example::

    python jobs/train_detector.py --data DATA/txl-pbc --data DATA/bccd \
        --model yolov8n.yaml --freeze all --epochs 60 --imgsz 320 --out runs/detector
"""

from __future__ import annotations

import sys

from batch.train.detector import main

if __name__ == "__main__":
    sys.exit(main())
