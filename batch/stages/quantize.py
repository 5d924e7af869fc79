"""INT8 OpenVINO detector: NNCF post-training quantization of the FP32 OpenVINO export.

``quantize_openvino`` reads the FP32 OpenVINO model (`batch.stages.runtime`
exports it with ultralytics), runs NNCF's post-training quantization on
calibration tiles and writes an OpenVINO folder ultralytics loads like any
other (``*_openvino_model/`` with ``metadata.yaml``).

Done here with NNCF directly rather than through ultralytics'
``export(format="openvino", quantize=8, data=...)``: that path reads the
calibration images through ``check_det_dataset``, which fetches a font from
the internet when it is missing (``check_font``) and wants a dataset YAML;
the run must not download anything and its calibration tiles are drawn,
not stored. The quantization itself follows ultralytics' own INT8 OpenVINO
export: the MIXED preset (symmetric weights, asymmetric activations) with the
detection head (its sigmoid and distribution-focal-loss decoding, whose
outputs are box coordinates and confidences) left in floating point, since
quantizing it costs box accuracy for little speed. One departure: activation
ranges span every calibration tile (``ACTIVATION_RANGES``), since the tiles
are synthetic and real stains drive some activations further.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "CALIBRATION_ENV", "CALIBRATION_SEED", "CALIBRATION_SIDE", "CALIBRATION_SLIDES",
    "quantize_openvino",
    "quantize_settings",
]  # fmt: skip

#: Environment variable for a smaller calibration set, ``SLIDESxSIDE`` (e.g. ``1x1280``: 4
#: tiles): the test suite's setting, so its first INT8 export takes seconds, not minutes. It is
#: part of the export's cache key, so such an export is never taken for the default one.
CALIBRATION_ENV = "HEMARAY_INT8_CALIBRATION"


def _calibration(default: tuple[int, int]) -> tuple[int, int]:
    value = os.environ.get(CALIBRATION_ENV, "").strip()
    if not value:
        return default
    try:
        slides, side = (int(v) for v in value.lower().split("x"))
    except ValueError:
        slides = side = 0
    if slides < 1 or side < 640:
        raise ValueError(f"{CALIBRATION_ENV} is SLIDESxSIDE (slides >= 1, side >= 640); got {value!r}")
    return slides, side


#: Calibration tiles: CALIBRATION_SLIDES synthetic smears of CALIBRATION_SIDE px a side at the
#: detector's trained scale, cut into 640 px tiles: 5 x 64 = 320 tiles, just over the 300 NNCF
#: and ultralytics recommend for INT8 calibration (unless CALIBRATION_ENV says otherwise).
CALIBRATION_SLIDES, CALIBRATION_SIDE = _calibration((5, 5120))
CALIBRATION_SEED = 8
#: Activation ranges: the min and max over every calibration tile (NNCF's ``MINMAX``), not its
#: default mean of each tile's (``MEAN_MINMAX``), which clips activations stronger than the
#: synthetic tiles' average: real stains. `hemaray eval detector --runtime openvino-int8` on BCCD
#: val, map50 / WBC AP50: 0.855 / 0.971 with the mean, 0.864 / 0.991 with the whole range
#: (PyTorch 0.865 / 0.990); TXL-PBC val 0.947 either way (PyTorch 0.948).
ACTIVATION_RANGES = "minmax"


def quantize_settings() -> dict[str, object]:
    """What changes the quantized model (part of its export cache key)."""
    return {
        "preset": "mixed", "keep_head_fp32": True, "activations": ACTIVATION_RANGES,
        "calibration": [CALIBRATION_SLIDES, CALIBRATION_SIDE, CALIBRATION_SEED],
    }  # fmt: skip


def _to_input(tile: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """An RGB uint8 tile as the network's input: NCHW float32 in [0, 1]."""
    return np.ascontiguousarray(tile.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0


def _head_scope(model: Any) -> list[str]:
    """Names of the detection head's decoding ops (ultralytics' INT8 export leaves them FP32)."""
    ops = model.get_ordered_ops()
    sigmoids = [op.get_friendly_name() for op in ops if op.get_type_name() == "Sigmoid"]
    if not sigmoids:
        return []
    head = sigmoids[-1].split("/", 1)[0]
    return [
        op.get_friendly_name()
        for op in ops
        if op.get_type_name() == "Sigmoid"
        or op.get_friendly_name().startswith((f"{head}/", f"{head}.dfl"))
    ]


def quantize_openvino(
    fp32_folder: Path,
    out_folder: Path,
    tiles: Callable[[], Iterable[npt.NDArray[np.uint8]]],
    n_tiles: int,
) -> Path:
    """Quantize an FP32 OpenVINO detector to INT8 on ``tiles()``; return ``out_folder``.

    Parameters
    ----------
    fp32_folder
        Ultralytics' OpenVINO export (``*_openvino_model/`` with one ``.xml``).
    out_folder
        Where the INT8 folder goes (its name should end ``_openvino_model``).
    tiles
        Makes an iterable of RGB uint8 calibration tiles (called once per pass
        NNCF makes over them, so the tiles need not sit in memory).
    n_tiles
        How many tiles ``tiles()`` yields (NNCF's subset size).
    """
    import nncf
    import openvino as ov
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    from batch.models import logs_to_stderr

    logs_to_stderr("nncf")  # its INFO lines (one per layer it leaves in FP32) to stderr, fewer
    logging.getLogger("nncf").setLevel(logging.WARNING)

    (xml,) = sorted(fp32_folder.glob("*.xml"))
    core = ov.Core()
    model = core.read_model(str(xml))

    class _Tiles:
        def __iter__(self) -> Any:
            return iter(tiles())

        def __len__(self) -> int:
            return n_tiles

    ignored = _head_scope(model)
    # NNCF draws its progress bars (rich) on stdout, which carries --json's one object: stderr.
    with contextlib.redirect_stdout(sys.stderr):
        quantized = nncf.quantize(
            model=model,
            calibration_dataset=nncf.Dataset(_Tiles(), _to_input),
            preset=nncf.QuantizationPreset.MIXED,
            subset_size=n_tiles,
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                activations_range_estimator_params=getattr(
                    RangeEstimatorParametersSet, ACTIVATION_RANGES.upper()
                )
            ),
            ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None,
        )
    out_folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out_folder / xml.name), compress_to_fp16=False)
    shutil.copyfile(fp32_folder / "metadata.yaml", out_folder / "metadata.yaml")
    return out_folder
