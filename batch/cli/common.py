"""Helpers the command modules share: printing results, S3 options, starting Ray."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

__all__ = ["print_json", "print_result", "storage_options", "init_ray"]


def print_json(obj: Any) -> None:
    print(json.dumps(obj, default=str))


def print_result(result: dict[str, Any], as_json: bool) -> None:
    """A benchmark's figures: one JSON object (last line) or one aligned line per figure."""
    if as_json:
        print_json(result)
    else:
        for k, v in result.items():
            print(f"{k:>28}: {v}")


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """The fsspec options of a command's ``--endpoint-url``: the run's own (`StorageConfig`).

    Raises
    ------
    ConfigError
        If the endpoint is not an http(s) URL or carries credentials.
    """
    from batch.config import StorageConfig

    storage = StorageConfig(endpoint_url=getattr(args, "endpoint_url", None) or None)
    storage.validate()
    return storage.storage_options()


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # The embedded default: a local Ray instance on this machine.
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
