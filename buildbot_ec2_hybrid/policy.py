"""Pure scaling decisions: (demand, pool state, clock) -> which instances to revive or suspend.

No I/O, no reactor, no Buildbot imports: the pool service and the simulator call exactly this code,
the way Kubernetes' cluster-autoscaler keeps planning apart from actuation and from the cloud.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field


class Phase(enum.Enum):
    """Where a pool worker stands, as far as scaling is concerned."""

    STOPPED = "stopped"  # instance stopped or hibernated; can be revived
    BOOTING = "booting"  # revived (or being adopted), worker not connected yet
    IDLE = "idle"  # connected, no build
    BUSY = "busy"  # connected, at least one build running
    STOPPING = "stopping"  # being suspended
    UNUSABLE = "unusable"  # refused (wrong VPC, public IP, no tag...) or unknown to EC2


#: phases whose instance costs money (counted against ``max_running``)
RUNNING_PHASES = frozenset({Phase.BOOTING, Phase.IDLE, Phase.BUSY, Phase.STOPPING})


@dataclass(frozen=True)
class PolicyConfig:
    overflow_after: float = 60.0
    idle_timeout: float = 3600.0
    max_running: int = 1_000_000


@dataclass(frozen=True)
class WorkerView:
    """A pool worker as the policy sees it."""

    name: str
    phase: Phase
    builders: frozenset[str]  # overflow builders this worker may serve
    availability_zone: str | None = None
    last_builder: str | None = None  # warm disk: the builder it built last
    idle_since: float | None = None  # when it last became idle (IDLE phase only)
    booked_for: str | None = None  # builder it was revived for (BOOTING phase only)
    quarantined_until: float | None = None


@dataclass(frozen=True)
class Revival:
    worker: str
    builder: str
    reason: str


@dataclass(frozen=True)
class Suspension:
    worker: str
    reason: str


@dataclass
class Plan:
    revive: list[Revival] = field(default_factory=list)
    suspend: list[Suspension] = field(default_factory=list)
    #: the next clock value at which the decision can change without any new event
    #: (a request becoming eligible, an idle timeout expiring, a quarantine ending)
    wake_at: float | None = None
    #: eligible requests per builder that the plan could not cover (caps, quarantine)
    unmet: dict[str, int] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.revive and not self.suspend


class Demand:
    """Unclaimed requests per overflow builder, as sorted submission times.

    Kept sorted so that counting the eligible ones is a bisection, not a scan: the decision stays
    cheap with tens of thousands of pending requests.
    """

    def __init__(self, pending: Mapping[str, Iterable[float]] | None = None) -> None:
        self._pending: dict[str, list[float]] = {}
        for builder, times in (pending or {}).items():
            self._pending[builder] = sorted(times)

    def add(self, builder: str, submitted_at: float) -> None:
        bisect.insort(self._pending.setdefault(builder, []), submitted_at)

    def remove(self, builder: str, submitted_at: float) -> None:
        times = self._pending.get(builder)
        if not times:
            return
        i = bisect.bisect_left(times, submitted_at)
        if i < len(times) and times[i] == submitted_at:
            del times[i]
        if not times:
            del self._pending[builder]

    def builders(self) -> Iterable[str]:
        return self._pending.keys()

    def count(self, builder: str) -> int:
        return len(self._pending.get(builder, ()))

    def eligible(self, builder: str, now: float, overflow_after: float) -> int:
        times = self._pending.get(builder)
        if not times:
            return 0
        return bisect.bisect_right(times, now - overflow_after)

    def oldest(self, builder: str) -> float | None:
        times = self._pending.get(builder)
        return times[0] if times else None

    def next_eligible_at(self, builder: str, now: float, overflow_after: float) -> float | None:
        times = self._pending.get(builder)
        if not times:
            return None
        i = bisect.bisect_right(times, now - overflow_after)
        return times[i] + overflow_after if i < len(times) else None

    def total(self) -> int:
        return sum(len(t) for t in self._pending.values())


def _earliest(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def decide(
    demand: Demand,
    workers: Sequence[WorkerView],
    config: PolicyConfig,
    now: float,
    unhealthy_azs: Iterable[str] = (),
    inhouse_free: Mapping[str, int] | None = None,
) -> Plan:
    """What to revive and what to suspend right now.

    Revive exactly what the eligible backlog needs: per builder, eligible requests minus pool
    workers already idle or booting for it, within ``max_running``. Builders whose oldest eligible
    request has waited longest are served first when the cap bites. Suspend workers idle for
    ``idle_timeout`` whose builders have no pending request at all.

    ``inhouse_free`` counts, per builder, in-house workers that are free right now: Buildbot is
    about to hand them requests, so they cover that much of the backlog (in-house goes first).
    """
    plan = Plan()
    unhealthy = frozenset(unhealthy_azs)
    overflow_after = config.overflow_after

    need: dict[str, int] = {}
    wake_at: float | None = None
    free = inhouse_free or {}
    for builder in demand.builders():
        eligible = demand.eligible(builder, now, overflow_after) - free.get(builder, 0)
        if eligible > 0:
            need[builder] = eligible
        wake_at = _earliest(wake_at, demand.next_eligible_at(builder, now, overflow_after))

    running = 0
    idle: list[WorkerView] = []
    stopped: list[WorkerView] = []
    az_load: dict[str, int] = {}
    for w in workers:
        if w.phase in RUNNING_PHASES:
            running += 1
            if w.availability_zone:
                az_load[w.availability_zone] = az_load.get(w.availability_zone, 0) + 1
        if w.phase is Phase.BOOTING and w.booked_for and need.get(w.booked_for):
            need[w.booked_for] -= 1
        elif w.phase is Phase.IDLE:
            idle.append(w)
        elif w.phase is Phase.STOPPED:
            if w.quarantined_until is not None and w.quarantined_until > now:
                wake_at = _earliest(wake_at, w.quarantined_until)
            else:
                stopped.append(w)

    # Idle connected workers will be handed the eligible requests by Buildbot itself: count them
    # as supply (preferring the builder they built last) so that nothing extra is revived.
    claimed_idle: set[str] = set()
    for w in sorted(idle, key=lambda v: v.name):
        targets = [b for b in w.builders if need.get(b)]
        if not targets:
            continue
        builder = w.last_builder if w.last_builder in targets else min(targets)
        need[builder] -= 1
        claimed_idle.add(w.name)

    # Serve the longest-waiting backlog first.
    order = sorted(
        (b for b, n in need.items() if n > 0),
        key=lambda b: (demand.oldest(b) or now, b),
    )
    capacity = max(0, config.max_running - running)
    taken: set[str] = set()
    for builder in order:
        wanted = need[builder]
        candidates = [w for w in stopped if builder in w.builders and w.name not in taken]
        while wanted > 0 and capacity > 0 and candidates:
            choice = min(candidates, key=lambda w: _revival_rank(w, builder, az_load, unhealthy))
            candidates.remove(choice)
            taken.add(choice.name)
            if choice.availability_zone:
                az_load[choice.availability_zone] = az_load.get(choice.availability_zone, 0) + 1
            warm = " (warm disk)" if choice.last_builder == builder else ""
            plan.revive.append(
                Revival(choice.name, builder, f"{builder} has {need[builder]} eligible{warm}")
            )
            wanted -= 1
            capacity -= 1
        if wanted > 0:
            plan.unmet[builder] = wanted

    for w in idle:
        if w.name in claimed_idle or w.idle_since is None:
            continue
        if any(demand.count(b) for b in w.builders):
            continue
        expires = w.idle_since + config.idle_timeout
        if expires <= now:
            plan.suspend.append(
                Suspension(w.name, f"idle {now - w.idle_since:.0f}s, no backlog on its builders")
            )
        else:
            wake_at = _earliest(wake_at, expires)

    plan.wake_at = wake_at
    return plan


def _revival_rank(
    w: WorkerView, builder: str, az_load: Mapping[str, int], unhealthy: frozenset[str]
) -> tuple:
    """Smaller is better: healthy AZ, warm disk for this builder, least-loaded AZ, then name."""
    az = w.availability_zone or ""
    return (
        az in unhealthy,
        w.last_builder != builder,
        az_load.get(az, 0),
        w.name,
    )


def quarantine_delay(failures: int, base: float = 60.0, cap: float = 3600.0) -> float:
    """Growing back-off for an instance that failed to revive or connect."""
    return min(cap, base * (2 ** max(0, failures - 1)))
