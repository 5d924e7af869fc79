"""Send hemaray commands to a Ray cluster as Ray jobs (the Jobs API) and manage them.

``hemaray submit --address http://HEAD:8265 [--wait] -- run s3://in/ --out s3://out/``
runs ``python -m batch run s3://in/ --out s3://out/`` as a Ray job on the cluster.
A job script of the project runs the same way: ``-- jobs/sweep_detector.py --data ...``
becomes ``python jobs/sweep_detector.py --data ...``.

What travels with a job, and what never does:

- the code: the project folder as the runtime environment's ``working_dir``
  (``.venv``, ``.git``, caches, outputs, tests and files over
  ``MAX_SHIPPED_FILE_BYTES`` are excluded); with ``--no-code`` nothing is
  uploaded and the cluster image's installed hemaray runs (``k8s/Dockerfile``).
  Either way the cluster's Python must already have hemaray's dependencies
  (the image has; a head started from this project's ``.venv`` has too).
- a ``--config FILE`` inside the project travels with the code; a config file
  elsewhere on this machine is refused (it would not exist on the cluster).
- environment: only the variables named with ``--env`` or in the
  ``--runtime-env`` file, minus anything that looks like a credential. The
  local environment is never copied.
- credentials: never. Object-storage credentials reach the job from the
  cluster side (a Kubernetes Secret as environment of every Ray pod, or the
  environment of the ``ray start`` that started the head). A submission whose
  command line contains the value of a local secret variable is refused.
- a non-secret S3 endpoint travels as the command's own ``--endpoint-url``.
- the cluster's Ray auth token (clusters with ``RAY_AUTH_MODE=token``, as
  ``k8s/`` sets up) is read from ``--auth-token-file`` and sent as an HTTP
  header of the Jobs API requests; it is not part of the job either.

``--address`` wins over ``$RAY_ADDRESS`` / ``$RAY_API_SERVER_ADDRESS`` (Ray's
client would otherwise silently prefer the environment); without
``--address`` those variables are used.

Exit codes of ``hemaray submit --wait``: the job's driver exit code when the
job ran and failed (so ``hemaray run``'s 2 for a partial run comes through),
``EXIT_JOB_FAILED`` when it failed without one, ``EXIT_JOB_STOPPED`` when it
was stopped, 0 when it succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from batch.errors import HemarayError

__all__ = [
    "DEFAULT_EXCLUDES",
    "EXIT_INTERRUPTED",
    "EXIT_JOB_FAILED",
    "EXIT_JOB_STOPPED",
    "JOB_ENV_DEFAULTS",
    "MAX_SHIPPED_FILE_BYTES",
    "SECRET_ENV_PATTERN",
    "JobClient",
    "SubmitError",
    "SubmittedJob",
    "add_cluster_commands",
    "build_entrypoint",
    "build_runtime_env",
    "exit_code_for",
    "find_project_root",
    "job_logs",
    "job_status",
    "list_jobs",
    "refuse_secret_values",
    "stop_job",
    "strip_secret_env",
    "submit_job",
    "wait_for_job",
]

log = logging.getLogger(__name__)

#: ``--wait`` exit code of a job that failed without a driver exit code (e.g. never started).
EXIT_JOB_FAILED = 1
#: ``--wait`` exit code of a job stopped with ``hemaray jobs stop``.
EXIT_JOB_STOPPED = 3
#: ``--wait`` exit code when the user interrupts the wait (the job keeps running).
EXIT_INTERRUPTED = 130
#: Files larger than this are not uploaded with the code (data belongs in object storage).
MAX_SHIPPED_FILE_BYTES = 25 * 1024 * 1024
#: gitignore-style patterns (relative to the project root) never shipped as code.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".venv/",
    ".git/",
    "__pycache__/",
    "*.pyc",
    ".mypy_cache/",
    ".ruff_cache/",
    ".pytest_cache/",
    ".cache/",
    "*.egg-info/",
    "demo-out/",
    "runs/",
    "/out/",
    "/tmp/",
    "tests/",
    "k8s/",
)
#: Folders the large-file scan does not enter (already excluded above).
_SKIP_DIRS = frozenset(
    {".venv", ".git", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".cache",
     "demo-out", "runs", "tests", "k8s"}
)  # fmt: skip
#: Environment variable names that carry credentials: never shipped with a job.
SECRET_ENV_PATTERN = re.compile(
    r"^AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN|SECURITY_TOKEN)$"
    r"|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|API_KEY|ACCESS_KEY",
    re.IGNORECASE,
)
#: Local secret values shorter than this are not searched for in the command line
#: (too likely to match by accident, e.g. moto's "testing").
MIN_SECRET_VALUE_CHARS = 12
#: Environment every job gets unless the user sets it: unbuffered logs, no downloads.
JOB_ENV_DEFAULTS: dict[str, str] = {"PYTHONUNBUFFERED": "1", "YOLO_OFFLINE": "1"}
#: Environment variables that would silently override ``--address`` inside Ray's client.
_ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
#: Seconds to wait for a terminal status after the log stream ended.
STATUS_SETTLE_S = 30.0
STATUS_POLL_S = 0.5


class SubmitError(HemarayError):
    """A job could not be built, submitted or followed; the message says what to change."""


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


@dataclass
class SubmittedJob:
    """A submitted job; ``status`` and ``exit_code`` are set when it was waited for."""

    job_id: str
    address: str
    entrypoint: str
    status: str | None = None
    exit_code: int | None = None


# --------------------------------------------------------------------------- building


def find_project_root(start: Path | None = None) -> Path:
    """The project folder that holds this ``batch`` package and ``pyproject.toml``.

    Raises
    ------
    SubmitError
        When hemaray runs from an installed package rather than a checkout.
    """
    root = (start or Path(__file__).resolve().parent.parent).resolve()
    if not (root / "pyproject.toml").is_file() or not (root / "batch").is_dir():
        raise SubmitError(
            f"cannot ship code: {root} is not a hemaray project folder (no pyproject.toml "
            "and batch/); run from a checkout, or pass --no-code to run the hemaray "
            "installed in the cluster image"
        )
    return root


def _large_files(root: Path, limit: int) -> list[str]:
    """Project-relative paths of files over ``limit`` bytes outside the excluded folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")
        ]
        for name in filenames:
            path = Path(dirpath) / name
            with contextlib.suppress(OSError):
                if path.stat().st_size > limit:
                    found.append(path.relative_to(root).as_posix())
    return sorted(found)


def strip_secret_env(env_vars: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Drop credential-looking variables from a job's ``env_vars``.

    Returns
    -------
    (kept, dropped)
        The variables that may travel, and the names that were removed.
    """
    kept: dict[str, str] = {}
    dropped: list[str] = []
    for name, value in env_vars.items():
        if SECRET_ENV_PATTERN.search(str(name)):
            dropped.append(str(name))
        else:
            kept[str(name)] = str(value)
    return kept, sorted(dropped)


def refuse_secret_values(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> None:
    """Refuse a command line that contains the value of a local secret variable.

    The entrypoint is stored by the cluster and shown in its dashboard and
    logs, so a credential typed into it would leak.

    Raises
    ------
    SubmitError
        Naming the variable (never its value).
    """
    env = os.environ if environ is None else environ
    secrets = {
        name: value
        for name, value in env.items()
        if SECRET_ENV_PATTERN.search(name) and len(value) >= MIN_SECRET_VALUE_CHARS
    }
    for i, arg in enumerate(argv):
        for name, value in secrets.items():
            if value in arg:
                raise SubmitError(
                    f"argument {i + 1} of the command contains the value of ${name}; "
                    "credentials never travel with a job: give them to the cluster "
                    "(a Kubernetes Secret as environment of the Ray pods)"
                )


def build_runtime_env(
    *,
    ship_code: bool = True,
    project_dir: Path | None = None,
    user_env: Mapping[str, Any] | None = None,
    env_vars: Mapping[str, str] | None = None,
    max_file_bytes: int = MAX_SHIPPED_FILE_BYTES,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The runtime environment of a hemaray job.

    Parameters
    ----------
    ship_code
        Upload the project folder as ``working_dir`` (default); False runs the
        hemaray installed on the cluster.
    project_dir
        The folder to ship; default: the checkout this package lives in.
    user_env
        A runtime environment of the user's (``--runtime-env FILE``); its keys
        win over ours, except that secret ``env_vars`` are removed.
    env_vars
        Extra variables (``--env KEY=VALUE``); secrets are removed too.
    max_file_bytes
        Files above this size are excluded from the upload (and reported).
    warn
        Called with each warning message; default: ``logging`` and stderr.

    Returns
    -------
    dict
        A runtime environment for ``JobSubmissionClient.submit_job``. It
        never contains the local environment or credentials.
    """
    say = warn or _warn
    runtime: dict[str, Any] = {}
    if ship_code:
        root = find_project_root(project_dir)
        excludes = list(DEFAULT_EXCLUDES)
        big = _large_files(root, max_file_bytes)
        if big:
            say(
                f"not shipping {len(big)} file(s) over {max_file_bytes // (1024 * 1024)} MiB "
                f"with the code: {', '.join(big)} (put data in object storage)"
            )
            excludes += ["/" + p for p in big]
        runtime = {"working_dir": str(root), "excludes": excludes}
    user = dict(user_env or {})
    user_vars = dict(user.pop("env_vars", None) or {})
    runtime.update(user)
    merged = {**JOB_ENV_DEFAULTS, **user_vars, **dict(env_vars or {})}
    kept, dropped = strip_secret_env(merged)
    if dropped:
        say(
            f"removed {', '.join(dropped)} from the job's env_vars: credentials never travel "
            "with a job; the cluster provides them (Kubernetes Secret)"
        )
    runtime["env_vars"] = kept
    return runtime


def _warn(message: str) -> None:
    log.warning(message)
    print(f"hemaray submit: warning: {message}", file=sys.stderr)


def _config_arg(argv: list[str], root: Path | None) -> list[str]:
    """Make a ``--config FILE`` argument valid on the cluster (relative to the shipped code)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            j, value = i + 1, out[i + 1]
        elif arg.startswith("--config="):
            j, value = i, arg.split("=", 1)[1]
        else:
            continue
        path = Path(value).expanduser()
        if "://" in value or not path.exists():
            continue  # a path on the cluster (e.g. a mounted ConfigMap) or a URL
        resolved = path.resolve()
        if root is not None and resolved.is_relative_to(root):
            rel = resolved.relative_to(root).as_posix()
            out[j] = rel if j == i + 1 else f"--config={rel}"
            continue
        raise SubmitError(
            f"--config {value} is a file on this machine outside the shipped project "
            f"({root or 'no code is shipped'}); copy it into the project folder, or mount "
            "it on the cluster and pass the cluster path"
        )
    return out


def build_entrypoint(argv: Sequence[str]) -> str:
    """The shell command a job runs for a hemaray command line.

    ``["run", "s3://a/", "--out", "s3://b/"]`` gives ``python -m batch run s3://a/ --out s3://b/``;
    a first argument ending in ``.py`` (a job script such as ``jobs/sweep_detector.py``)
    gives ``python jobs/sweep_detector.py ...``. Every argument is shell-quoted.
    """
    args = list(argv)
    if not args:
        raise SubmitError("nothing to submit: give a hemaray command after --, e.g. -- run ...")
    if args[0].endswith(".py"):
        script = Path(args[0])
        if script.is_absolute() or ".." in script.parts:
            raise SubmitError(
                f"job script {args[0]} must be a path inside the project, e.g. jobs/sweep_detector.py"
            )
        return shlex.join(["python", script.as_posix(), *args[1:]])
    return shlex.join(["python", "-m", "batch", *args])


# --------------------------------------------------------------------------- client


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


def _client(address: str | None, auth_token_file: str | Path | None = None) -> JobClient:
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


def submit_job(
    address: str | None,
    argv: Sequence[str],
    *,
    runtime_env: Mapping[str, Any] | None = None,
    wait: bool = False,
    ship_code: bool = True,
    env_vars: Mapping[str, str] | None = None,
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    project_dir: Path | None = None,
    auth_token_file: str | Path | None = None,
    client: JobClient | None = None,
    out: TextIO | None = None,
) -> SubmittedJob:
    """Submit a hemaray command line as a Ray job; optionally wait for it.

    Parameters
    ----------
    address
        The Ray dashboard URL (``http://HEAD:8265``); None: ``$RAY_API_SERVER_ADDRESS``
        or ``$RAY_ADDRESS``.
    argv
        The hemaray command (``["run", "s3://...", "--out", "s3://..."]``) or a
        job script and its arguments (``["jobs/sweep_detector.py", ...]``).
    runtime_env
        The user's runtime environment (merged, secrets removed; see ``build_runtime_env``).
    wait
        Stream the job's logs to ``out`` and fill in ``status`` and ``exit_code``.
    ship_code
        Upload the project as ``working_dir``; False runs the cluster's installed hemaray.
    env_vars
        Extra, non-secret environment for the job.
    submission_id
        The job id to use (must be new on the cluster); default: Ray picks one.
    entrypoint_num_cpus, entrypoint_num_gpus
        Resources reserved for the driver (e.g. 1 GPU for a training script
        that trains in the driver); default none, so the driver fits on a CPU-only head.
    project_dir
        The project folder to ship (default: this checkout).
    auth_token_file
        A file holding the cluster's Ray auth token (clusters with ``RAY_AUTH_MODE=token``);
        sent as an HTTP header, never in the job.
    client
        A Jobs API client (tests); default: ``JobSubmissionClient(address)``.
    out
        Where streamed logs go (default stdout).

    Raises
    ------
    SubmitError
        Bad command line, a secret in it, a config file that would not reach
        the cluster, or an unreachable cluster.
    """
    args = list(argv)
    refuse_secret_values(args)
    env = build_runtime_env(
        ship_code=ship_code, project_dir=project_dir, user_env=runtime_env, env_vars=env_vars
    )
    root = Path(env["working_dir"]) if "working_dir" in env else None
    args = _config_arg(args, root)
    entrypoint = build_entrypoint(args)
    if root is None and args[0].endswith(".py"):
        raise SubmitError(
            f"job script {args[0]} travels with the code: drop --no-code, or run a hemaray "
            "command (python -m batch ...) from the cluster image"
        )
    if root is not None and args[0].endswith(".py") and not (root / args[0]).is_file():
        raise SubmitError(f"job script {args[0]} is not in the shipped project {root}")
    jc = client or _client(address, auth_token_file)
    from batch import __version__

    try:
        job_id = jc.submit_job(
            entrypoint=entrypoint,
            runtime_env=env,
            metadata={"hemaray_version": __version__, "hemaray_command": args[0]},
            submission_id=submission_id or None,
            entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_num_gpus=entrypoint_num_gpus,
        )
    except (ConnectionError, RuntimeError) as e:
        raise SubmitError(f"the cluster refused the job: {e}") from e
    job = SubmittedJob(job_id=job_id, address=str(address), entrypoint=entrypoint)
    if wait:
        print(
            f"hemaray submit: job {job_id} submitted; following its logs "
            "(Ctrl-C stops following, not the job)",
            file=sys.stderr,
        )
        job.status, job.exit_code = wait_for_job(jc, job_id, out=out)
    return job


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
    jobs = [_details(j) for j in (client or _client(address, auth_token_file)).list_jobs()]
    return sorted(jobs, key=lambda j: j.get("start_time") or 0)


def job_status(
    address: str | None,
    job_id: str,
    *,
    auth_token_file: str | Path | None = None,
    client: JobClient | None = None,
) -> dict[str, Any]:
    """One job's details: status, message, entrypoint, start/end, driver exit code."""
    return _details((client or _client(address, auth_token_file)).get_job_info(job_id))


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
    jc = client or _client(address, auth_token_file)
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
    return bool((client or _client(address, auth_token_file)).stop_job(job_id))


# --------------------------------------------------------------------------- CLI


def _load_runtime_env(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SubmitError(f"--runtime-env {path}: cannot read a YAML/JSON mapping: {e}") from e
    if not isinstance(data, dict):
        raise SubmitError(f"--runtime-env {path}: expected a mapping, got {type(data).__name__}")
    return data


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SubmitError(f"--env expects KEY=VALUE, got {item!r}")
        env[name] = value
    return env


def _cmd_submit(args: argparse.Namespace) -> int:
    command = list(args.job_argv)
    if command and command[0] == "--":
        command = command[1:]
    try:
        job = submit_job(
            args.address,
            command,
            runtime_env=_load_runtime_env(args.runtime_env),
            wait=args.wait,
            ship_code=not args.no_code,
            env_vars=_parse_env(args.env),
            submission_id=args.submission_id,
            entrypoint_num_cpus=args.entrypoint_num_cpus,
            entrypoint_num_gpus=args.entrypoint_num_gpus,
            auth_token_file=args.auth_token_file,
        )
    except KeyboardInterrupt:
        print(
            "hemaray submit: stopped following; the job keeps running "
            "(hemaray jobs status / logs / stop)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(f"hemaray submit: job {job.job_id}: {job.entrypoint}", file=sys.stderr)
    if not args.wait:
        print(job.job_id)
        return 0
    print(f"hemaray submit: job {job.job_id} {job.status} (exit {job.exit_code})", file=sys.stderr)
    return int(job.exit_code or 0)


def _fmt_time(ms: Any) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ms) / 1000))


def _cmd_jobs(args: argparse.Namespace) -> int:
    action = args.action
    auth = {"auth_token_file": args.auth_token_file}
    if action == "list":
        jobs = list_jobs(args.address, **auth)
        if args.json:
            print(json.dumps(jobs, default=str))
            return 0
        for j in jobs:
            jid = j.get("submission_id") or j.get("job_id")
            print(
                f"{jid}\t{j['status']}\t{_fmt_time(j.get('start_time'))}\t"
                f"{_fmt_time(j.get('end_time'))}\t{j.get('entrypoint', '')}"
            )
        return 0
    if action == "status":
        details = job_status(args.address, args.job_id, **auth)
        if args.json:
            print(json.dumps(details, default=str))
        else:
            for key in ("submission_id", "status", "message", "entrypoint", "driver_exit_code"):
                print(f"{key:>16}: {details.get(key)}")
            print(f"{'start':>16}: {_fmt_time(details.get('start_time'))}")
            print(f"{'end':>16}: {_fmt_time(details.get('end_time'))}")
        return 0
    if action == "logs":
        text = job_logs(args.address, args.job_id, follow=args.follow, **auth)
        sys.stdout.write(text)
        return 0
    stopped = stop_job(args.address, args.job_id, **auth)
    print(f"job {args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


SUBMIT_EPILOG = """\
examples:
  hemaray submit --address http://127.0.0.1:8265 -- run s3://slides/cohort/ --out s3://results/cohort \\
      --endpoint-url http://minio:9000
  hemaray submit --address http://127.0.0.1:8265 --wait -- jobs/sweep_detector.py --data s3://det/bccd \\
      --out s3://results/sweep --sizes n,s --epochs 30
  hemaray jobs logs --address http://127.0.0.1:8265 --follow raysubmit_XXXX

Everything after -- is the command the job runs (python -m batch ARGS, or python SCRIPT.py ARGS).
The project folder is uploaded as the job's working_dir (no .venv, .git, caches, outputs, tests,
files over 25 MiB); --no-code runs the hemaray installed in the cluster image instead. The
cluster's Python must have hemaray's dependencies (k8s/Dockerfile). Credentials never travel with
a job: the cluster gives them to its pods (k8s/secret.example.yaml); secret-looking variables are
removed from --env and --runtime-env, and a command line holding a local secret is refused.
A cluster with Ray token authentication (RAY_AUTH_MODE=token, as k8s/ sets up) needs
--auth-token-file FILE; the token goes in an HTTP header, never into the job.
With --wait the exit code is the job's: 0 succeeded, the driver's exit code if it failed
(hemaray run: 2 = some slides failed), 1 failed otherwise, 3 stopped."""


def add_cluster_commands(subparsers: Any) -> None:
    """Register ``submit`` and ``jobs`` on the ``hemaray`` command's subparsers."""
    auth_help = "file with the cluster's Ray auth token (clusters run with RAY_AUTH_MODE=token)"
    address_help = "Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)"
    s = subparsers.add_parser(
        "submit",
        help="run a hemaray command or job script on a Ray cluster (Ray Jobs API)",
        description="Submit a hemaray command (run, a jobs/ script, ...) to a Ray cluster as a Ray job.",
        epilog=SUBMIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="hemaray submit [--address URL] [--wait] [--runtime-env FILE] [options] -- COMMAND ...",
    )
    s.add_argument("--address", help=address_help)
    s.add_argument("--auth-token-file", metavar="FILE", help=auth_help)
    s.add_argument(
        "--wait", action="store_true", help="stream the job's logs; exit with the job's outcome"
    )
    s.add_argument(
        "--runtime-env",
        metavar="FILE",
        help="YAML/JSON Ray runtime environment merged into hemaray's (secret env_vars removed)",
    )
    s.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a non-secret environment variable for the job (repeatable)",
    )
    s.add_argument(
        "--no-code",
        action="store_true",
        help="upload nothing: run the hemaray installed on the cluster (the k8s image)",
    )
    s.add_argument("--submission-id", help="job id to use (default: chosen by Ray)")
    s.add_argument(
        "--entrypoint-num-cpus", type=float, help="CPUs reserved for the job's driver (default 0)"
    )
    s.add_argument(
        "--entrypoint-num-gpus",
        type=float,
        help="GPUs reserved for the driver (a training script that trains in its driver)",
    )
    s.add_argument(
        "job_argv",
        nargs=argparse.REMAINDER,
        metavar="COMMAND",
        help="after --: a hemaray command (run ...) or a job script (jobs/NAME.py ...)",
    )
    s.set_defaults(func=_cmd_submit)

    j = subparsers.add_parser(
        "jobs",
        help="list, inspect, follow or stop Ray jobs on a cluster",
        description="Manage Ray jobs on a cluster through its Jobs API.",
        epilog="examples:\n  hemaray jobs list --address http://127.0.0.1:8265\n"
        "  hemaray jobs status --address http://127.0.0.1:8265 raysubmit_XXXX\n"
        "  hemaray jobs logs --address http://127.0.0.1:8265 --follow raysubmit_XXXX\n"
        "  hemaray jobs stop --address http://127.0.0.1:8265 raysubmit_XXXX",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--address", help=address_help)
    conn.add_argument("--auth-token-file", metavar="FILE", help=auth_help)
    actions = j.add_subparsers(dest="action", required=True, metavar="{list,status,logs,stop}")
    jl = actions.add_parser("list", parents=[conn], help="every job: id, status, start, end, command")
    jl.add_argument("--json", action="store_true", help="print one JSON list")
    js = actions.add_parser("status", parents=[conn], help="one job's status, message and exit code")
    js.add_argument("job_id", help="the job's submission id")
    js.add_argument("--json", action="store_true", help="print one JSON object")
    jg = actions.add_parser("logs", parents=[conn], help="one job's logs")
    jg.add_argument("job_id", help="the job's submission id")
    jg.add_argument("--follow", action="store_true", help="stream until the job ends")
    jt = actions.add_parser("stop", parents=[conn], help="stop a running job")
    jt.add_argument("job_id", help="the job's submission id")
    j.set_defaults(func=_cmd_jobs)
