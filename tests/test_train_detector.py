"""Detector training job: dataset reading, merging without leaks, packing, and a tiny offline run."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from batch.datasets.detection import LabeledImage, read_detection_dataset
from batch.eval.detector import eval_detector
from batch.stages.detect import DETECTOR_CLASSES, CellDetector
from batch.train.common import freeze_layers
from batch.train.detector import main
from batch.train.detector_data import image_mpps, merge_datasets, pack_images

SYNTH_MPP = 0.25
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _write_yolo(root: Path, split: str, name: str, rgb: np.ndarray, boxes: np.ndarray,
                classes: list[str], names: list[str]) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / "images" / split / f"{name}.png"), rgb[..., ::-1])
    h, w = rgb.shape[:2]
    lines = [
        f"{names.index('Platelets' if c == 'platelet' else c)} {(b[0] + b[2]) / 2 / w} {(b[1] + b[3]) / 2 / h} "
        f"{(b[2] - b[0]) / w} {(b[3] - b[1]) / h}"
        for b, c in zip(boxes, classes, strict=True)
    ]
    (root / "labels" / split / f"{name}.txt").write_text("\n".join(lines) + "\n")


def _write_voc(root: Path, split: str, name: str, rgb: np.ndarray, boxes: np.ndarray,
               classes: list[str], *, jpeg: bool = False) -> None:
    for sub in ("JPEGImages", "Annotations", "ImageSets"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    fname = f"{name}.jpg" if jpeg else f"{name}.png"
    cv2.imwrite(str(root / "JPEGImages" / fname), rgb[..., ::-1])
    objs = "".join(
        f"<object><name>{'Platelets' if c == 'platelet' else c}</name><bndbox>"
        f"<xmin>{b[0]:.0f}</xmin><ymin>{b[1]:.0f}</ymin><xmax>{b[2]:.0f}</xmax>"
        f"<ymax>{b[3]:.0f}</ymax></bndbox></object>"
        for b, c in zip(boxes, classes, strict=True)
    )
    (root / "Annotations" / f"{name}.xml").write_text(
        f"<annotation><filename>{fname}</filename>{objs}</annotation>"
    )
    with open(root / "ImageSets" / f"{split}.txt", "a") as fh:
        fh.write(name + "\n")


@pytest.fixture(scope="module")
def fields(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Four small synthetic smear fields (0.25 um/px) with ground truth."""
    import pandas as pd

    from batch.synth import synth_slides

    out = tmp_path_factory.mktemp("fields")
    paths = synth_slides(out, slides=4, width=256, height=192, seed=3, mpp=SYNTH_MPP, format="png")
    gt = pd.read_parquet(out / "ground_truth.parquet")
    result = []
    for p in paths:
        rows = gt[gt["slide_id"] == p.stem]
        result.append({
            "rgb": cv2.imread(str(p))[..., ::-1].copy(),
            "boxes": rows[["x0", "y0", "x1", "y1"]].to_numpy(np.float64),
            "classes": [str(c) for c in rows["class"]],
        })
    return result


@pytest.fixture(scope="module")
def two_sets(fields: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, Path]:
    """A YOLO set (train: fields 0, 1; val: 2) and a VOC set (train: a JPEG copy of field 2, field 3).

    The VOC set is twice the resolution of the YOLO set (0.125 um/px), and its
    copy of field 2 is validation data in the YOLO set, so it must not train.
    """
    root = tmp_path_factory.mktemp("sets")
    yolo, voc = root / "yolo", root / "voc"
    names = ["WBC", "RBC", "Platelets"]  # TXL-PBC's id order
    for i, split in ((0, "train"), (1, "train"), (2, "val")):
        f = fields[i]
        _write_yolo(yolo, split, f"f{i}", f["rgb"], f["boxes"], f["classes"], names)
    (yolo / "data.yaml").write_text("names:\n  0: WBC\n  1: RBC\n  2: Platelets\n")
    for i in (2, 3):
        f = fields[i]
        big = cv2.resize(f["rgb"], (f["rgb"].shape[1] * 2, f["rgb"].shape[0] * 2))
        _write_voc(voc, "train", f"BloodImage_{i:05d}", big, f["boxes"] * 2, f["classes"],
                   jpeg=True)
    return yolo, voc


def test_read_yolo_and_voc(two_sets: tuple[Path, Path], fields: list[dict[str, Any]]) -> None:
    yolo, voc = two_sets
    y = read_detection_dataset(yolo)
    assert sorted((im.path.stem, im.split) for im in y) == [("f0", "train"), ("f1", "train"),
                                                            ("f2", "val")]
    f0 = next(im for im in y if im.path.stem == "f0")
    assert set(f0.classes) <= set(DETECTOR_CLASSES)
    np.testing.assert_allclose(f0.boxes, fields[0]["boxes"], atol=1e-3)
    v = read_detection_dataset(voc)
    assert {im.source for im in v} == {"voc"} and {im.split for im in v} == {"train"}
    assert (v[0].width, v[0].height) == (512, 384)
    with pytest.raises(ValueError, match="not a detection dataset"):
        read_detection_dataset(yolo / "labels")


def test_merge_dedupes_and_keeps_validation_out(two_sets: tuple[Path, Path]) -> None:
    yolo, voc = two_sets
    merged = merge_datasets([read_detection_dataset(yolo), read_detection_dataset(voc)])
    assert sorted(im.path.stem for im in merged.val) == ["f2"]
    assert sorted(im.path.stem for im in merged.train) == ["BloodImage_00003", "f0", "f1"]
    assert merged.report["duplicates"] == 1
    assert merged.report["train_copies_dropped_because_validation_elsewhere"] == 1


def test_image_mpps_from_labelled_rbcs(two_sets: tuple[Path, Path]) -> None:
    yolo, voc = two_sets
    ims = read_detection_dataset(yolo) + read_detection_dataset(voc)
    mpps = dict(zip([im.path.stem for im in ims], image_mpps(ims), strict=True))
    assert mpps["f0"] == pytest.approx(SYNTH_MPP, rel=0.1)
    assert mpps["BloodImage_00003"] == pytest.approx(SYNTH_MPP / 2, rel=0.1)
    no_rbc = LabeledImage(ims[0].path, 256, 192, np.zeros((0, 4)), (), "yolo", "train")
    assert image_mpps([ims[0], no_rbc])[1] == pytest.approx(mpps["f0"])  # its group's median


def test_pack_images_moves_boxes_with_their_image() -> None:
    a = np.full((100, 150, 3), 10, np.uint8)
    b = np.full((120, 100, 3), 20, np.uint8)
    pieces = [(a, np.array([[0.0, 0, 10, 10]]), [0]), (b, np.array([[5.0, 5, 15, 15]]), [1])] * 3
    canvases = pack_images(pieces, 256, gap=4)
    assert all(c.shape == (256, 256, 3) for c, _, _ in canvases)
    assert sum(len(cls) for _, _, cls in canvases) == 6
    for canvas, boxes, classes in canvases:
        for (x0, y0, _, _), c in zip(boxes, classes, strict=True):
            value = 10 if c == 0 else 20
            ox, oy = (int(x0), int(y0)) if c == 0 else (int(x0) - 5, int(y0) - 5)
            assert canvas[oy, ox, 0] == value  # the box's image sits under it
    with pytest.raises(ValueError, match="tile it first"):
        pack_images([(np.zeros((300, 10, 3), np.uint8), np.zeros((0, 4)), [])], 256)


def test_freeze_strategies_of_seed_000() -> None:
    assert freeze_layers(23, "all") is None
    assert freeze_layers(23, "last10") == 13  # backbone 0-9 and neck 10-12 frozen
    assert freeze_layers(23, "last3") == 20  # only P5 block + Detect train
    with pytest.raises(ValueError, match="--freeze"):
        freeze_layers(23, "backbone")


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Refuse (and record) every non-loopback connection and name lookup."""
    attempts: list[str] = []
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            attempts.append(f"connect {address}")
            raise OSError(f"network blocked in tests: {address}")
        real_connect(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in LOOPBACK and host is not None:
            attempts.append(f"getaddrinfo {host}")
            raise socket.gaierror(f"network blocked in tests: {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts


@pytest.mark.slow
def test_tiny_training_offline(two_sets: tuple[Path, Path], tmp_path: Path,
                               no_network: list[str]) -> None:
    yolo, voc = two_sets
    out = tmp_path / "run"
    rc = main([
        "--data", str(yolo), "--data", str(voc), "--model", "yolov8n.yaml", "--epochs", "1",
        "--imgsz", "128", "--batch", "4", "--workers", "0", "--device", "cpu", "--synth-slides", "2",
        "--mpp", str(SYNTH_MPP),
        "--out", str(out),
    ])
    assert rc == 0
    assert no_network == []  # nothing even tried to reach the network
    weights = out / "detector.pt"
    assert weights.is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    for m in (metrics, metrics["sets"]["val"], metrics["sets"]["yolo/val"]):
        for key in ("map50", "map50_95", "precision", "recall", "f1", "n_images"):
            assert key in m
        for cls in DETECTOR_CLASSES:
            assert set(m["per_class"][cls]) >= {"ap50", "ap50_95", "precision", "recall", "f1"}
    card = json.loads((out / "detector.json").read_text())
    assert card["trained_mpp"] == SYNTH_MPP and card["class_names"] == list(DETECTOR_CLASSES)
    assert "not for clinical diagnosis" in card["intended_use"]
    assert "jobs/train_detector.py" in card["reproduce_command"]
    assert card["extra"]["merge"]["train"] == 3  # real photos; + 2 synthetic fields
    assert {s["name"] for s in card["data_sources"]} == {"yolo", "voc", "synthetic"}
    assert "synthetic/val" in metrics["sets"]
    assert (out / "detector.md").is_file()
    det = CellDetector(weights, device="cpu", conf=0.0)
    assert det.trained_mpp == SYNTH_MPP and det.class_names == DETECTOR_CLASSES
    (res,) = det.detect([np.full((100, 120, 3), 200, np.uint8)], 0.5)
    assert res.boxes.shape[1] == 4 and (res.boxes[:, 2] <= 120).all()
    m = eval_detector(yolo, det)  # a YOLO set: its val split, scale from labelled RBCs
    assert (m["split"], m["n_images"], m["mpp_mode"]) == ("val", 1, "labels")
    assert m["mpp_median"] == pytest.approx(SYNTH_MPP, rel=0.1)


def test_fields_from_labels_carry_yolo_labels_at_the_detector_mpp(tmp_path: Path) -> None:
    """Fields cut from a 0.1 um/px slide for a 0.2 um/px detector: half-size boxes, every label."""
    import pandas as pd

    from batch.synth import synth_slides
    from batch.train.from_labels import LabelledSlide, fields_from_labels

    (path,) = synth_slides(tmp_path / "slides", slides=1, width=1024, height=1024, seed=5, mpp=0.1)
    truth = pd.read_parquet(tmp_path / "slides" / "ground_truth.parquet")
    labels = truth.rename(columns={"class": "det_class"}).assign(
        slide_id="s", cell_id=[f"c{i}" for i in range(len(truth))]
    )[["slide_id", "x0", "y0", "x1", "y1", "det_class", "cell_id"]].astype(
        {c: float for c in ("x0", "y0", "x1", "y1")}
    )
    images = fields_from_labels(
        labels, {"s": LabelledSlide("s", str(path), 0.1)}, tmp_path / "fields",
        detector_mpp=0.2, field_px=256,
    )  # fmt: skip
    assert images and all(im.mpp == pytest.approx(0.2) for im in images)
    assert {im.split for im in images} <= {"train", "val"}
    assert all((im.width, im.height) == (256, 256) for im in images)
    # Every label lands in some field; unclipped boxes are the level-0 boxes at half size.
    assert sum(len(im.boxes) for im in images) >= len(labels)
    sizes = {(round(x1 - x0, 1), round(y1 - y0, 1)) for x1, x0, y1, y0 in
             zip(labels.x1, labels.x0, labels.y1, labels.y0, strict=True)}  # fmt: skip
    for im in images:
        inner = (im.boxes[:, :2] > 0.5).all(axis=1) & (im.boxes[:, 2:] < 255.5).all(axis=1)
        for w, h in im.boxes[inner][:, 2:] - im.boxes[inner][:, :2]:
            assert (round(2 * w, 1), round(2 * h, 1)) in sizes
    assert {c for im in images for c in im.classes} <= set(DETECTOR_CLASSES)


def test_labels_flags_of_the_detector_job(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--labels", "l.parquet", "--out", str(tmp_path)])  # no --slides
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path)])  # neither --data nor --labels
