"""Cluster tooling: submit hemaray commands and job scripts to a Ray cluster, follow and stop them.

- `submit`: build a job (code, runtime environment, entrypoint; never credentials) and submit it.
- `jobs`: the Jobs API client: connect (address, auth token), wait, list, status, logs, stop.

Imports only `batch.errors` (and `batch.__version__`); the command lines live in `batch.cli`.
"""
