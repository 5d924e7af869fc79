"""Fit a WBC classifier's temperature on labelled data and write it into its model card.

Thin entry point; logic in `batch.train.calibrate`. Example (a copy of the
shipped ``wbc_type`` calibrated on held-out PBC images)::

    python jobs/calibrate_classifier.py --model runs/wbc_type/wbc_type.pt \
        --data /path/to/pbc_val --png runs/wbc_type/reliability_fit.png
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch.train.calibrate import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
