"""Exported networks run in their own runtime on CPU, without ultralytics or torch.

An ultralytics export (`batch.stages.runtime.exported_model` for the
detector, `batch.stages.classify_runtime.exported_classifier` for the
classifiers) is a plain network: an OpenVINO IR or an ONNX graph, dynamic in
batch and image size. Run through ultralytics' predictor it still needs torch
for the tensors around it and torchvision for NMS: about 4.5 s of an actor's
start-up on this project's 2-core machine (torch, ultralytics and their first
call), in every actor of every run, for work that is a few lines of NumPy.
Here the network runs in its runtime and the rest is NumPy:

- :class:`OpenVinoNet`, :class:`OnnxNet`: ``x (N, 3, H, W) float32 -> the
  network's first output``, on ``threads`` intra-op threads (0: the runtime's
  default, every core). OpenVINO's threads are not pinned to cores: it pins a
  process's threads to cores counted from the first on Linux, and two
  1-thread actors then shared one core (`hemaray bench placement` on this
  project's 2-core machine: 2 pinned 1-thread actors 7.93 tiles/s, 1 actor on
  both cores 13.50). OpenVINO keeps its compiled model in the export's cache
  entry (:func:`openvino_cache_dir`).
- :class:`ExportedDetector`: a YOLO detector's export, its input made as
  ultralytics makes it (RGB / 255, NCHW; the tiles come padded to a multiple
  of the stride, so its letterbox does nothing) and its output reduced by
  :func:`yolo_nms`, ultralytics' ``non_max_suppression`` (one label per box)
  in NumPy. Every export's parity check runs through this same class
  (`batch.stages.runtime`), so ``detect.runtime = auto`` judges the code that
  runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from batch.errors import ModelLoadError

__all__ = [
    "DIRECT_RUNTIMES",
    "ExportedDetector",
    "OnnxNet",
    "OpenVinoNet",
    "exported_net",
    "openvino_cache_dir",
    "runs_direct",
    "yolo_nms",
]

#: Exported runtimes run by this module on CPU (TensorRT and PyTorch run through ultralytics).
DIRECT_RUNTIMES = ("onnxruntime", "openvino", "openvino-int8")
#: Ultralytics' NMS settings: at most this many candidates (the most confident) per image,
#: and the per-class coordinate offset that keeps classes apart in class-aware NMS.
MAX_NMS = 30000
MAX_WH = 7680
#: `_greedy_nms` on a grid: at most this many cells, this many candidate pairs per box and
#: this many rounds of settling; beyond, OpenCV's loop (the same boxes, slower).
GRID_MAX_CELLS = 2**21
GRID_MAX_PAIRS_PER_BOX = 256
GRID_MAX_ROUNDS = 64

Detected = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32]]


def openvino_cache_dir(export: Path) -> Path | None:
    """OpenVINO's compiled-model cache for ``export`` (an ``*_openvino_model`` folder), or None.

    Beside the export in its cache entry (``<key>/ov_cache``), so it goes
    with the export it was compiled from. OpenVINO keys each blob by the
    model, device, properties and its own version, and compiles afresh when a
    blob does not match or cannot be read. A cached compile of the INT8
    detector took 0.18 s against 0.52 s here, in every actor of every run.
    None when the entry is not writable (a read-only shared cache): compile.
    """
    cache = export.parent / "ov_cache"
    try:
        cache.mkdir(exist_ok=True)
    except OSError:
        return None
    return cache if os.access(cache, os.W_OK) else None


class OpenVinoNet:
    """An OpenVINO IR folder compiled for the CPU in FP32, threads unpinned when counted.

    On one thread (a fused actor's share of a core): the LATENCY hint. On
    more (``threads`` > 1, or 0: OpenVINO's choice, every core): the
    THROUGHPUT hint, one stream per thread or as OpenVINO sees fit, and a
    batch split across its infer requests, which run at once. The same
    kernels, so the same numbers (checked equal); 7-9 % more FP32 tiles/s
    than one LATENCY request on this project's 2-core machine (19.7-20.1
    against 21.2-21.6 tiles/s, alternating), about the same in INT8.

    With ``images``, the network takes what a detector is given, uint8 RGB
    images ``(N, H, W, 3)``, and makes its float input in the compiled graph
    (to float32, / 255, HWC to CHW: OpenVINO's preprocessing, on the
    inference threads): about 1 ms a 640 px tile saved against the 3.5 ms
    NumPy took for it here, and a quarter of the bytes handed over.
    """

    def __init__(self, export: Path, threads: int, *, images: bool = False) -> None:
        import openvino as ov

        core = ov.Core()
        # FP32 arithmetic whatever the CPU: OpenVINO's default on CPUs with BF16 instructions
        # (AVX512-BF16, AMX) is BF16, which moved a classifier's probabilities by up to 0.05.
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY" if threads == 1 else "THROUGHPUT",
            "INFERENCE_PRECISION_HINT": "f32",
        }
        if threads:
            config |= {"INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": False}
        if threads > 1:
            config["NUM_STREAMS"] = threads
        cache = openvino_cache_dir(export)
        if cache is not None:
            config["CACHE_DIR"] = str(cache)
        (xml,) = sorted(export.glob("*.xml"))
        model = core.read_model(str(xml))
        if images:
            from openvino.preprocess import PrePostProcessor

            ppp = PrePostProcessor(model)
            ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
            ppp.input().model().set_layout(ov.Layout("NCHW"))
            ppp.input().preprocess().convert_element_type(ov.Type.f32).scale(255.0)
            model = ppp.build()
        self.compiled = core.compile_model(model, "CPU", config)
        self.requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._queue = ov.AsyncInferQueue(self.compiled, self.requests) if self.requests > 1 else None

    def __call__(self, x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        if self._queue is None or len(x) < 2:
            return np.asarray(self.compiled(x)[0], np.float32)
        parts = np.array_split(np.arange(len(x)), min(self.requests, len(x)))
        outputs: list[Any] = [None] * len(parts)

        def done(request: Any, k: int) -> None:
            outputs[k] = request.get_output_tensor(0).data.copy()

        self._queue.set_callback(done)
        for k, part in enumerate(parts):
            self._queue.start_async({0: np.ascontiguousarray(x[part[0] : part[-1] + 1])}, k)
        self._queue.wait_all()
        return np.asarray(np.concatenate(outputs), np.float32)


class OnnxNet:
    """An ONNX graph in an ONNX Runtime CPU session."""

    def __init__(self, export: Path, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(export), options, providers=["CPUExecutionProvider"]
        )
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.asarray(self.session.run(None, {self.input: x})[0], np.float32)


def runs_direct(runtime: str, device: str) -> bool:
    """Whether a detector in ``runtime`` on ``device`` runs through :class:`ExportedDetector`."""
    return runtime in DIRECT_RUNTIMES and not device.startswith("cuda")


def exported_net(
    export: Path, runtime: str, *, threads: int, images: bool = False
) -> OpenVinoNet | OnnxNet:
    """The callable network of an export in ``runtime`` (one of :data:`DIRECT_RUNTIMES`).

    ``images``: an OpenVINO network takes uint8 images (see :class:`OpenVinoNet`).
    """
    if runtime not in DIRECT_RUNTIMES:
        raise ModelLoadError(f"{runtime!r} exports do not run directly; use {DIRECT_RUNTIMES}")
    if runtime == "onnxruntime":
        return OnnxNet(export, threads)
    return OpenVinoNet(export, threads, images=images)


def yolo_nms(
    pred: npt.NDArray[np.float32],
    *,
    conf: float,
    iou: float,
    max_det: int,
    agnostic: bool,
    per_class: bool = False,
) -> list[Detected]:
    """Ultralytics' ``non_max_suppression`` on a YOLO head's output.

    ``pred`` is ``(N, 4 + classes, anchors)``: centre x, centre y, width,
    height in input pixels, then class scores. Per image: the best class of
    each anchor (one label per box), kept when its score is above ``conf``;
    the most confident :data:`MAX_NMS`; greedy NMS by descending score, a box
    dropped when its IoU with a kept one is above ``iou`` (across classes
    when ``agnostic``, else classes are offset apart by :data:`MAX_WH`, as
    ultralytics does); the first ``max_det``. ``per_class``: every class an
    anchor scores above ``conf`` is a candidate, suppressed only within its
    class (ultralytics' validation, ``multi_label=True``, what AP is measured
    on; ``agnostic`` is then ignored). Returns ``(xyxy, class ids, scores)``
    per image, most confident first.
    """
    out: list[Detected] = []
    for p in pred:
        scores_all = p[4:].T  # (anchors, classes)
        if per_class:
            anchor, cls = np.nonzero(scores_all > conf)
            score = scores_all[anchor, cls]
        else:
            cls = scores_all.argmax(1)
            score = scores_all[np.arange(len(cls)), cls]
            anchor = np.flatnonzero(score > conf)
            cls, score = cls[anchor], score[anchor]
        if len(anchor) > MAX_NMS:
            top = np.argsort(-score, kind="stable")[:MAX_NMS]
            anchor, cls, score = anchor[top], cls[top], score[top]
        xywh = p[:4, anchor].T
        xyxy = np.empty_like(xywh)
        half = xywh[:, 2:] / 2
        xyxy[:, :2] = xywh[:, :2] - half
        xyxy[:, 2:] = xywh[:, :2] + half
        kept = _greedy_nms(xyxy, score, iou, None if agnostic and not per_class else cls)
        kept = kept[:max_det]
        out.append((xyxy[kept], cls[kept].astype(np.int64), score[kept]))
    return out


def _greedy_nms(
    boxes: npt.NDArray[np.float32],
    scores: npt.NDArray[np.float32],
    iou: float,
    classes: npt.NDArray[np.int64] | None = None,
) -> npt.NDArray[np.intp]:
    """Indices kept by greedy NMS, in descending score order: OpenCV's ``NMSBoxes``, exactly.

    The rule (torchvision's ``nms``): by descending score, a box goes when its
    IoU with a kept, more confident one is above ``iou``; with ``classes``,
    only boxes of one class suppress each other. OpenCV runs it as a loop
    over the kept boxes for every candidate: 8.3 ms for a dense tile's
    ~4,000 candidates (~600 kept) here. Suppression happens only between
    boxes whose IoU is above ``iou``, and such boxes are close: on each axis
    IoU is at most the 1-D IoU of the two intervals, so their centres are
    less than ``(wa + wb) (1 - iou) / (2 (1 + iou))`` apart. Candidates are
    binned on a grid of cells that wide for the tile's largest box, pairs
    are taken from neighbouring cells only, and the greedy order is settled
    on that sparse graph, a round per link of the longest suppression chain:
    3.5 ms per tile with the rest of :func:`yolo_nms`. The IoU is OpenCV's,
    in its arithmetic (float64 rectangles, a float32 result), so the same
    boxes are kept (checked against ``NMSBoxes`` on random clusters with
    ties and on real tiles). Boxes on a grid too fine or too crowded for
    this (degenerate sizes, thousands of boxes on one spot) go to
    ``NMSBoxes`` itself.
    """
    n = len(boxes)
    if not n:
        return np.zeros(0, np.intp)
    order = np.argsort(-np.asarray(scores, np.float32), kind="stable")  # NMSBoxes' stable sort
    b = np.asarray(boxes, np.float64)[order]
    cls = None if classes is None else np.asarray(classes, np.intp)[order]
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    cell = max(float(w.max()), float(h.max())) * (1 - iou) / (1 + iou)
    blocks = 1 if cls is None else int(cls.max()) + 1
    if not cell > 0 or (np.ptp(cx) / cell + 3) * (np.ptp(cy) / cell + 3) * blocks > GRID_MAX_CELLS:
        return order[_opencv_nms(b, cls, iou)]
    # Cell coordinates with an empty margin cell on every side, so the eight neighbours of any
    # cell exist and never wrap into the next row or the next class's block.
    gx = ((cx - cx.min()) / cell).astype(np.intp) + 1
    gy = ((cy - cy.min()) / cell).astype(np.intp) + 1
    ny, nx = int(gy.max()) + 2, int(gx.max()) + 2
    key = gx * ny + gy + (0 if cls is None else cls * (nx * ny))
    count = np.bincount(key, minlength=int(key.max()) + ny + 2)
    first = np.cumsum(count) - count
    by_cell = np.argsort(key, kind="stable")
    offsets = [dx * ny + dy for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
    counts = [count[key + off] for off in offsets]
    if sum(int(c.sum()) for c in counts) > GRID_MAX_PAIRS_PER_BOX * n:
        return order[_opencv_nms(b, cls, iou)]
    hi_parts, lo_parts = [], []
    for off, cnt in zip(offsets, counts, strict=True):
        total = int(cnt.sum())
        if not total:
            continue
        a = np.repeat(np.arange(n), cnt)  # each box, once per box in that neighbouring cell
        pos = np.arange(total) + np.repeat(first[key + off] - (np.cumsum(cnt) - cnt), cnt)
        z = by_cell[pos]
        m = a < z  # each pair once, the more confident box first
        hi_parts.append(a[m])
        lo_parts.append(z[m])
    hi, lo = np.concatenate(hi_parts), np.concatenate(lo_parts)
    suppress = _opencv_overlap(b[hi], b[lo]) > np.float32(iou)
    hi, lo = hi[suppress], lo[suppress]
    state = np.zeros(n, np.int8)  # 0 undecided, 1 kept, 2 suppressed
    for _ in range(GRID_MAX_ROUNDS):
        undecided = state == 0
        if not undecided.any():
            return order[state == 1]
        killed = np.zeros(n, bool)
        killed[lo[state[hi] == 1]] = True
        waiting = np.zeros(n, bool)
        waiting[lo[state[hi] == 0]] = True
        state[undecided & killed] = 2
        state[undecided & ~killed & ~waiting] = 1
    return order[_opencv_nms(b, cls, iou)]  # a suppression chain longer than the rounds


def _opencv_overlap(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """OpenCV's ``rectOverlap`` of ``Rect2d`` pairs (rows ``x1 y1 x2 y2``): ``1 - jaccardDistance``."""
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b
    with np.errstate(divide="ignore", invalid="ignore"):
        distance = np.where(
            union <= np.finfo(np.float64).eps, 0.0, 1.0 - inter / (union - inter)
        )
    return (1.0 - distance).astype(np.float32)


def _opencv_nms(
    boxes: npt.NDArray[np.float64], classes: npt.NDArray[np.intp] | None, iou: float
) -> npt.NDArray[np.intp]:
    """``NMSBoxes`` on boxes already in descending score order (classes offset apart)."""
    import cv2

    xywh = np.array(boxes, np.float64)
    if classes is not None:
        xywh += (classes * float(MAX_WH))[:, None]
    xywh[:, 2:] -= xywh[:, :2]
    ranks = np.linspace(1.0, 0.5, len(xywh), dtype=np.float32)  # the order given, kept
    nms: Any = cv2.dnn.NMSBoxes  # takes arrays; its stubs say sequences
    return np.asarray(nms(xywh, ranks, 0.0, iou), np.intp).reshape(-1)


class ExportedDetector:
    """A YOLO detector's OpenVINO or ONNX export, run without ultralytics (see the module notes)."""

    def __init__(self, export: Path, runtime: str, *, threads: int = 0) -> None:
        self.export = export
        self.runtime = runtime
        self.net = exported_net(export, runtime, threads=threads, images=True)
        self.names = _export_class_names(export, self.net)

    def predict(
        self,
        images: Sequence[npt.NDArray[np.uint8]] | npt.NDArray[np.uint8],
        *,
        conf: float,
        iou: float,
        max_det: int,
        agnostic: bool,
        per_class: bool = False,
    ) -> list[Detected]:
        """Boxes on same-shape RGB images (sides multiples of the stride), in their pixels.

        ``images`` may be one ``(N, H, W, 3)`` uint8 array (not copied for
        OpenVINO). ``per_class``: see `yolo_nms`.
        """
        height, width = images[0].shape[:2]
        if isinstance(self.net, OpenVinoNet):  # makes its float input itself
            x: npt.NDArray[Any] = np.ascontiguousarray(np.asarray(images, np.uint8))
        else:
            x = np.empty((len(images), 3, height, width), np.float32)
            for i, image in enumerate(images):  # RGB planes, one plane at a time (no 4-D copies)
                for c in range(3):
                    x[i, c] = image[..., c]
            np.divide(x, np.float32(255), out=x)  # as ultralytics does: / 255, not * (1 / 255)
        out = []
        for xyxy, cls, score in yolo_nms(
            self.net(x), conf=conf, iou=iou, max_det=max_det, agnostic=agnostic,
            per_class=per_class,
        ):  # fmt: skip
            xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, width)
            xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, height)
            out.append((xyxy, cls, score))
        return out


def _export_class_names(export: Path, net: OpenVinoNet | OnnxNet) -> list[str]:
    """Class names by id, as ultralytics records them with an export.

    An OpenVINO folder holds them in its ``metadata.yaml``; an ONNX graph in
    its metadata properties (``names``, a Python dict literal).
    """
    import ast

    import yaml

    try:
        if isinstance(net, OnnxNet):
            names = ast.literal_eval(net.session.get_modelmeta().custom_metadata_map["names"])
        else:
            names = yaml.safe_load((export / "metadata.yaml").read_text())["names"]
    except (OSError, KeyError, TypeError, ValueError, SyntaxError, yaml.YAMLError) as e:
        raise ModelLoadError(f"export {export} records no readable class names: {e}") from e
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    return [str(n) for n in names]
