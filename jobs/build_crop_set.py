"""Build one WBC-crop ImageFolder from labelled sources and synthetic runs (thin entry point).

Logic: `batch.train.crop_sets`. Example (the shipped wbc_type model's data)::

    python jobs/build_crop_set.py --out runs/wbc_crops --target-mpp 0.2 \\
        --source '{"name": "pbc", "root": "DATA/pbc", "mpp": 0.08, "recrop": true}' \\
        --source '{"name": "all4", "root": "runs/all4_crops", "mpp": 0.55,
                   "groups_csv": "runs/all4_crops/groups.csv", "max_per_class": 600,
                   "rename": {"benign": "lymphocyte", "early_pre_b": "blast", "pre_b": "blast",
                              "pro_b": "blast"}}' \\
        --run runs/synth_out --truth runs/synth/ground_truth.parquet
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch.train.crop_sets import CropSource, build_crop_set, crops_from_run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="build_crop_set", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--target-mpp", type=float, required=True, help="the detector's mpp")
    p.add_argument("--source", action="append", default=[], metavar="JSON", help="a CropSource")
    p.add_argument("--run", action="append", default=[], help="a run OUT made with export.crops")
    p.add_argument("--truth", action="append", default=[], help="its ground_truth.parquet")
    p.add_argument(
        "--run-max-per-class", type=int, help="at most this many crops per label and run"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--run-label", default="wbc_type", help="ground-truth column that labels run crops"
    )
    p.add_argument(
        "--run-unmatched",
        default="other",
        help="label of run crops matching no truth WBC; 'skip' drops them",
    )
    args = p.parse_args(argv)
    if len(args.run) != len(args.truth):
        p.error("give one --truth per --run")
    report = build_crop_set(
        [CropSource(**json.loads(s)) for s in args.source], args.out,
        target_mpp=args.target_mpp, seed=args.seed,
    )  # fmt: skip
    import pandas as pd

    from batch.eval.run import align_truth_ids
    from batch.export.source import RunSource
    from batch.run.sink import read_table

    for i, (run, truth) in enumerate(zip(args.run, args.truth, strict=True)):
        cells = read_table(run, "cells").to_pandas()
        slides = read_table(run, "slides").to_pandas()
        source = RunSource(run)
        crop_mpp = {ref.slide_id: source.crop_mpp(ref) for ref in source.slides()}
        report["sources"][f"synthetic_{i}"] = crops_from_run(
            cells, align_truth_ids(pd.read_parquet(truth), slides), args.out, source=f"synthetic{i}",
            max_per_class=args.run_max_per_class, seed=args.seed, label_column=args.run_label,
            unmatched=None if args.run_unmatched == "skip" else args.run_unmatched,
            target_mpp=args.target_mpp, crop_mpp=crop_mpp,
        )  # fmt: skip
    (args.out / "sources.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
