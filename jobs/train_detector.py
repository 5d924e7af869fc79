"""Ray job entrypoint: train the cell detector. Logic lives in ``batch.train.detector``.

Example::

    python jobs/train_detector.py --data DATA/txl-pbc --data DATA/bccd \
        --model yolov8n.yaml --freeze all --epochs 60 --imgsz 320 --out runs/detector

Fields around corrected labels (``hemaray import-labels``), cut from the slides at ``--mpp``
(`batch.train.from_labels`), with or without ``--data`` sets::

    python jobs/train_detector.py --labels labels.parquet --slides slides/ --run OUT \
        --model batch/models/detector.pt --freeze last3 --epochs 20 --out runs/detector
"""

from __future__ import annotations

import sys

from batch.train.detector import main

if __name__ == "__main__":
    sys.exit(main())
