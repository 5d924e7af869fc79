"""Detector stage, model files and detection metrics.

The geometry of ``CellDetector`` (resampling, padding, mapping back, colour
order) is checked exactly with a subclass whose network is a fake; the
shipped weights are checked on synthetic smears from ``batch.synth``.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from batch.config import DetectConfig
from batch.errors import ModelLoadError
from batch.eval.detector import eval_detector
from batch.eval.metrics import (
    average_precision,
    box_iou,
    detection_errors,
    detection_metrics,
    match_detections,
)
from batch.models import (
    CARD_KEY,
    DEFAULT_DETECTOR,
    ModelCard,
    file_sha256,
    read_model_card,
    resolve_model,
    write_model_card,
)
from batch.stages.detect import (
    PAD_VALUE,
    STRIDE,
    CellDetector,
    Detections,
    estimate_mpp_from_rbc,
    load_detector,
    normalize_class_name,
)
from batch.stages.device import select_device

SYNTH_MPP = 0.25
#: Fake network output: one box, in the pixels of the (resampled, padded) batch image.
FAKE_BOX = np.array([[10.0, 20.0, 40.0, 50.0]], dtype=np.float32)


# ----------------------------------------------------------------------------- helpers


class FakeNetDetector(CellDetector):
    """A ``CellDetector`` whose network returns ``FAKE_BOX`` and records its inputs."""

    def _load(self) -> tuple[Any, list[str]]:
        self.seen: list[list[npt.NDArray[np.uint8]]] = []
        return None, ["RBC", "WBC", "Platelets"]

    def _predict(
        self, batch: list[npt.NDArray[np.uint8]], conf: float, per_class: bool = False
    ) -> list[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
        self.seen.append(batch)
        return [
            (FAKE_BOX.copy(), np.array([2], np.int64), np.array([0.9], np.float32)) for _ in batch
        ]


@pytest.fixture()
def fake_weights(tmp_path: Path) -> Path:
    """A weights file (bytes irrelevant) with a card saying trained at 0.25 um/px."""
    weights = tmp_path / "fake.pt"
    weights.write_bytes(b"not a real checkpoint")
    card = ModelCard(name="fake", task="detect", class_names=["RBC", "WBC", "platelet"],
                     trained_mpp=0.25)
    (tmp_path / "fake.json").write_text(json.dumps(card.to_dict()))
    return weights


@pytest.fixture(scope="module")
def synth_field(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 320x256 synthetic smear at 0.25 um/px with its ground truth."""
    import cv2
    import pandas as pd

    from batch.synth import synth_slides

    out = tmp_path_factory.mktemp("synth")
    (path,) = synth_slides(out, slides=1, width=320, height=256, seed=7, mpp=SYNTH_MPP,
                           format="png")
    gt = pd.read_parquet(out / "ground_truth.parquet")
    rgb = cv2.imread(str(path))[..., ::-1].copy()
    return {
        "rgb": rgb,
        "boxes": gt[["x0", "y0", "x1", "y1"]].to_numpy(np.float64),
        "classes": [normalize_class_name(c) for c in gt["class"]],
    }


@pytest.fixture(scope="module")
def shipped() -> CellDetector:
    return load_detector(device="cpu")


# ----------------------------------------------------------------------------- scale


def test_estimate_mpp_from_rbc_is_diameter_over_median() -> None:
    boxes = np.array([[0, 0, 30, 28], [50, 50, 80, 80], [100, 10, 128, 40], [5, 5, 8, 8]], float)
    classes = ["RBC", "rbc", "RBC", "Platelets"]
    assert estimate_mpp_from_rbc(boxes, classes) == pytest.approx(7.5 / 30)
    ids = np.array([0, 0, 0, 2])
    assert estimate_mpp_from_rbc(boxes, ids, names=["RBC", "WBC", "platelet"]) == pytest.approx(
        0.25
    )
    assert estimate_mpp_from_rbc(boxes[:2], classes[:2]) is None  # fewer than 3 RBCs
    with pytest.raises(ValueError, match="names"):
        estimate_mpp_from_rbc(boxes, ids)


def test_estimate_mpp_drops_cells_cut_by_the_border() -> None:
    inner = [[10 + 40 * i, 10, 40 + 40 * i, 40] for i in range(4)]  # 30 px
    cut = [[0, 50, 12, 80], [0, 90, 10, 120], [188, 50, 200, 70]]  # cut by the edges
    boxes = np.array(inner + cut, float)
    assert estimate_mpp_from_rbc(boxes, ["RBC"] * 7, image_shape=(200, 200)) == pytest.approx(0.25)


def test_estimate_mpp_on_synthetic_ground_truth(synth_field: dict[str, Any]) -> None:
    est = estimate_mpp_from_rbc(synth_field["boxes"], synth_field["classes"],
                                image_shape=synth_field["rgb"].shape[:2])
    assert est == pytest.approx(SYNTH_MPP, rel=0.1)


def test_normalize_class_name() -> None:
    assert [normalize_class_name(n) for n in ("Platelets", "rbc", "White Blood Cell", "WBC")] == [
        "platelet", "RBC", "WBC", "WBC"
    ]
    assert normalize_class_name(" blast ") == "blast"


# ----------------------------------------------------------------------------- geometry


def test_detect_resamples_pads_and_maps_back(fake_weights: Path) -> None:
    det = FakeNetDetector(fake_weights, device="cpu", batch_size=8)
    assert det.class_names == ("RBC", "WBC", "platelet")
    assert det.trained_mpp == 0.25
    tile = np.zeros((100, 200, 3), np.uint8)
    tile[..., 0] = 255  # red in RGB
    small = np.zeros((30, 40, 3), np.uint8)
    (a, b) = det.detect([tile, small], [0.125, 0.25])
    # 0.125 -> 0.25 halves the tile (100 x 50); the batch pads to multiples of 32.
    (batch,) = det.seen
    assert {im.shape for im in batch} == {(64, 128, 3)}
    assert all(im.shape[0] % STRIDE == 0 and im.shape[1] % STRIDE == 0 for im in batch)
    assert tuple(batch[0][0, 0]) == (0, 0, 255)  # handed over as BGR
    assert tuple(batch[0][-1, -1]) == (PAD_VALUE,) * 3  # padding bottom / right only
    np.testing.assert_allclose(a.boxes, FAKE_BOX * 2)  # back in the 0.125 um/px tile's pixels
    np.testing.assert_allclose(b.boxes, [[10, 20, 40, 30]])  # same scale; clipped to 40 x 30
    assert list(a.labels) == ["platelet"] and a.scores[0] == pytest.approx(0.9)


def test_detect_without_mpp_does_not_resample(fake_weights: Path) -> None:
    det = FakeNetDetector(fake_weights, device="cpu", batch_size=2)
    tiles = [np.full((70, 90, 3), 200, np.uint8) for _ in range(3)]
    out = det.detect(tiles)
    assert len(out) == 3 and len(det.seen) == 2  # batches of 2
    assert det.seen[0][0].shape == (96, 96, 3)
    np.testing.assert_allclose(out[2].boxes, FAKE_BOX)


def test_detect_validates_inputs(fake_weights: Path) -> None:
    det = FakeNetDetector(fake_weights, device="cpu")
    with pytest.raises(ValueError, match="RGB uint8"):
        det.detect([np.zeros((10, 10), np.uint8)])
    with pytest.raises(ValueError, match="mpp values"):
        det.detect([np.zeros((10, 10, 3), np.uint8)], [0.25, 0.5])
    with pytest.raises(ValueError, match="mpp must be > 0"):
        det.detect([np.zeros((10, 10, 3), np.uint8)], 0.0)


def test_device_and_half_selection(fake_weights: Path) -> None:
    import torch

    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert select_device("auto") == expected
    det = FakeNetDetector(fake_weights)  # device="auto", half="auto"
    assert det.device == expected
    assert det.half == expected.startswith("cuda")
    assert det.max_det == DetectConfig.max_det >= 1000
    assert FakeNetDetector(fake_weights, device="cpu", half=True).half is True


# ----------------------------------------------------------------------------- model files


def test_resolve_model_local_and_hash(fake_weights: Path) -> None:
    assert resolve_model(fake_weights) == fake_weights
    assert resolve_model(f"file://{fake_weights}") == fake_weights
    digest = file_sha256(fake_weights)
    assert resolve_model(fake_weights, sha256=digest) == fake_weights
    with pytest.raises(ModelLoadError, match="SHA-256"):
        resolve_model(fake_weights, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(fake_weights.parent / "missing.pt")


def test_resolve_model_from_s3_caches_weights_and_card(
    s3: dict[str, Any], fake_weights: Path, tmp_path: Path
) -> None:
    fs = s3["fs"]
    fs.put(str(fake_weights), f"{s3['bucket']}/models/fake.pt")
    fs.put(str(fake_weights.with_suffix(".json")), f"{s3['bucket']}/models/fake.json")
    uri = f"s3://{s3['bucket']}/models/fake.pt"
    local = resolve_model(uri, storage_options=s3["storage_options"], cache_dir=tmp_path / "c")
    assert local.read_bytes() == fake_weights.read_bytes()
    card = read_model_card(local)
    assert card is not None and card.trained_mpp == 0.25
    fetched = local.stat().st_mtime_ns  # cached: the same object (ETag) is not fetched again
    assert resolve_model(uri, storage_options=s3["storage_options"], cache_dir=tmp_path / "c") == local
    assert local.stat().st_mtime_ns == fetched
    fs.rm(f"{s3['bucket']}/models/fake.pt")  # revalidated: a deleted object fails, cached or not
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(uri, storage_options=s3["storage_options"], cache_dir=tmp_path / "c")


def test_card_embedded_in_checkpoint_round_trips(tmp_path: Path) -> None:
    import torch

    weights = tmp_path / "m.pt"
    torch.save({"model": None, "epoch": -1}, weights)
    card = ModelCard(name="m", task="detect", class_names=list(("RBC", "WBC", "platelet")),
                     trained_mpp=0.3, notes=["n"])
    sidecar = write_model_card(card, weights)
    assert json.loads(sidecar.read_text())["sha256"] == file_sha256(weights)
    assert "Research use" in weights.with_suffix(".md").read_text()
    sidecar.unlink()  # the checkpoint alone still knows its scale
    back = read_model_card(weights)
    assert back is not None and back.trained_mpp == 0.3 and back.notes == ["n"]
    assert torch.load(weights, weights_only=False)[CARD_KEY]["name"] == "m"


# ----------------------------------------------------------------------------- metrics


def test_box_iou() -> None:
    iou = box_iou([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(iou, [[1.0, 1 / 3, 0.0]])


def test_match_is_greedy_by_confidence_and_class_aware() -> None:
    gt = np.array([[0, 0, 10, 10]], float)
    preds = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 10]], float)
    tp = match_detections(preds, [0, 0, 1], [0.5, 0.9, 0.99], gt, [0], iou_thresholds=[0.5, 0.95])
    # The 0.9 box comes first among class 0 and takes the GT at 0.5 (IoU 0.9) but not at 0.95.
    assert tp.tolist() == [[False, True], [True, False], [False, False]]


def test_average_precision_cases() -> None:
    assert average_precision([True, True], [0.9, 0.8], 2) == pytest.approx(1.0)
    assert average_precision([True], [0.9], 2) == pytest.approx(51 / 101)  # recall 0.5
    # TP, FP, TP over 2 GT: envelope 1 up to recall 0.5, 2/3 up to 1.
    assert average_precision([True, False, True], [0.9, 0.8, 0.7], 2) == pytest.approx(
        (51 * 1.0 + 50 * 2 / 3) / 101
    )
    assert average_precision([], [], 3) == 0.0


def test_average_precision_agrees_with_ultralytics() -> None:
    from ultralytics.utils.metrics import ap_per_class

    rng = np.random.default_rng(0)
    n, n_gt = 200, 120
    tp = rng.random((n, 10)) < np.linspace(0.8, 0.3, 10)
    conf = rng.random(n)
    ours = np.mean([average_precision(tp[:, t], conf, n_gt) for t in range(10)])
    res = ap_per_class(tp, conf, np.zeros(n), np.zeros(n_gt))
    theirs = float(res[5].mean())  # ap (nc, 10)
    assert ours == pytest.approx(theirs, abs=0.01)  # 101-point sum vs trapezoid


def test_detection_metrics_perfect_and_empty() -> None:
    gt = (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([0, 2]))
    pred = (gt[0], gt[1], np.array([0.9, 0.8]))
    m = detection_metrics([pred], [gt], ["RBC", "WBC", "platelet"])
    assert m["map50"] == m["map50_95"] == m["precision"] == m["recall"] == m["f1"] == 1.0
    assert m["per_class"]["WBC"]["ap50"] is None and m["per_class"]["WBC"]["n_gt"] == 0
    m0 = detection_metrics([(np.zeros((0, 4)), [], [])], [gt], ["RBC", "WBC", "platelet"])
    assert m0["map50"] == 0.0 and m0["recall"] == 0.0 and m0["n_images"] == 1


def test_detection_metrics_operating_threshold() -> None:
    gt = (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([0, 0]))
    pred = (np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], float),
            np.array([0, 0, 0]), np.array([0.9, 0.1, 0.8]))
    m = detection_metrics([pred], [gt], ["RBC"], conf=0.25)
    c = m["per_class"]["RBC"]
    assert (c["precision"], c["recall"], c["n_pred"]) == (0.5, 0.5, 2)
    assert c["ap50"] == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_ap_on_every_class_a_box_scores() -> None:
    """A WBC whose box the network calls RBC (0.6) but also scores WBC (0.3): the WBC AP counts it
    at 0.3 (``candidates``); the run's one label per box misses it at any threshold."""
    names = ["RBC", "WBC"]
    gt = (np.array([[0, 0, 40, 40], [100, 100, 108, 108]], float), np.array([1, 0]))
    one_label = (gt[0], np.array([0, 0]), np.array([0.6, 0.9]))
    every = (np.concatenate([gt[0], gt[0][:1]]), np.array([0, 0, 1]), np.array([0.6, 0.9, 0.3]))
    m = detection_metrics([one_label], [gt], names, conf=0.25, candidates=[every])
    wbc, rbc = m["per_class"]["WBC"], m["per_class"]["RBC"]
    assert wbc["ap50"] == 1.0 and wbc["ap50_one_label"] == 0.0
    assert (wbc["recall"], wbc["n_pred"], rbc["precision"]) == (0.0, 0, 0.5)  # the operating point
    assert rbc["ap50"] == rbc["ap50_one_label"] == 1.0  # the false RBC box ranks below the true
    assert (m["map50"], m["map50_one_label"]) == (1.0, 0.5)
    assert "map50_one_label" not in detection_metrics([one_label], [gt], names)
    with pytest.raises(ValueError, match="candidate sets"):
        detection_metrics([one_label], [gt], names, candidates=[])


# ----------------------------------------------------------------------------- shipped weights


def test_shipped_detector_has_card(shipped: CellDetector) -> None:
    assert shipped.weights_path == DEFAULT_DETECTOR
    assert shipped.class_names == ("RBC", "WBC", "platelet")
    assert shipped.trained_mpp is not None and shipped.card is not None
    assert "not for clinical diagnosis" in shipped.card.intended_use
    assert shipped.card.data_sources and shipped.card.metrics


def test_shipped_detector_finds_synthetic_cells(
    shipped: CellDetector, synth_field: dict[str, Any]
) -> None:
    rgb = synth_field["rgb"]
    (det,) = shipped.detect([rgb], SYNTH_MPP)
    assert isinstance(det, Detections)
    assert det.boxes.dtype == np.float32 and det.boxes.shape[1] == 4
    assert (det.boxes[:, [0, 2]] <= rgb.shape[1]).all() and (det.boxes[:, [1, 3]] <= rgb.shape[0]).all()
    gt_rbc = np.asarray(synth_field["boxes"])[np.asarray(synth_field["classes"]) == "RBC"]
    found = det.boxes[det.labels == "RBC"]
    recall = (box_iou(gt_rbc, found).max(axis=1) >= 0.5).mean() if len(found) else 0.0
    assert recall > 0.5


def test_a_slow_nms_keeps_every_tiles_boxes(
    shipped: CellDetector, synth_field: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a busy machine no tile loses its cells to ultralytics' NMS time limit.

    Ultralytics' NMS gives up after 2 s + 50 ms per image and returns the
    images it had not reached without boxes; hemaray's detector runs it to the
    end. Here every reading of NMS's clock is a minute after the last.
    """
    from ultralytics.utils import nms

    rgb = synth_field["rgb"]
    clock = iter(range(0, 10**9, 60))
    monkeypatch.setattr(nms, "time", types.SimpleNamespace(time=lambda: float(next(clock))))
    dets = shipped.detect([rgb] * 3, SYNTH_MPP)
    assert [len(d.boxes) > 0 for d in dets] == [True, True, True]
    # Ultralytics' own limit, on the same clock, drops the tiles after the first.
    monkeypatch.setattr(nms, "non_max_suppression", nms.non_max_suppression.__wrapped__)
    limited = shipped.detect([rgb] * 3, SYNTH_MPP)
    assert [len(d.boxes) > 0 for d in limited] == [True, False, False]


def test_shipped_detector_is_scale_aware(shipped: CellDetector, synth_field: dict[str, Any]) -> None:
    """The same field at twice the resolution gives the same cells at twice the coordinates."""
    import cv2

    rgb = synth_field["rgb"]
    big = cv2.resize(rgb, (rgb.shape[1] * 2, rgb.shape[0] * 2), interpolation=cv2.INTER_LINEAR)
    base, up = shipped.detect([rgb, big], [SYNTH_MPP, SYNTH_MPP / 2])
    assert abs(len(up) - len(base)) <= 0.1 * len(base) + 2
    iou = box_iou(base.boxes * 2, up.boxes)
    assert (iou.max(axis=1) >= 0.7).mean() > 0.8
    est = shipped.estimate_mpp(big)
    assert est == pytest.approx(SYNTH_MPP / 2, rel=0.2)


def test_detection_errors_lists_each_missed_label_and_false_box() -> None:
    names = ["RBC", "WBC", "platelet"]
    gt = (np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]], float),
          np.array([0, 1, 0, 2]))
    pred = (
        np.array([
            [0, 0, 10, 10],  # RBC on the RBC: right
            [20, 20, 30, 29],  # RBC on the WBC (IoU 0.9): the WBC is missed, this box is false
            [40, 40, 50, 50],  # WBC on the second RBC at 0.1, under the operating threshold
            [80, 80, 90, 90],  # platelet on nothing: false, nothing near
        ], float),
        np.array([0, 0, 1, 2]),
        np.array([0.9, 0.8, 0.1, 0.6]),
    )  # fmt: skip
    errors = detection_errors([pred], [gt], names, conf=0.25)
    got = {(e["kind"], e["class"], tuple(e["box"])): e for e in errors}
    assert set(got) == {
        ("missed", "WBC", (20, 20, 30, 30)),
        ("missed", "RBC", (40, 40, 50, 50)),  # its only box scored under 0.25
        ("missed", "platelet", (60, 60, 70, 70)),
        ("false", "RBC", (20, 20, 30, 29)),
        ("false", "platelet", (80, 80, 90, 90)),
    }
    assert got["missed", "WBC", (20, 20, 30, 30)]["nearest"] == {"class": "RBC", "iou": 0.9,
                                                                 "score": 0.8}
    assert got["false", "RBC", (20, 20, 30, 29)]["nearest"] == {"class": "WBC", "iou": 0.9,
                                                                "score": None}
    assert got["false", "RBC", (20, 20, 30, 29)]["score"] == 0.8
    assert got["missed", "RBC", (40, 40, 50, 50)]["nearest"] is None  # the 0.1 box is not kept
    assert got["false", "platelet", (80, 80, 90, 90)]["nearest"] is None
    assert {e["image"] for e in errors} == {0}
    # The counts agree with detection_metrics' precision and recall at the same threshold.
    m = detection_metrics([pred], [gt], names, conf=0.25)["per_class"]
    assert m["RBC"]["recall"] == 0.5 and m["RBC"]["precision"] == 0.5
    assert detection_errors([(np.zeros((0, 4)), [], [])], [gt], names)[0]["kind"] == "missed"
    assert detection_errors([pred], [(np.zeros((0, 4)), np.zeros(0, int))], names, conf=0.25)[
        0]["kind"] == "false"


def test_eval_detector_on_a_voc_set(shipped: CellDetector, synth_field: dict[str, Any],
                                    tmp_path: Path) -> None:
    import cv2

    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets").mkdir()
    cv2.imwrite(str(root / "JPEGImages" / "a.png"), synth_field["rgb"][..., ::-1])
    objs = "".join(
        f"<object><name>{'Platelets' if c == 'platelet' else c}</name><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for b, c in zip(synth_field["boxes"], synth_field["classes"], strict=True)
    )
    (root / "Annotations" / "a.xml").write_text(f"<annotation><filename>a.png</filename>{objs}</annotation>")
    (root / "ImageSets" / "val.txt").write_text("a\n")
    m = eval_detector(root, shipped, mpp=SYNTH_MPP)
    assert m["split"] == "val" and m["n_images"] == 1
    assert "errors" not in m
    for key in ("map50", "map50_95", "precision", "recall", "f1"):
        assert 0.0 <= m[key] <= 1.0
    assert set(m["per_class"]) == {"RBC", "WBC", "platelet"}
    assert set(m["per_class"]["RBC"]) >= {"ap50", "ap50_95", "precision", "recall", "f1"}
    assert m["per_class"]["RBC"]["ap50"] > 0.3
    assert m["model_sha256"] == shipped.sha256

    # A label turned wrong: an RBC the detector finds, labelled WBC. With errors_dir the run lists
    # it twice (a missed WBC label, a false RBC box, each naming the other) and draws the sheets.
    import cv2

    first = eval_detector(root, shipped, mpp=SYNTH_MPP, errors_dir=tmp_path / "errors0")
    missed0 = json.loads((tmp_path / "errors0" / "errors.json").read_text())
    assert first["per_class"] == m["per_class"]
    found = [
        i for i, (b, c) in enumerate(zip(synth_field["boxes"], synth_field["classes"], strict=True))
        if c == "RBC" and not any(x["kind"] == "missed" and x["box"] == [round(float(v), 2) for v in b]
                                  for x in missed0)
    ]  # fmt: skip
    k = found[len(found) // 2]
    classes = list(synth_field["classes"])
    classes[k] = "WBC"
    objs = "".join(
        f"<object><name>{'Platelets' if c == 'platelet' else c}</name><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for b, c in zip(synth_field["boxes"], classes, strict=True)
    )
    (root / "Annotations" / "a.xml").write_text(f"<annotation><filename>a.png</filename>{objs}</annotation>")
    out = tmp_path / "errors"
    e = eval_detector(root, shipped, mpp=SYNTH_MPP, errors_dir=out)
    listed = json.loads((out / "errors.json").read_text())
    box = np.asarray(synth_field["boxes"][k], float)
    [missed] = [x for x in listed if x["kind"] == "missed" and x["class"] == "WBC"]
    assert box_iou([missed["box"]], [box])[0, 0] > 0.99
    assert missed["nearest"]["class"] == "RBC" and missed["nearest"]["iou"] >= 0.5
    [false] = [x for x in listed if x["kind"] == "false" and x["class"] == "RBC"
               and box_iou([x["box"]], [box])[0, 0] >= 0.5]
    assert false["nearest"]["class"] == "WBC" and false["score"] == missed["nearest"]["score"]
    # Everything else is as before: the one relabelled box adds exactly these two errors.
    key = lambda x: (x["kind"], x["class"], tuple(x["box"]))  # noqa: E731
    assert {key(x) for x in listed} == {key(x) for x in missed0} | {key(missed), key(false)}
    assert {x["path"] for x in listed} == {str(root / "JPEGImages" / "a.png")}
    assert e["errors"]["WBC"] == {"missed": 1, "false": 0}
    assert sum(c["missed"] + c["false"] for c in e["errors"].values()) == len(listed)
    sheets = sorted(p.name for p in out.glob("*.png"))
    assert sheets == sorted({f"{x['class']}_{x['kind']}.png" for x in listed})
    sheet = cv2.imread(str(out / "WBC_missed.png"))
    assert sheet is not None and sheet.shape == (192, 8 * 192, 3)


def test_predict_keeps_the_processes_torch_threads() -> None:
    """ultralytics' first CPU predict sets torch to cpu_count - 1 threads; the detector undoes it."""
    import torch

    before = torch.get_num_threads()
    wanted = (os.cpu_count() or 1) + 2  # never what ultralytics would pick
    torch.set_num_threads(wanted)
    try:
        fresh = load_detector(device="cpu")  # a new model: its first predict sets the device up
        fresh.detect([np.full((64, 64, 3), 230, np.uint8)])
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


def test_ultralytics_first_import_keeps_stdout_clean(tmp_path: Path) -> None:
    """On a fresh machine ultralytics' first import announces its new settings file; not on stdout.

    ``--json`` commands print one JSON object on stdout, so that line (and every
    later ultralytics log line) goes to stderr.
    """
    import subprocess
    import sys

    env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "fresh")}
    code = (
        "from batch.models import DEFAULT_DETECTOR, load_yolo; "
        "load_yolo(DEFAULT_DETECTOR, task='detect')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert "Settings" in done.stderr  # the first import did write its settings file, and said so
    assert done.stdout == ""


def test_keep_uncontained_drops_wbc_boxes_inside_better_ones() -> None:
    from batch.stages.detect import keep_uncontained

    boxes = np.array(
        [
            [0, 0, 40, 40],  # a neutrophil, 0.6
            [5, 5, 30, 30],  # a lobe cluster inside it, 0.4: dropped
            [38, 0, 78, 40],  # the next WBC, touching (5 % of it overlaps): kept
            [100, 100, 110, 110],  # a small box, 0.9 ...
            [95, 95, 130, 130],  # ... inside this larger, lower-scoring one: the larger goes
            [2, 2, 20, 20],  # an RBC inside the neutrophil: not a WBC, kept
        ],
        dtype=np.float64,
    )
    scores = np.array([0.6, 0.4, 0.5, 0.9, 0.3, 0.8], np.float32)
    wbc = np.array([True, True, True, True, True, False])
    assert keep_uncontained(boxes, scores, wbc, 0.7).tolist() == [True, False, True, True, False, True]
    # 0.7 of the smaller box: the lobe is 25 x 25 inside, 100 %; at a threshold above that, kept.
    assert keep_uncontained(boxes[:2], scores[:2], wbc[:2], 1.0).tolist() == [True, False]
    half_in = np.array([[0, 0, 40, 40], [20, 0, 60, 40]], np.float64)  # half of each in the other
    assert keep_uncontained(half_in, scores[:2], wbc[:2], 0.7).all()
    assert not keep_uncontained(half_in, scores[:2], wbc[:2], 0.5).all()


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["auto", "torch"])
def test_a_neutrophil_is_one_wbc_row(runtime: str, tmp_path: Path) -> None:
    """The synthetic blood slides where NMS kept lobe clusters inside their neutrophils.

    On slide 3 of seed 31 the shipped detector boxes several neutrophils twice
    (a lobe cluster inside the whole cell, IoU ~0.6; in one, two lobe clusters
    and no whole cell, overlapping 0.55 of the smaller); ``detect.wbc_contained``
    keeps one row per cell, and 0 shows the duplicates are there to remove. In
    the default runtime (INT8) and in PyTorch, whose boxes differ a little.
    """
    import pandas as pd
    import pyarrow as pa

    from batch.config import load_config
    from batch.run.local import chain_cells
    from batch.synth import synth_slides

    paths = synth_slides(tmp_path, slides=4, width=4096, height=4096, seed=31, kind="blood")
    truth = pd.read_parquet(tmp_path / "ground_truth.parquet")
    wbcs = truth[(truth.slide_id == "slide_0003") & (truth["class"] == "WBC")]

    def hits(contained: float) -> list[int]:
        config = load_config(None, [f"detect.wbc_contained={contained}", f"detect.runtime={runtime}"])
        cells = pa.concat_tables([t for _, t in chain_cells([paths[3]], config)]).to_pandas()
        out: list[int] = []
        for c in cells[cells.det_class == "WBC"].itertuples():
            cx, cy = (c.x0 + c.x1) / 2, (c.y0 + c.y1) / 2
            inside = wbcs[(wbcs.x0 <= cx) & (cx <= wbcs.x1) & (wbcs.y0 <= cy) & (cy <= wbcs.y1)]
            out += inside.object_id.tolist()
        return out

    before, after = hits(0.0), hits(DetectConfig.wbc_contained)
    assert len(before) - len(set(before)) >= 3  # cells boxed twice without the rule
    assert len(after) == len(set(after)) and set(after) == set(before)
