"""What a TIFF page's tags mean for the reader: colour model, compression, microns per pixel.

The TIFF tag values the reader checks (:data:`JPEG_COMPRESSIONS`, the
photometric and planar values), the conversion of decoded samples to 8-bit
RGB (:func:`to_rgb8`), readable compression names, page areas, and the mpp of
a slide from its Aperio description, OME-XML or resolution tags
(:func:`slide_mpp`).

This module may import only :mod:`batch.slides.limits` and third-party
libraries (numpy).
"""

from __future__ import annotations

import logging
import math
import re
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np
from numpy.typing import NDArray

from batch.slides.limits import MAX_PLAUSIBLE_MPP

__all__ = [
    "JPEG_COMPRESSIONS",
    "PHOTOMETRIC_MINISBLACK",
    "PHOTOMETRIC_MINISWHITE",
    "PHOTOMETRIC_RGB",
    "PHOTOMETRIC_YCBCR",
    "PLANAR_SEPARATE",
    "compression_name",
    "page_area",
    "slide_mpp",
    "to_rgb8",
]

_LOG = logging.getLogger(__name__)

# TIFF tag values used below (tifffile enums compare equal to these ints).
JPEG_COMPRESSIONS = frozenset({6, 7, 33007, 34892})
PHOTOMETRIC_MINISWHITE = 0
PHOTOMETRIC_MINISBLACK = 1
PHOTOMETRIC_RGB = 2
PHOTOMETRIC_YCBCR = 6
PLANAR_SEPARATE = 2
_RESUNIT_UM = {2: 25_400.0, 3: 10_000.0, 4: 1_000.0, 5: 1.0}  # inch, cm, mm, um
_OME_UNIT_UM = {
    "pm": 1e-6,
    "Å": 1e-4,
    "nm": 1e-3,
    "µm": 1.0,
    "um": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}
_SVS_MPP = re.compile(r"\bMPP\s*=\s*([0-9.eE+-]+)")


def to_rgb8(arr: NDArray[Any], photometric: int) -> NDArray[np.uint8]:
    """HxWxS array of uint8/uint16 gray/RGB(A) -> HxWx3 uint8 RGB."""
    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    samples = arr.shape[2]
    if samples >= 3:
        rgb = arr[:, :, :3]
    else:
        gray = arr[:, :, 0]
        if photometric == PHOTOMETRIC_MINISWHITE:
            gray = np.iinfo(np.uint8).max - gray
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def page_area(page: Any) -> int:
    """Pixels of a tifffile page (0 for a missing keyframe)."""
    return 0 if page is None else int(page.imagewidth) * int(page.imagelength)


def compression_name(value: Any) -> str:
    """Lower-case name of a tifffile enum value (``"jpeg"``, ``"rgb"``...), else ``str(value)``."""
    name = getattr(value, "name", None)
    return str(name).lower() if name is not None else str(value)


def slide_mpp(tif: Any, page: Any) -> float | None:
    """Microns per level-0 pixel of a TIFF, or None when it does not say (plausibly).

    Read from the Aperio description (SVS), the OME-XML (OME-TIFF), then the
    resolution tags of ``page``; values above
    :data:`~batch.slides.limits.MAX_PLAUSIBLE_MPP` (e.g. 72 dpi defaults) are ignored.
    """
    mpp: float | None = None
    if tif.is_svs:
        match = _SVS_MPP.search(page.description or "")
        mpp = float(match.group(1)) if match else None
    elif tif.is_ome and tif.ome_metadata:
        mpp = _ome_mpp(tif.ome_metadata)
    if mpp is None and 282 in page.tags:  # XResolution
        unit = int(page.resolutionunit)
        xres = float(page.resolution[0])
        if unit in _RESUNIT_UM and xres > 0:
            mpp = _RESUNIT_UM[unit] / xres
    if mpp is None or not math.isfinite(mpp) or not 0 < mpp <= MAX_PLAUSIBLE_MPP:
        return None
    return mpp


def _ome_mpp(xml: str) -> float | None:
    """Microns per pixel from the first OME ``Pixels`` element, or None."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        _LOG.debug("OME-XML does not parse; mpp unknown")
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] != "Pixels":
            continue
        size = element.attrib.get("PhysicalSizeX")
        unit = element.attrib.get("PhysicalSizeXUnit", "µm")
        if size is None or unit not in _OME_UNIT_UM:
            return None
        try:
            return float(size) * _OME_UNIT_UM[unit]
        except ValueError:
            return None
    return None
