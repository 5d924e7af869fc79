"""Config loading/validation and the schemas/ tables."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

import schemas
from batch.config import Config, load_config
from batch.errors import ConfigError


def test_defaults_and_overrides(tmp_path: Path) -> None:
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("tiling:\n  tile_size: 512\n  overlap_um: 20\n")
    cfg = load_config(cfg_file, ["tiling.tile_size=768", "storage.endpoint_url=http://127.0.0.1:9000"])
    assert cfg.tiling.tile_size == 768
    assert cfg.tiling.overlap_um == 20.0
    assert cfg.storage.storage_options()["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9000"}
    saved = tmp_path / "saved.yaml"
    cfg.save(saved)
    assert load_config(saved) == cfg


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("tiling.tile_sise=512", "tile_sise"),
        ("tiling.tile_size=big", "tiling.tile_size"),
        ("tiling.tile_size=16", "tiling.tile_size"),
        ("tiling.overlap_px=400", "tiling.overlap_px"),
        ("storage.endpoint_url=ftp://x", "storage.endpoint_url"),
        ("execution.placement=gpu", "execution.placement"),
        ("segmentation.k=4", "segmentation.kmeans"),
        ("segmentation.kmeans=fast", "segmentation.kmeans"),
        ("segmentation.open_radius_um=-1", "segmentation.open_radius_um"),
        ("nonsense", "--set"),
    ],
)
def test_bad_config_names_the_key(override: str, names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(None, [override])


def test_default_config_is_valid() -> None:
    assert Config().validate().tiling.tile_size == 640


def test_every_segmentation_setting_is_reachable_and_reaches_the_stage() -> None:
    """Every field of ``segmentation`` can be set with --set, and the stage uses the config's value."""
    import numpy as np

    from batch.stages.segment import segment_wbc

    overrides = [
        "segmentation.k=2", "segmentation.kmeans=opencv", "segmentation.max_nucleus_b=none",
        "segmentation.min_nucleus_um2=0", "segmentation.drop_border_components=false",
        "segmentation.crop_margin=0.2",
    ]  # fmt: skip
    cfg = load_config(None, overrides).segmentation
    assert (cfg.k, cfg.kmeans, cfg.max_nucleus_b, cfg.min_nucleus_um2) == (2, "opencv", None, 0.0)
    assert cfg.drop_border_components is False and cfg.crop_margin == 0.2
    for name, value in vars(Config().segmentation).items():
        assert load_config(None, [f"segmentation.{name}={value}"]).segmentation == Config().segmentation
    # A purple disc on white: the config's a* separation decides whether it is a nucleus.
    crop = np.full((48, 48, 3), 245, np.uint8)
    yy, xx = np.mgrid[:48, :48]
    crop[(yy - 24) ** 2 + (xx - 24) ** 2 < 100] = (110, 60, 170)
    two = ["segmentation.k=2"]  # two colours in the crop: two clusters
    assert segment_wbc(crop, mpp=0.25, config=load_config(None, two).segmentation).found
    strict = load_config(None, [*two, "segmentation.min_a_separation=500"]).segmentation
    assert not segment_wbc(crop, mpp=0.25, config=strict).found


@pytest.mark.parametrize("table", schemas.TABLES)
def test_schema_fields_documented_with_units(table: str) -> None:
    schema = schemas.load(table)
    assert schema.metadata[b"hemaray.table"] == table.encode()
    assert int(schema.metadata[b"hemaray.version"]) >= 1
    assert len(schema) == len(set(schema.names))
    for f in schema:
        assert f.metadata[b"doc"].strip(), f"{table}.{f.name} has no doc"
        assert b"unit" in f.metadata
    docs = schemas.field_docs(table)
    assert set(docs) == set(schema.names)


def test_conform_orders_casts_and_rejects_missing() -> None:
    t = pa.table({"message": ["boom"], "slide_id": ["s1"], "slide_uri": ["/x.tif"], "stage": ["open"],
                  "error_type": ["CorruptSlideError"], "attempt": [1],
                  "failed_at": pa.array([0], pa.timestamp("us", tz="UTC")), "extra": [3]})
    out = schemas.conform(t, "failures")
    assert out.schema.names[: len(schemas.load("failures"))] == schemas.load("failures").names
    assert out.schema.field("attempt").type == pa.int32()
    assert out.column("tile").null_count == 1
    assert out.column("extra").to_pylist() == [3]
    with pytest.raises(ValueError, match="slide_uri"):
        schemas.conform(t.drop(["slide_uri"]), "failures")
