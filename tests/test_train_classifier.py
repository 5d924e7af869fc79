"""Classifier training: a tiny offline run, grouped splits, train-only flips, metrics."""

from __future__ import annotations

import csv
import dataclasses
import json
import socket
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import yaml

from batch.datasets.folders import ImageRecord, discover_images
from batch.eval.metrics import classification_metrics
from batch.train.classifier import config_from_args, train_classifier
from batch.train.classifier_data import TrainClassifierConfig, assign_groups, group_split
from batch.train.common import freeze_count

BACKGROUND = (228, 224, 218)
CYTOPLASM = (150, 165, 215)
NUCLEUS = (105, 60, 170)
#: Class -> (nucleus radius, images per patient, patients): imbalanced on purpose.
CLASSES = {"Benign": (9, 2, 4), "Pro": (14, 3, 4)}


def _cell(rng: np.random.Generator, r_nucleus: int) -> np.ndarray:
    img = np.empty((48, 48, 3), np.uint8)
    img[:] = BACKGROUND
    c = (24 + int(rng.integers(-2, 3)), 24 + int(rng.integers(-2, 3)))
    cv2.circle(img, c, 18, CYTOPLASM, -1)
    cv2.circle(img, c, r_nucleus, NUCLEUS, -1)
    noise = rng.normal(0, 3, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """22 images in two class folders; file names carry a patient id (``p<k>_<i>.png``)."""
    root = tmp_path_factory.mktemp("cls_data")
    rng = np.random.default_rng(0)
    patient = 0
    for cls, (r, per_patient, patients) in CLASSES.items():
        (root / cls).mkdir()
        for _ in range(patients):
            for i in range(per_patient):
                img = _cell(rng, r)
                cv2.imwrite(str(root / cls / f"p{patient}_{i}.png"), img[..., ::-1])
            patient += 1
    return root


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Refuse every outbound connection that is not to loopback; record attempts."""
    attempts: list[Any] = []
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else str(address)
        if (
            self.family == socket.AF_UNIX
            or str(host).startswith("127.")
            or host in ("::1", "localhost")
        ):
            return real_connect(self, address)
        attempts.append(address)
        raise ConnectionRefusedError(f"test blocks outbound connections ({address})")

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


@pytest.mark.slow
def test_tiny_training_offline(image_folder: Path, tmp_path: Path, no_network: list[Any]) -> None:
    out = tmp_path / "run"
    cfg = config_from_args(
        [
            "--data", str(image_folder), "--out", str(out), "--name", "tiny",
            "--input", "dual", "--mpp", "0.25", "--imgsz", "32", "--epochs", "1",
            "--input-scale", "field",
            "--batch", "8", "--group-regex", r"^(p\d+)_", "--group-desc", "patient",
            "--val-fraction", "0.25", "--test-fraction", "0.25",
            "--rename", "Benign=benign", "--rename", "Pro=pro_b",
            "--source", '{"name": "generated", "licence": "CC0"}', "--augment", "hsv_h=0.1",
        ]
    )  # fmt: skip
    summary = train_classifier(cfg)
    assert no_network == []

    weights = out / "tiny.pt"
    assert weights.is_file() and weights.stat().st_size > 100_000
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    assert metrics["class_names"] == ["benign", "pro_b"]
    # Figures count source images; renderings add the second view and the train flips.
    sources = metrics["images_per_split"]
    assert sum(sources[s].get("benign", 0) for s in sources) == 8
    assert sum(sources[s].get("pro_b", 0) for s in sources) == 12
    renders = metrics["renderings_per_split"]
    assert renders["val"] == {k: 2 * v for k, v in sources["val"].items()}
    m_by_split = {s: metrics["metrics"][s]["confusion_matrix"] for s in ("val", "test")}
    for split in ("val", "test"):
        m = metrics["metrics"][split]
        for key in (
            "accuracy", "macro_f1", "per_class", "false_negative_rate_macro",
            "mae_class_index", "confusion_matrix", "malignant_vs_benign", "split_note",
        ):  # fmt: skip
            assert key in m, key
        assert set(m["per_class"]) == {"benign", "pro_b"}
        assert {"precision", "recall", "f1", "false_negative_rate"} <= set(m["per_class"]["pro_b"])
        assert "patient" in m["split_note"]
        assert m["by_group"]["n"] == m["n_groups"]  # one label per patient here
        assert (out / f"confusion_{split}.png").is_file()
        # Calibration: T fitted on val, ECE before / after on both splits, one diagram each.
        calib = m["calibration"]
        assert calib["temperature"] == metrics["temperature"]
        assert 0 <= calib["ece"] <= 1 and 0 <= calib["ece_before"] <= 1
        assert (out / f"reliability_{split}.png").is_file()

    card = json.loads((out / "tiny.json").read_text())
    assert card["task"] == "classify" and card["class_names"] == ["benign", "pro_b"]
    assert card["extra"]["input_mode"] == "dual" and card["trained_mpp"] == 0.25
    # --augment reached ultralytics' trainer and the card.
    assert card["extra"]["augment"] == {"hsv_h": 0.1}
    args = yaml.safe_load((out / "runs" / "tiny" / "args.yaml").read_text())
    assert args["hsv_h"] == 0.1
    # The field input keeps cell sizes: recorded in the card, and no random zoom in training.
    assert card["extra"]["input_scale"] == "field" and args["scale"] == 0.0
    assert "not for clinical diagnosis" in card["intended_use"]
    assert "Classification metrics" in (out / "tiny.md").read_text()
    t = card["extra"]["temperature"]
    assert t == metrics["temperature"] and t > 0
    fitted_on = card["extra"]["calibration"]["fitted_on"]
    assert fitted_on["split"] == "val" and fitted_on["n"] == metrics["metrics"]["val"]["n"]
    assert (
        card["metrics"]["val"]["calibration"]["nll"]
        <= card["metrics"]["val"]["calibration"]["nll_before"]
    )
    assert "Temperature T" in (out / "tiny.md").read_text()

    with open(out / "work" / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    splits_of_group: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        splits_of_group[r["group"]].add(r["split"])
        assert (out / "work" / r["file"]).is_file()
    assert all(len(s) == 1 for s in splits_of_group.values()), splits_of_group
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    flipped = [r for r in rows if r["flip"]]
    assert flipped and all(r["split"] == "train" for r in flipped)
    # --epochs 0 evaluates, calibrates and cards a checkpoint as it is: the same figures.
    again = tmp_path / "again"
    cfg0 = config_from_args(
        [
            "--data", str(image_folder), "--out", str(again), "--name", "tiny", "--model",
            str(weights), "--input", "dual", "--mpp", "0.25", "--imgsz", "32", "--epochs", "0",
            "--group-regex", r"^(p\d+)_", "--val-fraction", "0.25", "--test-fraction", "0.25",
            "--rename", "Benign=benign", "--rename", "Pro=pro_b",
        ]
    )  # fmt: skip
    summary0 = train_classifier(cfg0)
    assert (again / "tiny.pt").read_bytes() != b"" and not (again / "runs" / "tiny").exists()
    for split in ("val", "test"):
        assert summary0["metrics"][split]["confusion_matrix"] == m_by_split[split]
    assert summary0["temperature"] == metrics["temperature"]
    # Train is balanced in source images (dual: two renderings per source).
    per_class: dict[str, int] = defaultdict(int)
    for r in rows:
        if r["split"] == "train" and r["view"] == "mask":
            per_class[r["label"]] += 1
    assert len(set(per_class.values())) == 1, per_class


def test_group_split_keeps_groups_whole_and_stratifies() -> None:
    records = [
        ImageRecord(Path(f"{c}/{g}_{i}.png"), c, f"{c}{g}", None)
        for c, n_groups in (("a", 20), ("b", 10))
        for g in range(n_groups)
        for i in range(1 + g % 3)
    ]
    split = group_split(records, val_fraction=0.2, test_fraction=0.2, seed=1)
    where: dict[str, set[str | None]] = defaultdict(set)
    for r in split:
        where[r.group].add(r.split)
    assert all(len(s) == 1 for s in where.values())
    for c in ("a", "b"):
        n = sum(r.label == c for r in split)
        n_train = sum(r.label == c and r.split == "train" for r in split)
        assert 0.45 <= n_train / n <= 0.75
        assert any(r.label == c and r.split == "val" for r in split)
        assert any(r.label == c and r.split == "test" for r in split)
    assert split == group_split(records, val_fraction=0.2, test_fraction=0.2, seed=1)


def test_presplit_dataset_with_a_shared_group_is_refused() -> None:
    records = [
        ImageRecord(Path("train/a/x.png"), "a", "patient1", "train"),
        ImageRecord(Path("val/a/y.png"), "a", "patient1", "val"),
    ]
    with pytest.raises(ValueError, match="patient1"):
        group_split(records)


def test_groups_from_csv(image_folder: Path, tmp_path: Path) -> None:
    records = discover_images(image_folder)
    table = tmp_path / "groups.csv"
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "group"])
        for r in records[:-1]:
            w.writerow([r.path.relative_to(image_folder).as_posix(), "slide" + r.path.stem[1]])
    with pytest.raises(ValueError, match="no group"):
        assign_groups(records, image_folder, groups_csv=table)
    grouped = assign_groups(records[:-1], image_folder, groups_csv=table)
    assert {r.group for r in grouped} <= {f"slide{k}" for k in range(10)}
    with pytest.raises(ValueError, match="does not match"):
        assign_groups(records, image_folder, group_regex=r"^slide(\d+)")


def test_classification_metrics_by_hand() -> None:
    names = ["benign", "early_pre_b", "pre_b", "pro_b"]
    y_true = [0, 0, 1, 2, 3, 3]
    y_pred = [0, 1, 1, 2, 0, 3]
    m = classification_metrics(y_true, y_pred, names)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"][3] == [1, 0, 0, 1]
    assert m["per_class"]["benign"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["pro_b"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["pro_b"]["false_negative_rate"] == pytest.approx(0.5)
    assert m["mae_class_index"] == pytest.approx((0 + 1 + 0 + 0 + 3 + 0) / 6)
    mb = m["malignant_vs_benign"]
    assert mb["n_malignant"] == 4 and mb["false_negative_rate"] == pytest.approx(1 / 4)
    assert mb["false_positive_rate"] == pytest.approx(1 / 2)
    f1 = [m["per_class"][c]["f1"] for c in names]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 4)
    assert "malignant_vs_benign" not in classification_metrics([0, 1], [0, 1], ["a", "b"])


def test_freeze_strategies_map_to_layers() -> None:
    assert freeze_count("yolov8n-cls.yaml", "all") == (0, 10)
    assert freeze_count("yolov8n-cls.yaml", "last3") == (7, 10)
    assert freeze_count("yolov8n-cls.yaml", "last10") == (0, 10)
    with pytest.raises(ValueError, match="lastN"):
        freeze_count("yolov8n-cls.yaml", "first3")


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--mpp"):
        TrainClassifierConfig(data=tmp_path, out=tmp_path, input_mode="mask").validate()
    with pytest.raises(ValueError, match="--freeze"):
        TrainClassifierConfig(data=tmp_path, out=tmp_path, input_mode="crop", freeze="x").validate()
    with pytest.raises(ValueError, match="--input-scale field needs --mpp"):
        TrainClassifierConfig(
            data=tmp_path, out=tmp_path, input_mode="crop", input_scale="field"
        ).validate()
    with pytest.raises(ValueError, match="--input-scale must be"):
        TrainClassifierConfig(
            data=tmp_path, out=tmp_path, input_mode="crop", input_scale="zoom"
        ).validate()
    with pytest.raises(ValueError, match="training split"):
        TrainClassifierConfig(
            data=tmp_path, out=tmp_path, input_mode="crop", val_fraction=0.5, test_fraction=0.5
        ).validate()


class _FakeDetector:
    """Finds the drawn cell, an RBC and a false WBC per image; no weights needed."""

    class_names = ("RBC", "WBC", "platelet")

    def __init__(self) -> None:
        self.mpps: list[Any] = []

    def detect(self, tiles: Sequence[npt.NDArray[np.uint8]], mpp: Any = None) -> list[Any]:
        from batch.stages.detect import Detections

        self.mpps.append(mpp)
        return [
            Detections(
                # The drawn cell; an RBC; a "WBC" on bare background (no nucleus: rejected).
                np.array([[6, 6, 42, 42], [0, 0, 10, 10], [0, 0, 8, 8]], np.float32),
                np.array([1, 0, 1]),
                np.array([0.9, 0.8, 0.9], np.float32),
                self.class_names,
            )
            for _ in tiles
        ]

    def estimate_mpp(self, image: np.ndarray) -> float | None:
        return 0.3


def test_weak_crops_label_by_image_and_group_by_source(image_folder: Path, tmp_path: Path) -> None:
    from batch.train.weak_labels import weak_crops

    detector = _FakeDetector()
    out = tmp_path / "weak"
    report = weak_crops(image_folder, out, detector, rename={"Benign": "benign", "Pro": "pro_b"})
    assert report.mpp == pytest.approx(0.3) and set(detector.mpps) == {0.3}
    assert report.crops_per_label == {"benign": 8, "pro_b": 12}
    assert report.rejected_no_nucleus == 20 and report.images == 20
    with open(out / "groups.csv") as fh:
        groups = list(csv.DictReader(fh))
    assert len(groups) == 20
    for row in groups:
        label, name = row["file"].split("/")
        assert (out / row["file"]).is_file()
        assert row["group"].split("/")[0] == {"benign": "Benign", "pro_b": "Pro"}[label]
        assert name.startswith(Path(row["group"]).stem + "__wbc")
    crop = cv2.imread(str(out / groups[0]["file"]))
    # A 36 px box plus 15 % on each side, padded where it leaves the image.
    assert crop is not None and crop.shape[:2] == (48, 48)
    # The crops train like any ImageFolder, grouped by source image.
    records = assign_groups(discover_images(out), out, groups_csv=out / "groups.csv")
    assert {r.group for r in records} == {g["group"] for g in groups}


class _PerImageDetector(_FakeDetector):
    """Estimates each image's mpp in turn from ``estimates`` (None: no estimate)."""

    def __init__(self, estimates: list[float | None]) -> None:
        super().__init__()
        self.estimates = iter(estimates)

    def estimate_mpp(self, image: np.ndarray) -> float | None:
        return next(self.estimates)


def test_weak_crops_per_image_mpp_resamples_each_crop_to_one_scale(
    image_folder: Path, tmp_path: Path
) -> None:
    """``mpp="image"``: each image detected at its own estimate, its crops resampled to ``crop_mpp``."""
    from batch.train.weak_labels import PER_IMAGE, weak_crops

    # Images go in label order: 8 Benign (the first without an estimate), then 12 Pro.
    detector = _PerImageDetector([None] + [0.3] * 7 + [0.6] * 12)
    out = tmp_path / "weak"
    report = weak_crops(
        image_folder, out, detector, mpp=PER_IMAGE, crop_mpp=0.3,
        rename={"Benign": "benign", "Pro": "pro_b"},
    )  # fmt: skip
    assert report.images == 19 and report.images_without_mpp == 1
    assert report.mpp_percentiles == [0.3, 0.6, 0.6]
    assert [m for batch in detector.mpps for m in batch] == [0.3] * 7 + [0.6] * 12
    assert report.crops_per_label == {"benign": 7, "pro_b": 12}
    with open(out / "crops.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {float(r["mpp"]) for r in rows} == {0.3}
    sizes = {r["label"]: cv2.imread(str(out / r["file"])).shape[:2] for r in rows}
    # The 48 px crop of a 0.3 um/px image as it is; of a 0.6 um/px image, twice the pixels.
    assert sizes == {"benign": (48, 48), "pro_b": (96, 96)}
    with pytest.raises(ValueError, match="crop_mpp"):
        weak_crops(image_folder, tmp_path / "w2", _FakeDetector(), mpp=PER_IMAGE)


@pytest.mark.parametrize("box", [(10.0, 20.0, 46.0, 52.0), (3.3, 4.7, 30.1, 21.9)])
def test_inner_box_recovers_the_detector_box(box: tuple[float, float, float, float]) -> None:
    from batch.stages.crop import crop_regions
    from batch.stages.preprocess import inner_box

    x0, y0, x1, y1 = crop_regions(np.array([box]), margin=0.15)[0].tolist()
    recovered = inner_box(y1 - y0, x1 - x0, 0.15)
    expected = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
    assert recovered == pytest.approx(expected, abs=1.0)


def test_labels_find_their_slides_by_id_then_by_the_runs_uri(tmp_path: Path) -> None:
    import pandas as pd

    from batch.export.source import RunSource
    from batch.inputs import resolve_inputs
    from batch.synth import synth_slides
    from batch.train.from_labels import LabelSlideError, labelled_slides

    synth_slides(tmp_path / "slides", slides=2, width=256, height=256, seed=3)
    a, b = resolve_inputs([str(tmp_path / "slides")])
    # The labels call b by another id (an older run's spelling): the run's slides table maps
    # that id to b's URI.
    run = tmp_path / "run"
    (run / "slides").mkdir(parents=True)
    pd.DataFrame(
        {"slide_id": ["old-b"], "slide_uri": [b.uri], "status": ["committed"], "mpp": [0.25]}
    ).to_parquet(run / "slides" / "old-b.parquet")
    found = labelled_slides([a.slide_id, "old-b"], [str(tmp_path / "slides")],
                            run=RunSource(str(run)))  # fmt: skip
    assert (found[a.slide_id].uri, found["old-b"].uri) == (a.uri, b.uri)
    assert found["old-b"].mpp == 0.25  # the file's own
    with pytest.raises(LabelSlideError, match=r"slide\(s\) ghost that --slides does not give"):
        labelled_slides([a.slide_id, "ghost"], [str(tmp_path / "slides")])
    with pytest.raises(LabelSlideError, match="old-b.*--run OUT"):  # no run: ids only
        labelled_slides(["old-b"], [b.uri])


def test_augment_settings_are_checked() -> None:
    base = ["--data", "d", "--out", "o"]
    assert config_from_args([*base, "--augment", "hsv_s=0.9", "--augment", "scale=0.2"]).augment == {
        "hsv_s": 0.9,
        "scale": 0.2,
    }
    for bad in ("lr0=0.1", "hsv_h", "hsv_h=high"):
        with pytest.raises(SystemExit, match="--augment"):
            config_from_args([*base, "--augment", bad])


def test_labels_flags_go_together(tmp_path: Path) -> None:
    labels = ["--labels", str(tmp_path / "labels.parquet"), "--out", str(tmp_path / "out")]
    cfg = config_from_args([*labels, "--slides", "a.tif", "b/", "--group-by", "cell"])
    assert (cfg.labels, cfg.slides, cfg.group_by) == (tmp_path / "labels.parquet", ["a.tif", "b/"], "cell")
    assert cfg.data == tmp_path / "out" / "labels_data"
    with pytest.raises(SystemExit):
        config_from_args(labels)  # --labels without --slides
    with pytest.raises(SystemExit):
        config_from_args(["--data", "d", "--labels", "l", "--slides", "s", "--out", "o"])


def test_a_groups_csv_mpp_puts_every_crop_at_one_field_scale(tmp_path: Path) -> None:
    """One cell drawn at 0.2 and at 0.4 um/px: with each crop's ``mpp`` in groups.csv the
    ``field`` input renders both at the same size; read as one set at ``--mpp`` it cannot."""
    from batch.train.classifier_data import render_dataset

    root = tmp_path / "crops"
    (root / "a").mkdir(parents=True)
    for name, side in (("fine", 96), ("coarse", 48)):  # 0.2 and 0.4 um/px
        img = np.full((side, side, 3), BACKGROUND, np.uint8)
        k = side / 48
        cv2.circle(img, (side // 2, side // 2), round(18 * k), CYTOPLASM, -1)
        cv2.circle(img, (side // 2, side // 2), round(10 * k), NUCLEUS, -1)
        cv2.imwrite(str(root / "a" / f"{name}.png"), img[..., ::-1])
    table = root / "groups.csv"
    table.write_text("file,group,mpp\na/fine.png,g1,0.2\na/coarse.png,g2,0.4\n")

    def rendered(groups_csv: Path | None) -> dict[str, np.ndarray]:
        cfg = TrainClassifierConfig(data=root, out=tmp_path / "out", input_mode="crop",
                                    input_scale="field", imgsz=64, mpp=0.2, target_mpp=0.2)  # fmt: skip
        records = [dataclasses.replace(r, split="train") for r in discover_images(root)]
        if groups_csv is not None:
            records = assign_groups(records, root, groups_csv=groups_csv)
        work = tmp_path / f"work{groups_csv is not None}"
        rows = render_dataset(records, work, cfg)
        return {Path(r["source"]).stem: cv2.imread(str(work / r["file"])).astype(float) for r in rows}

    own = rendered(table)
    assert {r.mpp for r in assign_groups(discover_images(root), root, groups_csv=table)} == {0.2, 0.4}
    assert np.abs(own["fine"] - own["coarse"]).mean() < 4
    one = rendered(None)  # every crop taken to be at 0.2 um/px: the coarse cell is half the size
    assert np.abs(one["fine"] - one["coarse"]).mean() > 15
