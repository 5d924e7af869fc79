"""``hemaray run``, ``eval`` and ``evaluate``: the pipeline and the scores of its models."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from batch.cli.common import init_ray, print_json, storage_options
from batch.config import DETECT_RUNTIMES, DetectConfig

__all__ = ["add_commands", "ID_SECRET_ENV"]

#: Environment variable holding the key of --pseudonymous-ids (never on the command line).
ID_SECRET_ENV = "HEMARAY_ID_SECRET"


def _cmd_run(args: argparse.Namespace) -> int:
    from batch.config import load_config
    from batch.inputs import resolve_inputs
    from batch.run.ledger import EXIT_RUN_FAILED, summary_lines
    from batch.run.pipeline import run_pipeline
    from batch.storage import check_out_writable, refuse_credentials

    sets = list(args.set)
    if args.mpp is not None:
        sets.append(f"mpp={args.mpp}")
    if args.endpoint_url:
        sets.append(f"storage.endpoint_url={args.endpoint_url}")
    config = load_config(args.config, sets)
    opts = config.storage.storage_options()
    # Before any compute (and before Ray starts): a missing bucket or a denied OUT fails here,
    # with nothing created.
    check_out_writable(args.out, storage_options=opts)
    secret = None
    if args.pseudonymous_ids:
        value = os.environ.get(ID_SECRET_ENV, "")
        if not value:
            print(f"hemaray: error: --pseudonymous-ids needs the secret in ${ID_SECRET_ENV}",
                  file=sys.stderr)  # fmt: skip
            return EXIT_RUN_FAILED
        secret = value.encode()
    slides = resolve_inputs(
        args.slides, storage_options=opts, id_column=args.id_column, id_secret=secret
    )
    for slide in slides:
        refuse_credentials(slide.uri, "a slide URL")
    if not slides:
        print("hemaray: error: no slides found in " + " ".join(args.slides), file=sys.stderr)
        return EXIT_RUN_FAILED
    print(f"hemaray run: {len(slides)} slide(s) -> {args.out}", file=sys.stderr)
    init_ray(args.address)
    result = run_pipeline(slides, args.out, config, overwrite=args.overwrite)
    for line in summary_lines(result):
        print(line)
    return result.exit_code


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import pandas as pd

    from batch.eval.run import align_truth_ids, evaluate_run
    from batch.run.sink import read_table

    opts = storage_options(args)
    cells = read_table(args.out, "cells", storage_options=opts).to_pandas()
    # pandas refuses storage options with a local path
    truth = pd.concat(
        [pd.read_parquet(t, storage_options=opts if "://" in t else None) for t in args.truth]
    )
    slides = read_table(args.out, "slides", storage_options=opts).to_pandas()
    truth = align_truth_ids(truth, slides)
    result = evaluate_run(cells, truth, iou=args.iou, slides=slides)
    if args.json:
        print_json(result)
    else:
        from batch.eval.differential import slide_score_lines

        for line in slide_score_lines(result):
            print(line)
        print("(--json prints every figure)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from batch.config import load_config

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total}", end="", file=sys.stderr, flush=True)

    if args.what != "synthetic" and not args.data:
        print(f"hemaray eval {args.what}: error: --data is required", file=sys.stderr)
        return 2
    if args.what == "synthetic":
        from batch.eval.synthetic import eval_synthetic

        result = eval_synthetic(
            load_config(args.config, list(args.set)), seed=args.seed, slides=args.slides,
            width=args.size, height=args.size, kind=args.kind, blast_fraction=args.blast_fraction,
            progress=progress,
        )  # fmt: skip
        print(file=sys.stderr)
    elif args.what == "detector":
        from batch.eval.detector import eval_detector

        result = eval_detector(
            args.data, args.model, mpp=args.mpp, split=args.split, max_images=args.limit,
            runtime=args.runtime, errors_dir=args.errors,
        )  # fmt: skip
    elif args.what == "classifier":
        from batch.eval.classifier import eval_classifier

        result = eval_classifier(
            args.data, args.model or "all_subtype", mpp=args.mpp, limit_per_class=args.limit,
            png=args.png, runtime=args.runtime,
        )  # fmt: skip
    else:
        from batch.eval.images import eval_images

        sets = list(args.set) + ([f"mpp={args.mpp}"] if args.mpp else [])
        result = eval_images(
            args.data, load_config(args.config, sets), limit_per_class=args.limit, progress=progress
        )
        print(file=sys.stderr)
    if args.json:
        print_json(result)
    else:
        print(json.dumps(result, indent=2, default=str))
    return 0


def add_commands(sub: Any) -> None:
    """Register this module's subcommands on the ``hemaray`` parser's subparsers."""
    r = sub.add_parser(
        "run",
        help="process slides into per-cell Parquet (local Ray, or a cluster with --address)",
        description="Exit code: 0 all slides committed, 2 some slides failed, 1 the run itself failed.",
    )
    r.add_argument(
        "slides",
        nargs="+",
        help="paths, globs, folders, s3:// prefixes or a manifest (.csv/.parquet with slide_uri)",
    )
    r.add_argument("--out", required=True, help="output folder or s3:// prefix")
    r.add_argument("--config", help="YAML config")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. detect.batch_size=16",
    )
    r.add_argument("--address", help="Ray cluster address (default: start local Ray)")
    r.add_argument("--mpp", type=float, help="level-0 mpp for images whose files carry none")
    r.add_argument(
        "--endpoint-url", help="S3-compatible endpoint; credentials come from the AWS chain"
    )
    r.add_argument(
        "--overwrite", action="store_true", help="reprocess slides already committed in OUT"
    )
    ids = r.add_mutually_exclusive_group()
    ids.add_argument(
        "--id-column",
        metavar="COLUMN",
        help="take slide ids from this manifest column (default: <file stem>-<hash of the URI>)",
    )
    ids.add_argument(
        "--pseudonymous-ids",
        action="store_true",
        help=f"slide ids carry no file name: HMAC of the URI keyed by ${ID_SECRET_ENV}",
    )
    r.set_defaults(func=_cmd_run)
    e = sub.add_parser(
        "eval", help="score the models on labelled data (the last line is one JSON object)"
    )
    e.add_argument("what", choices=["detector", "classifier", "images", "synthetic"])
    e.add_argument("--data", help="VOC/YOLO set (detector) or ImageFolder (classifier, images)")
    e.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    e.add_argument("--slides", type=int, default=2, help="synthetic: number of slides")
    e.add_argument("--size", type=int, default=4096, help="synthetic: slide width and height (px)")
    e.add_argument(
        "--kind",
        choices=["blood", "leukemia", "marrow"],
        default="blood",
        help="synthetic: smear kind",
    )
    e.add_argument(
        "--blast-fraction", type=float, help="synthetic, leukemia: share of blasts (default 0.6)"
    )
    e.add_argument(
        "--model", help="model file; classifier: wbc_type, all_subtype or a path (default: shipped)"
    )
    e.add_argument(
        "--mpp", type=float, help="mpp of the images (default: estimated from RBC sizes)"
    )
    e.add_argument("--split", help="detector: which split of a YOLO/VOC set (default val)")
    e.add_argument(
        "--runtime", default=DetectConfig.runtime, choices=DETECT_RUNTIMES,
        help="detector, classifier: inference runtime (exported once into the model cache; "
        "default: a run's, auto); a classifier runs in auto, torch, openvino or onnxruntime",
    )  # fmt: skip
    e.add_argument(
        "--limit", type=int, help="at most this many images (per class for ImageFolders)"
    )
    e.add_argument("--config", help="YAML config (images, synthetic)")
    e.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (images, synthetic)",
    )
    e.add_argument(
        "--png", help="classifier: write a reliability diagram (before / after calibration) here"
    )
    e.add_argument(
        "--errors",
        metavar="DIR",
        help="detector: write every missed label and false box at the operating threshold "
        "here (errors.json, one contact sheet per class and kind), each with what overlaps it",
    )
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=_cmd_eval)

    ev = sub.add_parser("evaluate", help="score a run's cells against a synthetic ground truth")
    ev.add_argument("out", help="the run's output folder or s3:// prefix")
    ev.add_argument(
        "--truth",
        required=True,
        action="append",
        help="ground_truth.parquet written by hemaray synth",
    )
    ev.add_argument("--iou", type=float, default=0.5, help="IoU for a match")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--endpoint-url", help="S3-compatible endpoint")
    ev.set_defaults(func=_cmd_evaluate)
