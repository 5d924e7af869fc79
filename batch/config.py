"""One typed configuration for a hemaray run.

Loaded from YAML (``--config cfg.yaml``) and ``--set section.key=value``
overrides, validated, and saved next to every run's output. Stage code takes
its numbers from here or from named constants, never inline.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from batch.errors import ConfigError
from batch.storage import redact_url, refuse_credentials

__all__ = [
    "Config",
    "TilingConfig",
    "StorageConfig",
    "SlideConfig",
    "DetectConfig",
    "ClassifierSpec",
    "SegmentationConfig",
    "ExecutionConfig",
    "ExportConfig",
    "CallsConfig",
    "config_from_tree",
    "load_config",
]

#: Default overlap between tiles in microns: >= the largest cell we expect whole
#: (monocytes reach ~30 um); 128 px at 0.25 um/px.
DEFAULT_OVERLAP_UM = 32.0


@dataclass
class TilingConfig:
    """How a slide is cut into detector tiles.

    ``tile_size`` and ``overlap_px`` are in the pixels the detector sees: at
    the target mpp, or at the slide's own when the target is finer, unless the
    slide is so coarse that its cells would be drawn at under
    ``min_cell_scale`` of their trained size (then at ``target_mpp /
    min_cell_scale``, upsampled); when the slide's mpp is unknown they are
    level-0 pixels.
    """

    tile_size: int = 640
    #: None: derive from ``overlap_um`` in the pixels the detector sees.
    overlap_px: int | None = None
    overlap_um: float = DEFAULT_OVERLAP_UM
    #: Microns per pixel the detector expects; None: the model file's trained mpp.
    target_mpp: float | None = None
    #: Assumed mpp when overlap must be derived and nothing else is known.
    fallback_mpp: float = 0.25
    #: A slide coarser than ``target_mpp / min_cell_scale`` is upsampled to that mpp; finer
    #: but coarser than the target, it is cut at its own pixels; 0 never upsamples. 0.6 (0.25
    #: um/px for the shipped 0.15 um/px detector, trained with cells at 0.5-1.5x): it finds
    #: cells on 0.25 um/px slides as on photos at its own scale, but on the ALL set's fields
    #: (RBC-estimated 0.29-0.38 um/px, cells at 0.4-0.5x) it found no counted WBC on 43 of 153
    #: test-split Pro images, upsampled to 0.25 um/px on 5 (`hemaray eval images` on the 590:
    #: accuracy 0.736 -> 0.836; on 40 per class, upsampling to 0.15 / 0.2 / 0.25 / 0.3 / 0.35
    #: um/px gave 0.794 / 0.775 / 0.813 / 0.788 / 0.713, none 0.688).
    min_cell_scale: float = 0.6
    #: A tile whose read region has less foreground than this fraction is skipped.
    min_foreground_fraction: float = 0.001
    #: Longest side of the low-resolution image used to find background.
    mask_max_side: int = 4096
    #: RGB distance from the background colour above which a pixel is foreground.
    foreground_delta: float = 30.0
    skip_background: bool = True

    def validate(self) -> None:
        if self.tile_size < 64:
            raise ConfigError(f"tiling.tile_size must be >= 64 px, got {self.tile_size}")
        ov = self.overlap_px
        if ov is not None and not 0 <= ov < self.tile_size // 2:
            raise ConfigError(
                f"tiling.overlap_px must be in [0, tile_size/2), got {ov} for tile_size {self.tile_size}"
            )
        if self.overlap_um < 0:
            raise ConfigError(f"tiling.overlap_um must be >= 0, got {self.overlap_um}")
        if not 0 <= self.min_cell_scale <= 1:
            raise ConfigError(f"tiling.min_cell_scale must be in [0, 1], got {self.min_cell_scale}")
        if not 0 <= self.min_foreground_fraction < 1:
            raise ConfigError(
                f"tiling.min_foreground_fraction must be in [0, 1), got {self.min_foreground_fraction}"
            )


#: Per-slide budget on level-0 pixels (width * height); larger headers are refused.
DEFAULT_MAX_PIXELS: int = 200_000 * 200_000

#: Per-slide budget on TIFF pages (IFDs); a slide has a few dozen, a hostile file 10^5.
DEFAULT_MAX_PAGES: int = 4096


@dataclass
class SlideConfig:
    """Limits on what a slide may be."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    #: Longest TIFF page chain accepted; a longer (or looping) one is a CorruptSlideError.
    max_pages: int = DEFAULT_MAX_PAGES
    #: Seconds opening a slide (header, page chain, tile tables) may take; longer is a
    #: SlideOpenTimeoutError. A healthy slide opens in well under a second, over S3 in a few.
    open_timeout_s: float = 120.0

    def validate(self) -> None:
        if self.max_pixels <= 0:
            raise ConfigError(f"slides.max_pixels must be > 0, got {self.max_pixels}")
        if self.open_timeout_s <= 0:
            raise ConfigError(f"slides.open_timeout_s must be > 0, got {self.open_timeout_s}")
        if self.max_pages <= 0:
            raise ConfigError(f"slides.max_pages must be > 0, got {self.max_pages}")


#: Values of ``storage.retry_mode`` (botocore): "standard" retries with exponential backoff and
#: jitter; "adaptive" adds client-side rate limiting when the store throttles (503 SlowDown).
RETRY_MODES = ("standard", "adaptive")
#: Default attempts (the first try included) of every S3 request, reads and writes alike.
DEFAULT_S3_MAX_ATTEMPTS = 10
#: A SHA-256 hex digest, as ``sha256sum`` prints it.
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def _validate_sha256(value: str | None, where: str) -> None:
    if value is not None and not _SHA256_HEX.fullmatch(value):
        raise ConfigError(
            f"{where} must be a SHA-256 hex digest (64 hex digits, as sha256sum prints it), "
            f"got {value!r}"
        )


@dataclass
class StorageConfig:
    """Object storage. Credentials never live here: they come from the AWS chain."""

    #: S3-compatible endpoint (MinIO, Ceph, moto); None: AWS. A URL with user:password@ is
    #: refused (it would be logged and written to the manifest).
    endpoint_url: str | None = None
    #: Attempts of every S3 request (the first included) before it fails, with backoff between.
    max_attempts: int = DEFAULT_S3_MAX_ATTEMPTS
    #: botocore retry mode, one of RETRY_MODES.
    retry_mode: str = "adaptive"

    def validate(self) -> None:
        if self.endpoint_url is not None and not self.endpoint_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(
                f"storage.endpoint_url must be an http(s) URL, got {redact_url(self.endpoint_url)!r}"
            )
        refuse_credentials(self.endpoint_url, "storage.endpoint_url")
        if self.max_attempts < 1:
            raise ConfigError(f"storage.max_attempts must be >= 1, got {self.max_attempts}")
        if self.retry_mode not in RETRY_MODES:
            raise ConfigError(
                f"storage.retry_mode must be one of {RETRY_MODES}, got {self.retry_mode!r}"
            )

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this storage: endpoint and botocore retries (no credentials).

        Every S3 filesystem hemaray builds gets them, so reads and writes alike
        retry throttling and transient errors with backoff. Other fsspec
        filesystems (local, memory) ignore them.

        Raises
        ------
        ConfigError
            If the endpoint carries credentials (checked here too: a config built
            in code may skip `validate`).
        """
        refuse_credentials(self.endpoint_url, "storage.endpoint_url")
        options: dict[str, Any] = {
            "config_kwargs": {
                # botocore's "max_attempts" counts retries only; "total_max_attempts" all tries
                "retries": {"total_max_attempts": self.max_attempts, "mode": self.retry_mode}
            }
        }
        if self.endpoint_url is not None:
            options["client_kwargs"] = {"endpoint_url": self.endpoint_url}
        return options


#: Inference runtimes a detector can run in (batch.stages.runtime).
RUNTIMES = ("torch", "onnxruntime", "openvino", "openvino-int8", "tensorrt")
#: Values of ``detect.runtime``: a runtime, or "auto" (batch.stages.autoruntime).
DETECT_RUNTIMES = ("auto", *RUNTIMES)


@dataclass
class DetectConfig:
    """The cell detector and how it runs."""

    #: Local path or s3:// URL of an ultralytics detection .pt; None: the shipped detector.
    model: str | None = None
    #: Expected SHA-256 of the model file; a different file is refused before it is loaded.
    sha256: str | None = None
    #: Confidence threshold for kept detections.
    conf: float = 0.25
    #: IoU threshold of non-maximum suppression.
    iou: float = 0.6
    #: Boxes kept per tile: ultralytics' default of 300 is too low for dense smear tiles
    #: (a 640 px tile at 0.25 um/px holds ~300-400 RBCs in a thick area).
    max_det: int = 1000
    #: Class-agnostic NMS: one cell gets one box even when classes compete.
    agnostic_nms: bool = True
    #: A WBC box of which at least this share (intersection over its own area, or over the
    #: other's, whichever is smaller) lies in a higher-scoring WBC box of the same tile is
    #: dropped; 0 keeps every box NMS keeps. NMS compares IoU, so a lobe cluster boxed inside
    #: its own neutrophil (IoU ~0.6) survived as a second WBC: 10 of 179 WBC boxes on the
    #: synthetic blood slides of seed 31, which skewed their differential. 0.5, not more: two
    #: lobe clusters boxed apart in one neutrophil (no box around the whole cell) overlap 0.55
    #: there (PyTorch and FP32 runtimes). Two distinct round cells of WBC size in a monolayer
    #: cannot: their boxes share under 10 % of the smaller.
    wbc_contained: float = 0.5
    #: Inference runtime: "torch" (the .pt as it is); "onnxruntime", "openvino" (FP32),
    #: "openvino-int8" (NNCF post-training quantization) or "tensorrt" (FP16 engine, CUDA):
    #: exported once, offline, into the model cache (batch.stages.runtime); or "auto": the
    #: first of a measured preference order for the device that is installed and passes its
    #: parity check against torch (batch.stages.autoruntime). FP32 exports give the same cells
    #: up to float rounding (tested); cell ids of a runtime other than torch differ from torch's.
    runtime: str = "auto"
    #: Threads of each CPU detector actor's runtime, for the runtimes that pick their own
    #: (ONNX Runtime, OpenVINO: every core, in every actor). -1: the runtime's own default;
    #: 0: the actor's share of the node's cores, as torch's (execution.torch_threads, else
    #: cores / detector actors); N: N threads. Torch runs on the actor's share. OpenVINO's
    #: threads are never pinned to cores (batch.stages.netrun).
    #: Measured with `hemaray bench placement --runtime R --json` (48 tiles, this 2-core
    #: machine, quiet, best of 2 alternating rounds), tiles/s for 2 actors x 1 thread /
    #: 2 actors x the runtime's default / 1 actor x default: openvino 11.40 / 10.31 / 9.44,
    #: openvino-int8 17.90 / 15.81 / 14.98. (Before OpenVINO's threads were unpinned, its
    #: 1-thread actors were pinned to one core: 2 x 1 measured 7.93 against 13.50 for 1 x
    #: default.) OpenVINO's actors therefore run on their share; ONNX Runtime, not
    #: re-measured, keeps its default.
    runtime_threads: dict[str, int] = field(
        default_factory=lambda: {"onnxruntime": -1, "openvino": 0, "openvino-int8": 0}
    )
    #: Tiles per forward pass.
    batch_size: int = 8
    #: Detector actors; 0: one per GPU, or on a CPU-only cluster one per CPU (at most 16).
    actors: int = 0
    #: GPUs per detector actor when the cluster has GPUs.
    gpus_per_actor: float = 1.0
    device: str = "auto"

    def validate(self) -> None:
        if not 0 <= self.conf <= 1 or not 0 < self.iou <= 1:
            raise ConfigError(
                f"detect.conf must be in [0,1] and detect.iou in (0,1]; got {self.conf}, {self.iou}"
            )
        bad = {k: v for k, v in self.runtime_threads.items() if k not in RUNTIMES or v < -1}
        if bad:
            raise ConfigError(
                f"detect.runtime_threads takes runtimes of {RUNTIMES} with values >= -1; got {bad}"
            )
        if self.runtime not in DETECT_RUNTIMES:
            raise ConfigError(
                f"detect.runtime must be one of {DETECT_RUNTIMES}, got {self.runtime!r}"
            )
        if self.max_det < 1 or self.batch_size < 1 or self.actors < 0:
            raise ConfigError(
                "detect.max_det and detect.batch_size must be >= 1, detect.actors >= 0"
            )
        refuse_credentials(self.model, "detect.model")
        _validate_sha256(self.sha256, "detect.sha256")


@dataclass
class ClassifierSpec:
    """One WBC classifier; it adds NAME_label, NAME_confidence, NAME_probs, NAME_version columns.

    Classifiers form a hierarchy: one with a ``parent`` runs only on the WBCs
    that parent (an earlier classifier in ``classifiers``) labelled with one of
    ``parent_labels``; its columns are null for the others. The default chain
    is detector WBC -> ``wbc_type`` (every WBC) -> ``all_subtype`` (cells called
    ``blast``); add ``lymphocyte`` to ``parent_labels`` to subtype those too.
    """

    name: str = "all_subtype"
    #: Local path or s3:// URL; a bare shipped name (wbc_type, all_subtype) means the shipped weights.
    model: str = "all_subtype"
    #: mask, crop or dual; None: what the model card says.
    input_mode: str | None = None
    #: Name of the classifier whose labels select this one's cells; None: every WBC.
    parent: str | None = None
    #: The parent's labels this classifier runs on.
    parent_labels: list[str] = field(default_factory=list)
    #: Expected SHA-256 of the model file; a different file is refused before it is loaded.
    sha256: str | None = None

    def validate(self) -> None:
        if not self.name.isidentifier():
            raise ConfigError(
                f"classifiers: name must be an identifier (it names columns), got {self.name!r}"
            )
        if self.input_mode not in (None, "mask", "crop", "dual"):
            raise ConfigError(f"classifiers.{self.name}.input_mode must be mask, crop or dual")
        if (self.parent is None) != (not self.parent_labels):
            raise ConfigError(
                f"classifiers.{self.name}: parent and parent_labels go together "
                f"(got parent={self.parent!r}, parent_labels={self.parent_labels!r})"
            )
        refuse_credentials(self.model, f"classifiers.{self.name}.model")
        _validate_sha256(self.sha256, f"classifiers.{self.name}.sha256")


def _default_classifiers() -> list[ClassifierSpec]:
    return [
        ClassifierSpec("wbc_type", "wbc_type"),
        ClassifierSpec("all_subtype", "all_subtype", parent="wbc_type", parent_labels=["blast"]),
    ]


#: Values of ``segmentation.kmeans``.
KMEANS_METHODS = ("exact", "opencv")


@dataclass
class SegmentationConfig:
    """WBC cropping and nucleus / cell segmentation (LAB colour space + k-means on a*).

    Lengths are in micrometres and areas in um^2; the segmentation converts
    them to pixels with the crop's mpp, with at least one pixel for every
    kernel radius. ``k=2, max_nucleus_b=None`` is the seeds' setting.
    """

    #: Crop margin as a fraction of the box size on each side.
    crop_margin: float = 0.15
    #: Nucleus components smaller than this (um^2) are dropped (a platelet is ~3-7 um^2).
    min_nucleus_um2: float = 6.0
    #: Number of a* clusters; the nucleus is the one with the highest a*
    #: (3: glass / red cells, cytoplasm, nucleus; the seeds used 2).
    k: int = 3
    #: "exact": optimal 1-D k-means (k = 2 or 3); "opencv": cv2.kmeans.
    kmeans: str = "exact"
    #: The nucleus cluster's mean a* must exceed the rest's by this much (CIELAB
    #: units), else the crop holds no nucleus (a blank or red-cell-only crop).
    min_a_separation: float = 8.0
    #: Radius of the opening that removes specks from the nucleus mask.
    open_radius_um: float = 0.3
    #: Radius of the closing that joins chromatin clumps of one nucleus.
    close_radius_um: float = 0.5
    #: Drop nucleus components touching the crop border unless none is left
    #: (a neighbour's nucleus cut by the crop's margin).
    drop_border_components: bool = True
    #: Nucleus pixels must also lie on the blue side: CIELAB b* below this. Red
    #: cells (dark where they overlap) and eosinophil granules have a high a*
    #: too, but a b* near or above 0; purple-blue nuclei sit far below.
    #: None: a* only, exactly as in the seeds.
    max_nucleus_b: float | None = 0.0
    #: With a known cell box, keep the nucleus components that reach into the box
    #: shrunk by this fraction of its size on each side (a neighbour's nucleus in
    #: the crop does not), unless none does.
    core_fraction: float = 0.2
    #: CIELAB distance (CIE76 Delta E) from the background that marks cell pixels.
    foreground_delta_e: float = 12.0
    #: Radius of the opening that cuts the cell from touching red cells.
    cell_open_radius_um: float = 0.75
    #: The ring around the nucleus that seeds the cell in the watershed.
    cell_seed_ring_um: float = 1.0
    #: The cytoplasm reaches at most this far from the nucleus.
    max_cytoplasm_um: float = 5.0
    #: With a known cell box, the cell may reach this fraction of the box size past it.
    box_tolerance: float = 0.05

    def validate(self) -> SegmentationConfig:
        """Raise `ConfigError` on an out-of-range field; return ``self``."""
        if not 0 <= self.crop_margin <= 1:
            raise ConfigError(f"segmentation.crop_margin must be in [0, 1], got {self.crop_margin}")
        if self.k < 2:
            raise ConfigError(f"segmentation.k must be >= 2, got {self.k}")
        if self.kmeans not in KMEANS_METHODS:
            raise ConfigError(
                f"segmentation.kmeans must be one of {KMEANS_METHODS}, got {self.kmeans!r}"
            )
        if self.kmeans == "exact" and self.k not in (2, 3):
            raise ConfigError("segmentation.kmeans='exact' supports k = 2 or 3; use 'opencv'")
        for name in (
            "open_radius_um", "close_radius_um", "min_nucleus_um2", "foreground_delta_e",
            "cell_open_radius_um", "max_cytoplasm_um", "box_tolerance", "core_fraction",
        ):  # fmt: skip
            if getattr(self, name) < 0:
                raise ConfigError(f"segmentation.{name} must be >= 0, got {getattr(self, name)}")
        return self


#: Values of ``execution.placement``.
PLACEMENTS = ("auto", "staged", "fused")
#: Stages ``execution.inject_fault`` can make fail on one tile.
FAULT_STAGES = ("read", "detect", "crop", "segment", "classify", "crash", "crash_once")


@dataclass
class ExecutionConfig:
    """Ray Data placement: concurrency and batch sizes (0 = derive from the cluster)."""

    #: Concurrent tile-read tasks; 0: the cluster's CPU count.
    read_concurrency: int = 0
    #: Crop + segment workers (a CPU actor pool); 0: half the cluster's CPU count (at least one).
    segment_concurrency: int = 0
    #: Tiles per read batch, which is also one block of decoded tiles; 0: detect.batch_size
    #: (each block then feeds one detector batch as it is), or twice that with the fused
    #: placement (one actor task per read batch).
    read_batch_size: int = 0
    #: CPUs reserved per plan / read / segment task (fractions let them share cores with the
    #: detector, whose torch threads use every core anyway).
    cpu_per_task: float = 0.25
    #: CPUs reserved per detector actor on CPU-only clusters (a logical share: the lighter
    #: stages run beside the detectors on the same cores).
    cpu_per_actor: float = 0.5
    #: CPUs reserved per classifier actor on CPU-only clusters.
    cpu_per_classifier: float = 0.5
    #: Classifier actors; 0: one per GPU, or one on a CPU-only cluster.
    classify_actors: int = 0
    classify_batch_size: int = 16
    gpus_per_classifier: float = 0.25
    #: Torch threads in each CPU detector actor; 0: the node's cores / detector actors (>= 1).
    torch_threads: int = 0
    #: Torch threads in each CPU classifier actor; 0: one per reserved CPU (at least one), so
    #: the small classifiers do not take cores from the detector.
    classify_threads: int = 0
    #: Where the per-tile model work runs. "staged": detect, crop + segment and classify are
    #: separate actor pools (GPU detectors, CPU segmentation, fractional-GPU classifiers).
    #: "fused": one actor per core does detect, crop, segment and classify on its own tiles
    #: (no hand-offs through the object store, two fewer worker processes). "auto": staged when
    #: the cluster has GPUs and detect.device allows them, fused otherwise.
    placement: str = "auto"
    #: Object store memory (MB) the run's dataset may fill with decoded tiles in flight; bounds
    #: a run's memory whatever the slide size. 0: 4 read batches per detector actor, at least
    #: 256 MB.
    object_store_mb: int = 0
    #: Times a crashed worker (segfault, OOM kill) is restarted and its work retried; after
    #: that the run ends and fails its unfinished slides (the crash recorded) instead of retrying
    #: without limit (Ray Data's default for actors).
    max_worker_restarts: int = 2
    #: Testing hook: "STAGE:SLIDE_ID:ROW:COL" makes that stage raise on that tile (fault tests
    #: use it); STAGE is one of FAULT_STAGES, "crash" kills the worker process at the read,
    #: "crash_once" only the first time (batch.run.faults.first_crash).
    inject_fault: str | None = None

    def validate(self) -> None:
        if self.read_batch_size < 0 or self.classify_batch_size < 1:
            raise ConfigError("execution batch sizes must be >= 1 (read_batch_size 0: derived)")
        if self.torch_threads < 0 or self.classify_threads < 0:
            raise ConfigError("execution.torch_threads and classify_threads must be >= 0")
        if self.cpu_per_task <= 0 or self.cpu_per_actor <= 0:
            raise ConfigError("execution.cpu_per_task and cpu_per_actor must be > 0")
        if self.object_store_mb < 0:
            raise ConfigError("execution.object_store_mb must be >= 0 (0: derived)")
        if self.placement not in PLACEMENTS:
            raise ConfigError(
                f"execution.placement must be one of {PLACEMENTS}, got {self.placement!r}"
            )
        if self.max_worker_restarts < 0:
            raise ConfigError("execution.max_worker_restarts must be >= 0")
        if self.inject_fault is not None:
            parts = self.inject_fault.split(":")
            if len(parts) != 4 or parts[0] not in FAULT_STAGES:
                raise ConfigError(
                    "execution.inject_fault must be STAGE:SLIDE_ID:ROW:COL with STAGE one of "
                    f"{FAULT_STAGES}, got {self.inject_fault!r}"
                )


@dataclass
class CallsConfig:
    """Which detected WBCs a slide's calls (WBC differential, ALL-subtype vote) count.

    Every WBC row stays in ``cells`` with its labels; these gates only decide
    which of them vote. The nucleus defaults are the check the shipped
    ``all_subtype`` model's training crops passed (``batch.train.weak_labels``): on
    bluish stains the detector calls some red cells WBCs, and those have no
    purple nucleus. On all4 (2,727 images) voting only over WBCs with such a
    nucleus raised image accuracy from 0.50 to 0.71; adding the training crops'
    confidence floor (0.6) as well lowered it to 0.56, so it is off by default.
    """

    #: Minimum detector confidence of a counted WBC; 0: every WBC the detector kept (detect.conf).
    min_wbc_confidence: float = 0.0
    #: A counted WBC has a segmented nucleus at least this large (um^2) ...
    min_nucleus_um2: float = 15.0
    #: ... and this purple (mean CIELAB a*; red cells called WBCs score about 5-12, WBC nuclei
    #: 22-70 on all4). Set all three to 0 to count every WBC.
    min_nucleus_a: float = 18.0

    #: The classifier whose labels make the WBC differential and pick the blasts.
    type_classifier: str = "wbc_type"
    #: The classifier whose labels among the blasts make the ALL call.
    subtype_classifier: str = "all_subtype"
    #: type_classifier labels counted as blasts.
    blast_labels: list[str] = field(default_factory=lambda: ["blast"])
    #: type_classifier labels that are not leukocytes (artefacts, platelet clumps, nucleated red
    #: cells the detector boxed as WBCs): left out of the differential and the blast fraction.
    not_leukocytes: list[str] = field(default_factory=lambda: ["other", "platelet", "erythroblast"])
    #: The ALL call is made only when blasts reach this share of the counted leukocytes
    #: (WHO: >= 20 % blasts in blood or marrow for acute leukemia); below it the call is "none".
    min_blast_fraction: float = 0.20

    def validate(self) -> None:
        if not 0 <= self.min_wbc_confidence <= 1:
            raise ConfigError(
                f"calls.min_wbc_confidence must be in [0, 1], got {self.min_wbc_confidence}"
            )
        if self.min_nucleus_um2 < 0:
            raise ConfigError(f"calls.min_nucleus_um2 must be >= 0, got {self.min_nucleus_um2}")
        if not 0 <= self.min_blast_fraction <= 1:
            raise ConfigError(
                f"calls.min_blast_fraction must be in [0, 1], got {self.min_blast_fraction}"
            )


#: Values of ``classify.runtime`` (batch.stages.classify_runtime).
CLASSIFY_RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")


@dataclass
class ClassifyConfig:
    """How the WBC classifiers (``classifiers``) run."""

    #: Inference runtime of every classifier: "torch" (the .pt as it is), "openvino" or
    #: "onnxruntime" (FP32 exports made once, offline, and checked against torch), or "auto":
    #: on a CPU the first of openvino, onnxruntime, torch that is installed and passed its
    #: check; on CUDA torch (FP16). Measured on this project's 2-core machine, 324 crops of
    #: 96 px on one thread, best of 3: OpenVINO 0.41 s, torch 0.64 s. Probabilities agree to
    #: float rounding (tested); cell ids do not depend on it.
    runtime: str = "auto"

    def validate(self) -> None:
        if self.runtime not in CLASSIFY_RUNTIMES:
            raise ConfigError(
                f"classify.runtime must be one of {CLASSIFY_RUNTIMES}, got {self.runtime!r}"
            )


@dataclass
class ExportConfig:
    """Optional heavy columns for annotation export."""

    #: Store each WBC's crop and nucleus mask as PNG bytes in the cells table.
    crops: bool = False

    def validate(self) -> None:
        return None


@dataclass
class Config:
    """Everything a run needs to know; saved as ``config.yaml`` with the run."""

    tiling: TilingConfig = field(default_factory=TilingConfig)
    slides: SlideConfig = field(default_factory=SlideConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    classifiers: list[ClassifierSpec] = field(default_factory=_default_classifiers)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    calls: CallsConfig = field(default_factory=CallsConfig)
    #: Level-0 mpp for slides whose files carry none (JPEG/PNG fields); None: estimate.
    mpp: float | None = None

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for item in value if isinstance(value, list) else [value]:
                if hasattr(item, "validate"):
                    item.validate()
        names = [c.name for c in self.classifiers]
        if len(names) != len(set(names)):
            raise ConfigError(f"classifiers: names must be unique, got {names}")
        for i, spec in enumerate(self.classifiers):
            if spec.parent is not None and spec.parent not in names[:i]:
                raise ConfigError(
                    f"classifiers.{spec.name}.parent must name an earlier classifier "
                    f"(one of {names[:i]}), got {spec.parent!r}"
                )
        if self.mpp is not None and self.mpp <= 0:
            raise ConfigError(f"mpp must be > 0, got {self.mpp}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


T = TypeVar("T")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: cannot read {value!r} as {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)  # type: ignore[arg-type]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from e
    if tp is str:
        return str(value)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"{where or 'config'}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the run's config from defaults, an optional YAML file and ``key=value`` overrides.

    Raises
    ------
    ConfigError
        On unknown keys, wrong types or out-of-range values, naming the key.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a YAML mapping at the top level")
        tree = loaded
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), raw.strip())
    return config_from_tree(tree)


def config_from_tree(tree: dict[str, Any]) -> Config:
    """The validated config of a parsed YAML mapping (a saved run's ``config.yaml``, say).

    Raises
    ------
    ConfigError
        On unknown keys, wrong types or out-of-range values, naming the key.
    """
    return _build(Config, tree, "").validate()
