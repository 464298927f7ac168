"""The membership state machine: suspicion, refutation, incarnation order, leave, rejoin."""

from __future__ import annotations

import random

from meshnode.mesh.membership import Membership, MembershipSettings
from meshnode.mesh.state import MemberStatus, MemberUpdate, NodeState

S = MemberStatus


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


SETTINGS = MembershipSettings(
    probe_interval_s=0.5, probe_timeout_s=0.2, indirect_probes=2, suspicion_mult=4.0,
    dead_forget_s=30.0,
)


def table(node_id: str = "a", clock: FakeClock | None = None) -> tuple[Membership, FakeClock]:
    clock = clock or FakeClock()
    m = Membership(node_id, f"{node_id}:1", SETTINGS, clock, random.Random(7),
                   NodeState(node_id, 100, f"{node_id}:1"))
    return m, clock


def alive(node_id: str, inc: int = 0) -> MemberUpdate:
    return MemberUpdate(node_id, f"{node_id}:1", inc, S.ALIVE, node_id)


def test_alive_rumour_adds_member_and_stale_is_dropped() -> None:
    m, _ = table()
    assert m.apply(alive("b")) is not None
    assert m.get("b").status is S.ALIVE
    assert m.apply(alive("b")) is None  # same rumour again: stale, not spread again


def test_suspect_then_dead_after_timeout() -> None:
    m, clock = table()
    m.apply(alive("b"))
    m.apply(alive("c"))
    spread = m.probe_failed("b")
    assert spread == MemberUpdate("b", "b:1", 0, S.SUSPECT, "a")
    assert m.get("b").status is S.SUSPECT
    # Lifeguard: one confirmation is expected here (c); unconfirmed, the suspicion waits the
    # maximum (suspicion_max_mult times the base timeout).
    timeout = SETTINGS.suspicion_timeout(3) * SETTINGS.suspicion_max_mult
    clock.advance(timeout - 0.01)
    assert m.tick() == []
    clock.advance(0.02)
    dead = m.tick()
    assert [(u.node_id, u.status) for u in dead] == [("b", S.DEAD)]
    assert m.get("b").status is S.DEAD
    # A dead member is no longer probed.
    assert {m.next_probe_target().node_id for _ in range(4)} == {"c"}


def test_independent_confirmations_shrink_the_suspicion_timeout() -> None:
    m, clock = table()
    for name in ("b", "c", "d", "e"):
        m.apply(alive(name))
    base = SETTINGS.suspicion_timeout(5)
    high = base * SETTINGS.suspicion_max_mult
    m.probe_failed("b")
    assert m.get("b").suspect_deadline == clock.now + high
    # The same suspector again is no confirmation.
    assert m.apply(MemberUpdate("b", "b:1", 0, S.SUSPECT, "a")) is None
    assert m.get("b").suspect_deadline == clock.now + high
    m.apply(MemberUpdate("b", "b:1", 0, S.SUSPECT, "c"))
    one = m.get("b").suspect_deadline
    assert clock.now + base < one < clock.now + high
    m.apply(MemberUpdate("b", "b:1", 0, S.SUSPECT, "d"))  # K = 2 confirmations expected
    assert m.get("b").suspect_deadline == clock.now + base
    clock.advance(base + 0.01)
    assert [u.node_id for u in m.tick()] == ["b"]


def test_own_failed_probe_of_a_suspect_is_a_confirmation_to_spread() -> None:
    m, clock = table()
    for name in ("b", "c", "d"):
        m.apply(alive(name))
    m.apply(MemberUpdate("b", "b:1", 0, S.SUSPECT, "c"))
    before = m.get("b").suspect_deadline
    spread = m.probe_failed("b")
    assert spread == MemberUpdate("b", "b:1", 0, S.SUSPECT, "a")
    assert m.get("b").suspect_deadline < before
    assert m.probe_failed("b") is None  # confirmed once only


def test_local_health_stretches_probe_and_suspicion_timeouts() -> None:
    m, clock = table()
    m.apply(alive("b"))
    assert (m.probe_interval(), m.probe_timeout()) == (0.5, 0.2)
    m.adjust_awareness(3)
    assert (m.probe_interval(), m.probe_timeout()) == (2.0, 0.8)
    m.probe_failed("b")  # 2 members: no confirmations expected, the base times 4
    assert m.get("b").suspect_deadline == clock.now + SETTINGS.suspicion_timeout(2) * 4
    m.adjust_awareness(100)
    assert m.awareness == SETTINGS.max_awareness
    m.adjust_awareness(-100)
    assert m.awareness == 0


def test_refuting_a_suspicion_of_ourselves_raises_awareness() -> None:
    m, _ = table()
    assert m.apply(MemberUpdate("a", "a:1", 0, S.SUSPECT, "b")) is not None
    assert m.awareness == 1 and m.me.incarnation == 1


def test_refutation_with_higher_incarnation_clears_suspicion() -> None:
    m, clock = table()
    m.apply(alive("b"))
    m.probe_failed("b")
    # b heard the rumour and refuted at incarnation 1.
    assert m.apply(alive("b", 1)) is not None
    member = m.get("b")
    assert member.status is S.ALIVE and member.incarnation == 1
    clock.advance(60)
    assert m.tick() == []  # no stale suspicion timer fires


def test_ack_carrying_higher_incarnation_is_a_refutation() -> None:
    m, _ = table()
    m.apply(alive("b"))
    m.probe_failed("b")
    spread = m.probe_succeeded("b", incarnation=1)
    assert spread is not None and spread.status is S.ALIVE
    assert m.get("b").status is S.ALIVE


def test_node_refutes_rumours_about_itself() -> None:
    m, _ = table("a")
    refute = m.apply(MemberUpdate("a", "a:1", 0, S.SUSPECT, "b"))
    assert refute == MemberUpdate("a", "a:1", 1, S.ALIVE, "a")
    assert m.me.incarnation == 1
    # An older suspicion is ignored; a dead rumour at our incarnation is refuted again.
    assert m.apply(MemberUpdate("a", "a:1", 0, S.SUSPECT, "b")) is None
    again = m.apply(MemberUpdate("a", "a:1", 1, S.DEAD, "b"))
    assert again is not None and again.incarnation == 2 and again.status is S.ALIVE


def test_incarnation_ordering() -> None:
    m, _ = table()
    m.apply(alive("b", 3))
    # Lower incarnation never wins, whatever the status.
    assert m.apply(MemberUpdate("b", "b:1", 2, S.DEAD, "c")) is None
    assert m.get("b").status is S.ALIVE
    # Same incarnation: suspect beats alive, dead beats suspect, left beats dead.
    assert m.apply(MemberUpdate("b", "b:1", 3, S.SUSPECT, "c")) is not None
    assert m.apply(alive("b", 3)) is None
    assert m.apply(MemberUpdate("b", "b:1", 3, S.DEAD, "c")) is not None
    assert m.apply(MemberUpdate("b", "b:1", 3, S.SUSPECT, "c")) is None
    assert m.apply(MemberUpdate("b", "b:1", 3, S.LEFT, "b")) is not None
    assert m.get("b").status is S.LEFT
    # A higher incarnation alive wins over everything (rejoin).
    assert m.apply(alive("b", 4)) is not None
    assert m.get("b").status is S.ALIVE


def test_graceful_leave_is_spread_and_kept() -> None:
    m, _ = table("a")
    rumour = m.leave()
    assert rumour.status is S.LEFT and rumour.node_id == "a"
    assert m.me.state is not None and m.me.state.status == "left"
    # While leaving, a suspicion is answered with `left`, never with alive.
    answer = m.apply(MemberUpdate("a", "a:1", 0, S.SUSPECT, "b"))
    assert answer is not None and answer.status is S.LEFT and answer.incarnation == 1


def test_left_member_is_forgotten_and_dead_rumour_does_not_resurrect_it() -> None:
    m, clock = table()
    m.apply(alive("b"))
    m.apply(MemberUpdate("b", "b:1", 0, S.LEFT, "b"))
    clock.advance(SETTINGS.dead_forget_s + 1)
    m.tick()
    assert m.get("b") is None
    assert m.apply(MemberUpdate("b", "b:1", 0, S.DEAD, "c")) is None
    assert m.get("b") is None


def test_rejoin_after_death_refutes_with_higher_incarnation_and_newer_state() -> None:
    # The mesh (a) remembers b dead at incarnation 0; b restarts with incarnation 0.
    a, clock = table("a")
    a.apply(alive("b"))
    a.merge([])
    a.probe_failed("b")
    clock.advance(10)
    a.tick()
    assert a.get("b").status is S.DEAD
    b = Membership("b", "b:1", SETTINGS, clock, random.Random(1), NodeState("b", 5000, "b:1"))
    # b pushes its record: alive at 0 does not beat dead at 0 ...
    a.merge([b.own_record()])
    assert a.get("b").status is S.DEAD
    # ... but a's answer tells b it is dead, b refutes, and the refutation wins.
    refutations = b.merge(a.newer_than(b.digest()))
    about_b = [(u.incarnation, u.status) for u in refutations if u.node_id == "b"]
    assert about_b == [(1, S.ALIVE)]
    a.merge([b.own_record()])
    assert a.get("b").status is S.ALIVE and a.get("b").incarnation == 1
    assert a.get("b").state is not None and a.get("b").state.version == 5000


def test_probe_round_robin_covers_every_member_each_round() -> None:
    m, _ = table()
    for name in "bcde":
        m.apply(alive(name))
    first = [m.next_probe_target().node_id for _ in range(4)]
    second = [m.next_probe_target().node_id for _ in range(4)]
    assert sorted(first) == sorted(second) == list("bcde")


def test_indirect_helpers_exclude_target_self_and_suspects() -> None:
    m, _ = table()
    for name in "bcd":
        m.apply(alive(name))
    m.probe_failed("d")
    helpers = {h.node_id for h in m.indirect_helpers("b", 5)}
    assert helpers == {"c"}


def test_digest_exchange_sends_only_newer_states() -> None:
    a, clock = table("a")
    b = Membership("b", "b:1", SETTINGS, clock, random.Random(2), NodeState("b", 200, "b:1"))
    # First exchange: each learns the other.
    a.merge(b.newer_than(a.digest()) + [b.own_record()])
    b.merge(a.newer_than(b.digest()))
    assert a.get("b").state.version == 200 and b.get("a").state.version == 100
    # Nothing new: the answer is empty.
    assert a.newer_than(b.digest()) == [] and a.wants(b.digest()) == []
    # b changes its state: a wants it, and b sends only the state that changed.
    assert b.publish(NodeState("b", 0, "b:1", http_address="h:2"))
    assert a.wants(b.digest()) == ["b"]
    records = b.newer_than(a.digest())
    assert [r.member.node_id for r in records] == ["b"] and records[0].state is not None
    a.merge(records)
    assert a.get("b").state.http_address == "h:2"


def test_publish_without_change_keeps_version() -> None:
    m, _ = table("a")
    version = m.me.state_version
    assert not m.publish(NodeState("a", 0, "a:1"))
    assert m.me.state_version == version


def test_bounded_answers() -> None:
    clock = FakeClock()
    small = MembershipSettings(max_records_per_message=3)
    m = Membership("a", "a:1", small, clock, random.Random(3))
    for i in range(10):
        m.apply(alive(f"n{i}"))
    assert len(m.newer_than([])) == 3


def test_gossip_messages_stay_under_the_size_bound_with_big_states() -> None:
    """States carry governance pages; a joiner's answer is bounded in bytes, not only records,
    and what does not fit follows in later rounds (rumours always go)."""
    from meshnode.mesh.state import GossipRecord

    settings = MembershipSettings(max_bytes_per_message=1_000_000)
    clock = FakeClock()
    m = Membership("a", "a:1", settings, clock, random.Random(1), NodeState("a", 1, "a:1"))
    page = b"x" * 200_000
    for i in range(20):
        state = NodeState(f"n{i}", 1, f"n{i}:1", blobs={"governance.keys.00": page})
        m.merge([GossipRecord(alive(f"n{i}"), state)])
    answer = m.newer_than([])
    with_state = [r for r in answer if r.state is not None]
    assert sum(r.state.wire_size() for r in with_state) <= 1_000_000  # type: ignore[union-attr]
    assert 1 <= len(with_state) < 20 and len(answer) == 21  # every rumour, some states
    asked = m.records_for([f"n{i}" for i in range(20)])
    assert sum(r.state.wire_size() for r in asked if r.state) <= 1_000_000
    assert 1 <= len(asked) < 20


def test_unchanged_blobs_are_left_out_for_a_peer_that_holds_them() -> None:
    """Protocol 2: a new version of a state travels without the blobs the receiver's copy
    already holds (a spend page changed, the key pages did not); the receiver fills them in."""
    from meshnode.mesh.state import DigestEntry, GossipRecord

    clock = FakeClock()
    keys, spend = b"k" * 50_000, b"s1"
    owner = Membership("o", "o:1", SETTINGS, clock, random.Random(1),
                       NodeState("o", 1, "o:1"))
    owner.publish(NodeState("o", 0, "o:1", blobs={"keys": keys, "spend": spend}))
    relay = Membership("r", "r:1", SETTINGS, clock, random.Random(2), NodeState("r", 1, "r:1"))
    reader = Membership("x", "x:1", SETTINGS, clock, random.Random(3), NodeState("x", 1, "x:1"))
    for t in (relay, reader):
        t.merge([owner.own_record()])
    relay.merge([reader.own_record()])
    first = owner.me.state_version
    owner.publish(NodeState("o", 0, "o:1", blobs={"keys": keys, "spend": b"s2"}))
    relay.merge([owner.own_record()])
    # reader's digest says it holds o at `first`: the relay leaves the key page out.
    digest = [DigestEntry("o", 0, MemberStatus.ALIVE, first), *[
        d for d in reader.digest() if d.node_id != "o"]]
    (record,) = [r for r in relay.newer_than(digest, "x") if r.member.node_id == "o"]
    assert record.state is not None and record.state.elided == ("keys",)
    assert set(record.state.blobs) == {"spend"} and record.state.wire_size() < 1_000
    reader.merge([record])
    got = reader.get("o")
    assert got is not None and got.state is not None
    assert got.state.blobs == {"keys": keys, "spend": b"s2"} and not got.state.elided
    # The push after `wants` does the same with the versions the receiver said it holds.
    (pushed,) = relay.records_for(["o"], [first])
    assert pushed.state is not None and pushed.state.elided == ("keys",)
    (whole_push,) = relay.records_for(["o"])
    assert whole_push.state is not None and not whole_push.state.elided
    # A peer on protocol 1 (or unknown) always gets the whole state.
    (whole,) = [r for r in relay.newer_than(digest) if r.member.node_id == "o"]
    assert whole.state is not None and not whole.state.elided
    # A copy too old to hold the left-out blob: not merged (it comes whole next round).
    stale = Membership("y", "y:1", SETTINGS, clock, random.Random(4), NodeState("y", 1, "y:1"))
    stale.merge([GossipRecord(record.member, None)])
    stale.merge([record])
    assert stale.get("o") is not None and stale.get("o").state is None  # type: ignore[union-attr]
