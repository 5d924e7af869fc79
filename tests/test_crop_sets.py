"""Crop sets for classifier training: labels from the truth, groups kept, sources combined."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from batch.train.crop_sets import CropSource, build_crop_set, crops_from_run


def _png(value: int) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((8, 8, 3), value, np.uint8))
    assert ok
    return bytes(buf.tobytes())


def test_run_crops_take_the_type_of_the_wbc_they_box(tmp_path: Path) -> None:
    truth = pd.DataFrame(
        {
            "slide_id": ["s"] * 4,
            "class": ["WBC", "WBC", "platelet", "platelet"],
            "wbc_type": ["eosinophil", "blast", None, None],
            "subtype": [None, "pro_b", None, None],
            "x0": [0, 200, 400, 410], "y0": [0, 0, 0, 0], "x1": [100, 300, 410, 420], "y1": [100, 100, 10, 10],
        }
    )  # fmt: skip
    cells = pd.DataFrame(
        {
            "slide_id": ["s"] * 6,
            "cell_id": [f"c{i}" for i in range(6)],
            "det_class": ["WBC"] * 5 + ["RBC"],
            # matched (IoU 0.81), tight box inside the blast, a clump on the platelets,
            # off every object, half on the eosinophil (ambiguous), and an RBC
            "x0": [0, 230, 400, 600, 80, 0], "y0": [0, 30, 0, 600, 0, 0],
            "x1": [90, 270, 420, 650, 120, 10], "y1": [90, 70, 10, 650, 40, 10],
            "crop_png": [_png(v) for v in range(6)],
        }
    )  # fmt: skip
    counts = crops_from_run(cells, truth, tmp_path, source="syn")
    assert counts == {"eosinophil": 1, "blast": 1, "platelet": 1, "other": 1}
    assert (tmp_path / "eosinophil" / "syn__c0.png").read_bytes() == _png(0)
    assert (tmp_path / "blast" / "syn__c1.png").exists()
    assert (tmp_path / "platelet" / "syn__c2.png").exists() and (
        tmp_path / "other" / "syn__c3.png"
    ).exists()
    groups = list(csv.DictReader((tmp_path / "groups.csv").read_text().splitlines()))
    assert {g["group"] for g in groups} == {"syn:s"} and len(groups) == 4

    # A subtype set: labels from another column; WBCs without one and artefacts are skipped.
    sub = crops_from_run(cells, truth, tmp_path / "sub", label_column="subtype", unmatched=None)
    assert sub == {"pro_b": 1}


def test_run_crops_are_resampled_to_the_sets_mpp(tmp_path: Path) -> None:
    """A run's crops are at their tile's pixel size; with ``target_mpp`` they come out at the set's.

    ``crop_mpp`` (per slide, `RunSource.crop_mpp`): 0.25 um/px for a slide read as is,
    0.125 for one the run upsampled 2x.
    """
    truth = pd.DataFrame(
        {"slide_id": ["s", "u"], "class": ["WBC", "WBC"], "wbc_type": ["blast", "monocyte"],
         "x0": [0, 200], "y0": [0, 0], "x1": [100, 300], "y1": [100, 100]}
    )  # fmt: skip
    cells = pd.DataFrame(
        {
            "slide_id": ["s", "u"], "cell_id": ["c0", "c1"], "det_class": ["WBC", "WBC"],
            "x0": [0, 200], "y0": [0, 0], "x1": [100, 300], "y1": [100, 100],
            "crop_png": [_png(10), _png(8)],
        }
    )  # fmt: skip
    crop_mpp = {"s": 0.25, "u": 0.125}
    crops_from_run(cells, truth, tmp_path, source="syn", target_mpp=0.2, crop_mpp=crop_mpp)
    blast = cv2.imread(str(tmp_path / "blast" / "syn__c0.png"))
    mono = cv2.imread(str(tmp_path / "monocyte" / "syn__c1.png"))
    assert blast.shape == (10, 10, 3) and (blast == 10).all()  # 0.25 -> 0.2 um/px: x1.25
    assert mono.shape == (5, 5, 3)  # 0.125 -> 0.2 um/px: x0.625
    crops_from_run(cells, truth, tmp_path / "as_cut", source="syn")
    assert cv2.imread(str(tmp_path / "as_cut" / "blast" / "syn__c0.png")).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="crop mpp"):
        crops_from_run(cells, truth, tmp_path / "x", target_mpp=0.2, crop_mpp={"s": 0.25})


def test_sources_are_cut_renamed_capped_and_grouped(tmp_path: Path) -> None:
    src = tmp_path / "weak"
    for folder in ("benign", "pro_b", "other"):
        (src / folder).mkdir(parents=True)
        for i in range(4):
            cv2.imwrite(
                str(src / folder / f"img{i}__wbc0.png"), np.full((20, 22, 3), 200, np.uint8)
            )
    with open(src / "groups.csv", "w") as f:
        f.write(
            "file,group\n"
            + "".join(
                f"{d}/img{i}__wbc0.png,{d}/img{i}.jpg\n"
                for d in ("benign", "pro_b", "other")
                for i in range(4)
            )
        )
    out = tmp_path / "set"
    lymph = CropSource(
        "all4",
        str(src),
        mpp=0.5,
        rename={"benign": "lymphocyte", "pro_b": ""},
        groups_csv=str(src / "groups.csv"),
        max_per_class=3,
    )
    blast = CropSource(
        "all4blast",
        str(src),
        mpp=0.5,
        rename={"benign": "", "other": "", "pro_b": "blast"},
        groups_csv=str(src / "groups.csv"),
        group_prefix="all4",
    )
    report = build_crop_set([lymph, blast], out, target_mpp=0.25)
    assert report["sources"]["all4"]["crops"] == {"lymphocyte": 3, "other": 3}
    assert report["sources"]["all4blast"]["crops"] == {"blast": 4}
    # resampled from 0.5 to 0.25 um/px: twice the size
    one = cv2.imread(str(next((out / "blast").iterdir())))
    assert one.shape[:2] == (40, 44)
    rows = csv.DictReader((out / "groups.csv").read_text().splitlines())
    groups = {r["file"]: r["group"] for r in rows}
    assert len(groups) == 10 and all(g.startswith("all4:") for g in groups.values())
    assert groups["blast/all4blast__pro_b__img0__wbc0.png"] == "all4:pro_b/img0.jpg"
    assert set(json.loads((out / "sources.json").read_text())["sources"]) == {"all4", "all4blast"}
