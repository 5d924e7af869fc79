"""Pipeline stages: plain functions and small classes over numpy arrays, testable without Ray.

- `detect`: the RBC / WBC / platelet detector (ultralytics YOLO) and `load_detector`.
- `crop`: WBC crops cut from a tile in memory, background colour.
- `segment`: nucleus and cell masks (LAB + k-means on a*) and morphometrics.
- `classify`: WBC classifiers over crops (the label set comes from the model file).
- `preprocess`: classifier input preparation shared by training and evaluation.
- `device`: CUDA or CPU, and torch's thread count across ultralytics calls.

Arrays in, arrays out. May import `batch.config`, `batch.errors`, `batch.models`
(model files and cards) and each other; never `batch.run`, `batch.train`,
`batch.eval` or anything that uses them (import-linter checks it).
"""
