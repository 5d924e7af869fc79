"""JPEG stream checks for TIFF tiles.

JPEG carries no checksum and the libjpeg used by imagecodecs swallows its
"corrupt data" warnings, so the TIFF reader checks each JPEG tile for a
well-formed stream before decoding it (:func:`jpeg_stream_problem`). A damaged
tile that still forms a legal stream cannot be told from a good one by any
reader.

This module imports only the standard library.
"""

from __future__ import annotations

import re

__all__ = ["jpeg_stream_problem"]

# Inside a baseline scan 0xFF may only precede 0x00 (stuffing), RST0-7 or more 0xFF (fill).
_JPEG_ILLEGAL_SCAN_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def jpeg_stream_problem(data: memoryview) -> str | None:
    """Why a complete JPEG tile stream is malformed, or None when it looks intact.

    Checks SOI, EOI (trailing zero padding allowed) and, for a single baseline
    scan, that every 0xFF in the entropy-coded data is a stuffed byte, a
    restart marker or a fill byte. Costs tens of microseconds per tile.
    """
    end = len(data)
    if end < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return "tile does not start with a JPEG SOI marker"
    while end > 2 and data[end - 1] == 0:
        end -= 1
    if data[end - 2] != 0xFF or data[end - 1] != 0xD9:
        return "tile does not end with a JPEG EOI marker (truncated or overwritten)"
    pos = 2
    baseline = True
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return f"invalid JPEG marker structure at byte {pos}"
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            baseline = False  # progressive/lossless/arithmetic: several scans, skip scan check
        if marker == 0xDA:
            if not baseline:
                return None
            bad = _JPEG_ILLEGAL_SCAN_MARKER.search(data, pos + 2 + length, end - 2)
            if bad is None:
                return None
            return (
                f"illegal marker 0x{bad.group().hex().upper()} inside the JPEG scan data "
                f"at byte {bad.start()}"
            )
        pos += 2 + length
    return "JPEG stream has no scan (SOS) segment"
