"""Labelled image sets on disk, read into plain records.

What lives here:

- ``batch.datasets.detection``: YOLO-format and Pascal VOC detection sets
  (``LabeledImage``, ``read_detection_dataset``);
- ``batch.datasets.folders``: ImageFolder classification sets (one folder per
  class): class folders, image listing, folder names -> labels,
  ``discover_images``;
- ``IMAGE_SUFFIXES`` (below): which files are images, for the whole project.

Imports: the standard library, numpy / OpenCV / YAML, ``batch.stages`` and
``batch.config``. Nothing from ``batch.train``, ``batch.eval`` or
``batch.run``: training and evaluation read their data through this package,
never the other way round.
"""

from __future__ import annotations

__all__ = ["IMAGE_SUFFIXES"]

#: File suffixes read as images (lower case, compared with ``Path.suffix.lower()``).
#: The one definition in the project: detection sets, ImageFolders, weak-label
#: crops and the evaluations all list images with it.
IMAGE_SUFFIXES: tuple[str, ...] = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
