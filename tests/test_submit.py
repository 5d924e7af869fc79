"""``hemaray submit`` / ``hemaray jobs`` without a cluster: runtime env, secrets, entrypoints, parsing.

The Jobs API client is replaced by a recording fake; ``tests/test_cluster_e2e.py``
runs the same code against a real Ray head.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from batch.cli import add_cluster_commands
from batch.cluster.jobs import EXIT_JOB_FAILED, EXIT_JOB_STOPPED, connect, exit_code_for
from batch.cluster.submit import (
    DEFAULT_EXCLUDES,
    JOB_ENV_DEFAULTS,
    build_entrypoint,
    build_runtime_env,
    find_project_root,
    refuse_secret_values,
    strip_secret_env,
    submit_job,
)
from batch.errors import SubmitError

REPO = Path(__file__).resolve().parents[1]
LOCAL_SECRET = "local-secret-value-0123456789"


class FakeClient:
    """Records what would be sent to the Jobs API; plays back a finished job."""

    def __init__(self, status: str = "SUCCEEDED", driver_exit_code: int | None = 0) -> None:
        self.submitted: list[dict[str, Any]] = []
        self.status = status
        self.driver_exit_code = driver_exit_code

    def submit_job(self, **kwargs: Any) -> str:
        self.submitted.append(kwargs)
        return kwargs.get("submission_id") or "raysubmit_fake"

    def list_jobs(self) -> list[Any]:
        return [self.get_job_info("raysubmit_fake")]

    def get_job_status(self, job_id: str) -> Any:
        return self.status

    def get_job_info(self, job_id: str) -> Any:
        return SimpleNamespace(
            submission_id=job_id, status=self.status, driver_exit_code=self.driver_exit_code,
            entrypoint="python -m batch run x", message="", start_time=1, end_time=2,
        )  # fmt: skip

    def get_job_logs(self, job_id: str) -> str:
        return "line 1\nline 2\n"

    async def tail_job_logs(self, job_id: str) -> AsyncIterator[str]:
        for chunk in ("line 1\n", "line 2\n"):
            yield chunk

    def stop_job(self, job_id: str) -> bool:
        return True


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A minimal project folder: pyproject, batch/, jobs/, a config, one oversized data file."""
    root = tmp_path / "proj"
    (root / "batch").mkdir(parents=True)
    (root / "batch" / "__init__.py").write_text("")
    (root / "jobs").mkdir()
    (root / "jobs" / "process_slides.py").write_text("")
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (root / "cfg.yaml").write_text("detect: {batch_size: 4}\n")
    (root / "data").mkdir()
    (root / "data" / "big.bin").write_bytes(b"\0" * 2048)
    (root / ".venv" / "lib").mkdir(parents=True)
    (root / ".venv" / "lib" / "huge.so").write_bytes(b"\0" * 4096)  # excluded folder: not scanned
    return root


def test_the_checkout_is_a_project() -> None:
    assert find_project_root() == REPO
    with pytest.raises(SubmitError, match="--no-code"):
        find_project_root(REPO / "batch")


def test_runtime_env_ships_code_without_local_environment(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", LOCAL_SECRET)
    monkeypatch.setenv("SOME_LOCAL_SETTING", "1")
    warnings: list[str] = []
    env = build_runtime_env(project_dir=project, max_file_bytes=1024, warn=warnings.append)
    assert env["working_dir"] == str(project)
    assert env["excludes"] == [*DEFAULT_EXCLUDES, "/data/big.bin"]
    assert {".venv/", ".git/", "tests/", "demo-out/"} <= set(env["excludes"])
    assert env["env_vars"] == JOB_ENV_DEFAULTS  # nothing from os.environ
    assert warnings == [
        "not shipping 1 file(s) over 0 MiB with the code: data/big.bin (put data in object storage)"
    ]
    assert "working_dir" not in build_runtime_env(ship_code=False)


def test_secrets_are_stripped_with_a_warning_naming_them(project: Path) -> None:
    user_env = {
        "pip": ["duckdb"],
        "env_vars": {
            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": LOCAL_SECRET,
            "AWS_SESSION_TOKEN": "tok", "RAY_AUTH_TOKEN": "tok2", "MINIO_PASSWORD": "pw",
            "AWS_DEFAULT_REGION": "eu-west-1", "HEMARAY_S3_ENDPOINT": "http://minio:9000",
        },
    }  # fmt: skip
    warnings: list[str] = []
    env = build_runtime_env(
        project_dir=project, user_env=user_env, env_vars={"GITHUB_TOKEN": "t", "OMP_NUM_THREADS": "2"},
        warn=warnings.append,
    )  # fmt: skip
    assert env["pip"] == ["duckdb"]
    assert env["env_vars"] == {
        **JOB_ENV_DEFAULTS, "AWS_DEFAULT_REGION": "eu-west-1",
        "HEMARAY_S3_ENDPOINT": "http://minio:9000", "OMP_NUM_THREADS": "2",
    }  # fmt: skip
    (warning,) = [w for w in warnings if "env_vars" in w]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN",
                 "MINIO_PASSWORD", "GITHUB_TOKEN"):  # fmt: skip
        assert name in warning
    assert LOCAL_SECRET not in warning and "AKIAEXAMPLE" not in warning


def test_strip_secret_env_keeps_plain_settings() -> None:
    kept, dropped = strip_secret_env({"AWS_REGION": "x", "AWS_SECURITY_TOKEN": "y", "PATH": "/bin"})
    assert kept == {"AWS_REGION": "x", "PATH": "/bin"} and dropped == ["AWS_SECURITY_TOKEN"]


def test_a_command_line_with_a_local_secret_is_refused() -> None:
    env = {"AWS_SECRET_ACCESS_KEY": LOCAL_SECRET, "AWS_ACCESS_KEY_ID": "testing", "HOME": "/root"}
    with pytest.raises(SubmitError, match=r"argument 3 .*\$AWS_SECRET_ACCESS_KEY") as info:
        refuse_secret_values(["run", "s3://a/", f"--set=storage.key={LOCAL_SECRET}"], env)
    assert LOCAL_SECRET not in str(info.value)
    # Short values (moto's "testing") are not searched for: too likely to match by accident.
    refuse_secret_values(["run", "s3://testing/"], env)


def test_entrypoints() -> None:
    assert build_entrypoint(["run", "s3://a/", "--out", "s3://b"]) == "python -m batch run s3://a/ --out s3://b"
    assert build_entrypoint(["jobs/sweep_detector.py", "--sizes", "n,s"]) == (
        "python jobs/sweep_detector.py --sizes n,s"
    )
    quoted = build_entrypoint(["run", "my slides/", "--set", "classifiers=[{name: x}]", "$HOME"])
    assert quoted == "python -m batch run 'my slides/' --set 'classifiers=[{name: x}]' '$HOME'"
    for bad in (["/abs/jobs/x.py"], ["../x.py"], []):
        with pytest.raises(SubmitError):
            build_entrypoint(bad)


def test_submit_sends_code_and_command(project: Path, tmp_path: Path) -> None:
    client = FakeClient()
    job = submit_job(
        "http://head:8265", ["run", "s3://a/", "--out", "s3://b", "--config", str(project / "cfg.yaml")],
        project_dir=project, client=client, submission_id="hemaray-1", entrypoint_num_gpus=1,
    )  # fmt: skip
    assert job.job_id == "hemaray-1" and job.status is None
    (sent,) = client.submitted
    # The config inside the project travels with the code: a path relative to working_dir.
    assert sent["entrypoint"] == "python -m batch run s3://a/ --out s3://b --config cfg.yaml"
    assert sent["runtime_env"]["working_dir"] == str(project)
    assert sent["metadata"]["hemaray_command"] == "run"
    assert (sent["submission_id"], sent["entrypoint_num_gpus"], sent["entrypoint_num_cpus"]) == ("hemaray-1", 1, None)

    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("{}\n")
    with pytest.raises(SubmitError, match="outside the shipped project"):
        submit_job("http://h", ["run", "x", "--out", "y", f"--config={outside}"], project_dir=project, client=client)
    with pytest.raises(SubmitError, match="not in the shipped project"):
        submit_job("http://h", ["jobs/missing.py"], project_dir=project, client=client)
    submit_job("http://h", ["jobs/process_slides.py", "s3://a/"], project_dir=project, client=client)
    assert client.submitted[-1]["entrypoint"] == "python jobs/process_slides.py s3://a/"


@pytest.mark.parametrize(
    ("status", "driver_code", "expected"),
    [("SUCCEEDED", 0, 0), ("FAILED", 2, 2), ("FAILED", None, EXIT_JOB_FAILED), ("STOPPED", None, EXIT_JOB_STOPPED)],
)
def test_wait_streams_logs_and_returns_the_jobs_outcome(
    project: Path, status: str, driver_code: int | None, expected: int
) -> None:
    out = io.StringIO()
    job = submit_job("http://h", ["run", "x", "--out", "y"], wait=True, project_dir=project,
                     client=FakeClient(status, driver_code), out=out)  # fmt: skip
    assert out.getvalue() == "line 1\nline 2\n"
    assert (job.status, job.exit_code) == (status, expected)
    assert exit_code_for(status, driver_code) == expected


def test_an_explicit_address_beats_ray_address(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    class Recorder:
        def __init__(self, address: str, headers: dict[str, str] | None = None) -> None:
            import os

            seen.update(address=address, headers=headers, env=os.environ.get("RAY_ADDRESS"))

    monkeypatch.setattr("ray.job_submission.JobSubmissionClient", Recorder)
    monkeypatch.setenv("RAY_ADDRESS", "http://other:8265")
    token = tmp_path / "token"
    token.write_text("abc123\n")
    connect("http://mine:8265", token)
    assert seen == {"address": "http://mine:8265", "headers": {"Authorization": "Bearer abc123"}, "env": None}
    import os

    assert os.environ["RAY_ADDRESS"] == "http://other:8265"  # restored
    connect(None)
    assert seen["address"] == "http://other:8265" and seen["headers"] is None
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(SubmitError, match="--address"):
        connect(None)
    token.write_text("")
    with pytest.raises(SubmitError, match="empty"):
        connect("http://mine:8265", token)


def test_unreachable_cluster_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(address: str, headers: Any = None) -> None:
        raise RuntimeError("Request failed with status code 401: Unauthorized")

    monkeypatch.setattr("ray.job_submission.JobSubmissionClient", refuse)
    with pytest.raises(SubmitError, match="--auth-token-file"):
        connect("http://head:8265")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hemaray")
    add_cluster_commands(p.add_subparsers(dest="command", required=True))
    return p


def test_argument_parsing() -> None:
    p = _parser()
    a = p.parse_args(["submit", "--address", "http://h:8265", "--wait", "--env", "A=1", "--",
                      "run", "s3://x/", "--out", "s3://y", "--set", "detect.actors=2"])  # fmt: skip
    assert a.address == "http://h:8265" and a.wait and a.env == ["A=1"]
    assert a.job_argv == ["--", "run", "s3://x/", "--out", "s3://y", "--set", "detect.actors=2"]
    assert a.command == "submit"  # the job's command does not clobber the subcommand name
    s = p.parse_args(["jobs", "status", "--address", "u", "--json", "raysubmit_1"])
    assert (s.action, s.job_id, s.json) == ("status", "raysubmit_1", True)
    g = p.parse_args(["jobs", "logs", "raysubmit_1", "--follow"])
    assert (g.action, g.job_id, g.follow) == ("logs", "raysubmit_1", True)
    with pytest.raises(SystemExit):
        p.parse_args(["jobs", "stop"])  # needs an id


def test_cli_commands_with_a_fake_cluster(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    client = FakeClient()
    monkeypatch.setattr("batch.cluster.jobs.connect", lambda address, auth=None: client)
    p = _parser()

    def run(argv: list[str]) -> int:
        args = p.parse_args(argv)
        return int(args.func(args))

    assert run(["submit", "--address", "http://h", "--no-code", "--", "run", "s3://a/", "--out", "s3://b"]) == 0
    assert capsys.readouterr().out.strip() == "raysubmit_fake"
    assert "working_dir" not in client.submitted[-1]["runtime_env"]
    assert run(["submit", "--address", "http://h", "--no-code", "--wait", "--", "run", "a", "--out", "b"]) == 0
    assert "line 2" in capsys.readouterr().out
    assert run(["jobs", "list", "--address", "http://h"]) == 0
    assert "raysubmit_fake\tSUCCEEDED" in capsys.readouterr().out
    assert run(["jobs", "logs", "--address", "http://h", "raysubmit_fake"]) == 0
    assert capsys.readouterr().out == "line 1\nline 2\n"
    assert run(["jobs", "stop", "--address", "http://h", "raysubmit_fake"]) == 0
    assert "stop requested" in capsys.readouterr().out
    with pytest.raises(SubmitError, match="KEY=VALUE"):
        run(["submit", "--address", "http://h", "--env", "NOVALUE", "--", "run", "a", "--out", "b"])


def test_help_documents_usage(capsys: pytest.CaptureFixture[str]) -> None:
    p = _parser()
    for argv in (["submit", "--help"], ["jobs", "--help"]):
        with pytest.raises(SystemExit) as info:
            p.parse_args(argv)
        assert info.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("-- COMMAND", "--wait", "--runtime-env", "Credentials never travel", "list,status,logs,stop"):
        assert phrase in text


def test_hemaray_cli_registers_cluster_commands() -> None:
    """``batch/cli`` wires ``add_cluster_commands`` into ``hemaray``."""
    from batch.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"submit", "jobs"} <= set(sub.choices)
