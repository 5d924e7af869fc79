"""Synthetic Wright-Giemsa blood and marrow smears with exact ground truth.

:func:`synth_slides` writes ``slide_0000.tif``, ``slide_0001.tif``, ... (or
``.jpg`` / ``.png`` plain images) and one ``ground_truth.parquet`` for all of
them. The TIFFs are what a slide scanner writes: tiled, JPEG-compressed
BigTIFF, RGB, a pyramid of 2x reductions in SubIFDs of the level-0 page, and
the pixel size in the resolution tags. They are written tile by tile: no level
is ever held in memory whole (peak memory is set by the object list, not by
the slide's pixel count).

How a slide is made
-------------------
A slide is a list of objects (compact numpy structured arrays, 32 bytes per
object) placed once from the slide's seed, plus a spatial bucket index.
Every tile of every pyramid level is rendered directly from that list at the
level's scale, so level ``k`` never needs level ``k - 1``:

* Optical model: each object adds stain *density* to one of three planes
  (eosin: RBCs, neutrophil / monocyte cytoplasm; azure: nuclei, platelets;
  methylene blue: cytoplasm, basophil granules) and, where an eosinophil is,
  a fourth (its orange-red granules). Per
  pixel, absorbance is ``density @ stain_vectors`` and the recorded colour is
  ``white * illumination * exp(-absorbance) + noise`` (Beer-Lambert), so
  overlapping cells darken the way they do in the thick zone.
* RBCs and platelets are drawn from a per-slide bank of sprites (continuous
  shape models sampled with 3x3 supersampling at each level's scale); WBCs are
  continuous models evaluated per cell (nucleus outline or lobes, chromatin
  texture, nucleoli, vacuoles, granules, cytoplasm), exactly on the level-0
  pixel grid at level 0.
* Smear geometry along x: thick body -> monolayer -> feathered edge, then
  glass (``blank_fraction`` of the area, beyond a tongue-shaped edge). RBCs sit
  on a jittered hexagonal lattice thinned by a blue-noise dither to the local
  density, so the monolayer has cells nearly touching and the thick zone has
  them overlapping. WBCs are placed with a density proportional to the RBCs'
  and enriched towards the feathered and lateral edges; they push RBCs aside.
* Per slide: stain balance (too pink .. too blue), stain intensity, small hue
  shifts, white level, white balance, scanner-field vignetting and a slow
  brightness gradient. Sensor noise is a fixed function of pixel coordinates,
  so any region rendered alone equals the same region of a tile.

Cost (measured on 1 shared core, mpp 0.25)
------------------------------------------
8192 x 6144 px (5 levels, ~48,000 objects), blood: ~5-6 s, peak RSS ~215 MB;
leukemia (~500 WBCs) ~1.3x and marrow (~4,000 nucleated cells) ~3.5x the
blood time, peak RSS ~225 and ~270 MB. (Normal leukocytes cost a little more
than blasts: side by side on a loaded machine, blood took ~10 % more CPU than
with the earlier lymphoid-only WBCs.) 32768 x 32768 px blood (7 levels,
~1,020,000 objects): ~56 s of CPU, peak RSS ~470 MB (interpreter and
libraries included; measured before the normal leukocytes, not re-measured);
the file is ~400 MB.

Densities and WBC mixes (``kind``)
----------------------------------
Per 100x oil field (FN 22: ~0.038 mm^2, about 780 x 780 px at 0.25 um/px)
the monolayer holds ~450 RBCs (~370 per FN 20 field) and ~14 platelets
(reference ranges: 280-400 and 10-15); the thick body about twice as many
RBCs, the feathered edge ~300. WBC density follows the RBCs' (more blood per
area in the thick body) and is raised up to 1.6x at the feathered edge and
1.4x along the lateral borders.

* ``kind="blood"``: 1 WBC per 400 RBCs, ~1.3 WBCs per monolayer field, i.e.
  ~11,000/uL at 4.5 million RBC/uL (high-normal, so small slides hold enough
  WBCs: a 2048 x 2048 field about 8-15, an 8192 x 6144 slide about 120-140).
  The WBCs are the normal types (``NORMAL_WBC_TYPES``) in a per-slide
  differential drawn around the adult means (``WBC_TYPE_MEANS``: neutrophils
  58 %, lymphocytes 32, monocytes 5.5, eosinophils 3, basophils 1; central
  95 % of slides 48-69, 23-42, 3-9, 1.4-5.5, 0.6-1.6 %).
* ``kind="leukemia"``: leukocytosis, 1 WBC per 100 RBCs (~45,000/uL, ~5 per
  monolayer field). A share ``blast_fraction`` (default 0.6) of the WBCs are
  lymphoblasts; the slide picks a dominant blast subtype (60-85 % of its
  blasts, the rest spread over the other two by a flat Dirichlet draw); the
  other WBCs are the normal types in a normal differential.
* ``kind="marrow"``: 1 nucleated cell per 8 RBCs, ~40 per monolayer field and
  ~55 in the thick body (reference range: 40-60): hematogones (subtype
  ``benign``, type ``lymphocyte``) and blasts; the dominant subtype (60-85 %,
  the rest over the other three) is a blast subtype 90 % of the time.

Blood and leukemia slides assign types by a stratified (golden-ratio) draw
over the slide's mix, so a slide's counts follow its mix to within a cell or
two (the slide-to-slide variation is in the mix, not in counting noise);
marrow slides draw each cell independently, as they always have.

Cell morphology
---------------
Normal leukocytes (``WBC_TYPE_TRAITS``): segmented neutrophils (10-14 um, 3-5
lobes joined by thin chromatin strands, pale pink-lilac finely granular
cytoplasm), lymphocytes (mostly small, 7-9 um, some large, 12-15 um; round
dense nucleus, high N:C, a scant pale-blue rim), monocytes (12-18 um; kidney,
horseshoe or folded nucleus with lacier, paler chromatin; abundant grey-blue
cytoplasm, fine vacuoles), eosinophils (12-15 um; bilobed, cytoplasm packed
with coarse orange-red granules) and basophils (10-13 um; dark purple-black
coarse granules over the whole cell, nucleus included).

Hematogones and the blast subtypes differ by overlapping distributions of
size, N:C ratio, chromatin condensation (fine lacy vs condensed homogeneous),
nucleoli (count and visibility), nuclear outline (irregularity, indentation /
cleft) and cytoplasmic vacuoles and basophilia; see ``SUBTYPE_TRAITS``. No
single feature separates them.

Ground truth (``ground_truth.parquet``, :data:`GROUND_TRUTH_SCHEMA`)
-------------------------------------------------------------------
One row per object (RBC, WBC, platelet):

================  ========  ====================================================
column            type      meaning (unit)
================  ========  ====================================================
``slide_id``      string    file stem, e.g. ``"slide_0000"``
``object_id``     int64     id unique within the slide (0, 1, ...; spatial order)
``class``         string    ``"RBC"`` | ``"WBC"`` | ``"platelet"``
``wbc_type``      string    WBC only (``WBC_TYPES``): ``"neutrophil"`` |
                            ``"lymphocyte"`` | ``"monocyte"`` |
                            ``"eosinophil"`` | ``"basophil"`` | ``"blast"``;
                            null for RBCs and platelets
``subtype``       string    blasts: ``"early_pre_b"`` | ``"pre_b"`` |
                            ``"pro_b"``; marrow hematogones (``wbc_type``
                            lymphocyte): ``"benign"``; null otherwise
``x0``, ``y0``    int64     box top-left, level-0 pixels (inclusive)
``x1``, ``y1``    int64     box bottom-right, level-0 pixels (exclusive)
``cx``, ``cy``    float64   box centre ``((x0 + x1) / 2, (y0 + y1) / 2)``,
                            level-0 pixels (pixel ``i`` spans ``[i, i + 1)``)
``nucleus_mask``  binary    WBC only: PNG bytes of a uint8 0/1 mask of shape
                            ``(y1 - y0, x1 - x0)``, the exact mask the nucleus
                            was drawn with; null otherwise
``mpp``           float64   microns per level-0 pixel (um/px)
``zone``          string    smear zone at the centre: ``"thick"`` |
                            ``"monolayer"`` | ``"feathered"``
================  ========  ====================================================

Boxes are the exact drawn extents of the object's shape, clipped to the
image: for RBCs and platelets every pixel with any supersampled coverage,
for WBCs every pixel whose centre lies in the cell (cytoplasm included). A
mild optical blur (sigma 0.7 px at level 0) spreads colour ~2 px beyond
them. RBCs and platelets may be cut by the image
border (their box is then the visible part); WBC centres always lie inside
the image, so every WBC shows part of its nucleus. No object touches the
blank glass.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile
from numpy.typing import NDArray

from batch.errors import ConfigError

__all__ = [
    "CLASSES",
    "GROUND_TRUTH_FILE",
    "GROUND_TRUTH_SCHEMA",
    "BLAST_SUBTYPES",
    "DEFAULT_BLAST_FRACTION",
    "KINDS",
    "NORMAL_WBC_TYPES",
    "SUBTYPES",
    "SUBTYPE_TRAITS",
    "SubtypeTraits",
    "SyntheticSlide",
    "WBC_TYPES",
    "WBC_TYPE_TRAITS",
    "WbcTypeTraits",
    "ZONES",
    "ground_truth_table",
    "make_slide",
    "pyramid_shapes",
    "render_region",
    "slide_name",
    "synth_slides",
    "write_tiff",
]

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]
I64 = NDArray[np.int64]

CLASSES: tuple[str, ...] = ("RBC", "WBC", "platelet")
SUBTYPES: tuple[str, ...] = ("benign", "early_pre_b", "pre_b", "pro_b")
BLAST_SUBTYPES: tuple[str, ...] = SUBTYPES[1:]
#: Ground-truth ``wbc_type`` of a WBC; the first five are the normal blood leukocytes.
WBC_TYPES: tuple[str, ...] = (
    "neutrophil",
    "lymphocyte",
    "monocyte",
    "eosinophil",
    "basophil",
    "blast",
)
NORMAL_WBC_TYPES: tuple[str, ...] = WBC_TYPES[:5]
KINDS: tuple[str, ...] = ("blood", "leukemia", "marrow")
ZONES: tuple[str, ...] = ("thick", "monolayer", "feathered")
GROUND_TRUTH_FILE = "ground_truth.parquet"

_RBC, _WBC, _PLATELET = 0, 1, 2
_EOSIN, _AZURE, _BLUE = 0, 1, 2  # stain density planes
_ORANGE = 3  # eosinophil granules: a 4th plane, present only where an eosinophil is
_NEUTROPHIL, _LYMPHOCYTE, _MONOCYTE, _EOSINOPHIL, _BASOPHIL, _BLAST = range(len(WBC_TYPES))

# ---------------------------------------------------------------------------
# Morphology (sizes in um; reference sizes, smear geometry and counts)
# ---------------------------------------------------------------------------
RBC_DIAMETER_UM = 7.8  # mean stained diameter ~8, range 6-9
RBC_DIAMETER_SD_UM = 0.5
RBC_DIAMETER_RANGE_UM = (6.0, 9.0)
RBC_PALLOR_RADIUS = 1.0 / 3.0  # central pallor ~1/3 of the diameter (half-depth radius)
PLATELET_DIAMETER_RANGE_UM = (2.0, 3.2)  # 2-3 um fragments
# RBC lattice spacing (centre to centre, um) along the smear axis u in [0, 1]:
# overlapping in the thick body, nearly touching in the monolayer (~450 RBCs per
# FN 22 oil field of 0.038 mm^2, ~370 per FN 20 field; reference 280-400),
# sparse towards the feathered edge.
RBC_SPACING_PROFILE: tuple[tuple[float, float], ...] = (
    (0.00, 6.2),
    (0.12, 6.6),
    (0.30, 8.3),
    (0.42, 9.6),
    (0.72, 10.0),
    (0.82, 11.0),
    (1.00, 15.0),
)
ZONE_LIMITS = (0.30, 0.75)  # u < 0.30 thick, < 0.75 monolayer, else feathered
PLATELETS_PER_RBC = 1.0 / 40.0  # singles; with clumps ~1:30 (10-15 vs 280-400 per field)
WBC_PER_RBC = {  # see module docstring
    "blood": 1.0 / 400.0,
    "leukemia": 1.0 / 100.0,  # leukocytosis (~45,000/uL), a common ALL presentation
    "marrow": 1.0 / 8.0,
}
PLATELET_CLUMP_FRACTION = 0.15
# RBC centres are kept >= WBC radius + f * RBC radius from a WBC centre; f over u:
# 0.65 in the thick body (RBCs overlap the rim), 0.9 from the monolayer on (touching).
_WBC_RBC_CONTACT = ((0.15, 0.35), (0.65, 0.9))
EDGE_TAPER_UM = 40.0  # cells thin out over this distance before the glass
TONGUE_DEPTH = 0.5  # depth of the tongue-shaped feathered edge, x min(f, 1 - f) x width
EDGE_WOBBLE = 0.03  # waviness of that edge, same units
PATCH_WAVELENGTH_UM = (150.0, 600.0)  # uneven spreading: density waves across the smear
PATCH_AMPLITUDE = (0.06, 0.06, 0.06, 0.06)  # relative density amplitude of each wave (max)
WBC_EDGE_BOOST = 0.6  # extra WBC density at the feathered edge (WBCs gather at edges)
WBC_EDGE_FROM_U = 0.7  # the boost ramps up from this axis position to the edge
WBC_LATERAL_BOOST = 0.4  # extra WBC density near the smear's lateral borders
WBC_LATERAL_BAND = 0.08  # lateral band, fraction of the slide height
DOMINANT_FRACTION_RANGE = (0.60, 0.85)  # share of the slide's dominant subtype
DOMINANT_WEIGHTS = {  # probability of each subtype being a slide's dominant one
    "marrow": (0.10, 0.30, 0.30, 0.30),  # ALL marrow: 25-95 % lymphoblasts
}
DEFAULT_BLAST_FRACTION = 0.6  # kind="leukemia": share of blasts among the WBCs
# Normal WBC differential (adult blood): mean share of each normal type, and the shape
# of the gamma draw around it (share_i ~ Gamma(k_i, mean_i / k_i), then normalised).
# Central 95 % of the drawn shares: neutrophils ~48-69 %, lymphocytes ~23-42 %,
# monocytes ~3-9 %, eosinophils ~1.4-5.5 %, basophils ~0.6-1.6 % (references: 40-70,
# 20-40, 2-8, 1-5, 0.5-1.5).
WBC_TYPE_MEANS = {
    "neutrophil": 0.585,
    "lymphocyte": 0.32,
    "monocyte": 0.055,
    "eosinophil": 0.03,
    "basophil": 0.01,
}
WBC_TYPE_SHAPES = {
    "neutrophil": 40.0,
    "lymphocyte": 30.0,
    "monocyte": 14.0,
    "eosinophil": 9.0,
    "basophil": 16.0,
}


@dataclass(frozen=True)
class SubtypeTraits:
    """Distributions of one WBC subtype's features (hematogones vs. blasts).

    Sizes are diameters in um; ``(mean, sd)`` pairs are normal distributions,
    clipped to plausible ranges when drawn.
    """

    diameter_um: tuple[tuple[float, float, float], ...]  # mixture: (weight, mean, sd)
    nc_ratio: tuple[float, float]  # nucleus area / cell area
    condensation: tuple[float, float]  # 0 fine lacy .. 1 condensed homogeneous chromatin
    nucleoli_mean: float  # Poisson mean of the nucleolus count
    nucleoli_visibility: tuple[float, float]  # 0 invisible .. 1 crisp
    outline_irregularity: float  # sd of the 2nd-4th harmonic amplitudes of the nuclear outline
    cleft_probability: float  # chance of an indentation / cleft
    cleft_depth: tuple[float, float]  # uniform range, fraction of the nuclear radius
    vacuoles_mean: float  # Poisson mean of cytoplasmic vacuoles
    basophilia: tuple[float, float]  # cytoplasm blue density


# Hematogones: condensed homogeneous chromatin, round or indented nucleus, no or
# faint nucleoli, a spectrum of sizes (small-lymphocyte-like to ~2x). Blasts: fine
# lacy chromatin, nucleoli, scant deep-blue cytoplasm, possible vacuoles; FAB L1
# 10-15 um vs L2 14-18 um. Pro-B / early pre-B / pre-B are immunophenotypes, so
# their morphological differences here are deliberately modest and overlapping.
SUBTYPE_TRAITS: dict[str, SubtypeTraits] = {
    "benign": SubtypeTraits(
        diameter_um=((0.6, 8.8, 1.0), (0.4, 12.5, 1.6)),
        nc_ratio=(0.72, 0.06),
        condensation=(0.68, 0.14),
        nucleoli_mean=0.3,
        nucleoli_visibility=(0.25, 0.10),
        outline_irregularity=0.030,
        cleft_probability=0.35,
        cleft_depth=(0.10, 0.30),
        vacuoles_mean=0.05,
        basophilia=(0.55, 0.12),
    ),
    "early_pre_b": SubtypeTraits(
        diameter_um=((1.0, 13.0, 1.8),),
        nc_ratio=(0.80, 0.05),
        condensation=(0.36, 0.14),
        nucleoli_mean=1.6,
        nucleoli_visibility=(0.65, 0.15),
        outline_irregularity=0.025,
        cleft_probability=0.15,
        cleft_depth=(0.08, 0.20),
        vacuoles_mean=0.3,
        basophilia=(0.85, 0.15),
    ),
    "pre_b": SubtypeTraits(
        diameter_um=((1.0, 11.5, 1.5),),
        nc_ratio=(0.77, 0.06),
        condensation=(0.48, 0.14),
        nucleoli_mean=1.0,
        nucleoli_visibility=(0.55, 0.15),
        outline_irregularity=0.045,
        cleft_probability=0.45,
        cleft_depth=(0.15, 0.40),
        vacuoles_mean=0.4,
        basophilia=(0.80, 0.15),
    ),
    "pro_b": SubtypeTraits(
        diameter_um=((1.0, 15.0, 2.0),),
        nc_ratio=(0.70, 0.07),
        condensation=(0.34, 0.14),
        nucleoli_mean=2.0,
        nucleoli_visibility=(0.75, 0.15),
        outline_irregularity=0.035,
        cleft_probability=0.25,
        cleft_depth=(0.10, 0.30),
        vacuoles_mean=1.5,
        basophilia=(0.90, 0.15),
    ),
}
WBC_DIAMETER_RANGE_UM = (7.0, 21.0)
WBC_NC_RANGE = (0.50, 0.90)
NUCLEOLUS_RADIUS_UM = (0.6, 1.2)
VACUOLE_RADIUS_UM = (0.35, 0.9)
CHROMATIN_FINE_UM = 0.55  # grain of lacy chromatin
CHROMATIN_COARSE_UM = 1.6  # clumps of condensed chromatin


@dataclass(frozen=True)
class WbcTypeTraits:
    """Distributions of one normal leukocyte type's features (Wright-Giemsa look).

    Sizes are in um; ``(mean, sd)`` pairs are normal distributions clipped
    to plausible ranges when drawn. Densities are stain densities (1 is the
    reference nucleus / RBC / blast-cytoplasm colour).
    """

    modes: tuple[
        tuple[float, float, float, float, float], ...
    ]  # (weight, d mean, d sd, nc mean, nc sd)
    diameter_range_um: tuple[float, float]
    nucleus: Literal["round", "lobed", "monocytoid"]
    lobes: tuple[tuple[int, float], ...] = ((1, 1.0),)  # (lobe count, weight)
    lobe_spacing: tuple[float, float] = (1.9, 2.4)  # centre distance, in lobe radii
    lobe_turn: tuple[float, float] = (0.4, 1.2)  # bend of the lobe chain per lobe (rad)
    bridge_um: tuple[float, float] = (0.25, 0.4)  # radius of the chromatin strand between lobes
    outline_irregularity: float = 0.04  # sd of the 2nd-4th harmonic amplitudes
    lobe_elongation: float = 0.0  # lobes' 2nd-harmonic amplitude is drawn from [0, this)
    indent: tuple[float, float, float] = (0.0, 0.0, 0.0)  # probability, depth range
    condensation: tuple[float, float] = (0.8, 0.08)
    nucleus_gain: float = 1.0  # chromatin density multiplier (dense pyknotic-looking nuclei > 1)
    cyto_blue: tuple[float, float] = (0.1, 0.02)  # methylene-blue density of the cytoplasm
    cyto_eosin: tuple[float, float] = (0.0, 0.0)  # eosin density of the cytoplasm
    cyto_grain: float = 0.0  # amplitude of the fine cytoplasmic texture (granularity)
    vacuoles_mean: float = 0.0
    granules: Literal["none", "eosinophilic", "basophilic"] = "none"
    granule_radius_um: tuple[float, float] = (0.3, 0.45)
    granule_spacing: float = 2.1  # lattice spacing, in mean granule radii
    granule_density: tuple[float, float] = (1.0, 0.1)
    granule_fill: float = 1.0  # share of the lattice sites holding a granule
    granule_over_nucleus: float = 0.15  # share of the granules kept where they cover the nucleus


# Normal leukocytes (MORPHOLOGY.md): segmented neutrophils 10-14 um, 3-5 lobes joined by
# thin strands, pale pink-lilac finely granular cytoplasm; lymphocytes small (7-9 um)
# or large (12-15 um), round dense nucleus, scant pale-blue rim; monocytes 12-18 um,
# kidney / horseshoe / folded nucleus with lacier chromatin, abundant grey-blue
# cytoplasm, fine vacuoles; eosinophils 12-15 um, bilobed, packed coarse orange-red
# granules; basophils 10-13 um, dark purple-black coarse granules over the nucleus.
WBC_TYPE_TRAITS: dict[str, WbcTypeTraits] = {
    "neutrophil": WbcTypeTraits(
        modes=((1.0, 12.0, 0.9, 0.28, 0.03),),
        diameter_range_um=(9.8, 14.5),
        nucleus="lobed",
        lobes=((3, 0.50), (4, 0.36), (5, 0.14)),
        lobe_spacing=(1.75, 2.25),
        lobe_turn=(0.6, 1.4),
        bridge_um=(0.2, 0.36),
        outline_irregularity=0.06,
        lobe_elongation=0.2,
        condensation=(0.88, 0.06),
        cyto_blue=(0.07, 0.02),
        cyto_eosin=(0.30, 0.05),
        cyto_grain=0.45,
    ),
    "lymphocyte": WbcTypeTraits(
        modes=((0.85, 8.0, 0.6, 0.80, 0.04), (0.15, 13.0, 1.0, 0.58, 0.06)),
        diameter_range_um=(6.5, 15.5),
        nucleus="round",
        outline_irregularity=0.03,
        indent=(0.2, 0.06, 0.18),
        condensation=(0.88, 0.06),
        nucleus_gain=1.05,
        cyto_blue=(0.50, 0.10),
        cyto_grain=0.05,
    ),
    "monocyte": WbcTypeTraits(
        modes=((1.0, 15.0, 1.6, 0.40, 0.05),),
        diameter_range_um=(12.0, 19.0),
        nucleus="monocytoid",
        outline_irregularity=0.06,
        condensation=(0.40, 0.08),
        nucleus_gain=0.9,
        cyto_blue=(0.32, 0.05),
        cyto_eosin=(0.20, 0.03),
        cyto_grain=0.12,
        vacuoles_mean=1.3,
    ),
    "eosinophil": WbcTypeTraits(
        modes=((1.0, 13.2, 0.9, 0.28, 0.03),),
        diameter_range_um=(11.0, 15.5),
        nucleus="lobed",
        lobes=((2, 0.85), (3, 0.15)),
        lobe_spacing=(1.8, 2.2),
        lobe_turn=(0.3, 0.9),
        bridge_um=(0.3, 0.5),
        outline_irregularity=0.05,
        lobe_elongation=0.12,
        condensation=(0.78, 0.07),
        cyto_blue=(0.06, 0.02),
        cyto_eosin=(0.10, 0.03),
        granules="eosinophilic",
        granule_radius_um=(0.32, 0.46),
        granule_spacing=2.1,
        granule_density=(1.25, 0.12),
        granule_over_nucleus=0.12,
    ),
    "basophil": WbcTypeTraits(
        modes=((1.0, 11.5, 0.8, 0.36, 0.05),),
        diameter_range_um=(9.5, 13.5),
        nucleus="lobed",
        lobes=((1, 0.4), (2, 0.6)),
        lobe_spacing=(1.3, 1.8),
        lobe_turn=(0.2, 0.8),
        bridge_um=(0.6, 0.9),
        outline_irregularity=0.07,
        condensation=(0.62, 0.08),
        cyto_blue=(0.16, 0.04),
        cyto_eosin=(0.12, 0.03),
        granules="basophilic",
        granule_radius_um=(0.30, 0.62),
        granule_spacing=2.6,
        granule_density=(1.0, 0.15),
        granule_fill=0.8,
        granule_over_nucleus=0.9,
    ),
}
TYPED_NC_RANGE = (0.22, 0.92)
# Monocyte nuclear shapes and their probabilities.
MONOCYTE_SHAPES = (("kidney", 0.4), ("horseshoe", 0.3), ("folded", 0.3))
# Stain density planes a granule adds to, per unit granule density.
GRANULE_PLANES = {"eosinophilic": ((_ORANGE, 1.0),), "basophilic": ((_BLUE, 1.7), (_EOSIN, 1.4))}
GRANULE_SATURATION = 1.3  # overlapping granules saturate at this density
CYTO_GRAIN_UM = 0.35  # grain of the cytoplasm's fine granularity
NUCLEAR_RIM_UM = 0.25  # least cytoplasm kept between a normal cell's nucleus and its edge
_CHAIN_TRIES = 12  # attempts at a lobe chain that fits the cell before compressing it

# ---------------------------------------------------------------------------
# Colour: stain vectors are optical densities per unit
# density, calibrated so that on a white of (240, 240, 236) a monolayer RBC's
# median is ~(180, 157, 160), a nucleus ~(141, 106, 209) (L* 53, a* +37,
# b* -49) and blast cytoplasm a deep blue.
# ---------------------------------------------------------------------------
WHITE_RGB = (240.0, 240.0, 236.0)
_RBC_MEAN_DENSITY = 1.1  # RBC density (profile x gain) that renders at the eosin median
STAIN_RGB_AT_UNIT_DENSITY = {
    "eosin": (190.0, 152.0, 157.0),  # RBC: a* +15 (BCCD median a* +9, a greyish camera)
    "azure": (141.0, 106.0, 209.0),  # WBC nucleus median
    "blue": (110.0, 130.0, 205.0),  # basophilic blast cytoplasm (deep blue)
    # Eosinophil granules: eosin bound to their basic proteins renders orange-red, more
    # orange than RBCs (an absorbance no mix of the other three gives: blue > green).
    "granule": (226.0, 132.0, 96.0),
}
WHITE_LEVEL_RANGE = (236.0, 250.0)  # scanner white (glass); stays near-white for background skip
WHITE_BALANCE_SD = 0.012
STAIN_BALANCE_SD = 0.12  # log eosin/azure balance: acid buffer too pink, alkaline too blue
STAIN_INTENSITY_RANGE = (0.85, 1.15)
STAIN_HUE_SD = 0.05  # per-channel log jitter of the stain vectors
VIGNETTE_RANGE = (0.0, 0.025)  # relative darkening at a scanner field's corner
VIGNETTE_FIELD_UM = (350.0, 550.0)  # scanner camera field
GRADIENT_RANGE = (0.0, 0.02)  # slow brightness variation across the slide
NOISE_SD = 1.6  # sensor noise, 8-bit grey levels
PLASMA_DENSITY = (0.05, 0.012)  # eosin density of the plasma film: thick body, feathered edge
OPTICAL_BLUR_PX = 0.7  # level-0 sigma of the optical point-spread function

# ---------------------------------------------------------------------------
# File layout
# ---------------------------------------------------------------------------
PYRAMID_MIN_SIDE = 1024  # halve until the smallest side is under this many px (that level included)
DEFAULT_TILE_SIZE = 512
SPRITE_BANK_SIZE = 64  # bank entries per RBC pallor class and for platelets
SUPERSAMPLE = 3  # per-axis samples per pixel for bank sprites
BUCKET_UM = 64.0  # side of the spatial index cells
_BLUR_MARGIN = 3  # px rendered around a region so the blur sees its neighbours
_NOISE_PERIOD = 509  # the noise pattern repeats every this many px (prime: no tile alignment)
_NOISE_EXTRA = 512  # the stored pattern wraps this far, so regions up to this size are slices
_NOISE_LEVEL_SHIFT = (7919, 104729)  # decorrelates the levels' noise
_WBC_CACHE_BYTES = 64 << 20  # rendered WBCs kept for the neighbouring tiles
_BLUE_NOISE_SIZE = 64  # side of the blue-noise dither matrix (lattice sites)
_BLUE_NOISE_SIGMA = 1.5  # void-and-cluster kernel width, lattice spacings
_DITHER_JITTER = 0.04  # random perturbation of the dither thresholds
_LATTICE_JITTER = (0.10, 0.30)  # positional jitter sd, fraction of the local spacing: sparse, dense
_LATTICE_ROWS_PER_CHUNK = 256


def _field(
    name: str, kind: pa.DataType, description: str, unit: str = "", nullable: bool = False
) -> pa.Field:
    meta = {"description": description, **({"unit": unit} if unit else {})}
    return pa.field(name, kind, nullable=nullable, metadata=meta)


_PX = "level-0 px"
GROUND_TRUTH_SCHEMA: pa.Schema = pa.schema(
    [
        _field("slide_id", pa.string(), "slide file stem, e.g. slide_0000"),
        _field("object_id", pa.int64(), "object id, unique within the slide"),
        _field("class", pa.string(), "RBC | WBC | platelet"),
        _field(
            "wbc_type",
            pa.string(),
            "WBC only: neutrophil | lymphocyte | monocyte | eosinophil | basophil | blast",
            nullable=True,
        ),
        _field(
            "subtype",
            pa.string(),
            "blasts: early_pre_b | pre_b | pro_b; marrow hematogones: benign; else null",
            nullable=True,
        ),
        _field("x0", pa.int64(), "box left, inclusive", _PX),
        _field("y0", pa.int64(), "box top, inclusive", _PX),
        _field("x1", pa.int64(), "box right, exclusive", _PX),
        _field("y1", pa.int64(), "box bottom, exclusive", _PX),
        _field("cx", pa.float64(), "box centre x, (x0 + x1) / 2", _PX),
        _field("cy", pa.float64(), "box centre y, (y0 + y1) / 2", _PX),
        _field(
            "nucleus_mask",
            pa.binary(),
            "WBC only: PNG of a uint8 0/1 nucleus mask of the box's size",
            nullable=True,
        ),
        _field("mpp", pa.float64(), "pixel size at level 0", "um/px"),
        _field("zone", pa.string(), "smear zone at the centre: thick | monolayer | feathered"),
    ],
    metadata={"table": "hemaray.synth.ground_truth", "version": "2"},
)

# One row per object. Boxes are the unclipped level-0 drawn extents (half-open).
_OBJECT_DTYPE = np.dtype(
    [
        ("cls", "u1"),
        ("zone", "u1"),
        ("subtype", "i1"),  # index into SUBTYPES, -1 for non-WBCs and normal leukocytes
        ("wtype", "i1"),  # index into WBC_TYPES, -1 for non-WBCs
        ("ref", "i4"),  # bank entry (RBC, platelet) or row of the WBC tables
        ("mx", "i4"),  # model centre, level-0 px (bank objects)
        ("my", "i4"),
        ("x0", "i4"),
        ("y0", "i4"),
        ("x1", "i4"),
        ("y1", "i4"),
    ]
)


# ---------------------------------------------------------------------------
# Small numeric helpers
# ---------------------------------------------------------------------------
def _smoothstep(x: F64 | float) -> Any:
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _interp_matrix(pos: F64, n: int) -> F32:
    """Rows of bilinear weights sampling a length-``n`` axis at ``pos`` (clamped)."""
    p = np.clip(np.asarray(pos, dtype=np.float64).ravel(), 0.0, n - 1.000001)
    i0 = np.floor(p).astype(np.int64)
    f = p - i0
    m = np.zeros((p.size, n), dtype=np.float32)
    rows = np.arange(p.size)
    m[rows, i0] = 1.0 - f
    m[rows, np.minimum(i0 + 1, n - 1)] += f
    return m


def _sample_grid(grid: F32, gx: F64, gy: F64) -> F32:
    """Bilinear sample of ``grid`` on the separable lattice ``gy x gx`` (grid units)."""
    my = _interp_matrix(gy, grid.shape[0])
    mx = _interp_matrix(gx, grid.shape[1])
    return np.asarray(my @ grid @ mx.T, dtype=np.float32)


def _wrap_angle(a: F64) -> F64:
    return (a + np.pi) % (2.0 * np.pi) - np.pi


def _harmonic_radius(theta: F64, amps: F64, phases: F64, first: int = 2) -> F64:
    r = np.ones_like(theta)
    for k, (a, ph) in enumerate(zip(amps.tolist(), phases.tolist(), strict=True)):
        r = r + a * np.cos((first + k) * theta + ph)
    return r


def _crop_nonzero(dens: F32, threshold: float = 1e-3) -> tuple[F32, int, int]:
    """Crop ``dens`` to the pixels above ``threshold``; return it and the crop origin."""
    ys, xs = np.nonzero(dens > threshold)
    if ys.size == 0:
        return dens[:1, :1] * 0.0, 0, 0
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    return np.ascontiguousarray(dens[y0:y1, x0:x1]), x0, y0


def pyramid_shapes(width: int, height: int) -> list[tuple[int, int]]:
    """Level sizes ``(width, height)``: halve until the smallest side is under ``PYRAMID_MIN_SIDE``.

    That level is included, e.g. 8192 x 6144 gives 8192 x 6144, 4096 x 3072,
    2048 x 1536 and 1024 x 768. Level ``k`` is
    ``ceil(size / 2**k)`` and has pixel size ``mpp * 2**k``.
    """
    shapes = [(width, height)]
    while min(shapes[-1]) >= PYRAMID_MIN_SIDE:
        k = len(shapes)
        shapes.append((-(-width // 2**k), -(-height // 2**k)))
    return shapes


def slide_name(index: int, prefix: str = "slide") -> str:
    """File stem of the ``index``-th slide: ``slide_0000``, ``slide_0001``, ... (``prefix``)."""
    return f"{prefix}_{index:04d}"


# ---------------------------------------------------------------------------
# Smear geometry and stain
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Geometry:
    """Where the smear is and how dense it is (level-0 px)."""

    width: int
    height: int
    px_per_um: float
    blank_fraction: float
    tongue_px: float
    wobble_px: float
    wobble_cycles: int
    wobble_phase: float
    patch_waves: F64  # (n, 4): kx, ky (rad/px), phase, amplitude

    def edge_x(self, y: F64) -> F64:
        """x of the feathered edge (start of the glass) at rows ``y``; inf without glass."""
        y = np.asarray(y, dtype=np.float64)
        if self.blank_fraction <= 0.0:
            return np.full(y.shape, np.inf)
        t = 2.0 * y / self.height - 1.0
        edge = (
            self.width * (1.0 - self.blank_fraction)
            + self.tongue_px * (1.0 - t * t - 2.0 / 3.0)
            + self.wobble_px
            * np.sin(2.0 * np.pi * self.wobble_cycles * y / self.height + self.wobble_phase)
        )
        return np.clip(edge, 0.0, float(self.width))

    def axis_position(self, x: F64, y: F64) -> F64:
        """Position ``u`` along the smear axis: 0 thick body .. 1 feathered edge."""
        edge = self.edge_x(y)
        length = np.where(np.isfinite(edge), np.maximum(edge, 1.0), float(self.width))
        return np.asarray(np.clip(x / length, 0.0, 1.0))

    def zone(self, u: F64) -> NDArray[np.uint8]:
        return np.searchsorted(np.asarray(ZONE_LIMITS), u, side="right").astype(np.uint8)

    def spacing_um(self, u: F64) -> F64:
        us, ss = zip(*RBC_SPACING_PROFILE, strict=True)
        return np.asarray(np.interp(u, us, ss))

    def patchiness(self, x: F64, y: F64) -> F64:
        out = np.zeros(np.broadcast(x, y).shape)
        for kx, ky, ph, amp in self.patch_waves.tolist():
            out = out + amp * np.cos(kx * x + ky * y + ph)
        return out

    def inside(self, x: F64, y: F64, margin_px: float = 0.0) -> NDArray[np.bool_]:
        """Whether points lie on the smear, at least ``margin_px`` before the glass."""
        return np.asarray(x + margin_px <= self.edge_x(y))

    def rbc_keep_probability(self, x: F64, y: F64) -> F64:
        """Share of the densest lattice kept: local RBC density / thick-body density."""
        u = self.axis_position(x, y)
        s_min = RBC_SPACING_PROFILE[0][1]
        p = (s_min / self.spacing_um(u)) ** 2 * (1.0 + self.patchiness(x, y))
        taper = _smoothstep((self.edge_x(y) - x) / (EDGE_TAPER_UM * self.px_per_um))
        return np.asarray(np.clip(p * taper, 0.0, 1.0))

    def wbc_boost(self, x: F64, y: F64) -> F64:
        u = self.axis_position(x, y)
        edge_dist = np.minimum(y, self.height - y) / (WBC_LATERAL_BAND * self.height)
        return np.asarray(
            1.0
            + WBC_EDGE_BOOST * _smoothstep((u - WBC_EDGE_FROM_U) / (1.0 - WBC_EDGE_FROM_U))
            + WBC_LATERAL_BOOST * (1.0 - _smoothstep(edge_dist))
        )


def _make_geometry(
    width: int, height: int, mpp: float, blank_fraction: float, rng: np.random.Generator
) -> _Geometry:
    f = blank_fraction
    tongue = TONGUE_DEPTH * min(f, 1.0 - f) * width * rng.uniform(0.6, 1.0)
    n_waves = len(PATCH_AMPLITUDE)
    wavelength_px = rng.uniform(*PATCH_WAVELENGTH_UM, n_waves) / mpp
    angle = rng.uniform(0.0, np.pi, n_waves)
    k = 2.0 * np.pi / wavelength_px
    waves = np.stack(
        [
            k * np.cos(angle),
            k * np.sin(angle),
            rng.uniform(0, 2 * np.pi, n_waves),
            rng.uniform(0.5, 1.0, n_waves) * np.asarray(PATCH_AMPLITUDE),
        ],
        axis=1,
    )
    return _Geometry(
        width=width,
        height=height,
        px_per_um=1.0 / mpp,
        blank_fraction=f,
        tongue_px=tongue,
        wobble_px=EDGE_WOBBLE * min(f, 1.0 - f) * width,
        wobble_cycles=int(rng.integers(1, 4)),
        wobble_phase=float(rng.uniform(0, 2 * np.pi)),
        patch_waves=waves,
    )


@dataclass(frozen=True)
class _Stain:
    """Per-slide stain and illumination."""

    vectors: F32  # (4 planes, 3 RGB) optical density per unit density
    white: F32  # (3,) RGB of clear glass at full illumination
    vignette: float
    field_px: float
    field_phase: tuple[float, float]
    gradient: float
    gradient_k: tuple[float, float]
    gradient_phase: float
    noise: NDArray[np.int8]  # (P + E, P + E, 3) periodic noise pattern, 8-bit levels


def _unit_density_od(rgb: tuple[float, float, float], scale: float = 1.0) -> F64:
    return np.log(np.asarray(WHITE_RGB) / np.asarray(rgb)) / scale


def _make_stain(width: int, height: int, mpp: float, rng: np.random.Generator) -> _Stain:
    base = np.stack(
        [
            _unit_density_od(STAIN_RGB_AT_UNIT_DENSITY["eosin"], _RBC_MEAN_DENSITY),
            _unit_density_od(STAIN_RGB_AT_UNIT_DENSITY["azure"]),
            _unit_density_od(STAIN_RGB_AT_UNIT_DENSITY["blue"]),
        ]
    )
    balance = rng.normal(0.0, STAIN_BALANCE_SD)
    intensity = rng.uniform(*STAIN_INTENSITY_RANGE)
    conc = intensity * np.exp(np.array([balance, -balance, -balance]))
    hue = np.exp(rng.normal(0.0, STAIN_HUE_SD, size=(3, 3)))
    vectors = (base * hue * conc[:, None]).astype(np.float32)
    white = rng.uniform(*WHITE_LEVEL_RANGE) * np.exp(rng.normal(0.0, WHITE_BALANCE_SD, 3))
    white = white * np.asarray(WHITE_RGB) / WHITE_RGB[0]
    angle = rng.uniform(0, 2 * np.pi)
    period = max(width, height) * rng.uniform(1.0, 2.5)
    shape = (_NOISE_PERIOD, _NOISE_PERIOD, 3)
    base_noise = np.rint(rng.standard_normal(shape, dtype=np.float32) * NOISE_SD).astype(np.int8)
    noise = np.pad(base_noise, ((0, _NOISE_EXTRA), (0, _NOISE_EXTRA), (0, 0)), mode="wrap")
    stain = _Stain(
        vectors=vectors,
        white=np.minimum(white, 254.0).astype(np.float32),
        vignette=float(rng.uniform(*VIGNETTE_RANGE)),
        field_px=float(rng.uniform(*VIGNETTE_FIELD_UM) / mpp),
        field_phase=(float(rng.uniform()), float(rng.uniform())),
        gradient=float(rng.uniform(*GRADIENT_RANGE)),
        gradient_k=(
            float(2 * np.pi * np.cos(angle) / period),
            float(2 * np.pi * np.sin(angle) / period),
        ),
        gradient_phase=float(rng.uniform(0, 2 * np.pi)),
        noise=noise,
    )
    # Drawn last so the first three planes (and marrow slides) keep their colours.
    granule = _unit_density_od(STAIN_RGB_AT_UNIT_DENSITY["granule"]) * conc[_EOSIN]
    granule = granule * np.exp(rng.normal(0.0, STAIN_HUE_SD, 3))
    return dataclasses.replace(stain, vectors=np.vstack([vectors, granule]).astype(np.float32))


# ---------------------------------------------------------------------------
# Sprite bank (RBCs and platelets)
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _BlobParams:
    """Continuous shape model of one bank entry (lengths in level-0 px)."""

    radius: float
    aspect: float
    angle: float
    harm_amps: F64
    harm_phases: F64
    pallor: float  # RBC: depth of the central pallor, 0 none
    rim: float  # RBC: thickening towards the rim
    gain: float  # overall density
    texture: F32 | None  # platelet granules, grid over [-radius, radius]^2


def _blob_density(p: _BlobParams, dx: F32, dy: F32) -> F32:
    """Density of a blob at offsets ``(dx, dy)`` (level-0 px) from its centre."""
    c, s = math.cos(p.angle), math.sin(p.angle)
    u = (dx * c + dy * s) / p.radius
    v = (-dx * s + dy * c) / (p.radius / p.aspect)
    rho = np.hypot(u, v)
    r = rho / _harmonic_radius(np.arctan2(v, u), p.harm_amps, p.harm_phases)
    inside = r < 1.0
    if p.texture is None:
        pallor = p.pallor * (
            1.0 - _smoothstep((r - 0.6 * RBC_PALLOR_RADIUS) / (0.9 * RBC_PALLOR_RADIUS))
        )
        dens = 1.0 - pallor + p.rim * r**4
    else:
        g = p.texture.shape[0]
        gx = (dx / p.radius + 1.0) * 0.5 * (g - 1)
        gy = (dy / p.radius + 1.0) * 0.5 * (g - 1)
        tex = _sample_grid(p.texture, gx[0], gy[:, 0])
        dens = (0.55 + 0.45 * np.exp(-2.0 * r * r)) * (1.0 + 0.45 * tex)
    return np.where(inside, np.maximum(dens, 0.0) * p.gain, 0.0).astype(np.float32)


def _render_blob(p: _BlobParams, scale: int) -> tuple[F32, int, int]:
    """Sprite of a blob at ``scale`` level-0 px per pixel.

    Returns the cropped density and the array position ``(ox, oy)`` of the
    model centre (in pixel-edge coordinates) so that a blob centred at
    level-0 ``(mx, my)`` has its top-left at ``(mx / scale - ox, my / scale - oy)``.
    """
    # aspect >= 1 only shortens the minor axis, so the major radius bounds the extent.
    reach = p.radius * (1.0 + float(np.abs(p.harm_amps).sum())) + 1.0
    half = int(math.ceil(reach / scale)) + 1
    n = 2 * half * SUPERSAMPLE
    t = (((np.arange(n) + 0.5) / SUPERSAMPLE - half) * scale).astype(np.float32)
    dens = _blob_density(p, t[None, :], t[:, None])
    dens = dens.reshape(2 * half, SUPERSAMPLE, 2 * half, SUPERSAMPLE).mean(axis=(1, 3))
    sprite, x0, y0 = _crop_nonzero(dens.astype(np.float32))
    return sprite, half - x0, half - y0


@dataclass(frozen=True)
class _BankLevel:
    """A bank rendered at one level: sprites, the same zero-padded into one stack, offsets."""

    sprites: list[F32]
    stack: F32  # (entries, max h, max w), each sprite at the top-left
    ox: I64  # model centre in sprite pixels (see _render_blob)
    oy: I64


@dataclass
class _Bank:
    """Per-slide sprite bank; entry ``i`` draws into plane ``channel[i]``."""

    params: list[_BlobParams]
    channel: NDArray[np.int8]
    levels: dict[int, _BankLevel] = field(default_factory=dict)

    def level(self, k: int) -> _BankLevel:
        """The bank at level ``k`` (rendered on first use)."""
        if k not in self.levels:
            out = [_render_blob(p, 2**k) for p in self.params]
            sprites = [o[0] for o in out]
            hm = max(sp.shape[0] for sp in sprites)
            wm = max(sp.shape[1] for sp in sprites)
            stack = np.zeros((len(sprites), hm, wm), dtype=np.float32)
            for i, sp in enumerate(sprites):
                stack[i, : sp.shape[0], : sp.shape[1]] = sp
            self.levels[k] = _BankLevel(
                sprites=sprites,
                stack=stack,
                ox=np.array([o[1] for o in out], dtype=np.int64),
                oy=np.array([o[2] for o in out], dtype=np.int64),
            )
        return self.levels[k]

    @property
    def radius(self) -> F64:
        return np.array([p.radius for p in self.params])


# RBC pallor classes: strong pallor (monolayer), weak (thick body: cells overlap
# and look thicker), none (feathered edge: cells flattened).
_RBC_CLASSES = ("strong", "weak", "none")
_RBC_CLASS_TRAITS = {  # diameter scale, pallor range, rim, gain
    "strong": (1.00, (0.35, 0.60), 0.15, 1.00),
    "weak": (0.94, (0.05, 0.22), 0.05, 1.08),
    "none": (1.06, (0.00, 0.04), 0.00, 0.82),
}
# P(class) at axis positions u: thick body mostly weak, monolayer strong, edge none.
_RBC_CLASS_U = (0.0, 0.15, 0.42, 0.72, 0.88, 1.0)
_RBC_CLASS_P = {
    "strong": (0.10, 0.15, 0.85, 0.85, 0.25, 0.05),
    "weak": (0.85, 0.80, 0.10, 0.10, 0.10, 0.05),
}


def _make_bank(px_per_um: float, rng: np.random.Generator) -> _Bank:
    params: list[_BlobParams] = []
    channel: list[int] = []
    for name in _RBC_CLASSES:
        dscale, pallor, rim, gain = _RBC_CLASS_TRAITS[name]
        for _ in range(SPRITE_BANK_SIZE):
            d = (
                np.clip(rng.normal(RBC_DIAMETER_UM, RBC_DIAMETER_SD_UM), *RBC_DIAMETER_RANGE_UM)
                * dscale
            )
            params.append(
                _BlobParams(
                    radius=0.5 * d * px_per_um,
                    aspect=float(rng.uniform(1.0, 1.12)),
                    angle=float(rng.uniform(0, np.pi)),
                    harm_amps=rng.normal(0.0, 0.012, 2),
                    harm_phases=rng.uniform(0, 2 * np.pi, 2),
                    pallor=float(rng.uniform(*pallor)),
                    rim=rim,
                    gain=gain * float(rng.normal(1.0, 0.07)),
                    texture=None,
                )
            )
            channel.append(_EOSIN)
    for _ in range(SPRITE_BANK_SIZE):
        d = rng.uniform(*PLATELET_DIAMETER_RANGE_UM)
        params.append(
            _BlobParams(
                radius=0.5 * d * px_per_um,
                aspect=float(rng.uniform(1.0, 1.5)),
                angle=float(rng.uniform(0, np.pi)),
                harm_amps=rng.normal(0.0, 0.08, 3),
                harm_phases=rng.uniform(0, 2 * np.pi, 3),
                pallor=0.0,
                rim=0.0,
                gain=float(rng.uniform(0.7, 1.0)),
                texture=rng.standard_normal((7, 7)).astype(np.float32),
            )
        )
        channel.append(_AZURE)
    return _Bank(params=params, channel=np.array(channel, dtype=np.int8))


_PLATELET_BANK_START = len(_RBC_CLASSES) * SPRITE_BANK_SIZE


# ---------------------------------------------------------------------------
# WBC model
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Wbc:
    """Continuous model of one WBC (lengths in level-0 px, angles in rad)."""

    cx: float
    cy: float
    rc: float  # mean cell radius
    cell_amps: F64
    cell_phases: F64
    nx: float  # nucleus centre
    ny: float
    rn: float  # mean nuclear radius
    nuc_amps: F64
    nuc_phases: F64
    cleft_depth: float
    cleft_angle: float
    cleft_width: float
    condensation: float
    fine: F32  # chromatin grain grid, CHROMATIN_FINE_UM per cell
    coarse: F32  # chromatin clump grid, CHROMATIN_COARSE_UM per cell
    fine_px: float
    coarse_px: float
    nucleoli: F64  # (k, 4): x, y, radius, visibility
    vacuoles: F64  # (k, 3): x, y, radius
    basophilia: float
    reach: float  # conservative half-extent from (cx, cy)
    # Normal leukocytes only (empty / zero for hematogones and blasts):
    lobes: F64 = field(default_factory=lambda: np.zeros((0, 7)))  # x, y, r, a2, ph2, a3, ph3
    bridges: F64 = field(default_factory=lambda: np.zeros((0, 5)))  # x0, y0, x1, y1, r
    cyto_eosin: float = 0.0
    cyto_grain: float = 0.0
    grain: F32 | None = None  # cytoplasm grain grid, CYTO_GRAIN_UM per cell, centred on (cx, cy)
    grain_px: float = 1.0
    granules: F64 = field(default_factory=lambda: np.zeros((0, 4)))  # x, y, radius, density
    granule_kind: str = "none"
    nucleus_gain: float = 1.0


def _draw_normal(rng: np.random.Generator, ms: tuple[float, float], lo: float, hi: float) -> float:
    return float(np.clip(rng.normal(*ms), lo, hi))


def _make_wbc(seed: int, subtype: int, px_per_um: float, cx: float, cy: float) -> _Wbc:
    """Draw one WBC of ``SUBTYPES[subtype]`` from ``seed`` (deterministic)."""
    tr = SUBTYPE_TRAITS[SUBTYPES[subtype]]
    rng = np.random.default_rng(seed)
    weights = np.array([m[0] for m in tr.diameter_um])
    mode = tr.diameter_um[int(rng.choice(len(weights), p=weights / weights.sum()))]
    d = _draw_normal(rng, (mode[1], mode[2]), *WBC_DIAMETER_RANGE_UM)
    rc = 0.5 * d * px_per_um
    cell_amps = rng.normal(0.0, 0.02, 3)
    nc = _draw_normal(rng, tr.nc_ratio, *WBC_NC_RANGE)
    rn = rc * math.sqrt(nc)
    nuc_amps = rng.normal(0.0, tr.outline_irregularity, 3)
    has_cleft = rng.uniform() < tr.cleft_probability
    cleft_depth = float(rng.uniform(*tr.cleft_depth)) if has_cleft else 0.0
    cell_min = rc * (1.0 - float(np.abs(cell_amps).sum()))
    nuc_max = rn * (1.0 + float(np.abs(nuc_amps).sum()))
    room = max(cell_min - nuc_max - 0.4 * px_per_um, 0.0)
    off_r = room * float(rng.uniform(0.0, 0.9))
    off_a = float(rng.uniform(0, 2 * np.pi))
    nx, ny = cx + off_r * math.cos(off_a), cy + off_r * math.sin(off_a)
    condensation = _draw_normal(rng, tr.condensation, 0.0, 1.0)
    fine_px = CHROMATIN_FINE_UM * px_per_um
    coarse_px = CHROMATIN_COARSE_UM * px_per_um
    nf = int(math.ceil(2 * nuc_max / fine_px)) + 3
    ncg = int(math.ceil(2 * rc * 1.2 / coarse_px)) + 3
    fine = rng.standard_normal((nf, nf)).astype(np.float32)
    coarse = rng.standard_normal((ncg, ncg)).astype(np.float32)
    n_nucleoli = min(int(rng.poisson(tr.nucleoli_mean)), 4)
    vis = _draw_normal(rng, tr.nucleoli_visibility, 0.05, 1.0)
    nucleoli = np.zeros((n_nucleoli, 4))
    for i in range(n_nucleoli):
        a, r = rng.uniform(0, 2 * np.pi), rn * 0.55 * math.sqrt(rng.uniform())
        nucleoli[i] = (
            nx + r * math.cos(a),
            ny + r * math.sin(a),
            rng.uniform(*NUCLEOLUS_RADIUS_UM) * px_per_um,
            vis,
        )
    n_vac = min(int(rng.poisson(tr.vacuoles_mean)), 5)
    vacuoles = np.zeros((n_vac, 3))
    for i in range(n_vac):
        a = rng.uniform(0, 2 * np.pi)
        rv = rng.uniform(*VACUOLE_RADIUS_UM) * px_per_um
        r = rng.uniform(0.65, 0.92) * rc - 0.5 * rv
        vacuoles[i] = (cx + r * math.cos(a), cy + r * math.sin(a), rv)
    return _Wbc(
        cx=cx,
        cy=cy,
        rc=rc,
        cell_amps=cell_amps,
        cell_phases=rng.uniform(0, 2 * np.pi, 3),
        nx=nx,
        ny=ny,
        rn=rn,
        nuc_amps=nuc_amps,
        nuc_phases=rng.uniform(0, 2 * np.pi, 3),
        cleft_depth=cleft_depth,
        cleft_angle=float(rng.uniform(0, 2 * np.pi)),
        cleft_width=float(rng.uniform(0.25, 0.5)),
        condensation=condensation,
        fine=fine,
        coarse=coarse,
        fine_px=fine_px,
        coarse_px=coarse_px,
        nucleoli=nucleoli,
        vacuoles=vacuoles,
        basophilia=_draw_normal(rng, tr.basophilia, 0.3, 1.3),
        reach=rc * (1.0 + float(np.abs(cell_amps).sum())) + 1.0,
    )


def _lens_area(s: float) -> float:
    """Overlap area of two unit discs whose centres are ``s`` apart."""
    if s >= 2.0:
        return 0.0
    return 2.0 * math.acos(s / 2.0) - 0.5 * s * math.sqrt(4.0 - s * s)


def _disc_chain(
    rng: np.random.Generator,
    radii: F64,
    spacing: tuple[float, float],
    turn: tuple[float, float],
    flip: float,
    limit: float,
) -> F64:
    """Centres ``(n, 2)`` of discs along a bending path, centred on 0, within radius ``limit``.

    Consecutive centres are ``spacing`` x their mean radius apart; the path turns
    by ``turn`` per disc (reversing its sense with probability ``flip``). Chains that
    stick out of the cell or fold onto themselves are redrawn; after
    ``_CHAIN_TRIES`` the last one is compressed towards the centre until it fits.
    """
    n = radii.size
    r = radii.tolist()
    pts: list[tuple[float, float]] = []
    for _ in range(_CHAIN_TRIES):
        heading = rng.uniform(0.0, 2.0 * np.pi)
        sense = 1.0 if rng.uniform() < 0.5 else -1.0
        pts = [(0.0, 0.0)]
        for i in range(1, n):
            if i > 1:
                if rng.uniform() < flip:
                    sense = -sense
                heading += sense * rng.uniform(*turn)
            step = rng.uniform(*spacing) * 0.5 * (r[i - 1] + r[i])
            pts.append(
                (pts[-1][0] + step * math.cos(heading), pts[-1][1] + step * math.sin(heading))
            )
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        mx, my = 0.5 * (max(xs) + min(xs)), 0.5 * (max(ys) + min(ys))
        pts = [(x - mx, y - my) for x, y in pts]
        fits = max(math.hypot(x, y) + ri for (x, y), ri in zip(pts, r, strict=True)) <= limit
        apart = all(
            math.dist(pts[a], pts[b]) >= 0.9 * (r[a] + r[b])
            for a in range(n)
            for b in range(a + 2, n)
        )
        if fits and apart:
            return np.asarray(pts, dtype=np.float64)
    out = np.asarray(pts, dtype=np.float64)
    reach = np.hypot(out[:, 0], out[:, 1])
    if float((reach + radii).max()) > limit:
        k = max(limit - float(radii.max()), 0.0) / max(float(reach.max()), 1e-9)
        out = out * min(k, 1.0)
    return out


def _nucleus_parts(
    rng: np.random.Generator, tr: WbcTypeTraits, rc: float, nc: float, limit: float, ppu: float
) -> tuple[dict[str, Any], F64, F64]:
    """A normal leukocyte's nucleus, centred on 0: the main disc, further lobes, strands.

    Returns the main disc's ``_Wbc`` fields (``nx``, ``ny`` relative), the lobes
    ``(k, 7)`` and the bridges ``(k, 5)``.
    """
    area = nc * rc * rc  # target nuclear area / pi
    irr = tr.outline_irregularity
    main: dict[str, Any] = dict(
        nx=0.0,
        ny=0.0,
        nuc_amps=rng.normal(0.0, irr, 3),
        nuc_phases=rng.uniform(0, 2 * np.pi, 3),
        cleft_depth=0.0,
        cleft_angle=float(rng.uniform(0, 2 * np.pi)),
        cleft_width=float(rng.uniform(0.35, 0.6)),
    )
    no_lobes, no_bridges = np.zeros((0, 7)), np.zeros((0, 5))
    shape: str = tr.nucleus
    n_lobes = 1
    if shape == "lobed":
        counts, weights = zip(*tr.lobes, strict=True)
        w = np.asarray(weights)
        n_lobes = int(counts[int(rng.choice(len(counts), p=w / w.sum()))])
    elif shape == "monocytoid":
        w = np.asarray([wt for _, wt in MONOCYTE_SHAPES])
        shape = MONOCYTE_SHAPES[int(rng.choice(len(w), p=w / w.sum()))][0]

    def fit_round(r: float) -> float:
        return min(r, limit / (1.0 + float(np.abs(main["nuc_amps"]).sum())))

    if shape == "round" or (shape == "lobed" and n_lobes == 1):
        prob, lo, hi = tr.indent
        if rng.uniform() < prob:
            main["cleft_depth"] = float(rng.uniform(lo, hi))
        main["rn"] = fit_round(math.sqrt(area))
        return main, no_lobes, no_bridges
    if shape == "kidney":  # elongated bean: a broad indentation across the long axis
        main["nuc_amps"][0] = rng.uniform(0.10, 0.20)
        main["cleft_depth"] = float(rng.uniform(0.30, 0.55))
        main["cleft_width"] = float(rng.uniform(0.5, 0.8))
        main["cleft_angle"] = float(
            -main["nuc_phases"][0] / 2.0 + np.pi / 2.0 + rng.choice((0.0, np.pi))
        )
        main["rn"] = fit_round(1.12 * math.sqrt(area))
        return main, no_lobes, no_bridges
    if shape == "horseshoe":  # a thick tube bent along an arc, rounded ends
        ratio = rng.uniform(1.7, 2.3)  # arc radius / tube radius
        span = rng.uniform(np.radians(170.0), np.radians(230.0))
        tube = math.sqrt(area * np.pi / (2.0 * ratio * span + np.pi))
        tube = min(tube, 0.95 * limit / (ratio + 1.0))
        a0 = rng.uniform(0, 2 * np.pi)
        angles = a0 + np.linspace(0.0, span, 7)
        pts = ratio * tube * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        pts -= 0.5 * (pts.max(axis=0) + pts.min(axis=0))
        radii = tube * np.clip(rng.normal(1.0, 0.05, angles.size), 0.9, 1.1)
        radii[[0, -1]] *= 0.92
        bridge_r = 0.9 * np.minimum(radii[:-1], radii[1:])
    else:  # lobed (neutrophil, eosinophil, basophil) or folded (monocyte)
        if shape == "folded":
            n_lobes = int(rng.integers(2, 4))
            spacing, turn, flip = (0.9, 1.3), (0.6, 1.4), 0.4
        else:
            spacing, turn, flip = tr.lobe_spacing, tr.lobe_turn, 0.3
        s_mean = 0.5 * (spacing[0] + spacing[1])
        r = math.sqrt(area / (1.0 + (n_lobes - 1) * (1.0 - _lens_area(s_mean) / np.pi)))
        radii = r * np.clip(rng.normal(1.0, 0.1, n_lobes), 0.8, 1.2)
        pts = _disc_chain(rng, radii, spacing, turn, flip, limit * (1.0 - 1.5 * irr))
        if shape == "folded":
            bridge_r = 0.8 * np.minimum(radii[:-1], radii[1:])
            if rng.uniform() < 0.5:
                main["cleft_depth"] = float(rng.uniform(0.15, 0.35))
        else:
            bridge_r = rng.uniform(*tr.bridge_um, n_lobes - 1) * ppu
    k = radii.size
    main["nx"], main["ny"], main["rn"] = float(pts[0, 0]), float(pts[0, 1]), float(radii[0])
    main["nuc_amps"][0] += rng.uniform(0.0, tr.lobe_elongation)
    lobes = np.column_stack(
        [
            pts[1:, 0],
            pts[1:, 1],
            radii[1:],
            rng.normal(0.0, irr, k - 1) + rng.uniform(0.0, tr.lobe_elongation, k - 1),
            rng.uniform(0, 2 * np.pi, k - 1),
            rng.normal(0.0, irr, k - 1),
            rng.uniform(0, 2 * np.pi, k - 1),
        ]
    )
    bridges = np.column_stack([pts[:-1, 0], pts[:-1, 1], pts[1:, 0], pts[1:, 1], bridge_r])
    return main, lobes, bridges


def _make_typed_wbc(seed: int, wtype: int, px_per_um: float, cx: float, cy: float) -> _Wbc:
    """Draw one normal leukocyte of ``WBC_TYPES[wtype]`` from ``seed`` (deterministic)."""
    tr = WBC_TYPE_TRAITS[WBC_TYPES[wtype]]
    rng = np.random.default_rng(seed)
    weights = np.array([m[0] for m in tr.modes])
    mode = tr.modes[int(rng.choice(len(weights), p=weights / weights.sum()))]
    d = _draw_normal(rng, (mode[1], mode[2]), *tr.diameter_range_um)
    rc = 0.5 * d * px_per_um
    cell_amps = rng.normal(0.0, 0.02, 3)
    cell_min = rc * (1.0 - float(np.abs(cell_amps).sum()))
    nc = _draw_normal(rng, (mode[3], mode[4]), *TYPED_NC_RANGE)
    limit = cell_min - NUCLEAR_RIM_UM * px_per_um
    main, lobes, bridges = _nucleus_parts(rng, tr, rc, nc, limit, px_per_um)
    # Reach of the nucleus from its local origin, then an eccentric offset that keeps it inside.
    amp = float(np.abs(main["nuc_amps"]).sum())
    reach = math.hypot(main["nx"], main["ny"]) + main["rn"] * (1.0 + amp)
    for x, y, r, a2, _, a3, _ in lobes.tolist():
        reach = max(reach, math.hypot(x, y) + r * (1.0 + abs(a2) + abs(a3)))
    room = max(limit - reach, 0.0)
    off_r = room * float(rng.uniform(0.0, 0.9))
    off_a = float(rng.uniform(0, 2 * np.pi))
    ox, oy = cx + off_r * math.cos(off_a), cy + off_r * math.sin(off_a)
    lobes[:, 0] += ox
    lobes[:, 1] += oy
    bridges[:, [0, 2]] += ox
    bridges[:, [1, 3]] += oy
    fine_px = CHROMATIN_FINE_UM * px_per_um
    coarse_px = CHROMATIN_COARSE_UM * px_per_um
    grain_px = CYTO_GRAIN_UM * px_per_um
    nf = int(math.ceil(4 * reach / fine_px)) + 3  # nx, ny may sit at one end of the chain
    ncg = int(math.ceil(2 * rc * 1.2 / coarse_px)) + 3
    ng = int(math.ceil(2 * rc * 1.2 / grain_px)) + 3
    n_vac = min(int(rng.poisson(tr.vacuoles_mean)), 6)
    vacuoles = np.zeros((n_vac, 3))
    for i in range(n_vac):
        a = rng.uniform(0, 2 * np.pi)
        rv = rng.uniform(0.25, 0.55) * px_per_um
        r = rng.uniform(0.6, 0.9) * rc - 0.5 * rv
        vacuoles[i] = (cx + r * math.cos(a), cy + r * math.sin(a), rv)
    w = _Wbc(
        cx=cx,
        cy=cy,
        rc=rc,
        cell_amps=cell_amps,
        cell_phases=rng.uniform(0, 2 * np.pi, 3),
        nx=ox + main["nx"],
        ny=oy + main["ny"],
        rn=main["rn"],
        nuc_amps=main["nuc_amps"],
        nuc_phases=main["nuc_phases"],
        cleft_depth=main["cleft_depth"],
        cleft_angle=main["cleft_angle"],
        cleft_width=main["cleft_width"],
        condensation=_draw_normal(rng, tr.condensation, 0.0, 1.0),
        fine=rng.standard_normal((nf, nf)).astype(np.float32),
        coarse=rng.standard_normal((ncg, ncg)).astype(np.float32),
        fine_px=fine_px,
        coarse_px=coarse_px,
        nucleoli=np.zeros((0, 4)),
        vacuoles=vacuoles,
        basophilia=_draw_normal(rng, tr.cyto_blue, 0.0, 1.3),
        reach=rc * (1.0 + float(np.abs(cell_amps).sum())) + 1.0,
        lobes=lobes,
        bridges=bridges,
        cyto_eosin=_draw_normal(rng, tr.cyto_eosin, 0.0, 1.0),
        cyto_grain=tr.cyto_grain,
        grain=rng.standard_normal((ng, ng)).astype(np.float32),
        grain_px=grain_px,
        granule_kind=tr.granules,
        nucleus_gain=tr.nucleus_gain,
    )
    if tr.granules == "none":
        return w
    return dataclasses.replace(w, granules=_place_granules(rng, w, tr, cell_min, px_per_um))


def _place_granules(
    rng: np.random.Generator, w: _Wbc, tr: WbcTypeTraits, cell_min: float, ppu: float
) -> F64:
    """Granules ``(k, 4)`` (x, y, radius, density) on a jittered hexagonal lattice in the cell."""
    lo, hi = tr.granule_radius_um
    step = tr.granule_spacing * 0.5 * (lo + hi) * ppu
    row = step * math.sqrt(3.0) / 2.0
    ni, nj = int(math.ceil(w.rc / step)) + 1, int(math.ceil(w.rc / row)) + 1
    jj, ii = np.meshgrid(np.arange(-nj, nj + 1), np.arange(-ni, ni + 1), indexing="ij")
    x = (ii + 0.5 * (jj % 2)) * step + rng.normal(0.0, 0.2 * step, ii.shape)
    y = jj * row + rng.normal(0.0, 0.2 * step, ii.shape)
    radius = rng.uniform(lo, hi, ii.shape) * ppu
    density = np.clip(rng.normal(*tr.granule_density, ii.shape), 0.3, None)
    fill = rng.uniform(size=ii.shape) < tr.granule_fill
    over = rng.uniform(size=ii.shape) < tr.granule_over_nucleus
    px, py = w.cx + x, w.cy + y
    inside = np.hypot(x, y) + 0.6 * radius <= cell_min
    on_nucleus = _nuclear_rho(w, px, py) < 1.05
    keep = inside & fill & (~on_nucleus | over)
    return np.column_stack([px[keep], py[keep], radius[keep], density[keep]])


def _make_cell(seed: int, wtype: int, subtype: int, px_per_um: float, cx: float, cy: float) -> _Wbc:
    """The model of one WBC: lymphoid subtypes (hematogones, blasts) or a normal leukocyte."""
    if subtype >= 0:
        return _make_wbc(seed, subtype, px_per_um, cx, cy)
    return _make_typed_wbc(seed, wtype, px_per_um, cx, cy)


def _segment_distance(xs: F64, ys: F64, x0: float, y0: float, x1: float, y1: float) -> F64:
    vx, vy = x1 - x0, y1 - y0
    t = np.clip(((xs - x0) * vx + (ys - y0) * vy) / max(vx * vx + vy * vy, 1e-9), 0.0, 1.0)
    return np.asarray(np.hypot(xs - (x0 + t * vx), ys - (y0 + t * vy)))


def _nuclear_rho(w: _Wbc, xs: F64, ys: F64) -> F64:
    """Normalised nuclear radius at level-0 points (broadcast): < 1 inside, 1 on the outline.

    The nucleus is the main disc (harmonic outline, optional cleft), plus, for
    lobed / monocytoid nuclei, further discs and the strands (capsules) joining them.
    """
    dx, dy = xs - w.nx, ys - w.ny
    theta = np.arctan2(dy, dx)
    outline = _harmonic_radius(theta, w.nuc_amps, w.nuc_phases)
    if w.cleft_depth > 0.0:
        outline = outline - w.cleft_depth * np.exp(
            -((_wrap_angle(theta - w.cleft_angle) / w.cleft_width) ** 2)
        )
    rn = np.hypot(dx, dy) / (w.rn * outline)
    for x, y, r, a2, ph2, a3, ph3 in w.lobes.tolist():
        dx, dy = xs - x, ys - y
        theta = np.arctan2(dy, dx)
        rr = r * (1.0 + a2 * np.cos(2.0 * theta + ph2) + a3 * np.cos(3.0 * theta + ph3))
        rn = np.minimum(rn, np.hypot(dx, dy) / rr)
    for x0, y0, x1, y1, r in w.bridges.tolist():
        rn = np.minimum(rn, _segment_distance(xs, ys, x0, y0, x1, y1) / r)
    return np.asarray(rn)


def _wbc_masks(w: _Wbc, xs: F64, ys: F64) -> tuple[NDArray[np.bool_], NDArray[np.bool_], F64]:
    """Cell and nucleus masks at sample points ``xs`` (1, n) x ``ys`` (m, 1), level-0 px.

    Also returns the normalised nuclear radius (1 on the nuclear outline).
    """
    dx, dy = xs - w.cx, ys - w.cy
    cell = np.hypot(dx, dy) < w.rc * _harmonic_radius(
        np.arctan2(dy, dx), w.cell_amps, w.cell_phases
    )
    rn = _nuclear_rho(w, xs, ys)
    nucleus = (rn < 1.0) & cell
    return cell, nucleus, rn


def _wbc_grid(w: _Wbc, scale: int, q: int) -> tuple[int, int, F64, F64]:
    """Pixel origin at level ``log2(scale)`` and the level-0 sample coordinates."""
    i0 = math.floor((w.cx - w.reach) / scale)
    i1 = math.ceil((w.cx + w.reach) / scale)
    j0 = math.floor((w.cy - w.reach) / scale)
    j1 = math.ceil((w.cy + w.reach) / scale)
    xs = (i0 + (np.arange((i1 - i0) * q) + 0.5) / q) * scale
    ys = (j0 + (np.arange((j1 - j0) * q) + 0.5) / q) * scale
    return i0, j0, xs, ys


def _wbc_extent(w: _Wbc) -> tuple[tuple[int, int, int, int], NDArray[np.uint8]]:
    """Exact level-0 box ``(x0, y0, x1, y1)`` of the cell and its nucleus mask in that box."""
    i0, j0, xs, ys = _wbc_grid(w, 1, 1)
    cell, nucleus, _ = _wbc_masks(w, xs[None, :], ys[:, None])
    rows, cols = np.nonzero(cell)
    y0, y1, x0, x1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    box = (i0 + x0, j0 + y0, i0 + x1, j0 + y1)
    return box, nucleus[y0:y1, x0:x1].astype(np.uint8)


def _disc(xs: F64, ys: F64, x: float, y: float, r: float, soft: float) -> F64:
    return np.asarray(np.clip((r - np.hypot(xs - x, ys - y)) / soft + 0.5, 0.0, 1.0))


def _render_wbc(w: _Wbc, level: int) -> tuple[F32, int, int]:
    """Stain densities ``(3, h, w)`` of a WBC at ``level`` and its top-left pixel there.

    Level 0 samples each pixel centre once, so the drawn nucleus is exactly
    :func:`_wbc_extent`'s mask; lower levels average 2 x 2 samples per pixel.
    """
    scale = 2**level
    q = 1 if level == 0 else 2
    i0, j0, x1d, y1d = _wbc_grid(w, scale, q)
    xs, ys = x1d[None, :], y1d[:, None]
    cell, nucleus, rn = _wbc_masks(w, xs, ys)
    c = w.condensation
    fine = _sample_grid(
        w.fine,
        (x1d - w.nx) / w.fine_px + w.fine.shape[1] / 2,
        (y1d - w.ny) / w.fine_px + w.fine.shape[0] / 2,
    )
    coarse = _sample_grid(
        w.coarse,
        (x1d - w.cx) / w.coarse_px + w.coarse.shape[1] / 2,
        (y1d - w.cy) / w.coarse_px + w.coarse.shape[0] / 2,
    )
    # Fine lacy chromatin: lighter, grainy with pale gaps; condensed: darker, smoother,
    # with a few clumps and a darker rim (hematogones vs. blasts).
    base = 0.78 + 0.55 * c
    grain = (0.34 - 0.24 * c) * fine
    clumps = (0.08 + 0.10 * c) * coarse
    rim = (0.05 + 0.20 * c) * _smoothstep((rn - 0.72) / 0.28)
    chromatin = np.clip(base * (1.0 + grain + clumps + rim), 0.2, 2.2)
    if w.nucleus_gain != 1.0:
        chromatin = chromatin * w.nucleus_gain
    blue = np.zeros_like(chromatin)
    soft = max(0.7, 0.7 * scale / q)
    for x, y, r, vis in w.nucleoli.tolist():
        g = _disc(xs, ys, x, y, r, soft)
        chromatin = chromatin * (1.0 - 0.7 * vis * g)
        blue = blue + 0.4 * vis * g
    cyto = w.basophilia * (1.0 + 0.08 * coarse)
    eosin: F64 | float = 0.0
    if w.grain is not None:  # normal leukocytes: granular cytoplasm, maybe eosin-tinted
        grain = _sample_grid(
            w.grain,
            (x1d - w.cx) / w.grain_px + w.grain.shape[1] / 2,
            (y1d - w.cy) / w.grain_px + w.grain.shape[0] / 2,
        )
        cyto = cyto + w.basophilia * 0.5 * w.cyto_grain * grain
        eosin = w.cyto_eosin * np.clip(1.0 + w.cyto_grain * grain, 0.0, None)
    for x, y, r in w.vacuoles.tolist():  # clear holes, mostly over the cytoplasm
        g = _disc(xs, ys, x, y, r, soft)
        cyto = cyto * (1.0 - 0.85 * g)
        eosin = eosin * (1.0 - 0.85 * g)
        chromatin = chromatin * (1.0 - 0.5 * g)
    azure = np.where(nucleus, chromatin, 0.0)
    blue = np.where(nucleus, blue, np.where(cell, cyto, 0.0))
    if w.grain is None:
        planes = [np.zeros_like(azure), azure, blue]
    else:
        planes = [np.where(nucleus | ~cell, 0.0, eosin), azure, blue]
        if w.granules.size:
            field_ = _granule_field(w, x1d, y1d, soft) * cell
            gplanes = GRANULE_PLANES[w.granule_kind]
            if any(plane == _ORANGE for plane, _ in gplanes):
                planes.append(np.zeros_like(azure))
            for plane, weight in gplanes:
                planes[plane] = planes[plane] + weight * field_
    dens = np.stack(planes).astype(np.float32)
    if q > 1:
        h, wd = dens.shape[1] // q, dens.shape[2] // q
        dens = dens.reshape(len(planes), h, q, wd, q).mean(axis=(2, 4))
    return np.ascontiguousarray(dens), i0, j0


def _granule_field(w: _Wbc, x1d: F64, y1d: F64, soft: float) -> F64:
    """Granule density on the sample grid ``y1d x x1d`` (level-0 px), saturating where they pile."""
    out = np.zeros((y1d.size, x1d.size))
    for x, y, r, dval in w.granules.tolist():
        reach = r + 2.0 * soft
        i0, i1 = np.searchsorted(x1d, (x - reach, x + reach))
        j0, j1 = np.searchsorted(y1d, (y - reach, y + reach))
        if i1 > i0 and j1 > j0:
            out[j0:j1, i0:i1] += dval * _disc(x1d[None, i0:i1], y1d[j0:j1, None], x, y, r, soft)
    return np.minimum(out, GRANULE_SATURATION)


# ---------------------------------------------------------------------------
# Spatial index
# ---------------------------------------------------------------------------
class _BucketIndex:
    """Grid of square buckets over level-0 px -> contiguous runs of point indices.

    Points are sorted by bucket (row-major); ``query`` returns the indices
    of the points whose bucket meets a rectangle. Points outside the grid are
    clamped into its border buckets, which queries clamp the same way.
    """

    def __init__(self, x: F64, y: F64, width: int, height: int, bucket: int) -> None:
        self.bucket = bucket
        self.nx = max(1, -(-width // bucket))
        self.ny = max(1, -(-height // bucket))
        bx = np.clip(np.floor(np.asarray(x) / bucket), 0, self.nx - 1).astype(np.int64)
        by = np.clip(np.floor(np.asarray(y) / bucket), 0, self.ny - 1).astype(np.int64)
        ids = by * self.nx + bx
        self.order: I64 = np.argsort(ids, kind="stable")
        self.starts: I64 = np.searchsorted(ids[self.order], np.arange(self.nx * self.ny + 1))

    def query(self, x0: float, y0: float, x1: float, y1: float) -> I64:
        """Indices (into the original point order) of points bucketed in ``[x0, x1) x [y0, y1)``."""
        c0 = int(np.clip(math.floor(x0 / self.bucket), 0, self.nx - 1))
        c1 = int(np.clip(math.floor((x1 - 1e-9) / self.bucket), 0, self.nx - 1))
        r0 = int(np.clip(math.floor(y0 / self.bucket), 0, self.ny - 1))
        r1 = int(np.clip(math.floor((y1 - 1e-9) / self.bucket), 0, self.ny - 1))
        runs = [
            np.arange(self.starts[r * self.nx + c0], self.starts[r * self.nx + c1 + 1])
            for r in range(r0, r1 + 1)
        ]
        return self.order[np.concatenate(runs)] if runs else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------
# The slide
# ---------------------------------------------------------------------------
@dataclass
class SyntheticSlide:
    """A synthetic smear: geometry, stain, objects and their index; renders any region.

    Build it with :func:`make_slide`. ``objects`` is sorted by bucket; the
    row number is the object id.
    """

    name: str
    width: int
    height: int
    mpp: float
    kind: str
    geometry: _Geometry
    stain: _Stain
    bank: _Bank
    objects: NDArray[Any]  # _OBJECT_DTYPE
    wbc_seeds: NDArray[np.uint64]
    wbc_subtypes: NDArray[np.int8]  # index into SUBTYPES, -1 for normal leukocytes
    wbc_types: NDArray[np.int8]  # index into WBC_TYPES
    wbc_centres: F64  # (n, 2) level-0 px
    nucleus_png: list[bytes]  # per WBC row (ref)
    index: _BucketIndex
    max_reach: int  # largest object half-extent, level-0 px
    #: Expected share of each WBC type on this slide (what its WBCs were drawn from).
    type_mix: dict[str, float] = field(default_factory=dict)
    #: Expected share of each blast subtype among the slide's blasts (empty without blasts).
    blast_mix: dict[str, float] = field(default_factory=dict)
    blast_fraction: float | None = None  # kind="leukemia": the requested blast share
    _wbc_cache: OrderedDict[tuple[int, int], tuple[F32, int, int]] = field(
        default_factory=OrderedDict, repr=False
    )
    _wbc_cache_bytes: int = field(default=0, repr=False)

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        """``(width, height)`` of each pyramid level."""
        return pyramid_shapes(self.width, self.height)

    def wbc(self, ref: int) -> _Wbc:
        """The continuous model of WBC ``ref`` (rebuilt from its seed)."""
        cx, cy = self.wbc_centres[ref]
        return _make_cell(
            int(self.wbc_seeds[ref]),
            int(self.wbc_types[ref]),
            int(self.wbc_subtypes[ref]),
            1.0 / self.mpp,
            float(cx),
            float(cy),
        )

    def rendered_wbc(self, ref: int, level: int) -> tuple[F32, int, int]:
        key = (ref, level)
        hit = self._wbc_cache.get(key)
        if hit is not None:
            self._wbc_cache.move_to_end(key)
            return hit
        out = _render_wbc(self.wbc(ref), level)
        self._wbc_cache[key] = out
        self._wbc_cache_bytes += out[0].nbytes
        while self._wbc_cache_bytes > _WBC_CACHE_BYTES and len(self._wbc_cache) > 1:
            _, old = self._wbc_cache.popitem(last=False)
            self._wbc_cache_bytes -= old[0].nbytes
        return out


def _slide_rngs(seed: int, index: int) -> dict[str, np.random.Generator]:
    root = np.random.SeedSequence(entropy=seed, spawn_key=(index,))
    names = ("geometry", "stain", "bank", "rbc", "wbc", "platelet", "mix")
    return {n: np.random.default_rng(s) for n, s in zip(names, root.spawn(len(names)), strict=True)}


def _hex_offsets(n: int, parity: int) -> tuple[F64, F64]:
    """Toroidal (dy, dx) in lattice spacings from a site in a row of ``parity`` to every site."""
    dj = np.arange(n)[:, None]
    di = np.arange(n)[None, :]
    dx = di + 0.5 * (((parity + dj) % 2) - parity)
    dx = (dx + n / 2) % n - n / 2
    dy = ((dj + n // 2) % n - n // 2) * math.sqrt(3.0) / 2.0
    return np.broadcast_to(dy, (n, n)), dx


@functools.lru_cache(maxsize=1)
def _blue_noise_thresholds() -> F64:
    """Dither thresholds in (0, 1) on a hexagonal lattice torus (void-and-cluster, Ulichney 1993).

    Keeping the sites whose threshold is below ``p`` leaves an evenly spread
    fraction ``p`` of them: cells that touch without piling up.
    """
    n = _BLUE_NOISE_SIZE
    kernels = []
    for parity in (0, 1):
        dy, dx = _hex_offsets(n, parity)
        kernels.append(np.exp(-(dx * dx + dy * dy) / (2.0 * _BLUE_NOISE_SIGMA**2)))

    def energy(pattern: NDArray[np.bool_]) -> F64:
        e = np.zeros((n, n))
        for j, i in zip(*np.nonzero(pattern), strict=True):
            e += np.roll(kernels[j % 2], (j, i), axis=(0, 1))
        return e

    rng = np.random.default_rng(1993)
    pattern = rng.uniform(size=(n, n)) < 0.1
    e = energy(pattern)
    while True:  # relax the initial pattern: move the tightest cluster to the largest void
        j, i = np.unravel_index(np.argmax(np.where(pattern, e, -np.inf)), e.shape)
        pattern[j, i] = False
        e -= np.roll(kernels[j % 2], (j, i), axis=(0, 1))
        vj, vi = np.unravel_index(np.argmin(np.where(pattern, np.inf, e)), e.shape)
        pattern[vj, vi] = True
        e += np.roll(kernels[vj % 2], (vj, vi), axis=(0, 1))
        if (vj, vi) == (j, i):
            break
    rank = np.zeros((n, n))
    ones = int(pattern.sum())
    p, ep = pattern.copy(), e.copy()
    for r in range(ones - 1, -1, -1):  # rank the initial points, tightest cluster last
        j, i = np.unravel_index(np.argmax(np.where(p, ep, -np.inf)), ep.shape)
        p[j, i] = False
        ep -= np.roll(kernels[j % 2], (j, i), axis=(0, 1))
        rank[j, i] = r
    for r in range(ones, n * n):  # then fill the largest void, one site at a time
        j, i = np.unravel_index(np.argmin(np.where(pattern, np.inf, e)), e.shape)
        pattern[j, i] = True
        e += np.roll(kernels[j % 2], (j, i), axis=(0, 1))
        rank[j, i] = r
    return (rank + 0.5) / (n * n)


def _place_lattice(geom: _Geometry, rng: np.random.Generator, pad: float) -> tuple[I64, I64]:
    """RBC centres: dithered, jittered hexagonal lattice thinned to the local density."""
    s = RBC_SPACING_PROFILE[0][1] * geom.px_per_um
    dy = s * math.sqrt(3.0) / 2.0
    i_lo, i_hi = math.floor(-pad / s) - 1, math.ceil((geom.width + pad) / s) + 1
    j_lo, j_hi = math.floor(-pad / dy), math.ceil((geom.height + pad) / dy) + 1
    ii = np.arange(i_lo, i_hi)
    blue = _blue_noise_thresholds()
    nb = blue.shape[0]
    shift_i = int(rng.integers(0, nb))
    shift_j = 2 * int(rng.integers(0, nb // 2))  # even: keeps the rows' parity
    xs_out: list[I64] = []
    ys_out: list[I64] = []
    for j0 in range(j_lo, j_hi, _LATTICE_ROWS_PER_CHUNK):
        jj = np.arange(j0, min(j0 + _LATTICE_ROWS_PER_CHUNK, j_hi))[:, None]
        x = (ii[None, :] + 0.5 * (jj % 2)) * s
        y = np.broadcast_to(jj * dy, x.shape)
        p = geom.rbc_keep_probability(x, y)
        threshold = blue[(jj + shift_j) % nb, (ii[None, :] + shift_i) % nb] + rng.uniform(
            -_DITHER_JITTER, _DITHER_JITTER, x.shape
        )
        keep = threshold < p
        x, y, p = x[keep], y[keep], p[keep]
        local = s / np.sqrt(np.maximum(p, 0.05))
        sd = (_LATTICE_JITTER[0] + (_LATTICE_JITTER[1] - _LATTICE_JITTER[0]) * p * p) * local
        jx = np.clip(rng.standard_normal(x.shape), -2.3, 2.3) * sd
        jy = np.clip(rng.standard_normal(x.shape), -2.3, 2.3) * sd
        xs_out.append(np.rint(x + jx).astype(np.int64))
        ys_out.append(np.rint(y + jy).astype(np.int64))
    return np.concatenate(xs_out), np.concatenate(ys_out)


def _fits_on_smear(geom: _Geometry, x0: F64, y0: F64, x1: F64, y1: F64) -> NDArray[np.bool_]:
    """Whether boxes stay on the smear (before the glass) at their top, middle and bottom rows."""
    ok = np.ones(np.shape(x0), dtype=bool)
    for yy in (y0, 0.5 * (y0 + y1), y1):
        ok &= geom.inside(np.asarray(x1, dtype=np.float64), np.asarray(yy, dtype=np.float64))
    return ok


_Assign = Callable[[np.random.Generator, int], tuple[I64, I64]]


def _place_wbcs(
    geom: _Geometry, rng: np.random.Generator, kind: str, assign: _Assign
) -> tuple[list[_Wbc], list[int], list[int], list[int]]:
    """Non-overlapping WBCs with density proportional to the RBCs' (edge-enriched).

    ``assign(rng, n)`` gives the candidates' ``(wbc types, subtypes)``. Returns
    the kept cells' models, types, subtypes and seeds.
    """
    s = RBC_SPACING_PROFILE[0][1] * geom.px_per_um
    lattice_density = 1.0 / (s * s * math.sqrt(3.0) / 2.0)  # per px^2
    peak = lattice_density * WBC_PER_RBC[kind] * (1.0 + WBC_EDGE_BOOST + WBC_LATERAL_BOOST)
    n = int(rng.poisson(peak * geom.width * geom.height * 1.2))  # 1.2: patchiness headroom
    x = rng.uniform(0, geom.width, n)
    y = rng.uniform(0, geom.height, n)
    want = (
        geom.rbc_keep_probability(x, y) * geom.wbc_boost(x, y) * lattice_density * WBC_PER_RBC[kind]
    )
    keep = rng.uniform(0, 1, n) * peak * 1.2 < want
    x, y = np.floor(x[keep]) + 0.5, np.floor(y[keep]) + 0.5
    wtypes, subtypes = assign(rng, x.size)
    seeds = rng.integers(0, 2**63, size=x.size, dtype=np.int64)
    cell = 24.0 * geom.px_per_um  # grid cell >= largest WBC diameter
    grid: dict[tuple[int, int], list[int]] = {}
    wbcs: list[_Wbc] = []
    out_type: list[int] = []
    out_sub: list[int] = []
    out_seed: list[int] = []
    gap = 0.8 * geom.px_per_um
    for xi, yi, wt, st, sd in zip(
        x.tolist(), y.tolist(), wtypes.tolist(), subtypes.tolist(), seeds.tolist(), strict=True
    ):
        w = _make_cell(sd, wt, st, geom.px_per_um, xi, yi)
        if not _fits_on_smear(
            geom,
            np.asarray(xi - w.reach),
            np.asarray(yi - w.reach),
            np.asarray(xi + w.reach),
            np.asarray(yi + w.reach),
        ):
            continue
        gx, gy = int(xi // cell), int(yi // cell)
        clash = False
        for ox in (-1, 0, 1):
            for oy in (-1, 0, 1):
                for k in grid.get((gx + ox, gy + oy), ()):
                    o = wbcs[k]
                    if math.hypot(o.cx - xi, o.cy - yi) < o.reach + w.reach + gap:
                        clash = True
                        break
        if clash:
            continue
        grid.setdefault((gx, gy), []).append(len(wbcs))
        wbcs.append(w)
        out_type.append(wt)
        out_sub.append(st)
        out_seed.append(sd)
    return wbcs, out_type, out_sub, out_seed


def _subtype_mix(kind: str, rng: np.random.Generator) -> F64:
    dominant = int(rng.choice(len(SUBTYPES), p=np.asarray(DOMINANT_WEIGHTS[kind])))
    share = rng.uniform(*DOMINANT_FRACTION_RANGE)
    rest = rng.dirichlet(np.ones(len(SUBTYPES) - 1)) * (1.0 - share)
    mix = np.insert(rest, dominant, share)
    return np.asarray(mix / mix.sum())


_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _stratified_choice(rng: np.random.Generator, n: int, p: F64) -> I64:
    """``n`` draws of categories with probabilities ``p``, stratified.

    The golden-ratio sequence from a random start fills [0, 1) evenly, so the
    count of each category among any first ``k`` draws stays within about one
    of ``k * p``: a slide's WBCs follow its drawn mix without counting noise.
    """
    cdf = np.cumsum(p) / np.sum(p)
    cdf[-1] = 1.0
    u = (rng.uniform() + np.arange(n) * _GOLDEN) % 1.0
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(p) - 1).astype(np.int64)


def _normal_mix(rng: np.random.Generator) -> F64:
    """A slide's normal WBC differential over ``NORMAL_WBC_TYPES`` (gamma draws, normalised)."""
    shape = np.array([WBC_TYPE_SHAPES[t] for t in NORMAL_WBC_TYPES])
    mean = np.array([WBC_TYPE_MEANS[t] for t in NORMAL_WBC_TYPES])
    g = rng.gamma(shape, mean / shape)
    return np.asarray(g / g.sum())


def _blast_mix(rng: np.random.Generator) -> F64:
    """Shares of ``BLAST_SUBTYPES`` among a leukemic slide's blasts: one dominant subtype."""
    dominant = int(rng.integers(len(BLAST_SUBTYPES)))
    share = rng.uniform(*DOMINANT_FRACTION_RANGE)
    rest = rng.dirichlet(np.ones(len(BLAST_SUBTYPES) - 1)) * (1.0 - share)
    mix = np.insert(rest, dominant, share)
    return np.asarray(mix / mix.sum())


def _wbc_classes(
    kind: str,
    rng: np.random.Generator,
    blast_fraction: float,
    wbc_mix: Mapping[str, float] | None = None,
) -> tuple[_Assign, dict[str, float], dict[str, float]]:
    """How a slide of ``kind`` assigns its WBCs' types and subtypes, and its expected mixes."""
    if kind == "marrow":  # hematogones and blasts, independent draws (as before wbc_type)
        mix = _subtype_mix(kind, rng)

        def marrow(r: np.random.Generator, n: int) -> tuple[I64, I64]:
            sub = r.choice(len(SUBTYPES), size=n, p=mix)
            return np.where(sub == 0, _LYMPHOCYTE, _BLAST).astype(np.int64), sub

        blasts = mix[1:] / max(float(mix[1:].sum()), 1e-12)
        return (
            marrow,
            {"lymphocyte": float(mix[0]), "blast": float(1.0 - mix[0])},
            dict(zip(BLAST_SUBTYPES, blasts.tolist(), strict=True)),
        )
    f = blast_fraction if kind == "leukemia" else 0.0
    blast = _blast_mix(rng)
    normal = _normal_mix(rng)
    if wbc_mix is not None:
        given = np.array([float(wbc_mix.get(t, 0.0)) for t in WBC_TYPES])
        given = given / given.sum()
        f = float(given[_BLAST])
        normal = given[:_BLAST] / max(float(given[:_BLAST].sum()), 1e-12)
    p = np.concatenate([f * blast, (1.0 - f) * normal])
    nb = len(BLAST_SUBTYPES)

    def stratified(r: np.random.Generator, n: int) -> tuple[I64, I64]:
        cat = _stratified_choice(r, n, p)
        is_blast = cat < nb
        wtype = np.where(is_blast, _BLAST, cat - nb).astype(np.int64)
        return wtype, np.where(is_blast, cat + 1, -1).astype(np.int64)

    type_mix = dict(zip(NORMAL_WBC_TYPES, ((1.0 - f) * normal).tolist(), strict=True))
    type_mix["blast"] = f
    blast_mix = dict(zip(BLAST_SUBTYPES, blast.tolist(), strict=True)) if f > 0 else {}
    return stratified, type_mix, blast_mix


def _validate(
    width: int,
    height: int,
    mpp: float,
    blank_fraction: float,
    kind: str,
    seed: int,
    blast_fraction: float | None = None,
    wbc_mix: Mapping[str, float] | None = None,
) -> None:
    if width < 16 or height < 16:
        raise ConfigError(f"slide size must be at least 16 x 16 px, got {width} x {height}")
    if not mpp > 0:
        raise ConfigError(f"mpp must be > 0 um/px, got {mpp}")
    if not 0.0 <= blank_fraction < 1.0:
        raise ConfigError(f"blank_fraction must be in [0, 1), got {blank_fraction}")
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if blast_fraction is not None:
        if kind != "leukemia":
            raise ConfigError(
                f"blast_fraction applies to kind='leukemia' only, got it with kind={kind!r}"
            )
        if not 0.0 <= blast_fraction <= 1.0:
            raise ConfigError(f"blast_fraction must be in [0, 1], got {blast_fraction}")
    if wbc_mix is not None:
        if kind == "marrow" or blast_fraction is not None:
            raise ConfigError(
                "wbc_mix replaces the drawn WBC mix of kind 'blood' or 'leukemia' (blast share"
                f" included): got it with kind={kind!r}, blast_fraction={blast_fraction}"
            )
        unknown = sorted(set(wbc_mix) - set(WBC_TYPES))
        if unknown or any(v < 0 for v in wbc_mix.values()) or sum(wbc_mix.values()) <= 0:
            raise ConfigError(
                f"wbc_mix must map some of {list(WBC_TYPES)} to non-negative weights with a"
                f" positive sum, got {dict(wbc_mix)}"
            )
    if seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed}")


def make_slide(
    name: str,
    width: int,
    height: int,
    *,
    seed: int,
    index: int = 0,
    mpp: float = 0.25,
    blank_fraction: float = 0.0,
    kind: Literal["blood", "leukemia", "marrow"] = "blood",
    blast_fraction: float | None = None,
    wbc_mix: Mapping[str, float] | None = None,
) -> SyntheticSlide:
    """Place every object of one slide (deterministic from ``(seed, index)``).

    Parameters
    ----------
    name
        Slide id (file stem) used in the ground truth.
    width, height
        Level-0 size in px.
    seed, index
        The slide is drawn from ``SeedSequence(seed, spawn_key=(index,))``.
    mpp
        Microns per level-0 pixel.
    blank_fraction
        Approximate share of the area that is bare glass (beyond the feathered edge).
    kind
        ``"blood"``, ``"leukemia"`` or ``"marrow"``: the WBC density and mix (module docstring).
    blast_fraction
        ``kind="leukemia"`` only: share of blasts among the WBCs (default
        ``DEFAULT_BLAST_FRACTION``).
    wbc_mix
        ``kind="blood"`` or ``"leukemia"``: weights ``{wbc_type: w}`` that replace
        the slide's drawn WBC mix (blasts included), e.g. equal weights for
        crops balanced by type. Blasts keep the slide's drawn subtype mix.
    """
    _validate(width, height, mpp, blank_fraction, kind, seed, blast_fraction, wbc_mix)
    if kind == "leukemia" and blast_fraction is None:
        blast_fraction = DEFAULT_BLAST_FRACTION
    rngs = _slide_rngs(seed, index)
    ppu = 1.0 / mpp
    geom = _make_geometry(width, height, mpp, blank_fraction, rngs["geometry"])
    stain = _make_stain(width, height, mpp, rngs["stain"])
    bank = _make_bank(ppu, rngs["bank"])
    assign, type_mix, blast_mix = _wbc_classes(kind, rngs["mix"], blast_fraction or 0.0, wbc_mix)
    radius = bank.radius
    bank0 = bank.level(0)
    box_ox, box_oy = bank0.ox, bank0.oy
    sprite_w = np.array([sp.shape[1] for sp in bank0.sprites], dtype=np.int64)
    sprite_h = np.array([sp.shape[0] for sp in bank0.sprites], dtype=np.int64)

    # RBCs: lattice, pallor class by zone, then keep those off the glass.
    pad = RBC_DIAMETER_RANGE_UM[1] * ppu
    rx, ry = _place_lattice(geom, rngs["rbc"], pad)
    u = geom.axis_position(rx.astype(np.float64), ry.astype(np.float64))
    p_strong = np.interp(u, _RBC_CLASS_U, _RBC_CLASS_P["strong"])
    p_weak = np.interp(u, _RBC_CLASS_U, _RBC_CLASS_P["weak"])
    draw = rngs["rbc"].uniform(0, 1, rx.size)
    klass = np.where(draw < p_strong, 0, np.where(draw < p_strong + p_weak, 1, 2))
    rref = klass * SPRITE_BANK_SIZE + rngs["rbc"].integers(0, SPRITE_BANK_SIZE, rx.size)

    # Platelets: Poisson at RBC density / 30, some in small clumps.
    prng = rngs["platelet"]
    s_min = RBC_SPACING_PROFILE[0][1] * ppu
    lattice_density = 1.0 / (s_min * s_min * math.sqrt(3.0) / 2.0)
    n = int(
        prng.poisson(
            lattice_density * PLATELETS_PER_RBC * (width + 2 * pad) * (height + 2 * pad) * 1.2
        )
    )
    px = prng.uniform(-pad, width + pad, n)
    py = prng.uniform(-pad, height + pad, n)
    keep = prng.uniform(0, 1.2, n) < geom.rbc_keep_probability(px, py)
    px, py = px[keep], py[keep]
    clump = prng.uniform(0, 1, px.size) < PLATELET_CLUMP_FRACTION
    kids = np.repeat(np.nonzero(clump)[0], prng.integers(1, 4, int(clump.sum())))
    ang = prng.uniform(0, 2 * np.pi, kids.size)
    dist = prng.uniform(2.0, 3.5, kids.size) * ppu
    px = np.concatenate([px, px[kids] + dist * np.cos(ang)])
    py = np.concatenate([py, py[kids] + dist * np.sin(ang)])
    px, py = np.rint(px).astype(np.int64), np.rint(py).astype(np.int64)
    pref = _PLATELET_BANK_START + prng.integers(0, SPRITE_BANK_SIZE, px.size)

    # WBCs, then clear RBCs and platelets from under them (WBCs push RBCs aside).
    wbcs, wtype, wsub, wseed = _place_wbcs(geom, rngs["wbc"], kind, assign)
    bx, by = np.concatenate([rx, px]), np.concatenate([ry, py])
    bref = np.concatenate([rref, pref])
    bucket = max(16, int(round(BUCKET_UM * ppu)))
    idx = _BucketIndex(bx.astype(np.float64), by.astype(np.float64), width, height, bucket)
    alive = np.ones(bx.size, dtype=bool)
    for w in wbcs:
        near = idx.query(
            w.cx - 2 * w.reach, w.cy - 2 * w.reach, w.cx + 2 * w.reach, w.cy + 2 * w.reach
        )
        d = np.hypot(bx[near] - w.cx, by[near] - w.cy)
        is_rbc = bref[near] < _PLATELET_BANK_START
        # RBCs touch a WBC's rim; in the crowded thick body they overlap it a little.
        u_w = float(geom.axis_position(np.asarray(w.cx), np.asarray(w.cy)))
        touch = float(np.interp(u_w, *_WBC_RBC_CONTACT))
        limit = np.where(is_rbc, w.rc + touch * radius[bref[near]], w.rc + radius[bref[near]])
        alive[near[d < limit]] = False
    bx, by, bref = bx[alive], by[alive], bref[alive]
    bx0, by0 = bx - box_ox[bref], by - box_oy[bref]
    bx1, by1 = bx0 + sprite_w[bref], by0 + sprite_h[bref]
    on = _fits_on_smear(
        geom,
        bx0.astype(np.float64),
        by0.astype(np.float64),
        bx1.astype(np.float64),
        by1.astype(np.float64),
    )
    on &= (bx1 > 0) & (by1 > 0) & (bx0 < width) & (by0 < height)
    bx, by, bref, bx0, by0, bx1, by1 = (a[on] for a in (bx, by, bref, bx0, by0, bx1, by1))

    n_b, n_w = bx.size, len(wbcs)
    obj = np.zeros(n_b + n_w, dtype=_OBJECT_DTYPE)
    obj["cls"][:n_b] = np.where(bref < _PLATELET_BANK_START, _RBC, _PLATELET)
    obj["subtype"][:n_b] = -1
    obj["wtype"][:n_b] = -1
    obj["ref"][:n_b] = bref
    obj["mx"][:n_b], obj["my"][:n_b] = bx, by
    obj["x0"][:n_b], obj["y0"][:n_b], obj["x1"][:n_b], obj["y1"][:n_b] = bx0, by0, bx1, by1
    masks: list[bytes] = []
    for k, w in enumerate(wbcs):
        (x0, y0, x1, y1), nuc = _wbc_extent(w)
        cx0, cy0 = max(x0, 0), max(y0, 0)
        crop = nuc[cy0 - y0 : min(y1, height) - y0, cx0 - x0 : min(x1, width) - x0]
        masks.append(_png(crop))
        obj[n_b + k] = (_WBC, 0, wsub[k], wtype[k], k, int(w.cx), int(w.cy), x0, y0, x1, y1)
    centre_x = 0.5 * (np.clip(obj["x0"], 0, width) + np.clip(obj["x1"], 0, width))
    centre_y = 0.5 * (np.clip(obj["y0"], 0, height) + np.clip(obj["y1"], 0, height))
    obj["zone"] = geom.zone(geom.axis_position(centre_x, centre_y))

    index_all = _BucketIndex(centre_x, centre_y, width, height, bucket)
    obj = obj[index_all.order]
    index_all.order = np.arange(obj.size, dtype=np.int64)  # objects are now in bucket order
    half = np.maximum(obj["x1"] - obj["x0"], obj["y1"] - obj["y0"])
    return SyntheticSlide(
        name=name,
        width=width,
        height=height,
        mpp=mpp,
        kind=kind,
        geometry=geom,
        stain=stain,
        bank=bank,
        objects=obj,
        wbc_seeds=np.array(wseed, dtype=np.uint64),
        wbc_subtypes=np.array(wsub, dtype=np.int8),
        wbc_types=np.array(wtype, dtype=np.int8),
        wbc_centres=np.array([(w.cx, w.cy) for w in wbcs], dtype=np.float64).reshape(-1, 2),
        nucleus_png=masks,
        index=index_all,
        max_reach=int(half.max()) + 2 if half.size else 2,
        type_mix=type_mix,
        blast_mix=blast_mix,
        blast_fraction=blast_fraction,
    )


def _png(mask: NDArray[np.uint8]) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(mask))
    if not ok:  # pragma: no cover - cv2 encodes any uint8 2-D array
        raise RuntimeError("PNG encoding of a nucleus mask failed")
    return bytes(buf.tobytes())


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------
def _illumination(stain: _Stain, xs: F64, ys: F64) -> F32:
    """Relative illumination at level-0 coordinates ``xs`` (n,) x ``ys`` (m,), shape (m, n)."""

    def vignette(t: F64, phase: float) -> F64:
        q = 2.0 * ((t / stain.field_px + phase) % 1.0) - 1.0
        return np.asarray(1.0 - stain.vignette * q * q)

    kx, ky = stain.gradient_k
    # vy * vx * (1 + g cos(ax + ay)), with cos(a + b) = cos a cos b - sin a sin b: one
    # rank-3 product instead of a 2-D cosine.
    ax, ay = kx * xs + stain.gradient_phase, ky * ys
    vx, vy = vignette(xs, stain.field_phase[0]), vignette(ys, stain.field_phase[1])
    g = stain.gradient
    light = np.outer(vy.astype(np.float32), vx.astype(np.float32))
    if g > 0:
        light += np.outer(
            (g * vy * np.cos(ay)).astype(np.float32), (vx * np.cos(ax)).astype(np.float32)
        )
        light -= np.outer(
            (g * vy * np.sin(ay)).astype(np.float32), (vx * np.sin(ax)).astype(np.float32)
        )
    return light


def _plasma(slide: SyntheticSlide, xs: F64, ys: F64) -> F32 | None:
    """Eosin density of the plasma film (thicker in the body; none on the glass), or None."""
    g = slide.geometry
    edge = g.edge_x(ys)
    if float(np.max(edge)) <= xs[0]:
        return None  # all glass
    length = np.where(np.isfinite(edge), np.maximum(edge, 1.0), float(g.width))
    u = np.clip(np.outer(1.0 / length, xs), 0.0, 1.0)
    film = PLASMA_DENSITY[0] + (PLASMA_DENSITY[1] - PLASMA_DENSITY[0]) * u
    ramp = 4.0 * g.px_per_um
    if float(np.min(edge)) >= xs[-1] + ramp:
        return film.astype(np.float32)
    return (film * _smoothstep((edge[:, None] - xs[None, :]) / ramp)).astype(np.float32)


def _paste_sprites(dens: F32, sprites: list[F32], ref: I64, tx: I64, ty: I64, chans: I64) -> None:
    """Add each sprite at its top-left ``(tx, ty)`` into plane ``chans`` of ``dens`` (clipped)."""
    _, ah, aw = dens.shape
    for rf, ch, px, py in zip(ref.tolist(), chans.tolist(), tx.tolist(), ty.tolist(), strict=True):
        sp = sprites[rf]
        sh, sw = sp.shape
        dx0, dy0 = max(px, 0), max(py, 0)
        dx1, dy1 = min(px + sw, aw), min(py + sh, ah)
        if dx1 > dx0 and dy1 > dy0:
            dens[ch, dy0:dy1, dx0:dx1] += sp[dy0 - py : dy1 - py, dx0 - px : dx1 - px]


def _splat_sprites(dens: F32, stack: F32, ref: I64, tx: I64, ty: I64, chans: I64) -> None:
    """Vectorised :func:`_paste_sprites` for small sprites (lower levels), via ``bincount``."""
    _, ah, aw = dens.shape
    _, hm, wm = stack.shape
    yy = ty[:, None, None] + np.arange(hm)[None, :, None]
    xx = tx[:, None, None] + np.arange(wm)[None, None, :]
    vals = stack[ref]
    ok = (vals > 0) & (yy >= 0) & (yy < ah) & (xx >= 0) & (xx < aw)
    flat = (chans[:, None, None] * ah + yy) * aw + xx
    acc = np.bincount(flat[ok], weights=vals[ok], minlength=dens.size)
    dens += acc.reshape(dens.shape).astype(np.float32)


def _stain_density(
    slide: SyntheticSlide, ax: int, ay: int, aw: int, ah: int, level: int, xs: F64, ys: F64
) -> F32 | None:
    """Stain density planes ``(3 or 4, ah, aw)`` of a level region, or None if it is bare glass."""
    scale = 2**level
    X0, Y0, X1, Y1 = ax * scale, ay * scale, (ax + aw) * scale, (ay + ah) * scale
    r = slide.max_reach
    o = slide.objects[slide.index.query(X0 - r, Y0 - r, X1 + r, Y1 + r)]
    o = o[(o["x0"] < X1) & (o["x1"] > X0) & (o["y0"] < Y1) & (o["y1"] > Y0)]
    plasma = _plasma(slide, xs, ys)
    if plasma is None and o.size == 0:
        return None
    # WBCs first: an eosinophil in the region needs the 4th (granule) plane.
    wbcs = [slide.rendered_wbc(int(ref), level) for ref in o["ref"][o["cls"] == _WBC].tolist()]
    n_planes = max([3] + [sp3.shape[0] for sp3, _, _ in wbcs])
    dens = np.zeros((n_planes, ah, aw), dtype=np.float32)
    if plasma is not None:
        dens[_EOSIN] += plasma
    banked = o[o["cls"] != _WBC]
    if banked.size:
        bank = slide.bank.level(level)
        ref = banked["ref"].astype(np.int64)
        half = scale // 2
        tx = (banked["mx"].astype(np.int64) + half) // scale - bank.ox[ref] - ax
        ty = (banked["my"].astype(np.int64) + half) // scale - bank.oy[ref] - ay
        chans = slide.bank.channel[ref].astype(np.int64)
        if level == 0:
            _paste_sprites(dens, bank.sprites, ref, tx, ty, chans)
        else:
            _splat_sprites(dens, bank.stack, ref, tx, ty, chans)
    for sp3, px, py in wbcs:
        px, py = px - ax, py - ay
        k, sh, sw = sp3.shape
        dx0, dy0 = max(px, 0), max(py, 0)
        dx1, dy1 = min(px + sw, aw), min(py + sh, ah)
        if dx1 > dx0 and dy1 > dy0:
            dens[:k, dy0:dy1, dx0:dx1] += sp3[:, dy0 - py : dy1 - py, dx0 - px : dx1 - px]
    return dens


def render_region(
    slide: SyntheticSlide, x: int, y: int, w: int, h: int, level: int = 0
) -> NDArray[np.uint8]:
    """Render pixels ``[x, x + w) x [y, y + h)`` of pyramid ``level`` as RGB uint8 ``(h, w, 3)``.

    Every pixel is a function of its level coordinates only: a region
    rendered alone equals the same pixels of any larger region. Regions may
    extend beyond the slide (there is no object there).
    """
    scale = 2**level
    margin = _BLUR_MARGIN if level == 0 else 0
    ax, ay = x - margin, y - margin
    aw, ah = w + 2 * margin, h + 2 * margin
    xs = (np.arange(ax, ax + aw) + 0.5) * scale
    ys = (np.arange(ay, ay + ah) + 0.5) * scale
    light = _illumination(slide.stain, xs[margin : margin + w], ys[margin : margin + h])
    dens = _stain_density(slide, ax, ay, aw, ah, level, xs, ys)
    if dens is None:  # bare glass: transmitted light only
        rgb = light[:, :, None] * slide.stain.white
    else:
        planes = []
        for c in range(dens.shape[0]):
            plane = dens[c]
            if margin:
                plane = cv2.GaussianBlur(plane, (0, 0), OPTICAL_BLUR_PX)
                plane = plane[margin:-margin, margin:-margin]
            planes.append(np.ascontiguousarray(plane))
        # Absorbance per RGB channel = stain densities @ stain vectors (Beer-Lambert).
        od = cv2.transform(cv2.merge(planes), -slide.stain.vectors[: len(planes)].T)
        rgb = np.asarray(cv2.exp(od), dtype=np.float32)
        rgb *= light[:, :, None]
        rgb *= slide.stain.white
    shift_x, shift_y = _NOISE_LEVEL_SHIFT
    rgb += _noise(slide.stain.noise, x + shift_x * level, y + shift_y * level, w, h)
    return np.asarray(cv2.convertScaleAbs(rgb))  # rounds and saturates to uint8


def _noise(pattern: NDArray[np.int8], x: int, y: int, w: int, h: int) -> NDArray[np.int8]:
    """Noise at pixels ``[x, x + w) x [y, y + h)`` of the periodic ``pattern``."""
    x0, y0 = x % _NOISE_PERIOD, y % _NOISE_PERIOD
    if x0 + w <= pattern.shape[1] and y0 + h <= pattern.shape[0]:
        return pattern[y0 : y0 + h, x0 : x0 + w]
    rows = np.arange(y0, y0 + h) % _NOISE_PERIOD
    cols = np.arange(x0, x0 + w) % _NOISE_PERIOD
    return pattern.take(rows, axis=0).take(cols, axis=1)


# ---------------------------------------------------------------------------
# Ground truth and writers
# ---------------------------------------------------------------------------
def _decoded(
    codes: NDArray[Any], names: Sequence[str], mask: NDArray[np.bool_] | None = None
) -> pa.Array:
    indices = pa.array(np.asarray(codes, dtype=np.int32), mask=mask)
    return pa.DictionaryArray.from_arrays(indices, pa.array(list(names))).dictionary_decode()


def ground_truth_table(slide: SyntheticSlide) -> pa.Table:
    """One row per object of ``slide`` in :data:`GROUND_TRUTH_SCHEMA`."""
    o = slide.objects
    n = o.size
    x0 = np.clip(o["x0"], 0, slide.width).astype(np.int64)
    x1 = np.clip(o["x1"], 0, slide.width).astype(np.int64)
    y0 = np.clip(o["y0"], 0, slide.height).astype(np.int64)
    y1 = np.clip(o["y1"], 0, slide.height).astype(np.int64)
    is_wbc = o["cls"] == _WBC
    masks: list[bytes | None] = [None] * n
    for row, ref in zip(np.nonzero(is_wbc)[0].tolist(), o["ref"][is_wbc].tolist(), strict=True):
        masks[row] = slide.nucleus_png[ref]
    columns = {
        "slide_id": _decoded(np.zeros(n), [slide.name]),
        "object_id": pa.array(np.arange(n, dtype=np.int64)),
        "class": _decoded(o["cls"], CLASSES),
        "wbc_type": _decoded(np.maximum(o["wtype"], 0), WBC_TYPES, mask=~is_wbc),
        "subtype": _decoded(np.maximum(o["subtype"], 0), SUBTYPES, mask=o["subtype"] < 0),
        "x0": pa.array(x0),
        "y0": pa.array(y0),
        "x1": pa.array(x1),
        "y1": pa.array(y1),
        "cx": pa.array(0.5 * (x0 + x1).astype(np.float64)),
        "cy": pa.array(0.5 * (y0 + y1).astype(np.float64)),
        "nucleus_mask": pa.array(masks, type=pa.binary()),
        "mpp": pa.array(np.full(n, slide.mpp, dtype=np.float64)),
        "zone": _decoded(o["zone"], ZONES),
    }
    return pa.Table.from_arrays(list(columns.values()), schema=GROUND_TRUTH_SCHEMA)


def _iter_tiles(slide: SyntheticSlide, level: int, tile: int) -> Iterator[NDArray[np.uint8]]:
    lw, lh = slide.level_shapes[level]
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            yield render_region(slide, tx, ty, tile, tile, level)


def write_tiff(
    slide: SyntheticSlide,
    path: str | Path,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    jpeg_quality: int = 90,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write ``slide`` as a tiled, JPEG-compressed, pyramidal BigTIFF, one tile at a time.

    Level 0 is the first page; reduced levels are its SubIFDs
    (``subfiletype=1``); every level carries its pixel size in the
    resolution tags (pixels per centimetre).
    """
    path = Path(path)
    shapes = slide.level_shapes
    options: dict[str, Any] = dict(
        dtype=np.uint8,
        tile=(tile_size, tile_size),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": jpeg_quality},
        resolutionunit="CENTIMETER",
        maxworkers=1,
        metadata=None,
    )
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level, (lw, lh) in enumerate(shapes):
            if progress is not None:
                progress(f"{path.name}: level {level} ({lw} x {lh} px)")
            ppcm = 1e4 / (slide.mpp * 2**level)
            extra: dict[str, Any] = (
                {
                    "subifds": len(shapes) - 1,
                    "description": f"hemaray synthetic smear {slide.kind}; mpp={slide.mpp}"
                    + (
                        f"; blast_fraction={slide.blast_fraction}"
                        if slide.blast_fraction is not None
                        else ""
                    ),
                }
                if level == 0
                else {"subfiletype": 1}
            )
            tif.write(
                _iter_tiles(slide, level, tile_size),
                shape=(lh, lw, 3),
                resolution=(ppcm, ppcm),
                **options,
                **extra,
            )
    return path


def _write_plain(slide: SyntheticSlide, path: Path, jpeg_quality: int) -> Path:
    rgb = render_region(slide, 0, 0, slide.width, slide.height, 0)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if path.suffix == ".jpg" else []
    if not cv2.imwrite(str(path), bgr, params):
        raise OSError(f"could not write {path}: check the folder exists and is writable")
    return path


_SUFFIX = {"tiff": ".tif", "jpeg": ".jpg", "png": ".png"}


def synth_slides(
    out_dir: str | Path,
    *,
    slides: int,
    width: int,
    height: int,
    seed: int,
    mpp: float = 0.25,
    blank_fraction: float = 0.0,
    kind: Literal["blood", "leukemia", "marrow"] = "blood",
    blast_fraction: float | None = None,
    wbc_mix: Mapping[str, float] | None = None,
    format: Literal["tiff", "jpeg", "png"] = "tiff",
    tile_size: int = DEFAULT_TILE_SIZE,
    jpeg_quality: int = 90,
    progress: Callable[[str], None] | None = None,
    prefix: str = "slide",
) -> list[Path]:
    """Write ``slides`` synthetic smears and their ground truth into ``out_dir``.

    Parameters
    ----------
    out_dir
        Output folder (created).
    slides
        Number of slides; slide ``i`` is ``slide_{i:04d}`` and is drawn from
        ``(seed, i)``, so the same arguments give identical pixels and ground truth.
    width, height
        Level-0 size in px.
    seed
        Non-negative integer.
    mpp
        Microns per level-0 pixel (0.25 is a 40x scan).
    blank_fraction
        Approximate share of each slide that is bare glass beyond the feathered edge.
    kind
        ``"blood"``: normal WBC differential, about one WBC per oil field;
        ``"leukemia"``: blood with a share ``blast_fraction`` of lymphoblasts and
        four times the WBC density; ``"marrow"``: ~40 nucleated cells per oil
        field, hematogones and blasts (module docstring).
    blast_fraction
        ``kind="leukemia"`` only: share of blasts among the WBCs, in [0, 1]
        (default ``DEFAULT_BLAST_FRACTION``, 0.6).
    wbc_mix
        Optional ``{wbc_type: weight}`` replacing every slide's drawn WBC mix
        (``blood`` / ``leukemia``; see :func:`make_slide`).
    format
        ``"tiff"``: pyramidal tiled JPEG BigTIFF written tile by tile;
        ``"jpeg"`` / ``"png"``: one plain image of the same level-0 content
        (held in memory: meant for small fields of view such as 640 x 480).
    tile_size
        TIFF tile side in px (multiple of 16).
    jpeg_quality
        JPEG quality 1-100 (TIFF tiles and ``.jpg`` files).
    progress
        Called with one short message per slide and pyramid level.
    prefix
        Slide file stems are ``{prefix}_0000``, ...: sets made with different
        prefixes can run into one output without their slide ids colliding.

    Returns
    -------
    list of Path
        The slide files, in order; ``out_dir / "ground_truth.parquet"`` holds
        one row per object of all of them (:data:`GROUND_TRUTH_SCHEMA`).
    """
    if slides < 0:
        raise ConfigError(f"slides must be >= 0, got {slides}")
    if format not in _SUFFIX:
        raise ConfigError(f"format must be one of {sorted(_SUFFIX)}, got {format!r}")
    if tile_size < 16 or tile_size % 16:
        raise ConfigError(f"tile_size must be a positive multiple of 16, got {tile_size}")
    if not 1 <= jpeg_quality <= 100:
        raise ConfigError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    _validate(width, height, mpp, blank_fraction, kind, seed, blast_fraction, wbc_mix)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    with pq.ParquetWriter(out / GROUND_TRUTH_FILE, GROUND_TRUTH_SCHEMA) as writer:
        for i in range(slides):
            name = slide_name(i, prefix)
            slide = make_slide(
                name,
                width,
                height,
                seed=seed,
                index=i,
                mpp=mpp,
                blank_fraction=blank_fraction,
                kind=kind,
                blast_fraction=blast_fraction,
                wbc_mix=wbc_mix,
            )
            if progress is not None:
                counts = np.bincount(slide.objects["cls"], minlength=3)
                types = np.bincount(slide.wbc_types, minlength=len(WBC_TYPES))
                mix = ", ".join(
                    f"{n} {t}" for t, n in zip(WBC_TYPES, types.tolist(), strict=True) if n
                )
                progress(f"{name}: {counts[0]} RBC, {counts[1]} WBC ({mix}), {counts[2]} platelets")
            path = out / f"{name}{_SUFFIX[format]}"
            if format == "tiff":
                write_tiff(
                    slide, path, tile_size=tile_size, jpeg_quality=jpeg_quality, progress=progress
                )
            else:
                _write_plain(slide, path, jpeg_quality)
            writer.write_table(ground_truth_table(slide))
            paths.append(path)
    return paths
