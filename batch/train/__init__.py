"""Training jobs: the detector, the WBC classifiers, the detector sweep and weak labels.

What lives here:

- ``detector`` (+ ``detector_data``: merging, deduplication, packing,
  synthetic fields): train the RBC / WBC / platelet detector;
- ``classifier`` (+ ``classifier_data``: grouped splits, rendering,
  balancing): train a WBC classifier from an ImageFolder;
- ``from_labels``: both trainers' data cut from corrected labels and their
  slides, as the pipeline cuts it;
- ``common``: the seeds' fine-tuning strategies and an offline ultralytics;
- ``sweep``: seed 000's detector grid as parallel Ray tasks;
- ``weak_labels``: weakly labelled WBC crops from image-labelled sets.

Imports: ``batch.datasets`` (the data), ``batch.stages`` (the same
preprocessing and models inference uses), ``batch.eval`` (to report metrics
after training), ``batch.export`` (cutting fields and crops from slides, and
runs' configs), ``batch.config`` and ``batch.models``. Nothing below this
package imports it; only ``batch.cli`` and ``jobs/`` sit above. The package
itself imports none of its modules.
"""

from __future__ import annotations

__all__: list[str] = []
