"""One typed configuration for a hemaray run.

Loaded from YAML (``--config cfg.yaml``) and ``--set section.key=value``
overrides, validated, and saved next to every run's output. Stage code takes
its numbers from here or from named constants, never inline.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from batch.errors import ConfigError

__all__ = ["Config", "TilingConfig", "StorageConfig", "SlideConfig", "load_config"]

#: Default overlap between tiles in microns: >= the largest cell we expect whole
#: (monocytes reach ~30 um, MORPHOLOGY.md); 128 px at 0.25 um/px.
DEFAULT_OVERLAP_UM = 32.0
#: Level-0 pixels per slide allowed before a slide is refused unread (200k x 200k).
DEFAULT_MAX_PIXELS = 200_000 * 200_000


@dataclass
class TilingConfig:
    """How a slide is cut into detector tiles.

    ``tile_size`` and ``overlap_px`` are in pixels at the target mpp (the
    detector's input scale); when the slide's mpp is unknown they are level-0
    pixels.
    """

    tile_size: int = 640
    #: None: derive from ``overlap_um`` and the target mpp.
    overlap_px: int | None = None
    overlap_um: float = DEFAULT_OVERLAP_UM
    #: Microns per pixel the detector expects; None: the model file's trained mpp.
    target_mpp: float | None = None
    #: Assumed mpp when overlap must be derived and nothing else is known.
    fallback_mpp: float = 0.25
    #: A tile whose read region has less foreground than this fraction is skipped.
    min_foreground_fraction: float = 0.001
    #: Longest side of the low-resolution image used to find background.
    mask_max_side: int = 4096
    #: RGB distance from the background colour above which a pixel is foreground.
    foreground_delta: float = 30.0
    skip_background: bool = True

    def validate(self) -> None:
        if self.tile_size < 64:
            raise ConfigError(f"tiling.tile_size must be >= 64 px, got {self.tile_size}")
        ov = self.overlap_px
        if ov is not None and not 0 <= ov < self.tile_size // 2:
            raise ConfigError(
                f"tiling.overlap_px must be in [0, tile_size/2), got {ov} for tile_size {self.tile_size}"
            )
        if self.overlap_um < 0:
            raise ConfigError(f"tiling.overlap_um must be >= 0, got {self.overlap_um}")
        if not 0 <= self.min_foreground_fraction < 1:
            raise ConfigError(
                f"tiling.min_foreground_fraction must be in [0, 1), got {self.min_foreground_fraction}"
            )


@dataclass
class SlideConfig:
    """Limits on what a slide may be."""

    max_pixels: int = DEFAULT_MAX_PIXELS

    def validate(self) -> None:
        if self.max_pixels <= 0:
            raise ConfigError(f"slides.max_pixels must be > 0, got {self.max_pixels}")


@dataclass
class StorageConfig:
    """Object storage. Credentials never live here: they come from the AWS chain."""

    #: S3-compatible endpoint (MinIO, Ceph, moto); None: AWS.
    endpoint_url: str | None = None

    def validate(self) -> None:
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise ConfigError(f"storage.endpoint_url must be an http(s) URL, got {self.endpoint_url!r}")

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this storage (no credentials)."""
        if self.endpoint_url is None:
            return {}
        return {"client_kwargs": {"endpoint_url": self.endpoint_url}}


@dataclass
class Config:
    """Everything a run needs to know; saved as ``config.yaml`` with the run."""

    tiling: TilingConfig = field(default_factory=TilingConfig)
    slides: SlideConfig = field(default_factory=SlideConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


T = TypeVar("T")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: cannot read {value!r} as {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)  # type: ignore[arg-type]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from e
    if tp is str:
        return str(value)
    if origin in (list, dict) or tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"{where or 'config'}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the run's config from defaults, an optional YAML file and ``key=value`` overrides.

    Raises
    ------
    ConfigError
        On unknown keys, wrong types or out-of-range values, naming the key.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a YAML mapping at the top level")
        tree = loaded
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), raw.strip())
    return _build(Config, tree, "").validate()
