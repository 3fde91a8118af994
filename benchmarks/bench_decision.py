"""Benchmark 3: the cost of one scaling decision at scale.

The pool's own bookkeeping code (``EC2Pool.worker_views``, ``inhouse_free``, ``_track_request``)
and ``policy.decide`` run against stand-ins for Buildbot's objects (builders, worker-for-builder
links, latent workers): 2,000 pool workers, 200 overflow builders with 5 in-house workers each,
and 1k to 100k pending requests. Prints the median time per decision and its parts, the time to
take in one new request, and memory (tracemalloc).

    .venv/bin/python benchmarks/bench_decision.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buildbot.worker.latent import States

from buildbot_ec2_hybrid import policy
from buildbot_ec2_hybrid.pool import EC2Pool

WORKERS = 2000
BUILDERS = 200
INHOUSE_PER_BUILDER = 5
NOW = 1_000_000.0


class FakeWorker:
    def __init__(self, name, state=States.NOT_SUBSTANTIATED, conn=None, building=(),
                 last_builder=None, idle_since=None):
        self.name = name
        self.state = state
        self.conn = conn
        self.draining = False
        self.building = list(building)
        self.last_builder = last_builder
        self.idle_since = idle_since


class FakeWFB:
    def __init__(self, worker, available):
        self.worker = worker
        self._available = available

    def isAvailable(self):
        return self._available


class FakeBuilderConfig:
    def __init__(self, workernames):
        self.workernames = workernames


class FakeBuilder:
    def __init__(self, workernames, wfbs):
        self.config = FakeBuilderConfig(workernames)
        self.workers = wfbs


class Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def make_pool(pending: int, seed: int = 0, cls: type = EC2Pool) -> EC2Pool:
    """A pool in heavy backlog: half its instances running (busy, idle, booting), half stopped,
    every in-house worker busy, ``pending`` unclaimed requests spread over the builders."""
    rng = random.Random(seed)
    names = [f"pool-{i:04d}" for i in range(WORKERS)]
    builders = [f"builder-{b:03d}" for b in range(BUILDERS)]
    registry = {}
    for i, n in enumerate(names):
        if i < 800:
            w = FakeWorker(n, States.SUBSTANTIATED, conn=object(), building=[1],
                           last_builder=rng.choice(builders))
        elif i < 850:
            w = FakeWorker(n, States.SUBSTANTIATED, conn=object(),
                           last_builder=rng.choice(builders), idle_since=NOW - rng.uniform(0, 600))
        elif i < 1000:
            w = FakeWorker(n, States.SUBSTANTIATING)
        else:
            w = FakeWorker(n, last_builder=rng.choice(builders + [None] * 200))
        registry[n] = w
    bmap = {}
    for bi, b in enumerate(builders):
        inhouse = [FakeWorker(f"inhouse-{bi:03d}-{k}", States.SUBSTANTIATED, conn=object())
                   for k in range(INHOUSE_PER_BUILDER)]
        wfbs = [FakeWFB(w, False) for w in inhouse] + [FakeWFB(registry[n], False) for n in names]
        bmap[b] = FakeBuilder([w.name for w in inhouse] + names, wfbs)

    pool = cls.__new__(cls)
    pool.name = "bench"
    pool.workernames = names
    # the pool finds its master through its parent service
    pool.parent = Obj(master=Obj(
        botmaster=Obj(builders=bmap),
        workers=Obj(workers=registry),
        reactor=Obj(seconds=lambda: NOW),
    ))
    pool.refused = {}
    pool._claiming = set()
    pool.coordinator = None
    pool._instances = {}
    pool._booked = {n: rng.choice(builders) for n in names[850:1000]}
    pool._quarantine = {}
    pool._requests = {}
    pool._builder_names = {bi: b for bi, b in enumerate(builders)}
    pool.demand = policy.Demand()
    pool.policy_config = policy.PolicyConfig(overflow_after=60, idle_timeout=3600,
                                             max_running=WORKERS)
    # what _track_request leaves behind for each request (it is timed on its own below: taking
    # in 100k requests through it one by one would dominate the run)
    for brid in range(pending):
        b, t = builders[brid % BUILDERS], NOW - 7200 + rng.uniform(0, 7000)
        pool._requests[brid] = (b, t)
        pool.demand.add(b, t)
    return pool


def _sync(d):
    """Run a Deferred that needs no reactor (everything it waits for is already there)."""
    out = []
    d.addBoth(out.append)
    if not out:
        raise RuntimeError("the bookkeeping waited for something: not synchronous")
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def decision(pool: EC2Pool) -> tuple[policy.Plan, dict[str, float]]:
    t0 = time.perf_counter()
    views = pool.worker_views(NOW)
    t1 = time.perf_counter()
    free = pool.inhouse_free()
    t2 = time.perf_counter()
    plan = policy.decide(pool.demand, views, pool.policy_config, NOW, inhouse_free=free)
    t3 = time.perf_counter()
    return plan, {"views": t1 - t0, "inhouse_free": t2 - t1, "decide": t3 - t2, "total": t3 - t0}


def measure(pending: int, repeat: int, cls: type = EC2Pool) -> dict[str, float]:
    pool = make_pool(pending, cls=cls)
    plan, _ = decision(pool)  # warm-up; also checks the plan is sensible
    assert 0 < len(plan.revive) <= 1000, len(plan.revive)  # the backlog revives stopped ones
    parts: dict[str, list[float]] = {}
    gc.collect()
    for _ in range(repeat):
        _, t = decision(pool)
        for k, v in t.items():
            parts.setdefault(k, []).append(v)
    # one more request arriving, as the pool takes in each 'new' build request event
    track = []
    for i in range(min(repeat, 10)):
        msg = {"buildrequestid": 10_000_000 + i, "builderid": i % BUILDERS,
               "submitted_at": NOW}
        t0 = time.perf_counter()
        _sync(pool._track_request(msg))
        track.append(time.perf_counter() - t0)
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    decision(pool)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del base
    tracemalloc.start()
    mark = tracemalloc.get_traced_memory()[0]
    demand = policy.Demand()
    requests = {}
    for brid, (b, t) in pool._requests.items():
        demand.add(b, t)
        requests[brid] = (b, t)
    held = tracemalloc.get_traced_memory()[0] - mark
    tracemalloc.stop()
    out = {k: statistics.median(v) * 1000 for k, v in parts.items()}
    out["p95_total"] = sorted(parts["total"])[int(0.95 * (len(parts["total"]) - 1))] * 1000
    out["track"] = statistics.median(track) * 1000
    out["peak_mb"] = peak / 1e6
    out["held_mb"] = held / 1e6
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    sizes = [1_000, 20_000, 100_000] if args.quick else [1_000, 5_000, 20_000, 50_000, 100_000]
    repeat = 7 if args.quick else args.repeat
    print(f"{WORKERS} pool workers (800 busy, 50 idle, 150 booting, 1000 stopped), "
          f"{BUILDERS} builders x {INHOUSE_PER_BUILDER} busy in-house workers; "
          f"median of {repeat} decisions")
    head = (f"{'pending':>8}  {'views ms':>8}  {'free ms':>8}  {'decide ms':>9}  "
            f"{'total ms':>8}  {'p95 ms':>7}  {'new req ms':>10}  {'peak MB':>7}  "
            f"{'demand MB':>9}")
    results = {}
    for label, cls in (("pool.py", EC2Pool),):
        print(f"\n{label}:")
        print(head)
        rows = results[label] = {}
        for n in sizes:
            r = measure(n, repeat, cls)
            rows[n] = r
            print(f"{n:>8}  {r['views']:>8.1f}  {r['inhouse_free']:>8.1f}  {r['decide']:>9.1f}  "
                  f"{r['total']:>8.1f}  {r['p95_total']:>7.1f}  {r['track']:>10.2f}  "
                  f"{r['peak_mb']:>7.1f}  {r['held_mb']:>9.1f}")
    print()
    for label, rows in results.items():
        at = rows.get(20_000)
        if at:
            ok = at["total"] <= 20.0
            print(f"target median decision <= 20 ms at 20,000 pending, {label}: "
                  f"{at['total']:.1f} ms -> {'met' if ok else 'NOT met'} "
                  f"(policy.decide alone {at['decide']:.1f} ms; a new request "
                  f"{at['track']:.2f} ms)")
    rows = results["pool.py"]
    lo, hi = min(rows), max(rows)
    growth = rows[hi]["decide"] / rows[lo]["decide"]
    print(f"policy.decide from {lo} to {hi} pending ({hi // lo}x): {growth:.1f}x the time; "
          f"pending-request bookkeeping {rows[lo]['held_mb']:.2f} -> {rows[hi]['held_mb']:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
