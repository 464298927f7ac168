"""Routing prefix names: a later turn of a conversation names the earlier turn's blocks the
same way on any node; the index is bounded and most recent first."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable

from meshnode.routing.prefix import (
    BLOCK_BYTES,
    MAX_NAMES,
    NAME_BYTES,
    PrefixIndex,
    decode_names,
    encode_names,
    leading_hits,
    render,
    request_prefix,
    worker_route,
)

SYSTEM = {"role": "system", "content": "You are terse. " * 80}  # ~1,200 characters


def turn(n: int) -> dict:
    messages = [SYSTEM]
    for i in range(n):
        messages.append({"role": "user", "content": f"question {i} " * 20})
        messages.append({"role": "assistant", "content": f"answer {i} " * 20})
    messages.append({"role": "user", "content": "and now?"})
    return {"model": "m", "messages": messages, "temperature": 0.3 * n}


def test_a_later_turn_holds_the_earlier_turns_blocks() -> None:
    first, third = request_prefix("m", turn(0)), request_prefix("m", turn(2))
    assert len(first.chain) >= 4 and len(third.chain) > len(first.chain)
    assert third.chain[:len(first.chain)] == first.chain
    assert all(len(n) == NAME_BYTES for n in third.chain)
    index = PrefixIndex()
    index.record(first.chain)
    assert leading_hits(third.chain, index) == len(first.chain)
    # Sampling settings are not prompt: the names do not change with them.
    again = dict(turn(2), temperature=1.5)
    assert request_prefix("m", again) == third


def conversation(opening: str, turns: int, system: dict = SYSTEM) -> dict:
    """A conversation that keeps its first user message as it grows, as real ones do."""
    messages = [system, {"role": "user", "content": opening}]
    for i in range(turns):
        messages.append({"role": "assistant", "content": f"answer {i} " * 20})
        messages.append({"role": "user", "content": f"question {i} " * 20})
    return {"model": "m", "messages": messages}


def test_the_affinity_key_is_the_conversations_opening() -> None:
    first = request_prefix("m", conversation("plan my trip", 0))
    later = request_prefix("m", conversation("plan my trip", 3))
    assert first.source == later.source == "opening"
    assert first.affinity == later.affinity  # every turn keys where its first turn went
    # The same system prompt with another first question: the same first block, another key
    # (conversations sharing a system prompt spread instead of all keying on its first block).
    other = request_prefix("m", conversation("fix my bike", 3))
    assert other.chain[0] == first.chain[0] and other.affinity != first.affinity
    assert request_prefix("n", conversation("plan my trip", 0)).affinity != first.affinity
    # Anthropic's top-level system prompt is part of the opening.
    a = {"system": "Be brief.", "messages": [{"role": "user", "content": "hi"}]}
    b = {"system": "Be kind.", "messages": [{"role": "user", "content": "hi"}]}
    assert request_prefix("m", a).affinity != request_prefix("m", b).affinity
    # No user message: keyed on the first block as before.
    no_user = request_prefix("m", {"messages": [SYSTEM]})
    assert no_user.source == "first block" and no_user.affinity == no_user.chain[0]


def test_names_depend_on_the_model_and_the_text_only() -> None:
    a = request_prefix("m", turn(1))
    assert request_prefix("m", turn(1)) == a  # another node, the same names
    assert request_prefix("other", turn(1)).chain[0] != a.chain[0]
    other_system = turn(1)
    other_system["messages"][0] = {"role": "system", "content": "Be kind. " * 80}
    assert leading_hits(request_prefix("m", other_system).chain, set(a.chain)) == 0


def test_what_a_worker_ties_to_its_blocks_is_the_routers_names_made_once(monkeypatch) -> None:
    from meshnode.routing import prefix as prefix_module

    body = turn(2)
    named = request_prefix("m", body, {"x-aiproxy-session": "s1"})
    assert named.rendered_bytes == len(render(body))
    # Made from the body (no ranking named it) and handed over by the router: the same.
    own = worker_route("m", body)
    assert own == (encode_names(named.chain), len(render(body)))
    calls: list[int] = []
    real = prefix_module.render

    def counting(b):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(b)

    monkeypatch.setattr(prefix_module, "render", counting)
    assert worker_route("m", body, named) == own and calls == []  # nothing named again
    assert worker_route("m", {"prompt": "hi"}) is None and calls == [1]  # no full block
    assert worker_route("m", body, request_prefix("m", {"prompt": "hi"})) is None


def test_short_prompts_and_sessions_still_have_an_affinity_key() -> None:
    short = request_prefix("m", {"prompt": "hi"})
    assert short.chain == () and short.source == "whole prompt" and short.affinity
    assert short.affinity != request_prefix("m", {"prompt": "hello"}).affinity
    chat = request_prefix("m", {"messages": [{"role": "user", "content": "hi"}]})
    assert chat.chain == () and chat.source == "opening" and chat.affinity != short.affinity
    session = request_prefix("m", turn(0), {"x-aiproxy-session": "s1"})
    assert session.source == "session" and session.affinity.endswith(b"s1")
    assert len(request_prefix("m", {"prompt": "x" * (3 * BLOCK_BYTES)}).chain) == 3


def test_the_index_is_bounded_and_drops_the_tail_of_old_chains_first() -> None:
    index = PrefixIndex(capacity=6)
    old = request_prefix("m", turn(0)).chain[:4]
    new = request_prefix("n", turn(0)).chain[:4]
    index.record(old)
    index.record(new)
    assert len(index) == 6
    assert index.names()[:4] == new  # most recent first, parents before children
    assert old[0] in index and old[1] in index and old[3] not in index
    assert leading_hits(old, index) == 2


def test_names_on_the_wire_are_bounded() -> None:
    names = tuple(bytes([i % 256, i // 256]) * 4 for i in range(MAX_NAMES + 10))
    blob = encode_names(names)
    assert len(blob) == MAX_NAMES * NAME_BYTES
    assert decode_names(blob) == names[:MAX_NAMES]
    assert decode_names(blob[:NAME_BYTES * 3 + 5]) == names[:3]  # a ragged tail is dropped


def eager_index(chains: list[tuple[bytes, ...]], capacity: int) -> tuple[bytes, ...]:
    """What the index held when every chain was named as it was served (the reference)."""
    names: OrderedDict[bytes, None] = OrderedDict()
    for names_of in chains:
        for name in reversed(names_of):
            names[name] = None
            names.move_to_end(name)
        while len(names) > capacity:
            names.popitem(last=False)
    return tuple(reversed(names))


def test_deferred_naming_reads_as_if_every_prompt_was_named_when_served() -> None:
    rng = random.Random(7)
    pool = [bytes([i]) * NAME_BYTES for i in range(40)]
    for _ in range(200):
        capacity = rng.randint(1, 12)
        chains = [tuple(rng.sample(pool, rng.randint(0, 6))) for _ in range(rng.randint(0, 30))]
        index = PrefixIndex(capacity=capacity, max_pending=rng.randint(1, 8))
        for i, names in enumerate(chains):
            if i % 3:
                index.record_later(lambda names=names: names)
            else:
                index.record(names)
            if rng.random() < 0.2:
                assert index.names() == eager_index(chains[:i + 1], capacity)
        assert index.names() == eager_index(chains, capacity)


def test_prompts_that_can_no_longer_matter_are_never_named() -> None:
    index = PrefixIndex(capacity=4, max_pending=10)
    named: list[int] = []

    def later(i: int) -> Callable[[], tuple[bytes, ...]]:
        def names() -> tuple[bytes, ...]:
            named.append(i)
            return tuple(bytes([i, j]) * 4 for j in range(2))
        return names

    for i in range(5):
        index.record_later(later(i))
    assert len(index) == 4
    assert named == [4, 3]  # the two newest prompts fill the index; older ones were evicted
