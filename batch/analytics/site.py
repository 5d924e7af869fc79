"""The static review site: ``index.html`` (one row per slide, sortable; run-wide plots,
cohort tables) and one ``slide-<id>.html`` per slide (thumbnail with every WBC marked by
type, differential with its cell count, morphometric violins, a gallery per WBC type).

Self-contained: inline CSS and a few lines of inline JS, images as PNG files in
``img/`` beside the pages, relative links only; no server and no network
request, so it opens from ``file://`` and from a copied folder. Gallery crops
are read from the slides at report time with the pipeline's crop geometry
(`batch.stages.crop.crop_regions` with the run's ``segmentation.crop_margin``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from batch.analytics.plots import (
    plot_blast_by_group,
    plot_confidence,
    plot_differential,
    plot_morphometrics,
    plot_throughput,
    plot_thumbnail_marks,
    type_colours,
)
from batch.analytics.report import Report
from batch.analytics.source import RunOutputs
from batch.analytics.tables import MORPHOMETRICS
from batch.errors import HemarayError
from batch.slides import open_slide
from batch.stages.crop import crop_regions
from batch.tiling import plan_tiles

__all__ = ["write_site", "CROPS_PER_CLASS", "THUMBNAIL_SIZE", "VIOLIN_SAMPLE_ROWS"]

#: Gallery crops per WBC type per slide (least confident first).
CROPS_PER_CLASS = 12
#: Longest side of a slide thumbnail (px).
THUMBNAIL_SIZE = 1024
#: Rows sampled for the run-wide violins (a reservoir sample keeps memory bounded).
VIOLIN_SAMPLE_ROWS = 50_000

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#eee;cursor:pointer;user-select:none}
td.t,th.t{text-align:left}
.bar{display:flex;width:180px;height:14px;border:1px solid #999}
.bar span{display:block;height:100%}
.legend span{display:inline-block;margin-right:10px;font-size:12px}
.legend i{display:inline-block;width:11px;height:11px;margin-right:3px;vertical-align:middle}
.gallery{display:flex;flex-wrap:wrap;gap:6px}
figure.crop{margin:0;width:150px;font-size:11px;border:1px solid #ddd;padding:3px}
figure.crop img{width:144px;height:144px;object-fit:contain;background:#f4f4f4}
figure.crop code{word-break:break-all}
img.plot{max-width:100%}
code{font-size:11px}
"""

SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, i){
  th.addEventListener('click', function(){
    var tb = th.closest('table').tBodies[0], rows = Array.from(tb.rows);
    var asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
    rows.sort(function(a, b){
      var x = a.cells[i].dataset.value, y = b.cells[i].dataset.value;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
      return asc ? c : -c;
    });
    rows.forEach(function(r){ tb.appendChild(r); });
  });
});
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _page(title: str, body: str, *, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{CSS}</style></head><body>{body}{js}</body></html>\n"
    )


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float | np.floating):
        return f"{v:.{digits}f}"
    return str(v)


def _bar(fractions: dict[str, float], colours: dict[str, str]) -> str:
    spans = "".join(
        f'<span style="width:{100 * f:.2f}%;background:{colours.get(t, "grey")}" title="{_e(t)} {f:.1%}"></span>'
        for t, f in sorted(fractions.items())
    )
    return f'<div class="bar">{spans}</div>'


def _legend(colours: dict[str, str]) -> str:
    items = "".join(f'<span><i style="background:{c}"></i>{_e(t)}</span>' for t, c in colours.items())
    return f'<div class="legend">{items}</div>'


def _table(df: pd.DataFrame, *, cls: str = "") -> str:
    head = "".join(f'<th class="t">{_e(c)}</th>' for c in df.columns)
    rows = "".join(
        "<tr>" + "".join(f'<td data-value="{_e(v)}">{_e(_fmt(v))}</td>' for v in r) + "</tr>"
        for r in df.itertuples(index=False)
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _img(src: str, alt: str) -> str:
    return f'<img class="plot" src="{_e(src)}" alt="{_e(alt)}">'


def _index(rep: Report, colours: dict[str, str], plots: dict[str, str]) -> str:
    s = rep.summary()
    fr = {
        sid: dict(zip(g.wbc_type, g.fraction, strict=True))
        for sid, g in rep.differential.groupby("slide_id")
    }
    meta = [rep.by] if rep.by and rep.by in s.columns else []
    cols = [("slide_id", "slide"), *[(m, m) for m in meta], ("status", "status"),
            ("tiles_done", "tiles done"), ("tiles_planned", "tiles planned"), ("n_rbc", "RBC"),
            ("n_wbc", "WBC"), ("n_platelet", "platelets"), ("n_wbc_counted", "counted WBCs"),
            ("differential", "differential"), ("blast_fraction", "blast fraction (95% CI)"),
            ("all_subtype_call", "ALL call"), ("n_failures", "failures")]  # fmt: skip
    head = "".join(f'<th class="t" data-col="{c}">{_e(label)}</th>' for c, label in cols)
    rows = []
    for r in s.to_dict(orient="records"):
        sid = str(r["slide_id"])
        cells = []
        for c, _ in cols:
            v = r.get(c)
            if c == "slide_id":
                txt = f'<a href="slide-{_e(sid)}.html">{_e(sid)}</a>'
            elif c == "differential":
                d = fr.get(sid, {})
                v = max(d, key=lambda k: d[k]) if d else ""
                txt = _bar(d, colours)
            elif c == "blast_fraction":
                txt = f"{_fmt(v)} [{_fmt(r.get('ci_low'))}, {_fmt(r.get('ci_high'))}]"
            else:
                txt = _e(_fmt(v))
            cells.append(f'<td data-col="{c}" data-value="{_e(_fmt(v))}">{txt}</td>')
        rows.append(f'<tr data-slide-id="{_e(sid)}">{"".join(cells)}</tr>')
    body = [
        "<h1>hemaray review</h1>",
        f"<p>{len(s)} slide(s). Counts are detections; the differential, blast fraction and "
        "ALL call count only the WBCs that vote in the slide's calls (README: calls gate). "
        "Click a column header to sort.</p>",
        _legend(colours),
        f'<table class="sortable" id="slides"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>',
    ]
    if rep.by is not None:
        body += [f"<h2>Cohort by {_e(rep.by)}</h2>", _img(plots["blast_by_group"], "blast fraction by group"),
                 "<h3>Per group (median, quartiles)</h3>", _table(rep.cohort),
                 "<h3>Group comparison</h3>", _table(rep.comparison)]  # fmt: skip
    body += [
        "<h2>WBC differential</h2>", _img(plots["differential"], "WBC differential"),
        "<h2>Morphometrics per WBC type</h2>", _img(plots["morphometrics"], "morphometrics"),
        _table(rep.morphometrics[["wbc_type", "metric", "unit", "n", "median", "q1", "q3", "iqr"]]),
        "<h2>Confidence</h2>", _img(plots["confidence"], "confidence histograms"),
        "<h2>Failures by stage and error type</h2>",
        _table(rep.failures) if len(rep.failures) else "<p>none</p>",
        "<h2>Runs</h2>", _table(rep.runs.drop(columns=["out"], errors="ignore")),
    ]  # fmt: skip
    if "throughput" in plots:
        body.append(_img(plots["throughput"], "tiles done and tiles per second over each run"))
    return _page("hemaray review", "".join(body), script=SORT_JS)


def _crop_png(slide: Any, box: tuple[float, float, float, float], margin: float, path: Path) -> None:
    x0, y0, x1, y1 = (int(v) for v in crop_regions([box], margin=margin)[0])
    rgb = slide.read_region(x0, y0, x1 - x0, y1 - y0, level=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))


def _slide_page(
    src: RunOutputs,
    rep: Report,
    row: dict[str, Any],
    colours: dict[str, str],
    out: Path,
    crops_per_class: int,
) -> str:
    sid = str(row["slide_id"])
    img = out / "img" / sid
    diff = rep.differential[rep.differential.slide_id == sid]
    n_counted = int(diff["n"].sum()) if len(diff) else 0
    wbcs = src.con.execute(
        "SELECT cx, cy, coalesce(wbc_type_label, 'unlabelled') AS wbc_type FROM cells "
        "WHERE slide_id = ? AND det_class = 'WBC'",
        [sid],
    ).df()
    values = src.con.execute(
        "SELECT coalesce(wbc_type_label, 'unlabelled') AS wbc_type, "
        + ", ".join(MORPHOMETRICS) + " FROM wbc WHERE slide_id = ?",
        [sid],
    ).df()
    gallery = src.con.execute(
        """SELECT * FROM (
             SELECT cell_id, x0, y0, x1, y1, coalesce(wbc_type_label, 'unlabelled') AS wbc_type,
                    wbc_type_confidence,
                    row_number() OVER (PARTITION BY coalesce(wbc_type_label, 'unlabelled')
                                       ORDER BY wbc_type_confidence ASC NULLS FIRST, cell_id) AS k
             FROM wbc WHERE slide_id = ?) WHERE k <= ? ORDER BY wbc_type, k""",
        [sid, crops_per_class],
    ).df()
    parts = [f'<p><a href="index.html">&larr; all slides</a></p><h1>{_e(sid)}</h1>',
             f"<p>status <b>{_e(row.get('status'))}</b>, tiles {_e(_fmt(row.get('tiles_done')))} / "
             f"{_e(_fmt(row.get('tiles_planned')))}, source <code>{_e(row.get('slide_uri'))}</code></p>"]  # fmt: skip
    uri = row.get("slide_uri")
    slide = None
    if isinstance(uri, str) and row.get("status") == "committed":
        try:
            slide = open_slide(uri, storage_options=src.storage_options)
        except (HemarayError, OSError) as e:
            parts.append(
                f"<p><b>The slide could not be read at report time</b> ({_e(type(e).__name__)}: "
                f"{_e(e)}): no thumbnail and no crops; the tables are complete.</p>"
            )
    try:
        if slide is not None:
            thumb = slide.thumbnail(THUMBNAIL_SIZE)
            scale = thumb.shape[1] / slide.info.width
            plan = plan_tiles(slide, src.tiling, slide_id=sid, target_mpp=src.detector_mpp)
            cores = [(t.core_x0, t.core_y0, t.core_x1, t.core_y1) for t in plan.tasks]
            plot_thumbnail_marks(thumb, scale, wbcs, colours, img / "thumbnail.png",
                                 f"{sid}: {len(wbcs)} WBCs marked by type", analysed=cores)  # fmt: skip
            note = ""
            if row.get("tiles_done") is not None and len(cores) != int(row["tiles_done"]):
                note = (f" (redrawn with the newest run's tiling: {len(cores)} tiles, the run "
                        f"analysed {_fmt(row['tiles_done'])})")  # fmt: skip
            parts.append(
                "<h2>Slide</h2>"
                f'<p>Dashed outline: the analysed area, <b id="n-analysed-tiles">{len(cores)}</b> '
                f"tiles; outside it the slide was skipped as background{_e(note)}.</p>"
                + _img(f"img/{sid}/thumbnail.png", "thumbnail with the analysed area and WBC marks")
            )
        parts.append(
            f'<h2>WBC differential</h2><p>Rests on <b id="n-counted">{n_counted}</b> counted WBCs.</p>'
            + _bar(dict(zip(diff.wbc_type, diff.fraction, strict=True)), colours)
            + _table(diff[["wbc_type", "n", "fraction"]], cls="differential")
        )
        if len(values):
            plot_morphometrics(values, colours, img / "morphometrics.png", f"{sid}: morphometrics")
            parts.append("<h2>Morphometrics</h2>" + _img(f"img/{sid}/morphometrics.png", "morphometrics"))
        parts.append(
            f"<h2>Gallery</h2><p>Per WBC type, least confident first, at most {crops_per_class}; "
            "crops read from the slide with the pipeline's crop geometry.</p>"
        )
        for t, g in gallery.groupby("wbc_type", sort=True):
            figs = []
            for r in g.itertuples(index=False):
                name = f"img/{sid}/crops/{r.cell_id}.png"
                pic = ""
                if slide is not None:
                    box = (float(r.x0), float(r.y0), float(r.x1), float(r.y1))  # type: ignore[arg-type]
                    _crop_png(slide, box, src.crop_margin, out / name)
                    pic = f'<img src="{_e(name)}" alt="{_e(r.cell_id)}">'
                figs.append(
                    f'<figure class="crop" data-cell-id="{_e(r.cell_id)}" data-label="{_e(t)}">'
                    f'{pic}<figcaption>{_e(t)} '
                    f"{_fmt(r.wbc_type_confidence)}<br><code>{_e(r.cell_id)}</code></figcaption></figure>"
                )
            n_type = int(diff.loc[diff.wbc_type == t, "n"].sum())
            parts.append(
                f'<h3>{_e(t)} ({n_type} counted; showing {len(g)})</h3>'
                f'<div class="gallery" data-wbc-type="{_e(t)}">{"".join(figs)}</div>'
            )
    finally:
        if slide is not None:
            slide.close()
    return _page(f"hemaray: {sid}", "".join(parts))


def write_site(
    src: RunOutputs,
    rep: Report,
    out_dir: str | Path,
    *,
    crops_per_class: int = CROPS_PER_CLASS,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the review site for ``rep`` into ``out_dir``; returns the index page's path."""
    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    types = sorted(set(rep.differential.wbc_type))
    colours = type_colours(types)
    sample = src.con.execute(
        "SELECT coalesce(wbc_type_label, 'unlabelled') AS wbc_type, " + ", ".join(MORPHOMETRICS)
        + f" FROM wbc USING SAMPLE reservoir({VIOLIN_SAMPLE_ROWS} ROWS) REPEATABLE (0)"
    ).df()
    plots = {
        "differential": plot_differential(rep.differential, colours, out / "img/differential.png"),
        "morphometrics": plot_morphometrics(sample, colours, out / "img/morphometrics.png",
                                            "Morphometrics per WBC type (counted WBCs)"),
        "confidence": plot_confidence(rep.confidence, out / "img/confidence.png"),
    }  # fmt: skip
    throughput = plot_throughput(src.runs, out / "img/throughput.png")
    if throughput is not None:
        plots["throughput"] = throughput
    if rep.by is not None:
        b = rep.blasts.merge(rep.slides[["slide_id", rep.by]], on="slide_id")
        plots["blast_by_group"] = plot_blast_by_group(b, rep.by, out / "img/blast_by_group.png")
    rel = {k: str(p.relative_to(out)) for k, p in plots.items()}
    index = out / "index.html"
    index.write_text(_index(rep, colours, rel), encoding="utf-8")
    for rec in rep.summary().to_dict(orient="records"):
        row = {str(k): v for k, v in rec.items()}
        if progress is not None:
            progress(f"slide page {row['slide_id']}")
        page = _slide_page(src, rep, row, colours, out, crops_per_class)
        (out / f"slide-{row['slide_id']}.html").write_text(page, encoding="utf-8")
    return index
