"""Benchmark 4a: policies compared by the simulator on a synthetic week.

Generates the synthetic week (seeds 1 and 2), replays each through the pool's own policy and the
baselines, prints the comparison, checks the targets, and with ``--sweep`` prints the settings
sweep behind the documented best settings.

    .venv/bin/python benchmarks/bench_policies.py [--sweep] [--seeds 1 2]
"""

from __future__ import annotations

import argparse
import sys
import time

import _common  # noqa: F401  (puts the checkout on sys.path)

from buildbot_ec2_hybrid import traces
from buildbot_ec2_hybrid.policy import PolicyConfig
from buildbot_ec2_hybrid.simulate import CloudModel
from buildbot_ec2_hybrid.simulate import Farm
from buildbot_ec2_hybrid.simulate import Strategy
from buildbot_ec2_hybrid.simulate import best_config
from buildbot_ec2_hybrid.simulate import compare
from buildbot_ec2_hybrid.simulate import format_table
from buildbot_ec2_hybrid.simulate import parse_inhouse
from buildbot_ec2_hybrid.simulate import simulate
from buildbot_ec2_hybrid.simulate import standard_strategies


def synthetic_farm() -> Farm:
    inhouse, overflow = traces.synthetic_farm_args()
    return Farm(parse_inhouse(inhouse), traces.POOL_SIZE, tuple(overflow))


def check(results) -> bool:
    by = {r.strategy: r for r in results}
    best, legacy, bound = by["ours (best)"], by["mozilla-2012"], by["clairvoyant"]
    p95_ok = best.wait(95) <= legacy.wait(95)
    fewer = 1 - best.instance_hours / legacy.instance_hours
    over = best.instance_hours / bound.instance_hours - 1
    print(f"  p95 wait: ours (best) {best.wait(95):.0f}s vs 2012 {legacy.wait(95):.0f}s -> "
          f"{'met' if p95_ok else 'NOT met'}")
    print(f"  instance-hours: {fewer:.0%} fewer than 2012 (target >= 30%) -> "
          f"{'met' if fewer >= 0.30 else 'NOT met'}")
    print(f"  instance-hours: {over:+.0%} against the clairvoyant bound (target <= +20%) -> "
          f"{'met' if over <= 0.20 else 'NOT met'}")
    return p95_ok and fewer >= 0.30 and over <= 0.20


def sweep(trace, farm, cloud) -> None:
    strategies = []
    for oa in (30, 60, 90):
        for it in (300, 900, 3600):
            for grace in (None, 60, 300):
                if grace is not None and grace >= it:
                    continue
                for hib in (False, True):
                    cfg = PolicyConfig(overflow_after=oa, idle_timeout=it, idle_grace=grace)
                    name = f"oa={oa} idle={it} grace={grace or '-'} {'hib' if hib else 'stop'}"
                    strategies.append(Strategy(name, "event", cfg, hibernate=hib))
    print(format_table([simulate(trace, farm, s, cloud) for s in strategies]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    cloud = CloudModel()
    farm = synthetic_farm()
    print(f"cloud model: {cloud}")
    print(f"best settings: {best_config(cloud)}, hibernate=True")
    all_ok = True
    for seed in args.seeds:
        trace = traces.synthetic_week(seed)
        t0 = time.time()
        results = compare(trace, farm, standard_strategies(), cloud)
        print(f"\nseed {seed}: {traces.trace_summary(trace)}; "
              f"{len(results[0].waits)} on overflow builders; simulated in "
              f"{time.time() - t0:.0f}s")
        print(format_table(results))
        all_ok &= check(results)
        if args.sweep:
            print(f"\nsweep, seed {seed}:")
            sweep(trace, farm, cloud)
    print(f"\nall targets met on every seed: {all_ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
