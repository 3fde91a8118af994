"""Benchmark 1: reaction latency, from a request becoming overflow-eligible to StartInstances.

A real master (master_examples/sandbox.cfg) runs an EC2Pool of N stopped sandbox instances for a
builder with no in-house worker, so every request overflows. Requests are forced a few per
second; Buildbot stores ``submitted_at`` in whole seconds and the pool counts a request eligible
at ``submitted_at + overflow_after``, so with a whole-second ``overflow_after`` each request's
eligibility instant is known exactly. The sandbox region logs when each StartInstances call
arrives (``time.time()`` on the same machine); the latency of a request is the arrival of the
first StartInstances call at or after its eligibility instant.

The instances never boot a worker (the instance agent's boot delay is longer than the run):
each revived instance stays booked for the request it was revived for, so every request needs
a revival of its own, as in a farm whose pool is cold.

    .venv/bin/python benchmarks/bench_latency.py [--requests 200] [--per-second 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from _common import at_second_start
from _common import loopback_only
from _common import percentile
from _common import wait_until
from _common import workdir

POOL = "lat-aws"
BUILDER = "lat_build"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--per-second", type=int, default=2,
                        help="requests forced in each second (they share one eligibility)")
    parser.add_argument("--overflow-after", type=int, default=2)
    args = parser.parse_args()
    loopback_only()
    from buildbot_ec2_hybrid.sandbox.lab import BuilderSpec
    from buildbot_ec2_hybrid.sandbox.lab import LabSpec
    from buildbot_ec2_hybrid.sandbox.lab import PoolSpec
    from buildbot_ec2_hybrid.sandbox.lab import SandboxLab

    spec = LabSpec(
        pools=[PoolSpec(name=POOL, size=args.requests, overflow_after=args.overflow_after,
                        idle_timeout=3600, boot_timeout=3600, hibernate=False,
                        poll_interval=1.0, reconcile_interval=3600)],
        builders=[BuilderSpec(BUILDER, pool=POOL, workers=[])],
        inhouse_workers=0,
        pending_seconds=0.5,
        boot_delay=24 * 3600,  # no worker ever connects: every request needs its own revival
    )
    lab = SandboxLab(workdir("latency"), spec)
    t0 = time.time()
    lab.start()
    print(f"sandbox up in {time.time() - t0:.1f}s: pool of {args.requests} stopped instances, "
          f"overflow_after={args.overflow_after}s, no in-house worker")
    try:
        # the pool's start-up reconcile describes every instance; let it finish first
        wait_until(lambda: lab.plugin_calls("DescribeInstances"), 60, what="first reconcile")
        time.sleep(2)
        rest = lab.rest
        builderid = rest.builder_id(BUILDER)
        brids: list[int] = []
        while len(brids) < args.requests:
            at_second_start()
            for _ in range(min(args.per_second, args.requests - len(brids))):
                _, ids = rest.force_build("force", BUILDER, duration="1")
                brids.extend(ids.values())
            time.sleep(0.3)
        del builderid
        eligible = {}
        for brid in brids:
            br = rest.get(f"buildrequests/{brid}")["buildrequests"][0]
            eligible[brid] = float(br["submitted_at"]) + args.overflow_after
        last = max(eligible.values())
        wait_until(
            lambda: sum(len(c.instance_ids) for c in lab.plugin_calls("StartInstances"))
            >= len(brids),
            60 + max(0.0, last - time.time()),
            what="a revival for every request",
        )
        starts = sorted(lab.plugin_calls("StartInstances"), key=lambda c: c.time)
        first_eligible = min(eligible.values())
        lookups = [c for c in lab.plugin_calls("DescribeInstances")
                   if c.time >= first_eligible and "Filter.1.Name" in c.params
                   and c.params["Filter.1.Name"] == "tag:Name"
                   and "Filter.1.Value.2" not in c.params]
        latencies = []
        for brid, when in sorted(eligible.items()):
            call = next((c for c in starts if c.time >= when), None)
            if call is None:
                raise RuntimeError(f"no StartInstances after request {brid} became eligible")
            latencies.append(call.time - when)
        per_second = Counter(eligible.values())
        early = [c for c in starts if not any(0 <= c.time - e < 5 for e in per_second)]
        revived = sum(len(c.instance_ids) for c in starts)
        bad = [c.outcome for c in starts if c.outcome != "ok"]
        ms = [x * 1000 for x in latencies]
        decisions = [(c.time - max(e for e in per_second if e <= c.time)) * 1000 for c in starts]
        print(f"{len(brids)} requests in {len(per_second)} eligibility instants; "
              f"{len(starts)} StartInstances calls reviving {revived} instances "
              f"(errors: {bad or 'none'}; calls not right after an eligibility: {len(early)})")
        print(f"single-worker DescribeInstances by Name during the run: {len(lookups)} "
              "(a look-up before a revival adds its round trip to the latency)")
        print(f"latency per request  (ms): p50 {percentile(ms, 50):.0f}  "
              f"p90 {percentile(ms, 90):.0f}  p99 {percentile(ms, 99):.0f}  max {max(ms):.0f}")
        print(f"latency per decision (ms): p50 {percentile(decisions, 50):.0f}  "
              f"p99 {percentile(decisions, 99):.0f}  (n={len(decisions)})")
        p50, p99 = percentile(ms, 50), percentile(ms, 99)
        print(f"target p50 <= 100 ms: {'met' if p50 <= 100 else 'NOT met'} ({p50:.0f} ms); "
              f"target p99 <= 500 ms: {'met' if p99 <= 500 else 'NOT met'} ({p99:.0f} ms)")
    finally:
        lab.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
