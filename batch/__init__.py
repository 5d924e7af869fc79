"""hemaray: distributed batch processing of blood-smear and bone-marrow slides.

One folder per role; imports point one way (entry points -> tools -> run ->
stages -> slides / tiling -> config / errors), checked by import-linter:

- `cli`: the ``hemaray`` command (parsing and dispatch only).
- `bench`: benchmarks. `train`: detector / classifier training, sweeps, weak
  labels. `eval`: metrics and the evaluations. `cluster`: Ray Jobs submission.
- `run`: the pipeline (tile batch contract, worker tasks, Ray wiring, books,
  Parquet sink, provenance, the Ray-free local runner).
- `calls`, `inputs`, `plot`, `datasets`: per-slide aggregation, input
  resolution, pictures, labelled-dataset readers.
- `stages`: detect, crop, segment, classify over arrays.
- `tiling`, `slides`, `models`, `synth`, `ids`: tile plans, slide readers,
  model files and cards, synthetic smears, identifiers.
- `config`, `lru`, `errors`: every default, the one LRU cache, every exception.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hemaray")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"

__all__ = ["__version__"]
