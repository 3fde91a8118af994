"""Build-request traces for the simulator: a synthetic week, or a real master's own history.

A trace is a CSV with one build request per line: ``submitted`` (epoch seconds), ``builder``
and ``duration`` (seconds the build ran).

:func:`synthetic_week` makes a week of load shaped like a busy release-engineering farm: pushes
arrive as a Poisson process whose rate follows a daily cycle (a European and an American working
day) and a weekly one (quiet weekends); each push fans out into builds per platform and, a
build's length later, into test jobs; nightly builds and a few retrigger storms add bursts.

:func:`export_trace` reads a real Buildbot database (any SQLAlchemy URL: ``sqlite:///...``,
``postgresql+psycopg2://...``) and writes what happened in it, so users can replay their history
under other settings.
"""

from __future__ import annotations

import datetime
import math
import random
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from buildbot_ec2_hybrid.simulate import Request
from buildbot_ec2_hybrid.simulate import write_trace

DAY = 86400.0
WEEK = 7 * DAY
#: a Monday, 00:00 UTC (the summer Mozilla RelEng moved overflow builds onto EC2)
DEFAULT_START = datetime.datetime(2012, 6, 4, tzinfo=datetime.timezone.utc).timestamp()


@dataclass(frozen=True)
class Platform:
    """One platform's builders: a push starts its builds, and its tests once a build is done."""

    name: str
    builds: tuple[str, ...]
    tests: tuple[str, ...]
    build_minutes: float  # median
    test_minutes: float  # median
    share: float  # chance that a push builds this platform
    overflow: bool = True
    #: in-house workers in the synthetic farm
    inhouse: int = 0


#: the synthetic farm: three Linux-like platforms that may overflow, Windows that may not
PLATFORMS: tuple[Platform, ...] = (
    Platform(
        "linux64", ("linux64-opt", "linux64-debug"),
        ("linux64-mochitest", "linux64-reftest", "linux64-xpcshell"),
        build_minutes=35, test_minutes=15, share=0.95, inhouse=24,
    ),
    Platform(
        "linux32", ("linux32-opt",), ("linux32-mochitest", "linux32-reftest"),
        build_minutes=35, test_minutes=15, share=0.9, inhouse=12,
    ),
    Platform(
        "android", ("android-opt",), ("android-robocop", "android-crashtest"),
        build_minutes=40, test_minutes=20, share=0.8, inhouse=13,
    ),
    Platform(
        "b2g", ("b2g-emulator",), ("b2g-mochitest",),
        build_minutes=30, test_minutes=15, share=0.7, inhouse=6,
    ),
    Platform(
        "win64", ("win64-opt", "win64-debug"), ("win64-mochitest",),
        build_minutes=50, test_minutes=20, share=0.9, overflow=False, inhouse=40,
    ),
)

#: pool instances in the synthetic farm
POOL_SIZE = 120


def synthetic_farm_args(platforms: Sequence[Platform] = PLATFORMS) -> tuple[list[str], list[str]]:
    """(in-house specs, overflow patterns) describing the synthetic farm, in the simulator's
    ``PATTERN=COUNT`` syntax."""
    inhouse = [f"{p.name}-*={p.inhouse}" for p in platforms if p.inhouse]
    overflow = [f"{p.name}-*" for p in platforms if p.overflow]
    return inhouse, overflow


def _bump(hour: float, center: float, width: float) -> float:
    d = abs(hour - center) % 24.0
    d = min(d, 24.0 - d)
    return math.exp(-0.5 * (d / width) ** 2)


def daily_profile(hour: float) -> float:
    """Relative push rate by hour of day (UTC): a quiet night floor, the European working day,
    and the larger American one running into the European night."""
    return 0.12 + 0.55 * _bump(hour, 10.5, 2.5) + 1.0 * _bump(hour, 19.0, 3.0)


#: Monday..Sunday
WEEKLY_PROFILE = (1.0, 1.05, 1.05, 1.0, 0.85, 0.3, 0.35)

_DAILY_MEAN = sum(daily_profile(h / 10.0) for h in range(240)) / 240.0


def push_rate(t: float, start: float, pushes_per_weekday: float) -> float:
    """Pushes per second at time ``t`` of a week starting on a Monday at ``start``."""
    offset = (t - start) % WEEK
    day = int(offset // DAY)
    hour = (offset % DAY) / 3600.0
    return pushes_per_weekday / DAY * WEEKLY_PROFILE[day] * daily_profile(hour) / _DAILY_MEAN


def synthetic_week(
    seed: int = 0,
    *,
    start: float = DEFAULT_START,
    days: float = 7.0,
    pushes_per_weekday: float = 240.0,
    platforms: Sequence[Platform] = PLATFORMS,
    nightly_hour: float = 10.0,
    storms: int = 4,
    storm_pushes: int = 15,
) -> list[Request]:
    """A deterministic (for a given ``seed``) synthetic trace, sorted by submission time.

    ``storms`` retrigger storms (``storm_pushes`` pushes within ten minutes) fall in weekday
    working hours; every day at ``nightly_hour`` UTC each platform's builds are started once more.
    """
    rng = random.Random(seed)
    end = start + days * DAY
    requests: list[Request] = []

    def push(t: float, with_tests: bool = True) -> None:
        for p in platforms:
            if with_tests and rng.random() > p.share:
                continue
            for b in p.builds:
                requests.append(_req(rng, t + rng.uniform(0, 30), b, p.build_minutes, 0.3))
            if not with_tests:
                continue
            # tests follow the build that feeds them, a typical build's length later
            after = p.build_minutes * 60 * rng.uniform(0.9, 1.3)
            for b in p.tests:
                requests.append(_req(rng, t + after + rng.uniform(0, 120), b, p.test_minutes, 0.45))

    # pushes: a non-homogeneous Poisson process, by thinning a faster homogeneous one
    peak = max(
        push_rate(start + k * 600.0, start, pushes_per_weekday) for k in range(int(WEEK / 600))
    )
    t = start
    while True:
        t += rng.expovariate(peak)
        if t >= end:
            break
        if rng.random() * peak <= push_rate(t, start, pushes_per_weekday):
            push(t)

    # nightlies: every platform's builds at once
    day = start
    while day < end:
        t = day + nightly_hour * 3600
        if t < end:
            push(t, with_tests=False)
        day += DAY

    # retrigger storms: many pushes in a few minutes, weekdays between 14:00 and 20:00 UTC
    weekdays = [d for d in range(int(math.ceil(days))) if (d % 7) < 5]
    for _ in range(storms if weekdays else 0):
        t0 = start + rng.choice(weekdays) * DAY + rng.uniform(14, 20) * 3600
        for _ in range(storm_pushes):
            t = t0 + rng.uniform(0, 600)
            if t < end:
                push(t)

    requests = [r for r in requests if r.submitted < end]
    requests.sort(key=lambda r: (r.submitted, r.builder))
    return requests


def _req(rng: random.Random, t: float, builder: str, median_min: float, sigma: float) -> Request:
    median = median_min * 60.0
    duration = median * math.exp(rng.gauss(0.0, sigma))
    duration = min(max(duration, 120.0), 4 * median)
    # Buildbot keeps whole seconds
    return Request(float(int(t)), builder, float(round(duration)))


def hourly_counts(requests: Sequence[Request], start: float = DEFAULT_START) -> list[int]:
    """Requests per hour of day (UTC, relative to ``start``'s midnight), over the whole trace."""
    counts = [0] * 24
    for r in requests:
        counts[int(((r.submitted - start) % DAY) // 3600)] += 1
    return counts


# -- a real master's history ------------------------------------------------------------------


def export_trace(
    db_url: str,
    target: str | Path | TextIO,
    *,
    since: float | None = None,
    until: float | None = None,
    builders: Sequence[str] | None = None,
) -> int:
    """Write the trace of a Buildbot database; returns how many requests were written.

    Each build request that ran becomes one line: when it was submitted, its builder's name and
    how long its build ran (the last build when it was retried). Requests that never ran
    (cancelled, still pending) carry no duration and are left out.
    """
    return write_trace(read_db_trace(db_url, since=since, until=until, builders=builders), target)


def read_db_trace(
    db_url: str,
    *,
    since: float | None = None,
    until: float | None = None,
    builders: Sequence[str] | None = None,
) -> list[Request]:
    import sqlalchemy as sa

    engine = sa.create_engine(db_url)
    try:
        md = sa.MetaData()
        br = sa.Table(
            "buildrequests", md,
            sa.Column("id", sa.Integer), sa.Column("builderid", sa.Integer),
            sa.Column("submitted_at", sa.Integer),
        )
        bd = sa.Table(
            "builds", md,
            sa.Column("id", sa.Integer), sa.Column("buildrequestid", sa.Integer),
            sa.Column("started_at", sa.Integer), sa.Column("complete_at", sa.Integer),
        )
        bl = sa.Table("builders", md, sa.Column("id", sa.Integer), sa.Column("name", sa.Text))
        q = (
            sa.select(br.c.id, br.c.submitted_at, bl.c.name, bd.c.started_at, bd.c.complete_at)
            .select_from(br.join(bl, bl.c.id == br.c.builderid).join(
                bd, bd.c.buildrequestid == br.c.id))
            .where(bd.c.complete_at.is_not(None))
            .order_by(br.c.id, bd.c.id)
        )
        if since is not None:
            q = q.where(br.c.submitted_at >= since)
        if until is not None:
            q = q.where(br.c.submitted_at < until)
        if builders:
            q = q.where(bl.c.name.in_(list(builders)))
        last: dict[int, Request] = {}
        with engine.connect() as conn:
            for brid, submitted, name, started, complete in _rows(conn, q):
                # ordered by build id: a retried request keeps its last build
                last[brid] = Request(float(submitted), name, float(max(0, complete - started)))
    finally:
        engine.dispose()
    return sorted(last.values(), key=lambda r: (r.submitted, r.builder))


def _rows(conn, query) -> Iterator[tuple]:
    result = conn.execution_options(stream_results=True, yield_per=5000).execute(query)
    yield from result


def parse_time(value: str) -> float:
    """Epoch seconds, or an ISO 8601 date/time (UTC unless it says otherwise)."""
    try:
        return float(value)
    except ValueError:
        pass
    when = datetime.datetime.fromisoformat(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def trace_summary(requests: Sequence[Request]) -> str:
    if not requests:
        return "empty trace"
    span = requests[-1].submitted - requests[0].submitted
    busy = sum(r.duration for r in requests) / 3600.0
    builders = len({r.builder for r in requests})
    return (
        f"{len(requests)} requests on {builders} builders over {span / DAY:.1f} days, "
        f"{busy:.0f} build-hours"
    )

