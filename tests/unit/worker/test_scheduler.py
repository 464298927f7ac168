"""The scheduler alone (pure: no model): slots, admission order, bounded prefill chunks."""

from __future__ import annotations

import pytest

from meshnode.worker.scheduler import Scheduler, Sequence


def test_slots_are_handed_out_lowest_first_and_reused_after_release() -> None:
    s = Scheduler(max_batch=4, chunk_tokens=64)
    a, b = Sequence(1, 10), Sequence(2, 10, n=2)
    s.add(a)
    s.add(b)
    assert s.admit() == [a, b]
    assert a.slots == [0] and b.slots == [1, 2]
    s.release(1)
    c = Sequence(3, 5)
    s.add(c)
    assert s.admit() == [c] and c.slots == [1]


def test_a_sequence_waits_for_its_slots_in_arrival_order() -> None:
    s = Scheduler(max_batch=2, chunk_tokens=64)
    first, wide, small = Sequence(1, 4), Sequence(2, 4, n=2), Sequence(3, 4)
    for seq in (first, wide, small):
        s.add(seq)
    assert s.admit() == [first]  # `wide` needs two slots; `small` does not jump the queue
    s.advance(s.plan().chunks[0])
    s.release(first.slots[0])
    assert s.admit() == [wide]
    assert list(s.waiting) == [small]


def test_prefill_is_chunked_and_decode_rows_run_every_step() -> None:
    s = Scheduler(max_batch=4, chunk_tokens=8)
    short, long = Sequence(1, 3), Sequence(2, 20)
    s.add(short)
    s.admit()
    s.advance(s.plan().chunks[0])
    assert s.decoding == {0}
    s.add(long)
    s.admit()
    sizes = []
    while long in s.prefilling:
        plan = s.plan()
        assert plan.decode == (0,)  # the running row decodes in every step of the prefill
        assert sum(1 for _ in plan.chunks) * plan.width <= 8
        sizes.append(plan.chunks[0].end - plan.chunks[0].start)
        s.advance(plan.chunks[0])
    assert sizes == [8, 8, 4]
    assert s.decoding == {0, 1}


def test_small_prompts_share_one_prefill_within_the_budget() -> None:
    s = Scheduler(max_batch=8, chunk_tokens=16)
    for key in range(5):
        s.add(Sequence(key, 4))
    s.admit()
    plan = s.plan()
    assert [c.sequence.key for c in plan.chunks] == [0, 1, 2, 3]  # 4 rows x 4 = 16
    assert plan.width == 4


def test_a_failed_step_is_planned_again_and_drop_frees_slots() -> None:
    s = Scheduler(max_batch=2, chunk_tokens=4)
    seq = Sequence(1, 10)
    s.add(seq)
    s.admit()
    first = s.plan()
    assert s.plan() == first  # nothing advanced: the same chunk again
    s.drop(seq, seq.slots)
    assert s.free_slots == 2 and not s.prefilling


def test_more_rows_than_slots_is_refused() -> None:
    with pytest.raises(ValueError):
        Scheduler(max_batch=2, chunk_tokens=4).add(Sequence(1, 3, n=3))


def test_a_held_back_head_waits_and_keeps_the_order() -> None:
    s = Scheduler(max_batch=4, chunk_tokens=64)
    first, second = Sequence(1, 40), Sequence(2, 40)
    s.add(first)
    s.add(second)
    assert s.admit(lambda seq: seq.key == 1) == [first]
    assert list(s.waiting) == [second]
    assert s.admit(lambda seq: True) == [second]
