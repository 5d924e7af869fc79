"""batch.lru: least recently used out, count and weight budgets, eviction callbacks, threads."""

from __future__ import annotations

import threading

import pytest

from batch.lru import LruCache


class Recorder:
    """An ``on_evict`` that remembers what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, object]] = []

    def __call__(self, key: object, value: object) -> None:
        self.calls.append((key, value))


def test_evicts_least_recently_used_first() -> None:
    evicted = Recorder()
    cache: LruCache[str, int] = LruCache(3, on_evict=evicted)
    for i, key in enumerate("abc"):
        assert cache.put(key, i)
    assert cache.get("a") == 0  # a is now the most recently used: b is the oldest
    cache.put("d", 3)
    assert "b" not in cache and cache.get("b") is None
    assert evicted.calls == [("b", 1)]
    cache.put("e", 4)  # then c
    assert evicted.calls == [("b", 1), ("c", 2)]
    assert len(cache) == 3 and cache.weight == 3
    assert [cache.get(k) for k in "ade"] == [0, 3, 4]


def test_contains_does_not_count_as_a_use() -> None:
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert "a" in cache
    cache.put("c", 3)  # a is still the oldest
    assert "a" not in cache and "b" in cache and "c" in cache


def test_byte_budget_with_weigh() -> None:
    evicted = Recorder()
    cache: LruCache[str, bytes] = LruCache(10, weigh=len, on_evict=evicted)
    cache.put("a", b"xxxx")
    cache.put("b", b"yyyy")
    assert cache.weight == 8
    cache.put("c", b"zzz")  # 11 > 10: a goes
    assert evicted.calls == [("a", b"xxxx")]
    assert cache.weight == 7 and len(cache) == 2
    cache.put("d", b"0123456789")  # exactly the budget: everything else goes
    assert [k for k, _ in evicted.calls] == ["a", "b", "c"]
    assert cache.weight == 10 and cache.get("d") == b"0123456789"


def test_value_heavier_than_budget_is_refused_and_keeps_the_old_entry() -> None:
    evicted = Recorder()
    cache: LruCache[str, bytes] = LruCache(4, weigh=len, on_evict=evicted)
    cache.put("a", b"ab")
    assert not cache.put("a", b"too long")
    assert cache.get("a") == b"ab" and cache.weight == 2
    assert evicted.calls == []


def test_replacing_a_value() -> None:
    evicted = Recorder()
    cache: LruCache[str, bytes] = LruCache(10, weigh=len, on_evict=evicted)
    value = b"abc"
    cache.put("a", value)
    cache.put("a", value)  # the same object: not evicted
    assert evicted.calls == [] and cache.weight == 3
    cache.put("a", b"abcdef")  # another object: the old one is let go
    assert evicted.calls == [("a", b"abc")]
    assert cache.weight == 6 and len(cache) == 1


def test_set_budget_evicts_down_to_it_and_zero_disables() -> None:
    evicted = Recorder()
    cache: LruCache[str, bytes] = LruCache(100, weigh=len, on_evict=evicted)
    for key in "abcd":
        cache.put(key, key.encode() * 10)
    cache.get("a")
    cache.set_budget(25)  # order now b, c, d, a: keep the last two
    assert cache.budget == 25
    assert [k for k, _ in evicted.calls] == ["b", "c"]
    assert cache.weight == 20 and "d" in cache and "a" in cache
    cache.set_budget(0)
    assert len(cache) == 0 and cache.weight == 0
    assert not cache.put("e", b"e")  # nothing fits
    cache.set_budget(100)
    assert cache.put("e", b"e") and cache.get("e") == b"e"
    with pytest.raises(ValueError):
        cache.set_budget(-1)
    with pytest.raises(ValueError):
        LruCache(-1)


def test_get_or_create() -> None:
    evicted = Recorder()
    cache: LruCache[str, list[int]] = LruCache(1, on_evict=evicted)
    made: list[str] = []

    def factory(key: str) -> list[int]:
        made.append(key)
        return [len(made)]

    first = cache.get_or_create("a", lambda: factory("a"))
    assert cache.get_or_create("a", lambda: factory("a")) is first
    assert made == ["a"]
    second = cache.get_or_create("b", lambda: factory("b"))  # count budget 1: a is evicted
    assert evicted.calls == [("a", first)]
    assert cache.get("b") is second

    def failing() -> list[int]:
        raise RuntimeError("cannot open")

    with pytest.raises(RuntimeError):
        cache.get_or_create("c", failing)
    assert "c" not in cache and cache.get("b") is second


def test_pop_pop_where_and_clear() -> None:
    evicted = Recorder()
    cache: LruCache[tuple[int, int], str] = LruCache(10, on_evict=evicted)
    for reader in (1, 2):
        for tile in (0, 1, 2):
            cache.put((reader, tile), f"{reader}/{tile}")
    assert cache.pop((1, 0)) == "1/0"
    assert cache.pop((1, 0)) is None
    removed = cache.pop_where(lambda key: key[0] == 1)
    assert removed == [((1, 1), "1/1"), ((1, 2), "1/2")]
    assert len(cache) == 3 and cache.weight == 3
    assert evicted.calls == []  # handed back to the caller, not evicted
    cache.clear()
    assert evicted.calls == [((2, 0), "2/0"), ((2, 1), "2/1"), ((2, 2), "2/2")]
    assert len(cache) == 0 and cache.weight == 0


def test_on_evict_closes_evicted_resources_even_when_one_fails() -> None:
    class Resource:
        def __init__(self, name: str) -> None:
            self.name = name
            self.closed = False

        def close(self) -> None:
            self.closed = True
            if self.name == "bad":
                raise OSError("close failed")

    cache: LruCache[str, Resource] = LruCache(3, on_evict=lambda _key, value: value.close())
    resources = [Resource(n) for n in ("bad", "ok", "kept")]
    for r in resources:
        cache.put(r.name, r)
    with pytest.raises(OSError, match="close failed"):
        cache.set_budget(1)  # evicts "bad" then "ok": both get closed, then the error
    assert [r.closed for r in resources] == [True, True, False]
    assert len(cache) == 1


def test_on_evict_may_use_the_cache() -> None:
    seen: list[int | None] = []

    def on_evict(key: str, _value: int) -> None:
        seen.append(cache.get(key))

    cache: LruCache[str, int] = LruCache(1, on_evict=on_evict)
    cache.put("a", 1)
    cache.put("b", 2)  # the callback runs outside the lock: no deadlock, a is gone
    assert seen == [None]


def test_threads_keep_budget_and_weight_consistent() -> None:
    budget = 64
    evicted: list[int] = []
    lock = threading.Lock()

    def on_evict(_key: int, value: int) -> None:
        with lock:
            evicted.append(value)

    cache: LruCache[int, int] = LruCache(budget, weigh=lambda v: v % 3 + 1, on_evict=on_evict)
    created: list[int] = []
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(2000):
                key = (seed * 7919 + i * 31) % 200
                if i % 5 == 0:
                    cache.pop(key)
                elif i % 3 == 0:

                    def create(k: int = key) -> int:
                        created.append(k)
                        return k

                    assert cache.get_or_create(key, create) == key
                else:
                    cache.put(key, key)
                    got = cache.get(key)
                    assert got is None or got == key
                assert cache.weight <= budget
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert 0 < cache.weight <= budget
    keys = [k for k in range(200) if k in cache]
    assert cache.weight == sum(k % 3 + 1 for k in keys) and len(cache) == len(keys)
    assert evicted and created  # the budget was hit; get_or_create made values


def test_get_or_create_makes_each_key_once_across_threads() -> None:
    cache: LruCache[str, object] = LruCache(4)
    made: list[object] = []
    start = threading.Barrier(8)

    def factory() -> object:
        value = object()
        made.append(value)
        threading.Event().wait(0.01)  # a slow open: the others must wait, not open again
        return value

    got: list[object] = []

    def worker() -> None:
        start.wait()
        got.append(cache.get_or_create("slide", factory))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1
    assert len(got) == 8 and all(v is made[0] for v in got)
