"""Benchmarks: speed and memory measured side by side in one run.

- `batch.bench.io`: the slide reader against S3 (over-read, GETs) and tifffile.
- `batch.bench.pipeline`: ``hemaray run`` end to end against the bare detector, and memory.
- `batch.bench.detector`: the detector in each inference runtime on the same tiles, and parity.
- `batch.bench.placement`: the detector stage per (actors, threads) placement and runtime.
- `batch.bench.gpu`: the detector and pipeline comparisons on a CUDA device.
"""

from batch.bench.detector import bench_detector
from batch.bench.gpu import bench_gpu
from batch.bench.io import bench_io
from batch.bench.pipeline import bench_pipeline

__all__ = ["bench_detector", "bench_gpu", "bench_io", "bench_pipeline"]
