"""Running slides: the tile batch contract, the worker callables, Ray wiring, books and output.

- `columns`: the tile batch (the rows that travel between stages), defined once.
- `tasks`: what runs on workers (plan, read, detect + crop, segment, classify).
- `pipeline`: Ray Data wiring and placement (``hemaray run``).
- `ledger`: the driver's per-slide lifecycle: start, tile, commit, fail.
- `sink`: Parquet output and the per-slide atomic commit.
- `provenance`: model files, hashes, label sets, the run manifest.
- `local`: the same stages chained in one process, without Ray (the evaluations use it).

May import the pure layers (`batch.stages`, `batch.slides`, `batch.tiling`)
and the shared modules (`config`, `errors`, `ids`, `inputs`, `calls`,
`models`, `lru`); never `batch.train`, `batch.eval`, `batch.cluster` or the CLI.
"""
