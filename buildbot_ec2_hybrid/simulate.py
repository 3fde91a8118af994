"""Replay a build-request trace through the pool's own policy on a virtual clock.

The simulator models what the policy does not see: an in-house fleet that takes requests first,
EC2 instances that take time to boot (stop/start) or resume (hibernate), a pool worker that takes
a request only once it has waited ``overflow_after``, and EC2's per-second billing. The decisions
themselves come from :func:`buildbot_ec2_hybrid.policy.decide`, the very function the pool calls
in the master, so what the simulator says about a setting is what the pool would do with it.

Strategies compared on one trace (see :func:`standard_strategies`):

* ``ours``: the pool, event-driven (a decision after every change, and at the policy's wake-up),
  with a small reaction delay from decision to API call (measured in the sandbox);
* ``mozilla-2012``: the same decisions taken only on a one-minute poll, as Mozilla RelEng's 2012
  cron scripts did (watch pending every minute, start after 60 s pending, stop after 60 minutes
  idle), and stop/start only (EC2 had no hibernation then);
* ``per-build``: no warm pool: each eligible request binds a fresh instance that boots in full,
  runs that one build and goes away (Buildbot's stock EC2 latent worker with
  ``build_wait_timeout=0``);
* ``clairvoyant``: a lower bound: requests that the in-house fleet cannot start within
  ``overflow_after`` find an instance ready at that very moment, instances never idle except to
  bridge a gap shorter than a revival, and every start pays only the cheapest boot.

No I/O, no reactor: a run is a pure function of (trace, farm, cloud model, strategy).
"""

from __future__ import annotations

import csv
import fnmatch
import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from pathlib import Path
from typing import Any
from typing import TextIO

from buildbot_ec2_hybrid import policy
from buildbot_ec2_hybrid.policy import Demand
from buildbot_ec2_hybrid.policy import Phase
from buildbot_ec2_hybrid.policy import PolicyConfig
from buildbot_ec2_hybrid.policy import WorkerView

HOUR = 3600.0
#: hours in an average month, the unit AWS prices EBS storage in
MONTH_HOURS = 730.0


# -- inputs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    submitted: float
    builder: str
    duration: float


def read_trace(source: str | Path | TextIO) -> list[Request]:
    """Read a trace CSV (header ``submitted,builder,duration``), sorted by submission time."""
    if isinstance(source, (str, Path)):
        with open(source, newline="", encoding="utf-8") as f:
            return read_trace(f)
    reader = csv.DictReader(source)
    missing = {"submitted", "builder", "duration"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(
            f"trace CSV needs the columns submitted,builder,duration; missing {sorted(missing)}"
        )
    requests = []
    for line, row in enumerate(reader, start=2):
        try:
            req = Request(float(row["submitted"]), row["builder"], float(row["duration"]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"trace line {line}: {e}") from None
        if not req.builder or req.duration < 0 or not math.isfinite(req.submitted):
            raise ValueError(f"trace line {line}: bad request {row}")
        requests.append(req)
    requests.sort(key=lambda r: r.submitted)
    return requests


def write_trace(requests: Iterable[Request], target: str | Path | TextIO) -> int:
    """Write requests as a trace CSV; returns how many were written."""
    if isinstance(target, (str, Path)):
        with open(target, "w", newline="", encoding="utf-8") as f:
            return write_trace(requests, f)
    writer = csv.writer(target)
    writer.writerow(["submitted", "builder", "duration"])
    n = 0
    for r in requests:
        writer.writerow([_num(r.submitted), r.builder, _num(r.duration)])
        n += 1
    return n


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


@dataclass(frozen=True)
class InhouseGroup:
    """``count`` identical in-house workers, each able to run any builder matching a pattern."""

    patterns: tuple[str, ...]
    count: int

    def serves(self, builder: str) -> bool:
        return any(fnmatch.fnmatchcase(builder, p) for p in self.patterns)


@dataclass(frozen=True)
class Farm:
    """The in-house fleet and the pool.

    Builders matching ``overflow`` may spill onto the pool (its ``pool_size`` instances spread
    over ``azs``); the others queue for their in-house workers however long it takes.
    """

    inhouse: tuple[InhouseGroup, ...]
    pool_size: int
    overflow: tuple[str, ...] = ("*",)
    azs: tuple[str, ...] = ("us-west-2a", "us-west-2b", "us-west-2c")

    def overflows(self, builder: str) -> bool:
        return any(fnmatch.fnmatchcase(builder, p) for p in self.overflow)


def parse_inhouse(specs: Iterable[str]) -> tuple[InhouseGroup, ...]:
    """``"linux64-*,linux32-*=20"`` -> a group of 20 workers serving both patterns."""
    groups = []
    for spec in specs:
        patterns, sep, count = spec.rpartition("=")
        if not sep or not patterns or not count.strip().isdigit():
            raise ValueError(f"in-house spec {spec!r}: write PATTERN[,PATTERN...]=COUNT")
        groups.append(
            InhouseGroup(tuple(p.strip() for p in patterns.split(",") if p.strip()), int(count))
        )
    return tuple(groups)


@dataclass(frozen=True)
class CloudModel:
    """EC2 timings and prices.

    Billing follows EC2's rules for Linux on-demand: per second with a one-minute minimum per
    start, billed while ``running`` (not while ``pending`` or ``stopping``) and while the
    instance writes its memory to disk when it hibernates.
    """

    #: StartInstances -> ``running``
    pending: float = 15.0
    #: StartInstances -> ``running`` for a hibernated instance (None: as ``pending``)
    resume_pending: float | None = None
    #: ``running`` -> worker connected, after a stop (the OS boots, buildbot-worker starts)
    boot: float = 45.0
    #: ``running`` -> worker connected, after a hibernation (memory is read back)
    resume: float = 12.0
    #: StopInstances -> ``stopped``
    stopping: float = 30.0
    #: StopInstances(Hibernate) -> ``stopped``; billed
    hibernating: float = 40.0
    #: on-demand USD per instance-hour (m5.2xlarge, Linux, us-west-2)
    price_per_hour: float = 0.384
    min_billed: float = 60.0
    #: EBS root volume per instance, and its USD price per GB-month (gp3)
    ebs_gb: float = 100.0
    ebs_price_gb_month: float = 0.08

    def connect_delay(self, hibernated: bool) -> float:
        return self.resume if hibernated else self.boot

    def pending_for(self, hibernated: bool) -> float:
        if hibernated and self.resume_pending is not None:
            return self.resume_pending
        return self.pending


@dataclass(frozen=True)
class Strategy:
    """How the cloud side is driven.

    ``kind``: ``event`` (the pool), ``poll`` (the same decisions, on a fixed poll),
    ``per-build`` (a fresh instance bound to each eligible request) or ``clairvoyant``.
    """

    name: str
    kind: str = "event"
    config: PolicyConfig = field(default_factory=PolicyConfig)
    hibernate: bool = False
    #: seconds from a decision to the EC2 call it makes
    reaction: float = 0.1
    poll_interval: float = 60.0
    #: where the first poll falls within the interval (cron runs on the minute)
    poll_phase: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("event", "poll", "per-build", "clairvoyant"):
            raise ValueError(f"unknown strategy kind {self.kind!r}")


def standard_strategies(
    config: PolicyConfig | None = None, best: PolicyConfig | None = None
) -> list[Strategy]:
    """The policies the performance report compares.

    ``config`` is "ours with the defaults" (overflow_after=60, idle_timeout=3600, stop/start);
    ``best`` the documented tuned settings (hibernation and the adaptive idle timeout).
    """
    config = config or PolicyConfig(overflow_after=60, idle_timeout=3600)
    best = best or best_config()
    legacy = PolicyConfig(overflow_after=60, idle_timeout=3600, max_running=config.max_running)
    return [
        Strategy("ours (defaults)", "event", config),
        Strategy("ours (best)", "event", best, hibernate=True),
        Strategy("mozilla-2012", "poll", legacy, reaction=0.0, poll_interval=60.0),
        Strategy("per-build", "per-build", legacy, reaction=0.0),
        Strategy("clairvoyant", "clairvoyant", legacy, hibernate=True, reaction=0.0),
    ]


def best_config(cloud: CloudModel | None = None, max_running: int = 1_000_000) -> PolicyConfig:
    """Our best documented settings (docs/performance.rst says how they were found): the default
    ``overflow_after``, hibernation, a shorter ``idle_timeout`` while in-house is saturated and
    the break-even grace once it has room."""
    cloud = cloud or CloudModel()
    return PolicyConfig(
        overflow_after=60,
        idle_timeout=300,
        max_running=max_running,
        idle_grace=policy.break_even_idle(cloud.resume + cloud.hibernating, cloud.min_billed),
    )


# -- outputs ----------------------------------------------------------------------------------


@dataclass
class Result:
    strategy: str
    requests: int
    #: waits of the requests on builders that may overflow: the ones the pool can change
    waits: list[float]
    #: waits of every request, builders that never overflow included
    all_waits: list[float]
    #: billed EC2 instance-seconds
    billed: float
    #: seconds pool instances spent running a build
    building: float
    revivals: int
    start_calls: int
    stop_calls: int
    ec2_builds: int
    decisions: int
    span: float
    pool_size: int
    storage_cost: float
    compute_cost: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def instance_hours(self) -> float:
        return self.billed / HOUR

    @property
    def cost(self) -> float:
        return self.compute_cost + self.storage_cost

    def wait(self, q: float) -> float:
        return percentile(self.waits, q)

    def row(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "requests": self.requests,
            "p50_wait_s": round(self.wait(50), 1),
            "p95_wait_s": round(self.wait(95), 1),
            "p99_wait_s": round(self.wait(99), 1),
            "mean_wait_s": round(sum(self.waits) / len(self.waits), 1) if self.waits else 0.0,
            "p95_wait_all_s": round(percentile(self.all_waits, 95), 1),
            "ec2_builds": self.ec2_builds,
            "instance_hours": round(self.instance_hours, 1),
            "idle_share": round(1 - self.building / self.billed, 3) if self.billed else 0.0,
            "revivals": self.revivals,
            "start_calls": self.start_calls,
            "compute_usd": round(self.compute_cost, 2),
            "storage_usd": round(self.storage_cost, 2),
            "cost_usd": round(self.cost, 2),
        }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, linear between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def format_table(results: Sequence[Result]) -> str:
    cols = [
        ("strategy", "strategy", "<"),
        ("p50_wait_s", "p50 wait s", ">"),
        ("p95_wait_s", "p95 wait s", ">"),
        ("p99_wait_s", "p99 wait s", ">"),
        ("ec2_builds", "EC2 builds", ">"),
        ("instance_hours", "inst-hours", ">"),
        ("idle_share", "idle", ">"),
        ("revivals", "revivals", ">"),
        ("start_calls", "start calls", ">"),
        ("cost_usd", "cost $", ">"),
    ]
    rows = [r.row() for r in results]
    widths = [max(len(title), *(len(str(row[key])) for row in rows)) for key, title, _ in cols]
    lines = ["  ".join(f"{title:{a}{w}}" for (_, title, a), w in zip(cols, widths, strict=True))]
    for row in rows:
        lines.append(
            "  ".join(f"{row[key]!s:{a}{w}}" for (key, _, a), w in zip(cols, widths, strict=True))
        )
    return "\n".join(lines)


# -- the simulation ---------------------------------------------------------------------------


class _Req:
    __slots__ = ("builder", "duration", "idx", "started", "submitted")

    def __init__(self, idx: int, r: Request) -> None:
        self.idx = idx
        self.submitted = r.submitted
        self.builder = r.builder
        self.duration = r.duration
        self.started: float | None = None


class _PoolWorker:
    __slots__ = (
        "az",
        "booked_for",
        "hibernated",
        "idle_since",
        "last_builder",
        "name",
        "phase",
        "running_since",
        "view",
    )

    def __init__(self, name: str, az: str) -> None:
        self.name = name
        self.az = az
        self.phase = Phase.STOPPED
        self.last_builder: str | None = None
        self.idle_since: float | None = None
        self.booked_for: str | None = None
        self.hibernated = False
        self.running_since: float | None = None
        self.view: WorkerView | None = None


# event kinds (at one instant they are all applied before anyone decides anything)
(
    _ARRIVE,
    _FINISH,
    _STARTED,
    _RUNNING,
    _CONNECT,
    _BOUND_CONNECT,
    _STOP_CALL,
    _STOPPED,
    _ELIGIBLE,
    _WAKE,
    _POLL,
) = range(11)


class Simulation:
    """One run of one strategy over one trace. Use :func:`simulate`."""

    def __init__(
        self, trace: Sequence[Request], farm: Farm, cloud: CloudModel, strategy: Strategy
    ) -> None:
        self.farm = farm
        self.cloud = cloud
        self.strategy = strategy
        self.config = strategy.config
        self.reqs = [_Req(i, r) for i, r in enumerate(trace)]
        builders = sorted({r.builder for r in trace})
        self.overflow = frozenset(b for b in builders if farm.overflows(b))
        self.overflow_list = sorted(self.overflow)
        self.groups = list(farm.inhouse)
        self.group_free = [g.count for g in self.groups]
        self.groups_of: dict[str, list[int]] = {
            b: [i for i, g in enumerate(self.groups) if g.serves(b)] for b in builders
        }
        self.group_builders: list[list[str]] = [
            [b for b in builders if i in self.groups_of[b]] for i in range(len(self.groups))
        ]
        self.pending: dict[str, deque[_Req]] = {b: deque() for b in builders}
        self.demand = Demand()
        self.workers = [
            _PoolWorker(f"pool-{i + 1:04d}", farm.azs[i % len(farm.azs)])
            for i in range(farm.pool_size)
        ]
        self.by_name = {w.name: w for w in self.workers}
        self.idle: set[str] = set()
        self.queue: list[tuple[float, int, int, int, Any]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.wake_token = 0
        self.billed = 0.0
        self.building = 0.0
        self.revivals = 0
        self.start_calls = 0
        self.stop_calls = 0
        self.ec2_builds = 0
        self.decisions = 0
        self.bound_running = 0  # per-build: instances alive
        self.ec2_intervals: list[tuple[float, float]] = []  # clairvoyant

    # -- plumbing ------------------------------------------------------------------------

    def at(self, time: float, kind: int, data: Any = None) -> None:
        heapq.heappush(self.queue, (time, kind, next(self.seq), kind, data))

    def _view(self, w: _PoolWorker) -> WorkerView:
        if w.view is None:
            w.view = WorkerView(
                name=w.name,
                phase=w.phase,
                builders=self.overflow,
                availability_zone=w.az,
                last_builder=w.last_builder,
                idle_since=w.idle_since if w.phase is Phase.IDLE else None,
                booked_for=w.booked_for if w.phase is Phase.BOOTING else None,
            )
        return w.view

    def _set(self, w: _PoolWorker, phase: Phase) -> None:
        w.phase = phase
        w.view = None
        if phase is Phase.IDLE:
            self.idle.add(w.name)
        else:
            self.idle.discard(w.name)

    def _bill(self, since: float, until: float) -> None:
        self.billed += max(self.cloud.min_billed, until - since)

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> Result:
        kind = self.strategy.kind
        for r in self.reqs:
            self.at(r.submitted, _ARRIVE, r)
        if not self.reqs:
            return self._result(0.0)
        start = self.reqs[0].submitted
        if kind == "poll":
            interval = self.strategy.poll_interval
            first = math.floor(start / interval) * interval + self.strategy.poll_phase
            self.at(first if first >= start else first + interval, _POLL)
        changed = poll_now = False
        while self.queue:
            time, _, _, event, data = heapq.heappop(self.queue)
            self.now = time
            if event == _WAKE:
                # only the latest wake-up counts: the pool re-arms one timer per decision
                changed |= data == self.wake_token
            elif event == _POLL:
                poll_now = True
                if not self._quiet():
                    self.at(time + self.strategy.poll_interval, _POLL)
            else:
                self._handle(event, data)
                changed = True
            if self.queue and self.queue[0][0] == time:
                continue
            if not (changed or poll_now):
                continue
            # Everything that happened at this instant is in: Buildbot hands out requests,
            # then the cloud side reacts.
            self._dispatch()
            if kind == "clairvoyant":
                self._start_clairvoyant()
            elif kind == "per-build":
                self._bind_eligible()
            elif kind == "event" or poll_now:
                self._decide()
            changed = poll_now = False
        end = self.now
        for w in self.workers:
            if w.running_since is not None:  # still running at the end of the trace
                self._bill(w.running_since, end)
                w.running_since = None
        if kind == "clairvoyant":
            self._bill_clairvoyant()
        return self._result(end - start)

    def _quiet(self) -> bool:
        """True when nothing can happen any more (the poll loop may end)."""
        return (
            not self.queue
            and all(w.phase is Phase.STOPPED for w in self.workers)
            and not any(self.pending.values())
        )

    def _handle(self, event: int, data: Any) -> None:
        if event == _ARRIVE:
            r: _Req = data
            self.pending[r.builder].append(r)
            if r.builder in self.overflow:
                self.demand.add(r.builder, r.submitted)
                # Buildbot looks again when the request may go to a pool worker
                self.at(r.submitted + self.config.overflow_after, _ELIGIBLE, r)
        elif event == _FINISH:
            where = data
            if isinstance(where, int):
                self.group_free[where] += 1
            elif where == "bound":
                self.bound_running -= 1
            elif where != "clairvoyant":
                w = self.by_name[where]
                self._set(w, Phase.IDLE)
                w.idle_since = self.now
        elif event == _STARTED:
            # StartInstances has gone out for these workers
            self.start_calls += 1
            for w in data:
                self.at(self.now + self.cloud.pending_for(w.hibernated), _RUNNING, w)
        elif event == _RUNNING:
            w = data
            w.running_since = self.now
            self.at(self.now + self.cloud.connect_delay(w.hibernated), _CONNECT, w)
        elif event == _CONNECT:
            w = data
            w.booked_for = None
            w.idle_since = self.now
            self._set(w, Phase.IDLE)
        elif event == _BOUND_CONNECT:
            self._start_bound(*data)
        elif event == _STOP_CALL:
            self.stop_calls += 1
            hibernate = self.strategy.hibernate
            stop_for = self.cloud.hibernating if hibernate else self.cloud.stopping
            for w in data:
                assert w.running_since is not None
                self._bill(w.running_since, self.now + (stop_for if hibernate else 0.0))
                w.running_since = None
                w.hibernated = hibernate
                self.at(self.now + stop_for, _STOPPED, w)
        elif event == _STOPPED:
            self._set(data, Phase.STOPPED)
        # _ELIGIBLE only needs the look at the end of the instant

    # -- Buildbot's side: who takes which request ----------------------------------------

    def _oldest(self, builders: Iterable[str], eligible_before: float | None = None):
        best = None
        for b in builders:
            q = self.pending[b]
            if q and (best is None or q[0].submitted < best[0].submitted):
                if eligible_before is None or q[0].submitted <= eligible_before:
                    best = q
        return best

    def _dispatch(self) -> None:
        # In-house workers first, oldest request first among the builders a worker serves.
        for gi, free in enumerate(self.group_free):
            while free > 0:
                q = self._oldest(self.group_builders[gi])
                if q is None:
                    break
                r = q.popleft()
                free -= 1
                self._start(r, gi)
            self.group_free[gi] = free
        # Then idle pool workers, for requests that have waited overflow_after.
        if self.idle:
            limit = self.now - self.config.overflow_after + 1e-9
            while self.idle:
                q = self._oldest(self.overflow_list, eligible_before=limit)
                if q is None:
                    break
                r = q.popleft()
                warm = [n for n in self.idle if self.by_name[n].last_builder == r.builder]
                name = min(warm) if warm else min(self.idle)
                self._start(r, name)

    def _start(self, r: _Req, where: int | str) -> None:
        r.started = self.now
        if r.builder in self.overflow:
            self.demand.remove(r.builder, r.submitted)
        if not isinstance(where, int):
            w = self.by_name[where]
            self._set(w, Phase.BUSY)
            w.last_builder = r.builder
            w.idle_since = None
            self.ec2_builds += 1
            self.building += r.duration
        self.at(self.now + r.duration, _FINISH, where)

    # -- the pool (event / poll) ------------------------------------------------------------

    def _inhouse_free(self) -> dict[str, int]:
        free = {}
        for b in self.overflow:
            n = sum(self.group_free[g] for g in self.groups_of[b])
            if n:
                free[b] = n
        return free

    def _decide(self) -> None:
        plan = policy.decide(
            self.demand,
            [self._view(w) for w in self.workers],
            self.config,
            self.now,
            inhouse_free=self._inhouse_free(),
        )
        self.decisions += 1
        reaction = self.strategy.reaction
        if plan.revive:
            started = []
            for rev in plan.revive:
                w = self.by_name[rev.worker]
                w.booked_for = rev.builder
                self._set(w, Phase.BOOTING)
                started.append(w)
            self.revivals += len(started)
            self.at(self.now + reaction, _STARTED, started)
        if plan.suspend:
            stopping = []
            for s in plan.suspend:
                w = self.by_name[s.worker]
                self._set(w, Phase.STOPPING)
                stopping.append(w)
            self.at(self.now + reaction, _STOP_CALL, stopping)
        if self.strategy.kind == "event":
            self.wake_token += 1
            if plan.wake_at is not None:
                # a hair late, as the pool does, so the request is eligible when we look again
                self.at(max(plan.wake_at, self.now) + 0.01, _WAKE, self.wake_token)

    # -- per-build: a fresh instance for each eligible request ------------------------------

    def _bind_eligible(self) -> None:
        limit = self.now - self.config.overflow_after + 1e-9
        while self.bound_running < self.farm.pool_size:
            q = self._oldest(self.overflow_list, eligible_before=limit)
            if q is None:
                return
            r = q.popleft()
            self.demand.remove(r.builder, r.submitted)
            r.started = math.inf  # bound: no other worker may take it
            self.bound_running += 1
            self.revivals += 1
            self.start_calls += 1
            running = self.now + self.strategy.reaction + self.cloud.pending
            self.at(running + self.cloud.boot, _BOUND_CONNECT, (r, running))

    def _start_bound(self, r: _Req, running: float) -> None:
        r.started = self.now
        self.ec2_builds += 1
        self.building += r.duration
        self._bill(running, self.now + r.duration)
        self.stop_calls += 1
        self.at(self.now + r.duration, _FINISH, "bound")

    # -- clairvoyant -------------------------------------------------------------------------

    def _start_clairvoyant(self) -> None:
        """Every request still pending once eligible finds an instance ready that instant."""
        limit = self.now - self.config.overflow_after + 1e-9
        while True:
            q = self._oldest(self.overflow_list, eligible_before=limit)
            if q is None:
                return
            r = q.popleft()
            self.demand.remove(r.builder, r.submitted)
            r.started = self.now
            self.ec2_builds += 1
            self.building += r.duration
            self.ec2_intervals.append((self.now, self.now + r.duration))
            self.at(self.now + r.duration, _FINISH, "clairvoyant")

    def _bill_clairvoyant(self) -> None:
        """Chain the EC2 builds onto as few starts as pays: an instance that finished at ``e``
        takes a build starting at ``s`` if idling ``s - e`` costs less than a new start."""
        # the cheapest revival there is, in billed seconds: a cold boot after a plain stop, or a
        # resume plus the billed hibernation before it
        cloud = self.cloud
        boot = min(cloud.boot, cloud.resume + cloud.hibernating)
        new_start_cost = policy.break_even_idle(boot, cloud.min_billed)
        free_at: list[float] = []  # end times of instances that could be kept
        runs: list[list[float]] = []  # [running_since, busy_until] per chain
        chain_of: dict[float, list[int]] = {}
        for s, e in sorted(self.ec2_intervals):
            # the instance that became free last before s (smallest gap) is the best to keep
            i = _bisect_right(free_at, s) - 1
            if i >= 0 and s - free_at[i] < new_start_cost:
                end = free_at.pop(i)
                idx = chain_of[end].pop()
                if not chain_of[end]:
                    del chain_of[end]
                runs[idx][1] = e
            else:
                runs.append([s - boot, e])
                idx = len(runs) - 1
                self.revivals += 1
                self.start_calls += 1
            j = _bisect_right(free_at, e)
            free_at.insert(j, e)
            chain_of.setdefault(e, []).append(idx)
        for since, until in runs:
            self._bill(since, until)
        self.stop_calls = len(runs)

    # -- result ------------------------------------------------------------------------------

    def _result(self, span: float) -> Result:
        waits = [r.started - r.submitted for r in self.reqs if r.started is not None]
        overflow_waits = [
            r.started - r.submitted
            for r in self.reqs
            if r.started is not None and r.builder in self.overflow
        ]
        unfinished = sum(1 for r in self.reqs if r.started is None or r.started == math.inf)
        compute = self.billed / HOUR * self.cloud.price_per_hour
        if self.strategy.kind in ("per-build", "clairvoyant"):
            # volumes exist only while their instances do
            gb_hours = self.billed / HOUR * self.cloud.ebs_gb
        else:
            gb_hours = self.farm.pool_size * self.cloud.ebs_gb * span / HOUR
        storage = gb_hours / MONTH_HOURS * self.cloud.ebs_price_gb_month
        return Result(
            strategy=self.strategy.name,
            requests=len(self.reqs),
            waits=overflow_waits,
            all_waits=waits,
            billed=self.billed,
            building=self.building,
            revivals=self.revivals,
            start_calls=self.start_calls,
            stop_calls=self.stop_calls,
            ec2_builds=self.ec2_builds,
            decisions=self.decisions,
            span=span,
            pool_size=self.farm.pool_size,
            storage_cost=storage,
            compute_cost=compute,
            extra={"unstarted": unfinished},
        )


def _bisect_right(values: list[float], x: float) -> int:
    lo, hi = 0, len(values)
    while lo < hi:
        mid = (lo + hi) // 2
        if x < values[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


def simulate(
    trace: Sequence[Request],
    farm: Farm,
    strategy: Strategy,
    cloud: CloudModel | None = None,
) -> Result:
    """Replay ``trace`` on ``farm`` under ``strategy``."""
    cloud = cloud or CloudModel()
    config = strategy.config
    if config.max_running > farm.pool_size:
        strategy = replace(strategy, config=replace(config, max_running=farm.pool_size))
    return Simulation(trace, farm, cloud, strategy).run()


def compare(
    trace: Sequence[Request],
    farm: Farm,
    strategies: Sequence[Strategy] | None = None,
    cloud: CloudModel | None = None,
) -> list[Result]:
    cloud = cloud or CloudModel()
    return [simulate(trace, farm, s, cloud) for s in strategies or standard_strategies()]
