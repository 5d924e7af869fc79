"""`hemaray report` over a real 3-slide run, and its review site in a real headless Chromium.

The figures the page and the JSON show are checked against counts computed
here straight from the Parquet with pyarrow. The browser test needs Debian's
``chromium`` (``.ci/run`` installs it) and the ``playwright`` package; without
them only that test is skipped, saying why.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from batch.analytics.cohort import bootstrap_median_difference
from batch.analytics.site import CROPS_PER_CLASS
from batch.calls import counted_wbcs, wilson_interval
from batch.cli import main
from batch.config import CallsConfig, load_config
from batch.inputs import SlideInput
from batch.run import ledger
from batch.run.pipeline import run_pipeline
from batch.synth import synth_slides

SIDE = 1024
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_echo(
    tmp_path_factory: pytest.TempPathFactory, ray_local: None
) -> tuple[Path, list[str]]:
    """Two blood smears (group control), one leukemic smear (group leukemia), one corrupt file.

    Progress lines are asked for at every batch (``PROGRESS_SECONDS`` 0); the echoed lines
    are kept.
    """
    root = tmp_path_factory.mktemp("report")
    synth_slides(root / "blood", slides=2, width=SIDE, height=SIDE, seed=3, kind="blood")
    synth_slides(root / "leuk", slides=1, width=SIDE, height=SIDE, seed=4, kind="leukemia",
                 blast_fraction=0.6)  # fmt: skip
    (root / "bad.tif").write_bytes(b"II*\x00" + b"\x00" * 60)
    slides = [
        SlideInput(str(root / "blood/slide_0000.tif"), "blood_0", {"group": "control"}),
        SlideInput(str(root / "blood/slide_0001.tif"), "blood_1", {"group": "control"}),
        SlideInput(str(root / "leuk/slide_0000.tif"), "leuk_0", {"group": "leukemia"}),
        SlideInput(str(root / "bad.tif"), "bad_0", {"group": "leukemia"}),
    ]
    out = root / "out"
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ledger, "PROGRESS_SECONDS", 0.0)
        result = run_pipeline(slides, str(out), load_config(None), echo=lines.append)
    assert sorted(result.committed) == ["blood_0", "blood_1", "leuk_0"]
    assert list(result.failed) == ["bad_0"]
    return out, lines


@pytest.fixture(scope="module")
def run_out(run_echo: tuple[Path, list[str]]) -> Path:
    return run_echo[0]


@pytest.fixture(scope="module")
def cells(run_out: Path) -> pa.Table:
    return pads.dataset(run_out / "cells", format="parquet", partitioning="hive").to_table()


@pytest.fixture(scope="module")
def report(run_out: Path) -> tuple[Path, dict[str, Any], str]:
    site = run_out.parent / "site"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["report", str(run_out), "--by", "group", "--html", str(site), "--json"])
    assert code == 0, buf.getvalue()
    text = buf.getvalue()
    return site, json.loads(text.strip().splitlines()[-1]), text


def _truth(cells: pa.Table) -> dict[str, dict[str, Any]]:
    """Per slide, straight from the Parquet: detections per class, counted WBCs per type, blasts."""
    out: dict[str, dict[str, Any]] = {}
    gate = counted_wbcs(cells, CallsConfig())
    for sid in sorted(set(cells.column("slide_id").to_pylist())):
        mine = pc.equal(cells.column("slide_id"), sid).to_numpy(zero_copy_only=False)
        t = cells.filter(pa.array(mine))
        counted = cells.filter(pa.array(mine & gate))
        classes = t.column("det_class").to_pylist()
        types = counted.column("wbc_type_label").to_pylist()
        out[str(sid)] = {
            "n_rbc": classes.count("RBC"),
            "n_wbc": classes.count("WBC"),
            "n_platelet": classes.count("platelet"),
            "counted": counted,
            "n_blasts": sum(t == "blast" for t in types),
        }
    return out


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    assert wilson_interval(0, 10)[0] == 0.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_bootstrap_difference_brackets_the_shift() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(10, 1, 200), rng.normal(13, 1, 200)
    d, lo, hi = bootstrap_median_difference(a, b)
    assert lo < d < hi and lo > 2.5 and hi < 3.5


def test_report_json_matches_parquet(
    report: tuple[Path, dict[str, Any], str], cells: pa.Table, run_out: Path
) -> None:
    _, obj, text = report
    truth = _truth(cells)
    rows = {r["slide_id"]: r for r in obj["slides"]}
    assert set(truth) == {"blood_0", "blood_1", "leuk_0"}
    assert set(rows) == set(truth) | {"bad_0"}
    assert rows["bad_0"]["status"] == "failed" and rows["bad_0"]["n_failures"] >= 1
    failures = pads.dataset(run_out / "failures", format="parquet").to_table()
    by_stage = {(f["stage"], f["error_type"]): f["attempts"] for f in obj["failures"]}
    assert sum(by_stage.values()) == failures.num_rows >= 1
    for sid, t in truth.items():
        r = rows[sid]
        assert (r["n_rbc"], r["n_wbc"], r["n_platelet"]) == (t["n_rbc"], t["n_wbc"], t["n_platelet"])
        assert r["n_wbc_counted"] == t["counted"].num_rows
        assert r["n_blasts"] == t["n_blasts"]
        if t["counted"].num_rows:  # the slides table's blast fraction: blasts / counted leukocytes
            assert r["blast_fraction"] == pytest.approx(t["n_blasts"] / t["counted"].num_rows)
            assert r["ci_low"] <= r["blast_fraction"] <= r["ci_high"]
        diff = {d["wbc_type"]: d["n"] for d in obj["differential"] if d["slide_id"] == sid}
        labels = [v for v in t["counted"].column("wbc_type_label").to_pylist() if v is not None]
        assert diff == {k: labels.count(k) for k in set(labels)}
    # the cohort: both groups, a rank test and an interval per metric
    assert obj["by"] == "group"
    assert {c["group"] for c in obj["cohort"]} == {"control", "leukemia"}
    comp = {c["metric"]: c for c in obj["comparison"]}
    assert {"blast_fraction", "n_wbc_counted"} <= set(comp)
    assert comp["n_wbc_counted"]["test"] == "mann_whitney_u"
    assert "== slides ==" in text and "group comparison by group" in text
    # the run: its tiles are the committed slides' tiles; the timeline ends there
    slides = pads.dataset(run_out / "slides", format="parquet").to_table().to_pylist()
    [run] = obj["runs"]
    assert run["tiles"] == sum(r["tiles_done"] or 0 for r in slides) > 0
    assert (run["committed"], run["failed"]) == (3, 1)
    [manifest] = [json.loads(p.read_text()) for p in run_out.glob("runs/*/manifest.json")]
    timeline = np.asarray(manifest["timeline"])
    assert timeline[0].tolist() == [0, 0, 0, 0, 0]
    assert timeline[-1, 1:].tolist() == [run["tiles"], cells.num_rows, 3, 1]
    assert (np.diff(timeline, axis=0) >= 0).all()  # time, tiles, cells and slides only grow


def test_progress_lines_while_running(run_echo: tuple[Path, list[str]]) -> None:
    """With a progress interval of 0, a line per batch: tiles, tiles/s and slides so far."""
    _, lines = run_echo
    progress = [ln for ln in lines if ln.startswith("progress: ")]
    assert progress, lines
    last = progress[-1]
    assert "tiles/s" in last and "of 4" in last


def test_two_outputs_one_on_s3_give_the_same_report(
    report: tuple[Path, dict[str, Any], str], run_out: Path, s3: dict[str, Any], tmp_path: Path
) -> None:
    """The run split in two outputs, the second on S3: the same figures as the one output."""
    parts = {"a": ["blood_0", "blood_1"], "b": ["leuk_0", "bad_0"]}
    for name, ids in parts.items():
        dst = tmp_path / name
        shutil.copytree(run_out / "runs", dst / "runs")
        (dst / "slides").mkdir(parents=True)
        for sid in ids:
            if (run_out / f"cells/slide_id={sid}").exists():
                shutil.copytree(run_out / f"cells/slide_id={sid}", dst / f"cells/slide_id={sid}")
            shutil.copy(run_out / f"slides/{sid}.parquet", dst / "slides")
            for f in (run_out / "failures").glob(f"{sid}.*.parquet"):
                (dst / "failures").mkdir(exist_ok=True)
                shutil.copy(f, dst / "failures")
    s3["fs"].put(str(tmp_path / "b"), f"{s3['bucket']}/runb", recursive=True)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["report", str(tmp_path / "a"), f"s3://{s3['bucket']}/runb", "--by", "group",
                     "--json", "--endpoint-url", s3["endpoint"]])  # fmt: skip
    assert code == 0
    two = json.loads(buf.getvalue().strip().splitlines()[-1])
    _, one, _ = report
    for key in ("slides", "differential", "morphometrics", "confidence", "failures", "comparison"):
        assert two[key] == one[key], key


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable on PATH (apt-get install chromium)")
def test_review_site_in_headless_chromium(
    report: tuple[Path, dict[str, Any], str], cells: pa.Table
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    site, _, _ = report
    truth = _truth(cells)
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("request", lambda r: requests.append(r.url))

        def load(name: str, *, images: bool = True) -> None:
            page.goto((site / name).as_uri())
            page.wait_for_load_state("load")
            broken = page.evaluate(
                "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                ".map(i => i.getAttribute('src'))"
            )
            assert broken == [], f"{name}: images that did not load: {broken}"
            assert (page.evaluate("document.images.length") > 0) == images

        load("index.html")
        shown = page.evaluate(
            """Array.from(document.querySelectorAll('#slides tbody tr')).map(tr => {
                 const o = {slide: tr.dataset.slideId};
                 tr.querySelectorAll('td').forEach(td => o[td.dataset.col] = td.innerText.trim());
                 return o; })"""
        )
        assert {s["slide"] for s in shown} == set(truth) | {"bad_0"}
        for s in shown:
            if s["slide"] == "bad_0":
                assert s["status"] == "failed" and int(s["n_failures"]) >= 1
                continue
            t = truth[s["slide"]]
            for col in ("n_rbc", "n_wbc", "n_platelet"):
                assert int(s[col]) == t[col], (s["slide"], col)
            assert int(s["n_wbc_counted"]) == t["counted"].num_rows
            assert s["status"] == "committed"
        # sorting by a column reorders the rows
        page.click("#slides th[data-col=n_rbc]")
        order = page.evaluate(
            "Array.from(document.querySelectorAll('#slides tbody tr')).map(tr => tr.dataset.slideId)"
        )
        rbc = {k: v["n_rbc"] for k, v in truth.items()} | {"bad_0": 0}
        assert order == sorted(rbc, key=lambda k: rbc[k])
        # --by group: the cohort section compares the groups on the page too
        text = page.inner_text("body")
        assert "Cohort by group" in text and "Group comparison" in text
        assert "mann_whitney_u" in text and "leukemia" in text and "control" in text

        tiles_done = {
            r["slide_id"]: r["tiles_done"]
            for r in pads.dataset(site.parent / "out/slides", format="parquet").to_table().to_pylist()
        }
        for sid, t in truth.items():
            load(f"slide-{sid}.html")
            assert int(page.inner_text("#n-counted")) == t["counted"].num_rows
            # the outlined analysed area is the run's own tile plan
            assert int(page.inner_text("#n-analysed-tiles")) == tiles_done[sid]
        load("slide-bad_0.html", images=False)
        assert page.inner_text("#n-counted") == "0"
        # the gallery of the leukemic slide's most frequent type: exactly its crops, least confident first
        counted = truth["leuk_0"]["counted"]
        labels = counted.column("wbc_type_label").to_pylist()
        top = max(set(labels) - {None}, key=labels.count)
        of_type = counted.filter(pc.equal(counted.column("wbc_type_label"), top))
        conf = of_type.column("wbc_type_confidence").to_numpy()
        ids = np.asarray(of_type.column("cell_id").to_pylist())
        expected = list(ids[np.lexsort((ids, conf))][:CROPS_PER_CLASS])
        load("slide-leuk_0.html")
        figs = page.evaluate(
            f"""Array.from(document.querySelectorAll('.gallery[data-wbc-type="{top}"] figure'))
                .map(f => [f.dataset.cellId, f.dataset.label])"""
        )
        assert [f[0] for f in figs] == expected
        assert {f[1] for f in figs} == {top}
        browser.close()
    assert requests and all(u.startswith("file://") for u in requests), [
        u for u in requests if not u.startswith("file://")
    ]
