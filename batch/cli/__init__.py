"""The ``hemaray`` command: parses arguments and calls the package. No logic here.

One module per group of subcommands, each with its ``add_commands(sub)``:
`slides` (synth, info, thumbnail, plan), `run` (run, eval, evaluate),
`outputs` (report, export, import-labels), `bench`, `cluster` (submit, jobs);
`common` holds what they share. Each command imports what it calls lazily,
so ``hemaray --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from batch.cli import bench, cluster, outputs, run, slides
from batch.cli.cluster import add_cluster_commands
from batch.errors import HemarayError

__all__ = ["main", "build_parser", "add_cluster_commands"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hemaray",
        description="Distributed batch processing of blood-smear and bone-marrow slides.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)
    for module in (slides, run, outputs, bench, cluster):
        module.add_commands(sub)
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
