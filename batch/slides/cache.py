"""The process-wide cache of decoded TIFF tiles.

Neighbouring regions share covering tiles, so the TIFF reader keeps the last
decoded ones (:data:`~batch.slides.limits.DECODED_TILE_CACHE_BYTES` for all
open slides of the process together, least recently used out). Keys are
``(reader, level, tile index)``: every open slide gets its own reader id
(:func:`new_reader_id`) and its tiles are dropped when it closes.
:func:`decoded_tile_cache` changes the budget for the length of a block.

The reader looks the cache up as ``cache.DECODED_TILES`` at each use, so a
test can swap it with ``monkeypatch.setattr(cache, "DECODED_TILES", ...)``.

This module may import only :mod:`batch.lru`, :mod:`batch.slides.limits` and
third-party libraries (numpy).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from numpy.typing import NDArray

from batch.lru import LruCache
from batch.slides.limits import DECODED_TILE_CACHE_BYTES

__all__ = [
    "DECODED_TILES",
    "DecodedTile",
    "DecodedTileCache",
    "TileKey",
    "decoded_tile_cache",
    "new_reader_id",
]

TileKey = tuple[int, int, int]
"""``(reader, level, tile index)``: one decoded tile of one open slide."""


@dataclass(frozen=True)
class DecodedTile:
    """One decoded tile (or strip) and where it goes: never written to once cached."""

    pixels: NDArray[Any]
    plane: int
    y: int
    x: int


def _tile_bytes(tile: DecodedTile) -> int:
    return int(tile.pixels.nbytes)


class DecodedTileCache(LruCache[TileKey, DecodedTile]):
    """Process-wide LRU of decoded tiles, bounded in bytes; keys name the slide's reader.

    A tile larger than the whole budget is not cached.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, weigh=_tile_bytes)

    @property
    def max_bytes(self) -> int:
        """The budget in bytes of decoded pixels."""
        return self.budget

    def resize(self, max_bytes: int) -> None:
        """Set the budget, evicting least recently used tiles down to it."""
        self.set_budget(max_bytes)

    def drop(self, reader: int) -> None:
        """Forget every tile of one reader (its slide was closed)."""
        self.pop_where(lambda key: key[0] == reader)


DECODED_TILES = DecodedTileCache(DECODED_TILE_CACHE_BYTES)
"""The cache every TIFF reader of this process shares."""

_READER_IDS = itertools.count()


def new_reader_id() -> int:
    """A reader id no other open slide of this process has: its tiles' key prefix."""
    return next(_READER_IDS)


@contextmanager
def decoded_tile_cache(max_bytes: int) -> Iterator[None]:
    """Within the block, this process keeps at most ``max_bytes`` of decoded tiles (0: none).

    Benchmarks of the reader itself turn the cache off, so every region pays
    for the fetch and decode of each tile it covers.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    cache = DECODED_TILES
    previous = cache.max_bytes
    cache.resize(max_bytes)
    try:
        yield
    finally:
        cache.resize(previous)
