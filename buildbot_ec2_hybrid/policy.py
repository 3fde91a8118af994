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
    #: Adaptive idle timeout (off when None). An idle worker all of whose builders have a free
    #: in-house worker is suspended after ``idle_grace`` seconds instead of ``idle_timeout``:
    #: new requests for those builders go in-house first, so keeping the instance is paying to
    #: wait for demand that is not coming, and past the cost of one revival (the seconds an
    #: instance is billed while it boots, see :func:`break_even_idle`) keeping it costs more
    #: than reviving it later. While the in-house fleet of any of its builders is saturated the
    #: next request will overflow, and ``idle_timeout`` applies.
    idle_grace: float | None = None


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


def break_even_idle(boot_billed: float, min_billed: float = 60.0) -> float:
    """Seconds of idling that cost as much as one stop and revival.

    A revival pays for the seconds the instance runs before its worker connects
    (``boot_billed``), and a run shorter than EC2's minimum billed time (``min_billed``, 60 s
    for per-second billing) is charged that minimum anyway. Keeping an idle instance longer than
    this is the "rent" that exceeds the "buy" in the ski-rental sense: suspending then costs at
    most twice what a clairvoyant policy pays for the same gap.
    """
    return max(float(boot_billed), float(min_billed))


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
        phase = w.phase
        if phase in RUNNING_PHASES:
            running += 1
            if w.availability_zone:
                az_load[w.availability_zone] = az_load.get(w.availability_zone, 0) + 1
        if phase is Phase.BOOTING and w.booked_for and need.get(w.booked_for):
            need[w.booked_for] -= 1
        elif phase is Phase.IDLE:
            idle.append(w)
        elif phase is Phase.STOPPED:
            if w.quarantined_until is not None and w.quarantined_until > now:
                wake_at = _earliest(wake_at, w.quarantined_until)
            else:
                stopped.append(w)

    # Idle connected workers will be handed the eligible requests by Buildbot itself: count them
    # as supply (preferring the builder they built last) so that nothing extra is revived.
    claimed_idle: set[str] = set()
    wanting = sorted(b for b, n in need.items() if n > 0)
    if wanting and idle:
        for w in sorted(idle, key=lambda v: v.name):
            if not wanting:
                break
            builder = _idle_target(w, need, wanting)
            if builder is None:
                continue
            need[builder] -= 1
            if not need[builder]:
                wanting.remove(builder)
            claimed_idle.add(w.name)

    # Serve the longest-waiting backlog first.
    order = sorted(
        (b for b, n in need.items() if n > 0),
        key=lambda b: (demand.oldest(b) or now, b),
    )
    capacity = max(0, config.max_running - running)
    picker = _Picker(stopped, az_load, unhealthy) if order and capacity and stopped else None
    for builder in order:
        wanted = need[builder]
        while picker is not None and wanted > 0 and capacity > 0:
            choice = picker.pick(builder)
            if choice is None:
                break
            warm = " (warm disk)" if choice.last_builder == builder else ""
            plan.revive.append(
                Revival(choice.name, builder, f"{builder} has {need[builder]} eligible{warm}")
            )
            wanted -= 1
            capacity -= 1
        if wanted > 0:
            plan.unmet[builder] = wanted

    pending = frozenset(demand.builders())
    grace = config.idle_grace
    adaptive = grace is not None and grace < config.idle_timeout
    saturated: dict[int, bool] = {}
    for w in idle:
        if w.name in claimed_idle or w.idle_since is None:
            continue
        if not pending.isdisjoint(w.builders):
            continue
        timeout = config.idle_timeout
        if adaptive:
            key = id(w.builders)
            full = saturated.get(key)
            if full is None:
                full = saturated[key] = any(free.get(b, 0) <= 0 for b in w.builders)
            if not full:
                timeout = grace  # type: ignore[assignment]
        expires = w.idle_since + timeout
        if expires <= now:
            why = "" if timeout == config.idle_timeout else ", its builders' in-house workers free"
            plan.suspend.append(
                Suspension(
                    w.name, f"idle {now - w.idle_since:.0f}s, no backlog on its builders{why}"
                )
            )
        else:
            wake_at = _earliest(wake_at, expires)

    plan.wake_at = wake_at
    return plan


def _idle_target(w: WorkerView, need: Mapping[str, int], wanting: list[str]) -> str | None:
    """The builder an idle worker will serve: the one it built last if that one wants workers,
    else the alphabetically first wanting builder it serves (whichever side is smaller is
    scanned, so thousands of idle workers on hundreds of builders stay cheap)."""
    last = w.last_builder
    if last is not None and need.get(last, 0) > 0 and last in w.builders:
        return last
    if len(w.builders) < len(wanting):
        targets = [b for b in w.builders if need.get(b, 0) > 0]
        return min(targets) if targets else None
    for b in wanting:
        if b in w.builders:
            return b
    return None


class _Picker:
    """Chooses stopped workers in :func:`_revival_rank` order without rescanning the pool.

    Within one availability zone the rank of every candidate shares the AZ's health and load,
    so the best one is the first warm worker for the builder by name, else the first by name:
    keep per-AZ name-sorted lists with a cursor per (AZ, builder) and compare only the AZs'
    heads. A pick costs O(AZs) plus the cursor moves, instead of a scan of every stopped worker.
    """

    def __init__(
        self, stopped: list[WorkerView], az_load: dict[str, int], unhealthy: frozenset[str]
    ) -> None:
        self._az_load = az_load
        self._unhealthy = unhealthy
        self._by_az: dict[str, list[WorkerView]] = {}
        self._warm: dict[tuple[str, str], list[WorkerView]] = {}
        for w in sorted(stopped, key=lambda v: v.name):
            az = w.availability_zone or ""
            self._by_az.setdefault(az, []).append(w)
            if w.last_builder is not None:
                self._warm.setdefault((az, w.last_builder), []).append(w)
        self._cold_at: dict[tuple[str, str], int] = {}
        self._warm_at: dict[tuple[str, str], int] = {}
        self._taken: set[str] = set()

    def _first(
        self, items: list[WorkerView], cursors: dict[tuple[str, str], int], key: tuple[str, str]
    ) -> WorkerView | None:
        builder = key[1]
        i = cursors.get(key, 0)
        taken = self._taken
        while i < len(items):
            w = items[i]
            if w.name not in taken and builder in w.builders:
                break
            i += 1
        cursors[key] = i
        return items[i] if i < len(items) else None

    def pick(self, builder: str) -> WorkerView | None:
        best: WorkerView | None = None
        best_rank: tuple | None = None
        for az, items in self._by_az.items():
            key = (az, builder)
            warm = self._warm.get(key)
            w = self._first(warm, self._warm_at, key) if warm else None
            if w is None:
                w = self._first(items, self._cold_at, key)
                if w is None:
                    continue
            rank = _revival_rank(w, builder, self._az_load, self._unhealthy)
            if best_rank is None or rank < best_rank:
                best, best_rank = w, rank
        if best is not None:
            self._taken.add(best.name)
            if best.availability_zone:
                az = best.availability_zone
                self._az_load[az] = self._az_load.get(az, 0) + 1
        return best


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
