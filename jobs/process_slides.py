"""Ray job entrypoint: process slides into per-cell Parquet, exactly as ``hemaray run``.

Example (on a cluster, through ``hemaray submit``)::

    hemaray submit --address http://HEAD:8265 -- jobs/process_slides.py \
        s3://slides/cohort/ --out s3://results/cohort --endpoint-url http://minio:9000

Every argument is ``hemaray run``'s (``hemaray run --help``); inside a Ray job
the run connects to the job's cluster.
"""

from __future__ import annotations

import sys

from batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
