"""Slide identity: readable, stable across runs and input sets, collision-free; optional pseudonyms."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from batch.errors import ConfigError
from batch.ids import normalise_uri, slide_id_for
from batch.inputs import resolve_inputs


@pytest.fixture()
def two_sites(tmp_path: Path) -> Path:
    for site in ("siteA", "siteB"):
        (tmp_path / site).mkdir()
        (tmp_path / site / "001.tif").write_bytes(b"II*\x00")
    return tmp_path


def test_same_file_name_at_two_sites_gets_two_ids(two_sites: Path) -> None:
    """``siteA/001.tif`` and ``siteB/001.tif``: two slides, run together or one at a time."""
    together = {Path(s.uri).parent.name: s.slide_id for s in resolve_inputs([str(two_sites)])}
    alone = {
        site: resolve_inputs([str(two_sites / site / "001.tif")])[0].slide_id
        for site in ("siteA", "siteB")
    }
    assert together == alone  # the input set does not change an id
    assert together["siteA"] != together["siteB"]
    assert all(i.startswith("001-") and len(i) == len("001-") + 8 for i in together.values())


def test_one_file_spelled_several_ways_is_one_slide(two_sites: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(two_sites)
    spellings = ["siteA/001.tif", "./siteA/001.tif", str(two_sites / "siteA/001.tif"),
                 f"file://{two_sites}/siteA/001.tif", "siteA/../siteA/001.tif"]  # fmt: skip
    assert len({slide_id_for(s) for s in spellings}) == 1
    assert len(resolve_inputs(spellings)) == 1
    assert normalise_uri("s3://bucket/a//b.tif") == normalise_uri("S3://bucket/a/b.tif/")


def test_pseudonymous_ids_carry_no_file_name(two_sites: Path) -> None:
    a = resolve_inputs([str(two_sites)], id_secret=b"key-1")
    b = resolve_inputs([str(two_sites)], id_secret=b"key-1")
    c = resolve_inputs([str(two_sites)], id_secret=b"key-2")
    assert [s.slide_id for s in a] == [s.slide_id for s in b]  # stable for one key
    assert not {s.slide_id for s in a} & {s.slide_id for s in c}  # another key, other ids
    assert all(s.slide_id.startswith("s-") and "001" not in s.slide_id for s in a)
    assert len({s.slide_id for s in a}) == 2


def test_ids_from_a_manifest_column(two_sites: Path) -> None:
    manifest = two_sites / "m.csv"
    uris = [str(two_sites / "siteA/001.tif"), str(two_sites / "siteB/001.tif")]
    pd.DataFrame({"slide_uri": uris, "accession": ["H-21/007", "H-21/008"]}).to_csv(manifest, index=False)
    slides = resolve_inputs([str(manifest)], id_column="accession")
    assert [s.slide_id for s in slides] == ["H-21_007", "H-21_008"]  # made path-safe
    pd.DataFrame({"slide_uri": uris, "accession": ["x", "x"]}).to_csv(manifest, index=False)
    with pytest.raises(ConfigError, match="name more than one slide"):
        resolve_inputs([str(manifest)], id_column="accession")
    with pytest.raises(ConfigError, match="has no 'accession' value"):
        resolve_inputs([str(two_sites / "siteA")], id_column="accession")


def test_pseudonymous_run_needs_the_secret_in_the_environment(two_sites: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from batch.cli import main
    from batch.cli.run import ID_SECRET_ENV

    os.environ.pop(ID_SECRET_ENV, None)
    code = main(["run", str(two_sites / "siteA"), "--out", str(two_sites / "out"), "--pseudonymous-ids"])
    assert code == 1 and ID_SECRET_ENV in capsys.readouterr().err
