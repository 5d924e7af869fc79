"""Evaluation: how well the models and the whole chain do on labelled data.

What lives here, one module per ``hemaray eval`` target plus the scoring:

- ``metrics``: every scoring function (detection AP / P / R / F1,
  classification metrics, macro F1, Dice / IoU), pure and model-free;
- ``detector``: the detector stage on a YOLO / VOC set (``eval_detector``);
- ``classifier``: a WBC classifier on an ImageFolder (``eval_classifier``);
- ``segmentation``: nucleus Dice / IoU on synthetic fields (``eval_segmentation``);
- ``images``: the whole per-cell chain on image-level labels (``eval_images``);
- ``synthetic``: detection, segmentation, WBC types and slide figures on fresh
  synthetic slides (``eval_synthetic``);
- ``run``: a finished run's cells and slides against synthetic ground truth (``evaluate_run``);
- ``differential``: WBC-type accuracy and per-slide differential, blast fraction and
  ALL call against the truth (used by ``run``).

Imports: ``batch.stages``, ``batch.datasets``, ``batch.slides``, ``batch.run``
(the Ray-free local runner), ``batch.calls``, ``batch.config`` and the other top-level
helpers. Never ``batch.train``: training may report metrics from here, not
the other way round. The package itself imports none of its modules, so
``batch.eval.metrics`` stays cheap to import.
"""

from __future__ import annotations

__all__: list[str] = []
