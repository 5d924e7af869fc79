"""Untrusted files and locations (issue 16, items 5 and 6).

Model files are pickles: a crafted ``.pt`` must be refused before any of it
runs, a pinned SHA-256 must refuse any other file, and a cached remote model
must follow its object's ETag. URLs never carry credentials. A run's output
location is proved writable before any compute, and nothing is created when
it is not (no bucket, no folder). Every S3 filesystem gets botocore retries.
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from batch.cli import main
from batch.cli.common import storage_options as cli_storage_options
from batch.config import Config, StorageConfig, config_from_tree, load_config
from batch.errors import ConfigError, ModelLoadError, OutputNotWritableError, UntrustedModelError
from batch.models import (
    MODELS_DIR,
    file_sha256,
    load_checkpoint,
    read_model_card,
    resolve_model,
)
from batch.storage import PROBE_PREFIX, check_out_writable, redact_credentials

SECRET = "s3cr3t-pw"


class _RunsCommand:
    """Pickles as ``os.system(command)``: a model file that runs a shell command when loaded."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


@pytest.fixture()
def hostile_pt(tmp_path: Path) -> tuple[Path, Path]:
    """A ``.pt`` whose unpickling runs ``touch MARKER``; returns (file, marker)."""
    import torch

    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pt"
    torch.save({"model": _RunsCommand(f"touch {marker}"), "epoch": -1}, path)
    return path, marker


# ----------------------------------------------------------------------------- weights_only


@pytest.mark.parametrize("name", ["wbc_type", "all_subtype"])
def test_shipped_classifiers_load_with_weights_only(name: str) -> None:
    """The shipped checkpoints load restricted, as they are, to the very tensors of a full load."""
    import torch

    path = MODELS_DIR / f"{name}.pt"
    if not path.is_file():
        pytest.skip(f"{path.name} is not shipped in this checkout")
    safe = load_checkpoint(path)["model"].state_dict()
    full = torch.load(path, map_location="cpu", weights_only=False)["model"].state_dict()
    assert safe.keys() == full.keys()
    assert all(torch.equal(safe[k], full[k]) for k in full)


def test_hostile_pickle_is_refused_and_never_runs(hostile_pt: tuple[Path, Path]) -> None:
    import torch

    from batch.stages.classify import WbcClassifier
    from batch.stages.detect import load_detector

    path, marker = hostile_pt
    with pytest.raises(UntrustedModelError, match=r"hostile\.pt.*system") as info:
        load_checkpoint(path)
    assert "allow-list" in str(info.value)
    with pytest.raises(UntrustedModelError):
        read_model_card(path)  # no sidecar: the card would be read from the checkpoint
    with pytest.raises(UntrustedModelError):
        WbcClassifier(path, name="x", device="cpu")
    with pytest.raises(UntrustedModelError):
        load_detector(path, device="cpu")
    assert not marker.exists()
    # The file is what it claims: a full load runs the command.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_damaged_checkpoint_is_a_load_error_not_untrusted(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="could not read checkpoint") as info:
        load_checkpoint(path)
    assert not isinstance(info.value, UntrustedModelError)


# ----------------------------------------------------------------------------- SHA-256 pins


def test_sha256_pin_refuses_another_file(tmp_path: Path) -> None:
    from batch.run.provenance import label_sets, trained_mpp

    shipped = MODELS_DIR / "all_subtype.pt"
    wrong = "ab" * 32
    with pytest.raises(UntrustedModelError) as info:
        resolve_model(shipped, sha256=wrong)
    message = str(info.value)
    assert str(shipped) in message and wrong in message and file_sha256(shipped) in message
    assert resolve_model(shipped, sha256=file_sha256(shipped).upper()) == shipped

    # From the config, on the driver before any compute: the detector and each classifier.
    with pytest.raises(UntrustedModelError, match="detector"):
        trained_mpp(load_config(None, [f"detect.sha256={wrong}"]))
    cfg = load_config(None, [])
    cfg.classifiers[1].sha256 = wrong
    with pytest.raises(UntrustedModelError, match="all_subtype"):
        label_sets(cfg)
    with pytest.raises(ConfigError, match=r"detect\.sha256"):
        load_config(None, ["detect.sha256=deadbeef"])
    with pytest.raises(ConfigError, match=r"classifiers\.x\.sha256"):
        config_from_tree({"classifiers": [{"name": "x", "model": "wbc_type", "sha256": "zz"}]})


# ----------------------------------------------------------------------------- remote models


def test_remote_model_follows_its_etag(s3: dict[str, Any], tmp_path: Path) -> None:
    fs, bucket, opts = s3["fs"], s3["bucket"], s3["storage_options"]
    uri = f"s3://{bucket}/models/m.pt"
    fs.pipe(f"{bucket}/models/m.pt", b"weights v1")
    fs.pipe(f"{bucket}/models/m.json", b'{"name": "m", "task": "detect", "class_names": ["a"]}')
    cache = tmp_path / "cache"

    local = resolve_model(uri, storage_options=opts, cache_dir=cache)
    assert local.read_bytes() == b"weights v1"
    assert local.with_suffix(".json").is_file()
    fetched_at = local.stat().st_mtime_ns
    assert resolve_model(uri, storage_options=opts, cache_dir=cache) == local
    assert local.stat().st_mtime_ns == fetched_at  # same ETag: the cached copy, not fetched again

    fs.pipe(f"{bucket}/models/m.pt", b"weights v2")  # replaced in place: a new ETag
    fs.rm(f"{bucket}/models/m.json")
    assert resolve_model(uri, storage_options=opts, cache_dir=cache).read_bytes() == b"weights v2"
    assert not local.with_suffix(".json").exists()  # the stale card went with the old bytes

    with pytest.raises(UntrustedModelError, match="fetched to"):
        resolve_model(uri, storage_options=opts, cache_dir=cache, sha256="0" * 64)
    fs.rm(f"{bucket}/models/m.pt")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(uri, storage_options=opts, cache_dir=cache)


# ----------------------------------------------------------------------------- credentials


def test_credentials_in_urls_are_refused_and_never_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = f"http://admin:{SECRET}@minio:9000"
    for override in (f"storage.endpoint_url={bad}", f"detect.model=s3://k:{SECRET}@b/d.pt"):
        with pytest.raises(ConfigError) as info:
            load_config(None, [override])
        assert SECRET not in str(info.value) and "***@" in str(info.value)
    with pytest.raises(ConfigError):
        StorageConfig(endpoint_url=bad).storage_options()  # a config built in code, unvalidated
    with pytest.raises(ConfigError):
        resolve_model(f"s3://k:{SECRET}@b/m.pt")
    with pytest.raises(ConfigError):
        check_out_writable(f"s3://k:{SECRET}@b/out")

    code = main(
        ["run", str(tmp_path / "a.tiff"), "--out", str(tmp_path / "o"), "--endpoint-url", bad]
    )
    err = capsys.readouterr().err
    assert code == 1 and "credentials" in err and SECRET not in err
    assert not (tmp_path / "o").exists()


def test_manifest_redacts_credentials_that_slipped_past_validation() -> None:
    from batch.run.provenance import run_manifest

    config = Config(storage=StorageConfig(endpoint_url=f"http://admin:{SECRET}@minio:9000"))
    manifest = run_manifest(
        "r", datetime.now(UTC), n_inputs=0, out=f"s3://k:{SECRET}@b/out", config=config,
        detector_trained_mpp=None, labels={},
    )  # fmt: skip
    assert SECRET not in repr(manifest)
    assert manifest["config"]["storage"]["endpoint_url"] == "http://***@minio:9000"
    assert redact_credentials({"a": [f"https://u:{SECRET}@h/x", 3]}) == {
        "a": ["https://***@h/x", 3]
    }


# ----------------------------------------------------------------------------- OUT before compute


def test_out_in_a_missing_bucket_fails_before_compute_and_creates_nothing(
    s3: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from batch.run.pipeline import run_pipeline

    fs, endpoint = s3["fs"], s3["endpoint"]
    code = main(["run", str(tmp_path / "a.tiff"), "--out", "s3://no-such-bucket/run1",
                 "--endpoint-url", endpoint])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "'no-such-bucket' does not exist" in err and "Nothing was created" in err
    config = load_config(None, [f"storage.endpoint_url={endpoint}"])
    with pytest.raises(OutputNotWritableError):
        run_pipeline([], "s3://no-such-bucket/run1", config)  # the library entry point too
    fs.invalidate_cache()
    assert fs.ls("") == [s3["bucket"]]  # no bucket was created

    check_out_writable(
        f"s3://{s3['bucket']}/run1", storage_options=config.storage.storage_options()
    )
    fs.invalidate_cache()
    assert not [p for p in fs.find(s3["bucket"]) if PROBE_PREFIX in p]  # the probe is gone


def test_local_out_under_a_file_fails_and_creates_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputNotWritableError, match="a-file"):
        check_out_writable(str(blocker / "runs" / "one"))
    assert sorted(os.listdir(tmp_path)) == ["a-file"]
    out = tmp_path / "fresh" / "out"
    check_out_writable(str(out))
    assert out.is_dir() and os.listdir(out) == []


# ----------------------------------------------------------------------------- retries


def test_every_s3_filesystem_gets_botocore_retries(s3: dict[str, Any]) -> None:
    import s3fs

    default = StorageConfig().storage_options()["config_kwargs"]["retries"]
    assert default == {"total_max_attempts": 10, "mode": "adaptive"}
    config = load_config(None, [f"storage.endpoint_url={s3['endpoint']}",
                                "storage.max_attempts=4", "storage.retry_mode=standard"])  # fmt: skip
    opts = config.storage.storage_options()
    cli = cli_storage_options(argparse.Namespace(endpoint_url=s3["endpoint"]))
    assert cli["config_kwargs"]["retries"] == default
    assert cli["client_kwargs"] == opts["client_kwargs"] == {"endpoint_url": s3["endpoint"]}
    fs = s3fs.S3FileSystem(**opts)
    fs.ls(s3["bucket"])  # the client is built on first use
    assert fs.s3.meta.config.retries == {"total_max_attempts": 4, "mode": "standard"}
    with pytest.raises(ConfigError, match=r"storage\.retry_mode"):
        load_config(None, ["storage.retry_mode=never"])
