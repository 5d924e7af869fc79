"""``hemaray submit`` and ``hemaray jobs``: the Ray Jobs API from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_commands", "add_cluster_commands"]


def _cmd_submit(args: argparse.Namespace) -> int:
    from batch.cluster.jobs import EXIT_INTERRUPTED
    from batch.cluster.submit import load_runtime_env, parse_env_items, submit_job

    command = list(args.job_argv)
    if command and command[0] == "--":
        command = command[1:]
    try:
        job = submit_job(
            args.address,
            command,
            runtime_env=load_runtime_env(args.runtime_env),
            wait=args.wait,
            ship_code=not args.no_code,
            env_vars=parse_env_items(args.env),
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
    import time

    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ms) / 1000))


def _cmd_jobs(args: argparse.Namespace) -> int:
    from batch.cluster.jobs import job_logs, job_status, list_jobs, stop_job

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


def add_commands(subparsers: Any) -> None:
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
    jl = actions.add_parser(
        "list", parents=[conn], help="every job: id, status, start, end, command"
    )
    jl.add_argument("--json", action="store_true", help="print one JSON list")
    js = actions.add_parser(
        "status", parents=[conn], help="one job's status, message and exit code"
    )
    js.add_argument("job_id", help="the job's submission id")
    js.add_argument("--json", action="store_true", help="print one JSON object")
    jg = actions.add_parser("logs", parents=[conn], help="one job's logs")
    jg.add_argument("job_id", help="the job's submission id")
    jg.add_argument("--follow", action="store_true", help="stream until the job ends")
    jt = actions.add_parser("stop", parents=[conn], help="stop a running job")
    jt.add_argument("job_id", help="the job's submission id")
    j.set_defaults(func=_cmd_jobs)


#: The name the cluster tests and older callers use.
add_cluster_commands = add_commands
