"""Which runtime runs a WBC classifier (``classify.runtime``): PyTorch, OpenVINO or ONNX Runtime.

A classifier's input is simple: `batch.stages.classify.render_input` already
draws each crop as an ``imgsz`` square, so ultralytics' resize and centre-crop
leave it as it is and what is left is RGB / 255 in NCHW (:func:`to_input`;
other sizes are resized and cut the way ultralytics' ``classify_transforms``
do). Every runtime therefore gets the same array and returns the network's
softmax, without ultralytics' predictor and without torchvision, which that
predictor and the checkpoint's saved transforms import (about 2 s of a
worker's start-up, most of it ``torch._dynamo``). The exported runtimes run
through `batch.stages.netrun`, as the detector's do on CPU.

- ``torch``: the checkpoint's network, Conv and BatchNorm fused as
  ultralytics fuses them for inference; FP16 on CUDA.
- ``openvino``, ``onnxruntime``: FP32 exports made once, offline, by
  ultralytics' exporter, cached under the model cache keyed by the weights'
  SHA-256, the image size, the export settings and the runtime's version,
  checked against PyTorch when made (:func:`classifier_parity`: the same
  class for 99 % of the parity crops, probabilities within 0.02) with the
  figures kept beside the export.
- ``auto``: the first of :data:`PREFERENCE` for the device that is installed
  and passed its check; PyTorch ends every order. Measured on this project's
  2-core machine (324 crops of 96 px, one thread, best of 3): OpenVINO
  0.41 s, ultralytics' predict 0.55 s, PyTorch 0.64 s. On CUDA, PyTorch FP16: a 1.4 M
  parameter network gains nothing worth an engine build per GPU model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from batch.config import CLASSIFY_RUNTIMES
from batch.errors import ModelLoadError
from batch.models import file_sha256, model_cache_dir
from batch.stages.netrun import exported_net

__all__ = [
    "CLASSIFY_RUNTIMES",
    "PREFERENCE",
    "ClassifierRuntime",
    "choose_classifier_runtime",
    "classifier_parity",
    "export_names",
    "exported_classifier",
    "to_input",
    "torch_backend",
]

log = logging.getLogger(__name__)

#: What ``auto`` tries, first that is installed and passes its parity check.
PREFERENCE: dict[str, tuple[str, ...]] = {"cpu": ("openvino", "onnxruntime", "torch"), "cuda": ("torch",)}
#: Ultralytics export format of each exported runtime.
_FORMATS = {"openvino": "openvino", "onnxruntime": "onnx"}
_SUFFIX = {"openvino": "_openvino_model", "onnxruntime": ".onnx"}
#: Largest batch the dynamic export is traced at.
EXPORT_BATCH = 64
#: Parity rule of an FP32 export: top-1 agreement and largest probability difference.
PARITY_AGREEMENT = 0.99
PARITY_MAX_PROB_DIFF = 0.02
PARITY_FILE = "parity.json"


def to_input(images: list[npt.NDArray[np.uint8]], imgsz: int) -> npt.NDArray[np.float32]:
    """RGB ``uint8`` images as the network's input: ``(N, 3, imgsz, imgsz)`` float32 in [0, 1].

    An ``imgsz`` square is taken as it is (ultralytics' resize and crop leave
    it unchanged); any other size is resized, shortest side to ``imgsz``
    (PIL bilinear, as torchvision's ``Resize`` on a PIL image), and its centre
    cut out (torchvision's ``CenterCrop`` rounding), as ultralytics'
    ``classify_transforms`` do.
    """
    out = np.empty((len(images), 3, imgsz, imgsz), np.float32)
    for i, im in enumerate(images):
        if im.shape[:2] != (imgsz, imgsz):
            im = _resize_and_cut(im, imgsz)
        out[i] = im.transpose(2, 0, 1)
    out /= 255.0
    return out


def _resize_and_cut(im: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.uint8]:
    from PIL import Image

    h, w = im.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize((new_w, new_h), Image.Resampling.BILINEAR))
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return resized[top : top + size, left : left + size]


# ------------------------------------------------------------------ backends


class _TorchBackend:
    def __init__(self, yolo: Any, device: str, half: bool) -> None:
        import torch

        net = yolo.model
        if hasattr(net, "fuse"):
            net = net.fuse(verbose=False)
        self.net = net.to(device).eval()
        self.device, self.half = device, half
        if half:
            self.net = self.net.half()
        self._torch = torch

    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        torch = self._torch
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self.device)
            y = self.net(t.half() if self.half else t)
            y = y[0] if isinstance(y, list | tuple) else y
            return np.asarray(y.float().cpu().numpy(), np.float32)


def torch_backend(yolo: Any, *, device: str, half: bool) -> Any:
    """A callable ``(N, 3, imgsz, imgsz) float32 -> (N, C) probabilities``: the checkpoint's network."""
    return _TorchBackend(yolo, device, half)


# ------------------------------------------------------------------ exports


def _export_key(sha256: str, runtime: str, imgsz: int) -> str:
    from batch.stages.runtime import RUNTIME_PACKAGES, device_facts

    version = device_facts("cpu").versions.get(RUNTIME_PACKAGES[runtime])
    settings = {
        "task": "classify", "runtime": runtime, "imgsz": imgsz, "batch": EXPORT_BATCH,
        "dynamic": True, "half": False, "version": version, "record": ["names"],
        "parity": [PARITY_AGREEMENT, PARITY_MAX_PROB_DIFF],
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{sha256[:16]}-cls-{runtime}-{digest}"


def exported_classifier(
    weights: str | Path, runtime: str, imgsz: int, *, cache_dir: Path | None = None
) -> Path:
    """The cached ``runtime`` export of a classifier ``.pt`` at ``imgsz``; made (and checked) once.

    Raises
    ------
    ModelLoadError
        An unknown runtime, a missing runtime package or a failed export (the
        cause chained).
    """
    from batch.stages.runtime import EXPORTS_DIR, RUNTIME_PACKAGES, device_facts, file_lock

    if runtime not in _FORMATS:
        raise ModelLoadError(f"classifiers export to {sorted(_FORMATS)}, not {runtime!r}")
    if not device_facts("cpu").installed(runtime):
        raise ModelLoadError(
            f"runtime {runtime!r} needs the Python package {RUNTIME_PACKAGES[runtime]!r}, "
            "which is not installed"
        )
    weights = Path(weights)
    root = (cache_dir or model_cache_dir()) / EXPORTS_DIR
    final = root / _export_key(file_sha256(weights), runtime, imgsz)
    with file_lock(root / f".{final.name}.lock"):
        if not final.exists():
            _export(weights, runtime, imgsz, final)
    return _find(final, runtime)


def _find(folder: Path, runtime: str) -> Path:
    found = sorted(p for p in folder.iterdir() if p.name.endswith(_SUFFIX[runtime]))
    if len(found) != 1:
        raise ModelLoadError(f"export cache {folder} holds {found}; delete it to export again")
    return found[0]


def export_names(export: Path) -> list[str]:
    """The class names of an exported classifier, by id (kept in its parity record)."""
    try:
        return [str(n) for n in json.loads((export.parent / PARITY_FILE).read_text())["names"]]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"export {export} has no class names in its {PARITY_FILE}: {e}") from e


def _export(weights: Path, runtime: str, imgsz: int, final: Path) -> None:
    from batch.models import load_yolo
    from batch.stages.device import keep_torch_threads

    final.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting classifier %s to %s once, into %s", weights.name, runtime, final)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        local = work / weights.name
        shutil.copyfile(weights, local)
        yolo = load_yolo(local, task="classify")
        if yolo.task != "classify":
            raise ModelLoadError(f"{weights} is a {yolo.task} model, not a classifier")
        names = {int(k): str(v) for k, v in dict(yolo.names).items()}
        with keep_torch_threads():
            out = yolo.export(
                format=_FORMATS[runtime], imgsz=imgsz, batch=EXPORT_BATCH, dynamic=True,
                half=False, device="cpu", verbose=False,
            )  # fmt: skip
        if not out:
            raise ModelLoadError(f"exporting {weights} to {runtime} produced nothing")
        local.unlink()
        parity = classifier_parity(weights, _find(work, runtime), runtime, imgsz)
        parity["names"] = [names[i] for i in sorted(names)]
        (work / PARITY_FILE).write_text(json.dumps(parity, indent=1))
        os.replace(work, final)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"could not export classifier {weights} to {runtime}: {e}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parity_crops(imgsz: int, trained_mpp: float | None) -> list[npt.NDArray[np.uint8]]:
    """Deterministic smear crops: every ``imgsz`` window of the detector's synthetic parity tiles."""
    from batch.stages.runtime import parity_tiles

    return [
        tile[y : y + imgsz, x : x + imgsz]
        for tile in parity_tiles(trained_mpp)
        for y in range(0, tile.shape[0] - imgsz + 1, imgsz)
        for x in range(0, tile.shape[1] - imgsz + 1, imgsz)
    ]


def classifier_parity(weights: Path, export: Path, runtime: str, imgsz: int) -> dict[str, Any]:
    """Agreement of ``export`` with the PyTorch network on :func:`parity_crops`, and the verdict."""
    from batch.models import load_yolo, read_model_card

    card = read_model_card(weights)
    x = to_input(parity_crops(imgsz, card.trained_mpp if card else None), imgsz)
    reference = torch_backend(load_yolo(weights, task="classify"), device="cpu", half=False)
    other = exported_net(export, runtime, threads=0)
    ref = np.concatenate([reference(x[i : i + EXPORT_BATCH]) for i in range(0, len(x), EXPORT_BATCH)])
    got = np.concatenate([other(x[i : i + EXPORT_BATCH]) for i in range(0, len(x), EXPORT_BATCH)])
    agreement = float((ref.argmax(1) == got.argmax(1)).mean())
    diff = float(np.abs(ref - got).max())
    return {
        "crops": len(x), "top1_agreement": round(agreement, 4), "max_prob_diff": round(diff, 6),
        "rule": {"agreement": PARITY_AGREEMENT, "max_prob_diff": PARITY_MAX_PROB_DIFF},
        "passed": agreement >= PARITY_AGREEMENT and diff <= PARITY_MAX_PROB_DIFF,
    }  # fmt: skip


# ------------------------------------------------------------------ auto


@dataclass(frozen=True)
class ClassifierRuntime:
    """The runtime a classifier runs in, and why (the run manifest records it)."""

    runtime: str
    reason: str
    parity: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "reason": self.reason, "parity": self.parity}


def choose_classifier_runtime(
    weights: str | Path, runtime: str, imgsz: int, device: str
) -> ClassifierRuntime:
    """``classify.runtime`` resolved for one classifier on ``device`` (``auto``: see module doc)."""
    from batch.stages.runtime import device_facts

    if runtime != "auto":
        return ClassifierRuntime(runtime, "set in classify.runtime")
    order = PREFERENCE["cuda" if device.startswith("cuda") else "cpu"]
    facts = device_facts("cpu")
    passed_over: list[str] = []
    for candidate in order:
        if candidate == "torch":
            break
        if not facts.installed(candidate):
            passed_over.append(f"{candidate}: not installed")
            continue
        try:
            export = exported_classifier(weights, candidate, imgsz)
            parity = json.loads((export.parent / PARITY_FILE).read_text())
        except (ModelLoadError, OSError, json.JSONDecodeError) as e:
            passed_over.append(f"{candidate}: {e}")
            continue
        if not parity.get("passed"):
            passed_over.append(f"{candidate}: failed its parity check {parity}")
            continue
        return ClassifierRuntime(
            candidate,
            f"first of {list(order)} on {device} that is installed and passed its parity check "
            f"(same class on {parity['top1_agreement']:.4f} of {parity['crops']} crops, "
            f"probabilities within {parity['max_prob_diff']})",
            parity,
        )
    skipped = f"; passed over: {'; '.join(passed_over)}" if passed_over else ""
    return ClassifierRuntime("torch", f"torch on {device} (last of {list(order)}){skipped}")
