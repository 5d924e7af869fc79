"""WbcClassifier: label set from the model file, shapes, probabilities, input modes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from batch.stages.classify import MASK_FILL, WbcClassifier, field_window, render_input

LABELS = {0: "benign", 1: "early_pre_b", 2: "pre_b", 3: "pro_b"}
SHIPPED = Path(__file__).resolve().parent.parent / "batch" / "models"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained yolov8n-cls built from YAML with four named classes, saved as a local .pt."""
    import ultralytics
    import yaml
    from ultralytics import YOLO

    folder = tmp_path_factory.mktemp("cls_model")
    cfg = yaml.safe_load(
        (Path(ultralytics.__file__).parent / "cfg/models/v8/yolov8-cls.yaml").read_text()
    )
    cfg["nc"] = len(LABELS)
    model_yaml = folder / "yolov8n-cls.yaml"  # the "n" in the name picks the scale
    model_yaml.write_text(yaml.safe_dump(cfg))
    model = YOLO(str(model_yaml), task="classify")
    model.model.names = dict(LABELS)  # type: ignore[union-attr]
    path = folder / "tiny_cls.pt"
    model.save(str(path))
    return path


def _crops(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    crops, masks = [], []
    for i in range(n):
        h, w = 30 + i, 40 - i
        crop = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), bool)
        mask[5:-5, 6:-6] = True
        crops.append(crop)
        masks.append(mask)
    return crops, masks


def test_labels_shapes_and_probabilities(tiny_model: Path) -> None:
    clf = WbcClassifier(tiny_model, name="all_subtype", device="cpu", imgsz=32, batch_size=3)
    assert clf.class_names == list(LABELS.values())
    assert clf.input_mode == "mask" and clf.device == "cpu" and clf.half is False
    crops, masks = _crops(7)
    labels, conf, probs = clf.classify(crops, masks)
    assert len(labels) == 7 and set(labels) <= set(LABELS.values())
    assert conf.shape == (7,) and probs.shape == (7, 4)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(conf, probs.max(axis=1))
    assert [clf.class_names[i] for i in probs.argmax(axis=1)] == labels
    empty = clf.classify([], [])
    assert empty[0] == [] and empty[2].shape == (0, 4)


def test_mask_mode_zeroes_the_background() -> None:
    crops, masks = _crops(1)
    (masked,) = render_input(crops[0], masks[0], "mask")
    assert (masked[~masks[0]] == MASK_FILL).all()
    np.testing.assert_array_equal(masked[masks[0]], crops[0][masks[0]])
    mask_view, crop_view = render_input(crops[0], masks[0], "dual", 32)
    assert mask_view.shape == crop_view.shape == (32, 32, 3)
    (raw,) = render_input(crops[0], None, "crop")
    np.testing.assert_array_equal(raw, crops[0])
    # No cell found: nothing to mask, the crop is shown as it is.
    (unmasked,) = render_input(crops[0], np.zeros_like(masks[0]), "mask")
    np.testing.assert_array_equal(unmasked, crops[0])


def test_mask_mode_ignores_pixels_outside_the_cell(tiny_model: Path) -> None:
    clf = WbcClassifier(tiny_model, name="t", device="cpu", imgsz=32, input_mode="mask")
    crops, masks = _crops(2)
    changed = [c.copy() for c in crops]
    for c, m in zip(changed, masks, strict=True):
        c[~m] = 255 - c[~m]
    _, _, p1 = clf.classify(crops, masks)
    _, _, p2 = clf.classify(changed, masks)
    np.testing.assert_allclose(p1, p2, atol=1e-6)


def test_dual_and_crop_modes(tiny_model: Path) -> None:
    crops, masks = _crops(3)
    crop_clf = WbcClassifier(tiny_model, name="t", device="cpu", imgsz=32, input_mode="crop")
    _, _, p_crop = crop_clf.classify(crops)  # no masks needed
    mask_clf = WbcClassifier(tiny_model, name="t", device="cpu", imgsz=32, input_mode="mask")
    _, _, p_mask = mask_clf.classify(crops, masks)
    dual = WbcClassifier(tiny_model, name="t", device="cpu", imgsz=32, input_mode="dual")
    _, _, p_dual = dual.classify(crops, masks)
    # dual = the mean of the two views' probabilities.
    np.testing.assert_allclose(p_dual, (p_crop + p_mask) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="needs masks"):
        dual.classify(crops)
    with pytest.raises(ValueError, match="input_mode"):
        WbcClassifier(tiny_model, name="t", device="cpu", input_mode="rgb")


@pytest.mark.parametrize("name", ["wbc_type", "all_subtype"])
def test_shipped_weights(name: str) -> None:
    path = SHIPPED / f"{name}.pt"
    if not path.is_file():
        pytest.skip(f"{path.name} is not shipped in this checkout")
    clf = WbcClassifier(path, name=name, device="cpu")
    assert clf.card is not None and clf.card.task == "classify"
    assert clf.class_names == clf.card.class_names
    assert "not for clinical diagnosis" in clf.card.intended_use
    crops, masks = _crops(2)
    _, _, probs = clf.classify(crops, masks)
    assert probs.shape == (2, len(clf.class_names))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def _with_card(model: Path, folder: Path, **extra: object) -> Path:
    """A copy of ``model`` with a sidecar card carrying ``extra`` (e.g. a temperature)."""
    import shutil

    from batch.models import ModelCard, write_model_card

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / model.name
    shutil.copyfile(model, path)
    card = ModelCard(name="t", task="classify", class_names=list(LABELS.values()), extra=extra)
    write_model_card(card, path, embed=False, markdown=False)
    return path


@pytest.mark.parametrize("mode", ["mask", "dual"])
def test_card_temperature_calibrates_every_probability(
    tiny_model: Path, tmp_path: Path, mode: str
) -> None:
    temperature = 0.25  # sharpens the untrained model's near-uniform output visibly
    path = _with_card(tiny_model, tmp_path / "calibrated", temperature=temperature)
    clf = WbcClassifier(path, name="t", device="cpu", imgsz=32, input_mode=mode)
    assert clf.temperature == temperature
    crops, masks = _crops(5)
    labels, conf, probs = clf.classify(crops, masks)
    raw = clf.probabilities(crops, masks, calibrated=False)
    # Uncalibrated card-less model: the raw probabilities, as before calibration existed.
    _, _, plain = WbcClassifier(
        tiny_model, name="t", device="cpu", imgsz=32, input_mode=mode
    ).classify(crops, masks)
    np.testing.assert_allclose(raw, plain, atol=1e-6)
    z = np.log(raw.astype(np.float64)) / temperature
    expected = np.exp(z - z.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert not np.allclose(probs, raw, atol=1e-3)
    np.testing.assert_array_equal(probs.argmax(axis=1), raw.argmax(axis=1))
    assert labels == [clf.class_names[i] for i in raw.argmax(axis=1)]
    np.testing.assert_allclose(conf, probs.max(axis=1))
    # predict_images: calibrated per rendered image unless asked for the raw softmax.
    images = [v for c, m in zip(crops, masks, strict=True) for v in render_input(c, m, mode, 32)]
    per_image = clf.predict_images(images, calibrated=False)
    np.testing.assert_allclose(clf.predict_images(images), clf.calibrate(per_image), atol=1e-6)
    if mode == "mask":
        np.testing.assert_allclose(clf.predict_images(images), probs, atol=1e-5)


def test_calibration_job_fits_and_records_the_temperature(tiny_model: Path, tmp_path: Path) -> None:
    import json

    import cv2

    from batch.train.calibrate import calibrate_classifier

    path = _with_card(tiny_model, tmp_path / "model", input_mode="crop")
    data = tmp_path / "val"
    rng = np.random.default_rng(3)
    for folder in ("Benign", "pro_b"):
        (data / folder).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(
                str(data / folder / f"{i}.png"), rng.integers(0, 256, (24, 24, 3), np.uint8)
            )
    result = calibrate_classifier(path, data, limit_per_class=2, png=tmp_path / "fit.png")
    card = json.loads(path.with_suffix(".json").read_text())
    t = card["extra"]["temperature"]
    assert t == result["temperature"] and t > 0
    fitted_on = card["extra"]["calibration"]["fitted_on"]
    assert fitted_on["data"] == str(data.resolve()) and fitted_on["n"] == 4
    assert fitted_on["images_per_class"] == {"benign": 2, "pro_b": 2}
    assert "first 2 images" in fitted_on["selection"]
    assert card["extra"]["input_mode"] == "crop"  # the rest of the card is kept
    assert "Temperature T" in path.with_suffix(".md").read_text()
    assert (tmp_path / "fit.png").is_file()
    assert WbcClassifier(path, name="t", device="cpu", imgsz=32).temperature == t


def _cell_crop(diameter_um: float, mpp: float) -> np.ndarray:
    """A crop as the pipeline cuts it (the cell's box plus 15 % a side) of one dark disc, at mpp."""
    n = round(1.3 * diameter_um / mpp)
    crop = np.full((n, n, 3), 232, np.uint8)
    cv2.circle(crop, (n // 2, n // 2), round(diameter_um / mpp / 2), (90, 40, 130), -1)
    return crop


def _disc_width(image: np.ndarray) -> int:
    return int((image[image.shape[0] // 2, :, 0] < 160).sum())


def test_field_input_keeps_the_cell_size_in_microns_and_fit_does_not() -> None:
    size, trained = 96, 0.2  # a 19.2 um window
    field_widths, fit_widths = {}, {}
    for d in (15.0, 11.5):  # a pro-B-sized and a pre-B-sized blast
        for mpp in (0.2, 0.25, 0.4):  # the same cell scanned at three pixel sizes
            crop = _cell_crop(d, mpp)
            [field] = render_input(crop, None, "crop", size, field_scale=mpp / trained)
            [fit] = render_input(crop, None, "crop", size)
            field_widths[d, mpp], fit_widths[d, mpp] = _disc_width(field), _disc_width(fit)
            # within the disc's rasterisation (a pixel a side at the source's scale)
            assert abs(field_widths[d, mpp] - d / trained) <= 1 + 2 * mpp / trained, (d, mpp)
            assert abs(fit_widths[d, mpp] - size / 1.3) <= 1 + 2 * size / (1.3 * d / mpp)
    # field: the 15 um cell is 17.5 px wider at every mpp; fit: both fill the input alike
    assert min(field_widths[15.0, m] - field_widths[11.5, m] for m in (0.2, 0.25, 0.4)) >= 14
    assert max(abs(fit_widths[15.0, m] - fit_widths[11.5, m]) for m in (0.2, 0.25, 0.4)) <= 3
    # A window smaller than the crop keeps its centre; a larger one pads with the fill.
    big = np.arange(40 * 40 * 3, dtype=np.uint32).reshape(40, 40, 3).astype(np.uint8)
    np.testing.assert_array_equal(field_window(big, 20, 1.0, (0, 0, 0)), big[10:30, 10:30])
    padded = field_window(big[:10, :10], 20, 1.0, (7, 8, 9))
    np.testing.assert_array_equal(padded[5:15, 5:15], big[:10, :10])
    assert (padded[0, 0] == (7, 8, 9)).all() and (padded[19, 19] == (7, 8, 9)).all()
    with pytest.raises(ValueError, match="needs a size"):
        render_input(big, None, "crop", None, field_scale=1.0)


def test_field_classifier_renders_each_crop_from_its_own_mpp(
    tiny_model: Path, tmp_path: Path
) -> None:
    import shutil

    from batch.models import ModelCard, write_model_card

    def carded(folder: str, trained_mpp: float | None) -> Path:
        path = tmp_path / folder / tiny_model.name
        path.parent.mkdir()
        shutil.copyfile(tiny_model, path)
        card = ModelCard(
            name="t", task="classify", class_names=list(LABELS.values()), trained_mpp=trained_mpp,
            extra={"input_mode": "crop", "input_scale": "field"},
        )  # fmt: skip
        write_model_card(card, path, embed=False, markdown=False)
        return path

    clf = WbcClassifier(carded("field", 0.2), name="t", device="cpu", imgsz=48)
    assert clf.input_scale == "field"
    crops = [_cell_crop(13.0, 0.25), _cell_crop(13.0, 0.4), _cell_crop(9.0, 0.25)]
    mpps = [0.25, 0.4, 0.25]
    expected = clf.predict_images(
        [
            render_input(c, None, "crop", 48, field_scale=m / 0.2)[0]
            for c, m in zip(crops, mpps, strict=True)
        ]
    )
    np.testing.assert_allclose(clf.classify(crops, mpp=mpps)[2], expected, atol=1e-6)
    # Unknown mpp: the crops are taken to be at the trained mpp.
    at_trained = clf.predict_images(
        [render_input(c, None, "crop", 48, field_scale=1.0)[0] for c in crops]
    )
    np.testing.assert_allclose(clf.classify(crops)[2], at_trained, atol=1e-6)
    with pytest.raises(ValueError, match="3 crops but 2 mpp"):
        clf.classify(crops, mpp=mpps[:2])
    with pytest.raises(ValueError, match="needs the card's trained_mpp"):
        WbcClassifier(carded("no_mpp", None), name="t", device="cpu", imgsz=48)
