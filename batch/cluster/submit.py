"""Build and submit a hemaray command as a Ray job (the Jobs API): what travels with it and what never does.

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

Following and managing jobs (status, logs, stop, exit codes) is
`batch.cluster.jobs`; the ``submit`` / ``jobs`` command lines are in `batch.cli`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from batch.cluster import jobs
from batch.cluster.jobs import JobClient, wait_for_job
from batch.errors import SubmitError

__all__ = [
    "DEFAULT_EXCLUDES",
    "JOB_ENV_DEFAULTS",
    "MAX_SHIPPED_FILE_BYTES",
    "SECRET_ENV_PATTERN",
    "SubmittedJob",
    "build_entrypoint",
    "build_runtime_env",
    "find_project_root",
    "load_runtime_env",
    "parse_env_items",
    "refuse_secret_values",
    "strip_secret_env",
    "submit_job",
]

log = logging.getLogger(__name__)

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
    root = (start or Path(__file__).resolve().parents[2]).resolve()
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
    jc = client or jobs.connect(address, auth_token_file)
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


def load_runtime_env(path: str | None) -> dict[str, Any] | None:
    """The ``--runtime-env`` file (YAML or JSON mapping); None without one."""
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


def parse_env_items(items: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` items (``--env``) as a mapping."""
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SubmitError(f"--env expects KEY=VALUE, got {item!r}")
        env[name] = value
    return env
