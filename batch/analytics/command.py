"""What ``hemaray report`` does once its arguments are parsed: open, build, print, write."""

from __future__ import annotations

import sys
from typing import Any

from batch.analytics.report import build_report, format_report, report_json
from batch.analytics.site import CROPS_PER_CLASS, write_site
from batch.analytics.source import open_outputs

__all__ = ["report_command"]


def _progress(msg: str) -> None:
    print(f"report: {msg}", file=sys.stderr)


def report_command(
    outs: list[str],
    *,
    by: str | None = None,
    html: str | None = None,
    crops: int = CROPS_PER_CLASS,
    as_json: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Print the report's tables (and its JSON as the last line); write the site to ``html``."""
    src = open_outputs(outs, storage_options=storage_options, progress=_progress)
    try:
        rep = build_report(src, by=by)
        if html:
            index = write_site(src, rep, html, crops_per_class=crops, progress=_progress)
            print(f"review site: {index}", file=sys.stderr)
        print(format_report(rep))
        if as_json:
            print(report_json(rep))
    finally:
        src.close()
    return 0
