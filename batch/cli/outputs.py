"""``hemaray report``, ``export`` and ``import-labels``: what people do with a run's output."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from batch.cli.common import print_json, storage_options

__all__ = ["add_commands"]


def _cmd_report(args: argparse.Namespace) -> int:
    from batch.analytics.command import report_command

    return report_command(args.outs, by=args.by, html=args.html, crops=args.crops,
                          as_json=args.json, storage_options=storage_options(args))  # fmt: skip


def _cmd_export(args: argparse.Namespace) -> int:
    from batch.export import ExportOptions, export_run
    from batch.export.where import WhereError

    try:
        summary = export_run(
            args.out,
            args.to,
            ExportOptions(
                format=args.format,
                select=args.select,
                classes=args.classes.split(",") if args.classes else None,
                where=args.where,
                slides=args.slides.split(",") if args.slides else None,
                seed=args.seed,
                field_px=args.field_px,
                url_prefix=args.url_prefix,
            ),
            storage_options=storage_options(args),
        )
    except WhereError as e:
        # A usage error, like argparse's own: exit 2 with DuckDB's message, no traceback.
        print(f"hemaray export: error: {e}", file=sys.stderr)
        return 2
    print_json(summary)
    return 0


def _cmd_import_labels(args: argparse.Namespace) -> int:
    from batch.export.importer import import_labels

    opts = storage_options(args)
    table = import_labels(args.files, args.format, args.out, run=args.run, storage_options=opts)
    matches = table.column("match").to_pylist()
    print_json(
        {"out": args.out, "rows": table.num_rows}
        | {f"matched_{m}": matches.count(m) for m in ("id", "iou", "new")}
    )
    return 0


def add_commands(sub: Any) -> None:
    """Register this module's subcommands on the ``hemaray`` parser's subparsers."""
    rp = sub.add_parser("report", help="tables over run outputs; --html: a static review site")
    rp.add_argument("outs", nargs="+", metavar="OUT", help="run output folders or s3:// prefixes")
    rp.add_argument("--by", help="slide-metadata column to group and compare slides by")
    rp.add_argument("--html", metavar="DIR", help="write the review site (index.html) here")
    rp.add_argument("--crops", type=int, default=12, help="gallery crops per WBC type per slide")
    rp.add_argument("--json", action="store_true", help="last line: the figures as one JSON object")
    rp.add_argument("--endpoint-url", help="S3-compatible endpoint")
    rp.set_defaults(func=_cmd_report)

    x = sub.add_parser(
        "export",
        help="export a run's cells for annotation or training (COCO, YOLO, QuPath, Label Studio, CVAT, ImageFolder)",
    )
    x.add_argument("out", help="the run's output folder or s3:// prefix")
    x.add_argument(
        "--format",
        required=True,
        choices=("coco", "cvat", "imagefolder", "labelstudio", "qupath", "yolo"),
    )
    x.add_argument(
        "--to", required=True, help="export folder, or an s3:// prefix (uploaded slide by slide)"
    )
    x.add_argument(
        "--select",
        help="least-confident:N | margin:N | random:N | stratified:N (per slide and label); default: all",
    )
    x.add_argument(
        "--classes", help="comma-separated detector classes or labels, e.g. WBC or blast"
    )
    x.add_argument(
        "--where",
        metavar="SQL",
        help="SQL predicate over the cells columns (DuckDB), e.g. "
        "\"wbc_type_label = 'blast' AND det_confidence > 0.5\"",
    )
    x.add_argument("--slides", help="comma-separated slide ids (default: every committed slide)")
    x.add_argument("--seed", type=int, default=0, help="seed of random / stratified selection")
    x.add_argument(
        "--field-px", type=int, default=640, help="field side in pixels at the detector's scale"
    )
    x.add_argument(
        "--url-prefix", default="", help="Label Studio: prefix of image paths in tasks.json"
    )
    x.add_argument("--endpoint-url", help="S3-compatible endpoint")
    x.set_defaults(func=_cmd_export)

    il = sub.add_parser(
        "import-labels",
        help="annotation tool files (QuPath, COCO, Label Studio, CVAT) into a labels table",
    )
    il.add_argument("files", nargs="+", help="the tool's files (QuPath: <slide_id>.geojson)")
    il.add_argument("--format", required=True, choices=("coco", "cvat", "labelstudio", "qupath"))
    il.add_argument("--out", required=True, help="labels table to write (.parquet)")
    il.add_argument(
        "--run", help="the run's output: match labels to its cells (by cell_id, else IoU >= 0.5)"
    )
    il.add_argument("--endpoint-url", help="S3-compatible endpoint")
    il.set_defaults(func=_cmd_import_labels)
