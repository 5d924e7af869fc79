"""Which inference runtime runs a detector: PyTorch, ONNX Runtime or OpenVINO.

An ultralytics ``.pt`` runs as it is in PyTorch (``torch``). For ``onnxruntime``
and ``openvino`` it is exported once, offline, with ultralytics' own exporter
(the packages come with the project's install; nothing is downloaded), into
the model cache (`batch.models.model_cache_dir`) under a key made of the
weights' SHA-256 and the export settings, so a new weights file or new
settings never reuse a stale export. Ultralytics loads the exported model
behind the same ``predict`` API, so the detector's pre- and post-processing
(resampling, padding, NMS, box mapping) are the same code for every runtime.

Exports are dynamic in batch and image size (the detector pads a batch to a
multiple of the stride, whatever its tiles' sizes). Concurrent exports of one
key (several actors starting at once) are serialised by a file lock, and an
export appears under its final name only when complete.

CUDA: TensorRT engines are GPU-specific and are not built here (no GPU on
this project's machines); ``torch`` stays the runtime on CUDA.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from batch.config import DETECT_RUNTIMES
from batch.errors import ModelLoadError
from batch.models import file_sha256, load_yolo, model_cache_dir

__all__ = ["RUNTIMES", "EXPORT_FORMATS", "export_key", "exported_model"]

#: Runtimes a detector can run in.
RUNTIMES: tuple[str, ...] = DETECT_RUNTIMES
#: Ultralytics export format of each exported runtime.
EXPORT_FORMATS: dict[str, str] = {"onnxruntime": "onnx", "openvino": "openvino"}
#: Export settings that change the exported file (part of its cache key).
EXPORT_SETTINGS: dict[str, object] = {"dynamic": True, "half": False, "simplify": True}
#: Image size ultralytics traces the export at (the graph stays dynamic).
EXPORT_IMGSZ = 640
#: Largest batch a dynamic export is traced for.
EXPORT_BATCH = 16
#: Folder under the model cache that holds exports.
EXPORTS_DIR = "exports"


def export_key(sha256: str, runtime: str) -> str:
    """Cache key of ``runtime``'s export of the weights with ``sha256``."""
    settings = json.dumps(
        {"runtime": runtime, "imgsz": EXPORT_IMGSZ, "batch": EXPORT_BATCH, **EXPORT_SETTINGS},
        sort_keys=True,
    )
    return f"{sha256[:16]}-{runtime}-{hashlib.sha256(settings.encode()).hexdigest()[:8]}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def exported_model(weights: str | Path, runtime: str, *, cache_dir: Path | None = None) -> Path:
    """The local file or folder ultralytics loads to run ``weights`` in ``runtime``.

    ``torch`` returns ``weights`` itself; other runtimes export once into the
    cache and return the cached export on later calls.

    Raises
    ------
    ModelLoadError
        An unknown runtime, or an export that failed (the cause chained).
    """
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
    weights = Path(weights)
    if runtime == "torch":
        return weights
    root = (cache_dir or model_cache_dir()) / EXPORTS_DIR
    key = export_key(file_sha256(weights), runtime)
    final = root / key
    with _locked(root / f".{key}.lock"):
        if not final.exists():
            _export(weights, runtime, final)
    found = sorted(p for p in final.iterdir() if p.suffix == ".onnx" or p.is_dir())
    if len(found) != 1:
        raise ModelLoadError(f"export cache {final} holds {found}; delete it to export again")
    return found[0]


def _export(weights: Path, runtime: str, final: Path) -> None:
    from batch.stages.device import keep_torch_threads

    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        local = work / weights.name
        shutil.copyfile(weights, local)
        with keep_torch_threads():
            out = load_yolo(local, task="detect").export(
                format=EXPORT_FORMATS[runtime], imgsz=EXPORT_IMGSZ, batch=EXPORT_BATCH,
                device="cpu", verbose=False, **EXPORT_SETTINGS,
            )  # fmt: skip
        if not out:
            raise ModelLoadError(f"exporting {weights} to {runtime} produced nothing")
        local.unlink()
        os.replace(work, final)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"could not export {weights} to {runtime}: {e}; is the runtime's package installed?"
        ) from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
