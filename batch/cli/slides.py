"""``hemaray synth``, ``info``, ``thumbnail`` and ``plan``: slides in, figures out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from batch.cli.common import print_json, storage_options
from batch.errors import HemarayError

__all__ = ["add_commands"]


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
        blast_fraction=args.blast_fraction,
        format=args.format,
        tile_size=args.tile_size,
        progress=lambda msg: print(msg, file=sys.stderr),
        prefix=args.prefix,
    )
    for p in paths:
        print(p)
    print(Path(args.out) / "ground_truth.parquet")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from batch.slides import open_slide

    with open_slide(args.uri, storage_options=storage_options(args)) as slide:
        print_json(slide.describe())
    return 0


def _cmd_thumbnail(args: argparse.Namespace) -> int:
    import cv2

    from batch.slides import open_slide

    with open_slide(args.uri, storage_options=storage_options(args)) as slide:
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
        args.uri,
        storage_options=storage_options(args),
        max_pixels=config.slides.max_pixels,
        max_pages=config.slides.max_pages,
    ) as slide:
        plan = plan_tiles(
            slide, config.tiling, slide_id=Path(str(args.uri)).stem, target_mpp=args.target_mpp
        )
        if args.png:
            plot_plan(slide, plan, args.png)
    print_json(
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


def add_commands(sub: Any) -> None:
    """Register this module's subcommands on the ``hemaray`` parser's subparsers."""
    s = sub.add_parser("synth", help="write synthetic smear slides with exact ground truth")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--slides", type=int, default=1, help="number of slides")
    s.add_argument("--width", type=int, default=8192, help="level-0 width in px")
    s.add_argument("--height", type=int, default=6144, help="level-0 height in px")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--mpp", type=float, default=0.25, help="microns per pixel at level 0")
    s.add_argument("--blank-fraction", type=float, default=0.0, help="fraction of empty background")
    s.add_argument(
        "--kind",
        choices=["blood", "leukemia", "marrow"],
        default="blood",
        help="blood: normal WBC differential; leukemia: blood with lymphoblasts"
        " (--blast-fraction) and leukocytosis; marrow: hematogones and blasts",
    )
    s.add_argument(
        "--blast-fraction",
        type=float,
        default=None,
        help="leukemia only: share of blasts among the WBCs (default 0.6)",
    )
    s.add_argument("--format", choices=["tiff", "jpeg", "png"], default="tiff")
    s.add_argument("--tile-size", type=int, default=512, help="TIFF tile size in px")
    s.add_argument(
        "--prefix", default="slide", help="slide file stems PREFIX_0000, ... (ids stay distinct)"
    )
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
