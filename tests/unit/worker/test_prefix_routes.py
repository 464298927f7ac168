"""Routing names follow the engine's prefix store: tied to the blocks that hold their share of
the prompt, dropped when the store evicts those blocks (worker/prefix.py `RoutedNames`)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from meshnode.routing.prefix import BLOCK_BYTES, chain, render
from meshnode.worker.engine import EngineOptions, GenerationEngine
from meshnode.worker.models import encode_prompt
from meshnode.worker.params import SamplingParams
from meshnode.worker.prefix import Route, RoutedNames


def names(n: int, tag: str = "r") -> tuple[bytes, ...]:
    return tuple(f"{tag}{i:07d}".encode() for i in range(n))


def blocks(n: int, tag: str = "e") -> list[bytes]:
    return [f"{tag}{i:015d}".encode() for i in range(n)]


def test_each_name_is_tied_to_the_block_ending_at_its_share_of_the_prompt() -> None:
    routes = RoutedNames()
    # 4 routing blocks over 1,024 bytes; 64 prompt tokens in blocks of 16: name i covers
    # (i + 1) quarters of the prompt, so it needs engine block i.
    route = Route(names(4), 4 * BLOCK_BYTES)
    held = blocks(4)
    routes.link(route, held, 16, 64)
    assert routes.names() == list(names(4))  # most recent first: the parent before its child
    routes.evicted(held[2])  # the store evicts a chain's tail first
    assert set(routes.names()) == {names(4)[0], names(4)[1], names(4)[3]}
    routes.evicted(held[3])
    routes.evicted(held[0])
    assert routes.names() == [names(4)[1]]


def test_a_name_past_the_held_blocks_is_not_claimed() -> None:
    routes = RoutedNames()
    # The rendering is longer than what the store holds of the prompt (only full blocks, and
    # the pool may have cut the chain): the last names have no block and are left out.
    routes.link(Route(names(4), 4 * BLOCK_BYTES), blocks(2), 16, 64)
    assert set(routes.names()) == set(names(2))
    # Rounding is up: a name never outlives the block its bytes end in.
    routes = RoutedNames()
    routes.link(Route(names(1), 3 * BLOCK_BYTES), blocks(3), 16, 48)  # 256 of 768 bytes
    routes.evicted(blocks(3)[0])
    assert len(routes) == 0


def test_a_newer_link_moves_a_name_and_the_index_is_bounded() -> None:
    routes = RoutedNames(capacity=6)
    routes.link(Route(names(2), 2 * BLOCK_BYTES), blocks(2, "a"), 16, 32)
    routes.link(Route(names(2), 2 * BLOCK_BYTES), blocks(2, "b"), 16, 32)  # re-stored elsewhere
    routes.evicted(blocks(2, "a")[0])
    assert set(routes.names()) == set(names(2))  # tied to the newer blocks now
    routes.link(Route(names(5, "s"), 5 * BLOCK_BYTES), blocks(5, "c"), 16, 80)
    assert len(routes) == 6 and routes.names()[:5] == list(names(5, "s"))
    assert names(2)[1] not in routes  # the least recent went
    routes.evicted(blocks(2, "b")[1])  # an eviction of a name already gone changes nothing
    assert len(routes) == 6


@pytest.mark.slow
def test_the_engine_drops_a_prompts_routing_names_when_it_evicts_its_blocks(
        tiny_gpt2: Any) -> None:
    model, tokenizer, _ = tiny_gpt2
    # A 1 MB pool holds 64 blocks (1,024 tokens) of tiny-gpt2's KV: two of these prompts of 25
    # blocks and a half.
    engine = GenerationEngine(model, tokenizer, torch.device("cpu"), 2,
                              EngineOptions(prefix_cache_mb=1))
    greedy = SamplingParams(max_tokens=2, temperature=0.0)

    def serve(request_id: int, topic: str) -> tuple[bytes, ...]:
        body = {"messages": [{"role": "user",
                              "content": " ".join(f"{topic}{i % 23}" for i in range(60))}]}
        text = render(body)
        route = Route(chain("tiny-gpt2", text), len(text))
        prompt = encode_prompt(tokenizer, body["messages"], None)
        assert 350 < len(prompt) < 500
        engine.submit(request_id, prompt, greedy, route)
        while engine.has_work():
            engine.step()
        return route.names

    first = serve(1, "apple")
    assert first and set(first) <= set(engine.routed_names(512))
    second = serve(2, "brick")
    third = serve(3, "cloud")  # the pool is full: the tail of the first prompt's chain goes
    fourth = serve(4, "dunes")  # and then the rest of it, and the tail of the second's
    held = set(engine.routed_names(512))
    assert set(third) | set(fourth) <= held
    assert not set(first) & held  # its blocks were evicted to make room: its names went too
    assert set(second) <= held  # its name covers its head, which is still held
    assert engine.routed_names(512)[0] == fourth[0]  # most recent first
