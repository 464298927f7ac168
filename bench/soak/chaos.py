"""The soak's fault schedule, repeated until the run's chaos window closes.

One cycle (about `cycle_s` seconds, its steps spread evenly):
1. A's upstream answers 500, then resets connections: A fails over to its peers;
2. C is frozen (SIGSTOP) for `freeze_s`: its probes and gossip go unanswered, the mesh suspects
   it, and it must refute when thawed (SIGCONT); forwarded calls wait;
3. B's upstream rate-limits (429 with Retry-After): B cools it down and fails over;
4. C is killed (SIGKILL) and restarted `down_s` later with the same id and data dir;
5. B is frozen for a shorter while (its own clients wait; A sees it suspect).

Only signals to processes the soak started; every step is logged with its time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.soak.cluster import SoakCluster
from tests.kit.fake_openai import Behaviour


@dataclass
class ChaosEvent:
    t: float  # seconds since the soak started
    what: str


@dataclass
class Chaos:
    cluster: SoakCluster
    started: float
    until: float  # monotonic time after which no new fault starts
    cycle_s: float = 60.0
    freeze_s: float = 2.5
    down_s: float = 2.0
    events: list[ChaosEvent] = field(default_factory=list)
    kills: int = 0
    freezes: int = 0
    upstream_faults: int = 0

    def _note(self, what: str) -> None:
        self.events.append(ChaosEvent(round(time.monotonic() - self.started, 1), what))

    def _steps(self) -> list[tuple[str, Callable[[], None]]]:
        return [
            ("A's upstream: 12 x HTTP 500, then 4 x TCP reset", self._fail_a),
            (f"C frozen (SIGSTOP) {self.freeze_s:g} s", lambda: self._freeze("c", self.freeze_s)),
            ("B's upstream: 10 x HTTP 429 Retry-After 1", self._rate_limit_b),
            ("C killed (SIGKILL), restarted", self._kill_restart_c),
            (f"B frozen (SIGSTOP) {self.freeze_s / 2:g} s",
             lambda: self._freeze("b", self.freeze_s / 2)),
        ]

    async def run(self) -> None:
        steps = self._steps()
        gap = self.cycle_s / len(steps)
        i = 0
        while True:
            await asyncio.sleep(gap)
            if time.monotonic() >= self.until:
                return
            what, step = steps[i % len(steps)]
            self._note(what)
            await asyncio.to_thread(step)
            i += 1

    # ------------------------------------------------------------------ faults
    def _fail_a(self) -> None:
        self.cluster.fakes["a"].script(Behaviour.error(500, times=12),
                                       Behaviour.reset_before(times=4))
        self.upstream_faults += 16

    def _rate_limit_b(self) -> None:
        self.cluster.fakes["b"].script(Behaviour.rate_limited("1", times=10))
        self.upstream_faults += 10

    def _freeze(self, name: str, seconds: float) -> None:
        pid = self.cluster.nodes[name].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
        self.freezes += 1

    def _kill_restart_c(self) -> None:
        self.cluster.nodes["c"].kill()
        self.kills += 1
        time.sleep(self.down_s)
        self.cluster.restart_c()
        self._note(f"C restarted (life {self.cluster.c_lives})")
