"""Write weakly labelled WBC crops from an image-labelled set (thin entry point).

Runs the cell detector over ``--data/<class>/<image>`` and writes every WBC
crop to ``--out/<label>/`` under its image's class, with ``groups.csv``
(group = source image) for ``jobs/train_classifier.py --groups``. Logic:
`batch.train.weak_labels`.

Example (the Kaggle ALL set, whose file names carry no patient id)::

    python jobs/weak_crops.py --data /path/to/all4 --out runs/all4_crops --all4
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch.config import SegmentationConfig  # noqa: E402
from batch.datasets.folders import ALL4_RENAME  # noqa: E402
from batch.train.weak_labels import (  # noqa: E402
    DEFAULT_MIN_CONF,
    DEFAULT_MIN_NUCLEUS_A,
    DEFAULT_MIN_NUCLEUS_UM2,
    DEFAULT_MPP_SAMPLES,
    PER_IMAGE,
    weak_crops,
)


def _mpp_arg(text: str) -> float | str:
    return PER_IMAGE if text == PER_IMAGE else float(text)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run `batch.train.weak_labels.weak_crops`, print its report as JSON."""
    p = argparse.ArgumentParser(prog="weak_crops", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, type=Path, help="ImageFolder <class>/<image>")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--detector", help="detector .pt (default: the shipped batch/models/detector.pt)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--mpp",
        type=_mpp_arg,
        help="microns per pixel of the images (default: one estimate for the set); 'image': "
        "each image's own estimate, as hemaray run makes it (needs --crop-mpp)",
    )
    p.add_argument("--crop-mpp", type=float, help="resample every crop to this mpp")
    p.add_argument("--mpp-samples", type=int, default=DEFAULT_MPP_SAMPLES)
    p.add_argument("--margin", type=float, default=SegmentationConfig.crop_margin)
    p.add_argument("--min-conf", type=float, default=DEFAULT_MIN_CONF)
    p.add_argument(
        "--min-nucleus-um2",
        type=float,
        default=DEFAULT_MIN_NUCLEUS_UM2,
        help="keep crops whose segmented nucleus is at least this large; <= 0: no check",
    )
    p.add_argument("--min-nucleus-a", type=float, default=DEFAULT_MIN_NUCLEUS_A)
    p.add_argument(
        "--all4", action="store_true", help="rename Benign/Early/Pre/Pro to subtype labels"
    )
    p.add_argument("--rename", action="append", default=[], metavar="FOLDER=LABEL")
    p.add_argument("--max-per-class", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rejected-label",
        help="write crops without a nucleus under this label (e.g. other) instead of dropping them",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from batch.stages.detect import CellDetector

    rename = dict(ALL4_RENAME) if args.all4 else {}
    for item in args.rename:
        folder, _, label = item.partition("=")
        if not label:
            p.error(f"--rename expects FOLDER=LABEL, got {item!r}")
        rename[folder] = label
    detector = CellDetector(args.detector, device=args.device)
    report = weak_crops(
        args.data,
        args.out,
        detector,
        mpp=args.mpp,
        crop_mpp=args.crop_mpp,
        mpp_samples=args.mpp_samples,
        margin=args.margin,
        min_conf=args.min_conf,
        min_nucleus_um2=args.min_nucleus_um2 if args.min_nucleus_um2 > 0 else None,
        min_nucleus_a=args.min_nucleus_a,
        rename=rename,
        max_per_class=args.max_per_class,
        seed=args.seed,
        rejected_label=args.rejected_label,
    )
    summary = report.to_dict()
    (args.out / "weak_crops_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
