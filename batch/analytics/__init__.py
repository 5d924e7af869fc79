"""Tables over run outputs, the ``hemaray report`` figures and the static review site.

What lives here:

- ``source``: opens one or more run outputs (local or ``s3://``) as a DuckDB
  connection over Arrow datasets (no DuckDB extensions), with the counted-WBC
  gate of `batch.calls` applied while streaming.
- ``tables``: per-slide counts, WBC differential, blast fraction (Wilson
  interval), ALL call, morphometrics per WBC type, confidence histograms,
  failures by stage and error type.
- ``cohort``: per-slide metrics grouped by a slide-metadata column; difference
  of medians with a bootstrap interval and a rank test per metric.
- ``plots``: matplotlib PNGs of those tables.
- ``site``: the self-contained HTML review site (index, per-slide pages,
  thumbnails with WBC marks, galleries of crops read from the slides).
- ``report``: builds every table at once, prints them, renders them as JSON.
- ``command``: what ``hemaray report`` runs (the CLI only parses and dispatches).

It may import ``run`` (reading outputs), ``slides``, ``stages``, ``calls``,
``config``, ``schemas``; never ``train``, ``eval``, ``export`` or ``cli``.
"""

from batch.analytics.report import Report, build_report, format_report, report_json
from batch.analytics.source import RunOutputs, open_outputs

__all__ = ["Report", "RunOutputs", "build_report", "format_report", "open_outputs", "report_json"]
