"""Benchmark 2: EC2 API calls to bring up a burst, pool versus one-instance-per-worker.

One sandbox region holds two sets of N stopped instances. The master's EC2Pool owns the first and
serves N overflow builders that have no in-house worker; one forced buildset (a push that
triggers every builder) submits N requests at once, and every EC2 call the master makes is
counted from its first StartInstances until all N pool workers are connected
(real buildbot-worker processes started by the instance agent) and, separately, until all N
instances are running. The baseline, in the same run, drives the second set the way Buildbot's
stock EC2 latent worker controls its one instance: each worker, in its own thread with its own
boto3 client, calls StartInstances for its instance and then DescribeInstances for it every
poll interval until it runs.

    .venv/bin/python benchmarks/bench_api_economy.py [--instances 200] [--poll 0.5]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import time
from collections import Counter

from _common import at_second_start
from _common import loopback_only
from _common import wait_until
from _common import workdir

POOL = "eco-aws"
BASELINE = "eco-stock"
BASELINE_CLIENT = "stock-baseline"


def force_all(rest, builders: list[str]) -> None:
    """One force of the force scheduler on every builder: one buildset, one request each."""
    body = {"jsonrpc": "2.0", "method": "force", "id": 1,
            "params": {"builderNames": builders, "duration": "1"}}
    resp = rest._session.post(rest._url("forceschedulers/force"), json=body, timeout=120)
    reply = resp.json()
    if "result" not in reply:
        raise RuntimeError(f"force failed: {reply}")


def baseline(endpoint: str, instance_ids: list[str], poll: float, threads: int) -> float:
    import boto3
    from botocore.config import Config

    def one(iid: str) -> None:
        # a client of its own, as each stock latent worker has
        ec2 = boto3.client(
            "ec2", region_name="us-west-2", endpoint_url=endpoint,
            aws_access_key_id="testing", aws_secret_access_key="testing",
            config=Config(user_agent_appid=BASELINE_CLIENT, retries={"mode": "standard"}),
        )
        ec2.start_instances(InstanceIds=[iid])
        while True:
            r = ec2.describe_instances(InstanceIds=[iid])
            if r["Reservations"][0]["Instances"][0]["State"]["Name"] == "running":
                return
            time.sleep(poll)

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, instance_ids))
    return time.time() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--poll", type=float, default=0.5,
                        help="DescribeInstances poll interval, pool and baseline alike")
    parser.add_argument("--pending", type=float, default=2.0,
                        help="seconds an instance stays pending in the sandbox")
    parser.add_argument("--threads", type=int, default=50,
                        help="baseline threads (stock workers starting at the same time)")
    parser.add_argument("--overflow-after", type=float, default=1.0)
    parser.add_argument("--no-workers", action="store_true",
                        help="instances never start a worker: count calls until all running")
    args = parser.parse_args()
    loopback_only()
    from buildbot_ec2_hybrid.sandbox.lab import BuilderSpec
    from buildbot_ec2_hybrid.sandbox.lab import LabSpec
    from buildbot_ec2_hybrid.sandbox.lab import PoolSpec
    from buildbot_ec2_hybrid.sandbox.lab import SandboxLab

    n = args.instances
    spec = LabSpec(
        pools=[
            PoolSpec(name=POOL, size=n, overflow_after=args.overflow_after, idle_timeout=3600,
                     boot_timeout=900,
                     hibernate=False, poll_interval=args.poll, reconcile_interval=3600),
            PoolSpec(name=BASELINE, size=n, service=False),
        ],
        builders=[BuilderSpec(f"eco-{i:03d}", pool=POOL, workers=[]) for i in range(n)],
        inhouse_workers=0,
        pending_seconds=args.pending,
        boot_delay=24 * 3600 if args.no_workers else 0.2,
    )
    lab = SandboxLab(workdir("economy"), spec)
    lab.start()
    try:
        wait_until(lambda: lab.plugin_calls("DescribeInstances"), 60, what="first reconcile")
        time.sleep(2)
        rest = lab.rest
        at_second_start()
        t_force = time.time()
        force_all(rest, [b.name for b in spec.builders])
        t_forced = time.time()
        pool_ids = set(lab.fixtures[POOL].instances.values())

        def running():
            views = [v for v in lab.region.instance_views() if v.instance_id in pool_ids]
            return all(v.state == "running" for v in views)

        wait_until(running, 300, 0.1, what="all pool instances running")
        t_running = time.time()
        workers = [w for w in lab.pool_workers(POOL)]

        def connected():
            try:
                names = {w["name"] for w in rest.workers() if w["connected_to"]}
            except Exception:  # a master busy with 200 connecting workers may answer late
                return False
            return names.issuperset(workers)

        if args.no_workers:
            t_connected = t_running
        else:
            wait_until(connected, 900, 1.0, what=f"all {n} pool workers connected")
            t_connected = time.time()
        calls = [c for c in lab.plugin_calls() if c.client != BASELINE_CLIENT]
        first = min(c.time for c in calls if c.action == "StartInstances")
        submitted = min(float(r["submitted_at"]) for r in rest.buildrequests())
        eligible = submitted + args.overflow_after
        lookups = [c for c in calls if eligible <= c.time < first]
        upto_running = [c for c in calls if first <= c.time <= t_running]
        upto_connected = [c for c in calls if first <= c.time <= t_connected]
        print(f"pool: one buildset of {n} requests forced in {t_forced - t_force:.1f}s; "
              f"first StartInstances "
              f"{first - t_force:.1f}s after the first request; all running after "
              f"{t_running - first:.1f}s, all {n} workers connected after "
              f"{t_connected - first:.1f}s")
        print(f"  EC2 calls until all running:   {len(upto_running):4d}  "
              f"{dict(Counter(c.action for c in upto_running))}")
        print(f"  EC2 calls until all connected: {len(upto_connected):4d}  "
              f"{dict(Counter(c.action for c in upto_connected))}")
        print(f"  before the first StartInstances, after the requests became eligible "
              f"({first - eligible:.1f}s): {len(lookups)} calls "
              f"{dict(Counter(c.action for c in lookups))}")
        upto_connected = upto_connected + lookups

        # the baseline's instances need no worker processes: stop the instance agent (and the
        # pool's workers with it) so that it does not start one per instance
        lab.agent.stop()
        ids = list(lab.fixtures[BASELINE].instances.values())
        took = baseline(lab.region.endpoint_url, ids, args.poll, args.threads)
        base = [c for c in lab.plugin_calls() if c.client == BASELINE_CLIENT]
        print(f"baseline: {n} stock-style workers ({args.threads} at a time) had their "
              f"instances running after {took:.1f}s")
        print(f"  EC2 calls until all running:   {len(base):4d}  "
              f"{dict(Counter(c.action for c in base))}")
        print(f"pool, counted from eligibility to all connected: {len(upto_connected)} calls")
        ratio = len(base) / max(1, len(upto_connected))
        print(f"target <= 10 calls in all: {'met' if len(upto_connected) <= 10 else 'NOT met'} "
              f"({len(upto_connected)}); target >= 20x fewer than the baseline: "
              f"{'met' if ratio >= 20 else 'NOT met'} ({ratio:.0f}x)")
    finally:
        lab.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
