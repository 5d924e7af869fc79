"""Multi-node correctness: a run on a 3-node Ray cluster writes exactly the single-node cell table.

The cluster (``ray.cluster_utils.Cluster``: a head and two workers on this
machine) lives in a child process with its own ``RAY_TMPDIR``, so it can
neither collide with this session's local Ray (``ray_local``) nor leave an
address file behind for another ``ray.init()`` to find.

Placement is forced by resources, not hoped for: detector actors need
``execution.cpu_per_actor = 2`` CPUs, the head has 1 CPU and each worker 3,
so no node can hold two detector actors and the head holds none; everything
else (planning, classification, read and segment tasks) needs 0.5 CPU and
fits around them. The state API then shows where the actors really were:
each detector actor's node, and the batches (``submit`` calls) each ran.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("ray_local")

#: Four small marrow slides (4 tiles each): one block of tiles per slide reaches the detectors.
SLIDES, WIDTH, HEIGHT, SEED = 4, 900, 700, 5
HEAD_CPUS, WORKER_CPUS, WORKERS, DETECTOR_CPUS = 1, 3, 2, 2
#: Identical in both runs: the detector config is part of every cell id.
DETECT_SETS = ["detect.actors=2", "detect.batch_size=2"]
#: Placement-only settings (not part of cell ids) of the single-node run on 2 CPUs.
SINGLE_NODE_SETS = ["execution.cpu_per_actor=0.25", "execution.cpu_per_task=0.25", "execution.torch_threads=1"]
MULTI_NODE_SETS = [f"execution.cpu_per_actor={DETECTOR_CPUS}", "execution.torch_threads=1"]
CHILD_TIMEOUT_S = 400
RESULT_MARKER = "HEMARAY_MULTINODE_RESULT "
#: Ray Data names the detector's actors after the stage (and any task stage fused into it). On
#: this CPU-only cluster the default placement is "fused": the detector runs inside CellStage.
DETECTOR_STAGE = "CellStage"
SHIPPED_ALL_SUBTYPE = Path(__file__).resolve().parents[1] / "batch" / "models" / "all_subtype.pt"


def _classifier_sets() -> list[str]:
    # Until the ALL-subtype classifier ships, both runs use the WBC-type classifier only.
    if SHIPPED_ALL_SUBTYPE.is_file():
        return []
    return ["classifiers=[{name: wbc_type, model: wbc_type}]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(slides: str, out: str, dashboard_port: int) -> dict[str, Any]:
    """Start the 3-node cluster, run the pipeline on it, report where the detector actors ran."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_tasks

    from batch.config import load_config
    from batch.inputs import resolve_inputs
    from batch.run.pipeline import run_pipeline

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": HEAD_CPUS, "object_store_memory": 200_000_000, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
        },
    )  # fmt: skip
    try:
        for _ in range(WORKERS):
            cluster.add_node(num_cpus=WORKER_CPUS, object_store_memory=200_000_000)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        # Hand bundles to the least busy detector rather than the one next to the data, so
        # both detectors get work from a few slides (placement does not depend on this).
        ctx.actor_locality_enabled = False
        config = load_config(None, DETECT_SETS + MULTI_NODE_SETS + _classifier_sets())
        result = run_pipeline(resolve_inputs([slides]), out, config, echo=lambda s: None)
        address = f"http://127.0.0.1:{dashboard_port}"
        actors = [
            a for a in list_actors(address=address, detail=True, limit=10_000)
            if DETECTOR_STAGE in a.class_name
        ]  # fmt: skip
        tasks = list_tasks(address=address, detail=True, limit=10_000, filters=[("type", "=", "ACTOR_TASK")])
        detector_tasks = [t for t in tasks if DETECTOR_STAGE in t.func_or_class_name]
        ran = Counter(t.node_id for t in detector_tasks)
        batches = Counter(t.node_id for t in detector_tasks if t.func_or_class_name.endswith(".submit"))
        return {
            "committed": sorted(result.committed),
            "failed": result.failed,
            "nodes": {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]},
            "head": next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]),
            "detector_actors": [a.class_name for a in actors],
            "detector_nodes": [a.node_id for a in actors],
            "detector_methods_ran_on": dict(ran),
            "detector_batches_by_node": dict(batches),
        }  # fmt: skip
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def slides_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from batch.synth import synth_slides

    d = tmp_path_factory.mktemp("mn-slides")
    synth_slides(d, slides=SLIDES, width=WIDTH, height=HEIGHT, seed=SEED, kind="marrow")
    return d


def _run_child(slides: Path, out: Path) -> dict[str, Any]:
    ray_tmp = tempfile.mkdtemp(prefix="hr-mn-", dir="/tmp")  # short: socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               YOLO_CONFIG_DIR=str(Path(ray_tmp) / "yolo"))  # fmt: skip
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(slides), str(out), str(_free_port())],
            env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
        )  # fmt: skip
    finally:
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_MARKER) :])
    return result


def test_multinode_run_spreads_detectors_and_matches_single_node(slides_dir: Path, tmp_path: Path) -> None:
    import pandas as pd

    from batch.config import load_config
    from batch.ids import slide_id_for
    from batch.inputs import resolve_inputs
    from batch.run.pipeline import run_pipeline
    from batch.run.sink import read_table

    single_out, multi_out = tmp_path / "single", tmp_path / "multi"
    config = load_config(None, DETECT_SETS + SINGLE_NODE_SETS + _classifier_sets())
    single = run_pipeline(resolve_inputs([str(slides_dir)]), str(single_out), config, echo=lambda s: None)
    expected_ids = sorted(slide_id_for(str(slides_dir / f"slide_{i:04d}.tif")) for i in range(SLIDES))
    assert sorted(single.committed) == expected_ids

    report = _run_child(slides_dir, multi_out)
    assert report["committed"] == expected_ids and not report["failed"]
    assert len(report["nodes"]) == 1 + WORKERS
    # Two detector actors, on two different nodes, neither the head; each executed code there.
    detector_nodes = report["detector_nodes"]
    assert len(detector_nodes) == 2 and len(set(detector_nodes)) == 2, report
    assert report["head"] not in detector_nodes
    assert set(report["detector_methods_ran_on"]) == set(detector_nodes), report
    batches = report["detector_batches_by_node"]
    assert set(batches) <= set(detector_nodes) and sum(batches.values()) >= SLIDES // 2, report
    print("detector batches by node:", batches)

    single_cells = read_table(str(single_out), "cells").to_pandas()
    multi_cells = read_table(str(multi_out), "cells").to_pandas()
    assert single_cells.cell_id.is_unique and multi_cells.cell_id.is_unique
    assert set(multi_cells.cell_id) == set(single_cells.cell_id)
    key = ["cell_id"]
    pd.testing.assert_frame_equal(
        multi_cells.sort_values(key).reset_index(drop=True),
        single_cells.sort_values(key).reset_index(drop=True),
    )
    slides_rows = read_table(str(multi_out), "slides").to_pandas()
    assert sorted(slides_rows.slide_id.astype(str)) == expected_ids
    assert (slides_rows.status == "committed").all()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="child process of test_multinode")
    parser.add_argument("--child", nargs=3, metavar=("SLIDES", "OUT", "DASHBOARD_PORT"), required=True)
    slides_arg, out_arg, port_arg = parser.parse_args().child
    print(RESULT_MARKER + json.dumps(_child(slides_arg, out_arg, int(port_arg))), flush=True)
