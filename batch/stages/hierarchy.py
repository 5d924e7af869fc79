"""A chain of WBC classifiers, each run on the cells its parent labelled (the taxonomy).

`batch.config.ClassifierSpec` names a classifier's parent and the parent
labels it runs on: by default ``wbc_type`` runs on every WBC and
``all_subtype`` only on the cells ``wbc_type`` called ``blast``, so a
neutrophil never votes in an ALL-subtype call. The order of the chain is the
config's; a parent always comes before its children (the config checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["ChainLink", "ChainResult", "CropClassifier", "classify_chain"]


class CropClassifier(Protocol):
    """What the chain needs of a classifier (`batch.stages.classify.WbcClassifier`)."""

    def classify(
        self,
        crops: Sequence[npt.NDArray[np.uint8]],
        masks: Sequence[npt.NDArray[np.bool_] | None] | None = None,
        mpp: Sequence[float | None] | None = None,
    ) -> tuple[list[str], npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...


@dataclass(frozen=True)
class ChainLink:
    """One classifier of the chain and the parent labels that select its cells."""

    name: str
    classifier: CropClassifier
    parent: str | None = None
    parent_labels: tuple[str, ...] = ()


#: Per crop: label (None: not run on it), confidence (NaN), probabilities (None).
ChainResult = tuple[list[str | None], npt.NDArray[np.float32], list[npt.NDArray[np.float32] | None]]


def classify_chain(
    links: Sequence[ChainLink],
    crops: Sequence[npt.NDArray[np.uint8]],
    masks: Sequence[npt.NDArray[np.bool_] | None] | None = None,
    mpp: Sequence[float | None] | None = None,
) -> list[ChainResult]:
    """Run ``links`` in order over ``crops``; a child sees only the crops its parent selected.

    ``mpp``: microns per pixel of each crop (None: unknown), for classifiers
    whose input keeps the cells' size. Returns one `ChainResult` per link,
    each of ``len(crops)`` entries.
    """
    n = len(crops)
    done: dict[str, ChainResult] = {}
    results: list[ChainResult] = []
    for link in links:
        if link.parent is None:
            rows = list(range(n))
        else:
            if link.parent not in done:
                raise ValueError(f"classifier {link.name!r}: parent {link.parent!r} has not run")
            parent_labels = done[link.parent][0]
            rows = [i for i in range(n) if parent_labels[i] in link.parent_labels]
        labels: list[str | None] = [None] * n
        conf = np.full(n, np.nan, np.float32)
        probs: list[Any] = [None] * n
        if rows:
            sub_masks = None if masks is None else [masks[i] for i in rows]
            sub_mpp = None if mpp is None else [mpp[i] for i in rows]
            lab, cf, pr = link.classifier.classify([crops[i] for i in rows], sub_masks, sub_mpp)
            for j, i in enumerate(rows):
                labels[i], conf[i], probs[i] = lab[j], cf[j], pr[j]
        done[link.name] = (labels, conf, probs)
        results.append(done[link.name])
    return results
