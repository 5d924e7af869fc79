"""Which inference runtime runs a detector: PyTorch, ONNX Runtime, OpenVINO (FP32 or INT8), TensorRT.

An ultralytics ``.pt`` runs as it is in PyTorch (``torch``). For the other
runtimes it is exported once, offline, with ultralytics' own exporter (the
packages come with the project's install; nothing is downloaded), into the
model cache (`batch.models.model_cache_dir`) under a key made of the weights'
SHA-256, the export settings and the runtime package's version (and, for a
TensorRT engine, the GPU model: an engine runs only on the GPU model and
TensorRT version that built it), so new weights, settings, packages or GPUs
never reuse a stale export. The detector's resampling, padding and box mapping
are the same code for every runtime. TensorRT engines (and PyTorch) run
through ultralytics' ``predict``; OpenVINO and ONNX Runtime exports on CPU run
in their runtime with NumPy around them, ultralytics' NMS included
(`batch.stages.netrun`), so a CPU worker imports neither torch nor ultralytics.

- ``onnxruntime``, ``openvino``: FP32, dynamic in batch and image size (the
  detector pads a batch to a multiple of the stride, whatever its tiles' sizes).
- ``openvino-int8``: the OpenVINO FP32 model quantized by NNCF post-training
  quantization (`batch.stages.quantize`), calibrated on synthetic slide tiles.
- ``tensorrt``: an FP16 engine built on the CUDA device it will run on.

Every export is checked against PyTorch when it is made: both predict on the
same synthetic slide tiles (:func:`parity_tiles`) and :func:`detection_parity`
compares the boxes (an FP32 export must give PyTorch's boxes up to rounding;
a quantized one the same cells, see `batch.stages.parity`). The figures are
kept beside the export (``parity.json``);
``detect.runtime = auto`` (`batch.stages.autoruntime`) never picks a runtime
whose export failed them. Concurrent exports of one key (several actors
starting at once) are serialised by a file lock, and an export appears under
its final name only when complete (parity included).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from batch.config import RUNTIMES, DetectConfig
from batch.errors import ModelLoadError
from batch.models import file_sha256, load_yolo, model_cache_dir, read_model_card
from batch.stages.netrun import DIRECT_RUNTIMES, ExportedDetector, runs_direct
from batch.stages.parity import (
    PARITY_IOU,
    QUANTIZED_IOU,
    Boxes,
    detection_parity,
    parity_passed,
)

__all__ = [
    "EXPORT_FORMATS",
    "QUANTIZED_RUNTIMES",
    "RUNTIMES",
    "RUNTIME_PACKAGES",
    "DeviceFacts",
    "device_facts",
    "export_key",
    "exported_model",
    "file_lock",
    "judge_parity",
    "parity_iou",
    "parity_tiles",
    "read_parity",
]

log = logging.getLogger(__name__)

#: Ultralytics export format of each runtime ultralytics exports itself (INT8 derives from FP32).
EXPORT_FORMATS: dict[str, str] = {"onnxruntime": "onnx", "openvino": "openvino", "tensorrt": "engine"}
#: The Python module each runtime needs.
RUNTIME_PACKAGES: dict[str, str] = {
    "torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino",
    "openvino-int8": "openvino", "tensorrt": "tensorrt",
}  # fmt: skip
#: Distribution names where they differ from the module (for the version in the cache key).
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {"tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu11")}
#: What the exported runtime's files are called: ONNX file, OpenVINO folder, TensorRT engine.
_EXPORT_SUFFIX: dict[str, str] = {
    "onnxruntime": ".onnx", "openvino": "_openvino_model", "openvino-int8": "_openvino_model",
    "tensorrt": ".engine",
}  # fmt: skip
#: Export settings that change the exported file (part of its cache key). FP32 on CPU; the
#: TensorRT engine is FP16, the standard precision on GPUs.
EXPORT_SETTINGS: dict[str, dict[str, object]] = {
    "onnxruntime": {"dynamic": True, "half": False, "simplify": True},
    "openvino": {"dynamic": True, "half": False},
    "tensorrt": {"dynamic": True, "half": True, "simplify": True},
}
#: Image size ultralytics traces the export at (the graph stays dynamic).
EXPORT_IMGSZ = 640
#: Largest batch a dynamic export is traced for (TensorRT's optimisation profile's maximum).
EXPORT_BATCH = 16
#: Folder under the model cache that holds exports.
EXPORTS_DIR = "exports"
#: Parity record kept beside each export.
PARITY_FILE = "parity.json"

#: Parity tiles: one synthetic slide of PARITY_SLIDE_PX a side at the detector's trained mpp,
#: cut into EXPORT_IMGSZ tiles (9 tiles, ~2,300 boxes of the shipped detector).
PARITY_SLIDE_PX = 1920
PARITY_SEED = 20517
#: Runtimes whose weights are quantized: their parity rule is the quantized one (same cells).
QUANTIZED_RUNTIMES = frozenset({"openvino-int8"})
#: Scale of the parity tiles of a detector without a trained mpp (the synthetic smears' own).
SYNTH_MPP = 0.25


@dataclass(frozen=True)
class DeviceFacts:
    """What decides which runtimes can run and which export fits: device, GPU model, packages."""

    #: ``"cpu"`` or ``"cuda:N"``.
    device: str
    #: The CUDA device's name (``torch.cuda.get_device_name``); None on CPU.
    gpu_name: str | None = None
    #: Version of each runtime's module (RUNTIME_PACKAGES values); None: not importable.
    versions: dict[str, str | None] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def installed(self, runtime: str) -> bool:
        return self.versions.get(RUNTIME_PACKAGES[runtime]) is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _module_version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    for dist in _DISTRIBUTIONS.get(module, (module,)):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return "unknown"


def device_facts(device: str) -> DeviceFacts:
    """The facts of ``device`` (``"cpu"``, ``"cuda:N"``; resolve ``"auto"`` first) on this host."""
    gpu_name = None
    if device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or 0)
        gpu_name = str(torch.cuda.get_device_name(index))
    versions = {m: _module_version(m) for m in sorted(set(RUNTIME_PACKAGES.values()))}
    return DeviceFacts(device=device, gpu_name=gpu_name, versions=versions)


def export_key(sha256: str, runtime: str, facts: DeviceFacts) -> str:
    """Cache key of ``runtime``'s export of the weights with ``sha256``, for ``facts``' host.

    The key holds the export settings and the runtime package's version; a
    TensorRT engine's key also holds the GPU model, since an engine runs only
    on the GPU model and TensorRT version that built it.
    """
    from batch.stages.quantize import quantize_settings

    settings: dict[str, object] = {
        "runtime": runtime, "imgsz": EXPORT_IMGSZ, "batch": EXPORT_BATCH,
        "version": facts.versions.get(RUNTIME_PACKAGES[runtime]),
        "parity": [PARITY_SLIDE_PX, PARITY_SEED],
        **EXPORT_SETTINGS.get(runtime, EXPORT_SETTINGS["openvino"]),
    }  # fmt: skip
    if runtime in DIRECT_RUNTIMES:  # checked (parity) and run through batch.stages.netrun
        settings["runner"] = "netrun"
    if runtime == "openvino-int8":
        settings["quantize"] = {**quantize_settings(), "nncf": _module_version("nncf")}
        settings["parity"] = [PARITY_SLIDE_PX, PARITY_SEED, parity_iou(runtime), "truth"]
    if runtime == "tensorrt":
        settings["gpu"] = facts.gpu_name
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{sha256[:16]}-{runtime}-{digest}"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created) for the block: one export per key at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _find_export(folder: Path, runtime: str) -> Path:
    found = sorted(p for p in folder.iterdir() if p.name.endswith(_EXPORT_SUFFIX[runtime]))
    if len(found) != 1:
        raise ModelLoadError(f"export cache {folder} holds {found}; delete it to export again")
    return found[0]


def exported_model(
    weights: str | Path,
    runtime: str,
    *,
    facts: DeviceFacts | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """The local file or folder ultralytics loads to run ``weights`` in ``runtime``.

    ``torch`` returns ``weights`` itself; other runtimes export once into the
    cache (parity against PyTorch checked and recorded, see
    :func:`read_parity`) and return the cached export on later calls.
    ``facts`` default to the CPU's (``device_facts("cpu")``); a TensorRT
    engine needs a CUDA device's.

    Raises
    ------
    ModelLoadError
        An unknown runtime, a runtime whose package is missing, TensorRT
        without a CUDA device, or an export that failed (the cause chained).
    """
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
    weights = Path(weights)
    if runtime == "torch":
        return weights
    facts = facts or device_facts("cpu")
    if not facts.installed(runtime):
        raise ModelLoadError(
            f"runtime {runtime!r} needs the Python package {RUNTIME_PACKAGES[runtime]!r}, "
            "which is not installed"
        )
    if runtime == "tensorrt" and not facts.cuda:
        raise ModelLoadError(f"a TensorRT engine is built on a CUDA device; got {facts.device!r}")
    root = (cache_dir or model_cache_dir()) / EXPORTS_DIR
    final = root / export_key(file_sha256(weights), runtime, facts)
    if runtime == "openvino-int8":  # quantized from the FP32 export, made (or reused) first
        exported_model(weights, "openvino", facts=facts, cache_dir=cache_dir)
    with file_lock(root / f".{final.name}.lock"):
        if not final.exists():
            _export(weights, runtime, final, facts, cache_dir)
    return _find_export(final, runtime)


def read_parity(export: Path) -> dict[str, Any]:
    """The parity record kept beside an export (:func:`exported_model`'s return value)."""
    path = export.parent / PARITY_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"export {export} has no readable {PARITY_FILE}: {e}") from e
    return data


def _export(
    weights: Path, runtime: str, final: Path, facts: DeviceFacts, cache_dir: Path | None
) -> None:
    from batch.stages.device import keep_torch_threads

    final.parent.mkdir(parents=True, exist_ok=True)
    log.info(
        "exporting %s to %s once, into %s%s", weights.name, runtime, final,
        " (NNCF quantization: a few minutes on 2 CPU cores)" if runtime in QUANTIZED_RUNTIMES else "",
    )  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        local = work / weights.name
        shutil.copyfile(weights, local)
        trained_mpp = _trained_mpp(weights)
        with keep_torch_threads():
            if runtime == "openvino-int8":
                from batch.stages import quantize as q

                fp32 = exported_model(weights, "openvino", facts=facts, cache_dir=cache_dir)
                # The calibration slides are drawn once and read on each of NNCF's passes.
                with tempfile.TemporaryDirectory(prefix="hemaray-calibration-") as cal:
                    paths = parity_slides(
                        cal, trained_mpp, side=q.CALIBRATION_SIDE, slides=q.CALIBRATION_SLIDES,
                        seed=q.CALIBRATION_SEED,
                    )  # fmt: skip
                    q.quantize_openvino(
                        fp32, work / f"{weights.stem}_int8_openvino_model",
                        lambda: slide_tiles(paths),
                        q.CALIBRATION_SLIDES * (q.CALIBRATION_SIDE // EXPORT_IMGSZ) ** 2,
                    )
            else:
                precision = dict(EXPORT_SETTINGS[runtime])
                half = bool(precision.pop("half"))
                out = load_yolo(local, task="detect").export(
                    format=EXPORT_FORMATS[runtime], imgsz=EXPORT_IMGSZ, batch=EXPORT_BATCH,
                    device=facts.device, verbose=False, **precision, **_half_kwargs(half),
                )  # fmt: skip
                if not out:
                    raise ModelLoadError(f"exporting {weights} to {runtime} produced nothing")
            local.unlink()
            parity = _parity_record(
                weights, _find_export(work, runtime), facts.device, trained_mpp, runtime
            )
        (work / PARITY_FILE).write_text(json.dumps({**parity, "facts": facts.to_dict()}, indent=1))
        os.replace(work, final)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"could not export {weights} to {runtime}: {e}; is the runtime's package installed?"
        ) from e
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _half_kwargs(half: bool) -> dict[str, Any]:
    """FP16 in the spelling of the installed ultralytics (``quantize=16`` from 8.4, else ``half``)."""
    if not half:
        return {}
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return {"quantize": 16} if "quantize" in DEFAULT_CFG_DICT else {"half": True}


def _trained_mpp(weights: Path) -> float | None:
    card = read_model_card(weights)
    return card.trained_mpp if card is not None else None


# ------------------------------------------------------------------ parity


def parity_tiles(
    trained_mpp: float | None, *, side: int = PARITY_SLIDE_PX, slides: int = 1, seed: int = PARITY_SEED
) -> Iterator[npt.NDArray[np.uint8]]:
    """RGB tiles of EXPORT_IMGSZ px cut from synthetic smears drawn at the detector's scale.

    Deterministic (seeded); the slides are drawn into a temporary folder and
    read tile by tile, so a few hundred tiles (INT8 calibration) do not sit
    in memory at once.
    """
    with tempfile.TemporaryDirectory(prefix="hemaray-parity-") as tmp:
        yield from slide_tiles(parity_slides(tmp, trained_mpp, side=side, slides=slides, seed=seed))


def parity_slides(
    folder: str | Path, trained_mpp: float | None, *, side: int, slides: int, seed: int
) -> list[Path]:
    """Draw the synthetic smears of :func:`parity_tiles` into ``folder``; return their files."""
    from batch.synth import synth_slides

    return list(
        synth_slides(
            folder, slides=slides, width=side, height=side, seed=seed,
            mpp=trained_mpp or SYNTH_MPP,
        )
    )  # fmt: skip


def slide_tiles(paths: Sequence[Path]) -> Iterator[npt.NDArray[np.uint8]]:
    """The whole EXPORT_IMGSZ tiles of each slide file, row by row."""
    for _, tile in _tiles_at(paths):
        yield tile


def _tiles_at(paths: Sequence[Path]) -> Iterator[tuple[tuple[int, int], npt.NDArray[np.uint8]]]:
    """Each whole EXPORT_IMGSZ tile of each slide file, row by row, with its ``(x, y)`` origin."""
    from batch.slides import open_slide

    for path in paths:
        with open_slide(path) as slide:
            width, height = slide.info.width, slide.info.height
            for y in range(0, height - EXPORT_IMGSZ + 1, EXPORT_IMGSZ):
                for x in range(0, width - EXPORT_IMGSZ + 1, EXPORT_IMGSZ):
                    yield (x, y), slide.read_region(x, y, EXPORT_IMGSZ, EXPORT_IMGSZ)


def _predict_boxes(
    model: Any, tiles: Sequence[npt.NDArray[np.uint8]], device: str, conf: float = DetectConfig.conf
) -> list[Boxes]:
    """The network's boxes on RGB tiles, at the detector's default thresholds (or ``conf``).

    ``model`` is ultralytics' ``YOLO`` or an `ExportedDetector` (the CPU path of
    OpenVINO and ONNX Runtime exports), whichever runs the runtime in a run.
    """
    out: list[Boxes] = []
    for start in range(0, len(tiles), EXPORT_BATCH // 2):
        chunk = tiles[start : start + EXPORT_BATCH // 2]
        if isinstance(model, ExportedDetector):  # takes RGB
            out.extend(
                Boxes(*found)
                for found in model.predict(
                    chunk, conf=conf, iou=DetectConfig.iou, max_det=DetectConfig.max_det,
                    agnostic=DetectConfig.agnostic_nms,
                )  # fmt: skip
            )
            continue
        batch = [t[..., ::-1] for t in chunk]  # ultralytics takes BGR
        for res in model.predict(
            batch, imgsz=EXPORT_IMGSZ, conf=conf, iou=DetectConfig.iou,
            max_det=DetectConfig.max_det, agnostic_nms=DetectConfig.agnostic_nms,
            device=device, verbose=False,
        ):  # fmt: skip
            b = res.boxes
            out.append(
                Boxes(
                    b.xyxy.float().cpu().numpy(),
                    b.cls.cpu().numpy().astype(np.int64),
                    b.conf.float().cpu().numpy(),
                )
            )
    return out


def parity_iou(runtime: str) -> float:
    """IoU at which ``runtime``'s boxes must match PyTorch's (`batch.stages.parity`)."""
    return QUANTIZED_IOU if runtime in QUANTIZED_RUNTIMES else PARITY_IOU


def judge_parity(runtime: str, figures: dict[str, Any]) -> dict[str, Any]:
    """``figures`` (matched at :func:`parity_iou`) with the rule of ``runtime`` and its verdict."""
    quantized = runtime in QUANTIZED_RUNTIMES
    record = {**figures, "rule": "quantized" if quantized else "fp32", "iou": parity_iou(runtime)}
    return {**record, "passed": parity_passed(record, quantized=quantized)}


def _truth_tiles(
    trained_mpp: float | None,
) -> tuple[list[npt.NDArray[np.uint8]], list[tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]]]:
    """The parity tiles and each one's ground-truth boxes (``xyxy`` in the tile, class ids).

    The synthetic slide's own ground truth (every drawn cell's exact box), in
    the id order of DETECTOR_CLASSES. A cell cut by a tile's edge keeps its
    clipped box when at least half of it lies inside; smaller slivers are
    dropped (whatever a detector makes of them, both runtimes see the same).
    """
    import pyarrow.parquet as pq

    from batch.stages.boxscore import DETECTOR_CLASSES
    from batch.synth import GROUND_TRUTH_FILE

    tiles: list[npt.NDArray[np.uint8]] = []
    truth: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]] = []
    with tempfile.TemporaryDirectory(prefix="hemaray-parity-") as tmp:
        (path,) = parity_slides(
            tmp, trained_mpp, side=PARITY_SLIDE_PX, slides=1, seed=PARITY_SEED
        )
        gt = pq.read_table(Path(tmp) / GROUND_TRUTH_FILE).to_pandas()
        boxes = gt[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)
        ids = gt["class"].map({name: i for i, name in enumerate(DETECTOR_CLASSES)}).to_numpy()
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for (x, y), tile in _tiles_at([path]):
            tiles.append(tile)
            clipped = (boxes - [x, y, x, y]).clip(0, EXPORT_IMGSZ)
            inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
            keep = inside >= 0.5 * area
            truth.append((clipped[keep], ids[keep].astype(np.int64)))
    return tiles, truth


def _truth_map50(
    model: Any, tiles: Sequence[npt.NDArray[np.uint8]], truth: Sequence[Any], device: str
) -> dict[str, Any]:
    """map50 (and per-class AP50) of ``model`` on the parity tiles' ground truth."""
    from batch.stages.boxscore import AP_CONF, DETECTOR_CLASSES, detection_metrics

    boxes = _predict_boxes(model, tiles, device, conf=AP_CONF)
    m = detection_metrics(
        [(b.boxes, b.labels, b.scores) for b in boxes], list(truth), DETECTOR_CLASSES
    )
    per_class = {k: v["ap50"] for k, v in m["per_class"].items() if v["ap50"] is not None}
    return {"map50": round(m["map50"], 4), "ap50": {k: round(v, 4) for k, v in per_class.items()}}


def _parity_record(
    weights: Path, export: Path, device: str, trained_mpp: float | None, runtime: str
) -> dict[str, Any]:
    tiles, truth = _truth_tiles(trained_mpp)
    torch_model = load_yolo(weights, task="detect")
    other_model: Any = (
        ExportedDetector(export, runtime)
        if runs_direct(runtime, device)
        else load_yolo(export, task="detect")
    )
    reference = _predict_boxes(torch_model, tiles, device)
    other = _predict_boxes(other_model, tiles, device)
    figures: dict[str, Any] = detection_parity(reference, other, iou=parity_iou(runtime))
    if runtime in QUANTIZED_RUNTIMES:  # accuracy against the slide's ground truth, beside agreement
        figures["truth_torch"] = _truth_map50(torch_model, tiles, truth, device)
        figures["truth"] = _truth_map50(other_model, tiles, truth, device)
    return {**judge_parity(runtime, figures), "tiles": len(tiles), "device": device}


