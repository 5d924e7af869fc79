"""Classify white-blood-cell crops with an ultralytics classification model.

The label set is the model's (``model.names``): a 4-class ALL subtype model,
an 8-class peripheral-blood model, a 12-21 class marrow model all work the
same way. What the model sees is decided by the *input mode*, and the same
function, `render_input`, renders it for training (`batch.train.classifier`)
and for inference, so the two cannot drift apart:

``"mask"``
    The crop with every pixel outside the cell mask (from
    `batch.stages.segment`) set to ``MASK_FILL`` (black, the seeds'
    "segmented" images). Seed 001's best input. An empty mask (segmentation
    found no nucleus) leaves the crop unmasked, in training and inference alike. A constant fill, rather
    than the slide's own background colour, removes the background colour
    as a cue: in the Kaggle ALL images it differs by class (a batch effect).
``"crop"``
    The raw crop, surroundings included.
``"dual"``
    Both: the model (trained on both renderings of every training image)
    scores the masked and the raw rendering and the two probability vectors
    are averaged. This is the simplest honest reading of the seeds'
    "original + mask" input; it is not their two-branch network.

How a rendering becomes the model's square input is the *input scale*
(``extra.input_scale`` in the model card):

``"fit"`` (the default)
    Letterboxed to the model's image size (`batch.stages.crop.letterbox`), so
    ultralytics' resize + centre-crop never cuts the cell off. Every cell
    fills the input, whatever its size: a 15 um and an 11.5 um blast look
    the same size to the model.
``"field"``
    A window of fixed microns: the crop resampled from its own mpp to the
    card's ``trained_mpp`` and centred on an ``imgsz`` square (cut or padded
    with the crop's background), so the window is ``imgsz * trained_mpp`` um
    wide in training and inference alike and the cell's size is part of what
    the model sees (`field_window`). A crop of unknown mpp is taken to be at
    the trained mpp.

Calibration: a model card may carry a *temperature* ``T`` (``extra.temperature``,
fitted by `batch.eval.calibration.fit_temperature` on labelled validation
data). Every probability a `WbcClassifier` returns by default is then
``softmax(log(p) / T)`` of the model's own probabilities ``p``
(`apply_temperature`); in ``"dual"`` mode ``p`` is the mean of the two
views, the quantity the temperature was fitted on. ``T > 1`` softens
over-confident scores; the most probable class never changes. Without a
temperature (``T = 1``) the probabilities are the model's, unchanged.

Devices: ``device="auto"`` picks CUDA when available, else the CPU;
``half="auto"`` uses fp16 on CUDA only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from batch.stages.classify_runtime import to_input
from batch.stages.crop import estimate_background, field_window, letterbox
from batch.stages.device import select_device

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "INPUT_MODES",
    "INPUT_SCALES",
    "MASK_FILL",
    "TEMPERATURE_KEY",
    "InputMode",
    "WbcClassifier",
    "apply_temperature",
    "field_window",
    "render_input",
    "temperature_log_probs",
]

InputMode = Literal["mask", "crop", "dual"]
#: The input modes a classifier knows.
INPUT_MODES: tuple[str, ...] = ("mask", "crop", "dual")
#: How a rendering fills the model's input: scaled to fit, or a window of fixed microns.
INPUT_SCALES: tuple[str, ...] = ("fit", "field")
#: Colour of the pixels outside the cell in ``"mask"`` renderings (RGB).
MASK_FILL: tuple[int, int, int] = (0, 0, 0)
#: Crops per forward pass.
DEFAULT_BATCH_SIZE = 64
#: Image size used when neither the caller, the model card nor the checkpoint names one.
FALLBACK_IMGSZ = 64
#: Model card ``extra`` key of the calibration temperature (absent: 1.0, probabilities as given).
TEMPERATURE_KEY = "temperature"
#: Probabilities are clipped to this before the log, so a float32 softmax that underflowed
#: to 0 stays finite (its class keeps the lowest rank).
MIN_PROB = 1e-12


def temperature_log_probs(probs: npt.ArrayLike, temperature: float) -> npt.NDArray[np.float64]:
    """Log of the temperature-scaled probabilities: ``log_softmax(log(p) / T)``, row-wise.

    ``log(p)`` equals the model's logits up to a per-row constant, which the
    softmax removes, so this is the usual ``softmax(logits / T)``.

    Parameters
    ----------
    probs
        ``(N, C)`` probabilities (rows sum to 1).
    temperature
        ``T > 0``.
    """
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be an (N, C) array, got shape {p.shape}")
    z = np.log(np.clip(p, MIN_PROB, None)) / temperature
    z -= z.max(axis=1, keepdims=True)
    out: npt.NDArray[np.float64] = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return out


def apply_temperature(probs: npt.ArrayLike, temperature: float) -> npt.NDArray[np.float32]:
    """Calibrated probabilities ``softmax(log(p) / T)`` (float32, rows sum to 1).

    ``T == 1`` returns ``p`` itself (as float32), so an uncalibrated model's
    output is bit-for-bit what it was. The row-wise order of the classes, and
    so the argmax, never changes.
    """
    if temperature == 1.0:
        return np.asarray(probs, dtype=np.float32)
    return np.exp(temperature_log_probs(probs, temperature)).astype(np.float32)


def render_input(
    crop: npt.NDArray[np.uint8],
    mask: npt.NDArray[np.bool_] | None,
    mode: str,
    size: int | None = None,
    *,
    fill: tuple[int, int, int] = MASK_FILL,
    field_scale: float | None = None,
) -> list[npt.NDArray[np.uint8]]:
    """The image(s) a classifier sees for one crop.

    Parameters
    ----------
    crop
        RGB ``uint8`` crop ``(H, W, 3)``.
    mask
        Boolean cell mask of the crop's height and width; needed by the
        ``"mask"`` and ``"dual"`` modes.
    mode
        ``"mask"``, ``"crop"`` or ``"dual"`` (see the module docstring).
    size
        Letterbox the rendering(s) to ``size`` x ``size``; None keeps the crop's size.
    fill
        Colour of non-cell pixels in the masked rendering.
    field_scale
        None: the ``"fit"`` input scale (letterboxed to ``size``). A number:
        the ``"field"`` scale, each rendering resized by it (crop mpp /
        trained mpp) and centred on a ``size`` square (`field_window`).

    Returns
    -------
    list of numpy.ndarray
        One RGB image (``"mask"``, ``"crop"``) or two, masked first (``"dual"``).
    """
    if mode not in INPUT_MODES:
        raise ValueError(f"input mode must be one of {INPUT_MODES}, got {mode!r}")
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
        raise ValueError(
            f"crop must be an RGB uint8 array (H, W, 3), got {crop.dtype} {crop.shape}"
        )
    if field_scale is not None and not size:
        raise ValueError("the field input scale needs a size")

    def square(image: npt.NDArray[np.uint8], pad: tuple[int, int, int]) -> npt.NDArray[np.uint8]:
        if not size:
            return image
        if field_scale is None:
            return letterbox(image, size, pad)
        return field_window(image, size, field_scale, pad)

    out: list[npt.NDArray[np.uint8]] = []
    if mode in ("mask", "dual"):
        if mask is None:
            raise ValueError(f"input mode {mode!r} needs the cell mask of every crop")
        if mask.shape != crop.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match crop shape {crop.shape[:2]}")
        masked = crop.copy()
        if mask.any():  # an empty mask (no cell found) leaves the crop as it is
            masked[~mask.astype(bool)] = np.asarray(fill, dtype=np.uint8)
        out.append(square(masked, fill))
    if mode in ("crop", "dual"):
        out.append(square(crop, estimate_background(crop) if size else fill))
    return out


class WbcClassifier:
    """WBC subtype / type classifier over crops (ultralytics ``-cls`` model).

    Parameters
    ----------
    model_path
        Local path or fsspec URL of an ultralytics classification ``.pt``
        (resolved with `batch.models.resolve_model`), or a model ``.yaml``
        (an untrained model, for tests).
    name
        Short name of this classifier (``"all_subtype"``); used in column names.
    input_mode
        ``"mask"``, ``"crop"`` or ``"dual"``; None: the mode recorded in the
        model card (``extra.input_mode``), else ``"mask"``.
    device
        ``"auto"``, ``"cpu"``, ``"cuda:0"``, ...
    half
        ``"auto"`` (fp16 on CUDA only), True or False. Ignored on the CPU.
    imgsz
        Input size; None: the model card's, else the checkpoint's training size.
    batch_size
        Crops per forward pass.
    storage_options
        fsspec options for a remote ``model_path``.
    temperature
        Calibration temperature; None: the model card's (``extra.temperature``),
        else 1.0 (the model's probabilities unchanged).
    runtime
        ``classify.runtime``: ``"torch"``, ``"openvino"``, ``"onnxruntime"`` or
        ``"auto"`` (`batch.stages.classify_runtime`); ``runtime_choice`` says
        which ran and why. A model ``.yaml`` runs in torch.
    threads
        Intra-op threads of an OpenVINO / ONNX Runtime classifier (0: the
        runtime's default); torch uses the process's setting.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        name: str,
        input_mode: str | None = None,
        device: str = "auto",
        half: bool | Literal["auto"] = "auto",
        imgsz: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        storage_options: dict[str, Any] | None = None,
        temperature: float | None = None,
        runtime: str = "torch",
        threads: int = 0,
    ) -> None:
        from batch.models import read_model_card, resolve_model
        from batch.stages.classify_runtime import (
            CLASSIFY_RUNTIMES,
            choose_classifier_runtime,
            export_names,
            exported_classifier,
            torch_backend,
        )
        from batch.stages.netrun import exported_net

        if runtime not in CLASSIFY_RUNTIMES:
            raise ValueError(f"runtime must be one of {CLASSIFY_RUNTIMES}, got {runtime!r}")

        text = str(model_path)
        if text.endswith((".yaml", ".yml")):
            local = Path(text)
            self.card = None
        else:
            local = resolve_model(text, storage_options=storage_options)
            self.card = read_model_card(local)
        self.model_path = local
        self.name = name
        self.device = select_device(device)
        on_cuda = self.device.startswith("cuda")
        self.half = on_cuda if half == "auto" else bool(half) and on_cuda
        # The network is loaded only to run in torch (or to learn a card-less model's size): an
        # exported classifier needs neither the checkpoint nor torchvision, which unpickling
        # its saved transforms imports.
        self.model: Any = None
        size = imgsz or (self.card.imgsz if self.card is not None else None)
        if not size or local.suffix != ".pt":
            self.model = self._load_torch(local, text)
            size = size or self._checkpoint_imgsz()
        self.imgsz = int(size)
        if local.suffix != ".pt" and runtime not in ("auto", "torch"):
            raise ValueError(f"{text}: only a .pt checkpoint is exported to another runtime")
        self.runtime_choice = choose_classifier_runtime(
            local, runtime if local.suffix == ".pt" else "torch", self.imgsz, self.device
        )
        self.runtime: str = self.runtime_choice.runtime
        if self.runtime == "torch":
            self.model = self.model or self._load_torch(local, text)
            names = {int(k): str(v) for k, v in dict(self.model.names).items()}
            self._forward = torch_backend(self.model, device=self.device, half=self.half)
        else:
            export = exported_classifier(local, self.runtime, self.imgsz)
            names = dict(enumerate(export_names(export)))
            self._forward = exported_net(export, self.runtime, threads=threads)
        self.class_names: list[str] = [names[i] for i in sorted(names)]
        extra = self.card.extra if self.card is not None else {}
        mode = input_mode or str(extra.get("input_mode", "mask"))
        if mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {mode!r}")
        self.input_mode: str = mode
        scale = str(extra.get("input_scale", "fit"))
        if scale not in INPUT_SCALES:
            raise ValueError(f"{text}: input_scale must be one of {INPUT_SCALES}, got {scale!r}")
        self.input_scale: str = scale
        fill = extra.get("mask_fill", MASK_FILL)
        self.mask_fill: tuple[int, int, int] = (int(fill[0]), int(fill[1]), int(fill[2]))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.trained_mpp: float | None = self.card.trained_mpp if self.card is not None else None
        if self.input_scale == "field" and not self.trained_mpp:
            raise ValueError(f"{text}: the field input scale needs the card's trained_mpp")
        t = float(extra.get(TEMPERATURE_KEY, 1.0) if temperature is None else temperature)
        if not (np.isfinite(t) and t > 0):
            raise ValueError(f"{text}: temperature must be a finite number > 0, got {t!r}")
        self.temperature: float = t

    @staticmethod
    def _load_torch(local: Path, text: str) -> Any:
        from batch.models import load_yolo

        model = load_yolo(local, task="classify")  # checkpoint checked before unpickling
        if model.task != "classify":
            raise ValueError(f"{text}: expected a classification model, got task {model.task!r}")
        return model

    def _checkpoint_imgsz(self) -> int:
        args = getattr(self.model.model, "args", None)
        if isinstance(args, dict) and args.get("imgsz"):
            sz = args["imgsz"]
            return int(sz[0] if isinstance(sz, list | tuple) else sz)
        return FALLBACK_IMGSZ

    def calibrate(self, probs: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Apply this classifier's temperature to ``(N, C)`` per-crop probabilities."""
        return apply_temperature(probs, self.temperature)

    def predict_images(
        self, images: Sequence[npt.NDArray[np.uint8]], *, calibrated: bool = True
    ) -> npt.NDArray[np.float32]:
        """Class probabilities ``(N, C)`` of already rendered RGB images (see `render_input`).

        ``calibrated=False`` gives the model's own softmax. With ``calibrated``
        (the default) each image's probabilities are temperature-scaled on
        their own, which is what `classify` returns in the ``"mask"`` and
        ``"crop"`` modes; in ``"dual"`` mode `classify` scales the mean of a
        crop's two views instead, so average raw views and `calibrate` that.
        """
        if len(images) == 0:
            return np.zeros((0, len(self.class_names)), np.float32)
        probs = [
            self._forward(to_input(list(images[start : start + self.batch_size]), self.imgsz))
            for start in range(0, len(images), self.batch_size)
        ]
        raw = np.concatenate(probs).astype(np.float32)
        return self.calibrate(raw) if calibrated else raw

    def field_scales(self, n: int, mpp: float | Sequence[float | None] | None) -> list[float | None]:
        """Per crop, the `render_input` ``field_scale``: None (``"fit"``) or crop mpp / trained mpp."""
        if self.input_scale != "field":
            return [None] * n
        per_crop = [mpp] * n if mpp is None or isinstance(mpp, int | float) else list(mpp)
        if len(per_crop) != n:
            raise ValueError(f"got {n} crops but {len(per_crop)} mpp values")
        trained = float(self.trained_mpp or 1.0)
        return [1.0 if m is None or not np.isfinite(m) else float(m) / trained for m in per_crop]

    def probabilities(
        self,
        crops: Sequence[npt.NDArray[np.uint8]],
        masks: Sequence[npt.NDArray[np.bool_] | None] | None = None,
        *,
        calibrated: bool = True,
        mpp: float | Sequence[float | None] | None = None,
    ) -> npt.NDArray[np.float32]:
        """``(N, C)`` class probabilities of crops (arguments as in `classify`).

        ``calibrated=False`` gives the model's own probabilities (``"dual"``:
        the mean of the two views), the input of `calibrate`.
        """
        n = len(crops)
        n_cls = len(self.class_names)
        if n == 0:
            return np.zeros((0, n_cls), np.float32)
        if masks is None:
            if self.input_mode != "crop":
                raise ValueError(
                    f"classifier {self.name!r} (input_mode={self.input_mode!r}) needs masks"
                )
            mask_list: Sequence[npt.NDArray[np.bool_] | None] = [None] * n
        else:
            mask_list = masks
        if len(mask_list) != n:
            raise ValueError(f"got {n} crops but {len(mask_list)} masks")
        views = [
            render_input(c, m, self.input_mode, self.imgsz, fill=self.mask_fill, field_scale=s)
            for c, m, s in zip(crops, mask_list, self.field_scales(n, mpp), strict=True)
        ]
        n_views = len(views[0])
        flat = [v for per_crop in views for v in per_crop]
        raw = self.predict_images(flat, calibrated=False)
        probs = raw.reshape(n, n_views, n_cls).mean(axis=1)
        probs = (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
        return self.calibrate(probs) if calibrated else probs

    def classify(
        self,
        crops: Sequence[npt.NDArray[np.uint8]],
        masks: Sequence[npt.NDArray[np.bool_] | None] | None = None,
        mpp: float | Sequence[float | None] | None = None,
    ) -> tuple[list[str], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Classify crops.

        Parameters
        ----------
        crops
            RGB ``uint8`` crops.
        masks
            One boolean cell mask per crop (``"mask"`` and ``"dual"`` modes);
            may be None in ``"crop"`` mode.
        mpp
            Microns per pixel of the crops (one value, or one per crop); used
            by the ``"field"`` input scale only. None: at the trained mpp.

        Returns
        -------
        labels : list of str
            The most probable class per crop.
        confidences : numpy.ndarray
            ``(N,)`` calibrated probability of that class.
        probs : numpy.ndarray
            ``(N, C)`` calibrated class probabilities (`temperature`) in
            `class_names` order; rows sum to 1.
        """
        probs = self.probabilities(crops, masks, mpp=mpp)
        n = len(probs)
        if n == 0:
            return [], np.zeros(0, np.float32), probs
        idx = probs.argmax(axis=1)
        labels = [self.class_names[i] for i in idx]
        return labels, probs[np.arange(n), idx].astype(np.float32), probs
