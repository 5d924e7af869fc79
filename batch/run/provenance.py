"""What a run records about itself: model files and hashes, label sets, the run manifest.

Driver-side only (nothing here runs on workers). The manifest is written
next to the run's output (``OUT/runs/<run_id>/manifest.json``) with the
config, the model files' SHA-256s, package and Ray versions, start / end and
counts, so every output row can be traced to the code and weights that made it.
The model files are resolved here with their pinned hashes (``detect.sha256``,
``classifiers[].sha256``), so a wrong file stops the run before any compute.
No URL in the manifest carries credentials (`batch.storage.redact_credentials`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from batch import __version__
from batch.config import ClassifierSpec, Config
from batch.models import (
    DEFAULT_DETECTOR,
    ModelCard,
    file_sha256,
    read_model_card,
    resolve_model,
    shipped_or_path,
)
from batch.stages.classify import WbcClassifier
from batch.storage import redact_credentials

__all__ = [
    "classifier_runtimes",
    "label_sets",
    "local_hashes",
    "model_files",
    "run_manifest",
    "trained_mpp",
]


def trained_mpp(config: Config) -> tuple[float | None, str]:
    """The detector's trained mpp (from its model card; None if it has none) and its file."""
    local = resolve_model(
        config.detect.model,
        storage_options=config.storage.storage_options(),
        sha256=config.detect.sha256,
    )
    card = read_model_card(local)
    return (card.trained_mpp if card else None), str(
        local if config.detect.model else DEFAULT_DETECTOR
    )


def _classifier_files(config: Config) -> Iterator[tuple[ClassifierSpec, Path, ModelCard | None]]:
    """Each configured classifier with its local file (pinned hash checked) and model card."""
    for spec in config.classifiers:
        local = resolve_model(
            shipped_or_path(spec.model),
            storage_options=config.storage.storage_options(),
            sha256=spec.sha256,
        )
        yield spec, local, read_model_card(local)


def label_sets(config: Config) -> dict[str, list[str]]:
    """Each classifier's label set, from its model card (the model is loaded only without one)."""
    out: dict[str, list[str]] = {}
    for spec, local, card in _classifier_files(config):
        if card is not None and card.class_names:
            out[spec.name] = list(card.class_names)
        else:
            out[spec.name] = list(WbcClassifier(local, name=spec.name, device="cpu").class_names)
    return out


def classifier_runtimes(config: Config, device: str) -> dict[str, dict[str, Any]]:
    """The run manifest's ``classify_runtime``: each classifier's runtime on ``device``, and why.

    ``classify.runtime = auto`` is resolved here as each classifier resolves it
    (exports made once, here, before any actor starts). Reads model cards, not
    models, unless a classifier has no card (then it is loaded for its size).
    """
    from batch.stages.classify_runtime import choose_classifier_runtime

    out: dict[str, dict[str, Any]] = {}
    runtime = config.classify.runtime
    for spec, local, card in _classifier_files(config):
        if card is not None and card.imgsz:
            choice = choose_classifier_runtime(local, runtime, card.imgsz, device)
        else:
            choice = WbcClassifier(local, name=spec.name, device=device, runtime=runtime).runtime_choice
        out[spec.name] = choice.to_dict()
    return out


def model_files(config: Config) -> dict[str, str]:
    """The model files a run uses, by role."""
    files = {"detector": config.detect.model or str(DEFAULT_DETECTOR)}
    files.update({spec.name: shipped_or_path(spec.model) for spec in config.classifiers})
    return files


def local_hashes(files: dict[str, str]) -> dict[str, str | None]:
    """SHA-256 of each local file; None for remote ones (they are hashed once fetched)."""
    return {k: (file_sha256(v) if os.path.exists(v) else None) for k, v in files.items()}


def run_manifest(
    run_id: str,
    started_at: datetime,
    *,
    n_inputs: int,
    out: str,
    config: Config,
    detector_trained_mpp: float | None,
    labels: dict[str, list[str]],
) -> dict[str, Any]:
    """The manifest's fields known at the start of a run (the end adds times and counts).

    Any URL in it (``out``, model files, the config's endpoint) has its
    user-info masked, even where validation was skipped.
    """
    import ray

    files = model_files(config)
    hashes = local_hashes(files)
    return redact_credentials(
        {
            "run_id": run_id,
            "package": "hemaray",
            "version": __version__,
            "started_at": started_at.isoformat(),
            "inputs": n_inputs,
            "out": out,
            "ray": ray.__version__,
            "models": {k: {"file": v, "sha256": hashes[k]} for k, v in files.items()},
            "detector_trained_mpp": detector_trained_mpp,
            "label_sets": labels,
            "config": config.to_dict(),
        }
    )
