"""What both trainers share: the seeds' fine-tuning strategies and an offline ultralytics.

Fine-tuning strategies follow seeds 000 / 001, which compared training all
layers with training only the last N top-level modules. The value names
the part that is *trained*; ultralytics' ``freeze=k`` freezes the first k.
The two trainers map it differently, as they always have:

- the detector (`freeze_layers`) takes one of ``FREEZE_STRATEGIES``
  (``all``, ``last10``, ``last3``) and refuses to train more trailing modules
  than the model has. For YOLOv8 (23 modules) ``last10`` freezes the
  backbone (0-9) and the first three neck modules (10-12); ``last3`` trains
  only the P5 neck block (Concat + C2f, modules 20-21) and the ``Detect``
  head (22);
- the classifier (`freeze_count`) takes any ``lastN`` (``FREEZE_PATTERN``)
  and clamps: yolov8n-cls has 10 top-level layers, so ``last10`` equals
  ``all`` there.

`offline_ultralytics` keeps an ultralytics training off the network.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batch.models import import_ultralytics

__all__ = [
    "FREEZE_PATTERN",
    "FREEZE_STRATEGIES",
    "freeze_count",
    "freeze_layers",
    "offline_ultralytics",
]

#: Detector fine-tuning strategies of seed 000: number of trailing top-level modules trained.
FREEZE_STRATEGIES: dict[str, int | None] = {"all": None, "last10": 10, "last3": 3}
#: Classifier fine-tuning strategies (seeds 000/001): train all layers, or only the last N.
FREEZE_PATTERN = re.compile(r"^(all|last(\d+))$")
#: Ultralytics settings that would reach the network or start third-party loggers.
_ULTRALYTICS_INTEGRATIONS = (
    "sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb",
)


def freeze_layers(n_modules: int, strategy: str) -> int | None:
    """Ultralytics ``freeze`` value of a detector strategy of seed 000 (see the module docstring).

    Parameters
    ----------
    n_modules
        Top-level modules of the model (``len(YOLO(...).model.model)``; 23 for YOLOv8).
    strategy
        ``"all"``, ``"last10"`` or ``"last3"``: which part trains.

    Returns
    -------
    int or None
        Number of leading modules to freeze; None freezes nothing.
    """
    if strategy not in FREEZE_STRATEGIES:
        raise ValueError(f"--freeze must be one of {sorted(FREEZE_STRATEGIES)}, got {strategy!r}")
    trained = FREEZE_STRATEGIES[strategy]
    if trained is None:
        return None
    if trained >= n_modules:
        raise ValueError(f"model has {n_modules} modules; cannot train only the last {trained}")
    return n_modules - trained


def freeze_count(model: str, freeze: str) -> tuple[int, int]:
    """Map a classifier's fine-tuning strategy to ultralytics' ``freeze`` (first N layers frozen).

    Returns
    -------
    tuple of int
        ``(n_frozen, n_layers)``: ``all`` -> ``(0, L)``; ``lastN`` ->
        ``(max(0, L - N), L)`` with ``L`` the model's top-level layer count.
    """
    m = FREEZE_PATTERN.match(freeze)
    if m is None:
        raise ValueError(f"freeze must be 'all' or 'lastN', got {freeze!r}")
    import_ultralytics()
    from ultralytics import YOLO

    net: Any = YOLO(model, task="classify").model
    n_layers = len(net.model)
    if m.group(1) == "all":
        return 0, n_layers
    return max(0, n_layers - int(m.group(2))), n_layers


@contextlib.contextmanager
def offline_ultralytics(config_dir: Path) -> Iterator[None]:
    """Keep an ultralytics training offline and its settings inside ``config_dir``.

    ``YOLO_OFFLINE`` stops the online check, but two calls still try the
    network first during training: ``check_font`` (downloads Arial.ttf, only
    used for plots, which are off) and ``check_amp`` (downloads a reference
    model to test mixed precision on CUDA). Both are replaced while the block
    runs; AMP is then trusted on CUDA. Hub sync and logger integrations are
    switched off in the settings.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    import_ultralytics()
    import ultralytics.data.utils as data_utils
    import ultralytics.engine.trainer as trainer
    from ultralytics import settings

    settings.update({key: False for key in _ULTRALYTICS_INTEGRATIONS if key in settings})
    saved = {
        (data_utils, "check_font"): getattr(data_utils, "check_font", None),
        (trainer, "check_amp"): getattr(trainer, "check_amp", None),
    }

    def no_font(*args: Any, **kwargs: Any) -> None:
        return None

    def trust_amp(*args: Any, **kwargs: Any) -> bool:
        return True

    data_utils.check_font = no_font  # type: ignore[assignment]
    trainer.check_amp = trust_amp  # type: ignore[assignment]
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            if value is not None:
                setattr(module, name, value)
