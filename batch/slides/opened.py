"""A process's few open slides, each held to the version of the bytes it was opened on.

Ray workers read a slide's tiles in many tasks; opening the slide (a HEAD and
a few header reads) for each would cost more than the tiles. :class:`OpenSlides`
keeps a few open per process, keyed by URI, pin (:attr:`Slide.pin`) and
storage options:

- :meth:`OpenSlides.current` is what a planner calls: the slide as it is *now*
  (one ``stat`` or HEAD decides whether an open one is still that version), never
  a header an earlier run left in the cache;
- :meth:`OpenSlides.pinned` is what a tile reader calls with the pin the
  planner recorded: an open slide of that version, or one opened now and
  checked against it. A file or object rewritten since the plan is a
  :class:`~batch.errors.SlideChangedError`, not pixels of the new file cut
  along the old header's tile table.

This module may import only :mod:`batch.config`, :mod:`batch.lru` and its
siblings :mod:`~batch.slides.slide` and :mod:`~batch.slides.sources`.
"""

from __future__ import annotations

import json
from typing import Any

from batch.config import DEFAULT_MAX_PAGES, DEFAULT_MAX_PIXELS
from batch.lru import LruCache
from batch.slides.slide import Slide, open_slide
from batch.slides.sources import current_pin

__all__ = ["OpenSlides"]

_Key = tuple[str, str | None, str]


def _close(_key: _Key, slide: Slide) -> None:
    slide.close()


class OpenSlides:
    """At most ``size`` open slides, least recently used closed first; thread-safe."""

    def __init__(self, size: int) -> None:
        self._slides: LruCache[_Key, Slide] = LruCache(size, on_evict=_close)

    def current(
        self,
        uri: str,
        *,
        storage_options: dict[str, Any] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_pages: int = DEFAULT_MAX_PAGES,
    ) -> Slide:
        """The slide at ``uri`` as it is now; its :attr:`Slide.pin` is what later reads hold to.

        Raises
        ------
        SlideReadError
            One of its subclasses, as :func:`~batch.slides.open_slide` raises them.
        """
        pin = current_pin(uri, storage_options)
        return self.pinned(
            uri, pin, storage_options=storage_options, max_pixels=max_pixels, max_pages=max_pages
        )

    def pinned(
        self,
        uri: str,
        pin: str | None,
        *,
        storage_options: dict[str, Any] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_pages: int = DEFAULT_MAX_PAGES,
    ) -> Slide:
        """The slide at ``uri`` in the version ``pin`` (None: whatever it is when opened).

        Raises
        ------
        SlideChangedError
            The file or object is another version now.
        SlideReadError
            Another of its subclasses, as :func:`~batch.slides.open_slide` raises them.
        """
        options = json.dumps(storage_options or {}, sort_keys=True, default=str)
        return self._slides.get_or_create(
            (uri, pin, options),
            lambda: open_slide(
                uri, storage_options=storage_options, max_pixels=max_pixels,
                max_pages=max_pages, pin=pin,
            ),
        )  # fmt: skip

    def clear(self) -> None:
        """Close every open slide."""
        self._slides.clear()
