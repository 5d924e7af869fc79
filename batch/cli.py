"""The ``hemaray`` command: parses arguments and calls the package. No logic here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from batch.errors import HemarayError
from batch.submit import add_cluster_commands

__all__ = ["main", "build_parser"]

log = logging.getLogger("hemaray")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=str))


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    """A benchmark's figures: one JSON object (last line) or one aligned line per figure."""
    if as_json:
        _print_json(result)
    else:
        for k, v in result.items():
            print(f"{k:>28}: {v}")


def _cmd_synth(args: argparse.Namespace) -> int:
    from batch.synth import synth_slides

    paths = synth_slides(
        args.out,
        slides=args.slides,
        width=args.width,
        height=args.height,
        seed=args.seed,
        mpp=args.mpp,
        blank_fraction=args.blank_fraction,
        kind=args.kind,
        format=args.format,
        tile_size=args.tile_size,
        progress=lambda msg: print(msg, file=sys.stderr),
    )
    for p in paths:
        print(p)
    print(Path(args.out) / "ground_truth.parquet")
    return 0


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    if getattr(args, "endpoint_url", None):
        return {"client_kwargs": {"endpoint_url": args.endpoint_url}}
    return None


def _cmd_info(args: argparse.Namespace) -> int:
    from batch.slides import open_slide

    with open_slide(args.uri, storage_options=_storage_options(args)) as slide:
        _print_json(slide.describe())
    return 0


def _cmd_thumbnail(args: argparse.Namespace) -> int:
    import cv2

    from batch.slides import open_slide

    with open_slide(args.uri, storage_options=_storage_options(args)) as slide:
        thumb = slide.thumbnail(args.size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.out), cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR)):
        raise HemarayError(
            f"could not write {args.out}: use a .png or .jpg path in a writable folder"
        )
    print(args.out)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from batch.config import load_config
    from batch.plot import plot_plan
    from batch.slides import open_slide
    from batch.tiling import plan_tiles

    config = load_config(args.config, args.set)
    with open_slide(
        args.uri, storage_options=_storage_options(args), max_pixels=config.slides.max_pixels
    ) as slide:
        plan = plan_tiles(
            slide, config.tiling, slide_id=Path(str(args.uri)).stem, target_mpp=args.target_mpp
        )
        if args.png:
            plot_plan(slide, plan, args.png)
    _print_json(
        {
            "level": plan.level,
            "downsample": plan.downsample,
            "scale": plan.scale,
            "tile_size": plan.tile_size,
            "overlap": plan.overlap,
            "tiles_planned": plan.n_planned,
            "tiles_skipped": len(plan.skipped),
            "background_skip_fraction": round(plan.skip_fraction, 4),
        }
    )
    return 0


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # The embedded default: a local Ray instance on this machine.
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)


def _cmd_run(args: argparse.Namespace) -> int:
    from batch.config import load_config
    from batch.inputs import resolve_inputs
    from batch.pipeline import EXIT_RUN_FAILED, run_pipeline, summary_lines

    sets = list(args.set)
    if args.mpp is not None:
        sets.append(f"mpp={args.mpp}")
    if args.endpoint_url:
        sets.append(f"storage.endpoint_url={args.endpoint_url}")
    config = load_config(args.config, sets)
    slides = resolve_inputs(args.slides, storage_options=config.storage.storage_options())
    if not slides:
        print("hemaray: error: no slides found in " + " ".join(args.slides), file=sys.stderr)
        return EXIT_RUN_FAILED
    print(f"hemaray run: {len(slides)} slide(s) -> {args.out}", file=sys.stderr)
    _init_ray(args.address)
    result = run_pipeline(slides, args.out, config, overwrite=args.overwrite)
    for line in summary_lines(result):
        print(line)
    return result.exit_code


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import pandas as pd

    from batch.run_eval import evaluate_run
    from batch.sink import read_table

    opts = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else None
    cells = read_table(args.out, "cells", storage_options=opts).to_pandas()
    truth = pd.read_parquet(args.truth, storage_options=opts)
    result = evaluate_run(cells, truth, iou=args.iou)
    if args.json:
        _print_json(result)
    else:
        print(json.dumps(result, indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import tempfile

    from batch.bench import bench_io
    from batch.synth import synth_slides

    with tempfile.TemporaryDirectory(prefix="hemaray-bench-") as tmp:
        # The slide under test is a synthetic smear (realistic JPEG tiles), generated here.
        print(f"generating a {args.width} x {args.height} synthetic smear ...", file=sys.stderr)
        (slide,) = synth_slides(tmp, slides=1, width=args.width, height=args.height, seed=args.seed)
        result = bench_io(slide_path=slide, regions=args.regions, seed=args.seed, workdir=tmp)
    _print_result(result, args.json)
    return 0


def _cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from batch.bench import bench_pipeline

    print(
        "bench pipeline: generating slides, running hemaray run four times, timing the bare detector three times (~13 min on 2 cores) ...",
        file=sys.stderr,
    )
    result = bench_pipeline(width=args.width, height=args.height, seed=args.seed, gpu=args.gpu)
    _print_result(result, args.json)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from batch.config import load_config

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total}", end="", file=sys.stderr, flush=True)

    if args.what != "synthetic" and not args.data:
        print(f"hemaray eval {args.what}: error: --data is required", file=sys.stderr)
        return 2
    if args.what == "synthetic":
        from batch.eval_synthetic import eval_synthetic

        result = eval_synthetic(
            load_config(args.config, list(args.set)), seed=args.seed, slides=args.slides,
            width=args.size, height=args.size, kind=args.kind, progress=progress,
        )  # fmt: skip
        print(file=sys.stderr)
    elif args.what == "detector":
        from batch.evaluate import eval_detector

        result = eval_detector(
            args.data, args.model, mpp=args.mpp, split=args.split, max_images=args.limit
        )
    elif args.what == "classifier":
        from batch.evaluate_cls import eval_classifier

        result = eval_classifier(args.data, args.model or "all_subtype", limit_per_class=args.limit)
    else:
        from batch.eval_images import eval_images

        sets = list(args.set) + ([f"mpp={args.mpp}"] if args.mpp else [])
        result = eval_images(
            args.data, load_config(args.config, sets), limit_per_class=args.limit, progress=progress
        )
        print(file=sys.stderr)
    if args.json:
        _print_json(result)
    else:
        print(json.dumps(result, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hemaray",
        description="Distributed batch processing of blood-smear and bone-marrow slides.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write synthetic smear slides with exact ground truth")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--slides", type=int, default=1, help="number of slides")
    s.add_argument("--width", type=int, default=8192, help="level-0 width in px")
    s.add_argument("--height", type=int, default=6144, help="level-0 height in px")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--mpp", type=float, default=0.25, help="microns per pixel at level 0")
    s.add_argument("--blank-fraction", type=float, default=0.0, help="fraction of empty background")
    s.add_argument("--kind", choices=["blood", "marrow"], default="blood")
    s.add_argument("--format", choices=["tiff", "jpeg", "png"], default="tiff")
    s.add_argument("--tile-size", type=int, default=512, help="TIFF tile size in px")
    s.set_defaults(func=_cmd_synth)

    def add_uri(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("uri", help="slide path, file:// or s3:// URL")
        sp.add_argument(
            "--endpoint-url",
            help="S3-compatible endpoint (MinIO, Ceph); credentials come from the AWS chain",
        )

    i = sub.add_parser("info", help="print a slide's levels, sizes, mpp, tiles as JSON")
    add_uri(i)
    i.set_defaults(func=_cmd_info)

    t = sub.add_parser("thumbnail", help="write a PNG thumbnail of a slide")
    add_uri(t)
    t.add_argument("out", help="output PNG path")
    t.add_argument("--size", type=int, default=1024, help="longest side in px")
    t.set_defaults(func=_cmd_thumbnail)

    pl = sub.add_parser("plan", help="plan detector tiles for a slide; print counts as JSON")
    add_uri(pl)
    pl.add_argument("--config", help="YAML config")
    pl.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    pl.add_argument(
        "--target-mpp", type=float, default=None, help="detector mpp (default: level 0)"
    )
    pl.add_argument("--png", help="write an overlay of the tiles (kept / skipped) on a thumbnail")
    pl.set_defaults(func=_cmd_plan)

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
    r.set_defaults(func=_cmd_run)

    e = sub.add_parser(
        "eval", help="score the models on labelled data (the last line is one JSON object)"
    )
    e.add_argument("what", choices=["detector", "classifier", "images", "synthetic"])
    e.add_argument(
        "--data", help="VOC/YOLO set (detector) or ImageFolder (classifier, images)"
    )
    e.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    e.add_argument("--slides", type=int, default=2, help="synthetic: number of slides")
    e.add_argument(
        "--size", type=int, default=4096, help="synthetic: slide width and height (px)"
    )
    e.add_argument(
        "--kind", choices=["blood", "marrow"], default="blood", help="synthetic: smear kind"
    )
    e.add_argument(
        "--model", help="model file; classifier: wbc_type, all_subtype or a path (default: shipped)"
    )
    e.add_argument(
        "--mpp", type=float, help="mpp of the images (default: estimated from RBC sizes)"
    )
    e.add_argument("--split", help="detector: which split of a YOLO/VOC set (default val)")
    e.add_argument(
        "--limit", type=int, help="at most this many images (per class for ImageFolders)"
    )
    e.add_argument("--config", help="YAML config (images, synthetic)")
    e.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override (images, synthetic)"
    )
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=_cmd_eval)

    ev = sub.add_parser("evaluate", help="score a run's cells against a synthetic ground truth")
    ev.add_argument("out", help="the run's output folder or s3:// prefix")
    ev.add_argument("--truth", required=True, help="ground_truth.parquet written by hemaray synth")
    ev.add_argument("--iou", type=float, default=0.5, help="IoU for a match")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--endpoint-url", help="S3-compatible endpoint")
    ev.set_defaults(func=_cmd_evaluate)

    b = sub.add_parser(
        "bench", help="benchmarks; the last line of --json output is one JSON object"
    )
    bsub = b.add_subparsers(dest="bench", required=True)
    bio = bsub.add_parser(
        "io", help="region reads: S3 over-read, GETs per region, speed vs tifffile"
    )
    bio.add_argument("--json", action="store_true")
    bio.add_argument("--regions", type=int, default=60)
    bio.add_argument("--seed", type=int, default=0)
    bio.add_argument("--width", type=int, default=16384, help="width of the generated smear")
    bio.add_argument("--height", type=int, default=16384, help="height of the generated smear")
    bio.set_defaults(func=_cmd_bench)
    bp = bsub.add_parser(
        "pipeline", help="hemaray run vs the bare detector: throughput ratio, memory on a 4x slide"
    )
    bp.add_argument("--json", action="store_true")
    bp.add_argument(
        "--width", type=int, default=8192, help="base slide width (the 4x slide doubles both sides)"
    )
    bp.add_argument("--height", type=int, default=6144, help="base slide height")
    bp.add_argument("--seed", type=int, default=0)
    bp.add_argument("--gpu", action="store_true", help="run detector and pipeline on CUDA")
    bp.set_defaults(func=_cmd_bench_pipeline)
    add_cluster_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except HemarayError as e:
        print(f"hemaray: error: {e}", file=sys.stderr)
        return 1
