"""End to end against a real Ray head: ``hemaray submit --wait -- run s3://...`` through the Jobs API.

The head is a ``ray start --head`` of this venv with its own ``--temp-dir``,
its own ports on 127.0.0.1 and its own process session; teardown ends only
the processes of that session (never ``ray stop``, which would end every Ray
on the machine, this test session's own included). Object-storage
credentials reach the job the way a Kubernetes Secret gives them to Ray
pods: as the environment of the head's processes, never in the submission.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from batch.cli import main
from batch.cluster.jobs import job_logs, job_status, list_jobs
from batch.ids import slide_id_for
from batch.run.sink import read_table
from batch.synth import synth_slides

VENV_BIN = Path(sys.executable).parent
RAY_BIN = VENV_BIN / "ray"
#: Seconds the head may take to come up, and its processes to end after SIGTERM.
HEAD_START_TIMEOUT_S = 120
HEAD_STOP_GRACE_S = 5
#: Worker ports of the test head: a window outside Ray's default 10002-19999 and the
#: kernel's ephemeral range, so it cannot collide with the session's own local Ray.
WORKER_PORT_BASE, WORKER_PORT_SPAN, WORKER_PORT_WINDOW = 20000, 9000, 200
#: Marker only the head's environment carries: the job must find it, the submission must not.
HEAD_SECRET = f"e2e-head-secret-{uuid.uuid4().hex}"
HEAD_KEY_ID = "e2ehead" + uuid.uuid4().hex[:12]
SHIPPED_ALL_SUBTYPE = Path(__file__).resolve().parents[1] / "batch" / "models" / "all_subtype.pt"


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are chosen.

    One at a time, the kernel may hand the port it just freed out again: two Ray
    components then got the same port and ``ray start`` refused (seen once in CI).
    """
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


@dataclass
class Head:
    """A running test head: its dashboard URL, temp dir, process session and auth token file."""

    dashboard: str
    temp_dir: Path
    session_id: int
    token_file: Path

    def cli(self) -> list[str]:
        """The connection flags of ``hemaray submit`` / ``hemaray jobs`` for this head."""
        return ["--address", self.dashboard, "--auth-token-file", str(self.token_file)]

    def api(self) -> dict[str, Any]:
        """The connection arguments of ``batch.cluster.jobs``' functions for this head."""
        return {"address": self.dashboard, "auth_token_file": self.token_file}


def _head_processes(head: Head) -> list[psutil.Process]:
    """Processes of the head's session, or whose command line names its temp dir."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            in_session = os.getsid(proc.pid) == head.session_id
            cmdline = " ".join(proc.info["cmdline"] or [])
        except (ProcessLookupError, psutil.Error, PermissionError):
            continue
        if proc.pid != os.getpid() and (in_session or str(head.temp_dir) in cmdline):
            found.append(proc)
    return found


def _stop_head(head: Head) -> None:
    procs = _head_processes(head)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=HEAD_STOP_GRACE_S)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=HEAD_STOP_GRACE_S)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    """``ray start --head`` with 2 CPUs, dashboard and Jobs API on loopback, its own everything."""
    temp_dir = Path(tempfile.mkdtemp(prefix="hr-e2e-", dir="/tmp"))  # short: socket paths
    token = uuid.uuid4().hex + uuid.uuid4().hex
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    (dash_port, gcs, client, agent, agent_grpc, metrics, node_manager, object_manager,
     runtime_env) = _free_ports(9)  # fmt: skip
    worker_min = WORKER_PORT_BASE + random.randrange(0, WORKER_PORT_SPAN, WORKER_PORT_WINDOW)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this venv's
        RAY_USAGE_STATS_ENABLED="0",
        # Ray token authentication, as k8s/ configures it; the token is this head's own.
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        YOLO_CONFIG_DIR=str(temp_dir / "yolo"),
        MPLCONFIGDIR=str(temp_dir / "mpl"),
        # What a Kubernetes Secret gives the Ray pods; moto accepts any key pair.
        AWS_ACCESS_KEY_ID=HEAD_KEY_ID,
        AWS_SECRET_ACCESS_KEY=HEAD_SECRET,
        AWS_DEFAULT_REGION="us-east-1",
    )
    cmd = [
        str(RAY_BIN), "start", "--head", "--node-ip-address=127.0.0.1",
        f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
        "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        f"--runtime-env-agent-port={runtime_env}", f"--min-worker-port={worker_min}",
        f"--max-worker-port={worker_min + WORKER_PORT_WINDOW - 1}",
        "--object-store-memory=300000000", "--disable-usage-stats",
    ]  # fmt: skip
    starter = subprocess.Popen(
        cmd, env=env, cwd=temp_dir, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    head = Head(f"http://127.0.0.1:{dash_port}", temp_dir, starter.pid, token_file)
    try:
        output, _ = starter.communicate(timeout=HEAD_START_TIMEOUT_S)
        assert starter.returncode == 0, output
        _wait_for_jobs_api(head.dashboard, token)
        yield head
    finally:
        if starter.poll() is None:
            starter.kill()
        _stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_api(url: str, token: str) -> None:
    import requests

    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    auth = {"Authorization": f"Bearer {token}"}
    while True:
        try:
            if requests.get(f"{url}/api/version", headers=auth, timeout=5).ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray Jobs API did not answer at {url}")
        time.sleep(1)


def _run_args(s3: dict[str, Any]) -> list[str]:
    args = ["run", "s3://slides/cohort/", "--out", "s3://slides/out", "--endpoint-url", s3["endpoint"]]
    if not SHIPPED_ALL_SUBTYPE.is_file():
        # Until the ALL-subtype classifier ships, run with the WBC-type classifier only.
        args += ["--set", "classifiers=[{name: wbc_type, model: wbc_type}]"]
    return args


def test_submit_run_to_real_head(
    ray_head: Head, s3: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slides = synth_slides(tmp_path / "slides", slides=2, width=1400, height=1100, seed=5, kind="marrow")
    for p in slides:
        s3["fs"].put(str(p), f"slides/cohort/{p.name}")

    code = main(["submit", *ray_head.cli(), "--wait", "--", *_run_args(s3)])
    captured = capsys.readouterr()
    assert code == 0, captured.out[-4000:] + captured.err[-2000:]
    assert "2 committed" in captured.out  # the job's own summary, streamed by --wait

    (job,) = [j for j in list_jobs(**ray_head.api()) if j.get("submission_id")]
    assert job["status"] == "SUCCEEDED"
    assert job["entrypoint"].startswith("python -m batch run s3://slides/cohort/")
    # Code travelled as an uploaded package; no credential and no local environment did.
    runtime_env = job["runtime_env"]
    assert runtime_env["working_dir"].startswith("gcs://")
    assert not any(k.startswith("AWS_") for k in runtime_env.get("env_vars", {}))
    assert set(runtime_env.get("env_vars", {})) <= {"PYTHONUNBUFFERED", "YOLO_OFFLINE"}
    logs = job_logs(job_id=job["submission_id"], **ray_head.api())
    token = ray_head.token_file.read_text()
    for text in (str(job), logs, captured.out, captured.err):
        assert HEAD_SECRET not in text and HEAD_KEY_ID not in text and token not in text

    opts = s3["storage_options"]
    cells = read_table("s3://slides/out", "cells", storage_options=opts).to_pandas()
    ids = {slide_id_for(f"s3://slides/cohort/slide_000{i}.tif") for i in (0, 1)}
    assert set(cells.slide_id.astype(str)) == ids
    assert cells.cell_id.is_unique and len(cells) > 100
    slides_rows = read_table("s3://slides/out", "slides", storage_options=opts).to_pandas()
    assert set(slides_rows.slide_id.astype(str)) == ids
    assert (slides_rows.status == "committed").all()
    assert (slides_rows.tiles_done == slides_rows.tiles_planned - slides_rows.tiles_skipped).all()

    # The CLI's view of the same job.
    assert main(["jobs", "status", *ray_head.cli(), "--json", job["submission_id"]]) == 0
    assert '"status": "SUCCEEDED"' in capsys.readouterr().out


def test_stop_a_running_job(ray_head: Head, capsys: pytest.CaptureFixture[str]) -> None:
    out = ray_head.temp_dir / "stop-synth"
    # A command that runs for minutes: many large synthetic slides.
    code = main([
        "submit", *ray_head.cli(), "--submission-id", "hemaray-e2e-stop", "--",
        "synth", "--out", str(out), "--slides", "50", "--width", "8192", "--height", "8192",
    ])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.strip() == "hemaray-e2e-stop"
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while job_status(job_id="hemaray-e2e-stop", **ray_head.api())["status"] == "PENDING":
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.5)
    assert main(["jobs", "stop", *ray_head.cli(), "hemaray-e2e-stop"]) == 0
    assert "stop requested" in capsys.readouterr().out
    while job_status(job_id="hemaray-e2e-stop", **ray_head.api())["status"] not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < deadline, "job did not stop"
        time.sleep(0.5)
    assert job_status(job_id="hemaray-e2e-stop", **ray_head.api())["status"] == "STOPPED"
    assert main(["jobs", "list", *ray_head.cli()]) == 0
    assert "hemaray-e2e-stop\tSTOPPED" in capsys.readouterr().out


def test_a_token_cluster_refuses_a_client_without_its_token(
    ray_head: Head, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "wrong_token"
    wrong.write_text("not-the-token-" + uuid.uuid4().hex)
    assert main(["jobs", "list", "--address", ray_head.dashboard, "--auth-token-file", str(wrong)]) == 1
    assert "--auth-token-file" in capsys.readouterr().err
