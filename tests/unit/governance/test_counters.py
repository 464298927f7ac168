import itertools
import random

from meshnode.governance.counters import CounterEntry, SpendCounters


def test_own_slot_grows_and_totals_sum_nodes() -> None:
    a = SpendCounters("a")
    a.add("*", "2025-01", 1.5)
    a.add("*", "2025-01", 0.5)
    assert a.own("*", "2025-01") == 2.0
    a.merge([CounterEntry("b", "*", "2025-01", 3.0)])
    assert a.total("*", "2025-01") == 5.0
    assert a.own("*", "2025-01") == 2.0


def test_merge_is_idempotent_commutative_and_keeps_max() -> None:
    updates = [
        CounterEntry("a", "*", "d", 1.0),
        CounterEntry("a", "*", "d", 4.0),
        CounterEntry("b", "*", "d", 2.0),
        CounterEntry("b", "key:x", "d", 7.0),
        CounterEntry("c", "*", "d", 0.25),
        CounterEntry("a", "*", "d", 3.0),  # stale: must not lower a's slot
    ]
    totals = set()
    rng = random.Random(7)
    for _ in range(30):
        order = updates[:]
        rng.shuffle(order)
        n = SpendCounters("z")
        for e in itertools.chain(order, order):  # delivered twice
            n.merge([e])
        totals.add((n.total("*", "d"), n.total("key:x", "d")))
    assert totals == {(6.25, 7.0)}


def test_merge_returns_only_raised_slots() -> None:
    n = SpendCounters("a")
    assert len(n.merge([CounterEntry("b", "*", "d", 1.0)])) == 1
    assert n.merge([CounterEntry("b", "*", "d", 1.0)]) == []
    assert n.merge([CounterEntry("b", "*", "d", 0.5)]) == []


def test_two_nodes_exchanging_converge() -> None:
    a, b = SpendCounters("a"), SpendCounters("b")
    a.add("*", "d", 1.0)
    b.add("*", "d", 2.0)
    a.merge(b.entries())
    b.merge(a.entries())
    b.add("*", "d", 1.0)
    a.merge(b.entries())
    assert a.total("*", "d") == b.total("*", "d") == 4.0


def test_prune_drops_old_periods() -> None:
    n = SpendCounters("a")
    n.add("*", "2025-01-05", 1.0)
    n.add("*", "2025-02", 1.0)
    n.prune("2025-02")
    assert n.total("*", "2025-01-05") == 0.0
    assert n.total("*", "2025-02") == 1.0


def test_malformed_entries_are_rejected() -> None:
    assert CounterEntry.from_json(["a", "*", "d", 1]) == CounterEntry("a", "*", "d", 1.0)
    for bad in (["a", "*", "d", -1], ["a", "*", "d", "1"], ["a", "*", 1.0], None,
                ["a", "*", "d", float("nan")], ["a", "*", "d", True]):
        assert CounterEntry.from_json(bad) is None
