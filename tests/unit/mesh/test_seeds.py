"""Seeds: DNS names with several addresses, own address skipped, retried with backoff."""

from __future__ import annotations

import asyncio
import random

from meshnode.mesh.seeds import Backoff, SeedJoiner, resolve_seed
from tests.kit.wait import wait_for


async def test_ip_literal_resolves_to_itself_and_ipv6_is_bracketed() -> None:
    assert await resolve_seed("127.0.0.1:7000") == ["127.0.0.1:7000"]
    assert await resolve_seed("[::1]:7000") == ["[::1]:7000"]


async def test_dns_name_resolves_through_getaddrinfo() -> None:
    # `localhost` comes from /etc/hosts: no DNS traffic leaves the machine.
    addresses = await resolve_seed("localhost:7000")
    assert addresses and all(a.endswith(":7000") for a in addresses)
    assert any(a.startswith(("127.", "[::1]")) for a in addresses)


async def test_every_address_of_a_name_is_tried_and_own_address_skipped() -> None:
    tried: list[str] = []

    async def resolve(seed: str) -> list[str]:
        return ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]  # a headless Service's pods

    async def join(address: str) -> bool:
        tried.append(address)
        return address == "10.0.0.3:1"

    joiner = SeedJoiner(["svc:1"], join, alone=lambda: True, own_addresses=["10.0.0.1:1"],
                        resolve=resolve)
    assert await joiner.try_once()
    assert tried == ["10.0.0.2:1", "10.0.0.3:1"]


async def test_retried_with_backoff_until_a_seed_answers() -> None:
    attempts = 0

    async def join(address: str) -> bool:
        nonlocal attempts
        attempts += 1
        return attempts >= 4

    async def resolve(seed: str) -> list[str]:
        return [seed]

    joined = False
    joiner = SeedJoiner(["s:1"], join, alone=lambda: not joined, resolve=resolve,
                        backoff=Backoff(initial_s=0.001, max_s=0.004), rng=random.Random(1),
                        check_interval_s=0.01)
    task = asyncio.create_task(joiner.run())
    await asyncio.wait_for(joiner.joined.wait(), 10)
    joined = True
    task.cancel()
    assert attempts == 4


def test_backoff_grows_and_is_capped() -> None:
    backoff = Backoff(initial_s=0.2, max_s=5.0, multiplier=2.0, jitter=0.0)
    rng = random.Random(0)
    assert [backoff.delay(i, rng) for i in range(7)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


async def test_seeds_that_are_not_live_members_are_knocked_on_while_not_alone() -> None:
    """After a long partition each half has forgotten the other and neither is alone: only a
    periodic knock on the seeds that are not live members brings them back together."""
    tried: list[str] = []
    live = {"10.0.0.2:1"}  # our half: seed 2 is with us, seed 3 is across the old partition

    async def resolve(seed: str) -> list[str]:
        return ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]

    async def join(address: str) -> bool:
        tried.append(address)
        live.add(address)
        return True

    joiner = SeedJoiner(["svc:1"], join, alone=lambda: False, own_addresses=["10.0.0.1:1"],
                        resolve=resolve, live_addresses=lambda: set(live),
                        check_interval_s=0.005, recontact_interval_s=0.01)
    assert await joiner.recontact() == 1
    assert tried == ["10.0.0.3:1"]  # not ourselves, not a live member
    assert await joiner.recontact() == 0  # nothing left to knock on
    task = asyncio.create_task(joiner.run())
    live.discard("10.0.0.3:1")  # the other half is gone from our view again
    try:
        await wait_for(lambda: tried.count("10.0.0.3:1") >= 2, "the joiner knocks on c again")
    finally:
        task.cancel()
    assert "10.0.0.2:1" not in tried
