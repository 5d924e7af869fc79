"""The ``hemaray`` command: parses arguments and calls the package. No logic here.

Every subcommand's parser lives here, the cluster ones (``submit``, ``jobs``) too;
each ``_cmd_*`` imports what it calls lazily, so ``hemaray --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from batch.errors import HemarayError

__all__ = ["main", "build_parser", "add_cluster_commands"]

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
        args.uri, storage_options=_storage_options(args), max_pixels=config.slides.max_pixels,
        max_pages=config.slides.max_pages,
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
    from batch.run.ledger import EXIT_RUN_FAILED, summary_lines
    from batch.run.pipeline import run_pipeline

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

    from batch.eval.run import evaluate_run
    from batch.run.sink import read_table

    opts = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else None
    cells = read_table(args.out, "cells", storage_options=opts).to_pandas()
    truth = pd.read_parquet(args.truth, storage_options=opts)
    result = evaluate_run(cells, truth, iou=args.iou)
    if args.json:
        _print_json(result)
    else:
        print(json.dumps(result, indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from batch.analytics.command import report_command

    return report_command(args.outs, by=args.by, html=args.html, crops=args.crops,
                          as_json=args.json, storage_options=_storage_options(args))  # fmt: skip


def _cmd_export(args: argparse.Namespace) -> int:
    from batch.export import ExportOptions, export_run

    opts = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else None
    summary = export_run(
        args.out,
        args.to,
        ExportOptions(
            format=args.format,
            select=args.select,
            classes=args.classes.split(",") if args.classes else None,
            slides=args.slides.split(",") if args.slides else None,
            seed=args.seed,
            field_px=args.field_px,
            url_prefix=args.url_prefix,
        ),
        storage_options=opts,
    )
    _print_json(summary)
    return 0


def _cmd_import_labels(args: argparse.Namespace) -> int:
    from batch.export.importer import import_labels

    opts = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else None
    table = import_labels(args.files, args.format, args.out, run=args.run, storage_options=opts)
    matches = table.column("match").to_pylist()
    _print_json(
        {"out": args.out, "rows": table.num_rows}
        | {f"matched_{m}": matches.count(m) for m in ("id", "iou", "new")}
    )
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


def _cmd_bench_detector(args: argparse.Namespace) -> int:
    from batch.bench import bench_detector

    print("bench detector: exporting (first use only) and timing each runtime ...", file=sys.stderr)
    result = bench_detector(
        width=args.width, height=args.height, seed=args.seed, max_tiles=args.tiles,
        runtimes=tuple(args.runtimes.split(",")) if args.runtimes else None,
    )  # fmt: skip
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
        from batch.eval.synthetic import eval_synthetic

        result = eval_synthetic(
            load_config(args.config, list(args.set)), seed=args.seed, slides=args.slides,
            width=args.size, height=args.size, kind=args.kind, progress=progress,
        )  # fmt: skip
        print(file=sys.stderr)
    elif args.what == "detector":
        from batch.eval.detector import eval_detector

        result = eval_detector(
            args.data, args.model, mpp=args.mpp, split=args.split, max_images=args.limit,
            runtime=args.runtime,
        )  # fmt: skip
    elif args.what == "classifier":
        from batch.eval.classifier import eval_classifier

        result = eval_classifier(args.data, args.model or "all_subtype", limit_per_class=args.limit)
    else:
        from batch.eval.images import eval_images

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


# --- cluster commands (hemaray submit, hemaray jobs) --------------------------------------


def _cmd_submit(args: argparse.Namespace) -> int:
    from batch.cluster.jobs import EXIT_INTERRUPTED
    from batch.cluster.submit import load_runtime_env, parse_env_items, submit_job

    command = list(args.job_argv)
    if command and command[0] == "--":
        command = command[1:]
    try:
        job = submit_job(
            args.address,
            command,
            runtime_env=load_runtime_env(args.runtime_env),
            wait=args.wait,
            ship_code=not args.no_code,
            env_vars=parse_env_items(args.env),
            submission_id=args.submission_id,
            entrypoint_num_cpus=args.entrypoint_num_cpus,
            entrypoint_num_gpus=args.entrypoint_num_gpus,
            auth_token_file=args.auth_token_file,
        )
    except KeyboardInterrupt:
        print(
            "hemaray submit: stopped following; the job keeps running "
            "(hemaray jobs status / logs / stop)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(f"hemaray submit: job {job.job_id}: {job.entrypoint}", file=sys.stderr)
    if not args.wait:
        print(job.job_id)
        return 0
    print(f"hemaray submit: job {job.job_id} {job.status} (exit {job.exit_code})", file=sys.stderr)
    return int(job.exit_code or 0)


def _fmt_time(ms: Any) -> str:
    import time

    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ms) / 1000))


def _cmd_jobs(args: argparse.Namespace) -> int:
    from batch.cluster.jobs import job_logs, job_status, list_jobs, stop_job

    action = args.action
    auth = {"auth_token_file": args.auth_token_file}
    if action == "list":
        jobs = list_jobs(args.address, **auth)
        if args.json:
            print(json.dumps(jobs, default=str))
            return 0
        for j in jobs:
            jid = j.get("submission_id") or j.get("job_id")
            print(
                f"{jid}\t{j['status']}\t{_fmt_time(j.get('start_time'))}\t"
                f"{_fmt_time(j.get('end_time'))}\t{j.get('entrypoint', '')}"
            )
        return 0
    if action == "status":
        details = job_status(args.address, args.job_id, **auth)
        if args.json:
            print(json.dumps(details, default=str))
        else:
            for key in ("submission_id", "status", "message", "entrypoint", "driver_exit_code"):
                print(f"{key:>16}: {details.get(key)}")
            print(f"{'start':>16}: {_fmt_time(details.get('start_time'))}")
            print(f"{'end':>16}: {_fmt_time(details.get('end_time'))}")
        return 0
    if action == "logs":
        text = job_logs(args.address, args.job_id, follow=args.follow, **auth)
        sys.stdout.write(text)
        return 0
    stopped = stop_job(args.address, args.job_id, **auth)
    print(f"job {args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


SUBMIT_EPILOG = """\
examples:
  hemaray submit --address http://127.0.0.1:8265 -- run s3://slides/cohort/ --out s3://results/cohort \\
      --endpoint-url http://minio:9000
  hemaray submit --address http://127.0.0.1:8265 --wait -- jobs/sweep_detector.py --data s3://det/bccd \\
      --out s3://results/sweep --sizes n,s --epochs 30
  hemaray jobs logs --address http://127.0.0.1:8265 --follow raysubmit_XXXX

Everything after -- is the command the job runs (python -m batch ARGS, or python SCRIPT.py ARGS).
The project folder is uploaded as the job's working_dir (no .venv, .git, caches, outputs, tests,
files over 25 MiB); --no-code runs the hemaray installed in the cluster image instead. The
cluster's Python must have hemaray's dependencies (k8s/Dockerfile). Credentials never travel with
a job: the cluster gives them to its pods (k8s/secret.example.yaml); secret-looking variables are
removed from --env and --runtime-env, and a command line holding a local secret is refused.
A cluster with Ray token authentication (RAY_AUTH_MODE=token, as k8s/ sets up) needs
--auth-token-file FILE; the token goes in an HTTP header, never into the job.
With --wait the exit code is the job's: 0 succeeded, the driver's exit code if it failed
(hemaray run: 2 = some slides failed), 1 failed otherwise, 3 stopped."""


def add_cluster_commands(subparsers: Any) -> None:
    """Register ``submit`` and ``jobs`` on the ``hemaray`` command's subparsers."""
    auth_help = "file with the cluster's Ray auth token (clusters run with RAY_AUTH_MODE=token)"
    address_help = "Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)"
    s = subparsers.add_parser(
        "submit",
        help="run a hemaray command or job script on a Ray cluster (Ray Jobs API)",
        description="Submit a hemaray command (run, a jobs/ script, ...) to a Ray cluster as a Ray job.",
        epilog=SUBMIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="hemaray submit [--address URL] [--wait] [--runtime-env FILE] [options] -- COMMAND ...",
    )
    s.add_argument("--address", help=address_help)
    s.add_argument("--auth-token-file", metavar="FILE", help=auth_help)
    s.add_argument(
        "--wait", action="store_true", help="stream the job's logs; exit with the job's outcome"
    )
    s.add_argument(
        "--runtime-env",
        metavar="FILE",
        help="YAML/JSON Ray runtime environment merged into hemaray's (secret env_vars removed)",
    )
    s.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a non-secret environment variable for the job (repeatable)",
    )
    s.add_argument(
        "--no-code",
        action="store_true",
        help="upload nothing: run the hemaray installed on the cluster (the k8s image)",
    )
    s.add_argument("--submission-id", help="job id to use (default: chosen by Ray)")
    s.add_argument(
        "--entrypoint-num-cpus", type=float, help="CPUs reserved for the job's driver (default 0)"
    )
    s.add_argument(
        "--entrypoint-num-gpus",
        type=float,
        help="GPUs reserved for the driver (a training script that trains in its driver)",
    )
    s.add_argument(
        "job_argv",
        nargs=argparse.REMAINDER,
        metavar="COMMAND",
        help="after --: a hemaray command (run ...) or a job script (jobs/NAME.py ...)",
    )
    s.set_defaults(func=_cmd_submit)

    j = subparsers.add_parser(
        "jobs",
        help="list, inspect, follow or stop Ray jobs on a cluster",
        description="Manage Ray jobs on a cluster through its Jobs API.",
        epilog="examples:\n  hemaray jobs list --address http://127.0.0.1:8265\n"
        "  hemaray jobs status --address http://127.0.0.1:8265 raysubmit_XXXX\n"
        "  hemaray jobs logs --address http://127.0.0.1:8265 --follow raysubmit_XXXX\n"
        "  hemaray jobs stop --address http://127.0.0.1:8265 raysubmit_XXXX",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--address", help=address_help)
    conn.add_argument("--auth-token-file", metavar="FILE", help=auth_help)
    actions = j.add_subparsers(dest="action", required=True, metavar="{list,status,logs,stop}")
    jl = actions.add_parser("list", parents=[conn], help="every job: id, status, start, end, command")
    jl.add_argument("--json", action="store_true", help="print one JSON list")
    js = actions.add_parser("status", parents=[conn], help="one job's status, message and exit code")
    js.add_argument("job_id", help="the job's submission id")
    js.add_argument("--json", action="store_true", help="print one JSON object")
    jg = actions.add_parser("logs", parents=[conn], help="one job's logs")
    jg.add_argument("job_id", help="the job's submission id")
    jg.add_argument("--follow", action="store_true", help="stream until the job ends")
    jt = actions.add_parser("stop", parents=[conn], help="stop a running job")
    jt.add_argument("job_id", help="the job's submission id")
    j.set_defaults(func=_cmd_jobs)


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
        "--runtime", default="torch", choices=["torch", "onnxruntime", "openvino"],
        help="detector: inference runtime (exported once into the model cache)",
    )  # fmt: skip
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
        "--format", required=True,
        choices=("coco", "cvat", "imagefolder", "labelstudio", "qupath", "yolo"),
    )
    x.add_argument("--to", required=True, help="export folder (local)")
    x.add_argument(
        "--select",
        help="least-confident:N | margin:N | random:N | stratified:N (per slide and label); default: all",
    )
    x.add_argument("--classes", help="comma-separated detector classes or labels, e.g. WBC or blast")
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
        "import-labels", help="annotation tool files (QuPath, COCO, Label Studio, CVAT) into a labels table"
    )
    il.add_argument("files", nargs="+", help="the tool's files (QuPath: <slide_id>.geojson)")
    il.add_argument("--format", required=True, choices=("coco", "cvat", "labelstudio", "qupath"))
    il.add_argument("--out", required=True, help="labels table to write (.parquet)")
    il.add_argument(
        "--run", help="the run's output: match labels to its cells (by cell_id, else IoU >= 0.5)"
    )
    il.add_argument("--endpoint-url", help="S3-compatible endpoint")
    il.set_defaults(func=_cmd_import_labels)

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
    bd = bsub.add_parser(
        "detector", help="detector tiles/s per inference runtime on the same tiles, and parity"
    )
    bd.add_argument("--json", action="store_true")
    bd.add_argument("--runtimes", help="comma-separated (default: torch,onnxruntime,openvino)")
    bd.add_argument("--tiles", type=int, default=48, help="at most this many tiles")
    bd.add_argument("--width", type=int, default=4096, help="width of the generated smear")
    bd.add_argument("--height", type=int, default=4096, help="height of the generated smear")
    bd.add_argument("--seed", type=int, default=0)
    bd.set_defaults(func=_cmd_bench_detector)
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
