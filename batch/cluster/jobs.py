"""Follow and manage Ray jobs on a cluster through its Jobs API: connect, wait, list, status, logs, stop.

``--address`` wins over ``$RAY_ADDRESS`` / ``$RAY_API_SERVER_ADDRESS`` (Ray's
client would otherwise silently prefer the environment); without
``--address`` those variables are used. A cluster with Ray token
authentication gets its token from ``--auth-token-file`` as an HTTP header.

Exit codes of ``hemaray submit --wait``: the job's driver exit code when the
job ran and failed (so ``hemaray run``'s 2 for a partial run comes through),
``EXIT_JOB_FAILED`` when it failed without one, ``EXIT_JOB_STOPPED`` when it
was stopped, 0 when it succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Protocol, TextIO

from batch.errors import SubmitError

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_JOB_FAILED",
    "EXIT_JOB_STOPPED",
    "JobClient",
    "connect",
    "exit_code_for",
    "job_logs",
    "job_status",
    "list_jobs",
    "stop_job",
    "wait_for_job",
]

#: ``--wait`` exit code of a job that failed without a driver exit code (e.g. never started).
EXIT_JOB_FAILED = 1
#: ``--wait`` exit code of a job stopped with ``hemaray jobs stop``.
EXIT_JOB_STOPPED = 3
#: ``--wait`` exit code when the user interrupts the wait (the job keeps running).
EXIT_INTERRUPTED = 130
#: Environment variables that would silently override ``--address`` inside Ray's client.
_ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
#: Seconds to wait for a terminal status after the log stream ended.
STATUS_SETTLE_S = 30.0
STATUS_POLL_S = 0.5


class JobClient(Protocol):
    """The part of ``ray.job_submission.JobSubmissionClient`` hemaray uses."""

    def submit_job(
        self,
        *,
        entrypoint: str,
        runtime_env: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        submission_id: str | None = None,
        entrypoint_num_cpus: int | float | None = None,
        entrypoint_num_gpus: int | float | None = None,
    ) -> str: ...

    def list_jobs(self) -> list[Any]: ...

    def get_job_status(self, job_id: str) -> Any: ...

    def get_job_info(self, job_id: str) -> Any: ...

    def get_job_logs(self, job_id: str) -> str: ...

    def tail_job_logs(self, job_id: str) -> AsyncIterator[str]: ...

    def stop_job(self, job_id: str) -> bool: ...


@contextlib.contextmanager
def _address_env_cleared() -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS override the address it is given; an explicit one must win."""
    saved = {k: os.environ.pop(k) for k in _ADDRESS_ENV_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _auth_headers(auth_token_file: str | Path | None) -> dict[str, str] | None:
    """The Authorization header for a cluster with Ray token authentication, from a file."""
    if auth_token_file is None:
        return None
    try:
        token = Path(auth_token_file).expanduser().read_text().strip()
    except OSError as e:
        raise SubmitError(f"--auth-token-file {auth_token_file}: cannot read it: {e}") from e
    if not token:
        raise SubmitError(f"--auth-token-file {auth_token_file} is empty")
    return {"Authorization": f"Bearer {token}"}


def connect(address: str | None, auth_token_file: str | Path | None = None) -> JobClient:
    from ray.job_submission import JobSubmissionClient

    resolved = address or next((os.environ[k] for k in _ADDRESS_ENV_VARS if os.environ.get(k)), None)
    if not resolved:
        raise SubmitError(
            "no cluster address: pass --address http://HEAD:8265 (the Ray dashboard; on "
            "Kubernetes: kubectl port-forward svc/hemaray-head-svc 8265:8265)"
        )
    try:
        with _address_env_cleared():
            client: JobClient = JobSubmissionClient(resolved, headers=_auth_headers(auth_token_file))
    except SubmitError:
        raise
    except Exception as e:  # requests / aiohttp / Ray raise several types for the same cases
        hint = (
            "the cluster uses Ray token authentication: pass --auth-token-file FILE (the "
            "cluster's token, e.g. from its Kubernetes Secret), or set RAY_AUTH_MODE=token "
            "and RAY_AUTH_TOKEN_PATH"
            if any(word in str(e) for word in ("401", "403", "uthenticat", "Unauthorized"))
            else "check the dashboard address and port (default 8265) and that the head runs ray[default]"
        )
        raise SubmitError(f"cannot use the Ray Jobs API at {resolved}: {e}; {hint}") from e
    return client


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


def exit_code_for(status: Any, driver_exit_code: int | None) -> int:
    """The exit code ``hemaray submit --wait`` returns for a finished job."""
    name = _status_name(status)
    if name == "SUCCEEDED":
        return 0
    if name == "STOPPED":
        return EXIT_JOB_STOPPED
    if driver_exit_code:
        return int(driver_exit_code)
    return EXIT_JOB_FAILED


async def _stream_logs(client: JobClient, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def wait_for_job(
    client: JobClient, job_id: str, *, out: TextIO | None = None, settle_s: float = STATUS_SETTLE_S
) -> tuple[str, int]:
    """Stream a job's logs to ``out`` until it ends; return its status and exit code."""
    stream = out or sys.stdout
    asyncio.run(_stream_logs(client, job_id, stream))
    # The log stream closes when the driver exits; the status may lag a moment behind.
    deadline = time.monotonic() + settle_s
    while True:
        info = client.get_job_info(job_id)
        status = _status_name(info.status)
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            break
        time.sleep(STATUS_POLL_S)
    code = exit_code_for(status, getattr(info, "driver_exit_code", None))
    return status, code


def _details(info: Any) -> dict[str, Any]:
    """A JobDetails as plain JSON-able data (times as epoch milliseconds, as Ray gives them)."""
    if hasattr(info, "model_dump"):
        data = info.model_dump()
    elif hasattr(info, "dict"):
        data = info.dict()
    else:
        data = dict(vars(info))
    data["status"] = _status_name(data.get("status"))
    data.pop("driver_info", None)
    return data


def list_jobs(
    address: str | None,
    *,
    auth_token_file: str | Path | None = None,
    client: JobClient | None = None,
) -> list[dict[str, Any]]:
    """Every job the cluster knows, oldest first, as dicts (``submission_id``, ``status``, ...)."""
    jobs = [_details(j) for j in (client or connect(address, auth_token_file)).list_jobs()]
    return sorted(jobs, key=lambda j: j.get("start_time") or 0)


def job_status(
    address: str | None,
    job_id: str,
    *,
    auth_token_file: str | Path | None = None,
    client: JobClient | None = None,
) -> dict[str, Any]:
    """One job's details: status, message, entrypoint, start/end, driver exit code."""
    return _details((client or connect(address, auth_token_file)).get_job_info(job_id))


def job_logs(
    address: str | None,
    job_id: str,
    *,
    follow: bool = False,
    auth_token_file: str | Path | None = None,
    client: JobClient | None = None,
    out: TextIO | None = None,
) -> str:
    """A job's logs so far; with ``follow``, stream them to ``out`` until the job ends."""
    jc = client or connect(address, auth_token_file)
    if follow:
        wait_for_job(jc, job_id, out=out)
        return ""
    return jc.get_job_logs(job_id)


def stop_job(
    address: str | None,
    job_id: str,
    *,
    auth_token_file: str | Path | None = None,
    client: JobClient | None = None,
) -> bool:
    """Ask the cluster to stop a job; False when it had already ended."""
    return bool((client or connect(address, auth_token_file)).stop_job(job_id))


