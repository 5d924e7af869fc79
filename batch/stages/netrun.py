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
    """An OpenVINO IR folder compiled for the CPU: LATENCY hint, FP32, threads unpinned."""

    def __init__(self, export: Path, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        # FP32 arithmetic whatever the CPU: OpenVINO's default on CPUs with BF16 instructions
        # (AVX512-BF16, AMX) is BF16, which moved a classifier's probabilities by up to 0.05.
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config |= {"INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": False}
        cache = openvino_cache_dir(export)
        if cache is not None:
            config["CACHE_DIR"] = str(cache)
        (xml,) = sorted(export.glob("*.xml"))
        self.compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)

    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.asarray(self.compiled(x)[0], np.float32)


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


def exported_net(export: Path, runtime: str, *, threads: int) -> OpenVinoNet | OnnxNet:
    """The callable network of an export in ``runtime`` (one of :data:`DIRECT_RUNTIMES`)."""
    if runtime not in DIRECT_RUNTIMES:
        raise ModelLoadError(f"{runtime!r} exports do not run directly; use {DIRECT_RUNTIMES}")
    return OnnxNet(export, threads) if runtime == "onnxruntime" else OpenVinoNet(export, threads)


def yolo_nms(
    pred: npt.NDArray[np.float32], *, conf: float, iou: float, max_det: int, agnostic: bool
) -> list[Detected]:
    """Ultralytics' ``non_max_suppression`` (one label per box) on a YOLO head's output.

    ``pred`` is ``(N, 4 + classes, anchors)``: centre x, centre y, width,
    height in input pixels, then class scores. Per image: the best class of
    each anchor, kept when its score is above ``conf``; the most confident
    :data:`MAX_NMS`; greedy NMS by descending score, a box dropped when its
    IoU with a kept one is above ``iou`` (across classes when ``agnostic``,
    else classes are offset apart by :data:`MAX_WH`, as ultralytics does);
    the first ``max_det``. Returns ``(xyxy, class ids, scores)`` per image,
    most confident first.
    """
    out: list[Detected] = []
    for p in pred:
        scores_all = p[4:].T  # (anchors, classes)
        cls = scores_all.argmax(1)
        score = scores_all[np.arange(len(cls)), cls]
        keep = np.flatnonzero(score > conf)
        if len(keep) > MAX_NMS:
            keep = keep[np.argsort(-score[keep], kind="stable")[:MAX_NMS]]
        xywh = p[:4, keep].T
        xyxy = np.empty_like(xywh)
        half = xywh[:, 2:] / 2
        xyxy[:, :2] = xywh[:, :2] - half
        xyxy[:, 2:] = xywh[:, :2] + half
        cls, score = cls[keep], score[keep]
        offset = (cls * (0 if agnostic else MAX_WH)).astype(np.float32)[:, None]
        kept = _greedy_nms(xyxy + offset, score, iou)[:max_det]
        out.append((xyxy[kept], cls[kept].astype(np.int64), score[kept]))
    return out


def _greedy_nms(
    boxes: npt.NDArray[np.float32], scores: npt.NDArray[np.float32], iou: float
) -> npt.NDArray[np.intp]:
    """Indices kept by greedy NMS, in descending score order: torchvision's ``nms``.

    OpenCV's ``NMSBoxes`` on float boxes (``Rect2d``): the same rule (a box
    goes when its IoU with a kept, more confident one is above ``iou``) in
    C++, as fast as torchvision's kernel. A tile's ~2,000 candidates took
    1.8 ms here against 94 ms for a greedy loop in NumPy, and kept the same
    boxes on every parity tile.
    """
    import cv2

    if not len(boxes):
        return np.zeros(0, np.intp)
    xywh = np.array(boxes, np.float64)
    xywh[:, 2:] -= xywh[:, :2]
    nms: Any = cv2.dnn.NMSBoxes  # takes arrays; its stubs say sequences
    kept = nms(xywh, np.asarray(scores, np.float32), 0.0, iou)
    return np.asarray(kept, np.intp).reshape(-1)


class ExportedDetector:
    """A YOLO detector's OpenVINO or ONNX export, run without ultralytics (see the module notes)."""

    def __init__(self, export: Path, runtime: str, *, threads: int = 0) -> None:
        self.export = export
        self.runtime = runtime
        self.net = exported_net(export, runtime, threads=threads)
        self.names = _export_class_names(export, self.net)

    def predict(
        self,
        images: Sequence[npt.NDArray[np.uint8]],
        *,
        conf: float,
        iou: float,
        max_det: int,
        agnostic: bool,
    ) -> list[Detected]:
        """Boxes on same-shape RGB images (sides multiples of the stride), in their pixels."""
        height, width = images[0].shape[:2]
        x = np.empty((len(images), 3, height, width), np.float32)
        for i, image in enumerate(images):  # RGB planes, one plane at a time (no 4-D copies)
            for c in range(3):
                x[i, c] = image[..., c]
        np.divide(x, np.float32(255), out=x)  # as ultralytics does: / 255, not * (1 / 255)
        out = []
        for xyxy, cls, score in yolo_nms(
            self.net(x), conf=conf, iou=iou, max_det=max_det, agnostic=agnostic
        ):
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
