"""``hemaray bench io | pipeline | detector | placement | gpu``: speed measured side by side in one run."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from batch.cli.common import print_result
from batch.config import DETECT_RUNTIMES

__all__ = ["add_commands"]


def _cmd_bench(args: argparse.Namespace) -> int:
    import tempfile

    from batch.bench import bench_io
    from batch.synth import synth_slides

    with tempfile.TemporaryDirectory(prefix="hemaray-bench-") as tmp:
        # The slide under test is a synthetic smear (realistic JPEG tiles), generated here.
        print(f"generating a {args.width} x {args.height} synthetic smear ...", file=sys.stderr)
        (slide,) = synth_slides(tmp, slides=1, width=args.width, height=args.height, seed=args.seed)
        result = bench_io(slide_path=slide, regions=args.regions, seed=args.seed, workdir=tmp)
    print_result(result, args.json)
    return 0


def _cmd_bench_detector(args: argparse.Namespace) -> int:
    from batch.bench import bench_detector

    print("bench detector: exporting (first use only) and timing each runtime ...", file=sys.stderr)
    result = bench_detector(
        width=args.width, height=args.height, seed=args.seed, max_tiles=args.tiles,
        runtimes=tuple(args.runtimes.split(",")) if args.runtimes else None, device=args.device,
    )  # fmt: skip
    print_result(result, args.json)
    return 0


def _cmd_bench_placement(args: argparse.Namespace) -> int:
    from batch.bench.placement import bench_placement

    print(f"bench placement: {args.runtime} detector actors x threads ...", file=sys.stderr)
    result = bench_placement(runtime=args.runtime, max_tiles=args.tiles)
    print_result(result, args.json)
    return 0


def _cmd_bench_gpu(args: argparse.Namespace) -> int:
    from batch.bench.gpu import bench_gpu

    print("bench gpu: looking for a CUDA device ...", file=sys.stderr)
    result, code = bench_gpu(pipeline=not args.no_pipeline, max_tiles=args.tiles)
    print_result(result, args.json)
    return code


def _cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from batch.bench import bench_pipeline

    print(
        "bench pipeline: generating slides, running hemaray run four times, timing the bare detector "
        "three times in the run's runtime and three in torch (~20 min on 2 cores) ...",
        file=sys.stderr,
    )
    result = bench_pipeline(
        width=args.width, height=args.height, seed=args.seed, gpu=args.gpu, runtime=args.runtime
    )
    print_result(result, args.json)
    return 0


def add_commands(sub: Any) -> None:
    """Register this module's subcommands on the ``hemaray`` parser's subparsers."""
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
    bp.add_argument(
        "--runtime", choices=DETECT_RUNTIMES,
        help="detect.runtime of the run and its bare detector (default: the config's, auto)",
    )  # fmt: skip
    bp.set_defaults(func=_cmd_bench_pipeline)
    bd = bsub.add_parser(
        "detector", help="detector tiles/s per inference runtime on the same tiles, and parity"
    )
    bd.add_argument("--json", action="store_true")
    bd.add_argument(
        "--runtimes",
        help="comma-separated (default on cpu: torch,onnxruntime,openvino,openvino-int8; "
        "on cuda: torch,tensorrt)",
    )
    bd.add_argument("--device", default="cpu", help="cpu or cuda:N")
    bd.add_argument("--tiles", type=int, default=48, help="at most this many tiles")
    bd.add_argument("--width", type=int, default=4096, help="width of the generated smear")
    bd.add_argument("--height", type=int, default=4096, help="height of the generated smear")
    bd.add_argument("--seed", type=int, default=0)
    bd.set_defaults(func=_cmd_bench_detector)
    bpl = bsub.add_parser(
        "placement", help="detector actors x threads per runtime, as a CPU run places them"
    )
    bpl.add_argument("--json", action="store_true")
    bpl.add_argument("--runtime", default="openvino", choices=DETECT_RUNTIMES[1:])
    bpl.add_argument("--tiles", type=int, default=48, help="at most this many tiles")
    bpl.set_defaults(func=_cmd_bench_placement)
    bg = bsub.add_parser(
        "gpu",
        help="detector (torch fp16 vs TensorRT fp16) and pipeline comparisons on this host's GPU",
        description="Exit code: 0 measured; 3 no CUDA device (the JSON says why; nothing measured).",
    )
    bg.add_argument("--json", action="store_true")
    bg.add_argument("--tiles", type=int, default=96, help="tiles of the detector comparison")
    bg.add_argument(
        "--no-pipeline", action="store_true", help="detector comparison only (skip hemaray run)"
    )
    bg.set_defaults(func=_cmd_bench_gpu)
