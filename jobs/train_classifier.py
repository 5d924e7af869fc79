"""Train a WBC classifier from an ImageFolder (thin entry point; logic in `batch.train.classifier`).

Example (the shipped ``batch/models/wbc_type.pt``)::

    python jobs/train_classifier.py --data /path/to/pbc --out runs/wbc_type --name wbc_type \
        --input mask --mpp 0.08 --target-mpp 0.2 --recrop --imgsz 64 --epochs 30

Corrections (``hemaray import-labels``) instead of an ImageFolder: the pipeline's crops of the
labelled WBCs are cut from the slides (`batch.train.from_labels`), here to fine-tune the shipped
model::

    python jobs/train_classifier.py --labels labels.parquet --slides slides/ --run OUT \
        --model batch/models/wbc_type.pt --input crop --imgsz 96 --epochs 10 \
        --name wbc_type --out runs/wbc_type
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch.train.classifier import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
