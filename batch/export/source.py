"""What an export reads from a run: its config, its slides, one slide's cells, and pixels.

A run's output (``OUT``, local or any fsspec URL) is read one slide at a time:
`RunSource.slides` lists the committed slides (id, URI, mpp) from the slides
table, `RunSource.cells` reads one slide's hive partition only (through DuckDB when
a ``--where`` predicate filters it, `batch.export.where`), so an export's
memory is bounded by the largest slide's cells. Pixels come from the source
slide through `batch.slides.open_slide` and only for the regions asked for
(`read_scaled`): a field or a crop is read from the pyramid level closest to
the wanted scale and resized to it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import fsspec
import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow.dataset as pads

from batch.config import Config, config_from_tree, load_config
from batch.errors import ConfigError
from batch.export.where import CellFilter
from batch.run.provenance import label_sets, trained_mpp
from batch.run.sink import latest_run_config, read_table
from batch.slides import Slide, open_slide
from batch.tiling import detector_factor

__all__ = ["RUN_CONFIG_SECTIONS", "RunSource", "SlideRef", "read_scaled"]

log = logging.getLogger(__name__)

#: Sections of a run's saved config that an export uses (models, scales, crop margin).
RUN_CONFIG_SECTIONS = ("tiling", "detect", "classifiers", "segmentation", "storage", "mpp")


@dataclass(frozen=True)
class SlideRef:
    """One committed slide of a run: its id, where its pixels are, its level-0 mpp."""

    slide_id: str
    uri: str
    mpp: float | None


class RunSource:
    """A run's output folder, read slide by slide.

    Parameters
    ----------
    out
        The run's output folder or URL (``s3://...``).
    storage_options
        fsspec options for ``out`` and for the slides (an endpoint; never credentials).
    config
        The run's config; None: the ``config.yaml`` of the run's latest manifest
        (defaults if the output has none).
    """

    def __init__(
        self,
        out: str,
        *,
        storage_options: dict[str, Any] | None = None,
        config: Config | None = None,
    ) -> None:
        self.out = out.rstrip("/")
        self.storage_options = storage_options
        self.fs, self.root = fsspec.core.url_to_fs(self.out, **(storage_options or {}))
        if not self.fs.exists(f"{self.root}/slides"):
            raise ConfigError(f"{out}: not a hemaray run output (no slides/ table)")
        self.config = config if config is not None else self._run_config()

    def _run_config(self) -> Config:
        # Only the sections an export needs are read: a run written by another version of
        # hemaray may carry execution keys this one does not know.
        saved = latest_run_config(self.out, storage_options=self.storage_options)
        tree = {k: v for k, v in saved.items() if k in RUN_CONFIG_SECTIONS}
        if isinstance(tree.get("tiling"), dict) and "min_cell_scale" not in tree["tiling"]:
            # A run from before tiling.min_cell_scale never upsampled: cut its pixels as it did.
            tree["tiling"] = {**tree["tiling"], "min_cell_scale": 0.0}
        try:
            return config_from_tree(tree)
        except ConfigError as e:
            log.warning("%s: saved run config not readable (%s); using defaults", self.out, e)
            return load_config(None, [])

    def detector_mpp(self) -> float:
        """Microns per pixel of the detector's input (and so of the pipeline's WBC crops)."""
        if self.config.tiling.target_mpp is not None:
            return float(self.config.tiling.target_mpp)
        mpp, _ = trained_mpp(self.config)
        return float(mpp) if mpp else float(self.config.tiling.fallback_mpp)

    def crop_mpp(self, ref: SlideRef) -> float | None:
        """Microns per pixel of the pixels the run's detector saw on ``ref`` (its WBC crops').

        The planner's choice (`batch.tiling.detector_factor` under the run's tiling):
        the detector's mpp, the slide's own where that is coarser, or
        ``detector / min_cell_scale`` where the slide was upsampled. None
        without a slide mpp.
        """
        if ref.mpp is None:
            return None
        with open_slide(ref.uri, storage_options=self.storage_options) as slide:
            downsamples = [float(lv.downsample) for lv in slide.info.levels]
        return ref.mpp * detector_factor(
            downsamples, ref.mpp, self.detector_mpp(),
            min_cell_scale=self.config.tiling.min_cell_scale,
        )  # fmt: skip

    def label_sets(self) -> dict[str, list[str]]:
        """Each classifier's label set (from its model card)."""
        return label_sets(self.config)

    def slides(self, only: Sequence[str] | None = None) -> list[SlideRef]:
        """The committed slides, sorted by id; ``only`` keeps those ids."""
        table = read_table(self.out, "slides", storage_options=self.storage_options).to_pandas()
        table = table[table["status"] == "committed"].sort_values("slide_id")
        if only:
            missing = sorted(set(only) - set(table["slide_id"]))
            if missing:
                raise ConfigError(f"{self.out}: no committed slide(s) {', '.join(missing)}")
            table = table[table["slide_id"].isin(list(only))]
        return [
            SlideRef(
                str(r.slide_id),
                str(r.slide_uri),
                None if r.mpp is None or pd.isna(r.mpp) else float(r.mpp),
            )
            for r in table.itertuples()
        ]

    def cells(
        self,
        slide_id: str,
        columns: Sequence[str] | None = None,
        where: CellFilter | None = None,
    ) -> pd.DataFrame:
        """One slide's cells (its partition only), sorted by ``cell_id``.

        ``where``: only the rows its predicate keeps (DuckDB reads only the
        columns asked for and those the predicate names).
        """
        path = f"{self.root}/cells/slide_id={slide_id}"
        if not self.fs.exists(path):
            return pd.DataFrame(columns=list(columns or []))
        dataset = pads.dataset(path, filesystem=self.fs, format="parquet")
        names = [c for c in columns if c in dataset.schema.names] if columns else None
        if where is not None:
            frame = where.apply(dataset, slide_id, names)
        else:
            frame = dataset.to_table(columns=names).to_pandas()
        frame["slide_id"] = slide_id
        return frame.sort_values("cell_id", kind="stable").reset_index(drop=True)

    def iter_cells(
        self,
        refs: Sequence[SlideRef],
        columns: Sequence[str] | None = None,
        where: CellFilter | None = None,
    ) -> Iterator[tuple[SlideRef, pd.DataFrame]]:
        """``(slide, cells)`` one slide at a time (``where``: the rows it keeps)."""
        for ref in refs:
            yield ref, self.cells(ref.slide_id, columns, where)


def read_scaled(
    slide: Slide, x0: float, y0: float, width: int, height: int, factor: float
) -> npt.NDArray[np.uint8]:
    """A ``height x width`` RGB image whose pixel ``(i, j)`` is level-0 ``(x0 + j*factor, y0 + i*factor)``.

    ``factor`` is level-0 pixels per output pixel (the wanted mpp over the
    slide's mpp). The region is read from the coarsest level not coarser than
    ``factor`` and resized; parts outside the slide are white.
    """
    level = slide.level_for_downsample(factor)
    down = slide.info.levels[level].downsample
    lx, ly = math.floor(x0 / down), math.floor(y0 / down)
    lw = max(1, math.ceil((x0 + width * factor) / down) - lx)
    lh = max(1, math.ceil((y0 + height * factor) / down) - ly)
    region = slide.read_region(lx, ly, lw, lh, level=level)
    if region.shape[:2] == (height, width):
        return region
    interp = cv2.INTER_AREA if factor / down > 1 else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(region, (width, height), interpolation=interp))
