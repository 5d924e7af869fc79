"""Detect RBCs, WBCs and platelets on batches of RGB tiles with an ultralytics YOLO model.

A detector works at one scale, the microns per pixel (mpp) its model was
trained at (``trained_mpp``, read from the model card). ``CellDetector.detect``
resamples every tile from its own mpp to that scale, pads the batch to one
shape that is a multiple of the network stride (bottom / right only, so no
offset is introduced), runs the network once per batch without any further
resizing, and maps the boxes back.

Guarantee: boxes are ``xyxy`` in the *input* tile's pixel coordinates,
clipped to the tile, whatever the tile's mpp; a tile already at the trained
mpp (or given ``mpp=None``) is not resampled at all, so the same pixels give
the same boxes whether they arrive alone or in a batch (up to the padding of
the batch, which is never inside the tile).

Device: ``"auto"`` picks CUDA when available, else CPU; half precision is
used on CUDA only (``half="auto"``). The same code path runs on both.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from batch.config import DetectConfig
from batch.errors import ModelLoadError
from batch.models import ModelCard, file_sha256, load_yolo, read_model_card, resolve_model
from batch.stages.autoruntime import RuntimeChoice, choose_runtime
from batch.stages.boxscore import DETECTOR_CLASSES, normalize_class_name
from batch.stages.device import keep_torch_threads, select_device
from batch.stages.netrun import ExportedDetector, runs_direct
from batch.stages.preprocess import resample
from batch.stages.runtime import (
    EXPORT_BATCH,
    EXPORT_IMGSZ,
    device_facts,
    exported_model,
)

__all__ = [
    "DETECTOR_CLASSES",
    "MPP_CANDIDATES",
    "PAD_VALUE",
    "RBC_DIAMETER_UM",
    "CellDetector",
    "Detections",
    "estimate_mpp_from_rbc",
    "normalize_class_name",
    "load_detector",
]

log = logging.getLogger(__name__)

#: Side of the blank image of the warm-up prediction (a multiple of the network stride).
WARMUP_PX = 64
#: Diameter of a normal red blood cell (micrometres) used to estimate an image's scale.
RBC_DIAMETER_UM = 7.5
#: Fewest RBC boxes from which a scale estimate is trusted.
MIN_RBC_FOR_MPP = 3
#: Padded batch sides are multiples of this (the network's largest stride).
STRIDE = 32
#: Grey used to pad (ultralytics' letterbox value; the model saw it in training).
PAD_VALUE = 114
#: ``quantize`` value of half precision in ultralytics >= 8.4.
HALF_BITS = 16
#: NMS time limit per image of a per-class prediction (ultralytics' 0.05 s cuts a CPU's AP short).
NMS_SECONDS_PER_IMAGE = 5.0
#: Detector class name of white blood cells (the class `keep_uncontained` dedupes).
WBC = "WBC"
#: Assumed scales tried by ``CellDetector.estimate_mpp`` (um/px): 100x oil to 20x,
#: a factor ~1.4 apart, so any true scale is within ~1.2x of one of them.
MPP_CANDIDATES: tuple[float, ...] = (0.045, 0.065, 0.09, 0.125, 0.18, 0.25, 0.35, 0.5)

def estimate_mpp_from_rbc(
    boxes: npt.ArrayLike,
    classes: Sequence[str] | npt.ArrayLike,
    *,
    names: Sequence[str] | None = None,
    image_shape: tuple[int, int] | None = None,
    rbc_diameter_um: float = RBC_DIAMETER_UM,
    min_cells: int = MIN_RBC_FOR_MPP,
) -> float | None:
    """Estimate an image's microns per pixel from its red blood cells.

    The diameter of a box is ``max(width, height)``: a cell cut by the image
    edge keeps its full extent along the edge, so the larger side is the
    robust one. The estimate is ``rbc_diameter_um / median(diameter)``.

    Parameters
    ----------
    boxes
        ``(N, 4)`` ``xyxy`` boxes in the image's pixels.
    classes
        ``N`` class names (any spelling ``normalize_class_name`` knows), or
        ``N`` integer ids together with ``names``.
    names
        Class names by id, when ``classes`` holds ids.
    image_shape
        ``(height, width)``; when given, boxes touching the border are left out
        (unless that leaves fewer than ``min_cells``).
    rbc_diameter_um
        Assumed RBC diameter in micrometres.
    min_cells
        Fewest RBC boxes needed; fewer gives None.

    Returns
    -------
    float or None
        The estimated mpp, or None with too few RBCs.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cls = np.asarray(classes)
    if cls.shape[0] != b.shape[0]:
        raise ValueError(f"got {b.shape[0]} boxes but {cls.shape[0]} classes")
    if cls.size and np.issubdtype(cls.dtype, np.integer):
        if names is None:
            raise ValueError("integer classes need `names` (class names by id)")
        cls = np.asarray([names[int(i)] for i in cls])
    is_rbc = np.asarray([normalize_class_name(str(c)) == "RBC" for c in cls], dtype=bool)
    rbc = b[is_rbc]
    if image_shape is not None and len(rbc):
        h, w = image_shape
        inner = (rbc[:, 0] > 1) & (rbc[:, 1] > 1) & (rbc[:, 2] < w - 1) & (rbc[:, 3] < h - 1)
        if inner.sum() >= min_cells:
            rbc = rbc[inner]
    if len(rbc) < min_cells:
        return None
    diam = np.maximum(rbc[:, 2] - rbc[:, 0], rbc[:, 3] - rbc[:, 1])
    median = float(np.median(diam))
    if median <= 0:
        return None
    return rbc_diameter_um / median


class Detections(NamedTuple):
    """Detections of one tile.

    Attributes
    ----------
    boxes
        ``(N, 4)`` float32 ``xyxy`` in the input tile's pixels.
    class_ids
        ``(N,)`` int64 ids into ``names``.
    scores
        ``(N,)`` float32 confidences.
    names
        Class names by id (canonical spelling).
    """

    boxes: npt.NDArray[np.float32]
    class_ids: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    names: tuple[str, ...]

    @property
    def labels(self) -> npt.NDArray[np.str_]:
        """Class name of each box."""
        if not len(self.class_ids):
            return np.zeros(0, dtype="<U8")
        return np.asarray(self.names)[self.class_ids]

    def __len__(self) -> int:  # type: ignore[override]
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls, names: tuple[str, ...]) -> Detections:
        """No detections."""
        return cls(
            np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32), names
        )


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


class CellDetector:
    """RBC / WBC / platelet detector over batches of RGB tiles.

    Parameters
    ----------
    model_path
        Local path or fsspec URL of an ultralytics ``.pt``; None: the shipped
        detector. Its model card supplies ``trained_mpp``.
    device
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda:0"``, ...
    half
        ``"auto"``: half precision on CUDA only; or an explicit bool.
    conf, iou, max_det
        Confidence threshold, NMS IoU and boxes kept per tile (defaults:
        `batch.config.DetectConfig`).
    batch_size
        Tiles per forward pass.
    trained_mpp
        Override the card's trained mpp (for a plain ultralytics ``.pt``
        without a card). None with no card: tiles are never resampled.
    storage_options
        fsspec options for a remote ``model_path``.
    agnostic_nms
        Class-agnostic NMS (default): overlapping boxes of different classes
        are one cell, kept once with its most confident class.
    runtime
        ``"torch"`` (the default here), ``"onnxruntime"``, ``"openvino"``,
        ``"openvino-int8"``, ``"tensorrt"`` (`batch.stages.runtime`): the same
        pre- and post-processing around another runtime's forward pass; or
        ``"auto"`` (`batch.stages.autoruntime`; the run's default,
        ``detect.runtime``): ``runtime`` then holds the runtime chosen and
        ``runtime_choice`` why.
    threads
        Intra-op threads of an exported runtime on CPU (ONNX Runtime, OpenVINO),
        or one count per runtime (the one that runs is used; ``auto`` resolved
        first); 0: the runtime's default (every core). OpenVINO's threads are
        not pinned to cores (`batch.stages.netrun`).
        Torch's threads are the process's.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        device: str = "auto",
        half: bool | str = "auto",
        conf: float = DetectConfig.conf,
        iou: float = DetectConfig.iou,
        max_det: int = DetectConfig.max_det,
        batch_size: int = DetectConfig.batch_size,
        trained_mpp: float | None = None,
        storage_options: dict[str, Any] | None = None,
        agnostic_nms: bool = True,
        runtime: str = "torch",
        threads: int | Mapping[str, int] = 0,
        wbc_contained: float = DetectConfig.wbc_contained,
    ) -> None:
        if not 0 <= conf <= 1 or not 0 < iou <= 1:
            raise ValueError(f"conf must be in [0, 1] and iou in (0, 1]; got {conf}, {iou}")
        if not 0 <= wbc_contained <= 1:
            raise ValueError(f"wbc_contained must be in [0, 1]; got {wbc_contained}")
        if max_det < 1 or batch_size < 1:
            raise ValueError(f"max_det and batch_size must be >= 1; got {max_det}, {batch_size}")
        self.weights_path = resolve_model(model_path, storage_options=storage_options)
        self.sha256 = file_sha256(self.weights_path)
        self.card: ModelCard | None = read_model_card(self.weights_path)
        self._trained_mpp = (
            trained_mpp
            if trained_mpp is not None
            else (self.card.trained_mpp if self.card is not None else None)
        )
        if self._trained_mpp is None:
            log.warning(
                "%s has no trained mpp (no model card); tiles are used at their given scale",
                self.weights_path,
            )
        self.device = select_device(device)
        self.half = self.device.startswith("cuda") if half == "auto" else bool(half)
        self.conf = conf
        self.iou = iou
        self.max_det = max_det
        self.batch_size = batch_size
        # One object is one cell: suppress overlapping boxes across classes too, so a cell the
        # network half-believes is a WBC and half an RBC gives one row, not two.
        self.agnostic_nms = agnostic_nms
        self.wbc_contained = wbc_contained
        self.runtime_choice: RuntimeChoice | None = None
        if runtime == "auto":
            self.runtime_choice = choose_runtime(self.weights_path, self.device)
            runtime = self.runtime_choice.runtime
        if runtime == "tensorrt" and batch_size > EXPORT_BATCH:
            raise ModelLoadError(
                f"detect.batch_size {batch_size} exceeds the TensorRT engine's largest batch "
                f"({EXPORT_BATCH}, batch.stages.runtime.EXPORT_BATCH); lower it"
            )
        self.runtime = runtime
        self.threads = threads if isinstance(threads, int) else threads.get(runtime, 0)
        self._model, raw_names = self._load()
        self._names = tuple(normalize_class_name(n) for n in raw_names)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names by id, normalised to ``"RBC"``, ``"WBC"``, ``"platelet"``."""
        return self._names

    @property
    def trained_mpp(self) -> float | None:
        """Microns per pixel the model expects (None: unknown, no resampling)."""
        return self._trained_mpp

    def scale_for(self, mpp: float | None) -> float:
        """Resize factor from a tile at ``mpp`` to the model's scale (1 when either is unknown)."""
        if mpp is None or self._trained_mpp is None:
            return 1.0
        if mpp <= 0:
            raise ValueError(f"mpp must be > 0, got {mpp}")
        return float(mpp) / self._trained_mpp

    def detect(
        self,
        tiles: Sequence[npt.NDArray[np.uint8]],
        mpp: float | Sequence[float | None] | None = None,
        *,
        conf: float | None = None,
        per_class: bool = False,
    ) -> list[Detections]:
        """Detect cells on RGB tiles.

        Parameters
        ----------
        tiles
            RGB ``uint8`` arrays ``(H, W, 3)``; sizes may differ.
        mpp
            Microns per pixel of the tiles: one value for all, one per tile,
            or None (tiles are already at ``trained_mpp``).
        conf
            Override the confidence threshold for this call (e.g. 0.001 for mAP).
        per_class
            Every class a box scores above ``conf`` is a box of its own,
            suppressed only within its class: the candidates AP is measured on
            (ultralytics' validation; `batch.eval.detector`). Default: one
            label per box, the detector's NMS, as a run keeps cells.

        Returns
        -------
        list of Detections
            One per tile, boxes in that tile's pixel coordinates.
        """
        n = len(tiles)
        if mpp is None or isinstance(mpp, (int, float)):
            mpps: list[float | None] = [None if mpp is None else float(mpp)] * n
        else:
            mpps = list(mpp)
            if len(mpps) != n:
                raise ValueError(f"got {n} tiles but {len(mpps)} mpp values")
        out: list[Detections] = []
        for start in range(0, n, self.batch_size):
            batch = tiles[start : start + self.batch_size]
            scales = [self.scale_for(m) for m in mpps[start : start + self.batch_size]]
            out.extend(
                self._detect_batch(batch, scales, self.conf if conf is None else conf, per_class)
            )
        return out

    def _detect_batch(
        self,
        tiles: Sequence[npt.NDArray[np.uint8]],
        scales: Sequence[float],
        conf: float,
        per_class: bool = False,
    ) -> list[Detections]:
        resized: list[npt.NDArray[np.uint8]] = []
        for i, tile in enumerate(tiles):
            if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
                raise ValueError(
                    f"tile {i}: expected an RGB uint8 array (H, W, 3), got {tile.dtype} {tile.shape}"
                )
            resized.append(resample(tile, scales[i]))
        height = _round_up(max(r.shape[0] for r in resized), STRIDE)
        width = _round_up(max(r.shape[1] for r in resized), STRIDE)
        rgb = isinstance(self._model, ExportedDetector)  # takes RGB as it is, in one array
        batch = np.full((len(resized), height, width, 3), PAD_VALUE, dtype=np.uint8)
        for canvas, r in zip(batch, resized, strict=True):
            # ultralytics takes BGR arrays (the cv2 convention).
            canvas[: r.shape[0], : r.shape[1]] = r if rgb else r[..., ::-1]
        out = []
        for tile, r, (xyxy, cls, score) in zip(
            tiles, resized, self._predict(batch, conf, per_class), strict=True
        ):
            if not len(xyxy):
                out.append(Detections.empty(self._names))
                continue
            mapped = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4).copy()
            # Map from resampled pixels back to the input tile's pixels.
            mapped[:, [0, 2]] *= tile.shape[1] / r.shape[1]
            mapped[:, [1, 3]] *= tile.shape[0] / r.shape[0]
            mapped[:, [0, 2]] = mapped[:, [0, 2]].clip(0, tile.shape[1])
            mapped[:, [1, 3]] = mapped[:, [1, 3]].clip(0, tile.shape[0])
            ids = np.asarray(cls, dtype=np.int64).reshape(-1)
            scores = np.asarray(score, dtype=np.float32).reshape(-1)
            if self.wbc_contained > 0 and WBC in self._names:
                keep = keep_uncontained(
                    mapped, scores, ids == self._names.index(WBC), self.wbc_contained
                )
                mapped, ids, scores = mapped[keep], ids[keep], scores[keep]
            out.append(Detections(mapped.astype(np.float32), ids, scores, self._names))
        return out

    def _load(self) -> tuple[Any, list[str]]:
        """Load the network; return it and its raw class names by id."""
        if runs_direct(self.runtime, self.device):
            # OpenVINO / ONNX Runtime on CPU: the export in its runtime, NumPy around it; no torch,
            # no ultralytics in the process (`batch.stages.netrun`).
            export = exported_model(self.weights_path, self.runtime, facts=device_facts(self.device))
            direct = ExportedDetector(export, self.runtime, threads=self.threads)
            return direct, direct.names
        # An exported model is loaded (and a device selected) when its names are first read.
        with keep_torch_threads():
            export = exported_model(
                self.weights_path, self.runtime, facts=device_facts(self.device)
            )
            model = load_yolo(export, task="detect")
            # Ultralytics fuses conv + batch-norm on its first prediction, and fused layers give
            # boxes a hair different from unfused ones: predict once on a blank image here, so
            # every real batch (the first of an actor too) runs the same fused network and the
            # cell ids (rounded boxes) do not depend on which batch an actor saw first.
            # An exported model is compiled by that first prediction too (at a full tile's size:
            # a TensorRT engine's smallest input is not known here).
            side = WARMUP_PX if self.runtime == "torch" else EXPORT_IMGSZ
            model.predict(np.full((side, side, 3), 255, np.uint8), imgsz=side,
                          device=self.device, verbose=False)  # fmt: skip
            # Names after that prediction: an exported model has none until ultralytics builds
            # its backend, and reading them first built (compiled) a second one to read them from.
            raw = model.names
        ids = sorted(raw) if isinstance(raw, dict) else list(range(len(raw)))
        return model, [str(raw[i]) for i in ids]

    def _precision_kwargs(self) -> dict[str, Any]:
        """Half precision in the spelling of the installed ultralytics.

        Ultralytics >= 8.4 reads ``quantize=16`` (``half`` is deprecated);
        8.3 reads ``half=True``. Full precision needs no argument.
        """
        if not self.half or self.runtime != "torch":
            return {}
        from ultralytics.cfg import DEFAULT_CFG_DICT

        return {"quantize": HALF_BITS} if "quantize" in DEFAULT_CFG_DICT else {"half": True}

    def _predict(
        self, batch: npt.NDArray[np.uint8], conf: float, per_class: bool = False
    ) -> list[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
        """Run the network on same-shape images (BGR; RGB for an `ExportedDetector`), in their pixels.

        ``imgsz`` equals the images' shape (a multiple of ``STRIDE``), so
        ultralytics' letterbox neither resizes nor pads them. ``per_class``:
        see `detect`.
        """
        if isinstance(self._model, ExportedDetector):
            return self._model.predict(
                batch, conf=conf, iou=self.iou, max_det=self.max_det,
                agnostic=self.agnostic_nms, per_class=per_class,
            )  # fmt: skip
        height, width = batch[0].shape[:2]
        with keep_torch_threads():
            results = self._model.predict(
                list(batch),  # a list of images (ultralytics reads one array as one image)
                # Always named: ultralytics keeps the last predictor when none is given.
                predictor=_predictor_class(per_class),
                imgsz=[height, width],
                conf=conf,
                iou=self.iou,
                max_det=self.max_det,
                agnostic_nms=self.agnostic_nms,
                device=self.device,
                verbose=False,
                **self._precision_kwargs(),
            )
        out = []
        for res in results:
            boxes = res.boxes
            if boxes is None or len(boxes) == 0:
                out.append(
                    (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))
                )
                continue
            out.append(
                (
                    boxes.xyxy.float().cpu().numpy(),
                    boxes.cls.cpu().numpy().astype(np.int64),
                    boxes.conf.float().cpu().numpy(),
                )
            )
        return out

    def estimate_mpp(
        self,
        image: npt.NDArray[np.uint8],
        candidates: Sequence[float] = MPP_CANDIDATES,
    ) -> float | None:
        """Estimate an RGB image's mpp from the RBCs the detector finds on it.

        A detector trained at one scale draws boxes near the RBC size it was
        trained on, pulled towards the true size: detected under an assumed
        scale finer than the truth, the RBC boxes say the image is coarser
        than assumed, and vice versa. The true scale is where the two agree.
        So the image is detected under each assumed scale in ``candidates``,
        from the finest (smallest, cheapest resampled image) up; each pass
        gives an estimate (``estimate_mpp_from_rbc``), and the search stops
        at the first pair of passes where ``estimate / assumed`` crosses 1,
        interpolating the crossing in log scale. A last pass at the crossing
        gives the answer. With no crossing, the pass at the nearest end of
        ``candidates`` is used. Needs a model with a trained mpp and an RBC class.

        Measured with the shipped detector: synthetic fields drawn at 0.25 and
        resized to 0.125 / 0.5 um/px come back ~5% fine; on TXL-PBC validation
        photos the estimate is within 5% of the scale their labelled RBCs give
        (median ratio 1.01, 10-90% 0.99-1.05), and detection metrics at the
        estimated scale equal those at the labelled scale (model card,
        ``val/mpp_auto``). An
        under-trained model draws RBC boxes at its own preferred size
        whatever the scale (an epoch-7 checkpoint was off by up to 75% on
        BCCD), so re-check this on a new model; give the mpp when it is known.

        Returns
        -------
        float or None
            The estimate, or None when no pass finds enough RBCs.
        """
        if self._trained_mpp is None:
            raise ValueError("estimate_mpp needs a model with a trained mpp (model card)")
        if "RBC" not in self._names:
            raise ValueError(f"estimate_mpp needs an RBC class; model classes: {self._names}")
        shape = (int(image.shape[0]), int(image.shape[1]))

        def estimate(assumed: float) -> float | None:
            det = self.detect([image], assumed)[0]
            rbc = det.labels == "RBC"
            return estimate_mpp_from_rbc(det.boxes[rbc], det.labels[rbc], image_shape=shape)

        passes: list[tuple[float, float]] = []  # (log assumed, log(estimate / assumed))
        crossing: float | None = None
        for assumed in sorted(candidates):
            est = estimate(assumed)
            if est is None:
                continue
            log_m, gap = math.log(assumed), math.log(est / assumed)
            if passes and passes[-1][1] > 0 >= gap:
                prev_m, prev_gap = passes[-1]
                crossing = math.exp(prev_m + (log_m - prev_m) * prev_gap / (prev_gap - gap))
                break
            passes.append((log_m, gap))
        if crossing is None:
            if not passes:
                return None
            # All passes say "coarser" (gap > 0): the truth is past the coarsest candidate.
            log_m, gap = passes[-1] if passes[-1][1] > 0 else passes[0]
            return math.exp(log_m + gap)
        final = estimate(crossing)
        return final if final is not None else crossing


@functools.cache  # one class each: ultralytics rebuilds its predictor when the class changes
def _predictor_class(per_class: bool) -> type:
    """Ultralytics' detection predictor, or one with its validator's NMS (``per_class``).

    The validator's NMS (``multi_label=True``, class-aware) makes every class
    a box scores above ``conf`` a candidate of its own; the predictor's keeps
    one label per box. ``max_time_img`` is raised so a CPU never cuts the
    many low-confidence candidates of an AP short.
    """
    from ultralytics.models.yolo.detect import DetectionPredictor

    if not per_class:
        return DetectionPredictor
    from ultralytics.utils import nms

    class PerClassPredictor(DetectionPredictor):  # type: ignore[misc]
        def postprocess(self, preds: Any, img: Any, orig_imgs: Any, **kwargs: Any) -> Any:
            kept = nms.non_max_suppression(
                preds, self.args.conf, self.args.iou, multi_label=True, agnostic=False,
                max_det=self.args.max_det, max_time_img=NMS_SECONDS_PER_IMAGE,
                end2end=getattr(self.model, "end2end", False),
            )  # fmt: skip
            return self.construct_results(kept, img, orig_imgs)

    return PerClassPredictor


def keep_uncontained(
    boxes: npt.NDArray[np.float64],
    scores: npt.NDArray[np.float32],
    among: npt.NDArray[np.bool_],
    threshold: float,
) -> npt.NDArray[np.bool_]:
    """Rows to keep: each box of ``among`` mostly inside a higher-scoring one of ``among`` goes.

    Greedy in score order (ties by row): a box is dropped when its intersection
    with a box already kept covers at least ``threshold`` of the smaller of the
    two. Rows outside ``among`` are always kept.
    """
    keep = np.ones(len(boxes), dtype=bool)
    idx = np.flatnonzero(among)
    if len(idx) < 2:
        return keep
    idx = idx[np.argsort(-scores[idx], kind="stable")]
    b = boxes[idx]
    area = np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)
    iw = np.clip(np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]), 0, None)
    smaller = np.minimum(area[:, None], area[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        covered = np.where(smaller > 0, iw * ih / smaller, 0.0) >= threshold
    kept: list[int] = []
    for i in range(len(idx)):
        if any(covered[i, j] for j in kept):
            keep[idx[i]] = False
        else:
            kept.append(i)
    return keep


def load_detector(
    path: str | Path | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    sha256: str | None = None,
    **kwargs: Any,
) -> CellDetector:
    """Load a cell detector; default: the shipped ``batch/models/detector.pt``.

    Parameters
    ----------
    path
        Local path or fsspec URL of an ultralytics ``.pt``; None: the shipped one.
    storage_options
        fsspec options for remote URLs.
    sha256
        Expected SHA-256 of the weights.
    **kwargs
        Passed to ``CellDetector`` (``device``, ``conf``, ``max_det``, ...).
    """
    local = resolve_model(path, storage_options=storage_options, sha256=sha256)
    return CellDetector(local, **kwargs)
