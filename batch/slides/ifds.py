"""The IFD chain budget: a TIFF's page chain is walked once, bounded, before tifffile parses it.

A TIFF's pages are a linked list: the header points at the first IFD and
each IFD ends with the offset of the next (0 ends the chain). A hostile or
damaged file can loop the chain back on itself or hold 10^5 pages; tifffile
checks for a loop only once, at page 100, so a longer loop makes it spin
with growing memory. :func:`check_ifd_chain` reads only the entry counts and
next-offsets (a few bytes per page), remembers every offset it has seen and
stops at the first repeat (a cycle of any length) or once the chain passes
``max_pages``: both are :class:`~batch.errors.CorruptSlideError`. The cost of
opening a slide is therefore bounded by ``max_pages`` small reads, whatever
the file says.

Offsets that point past the end of the file, or an IFD cut short, end the
walk without a verdict: tifffile parses the chain next and reports that
damage itself (its log errors are turned into errors by the TIFF backend).

This module may import only :mod:`batch.errors`.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from batch.errors import CorruptSlideError

__all__ = ["check_ifd_chain"]

#: Byte order mark -> struct prefix.
_BYTE_ORDERS = {b"II": "<", b"MM": ">"}
#: TIFF version -> (offset format, entry-count format, bytes per IFD entry).
_LAYOUTS = {42: ("I", "H", 12), 43: ("Q", "Q", 20)}


def check_ifd_chain(fh: BinaryIO, size: int, uri: str, max_pages: int) -> int:
    """Walk the top-level IFD chain; return its length in pages.

    Parameters
    ----------
    fh
        The TIFF, seekable (read from its start; left at its start again).
    size
        The file's size in bytes (offsets at or past it end the walk).
    uri
        The slide, for error messages.
    max_pages
        Longest chain accepted.

    Raises
    ------
    CorruptSlideError
        The chain loops back to a page already seen, or is longer than ``max_pages``.
    """
    try:
        return _walk(fh, size, uri, max_pages)
    finally:
        fh.seek(0)


def _walk(fh: BinaryIO, size: int, uri: str, max_pages: int) -> int:
    fh.seek(0)
    head = fh.read(16)
    order = _BYTE_ORDERS.get(head[:2])
    if order is None or len(head) < 8:
        return 0  # not for this walk to judge: tifffile reports a bad header
    (version,) = struct.unpack(order + "H", head[2:4])
    if version not in _LAYOUTS:
        return 0
    offset_fmt, count_fmt, entry_size = _LAYOUTS[version]
    offset_size = struct.calcsize(offset_fmt)
    count_size = struct.calcsize(count_fmt)
    first_at = 4 if version == 42 else 8
    if len(head) < first_at + offset_size:
        return 0
    (offset,) = struct.unpack(order + offset_fmt, head[first_at : first_at + offset_size])
    seen: set[int] = set()
    while offset:
        if offset in seen:
            raise CorruptSlideError(
                uri,
                f"the TIFF page chain loops back to the page at byte {offset} after "
                f"{len(seen)} pages; the file is damaged or hostile: copy it again from its source",
            )
        if len(seen) >= max_pages:
            raise CorruptSlideError(
                uri,
                f"the TIFF holds more than max_pages={max_pages:,} pages; a slide has a few "
                "dozen. The file is damaged or hostile; if it is genuine, raise slides.max_pages",
            )
        if offset + count_size > size:
            return len(seen)
        seen.add(offset)
        fh.seek(offset)
        raw = fh.read(count_size)
        if len(raw) < count_size:
            return len(seen)
        (entries,) = struct.unpack(order + count_fmt, raw)
        next_at = offset + count_size + entries * entry_size
        if next_at + offset_size > size:
            return len(seen)
        fh.seek(next_at)
        raw = fh.read(offset_size)
        if len(raw) < offset_size:
            return len(seen)
        (offset,) = struct.unpack(order + offset_fmt, raw)
    return len(seen)
