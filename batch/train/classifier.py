"""Train a WBC classifier (ultralytics ``-cls``) from an ImageFolder, with honest splits.

Steps (`train_classifier`; steps 1-4 are `batch.datasets.folders` and
`batch.train.classifier_data`):

1. **Find images** (`batch.datasets.folders.discover_images`):
   ``data/<class>/*.jpg|png|...`` (one folder per class), or a dataset
   already split into ``train/``, ``val/`` (and ``test/``).
   ``rename`` maps folder names to labels (``Early=early_pre_b``). With
   ``--labels LABELS --slides ...`` the folder is first cut from the slides
   (`batch.train.from_labels`: the pipeline's crops of the labelled WBCs).
2. **Group and split**: every image belongs to a *group* (a patient, a
   slide, a source image): from a CSV (``file,group``), from a regular
   expression on the file name, or, with neither, the image itself ("split
   by image, not by patient"). Whole groups are assigned to train / val /
   test (stratified greedily by class), so no group lands in two splits.
3. **Render**: every image is turned into what the classifier will see at
   inference, with the same code (`batch.stages.preprocess.prepare_crop`,
   `batch.stages.classify.render_input`):
   optionally resampled from ``mpp`` to ``target_mpp``, optionally re-cropped
   to the segmented cell plus the pipeline's crop margin (``recrop``, for
   datasets like PBC whose images hold one centred cell with a wide rim),
   segmented (`batch.stages.segment.segment_wbc`) for the ``mask`` / ``dual``
   modes, and letterboxed to ``imgsz``. Renderings go to
   ``<out>/work/{train,val,test}/<class>/``; ``manifest.csv`` lists every file
   with its source, group, split, view and flip.
4. **Balance** the *train* split only: classes with fewer training images
   than the largest one get horizontally / vertically / both-ways flipped
   copies of their own training images (at most 3 per image). Validation
   and test images are never flipped or duplicated.
5. **Train** (``--epochs 0``: none; steps 6-7 then evaluate, calibrate and
   card the ``--model`` checkpoint as it is, e.g. a run's best checkpoint
   when its schedule was stopped early) with ultralytics (``plots=False``, ``amp=False``; nothing is
   downloaded: the model is a ``.yaml`` or a local ``.pt``). ``freeze``
   follows the seeds' fine-tuning strategies: ``all`` trains every layer;
   ``lastN`` (``last10``, ``last3``) trains only the last N top-level layers
   of the ultralytics model (the rows of its summary; the ``Classify`` head
   is the last) and freezes the rest (`batch.train.common.freeze_count`).
   yolov8n-cls has 10 such layers, so ``last10`` equals ``all`` there.
6. **Evaluate** the best checkpoint (chosen on val) on val and test, per
   source image (``dual``: the two views' probabilities averaged): accuracy,
   macro F1, per-class precision / recall / F1 / false-negative rate, the
   malignant-vs-benign false-negative rate when a ``benign`` class exists,
   MAE over class indices (seed 000; meaningful only for ordered labels),
   confusion matrix (JSON + PNG; `batch.eval.metrics.classification_metrics`).
   **Calibrate**: one temperature fitted on the val probabilities (the same
   per-image probabilities as the val metrics; `batch.eval.calibration`),
   with the top-label ECE before and after on val and test (and a
   reliability diagram per split, ``reliability_<split>.png``). The
   temperature changes no label, so the metrics above hold either way.
   Written to ``metrics.json``.
7. **Ship**: ``<out>/<name>.pt`` with its model card (JSON, markdown, and
   embedded in the checkpoint; `batch.models.write_model_card`); the card
   carries the temperature (``extra.temperature``, applied by
   `batch.stages.classify.WbcClassifier`) and what it was fitted on
   (`batch.train.classifier_card`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shlex
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from batch.config import SegmentationConfig
from batch.datasets.folders import SPLITS, discover_images, read_rgb
from batch.eval.calibration import calibration_report, diagram_panels, fit_temperature
from batch.eval.metrics import classification_metrics
from batch.models import ModelCard, write_model_card
from batch.plot import plot_reliability
from batch.stages.classify import INPUT_MODES, INPUT_SCALES, MASK_FILL, WbcClassifier
from batch.stages.device import select_device
from batch.train.classifier_card import (
    CALIBRATION_KEY,
    set_calibration,
    write_classifier_markdown,
)
from batch.train.classifier_data import (
    DEFAULT_IMGSZ,
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    TrainClassifierConfig,
    assign_groups,
    balance_by_flips,
    group_split,
    render_dataset,
    view_names,
)
from batch.train.common import freeze_count
from batch.train.from_labels import (
    GROUP_BY,
    LABELS_DATA_DIR,
    add_label_source_args,
    classifier_config_from_labels,
)

__all__ = [
    "SPLIT_BY_IMAGE",
    "WEAK_LABEL_NOTE",
    "build_parser",
    "config_from_args",
    "main",
    "plot_confusion",
    "train_classifier",
    "write_classifier_markdown",
]

log = logging.getLogger(__name__)

#: Stated next to every figure when no grouping is known.
SPLIT_BY_IMAGE = "split by image, not by patient (no patient ids known)"
#: Stated on every card trained on weak labels.
WEAK_LABEL_NOTE = (
    "Weak labels: every cell crop carries the class of the whole image it was cut from "
    "(image-level labels), so some crops are mislabelled (e.g. benign cells in a malignant "
    "image); metrics measure agreement with those weak labels."
)


def plot_confusion(
    cm: Sequence[Sequence[int]], class_names: Sequence[str], out: Path, title: str
) -> Path:
    """Save a confusion matrix (rows true, columns predicted) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(cm)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * k, 1.0 + 0.6 * k))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    top = m.max() if m.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(m[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if top and m[i, j] > top / 2 else "black",
            )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- training


#: Per split: per source image, the model's (uncalibrated) probabilities and the true index.
SplitProbs = dict[str, tuple[npt.NDArray[np.float64], list[int]]]


def _evaluate(
    weights: Path, rows: Sequence[dict[str, Any]], work: Path, cfg: TrainClassifierConfig
) -> tuple[dict[str, Any], list[str], SplitProbs]:
    clf = WbcClassifier(
        weights,
        name=cfg.name,
        input_mode=cfg.input_mode,
        device=cfg.device,
        imgsz=cfg.imgsz,
        batch_size=max(cfg.batch, 1),
    )
    names = clf.class_names
    index = {c: i for i, c in enumerate(names)}
    grouped = cfg.groups_csv is not None or cfg.group_regex is not None
    results: dict[str, Any] = {}
    split_probs: SplitProbs = {}
    for split in ("val", "test"):
        split_rows = [r for r in rows if r["split"] == split and not r["flip"]]
        if not split_rows:
            continue
        by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in split_rows:
            by_source[r["source"]].append(r)
        sources = sorted(by_source)
        images, owner = [], []
        for i, s in enumerate(sources):
            for r in by_source[s]:
                rgb = read_rgb(work / r["file"])
                if rgb is None:
                    raise ValueError(f"cannot read image {str(work / r['file'])!r}")
                images.append(rgb)
                owner.append(i)
        probs = clf.predict_images(images, calibrated=False)
        agg = np.zeros((len(sources), len(names)), dtype=np.float64)
        np.add.at(agg, np.asarray(owner), probs)
        agg /= agg.sum(axis=1, keepdims=True)  # dual: the mean of the two views
        y_true = [index[by_source[s][0]["label"]] for s in sources]
        m = classification_metrics(y_true, agg.argmax(axis=1).tolist(), names)
        m["split"] = split
        groups = [str(by_source[s][0]["group"]) for s in sources]
        m["n_groups"] = len(set(groups))
        if grouped:
            by_group = _group_metrics(agg, y_true, groups, names)
            if by_group is not None:
                m["by_group"] = by_group
            by_data = _source_metrics(agg, y_true, groups, names)
            if by_data:
                m["by_source"] = by_data
        results[split] = m
        split_probs[split] = (agg, y_true)
    return results, names, split_probs


def _calibrate(
    split_probs: SplitProbs, metrics: dict[str, Any], out: Path, name: str, data: str
) -> tuple[float, dict[str, Any] | None]:
    """Fit T on val; ECE before / after per split into ``metrics``, and PNGs.

    Returns T and the card's calibration record (None without a val split:
    T = 1, uncalibrated).
    """
    if "val" not in split_probs:
        log.warning("no validation split: the classifier is left uncalibrated (T = 1)")
        return 1.0, None
    val_probs, val_y = split_probs["val"]
    temperature = fit_temperature(val_probs, val_y)
    for split, (probs, y) in split_probs.items():
        report = calibration_report(probs, y, temperature)
        metrics[split][CALIBRATION_KEY] = {k: v for k, v in report.items() if k != "bins"}
        plot_reliability(
            diagram_panels(report, temperature),
            out / f"reliability_{split}.png",
            f"{name} {split} (n={report['n']}; T fitted on val)",
        )
    fit = metrics["val"][CALIBRATION_KEY]
    log.info("temperature %.3f (val ECE %.3f -> %.3f)", temperature, fit["ece_before"], fit["ece"])
    return temperature, {"fitted_on": {"data": data, "split": "val", "n": len(val_y)}, "fit": fit}


def _group_metrics(
    probs: npt.NDArray[np.float64], y_true: Sequence[int], groups: Sequence[str], names: list[str]
) -> dict[str, Any] | None:
    """Metrics per group (its images' probabilities averaged), if every group has one label."""
    label_of: dict[str, int] = {}
    for g, y in zip(groups, y_true, strict=True):
        if label_of.setdefault(g, y) != y:
            return None
    keys = sorted(label_of)
    pos = {g: i for i, g in enumerate(keys)}
    total = np.zeros((len(keys), probs.shape[1]))
    np.add.at(total, np.asarray([pos[g] for g in groups]), probs)
    m = classification_metrics([label_of[g] for g in keys], total.argmax(axis=1).tolist(), names)
    m["note"] = "one prediction per group: the mean of its images' probabilities"
    return m


def _source_metrics(
    probs: npt.NDArray[np.float64], y_true: Sequence[int], groups: Sequence[str], names: list[str]
) -> dict[str, Any]:
    """Accuracy and per-class recall per data source, when groups are ``source:...``.

    Crop sets (`batch.train.crop_sets`) prefix every group with its source
    (``pbc:``, ``all4:``, ``synthetic:``), so real and synthetic figures can
    be reported apart.
    """
    prefixes = [g.split(":", 1)[0] if ":" in g else None for g in groups]
    if None in prefixes or len(set(prefixes)) < 2:
        return {}
    out: dict[str, Any] = {}
    pred = probs.argmax(axis=1)
    for src in sorted({p for p in prefixes if p is not None}):
        idx = [i for i, p in enumerate(prefixes) if p == src]
        m = classification_metrics([y_true[i] for i in idx], [int(pred[i]) for i in idx], names)
        out[src] = {
            "n": len(idx),
            "accuracy": m["accuracy"],
            "recall": {c: v["recall"] for c, v in m["per_class"].items() if v["support"]},
        }
    return out


def _split_note(cfg: TrainClassifierConfig) -> str:
    if cfg.groups_csv is None and cfg.group_regex is None:
        return SPLIT_BY_IMAGE
    how = cfg.group_desc or (
        f"groups from {cfg.groups_csv}"
        if cfg.groups_csv
        else f"groups from file-name regex {cfg.group_regex!r}"
    )
    return f"split by group ({how}); no group in two splits"


def _write_manifest(rows: Sequence[dict[str, Any]], path: Path) -> None:
    fields = ["file", "source", "label", "group", "split", "view", "flip", "segmented"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def train_classifier(cfg: TrainClassifierConfig) -> dict[str, Any]:
    """Run steps 1-7 of the module docstring; return the metrics (also in ``metrics.json``).

    Outputs in ``cfg.out``: ``<name>.pt`` (+ ``.json`` / ``.md`` card),
    ``metrics.json``, ``confusion_<split>.png``, ``work/`` (renderings and
    ``manifest.csv``) and ``runs/`` (ultralytics' own logs).
    """
    if cfg.labels is not None:
        cfg = classifier_config_from_labels(cfg)
    cfg.validate()
    out = Path(cfg.out)
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    root = Path(cfg.data)

    records = discover_images(
        root, rename=cfg.rename, classes=cfg.classes, max_per_class=cfg.max_per_class, seed=cfg.seed
    )
    records = assign_groups(records, root, groups_csv=cfg.groups_csv, group_regex=cfg.group_regex)
    records = group_split(
        records, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed
    )
    t0 = time.time()
    rows = render_dataset(records, work, cfg)
    if cfg.balance:
        rows += balance_by_flips(rows, work, seed=cfg.seed)
    _write_manifest(rows, work / "manifest.csv")
    render_s = time.time() - t0
    # Source images (what a figure's n counts) and renderings (what ultralytics trains on:
    # two per source in dual mode, plus the flipped copies in train).
    split_counts = {
        s: dict(
            sorted(
                Counter(
                    r["label"]
                    for r in rows
                    if r["split"] == s
                    and not r["flip"]
                    and r["view"] == view_names(cfg.input_mode)[0]
                ).items()
            )
        )
        for s in SPLITS
    }
    rendering_counts = {
        s: dict(sorted(Counter(r["label"] for r in rows if r["split"] == s).items()))
        for s in SPLITS
    }
    log.info("rendered in %.0f s: %s", render_s, split_counts)

    n_frozen, n_layers = freeze_count(cfg.model, cfg.freeze)
    from ultralytics import YOLO

    model = YOLO(cfg.model, task="classify")
    train_kwargs: dict[str, Any] = {
        "data": str(work.resolve()),
        "epochs": cfg.epochs,
        "imgsz": cfg.imgsz,
        "batch": cfg.batch,
        "device": cfg.device,
        "workers": cfg.workers,
        "seed": cfg.seed,
        "deterministic": True,
        "patience": cfg.patience,
        "plots": False,
        "amp": False,
        "project": str((out / "runs").resolve()),
        "name": cfg.name,
        "exist_ok": True,
        "verbose": False,
    }
    if n_frozen:
        train_kwargs["freeze"] = n_frozen
    if cfg.input_scale == "field":
        # ultralytics' random resized crop (area 0.5-1 by default) would zoom each cell by up
        # to 1.4x, the very size the field input keeps: off unless --augment scale= asks.
        train_kwargs["scale"] = 0.0
    train_kwargs.update(cfg.augment)
    t1 = time.time()
    weights = out / f"{cfg.name}.pt"
    if cfg.epochs:
        model.train(**train_kwargs)
        best = out / "runs" / cfg.name / "weights" / "best.pt"
        if not best.is_file():
            best = out / "runs" / cfg.name / "weights" / "last.pt"
        shutil.copyfile(best, weights)
    else:  # --epochs 0: evaluate, calibrate and card the given checkpoint as it is
        shutil.copyfile(cfg.model, weights)
    train_s = time.time() - t1

    metrics, names, split_probs = _evaluate(weights, rows, work, cfg)
    temperature, calibration = _calibrate(split_probs, metrics, out, cfg.name, str(root))
    note = _split_note(cfg)
    for split, m in metrics.items():
        m["split_note"] = note
        m["selection"] = (
            "checkpoint chosen on val top-1"
            if split == "val"
            else "untouched by training and selection"
        )
        plot_confusion(
            m["confusion_matrix"],
            names,
            out / f"confusion_{split}.png",
            f"{cfg.name} {split} (n={m['n']}; {note})",
        )
    summary = {
        "name": cfg.name,
        "input_mode": cfg.input_mode,
        "input_scale": cfg.input_scale,
        "class_names": names,
        "split_note": note,
        "images_per_split": split_counts,
        "renderings_per_split": rendering_counts,
        "metrics": metrics,
        "temperature": temperature,
        "training_time_s": round(train_s, 1),
        "render_time_s": round(render_s, 1),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")

    source_counts = {s: sum(split_counts[s].values()) for s in SPLITS}
    sources = [dict(src, images=source_counts) for src in cfg.sources] or [
        {"name": root.name, "path": str(root), "licence": "unknown", "images": source_counts}
    ]
    notes = list(cfg.notes) + [f"Figures: {note}."]
    if cfg.weak_labels:
        notes.append(WEAK_LABEL_NOTE)
    if cfg.balance:
        notes.append(
            "Training split balanced by flipped copies (h, v, hv); val/test never augmented."
        )
    card = ModelCard(
        name=cfg.name,
        task="classify",
        class_names=names,
        trained_mpp=cfg.work_mpp,
        architecture=cfg.model,
        imgsz=cfg.imgsz,
        data_sources=sources,
        metrics=metrics,
        training_command=cfg.command,
        reproduce_command=cfg.command,
        training_time_s=round(train_s, 1),
        notes=notes,
        extra={
            "input_mode": cfg.input_mode,
            "input_scale": cfg.input_scale,
            "mask_fill": list(MASK_FILL),
            "freeze": cfg.freeze,
            "frozen_layers": n_frozen,
            "model_layers": n_layers,
            "epochs": cfg.epochs,
            "recrop": cfg.recrop,
            "crop_margin": cfg.margin,
            "box_margin": cfg.box_margin,
            "source_mpp": cfg.mpp,
            "split_note": note,
            "split_fractions": {"val": cfg.val_fraction, "test": cfg.test_fraction},
            "images_per_split": split_counts,
            "renderings_per_split": rendering_counts,
            "weak_labels": cfg.weak_labels,
            "seed": cfg.seed,
            "augment": dict(cfg.augment),
        },
    )
    if calibration is not None:
        set_calibration(card, temperature, calibration["fitted_on"], calibration["fit"])
    write_model_card(card, weights, embed=True, markdown=False)
    write_classifier_markdown(weights)
    return summary


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``train_classifier`` command line."""
    p = argparse.ArgumentParser(
        prog="train_classifier",
        description="Train a WBC classifier (ultralytics -cls) from an ImageFolder.",
    )
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--data", type=Path, help="ImageFolder: <class>/<img> or train|val|test/<class>/<img>"
    )
    data.add_argument("--labels", type=Path, help="labels table of hemaray import-labels "
                      "(its WBC types, cut from --slides as the pipeline cuts them)")
    add_label_source_args(p, "its crop margin and detector mpp; slides matched by URI")
    p.add_argument("--group-by", default="slide", choices=GROUP_BY,
                   help="with --labels: keep each slide's (or only each cell's) crops in one split")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--name", default="classifier", help="model name (weights <out>/<name>.pt)")
    p.add_argument("--input", dest="input_mode", default="mask", choices=INPUT_MODES)
    p.add_argument(
        "--input-scale", default="fit", choices=INPUT_SCALES,
        help="fit: each crop letterboxed to fill the input; field: a window of imgsz x mpp "
        "microns, so the model sees each cell's size (needs --mpp; turns the scale "
        "augmentation off unless --augment scale= is given)",
    )  # fmt: skip
    p.add_argument(
        "--model", default="yolov8n-cls.yaml", help="ultralytics model yaml or a local .pt"
    )
    p.add_argument(
        "--freeze", default="all", help="all (train every layer) | last10 | last3 | lastN"
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--imgsz", type=int, default=DEFAULT_IMGSZ)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu | 0 | auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patience", type=int, default=100)
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION)
    p.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION)
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--groups",
        dest="groups_csv",
        type=Path,
        help="CSV file,group (patient / slide / source image)",
    )
    g.add_argument("--group-regex", help="regex on the file name; its first group is the group")
    p.add_argument("--group-desc", help="what a group is, for the model card (e.g. 'source image')")
    p.add_argument("--rename", action="append", default=[], metavar="FOLDER=LABEL")
    p.add_argument("--classes", help="comma-separated labels to keep (after --rename)")
    p.add_argument("--max-per-class", type=int)
    p.add_argument("--mpp", type=float, help="microns per pixel of the images")
    p.add_argument("--target-mpp", type=float, help="resample images to this mpp first")
    p.add_argument(
        "--recrop", action="store_true", help="crop each image to its segmented cell + margin"
    )
    p.add_argument("--margin", type=float, default=SegmentationConfig.crop_margin)
    p.add_argument(
        "--box-margin",
        type=float,
        help="the images are detector crops cut with this margin (weak_crops: 0.15)",
    )
    p.add_argument("--no-balance", dest="balance", action="store_false")
    p.add_argument("--weak-labels", action="store_true", help="labels are image-level (weak)")
    p.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="JSON",
        help='data source for the card, e.g. \'{"name": "PBC", "url": "...", "licence": "CC BY 4.0"}\'',
    )
    p.add_argument("--note", action="append", default=[], help="caveat for the model card")
    p.add_argument(
        "--augment",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"ultralytics training augmentation, e.g. hsv_h=0.05 (keys: {', '.join(AUGMENT_KEYS)})",
    )
    return p


#: Ultralytics' classification augmentation settings `--augment` may set.
AUGMENT_KEYS = ("hsv_h", "hsv_s", "hsv_v", "scale", "fliplr", "flipud", "erasing", "degrees")


def parse_augment(items: Sequence[str]) -> dict[str, float]:
    """``["hsv_h=0.05", ...]`` -> ``{"hsv_h": 0.05}``; unknown keys and non-numbers are refused."""
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in AUGMENT_KEYS:
            raise SystemExit(f"--augment expects KEY=VALUE with KEY in {AUGMENT_KEYS}, got {item!r}")
        try:
            out[key] = float(value)
        except ValueError:
            raise SystemExit(f"--augment {key}: not a number: {value!r}") from None
    return out


def config_from_args(argv: Sequence[str] | None = None) -> TrainClassifierConfig:
    """Parse the command line into a `TrainClassifierConfig`."""
    args = build_parser().parse_args(argv)
    rename = {}
    for item in args.rename:
        if "=" not in item:
            raise SystemExit(f"--rename expects FOLDER=LABEL, got {item!r}")
        k, v = item.split("=", 1)
        rename[k] = v
    device = args.device
    if device == "auto":
        device = select_device("auto").replace("cuda:", "")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if (args.labels is None) != (not args.slides) or (args.labels_run and args.labels is None):
        raise SystemExit("--labels needs --slides, and --slides / --run go with --labels")
    return TrainClassifierConfig(
        data=args.data if args.labels is None else args.out / LABELS_DATA_DIR,
        labels=args.labels,
        slides=list(args.slides),
        labels_run=args.labels_run,
        group_by=args.group_by,
        out=args.out,
        name=args.name,
        input_mode=args.input_mode,
        input_scale=args.input_scale,
        model=args.model,
        freeze=args.freeze,
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        device=device,
        workers=args.workers,
        seed=args.seed,
        patience=args.patience,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        groups_csv=args.groups_csv,
        group_regex=args.group_regex,
        group_desc=args.group_desc,
        rename=rename,
        classes=args.classes.split(",") if args.classes else None,
        max_per_class=args.max_per_class,
        mpp=args.mpp,
        target_mpp=args.target_mpp,
        recrop=args.recrop,
        margin=args.margin,
        box_margin=args.box_margin,
        balance=args.balance,
        weak_labels=args.weak_labels,
        sources=[json.loads(s) for s in args.source],
        notes=list(args.note),
        augment=parse_augment(args.augment),
        command="python jobs/train_classifier.py " + shlex.join(argv_list),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = config_from_args(argv)
    summary = train_classifier(cfg)
    print(json.dumps({k: summary[k] for k in ("name", "class_names", "split_note")}, indent=2))
    for split, m in summary["metrics"].items():
        print(
            f"{split}: accuracy {m['accuracy']:.3f} macro_f1 {m['macro_f1']:.3f} (n={m['n']}; {m['split_note']})"
        )
    return 0
