"""Chaos soak: a few hundred builds through the sandbox while every fault we know of is injected.

Run it with ``make soak`` (or ``python -m buildbot_ec2_hybrid.sandbox.soak --builds 300``). It
prints builds submitted / succeeded / lost, instance-minutes left running after the last idle
timeout, and forbidden EC2 calls; the targets are lost = 0, leaked = 0, forbidden = 0, and the exit
status is 0 only when all three are met.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

from buildbot_ec2_hybrid.sandbox.farm import cleanup_all
from buildbot_ec2_hybrid.sandbox.farm import wait_for
from buildbot_ec2_hybrid.sandbox.lab import BuilderSpec
from buildbot_ec2_hybrid.sandbox.lab import LabSpec
from buildbot_ec2_hybrid.sandbox.lab import PoolSpec
from buildbot_ec2_hybrid.sandbox.lab import SandboxLab

POOL = "b2g-aws"
IDLE_TIMEOUT = 8
SUCCESS = 0


def soak_spec(pool_size: int) -> LabSpec:
    return LabSpec(
        pools=[
            PoolSpec(
                name=POOL,
                size=pool_size,
                overflow_after=1,
                idle_timeout=IDLE_TIMEOUT,
                boot_timeout=20,
                reconcile_interval=5,
            )
        ],
        inhouse_workers=2,
        builders=[
            BuilderSpec("b2g_build", pool=POOL),
            BuilderSpec("android_build", pool=POOL),
            BuilderSpec("win64_build"),
        ],
        pending_seconds=1.5,
        stopping_seconds=1.0,
        boot_delay=0.5,
        title="ec2-hybrid chaos soak",
    )


class Chaos:
    """Injects one fault at a time, at random, until stopped; logs what it did."""

    def __init__(self, lab: SandboxLab, rng: random.Random, *, kill_master: bool) -> None:
        self.lab = lab
        self.rng = rng
        self.kill_master = kill_master
        self.done = threading.Event()
        self.counts: collections.Counter[str] = collections.Counter()
        self.thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def say(self, text: str) -> None:
        print(f"  chaos: {text}", flush=True)

    def _run(self) -> None:
        region = self.lab.region
        assert region is not None
        killed = False
        while not self.done.wait(self.rng.uniform(4, 9)):
            fault = self.rng.choice(
                ["throttle", "capacity", "interrupt", "interrupt", "stuck", "unreachable", "kill"]
            )
            try:
                if fault == "throttle":
                    region.set_throttle(0.4, until=time.time() + 8, seed=self.rng.randrange(999))
                    self.say("40% of EC2 calls throttled for 8s")
                elif fault == "capacity":
                    az = self.rng.choice(["us-west-2a", "us-west-2b", "us-west-2c"])
                    region.set_capacity_error(azs={az})
                    self.say(f"no capacity in {az} for 10s")
                    self.done.wait(10)
                    region.set_capacity_error()
                elif fault == "interrupt":
                    running = [
                        v for v in region.instance_views()
                        if v.state == "running" and v.tags.get("buildbot-ec2-hybrid:pool") == POOL
                    ]
                    if not running:
                        continue
                    victim = self.rng.choice(running)
                    region.interrupt(victim.instance_id)
                    self.say(f"interrupted {victim.name}")
                elif fault == "stuck":
                    stopped = [
                        v for v in region.instance_views()
                        if v.state == "stopped" and v.tags.get("buildbot-ec2-hybrid:pool") == POOL
                    ]
                    if not stopped:
                        continue
                    victim = self.rng.choice(stopped)
                    region.set_stuck(victim.instance_id, "pending")
                    self.say(f"{victim.name} will hang in pending for 30s")
                    threading.Timer(30, region.set_stuck, (victim.instance_id, None)).start()
                elif fault == "unreachable":
                    region.set_unreachable(True, mode="refuse", seconds=6)
                    self.say("EC2 endpoint unreachable for 6s")
                elif fault == "kill":
                    if killed or not self.kill_master:
                        continue
                    killed = True
                    self.say("kill -9 the master, then start it again")
                    self.lab.master.kill()
                    time.sleep(1)
                    self.lab.master.start()
                self.counts[fault] += 1
            except Exception as e:  # a fault that could not be injected is not the plugin's
                self.say(f"could not inject {fault}: {e}")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=60)
        region = self.lab.region
        if region is not None:
            region.clear_faults()
            for v in region.instance_views():
                region.set_stuck(v.instance_id, None)


def run(builds: int, pool_size: int, seed: int, kill_master: bool, workdir: Path) -> int:
    rng = random.Random(seed)
    lab = SandboxLab(workdir, soak_spec(pool_size))
    started = time.monotonic()
    brids: list[int] = []
    try:
        print(f"soak: {builds} builds, pool of {pool_size}, seed {seed}", flush=True)
        lab.start()
        wait_for(lambda: all(lab.rest.worker_connected(n) for n in lab.inhouse_names), 60,
                 what="in-house workers")
        chaos = Chaos(lab, rng, kill_master=kill_master)
        chaos.start()
        builders = ["b2g_build"] * 5 + ["android_build"] * 3 + ["win64_build"]
        while len(brids) < builds:
            wave = min(builds - len(brids), rng.randint(5, 25))
            for _ in range(wave):
                try:
                    brids += lab.force(rng.choice(builders), duration=rng.choice([1, 2, 3, 4]))
                except Exception:
                    # the master may be down for a moment (chaos kill): submit it again
                    time.sleep(2)
            print(f"  submitted {len(brids)}/{builds}", flush=True)
            time.sleep(rng.uniform(2, 8))
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            try:
                reqs = [r for r in lab.rest.buildrequests() if r["buildrequestid"] in set(brids)]
            except Exception:
                time.sleep(2)
                continue
            done = sum(1 for r in reqs if r["complete"])
            if done == len(brids):
                break
            time.sleep(3)
        chaos.stop()
        reqs = {r["buildrequestid"]: r for r in lab.rest.buildrequests()}
        succeeded = sum(1 for b in brids if reqs.get(b, {}).get("results") == SUCCESS)
        completed = sum(1 for b in brids if reqs.get(b, {}).get("complete"))
        lost = len(brids) - completed
        # after the last idle timeout (plus a stop), nothing may be left running
        time.sleep(IDLE_TIMEOUT + 12)
        leaked_minutes = 0.0
        window = 30.0
        t_end = time.monotonic() + window
        while time.monotonic() < t_end:
            leaked_minutes += len(lab.running_instances()) * 1.0 / 60
            time.sleep(1)
        forbidden = lab.forbidden_calls()
        calls = collections.Counter(f"{c.action}:{c.outcome}" for c in lab.plugin_calls())
        print()
        print("chaos soak results")
        print(f"  faults injected:        {dict(chaos.counts)}")
        print(f"  builds submitted:       {len(brids)}")
        print(f"  builds succeeded:       {succeeded}")
        print(f"  builds completed other: {completed - succeeded}")
        print(f"  builds lost:            {lost}")
        print(f"  instance-minutes left running after the last idle timeout: "
              f"{leaked_minutes:.2f} (over a {window:.0f}s window)")
        print(f"  forbidden calls:        {len(forbidden)} {forbidden[:5]}")
        print(f"  EC2 calls:              {dict(sorted(calls.items()))}")
        print(f"  wall time:              {time.monotonic() - started:.0f}s")
        ok = lost == 0 and leaked_minutes == 0 and not forbidden
        print("  verdict:                " + ("PASS" if ok else "FAIL"), flush=True)
        return 0 if ok else 1
    finally:
        lab.stop()
        cleanup_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=300)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--seed", type=int, default=2012)
    parser.add_argument("--no-kill", action="store_true", help="do not kill -9 the master")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ec2-hybrid-soak-"))
    return run(args.builds, args.pool_size, args.seed, not args.no_kill, workdir)


if __name__ == "__main__":
    sys.exit(main())
