"""The project's one least-recently-used cache: typed, thread-safe, with a count or weight budget.

:class:`LruCache` keeps the most recently used entries whose total weight
fits a budget. Without a ``weigh`` function every entry weighs 1 (the budget
is a number of entries, e.g. a few open slides per process); with one the
budget is in its unit (e.g. bytes of decoded tiles). An ``on_evict`` callback
receives what the cache lets go of, e.g. to close an evicted slide.

This module may import only the standard library.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["LruCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """A mapping that keeps its most recently used entries within a budget.

    Every method is atomic under one lock, so the cache can be shared by
    threads. ``on_evict`` runs after that lock is released: it may be slow
    (closing a file) or use the cache itself.

    Parameters
    ----------
    budget
        Largest total weight kept (>= 0). Without ``weigh`` every entry
        weighs 1, so the budget is a number of entries.
    weigh
        Weight of a value (e.g. its size in bytes), >= 0; called once when
        the value is stored.
    on_evict
        Called as ``on_evict(key, value)`` for every value the cache drops by
        itself: least recently used entries pushed out by :meth:`put`,
        :meth:`get_or_create` or :meth:`set_budget`, a value that :meth:`put`
        replaces with a different object, and every entry :meth:`clear`
        removes. Not called for values handed back by :meth:`pop` and
        :meth:`pop_where`, nor for a value too heavy to be stored at all.
        When it raises, the other dropped values still get their call, then
        the first error propagates (the entries are gone either way).
    """

    def __init__(
        self,
        budget: int,
        *,
        weigh: Callable[[V], int] | None = None,
        on_evict: Callable[[K, V], None] | None = None,
    ) -> None:
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        self._budget = budget
        self._weigh = weigh
        self._on_evict = on_evict
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()  # oldest first
        self._weight = 0
        self._lock = threading.RLock()

    @property
    def budget(self) -> int:
        """Largest total weight kept."""
        return self._budget

    @property
    def weight(self) -> int:
        """Total weight of the entries kept now (read under the lock: never mid-put)."""
        with self._lock:
            return self._weight

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is cached (does not count as a use)."""
        return key in self._entries

    def get(self, key: K) -> V | None:
        """The value of ``key`` (now the most recently used), or None when absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: K, value: V) -> bool:
        """Store ``value`` under ``key`` as the most recently used entry.

        Returns
        -------
        bool
            False when the value alone weighs more than the budget: it is not
            stored and an entry already under ``key`` stays.
        """
        weight = self._weight_of(value)
        with self._lock:
            if weight > self._budget:
                return False
            dropped: list[tuple[K, V]] = []
            old = self._entries.pop(key, None)
            if old is not None:
                self._weight -= old[1]
                if old[0] is not value:
                    dropped.append((key, old[0]))
            self._store(key, value, weight)
            dropped += self._evict()
        self._notify(dropped)
        return True

    def get_or_create(self, key: K, factory: Callable[[], V]) -> V:
        """The value of ``key``; when absent, ``factory()`` makes it and it is stored.

        The factory runs under the cache's lock, so concurrent callers create
        each key once (they wait meanwhile). A created value heavier than the
        budget is returned without being stored. An exception from the
        factory propagates and nothing is stored.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[0]
            value = factory()
            weight = self._weight_of(value)
            if weight > self._budget:
                return value
            self._store(key, value, weight)
            dropped = self._evict()
        self._notify(dropped)
        return value

    def pop(self, key: K) -> V | None:
        """Remove ``key`` and return its value (None when absent); ``on_evict`` is not called."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return None
            self._weight -= entry[1]
            return entry[0]

    def pop_where(self, predicate: Callable[[K], bool]) -> list[tuple[K, V]]:
        """Remove every entry whose key satisfies ``predicate``; return them, oldest first."""
        with self._lock:
            removed: list[tuple[K, V]] = []
            for key in [k for k in self._entries if predicate(k)]:
                value, weight = self._entries.pop(key)
                self._weight -= weight
                removed.append((key, value))
            return removed

    def clear(self) -> None:
        """Remove every entry, passing each to ``on_evict`` (oldest first)."""
        with self._lock:
            dropped = [(key, value) for key, (value, _) in self._entries.items()]
            self._entries.clear()
            self._weight = 0
        self._notify(dropped)

    def set_budget(self, budget: int) -> None:
        """Change the budget, evicting least recently used entries down to it."""
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        with self._lock:
            self._budget = budget
            dropped = self._evict()
        self._notify(dropped)

    def _weight_of(self, value: V) -> int:
        return 1 if self._weigh is None else self._weigh(value)

    def _store(self, key: K, value: V, weight: int) -> None:  # the caller holds the lock
        self._entries[key] = (value, weight)
        self._weight += weight

    def _evict(self) -> list[tuple[K, V]]:  # the caller holds the lock
        evicted: list[tuple[K, V]] = []
        while self._weight > self._budget:
            key, (value, weight) = self._entries.popitem(last=False)
            self._weight -= weight
            evicted.append((key, value))
        return evicted

    def _notify(self, dropped: list[tuple[K, V]]) -> None:
        """Pass each dropped entry to ``on_evict``; the first error is raised after all ran."""
        if self._on_evict is None:
            return
        first_error: Exception | None = None
        for key, value in dropped:
            try:
                self._on_evict(key, value)
            except Exception as e:  # the others still get their call
                first_error = first_error or e
        if first_error is not None:
            raise first_error
