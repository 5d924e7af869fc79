"""The range plan: which byte ranges to fetch for a set of tile spans.

Spans that overlap or lie at most :data:`~batch.slides.limits.COALESCE_MAX_GAP`
bytes apart are merged, so a row of tiles stored one after another costs one
request; :func:`plan_reads` also says where each span lies in the merged
ranges.

This module may import only :mod:`batch.slides.limits`.
"""

from __future__ import annotations

from collections.abc import Sequence

from batch.slides.limits import COALESCE_MAX_GAP

__all__ = ["coalesce_byte_ranges", "plan_reads"]


def plan_reads(
    spans: Sequence[tuple[int, int]], max_gap: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Coalesce byte spans; return the merged ranges and, per input span, (range, offset in it)."""
    order = sorted(range(len(spans)), key=lambda i: spans[i][0])
    merged: list[tuple[int, int]] = []
    where: list[tuple[int, int]] = [(0, 0)] * len(spans)
    for i in order:
        start, end = spans[i]
        if merged and start - merged[-1][1] <= max_gap:
            m_start, m_end = merged[-1]
            merged[-1] = (m_start, max(m_end, end))
        else:
            merged.append((start, end))
        where[i] = (len(merged) - 1, start - merged[-1][0])
    return merged, where


def coalesce_byte_ranges(
    spans: Sequence[tuple[int, int]], *, max_gap: int = COALESCE_MAX_GAP
) -> list[tuple[int, int]]:
    """Merge half-open byte spans that overlap or lie at most ``max_gap`` bytes apart.

    Parameters
    ----------
    spans
        ``(start, end)`` pairs, in any order.
    max_gap
        Largest number of unneeded bytes read to save one request.

    Returns
    -------
    list of tuple of int
        Sorted, disjoint ``(start, end)`` ranges covering every span.
    """
    return plan_reads(spans, max_gap)[0]
