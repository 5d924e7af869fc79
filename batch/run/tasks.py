"""What runs on the workers: the per-tile stages of a run as plain callables over tile batches.

Each callable takes and returns a tile batch (`batch.run.columns`); none
imports Ray. `batch.run.pipeline` places them on Ray resources,
`batch.run.local` chains them in one process, and the tests call them
directly. The image logic itself lives in `batch.stages`; this module turns
tile rows into stage inputs and stage outputs into cell tables.

Columns grow and shrink along the way: `read_tiles` adds the decoded
``image``; `DetectStage` adds ``cells`` and, through `crop_tiles`, swaps the
image for the WBC crops (``wbc_crops``), so megabytes of pixels stop at the
detector; `segment_tiles` turns those into ``crops`` (crops + masks);
`ClassifyStage` drops them again.

Fault isolation: an exception in any stage marks the rows it concerns as ``error``
rows with their typed exception (`batch.run.columns.set_error`) and the driver
fails those slides; nothing escapes to kill the run. Per-tile work fails its
tile. A model call over a batch that raises is repeated tile by tile (`batch.run.isolation.by_tile`),
so only the tiles that fail alone fail (cell ids are batching-independent). An
error outside the per-tile work fails every tile of the batch (`isolation.batch_guard`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from batch.config import RUNTIMES, ClassifierSpec, Config
from batch.errors import SlideOpenTimeoutError
from batch.ids import cell_ids
from batch.models import file_sha256, resolve_model, shipped_or_path
from batch.run.columns import (
    TILE_BOX_COLUMNS,
    Batch,
    as_arrays,
    as_table,
    complete_row,
    error_row,
    has_value,
    npz_bytes,
    object_array,
    pack,
    set_error,
    task_at,
)
from batch.run.faults import inject_fault
from batch.run.isolation import batch_guard, by_tile
from batch.run.telemetry import timed
from batch.slides import WHITE, OpenSlides
from batch.slides.deadline import within_deadline
from batch.stages.classify import WbcClassifier
from batch.stages.crop import crop_regions, crop_wbcs, estimate_background, png_bytes
from batch.stages.detect import load_detector
from batch.stages.device import torch_threads_if_loaded
from batch.stages.hierarchy import ChainLink, classify_chain
from batch.stages.segment import MORPHOMETRIC_KEYS, segment_wbc
from batch.tiling import plan_tiles

__all__ = [
    "PlanStage", "plan_slide", "read_tiles", "DetectStage", "crop_tiles", "segment_tiles",
    "SegmentStage", "ClassifyStage", "CellStage", "model_key",
]  # fmt: skip

#: Open slides kept per worker process.
SLIDE_CACHE_SIZE = 8
#: Centre region (detector pixels) used to estimate an unknown mpp from RBC sizes.
MPP_PROBE_SIDE = 1024


# --- plan ------------------------------------------------------------------------------


#: A few open slides per worker process (reads of one slide's tiles reuse the header parse),
#: each held to the version the plan saw: a slide rewritten since is a SlideChangedError.
_SLIDES = OpenSlides(SLIDE_CACHE_SIZE)


def _open(uri: str, config: Config, *, pin: str | None = None, plan: bool = False) -> Any:
    """The slide as it is now (``plan``), or in the version ``pin`` the plan recorded."""
    kw: dict[str, Any] = {
        "storage_options": config.storage.storage_options(),
        "max_pixels": config.slides.max_pixels, "max_pages": config.slides.max_pages,
    }  # fmt: skip
    return _SLIDES.current(uri, **kw) if plan else _SLIDES.pinned(uri, pin, **kw)


class PlanStage:
    """Open a slide's header, settle its mpp, plan its tiles: one row per tile to process.

    A slide that fails to open or plan yields one ``error`` row; a slide with
    nothing to process yields one ``empty`` row.
    """

    def __init__(self, config: Config, trained_mpp: float | None) -> None:
        self.config = config
        self.trained_mpp = trained_mpp
        self._detector: Any = None

    def _estimate_mpp(self, slide: Any) -> float | None:
        """The detector's own scale estimate (RBC sizes, ~7.5 um) on a central region."""
        if self._detector is None:
            d = self.config.detect
            self._detector = load_detector(
                d.model, storage_options=self.config.storage.storage_options(), device="cpu",
                sha256=d.sha256, conf=d.conf, iou=d.iou, max_det=d.max_det,
                wbc_contained=d.wbc_contained,
            )  # fmt: skip
        info = slide.info
        side = MPP_PROBE_SIDE
        x, y = max(0, (info.width - side) // 2), max(0, (info.height - side) // 2)
        region = slide.read_region(x, y, min(side, info.width), min(side, info.height))
        estimate = self._detector.estimate_mpp(region)
        return float(estimate) if estimate is not None else None

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        base = {"slide_id": row["slide_id"], "slide_uri": row["slide_uri"], "n_tiles": 0}
        stage = "open"
        try:
            uri, budget = row["slide_uri"], self.config.slides.open_timeout_s
            late = SlideOpenTimeoutError(uri, f"opening took over {budget:g} s (slides.open_timeout_s)")
            slide = within_deadline(lambda: _open(uri, self.config, plan=True), budget, late)
            stage = "plan"
            mpp, source = slide.info.mpp, "file"
            if mpp is None and row.get("mpp") is not None:
                mpp, source = float(row["mpp"]), row.get("mpp_source") or "manifest"
            if mpp is None and self.config.mpp is not None:
                mpp, source = self.config.mpp, "config"
            if mpp is None:
                mpp, source = self._estimate_mpp(slide), "estimated"
                if mpp is None:
                    source = "unknown"
            plan = plan_tiles(
                _WithMpp(slide, mpp), self.config.tiling, slide_id=row["slide_id"],
                target_mpp=self.trained_mpp,
            )  # fmt: skip
        except Exception as e:  # a bad slide is a failures row, not a crashed job
            return [error_row(base, stage, e)]
        info = slide.info
        slide_json = json.dumps(
            {
                "format": info.format, "width": info.width, "height": info.height,
                "levels": len(info.levels), "mpp": mpp, "mpp_source": source,
                "level_used": plan.level, "tiles_planned": plan.n_planned,
                "tiles_skipped": len(plan.skipped),
                "analysed_um2": (
                    len(plan.tasks) * (plan.stride * plan.downsample * mpp) ** 2 if mpp else None
                ),
                "metadata": row.get("metadata_json"), "pin": slide.pin,
            }
        )  # fmt: skip
        n = len(plan.tasks)
        if n == 0:
            return [{**base, "kind": "empty", "slide_json": slide_json, "mpp": mpp}]
        return [
            {**base, "kind": "tile", "n_tiles": n, "slide_json": slide_json, "mpp": mpp,
             **{k: v for k, v in asdict(t).items() if k not in ("slide_id", "slide_uri")}}
            for t in plan.tasks
        ]  # fmt: skip


_PLANNERS: dict[tuple[str, float | None], PlanStage] = {}


@timed("plan")
def plan_slide(
    row: dict[str, Any], config: Config, trained_mpp: float | None
) -> list[dict[str, Any]]:
    """:class:`PlanStage` as a plain function for Ray tasks; one planner per worker process.

    The planner (and the detector it loads only to estimate an unknown mpp)
    is cached per process, so tasks stay stateless and hold no CPU between slides.
    """
    # Each task gets its own unpickled copy of the config: key the cache by content.
    key = (json.dumps(config.to_dict(), sort_keys=True, default=str), trained_mpp)
    planner = _PLANNERS.get(key)
    if planner is None:
        _PLANNERS.clear()
        planner = _PLANNERS[key] = PlanStage(config, trained_mpp)
    return [complete_row(r) for r in planner(row)]


class _WithMpp:
    """A slide seen with a settled mpp (from the manifest, config or an estimate)."""

    def __init__(self, slide: Any, mpp: float | None) -> None:
        self._slide = slide
        self.uri = slide.uri
        self.info = _InfoWithMpp(slide.info, mpp)

    def read_region(self, *args: Any, **kwargs: Any) -> Any:
        return self._slide.read_region(*args, **kwargs)


class _InfoWithMpp:
    def __init__(self, info: Any, mpp: float | None) -> None:
        self._info = info
        self.mpp = mpp

    def __getattr__(self, name: str) -> Any:
        return getattr(self._info, name)


# --- read --------------------------------------------------------------------------------


@timed("read")
def read_tiles(batch: Batch, config: Config) -> Batch:
    """Read and decode each tile's region, resized to the detector's input size (``image``)."""
    size = config.tiling.tile_size
    images = np.full((len(batch["kind"]), size, size, 3), 255, dtype=np.uint8)
    for i, kind in enumerate(batch["kind"]):
        if kind != "tile":
            continue
        try:
            inject_fault(config, "crash", batch, i)
            inject_fault(config, "read", batch, i)
            pin = json.loads(batch["slide_json"][i] or "{}").get("pin")  # the plan's version
            slide = _open(batch["slide_uri"][i], config, pin=pin)
            region = slide.read_region(
                int(batch["x"][i]), int(batch["y"][i]), int(batch["w"][i]), int(batch["h"][i]),
                level=int(batch["level"][i]),
            )  # fmt: skip
            if region.shape[:2] != (size, size):  # area down; linear up (a coarse slide)
                up = region.shape[1] < size
                interp = cv2.INTER_LINEAR if up else cv2.INTER_AREA
                region = cv2.resize(region, (size, size), interpolation=interp)
            images[i] = region
        except Exception as e:  # this tile's slide fails; the batch's other slides go on
            set_error(batch, i, "read", e)
    return {**batch, "image": images}


# --- detect ----------------------------------------------------------------------------


#: Detector settings that change which boxes come out (placement settings such as actors,
#: device or batch size do not, so they do not change cell ids).
_RESULT_DETECT_FIELDS = ("conf", "iou", "max_det", "agnostic_nms", "wbc_contained")


def model_key(config: Config, detector_sha: str, runtime: str | None = None) -> str:
    """What the cell ids depend on besides slide and box: weights and result-changing settings.

    ``runtime`` is the runtime the detector runs in (``detect.runtime`` "auto" resolved;
    default: ``detect.runtime`` as it is).
    """
    detect = {k: getattr(config.detect, k) for k in _RESULT_DETECT_FIELDS}
    runtime = runtime or config.detect.runtime
    if runtime != "torch":  # float rounding of another runtime moves boxes a hair;
        detect["runtime"] = runtime  # torch's key stays what it always was
    key = json.dumps(
        {"det": detector_sha, "tiling": asdict(config.tiling), "detect": detect}, sort_keys=True
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _runtime_threads(configured: int, share: int) -> int:
    """``detect.runtime_threads``' value for one runtime as ``CellDetector`` takes it.

    0 is the actor's share of the cores (``share``; itself 0 on GPU actors), -1 the runtime's
    own default (``CellDetector``'s 0), N is N.
    """
    return share if configured == 0 else max(configured, 0)


class DetectStage:
    """Run the detector over the tile images; keep boxes whose centre the tile's core owns."""

    def __init__(self, config: Config, threads: int = 0, *, live: bool = False) -> None:
        d = config.detect
        self.config = config
        self.live = live  # hand cells and crops on as objects (one process: `CellStage`)
        self.detector = load_detector(
            d.model, storage_options=config.storage.storage_options(), device=d.device,
            sha256=d.sha256, conf=d.conf, iou=d.iou, max_det=d.max_det, batch_size=d.batch_size,
            agnostic_nms=d.agnostic_nms, runtime=d.runtime, wbc_contained=d.wbc_contained,
            threads={rt: _runtime_threads(d.runtime_threads.get(rt, 0), threads) for rt in RUNTIMES},
        )  # fmt: skip
        torch_threads_if_loaded(threads)
        self.version = self.detector.sha256[:12]
        self.model_key = model_key(config, self.detector.sha256, self.detector.runtime)

    @timed("detect")  # the crop inside it is timed on its own
    def __call__(self, batch: Batch) -> Batch:
        return batch_guard(
            "detect", batch, self._detect_and_crop, drop=("image",), add=("cells", "wbc_crops")
        )

    def _run(self, batch: Batch, rows: list[int], blank: frozenset[int]) -> list[Any]:
        images = []
        for i in rows:
            if i in blank or batch["kind"][i] != "tile":
                images.append(np.full_like(batch["image"][i], WHITE))
                continue
            inject_fault(self.config, "detect", batch, i)
            images.append(batch["image"][i])  # already at the detector's scale (the reader's)
        return list(self.detector.detect(images))

    def _detect_and_crop(self, batch: Batch) -> Batch:
        # Every planned tile row, also those an earlier stage failed (blanked, results dropped):
        # the detector's batches keep the size of a clean run's, and so do its float results.
        planned = [
            i for i, n in enumerate(batch["n_tiles"]) if n > 0 and batch["kind"][i] != "empty"
        ]
        packed: list[Any] = [b""] * len(batch["kind"])
        dets = by_tile(batch, planned, "detect", lambda rows, blank: self._run(batch, rows, blank))
        for i, det in dets.items():
            if batch["kind"][i] != "tile":
                continue
            try:
                packed[i] = _hand_on(self._cells(batch, i, det), self.live)
            except Exception as e:
                set_error(batch, i, "detect", e)
        return crop_tiles({**batch, "cells": object_array(packed)}, self.config, live=self.live)

    def _cells(self, batch: Batch, i: int, det: Any) -> pa.Table:
        t = task_at(batch, i)
        boxes = np.asarray(det.boxes, dtype=np.float64).reshape(-1, 4)  # -> level -> level 0
        x0, y0 = t.to_level0(boxes[:, 0] / t.scale, boxes[:, 1] / t.scale)
        x1, y1 = t.to_level0(boxes[:, 2] / t.scale, boxes[:, 3] / t.scale)
        keep = t.owns((x0 + x1) / 2, (y0 + y1) / 2)
        info = json.loads(batch["slide_json"][i] or "{}")  # boxes end at the slide's edge
        if info.get("width") and info.get("height"):
            s, d = t.scale, t.downsample
            boxes[:, 0::2] = boxes[:, 0::2].clip(-t.x * s, (info["width"] / d - t.x) * s)
            boxes[:, 1::2] = boxes[:, 1::2].clip(-t.y * s, (info["height"] / d - t.y) * s)
            x0, y0 = t.to_level0(boxes[:, 0] / s, boxes[:, 1] / s)
            x1, y1 = t.to_level0(boxes[:, 2] / s, boxes[:, 3] / s)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        labels = np.asarray(det.labels)[keep]
        l0 = np.stack([x0, y0, x1, y1], axis=1)[keep]
        mpp = None if math.isnan(float(batch["mpp"][i])) else float(batch["mpp"][i])
        n = int(keep.sum())
        return pa.table(
            {
                "cell_id": cell_ids(t.slide_id, l0, labels, self.model_key),
                "level": pa.array([t.level] * n, pa.int16()),
                "tile_row": pa.array([t.row] * n, pa.int32()),
                "tile_col": pa.array([t.col] * n, pa.int32()),
                "x0": l0[:, 0], "y0": l0[:, 1], "x1": l0[:, 2], "y1": l0[:, 3],
                "cx": cx[keep], "cy": cy[keep],
                "mpp": pa.array([mpp] * n, pa.float64()),
                "det_class": pa.array(labels.tolist(), pa.string()),
                "det_confidence": pa.array(np.asarray(det.scores)[keep], pa.float32()),
                "detector_version": [self.version] * n,
                "tx0": boxes[keep, 0], "ty0": boxes[keep, 1], "tx1": boxes[keep, 2], "ty1": boxes[keep, 3],
            }
        )  # fmt: skip


# --- crop + segment ----------------------------------------------------------------------


def _hand_on(value: pa.Table | dict[str, npt.NDArray[Any]], live: bool) -> Any:
    """A stage's per-tile output for the next stage: as it is when that stage runs in this
    process (``live``), else bytes for the object store (cells `pack`ed, crops `npz_bytes`,
    no crops ``b""``)."""
    if live:
        return value
    if isinstance(value, pa.Table):
        return pack(value)
    return npz_bytes(value) if value else b""


def _detector_mpp(batch: Batch, i: int) -> float | None:
    mpp = float(batch["mpp"][i])
    if math.isnan(mpp):
        return None
    return float(mpp) * float(batch["downsample"][i]) / float(batch["scale"][i])


@timed("crop")
def crop_tiles(batch: Batch, config: Config, *, live: bool = False) -> Batch:
    """Cut every WBC's crop from its tile image; the tile image goes no further.

    Adds ``wbc_crops`` per tile (``.npz`` bytes: ``crop0, crop1, ...`` in WBC
    row order, ``rows`` and the tile's background colour ``bg``; with ``live``,
    the same arrays as a dict) and drops ``image``, so only crops (kilobytes),
    not decoded tiles (megabytes), travel on to segmentation.
    """
    out: list[Any] = [b""] * len(batch["kind"])
    for i, kind in enumerate(batch["kind"]):
        if kind != "tile" or not has_value(batch["cells"][i]):
            continue
        try:
            inject_fault(config, "crop", batch, i)
            out[i] = _hand_on(_crop_tile(batch, i, config), live)
        except Exception as e:  # this tile's slide fails; the batch's other tiles go on
            set_error(batch, i, "crop", e)
    rest = {k: v for k, v in batch.items() if k != "image"}
    return {**rest, "wbc_crops": object_array(out)}


def _crop_tile(batch: Batch, i: int, config: Config) -> dict[str, npt.NDArray[Any]]:
    cells = as_table(batch["cells"][i])
    wbc = np.flatnonzero(np.asarray(cells.column("det_class").to_pylist()) == "WBC")
    if not len(wbc):
        return {}
    image = batch["image"][i]
    boxes = np.stack([cells.column(c).to_numpy()[wbc] for c in TILE_BOX_COLUMNS], axis=1)
    bg = estimate_background(image)  # for segmenting; past the slide's edge is white glass
    crops = crop_wbcs(image, boxes, margin=config.segmentation.crop_margin, background=(WHITE,) * 3)
    arrays: dict[str, npt.NDArray[Any]] = {f"crop{j}": c for j, c in enumerate(crops)}
    arrays["rows"] = wbc
    arrays["bg"] = np.asarray(bg, np.int64)
    return arrays


@timed("segment")
def segment_tiles(batch: Batch, config: Config, *, live: bool = False) -> Batch:
    """Segment every WBC crop (from `crop_tiles`); adds morphometrics, packs crops + masks.

    With ``live`` the cells stay Arrow tables and the crops + masks a dict of
    arrays (`CellStage`: the next stage runs in the same process).
    """
    crops_out: list[Any] = [b""] * len(batch["kind"])
    cells_out = list(batch["cells"])
    for i, kind in enumerate(batch["kind"]):
        if kind != "tile" or not has_value(batch["cells"][i]):
            continue
        try:
            inject_fault(config, "segment", batch, i)
            cells, arrays = _segment_tile(batch, i, config)
            cells_out[i], crops_out[i] = _hand_on(cells, live), _hand_on(arrays, live)
        except Exception as e:  # this tile's slide fails; the batch's other tiles go on
            set_error(batch, i, "segment", e)
    out = {k: v for k, v in batch.items() if k != "wbc_crops"}
    return {**out, "cells": object_array(cells_out), "crops": object_array(crops_out)}


def _segment_tile(
    batch: Batch, i: int, config: Config
) -> tuple[pa.Table, dict[str, npt.NDArray[Any]]]:
    """Row ``i``'s cells with morphometrics, and its crops + masks (empty: no WBC)."""
    cells = as_table(batch["cells"][i])
    morph = {k: np.full(cells.num_rows, np.nan) for k in MORPHOMETRIC_KEYS}
    arrays: dict[str, npt.NDArray[Any]] = {}
    if has_value(batch["wbc_crops"][i]):
        z = as_arrays(batch["wbc_crops"][i])
        wbc = z["rows"]
        r, g, b = (int(v) for v in z["bg"])
        bg = (r, g, b)
        crops = [z[f"crop{j}"] for j in range(len(wbc))]
        boxes = np.stack([cells.column(c).to_numpy()[wbc] for c in TILE_BOX_COLUMNS], axis=1)
        crop_mpp = _detector_mpp(batch, i) or config.tiling.fallback_mpp
        regions = crop_regions(boxes, margin=config.segmentation.crop_margin)
        masks = []
        for j, (crop, box, reg) in enumerate(zip(crops, boxes, regions, strict=True)):
            cell_box = (box[0] - reg[0], box[1] - reg[1], box[2] - reg[0], box[3] - reg[1])
            seg = segment_wbc(
                crop, mpp=crop_mpp, config=config.segmentation, background=bg,
                cell_box=cell_box,
            )  # fmt: skip
            for k, v in seg.morphometrics().items():
                if k in morph:
                    morph[k][wbc[j]] = v
            masks.append(seg.cell_mask)
            masks.append(seg.nucleus_mask)
        arrays = {f"crop{j}": c for j, c in enumerate(crops)}
        arrays.update({f"cell{j}": m for j, m in enumerate(masks[0::2])})
        arrays.update({f"nucleus{j}": m for j, m in enumerate(masks[1::2])})
        arrays["rows"] = wbc
    for k, values in morph.items():
        cells = cells.append_column(k, pa.array(values, pa.float64(), mask=np.isnan(values)))
    return cells, arrays


class SegmentStage:
    """`segment_tiles` in a long-lived worker (Ray Data actor pool): no process per block."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def __call__(self, batch: Batch) -> Batch:
        return batch_guard("segment", batch, lambda b: segment_tiles(b, self.config),
                            drop=("wbc_crops",), add=("crops",))  # fmt: skip


# --- classify ------------------------------------------------------------------------------


class ClassifyStage:
    """Run every configured classifier over the WBC crops; adds NAME_* columns per classifier."""

    def __init__(self, config: Config, threads: int = 0) -> None:
        self.config = config
        self.classifiers: list[tuple[ClassifierSpec, Any, str]] = []
        for spec in config.classifiers:
            local = resolve_model(  # the pinned hash checked before the classifier loads it
                shipped_or_path(spec.model), storage_options=config.storage.storage_options(),
                sha256=spec.sha256,
            )
            clf = WbcClassifier(
                local, name=spec.name, input_mode=spec.input_mode,
                device=config.detect.device, batch_size=config.execution.classify_batch_size,
                storage_options=config.storage.storage_options(),
                runtime=config.classify.runtime, threads=threads,
            )  # fmt: skip
            self.classifiers.append((spec, clf, file_sha256(clf.model_path)[:12]))
        self.links = [
            ChainLink(s.name, c, s.parent, tuple(s.parent_labels)) for s, c, _ in self.classifiers
        ]
        torch_threads_if_loaded(threads)

    @timed("classify")
    def __call__(self, batch: Batch) -> Batch:
        return batch_guard("classify", batch, self._classify_batch, drop=("crops",), add=())

    def _classify_batch(self, batch: Batch) -> Batch:
        cells_out = list(batch["cells"])
        tiles: dict[int, _TileCrops] = {}
        for i, kind in enumerate(batch["kind"]):
            if kind != "tile" or not has_value(batch["cells"][i]):
                continue
            try:
                tiles[i] = _TileCrops.of(batch, i)
            except Exception as e:  # this tile's slide fails; the batch's other tiles go on
                set_error(batch, i, "classify", e)
        # Every WBC crop of the batch in one call per classifier, not one per tile.
        results = by_tile(
            batch, list(tiles), "classify", lambda rows, blank: self._run(batch, rows, blank, tiles)
        )
        for i, per_classifier in results.items():
            try:
                cells_out[i] = pack(self._columns(tiles[i], per_classifier))
            except Exception as e:
                set_error(batch, i, "classify", e)
        out = {k: v for k, v in batch.items() if k != "crops"}
        return {**out, "cells": object_array(cells_out)}

    def _run(
        self, batch: Batch, rows: list[int], blank: frozenset[int], tiles: dict[int, _TileCrops]
    ) -> list[Any]:
        """Per row: per classifier, (labels, confidences, probabilities) of its WBCs, or None.

        Rows in ``blank`` contribute no crops (their results are dropped).
        """
        rows_in = [i for i in rows if i not in blank]
        for i in rows_in:
            inject_fault(self.config, "classify", batch, i)
        crops = [c for i in rows_in for c in tiles[i].crops]
        masks = [m for i in rows_in for m in tiles[i].cell_masks]
        mpps = [m for i in rows_in for m in [_detector_mpp(batch, i)] * len(tiles[i].crops)]
        results = (
            classify_chain(self.links, crops, masks, mpps) if crops else [None] * len(self.links)
        )
        per_row: list[Any] = []
        offset = 0
        for i in rows:
            if i in blank:
                per_row.append(None)
                continue
            n = len(tiles[i].crops)
            per_row.append(
                [
                    None if r is None else tuple(part[offset : offset + n] for part in r)
                    for r in results
                ]
            )
            offset += n
        return per_row

    def _columns(self, tile: _TileCrops, per_classifier: list[Any]) -> pa.Table:
        """The tile's cells with the classifiers' columns (and crops / masks when exported)."""
        cells, rows = tile.cells, tile.rows
        n = cells.num_rows
        for (spec, _, version), res in zip(self.classifiers, per_classifier, strict=True):
            labels: list[str | None] = [None] * n
            confs = np.full(n, np.nan, np.float32)
            probs: list[list[float] | None] = [None] * n
            if res is not None:
                lab, conf, pr = res
                for j, r in enumerate(rows):
                    labels[r], confs[r] = lab[j], conf[j]
                    probs[r] = None if pr[j] is None else pr[j].tolist()
            cells = cells.append_column(f"{spec.name}_label", pa.array(labels, pa.string()))
            cells = cells.append_column(
                f"{spec.name}_confidence", pa.array(confs, pa.float32(), mask=np.isnan(confs))
            )
            cells = cells.append_column(
                f"{spec.name}_probs", pa.array(probs, pa.list_(pa.float32()))
            )
            cells = cells.append_column(
                f"{spec.name}_version",
                pa.array([version if p is not None else None for p in probs], pa.string()),
            )
        if self.config.export.crops:
            crop_png: list[bytes | None] = [None] * n
            mask_png: list[bytes | None] = [None] * n
            for j, r in enumerate(rows):
                crop_png[r] = png_bytes(cv2.cvtColor(tile.crops[j], cv2.COLOR_RGB2BGR))
                mask_png[r] = png_bytes(tile.nucleus_masks[j].astype(np.uint8) * 255)
            cells = cells.append_column("crop_png", pa.array(crop_png, pa.binary()))
            cells = cells.append_column("mask_png", pa.array(mask_png, pa.binary()))
        return cells.drop(list(TILE_BOX_COLUMNS))


@dataclass
class _TileCrops:
    """One tile's cells and its WBCs' crops and masks (from `segment_tiles`)."""

    cells: pa.Table
    rows: npt.NDArray[np.int64]
    crops: list[npt.NDArray[np.uint8]]
    cell_masks: list[npt.NDArray[np.bool_]]
    nucleus_masks: list[npt.NDArray[np.bool_]]

    @classmethod
    def of(cls, batch: Batch, i: int) -> _TileCrops:
        data = batch["crops"][i]
        z = as_arrays(data) if has_value(data) else None
        rows = z["rows"] if z is not None else np.zeros(0, np.int64)

        def pick(key: str) -> list[Any]:
            return [] if z is None else [z[f"{key}{j}"] for j in range(len(rows))]

        return cls(as_table(batch["cells"][i]), rows, pick("crop"), pick("cell"), pick("nucleus"))


class CellStage:
    """Detect + crop, segment and classify in one worker: the chain a tile goes through.

    With ``read`` it takes planned tile rows and reads their pixels itself
    (`read_tiles`) first. The pipeline's ``fused`` placement (CPU-only
    clusters: one such actor per core) and the in-process chain of ``hemaray
    eval``. Each stage is the same object or function the ``staged``
    placement runs in its own actor pool, so both placements write the same
    cells.
    """

    def __init__(self, config: Config, threads: int = 0, *, read: bool = False) -> None:
        self.config = config
        self.read = read
        self.detect = DetectStage(config, threads, live=True)
        self.classify = ClassifyStage(config, threads)

    def __call__(self, batch: Batch) -> Batch:
        # Each stage isolates its own tiles; this guard catches what falls between them.
        return batch_guard(
            "run", batch, self._chain, drop=("image", "wbc_crops", "crops"), add=("cells",)
        )

    def _chain(self, batch: Batch) -> Batch:
        if self.read:  # planned rows in: decode the tiles here, so pixels never leave the worker
            batch = read_tiles(batch, self.config)
        # Cells and crops go from stage to stage as objects (no Arrow IPC or .npz in between);
        # what leaves the worker is bytes, also where a stage failed with objects in hand.
        out = self.classify(segment_tiles(self.detect(batch), self.config, live=True))
        cells = [pack(c) if isinstance(c, pa.Table) else c for c in out["cells"]]
        return {**out, "cells": object_array(cells)}
