"""Shared fixtures (a real S3 server: moto over HTTP; local Ray; scratch env for ultralytics) and tiers.

Module-specific fixtures (generated slides and so on) live in the test modules.

Tiers (pytest markers, registered in pyproject.toml): ``cluster`` (several Ray
nodes or a ``ray start`` head: `CLUSTER_MODULES`), ``ray`` (a test that uses
the local Ray instance, the ``ray_local`` fixture), ``slow`` (marked by hand:
model training and long end-to-end checks) and ``unit`` (everything else,
given here). ``make test-fast`` runs the unit tier; ``make test`` runs all.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Nothing in the tests may reach the network or write to $HOME.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# The suite's INT8 detector export calibrates on 4 tiles (1 smear of 1280 px), not 320: its first
# `auto` run quantizes in seconds, not ~2 minutes. The setting is in the export's cache key, so a
# user's cache never mixes the two (batch.stages.quantize.CALIBRATION_ENV).
os.environ.setdefault("HEMARAY_INT8_CALIBRATION", "1x1280")
# The standard AWS chain of every process the tests start (Ray workers included, which
# inherit the environment at ray.init) finds these fake keys for the moto server, as a
# cluster's workers would find theirs in a Kubernetes Secret. Never real credentials.
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"

S3_BUCKET = "slides"
#: Test modules that start Ray clusters of their own (multi-node, job submission).
CLUSTER_MODULES = frozenset({"test_multinode", "test_cluster_e2e"})
#: Markers that put a test in a tier other than ``unit``.
NON_UNIT_TIERS = ("ray", "cluster", "slow", "extended")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every test its tier: cluster by module, ray by fixture, unit when nothing else."""
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in CLUSTER_MODULES:
            item.add_marker(pytest.mark.cluster)
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
        if not any(item.get_closest_marker(m) for m in NON_UNIT_TIERS):
            item.add_marker(pytest.mark.unit)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def _yolo_config_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("yolo-config")))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on loopback for the whole session; yields its endpoint URL."""
    from moto.s3.responses import S3Response
    from moto.server import ThreadedMotoServer

    # S3 applies a conditional PUT (If-None-Match: *) atomically; moto checks, then stores, and
    # two racing PUTs of one key can both succeed on a busy machine. One lock around moto's
    # PUT handler gives the server S3's guarantee (the commit's exclusive writes rely on it).
    put_object, lock = S3Response.put_object, threading.Lock()

    def atomic_put_object(self: Any) -> Any:
        with lock:
            return put_object(self)

    S3Response.put_object = atomic_put_object  # type: ignore[method-assign]
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
    S3Response.put_object = put_object  # type: ignore[method-assign]


@pytest.fixture()
def s3(s3_server: str) -> Iterator[dict[str, Any]]:
    """A fresh S3 state with one empty bucket ``slides``.

    Yields ``{"endpoint": url, "bucket": name, "fs": s3fs.S3FileSystem,
    "storage_options": dict}``; ``storage_options`` is what a user passes to
    ``open_slide`` (endpoint only: credentials come from the environment).
    """
    import requests
    import s3fs

    requests.post(f"{s3_server}/moto-api/reset", timeout=10)
    storage_options = {"client_kwargs": {"endpoint_url": s3_server}}
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(**storage_options)
    fs.mkdir(S3_BUCKET)
    yield {"endpoint": s3_server, "bucket": S3_BUCKET, "fs": fs, "storage_options": storage_options}
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture()
def out_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray instance for the whole session, small fixed resources."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            object_store_memory=512 * 1024 * 1024,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()
