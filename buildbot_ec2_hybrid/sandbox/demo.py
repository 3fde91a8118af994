"""`buildbot-ec2-hybrid demo`: the whole story on loopback, narrated.

A sandbox region with stopped instances, a real master with the web UI on 127.0.0.1:8010, two
in-house worker processes, and a burst of builds larger than the in-house fleet: watch the pool
revive instances, their workers take the backlog, and the instances suspend again once idle.
"""

from __future__ import annotations

import collections
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from buildbot_ec2_hybrid.sandbox.farm import cleanup_all
from buildbot_ec2_hybrid.sandbox.farm import wait_for
from buildbot_ec2_hybrid.sandbox.lab import BuilderSpec
from buildbot_ec2_hybrid.sandbox.lab import LabSpec
from buildbot_ec2_hybrid.sandbox.lab import PoolSpec
from buildbot_ec2_hybrid.sandbox.lab import SandboxLab

POOL = "b2g-aws"
SUCCESS = 0


@dataclass
class DemoPlan:
    """What the demo fires, and how fast the sandbox moves."""

    b2g_builds: int = 8
    android_builds: int = 3
    windows_builds: int = 2
    build_seconds: float = 20
    pool_size: int = 8
    overflow_after: float = 5
    idle_timeout: float = 30
    pending_seconds: float = 4
    stopping_seconds: float = 3
    boot_delay: float = 1

    @classmethod
    def short(cls) -> DemoPlan:
        """The end-to-end check run by the test suite: same story, fewer and shorter builds."""
        return cls(
            b2g_builds=4,
            android_builds=1,
            windows_builds=1,
            build_seconds=3,
            pool_size=4,
            overflow_after=1,
            idle_timeout=4,
            pending_seconds=1,
            stopping_seconds=1,
            boot_delay=0.5,
        )

    def spec(self) -> LabSpec:
        return LabSpec(
            pools=[
                PoolSpec(
                    name=POOL,
                    size=self.pool_size,
                    overflow_after=self.overflow_after,
                    idle_timeout=self.idle_timeout,
                    hibernate=True,
                )
            ],
            inhouse_workers=2,
            builders=[
                BuilderSpec("b2g_build", pool=POOL),
                BuilderSpec("android_build", pool=POOL),
                # Windows builds never overflow: they wait for the in-house machines
                BuilderSpec("win64_build"),
            ],
            pending_seconds=self.pending_seconds,
            stopping_seconds=self.stopping_seconds,
            hibernate_resume_seconds=self.pending_seconds / 2,
            boot_delay=self.boot_delay,
            title="buildbot-ec2-hybrid demo",
        )


class Demo:
    def __init__(
        self,
        plan: DemoPlan,
        workdir: Path,
        *,
        www_port: int = 8010,
        out: TextIO = sys.stdout,
    ) -> None:
        self.plan = plan
        self.out = out
        self.lab = SandboxLab(workdir, plan.spec(), www_port=www_port)
        self.started = time.monotonic()
        self.brids: list[int] = []
        self._last_line = ""

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:6.1f}s] {text}", file=self.out, flush=True)

    # -- the story ----------------------------------------------------------------------------

    def run(self, deadline: float | None) -> bool:
        lab = self.lab
        self.say("starting the sandbox region, the master and two in-house workers ...")
        lab.start()
        fixture = lab.fixtures[POOL]
        self.say(
            f"sandbox EC2 at {lab.region.endpoint_url}: {len(fixture.instances)} stopped "
            f"instances in {fixture.vpc_id} tagged buildbot-ec2-hybrid:pool={POOL}"
        )
        self.say(f"web UI: http://127.0.0.1:{lab.www_port}/#/workers  (EC2 workers by Name)")
        self.say(f"pool page: http://127.0.0.1:{lab.www_port}/plugins/ec2_hybrid/")
        wait_for(
            lambda: all(lab.rest.worker_connected(n) for n in lab.inhouse_names),
            60,
            what="in-house workers to connect",
        )
        p = self.plan
        self.say(
            f"burst: {p.b2g_builds} b2g + {p.android_builds} android builds (may overflow "
            f"after {p.overflow_after:g}s), {p.windows_builds} win64 builds (never overflow), "
            f"{p.build_seconds:g}s each, on 2 in-house workers"
        )
        for builder, count in (
            ("b2g_build", p.b2g_builds),
            ("android_build", p.android_builds),
            ("win64_build", p.windows_builds),
        ):
            self.brids += lab.force(builder, duration=p.build_seconds, count=count)

        builds_done = False
        while deadline is None or time.monotonic() < deadline:
            state = self.snapshot()
            line = self.progress_line(state)
            if line != self._last_line:
                self.say(line)
                self._last_line = line
            builds_done = state["complete"] == len(self.brids)
            if builds_done and not state["instances_up"]:
                break
            time.sleep(1)
        return self.summary(builds_done)

    def snapshot(self) -> dict:
        lab = self.lab
        reqs = lab.rest.buildrequests()
        mine = [r for r in reqs if r["buildrequestid"] in set(self.brids)]
        workers = {w["name"]: w for w in lab.rest.workers()}
        builds = lab.rest.builds()
        running = [b for b in builds if not b["complete"]]
        names = {w["workerid"]: n for n, w in workers.items()}
        states = collections.Counter(lab.instance_state(n) for n in lab.pool_workers())
        return {
            "complete": sum(1 for r in mine if r["complete"]),
            "pending": sum(1 for r in mine if not r["claimed"] and not r["complete"]),
            "building_inhouse": sum(
                1 for b in running if not names.get(b["workerid"], "").startswith(POOL)
            ),
            "building_ec2": sum(
                1 for b in running if names.get(b["workerid"], "").startswith(POOL)
            ),
            "ec2_connected": sum(
                1 for n in lab.pool_workers() if workers.get(n, {}).get("connected_to")
            ),
            "instances": states,
            "instances_up": sum(v for k, v in states.items() if k != "stopped"),
            "revived": sum(len(c.instance_ids) for c in lab.plugin_calls("StartInstances")
                           if c.outcome == "ok"),
            "suspended": sum(len(c.instance_ids) for c in lab.plugin_calls("StopInstances")
                             if c.outcome == "ok"),
        }

    @staticmethod
    def progress_line(s: dict) -> str:
        inst = ", ".join(f"{k} {v}" for k, v in sorted(s["instances"].items()))
        return (
            f"pending {s['pending']:2d} | building in-house {s['building_inhouse']} "
            f"EC2 {s['building_ec2']} | EC2 workers connected {s['ec2_connected']} | "
            f"instances: {inst} | revived {s['revived']} suspended {s['suspended']}"
        )

    def summary(self, builds_done: bool) -> bool:
        lab = self.lab
        reqs = [r for r in lab.rest.buildrequests() if r["buildrequestid"] in set(self.brids)]
        ok = sum(1 for r in reqs if r["complete"] and r["results"] == SUCCESS)
        names = lab.worker_name_by_id()
        per_worker = collections.Counter(
            names.get(b["workerid"], "?") for b in lab.builds_for(self.brids)
        )
        calls = collections.Counter(
            f"{c.action}:{c.outcome}" for c in lab.plugin_calls()
        )
        revived = sum(len(c.instance_ids) for c in lab.plugin_calls("StartInstances")
                      if c.outcome == "ok")
        still_up = lab.running_instances()
        forbidden = lab.forbidden_calls()
        self.say("summary")
        print(f"  builds: {ok}/{len(self.brids)} succeeded", file=self.out)
        for worker, n in sorted(per_worker.items()):
            kind = "EC2" if worker.startswith(POOL) else "in-house"
            print(f"    {worker:22s} {kind:8s} {n} build(s)", file=self.out)
        print(f"  instances revived: {revived}; still running: {still_up or 'none'}",
              file=self.out)
        print("  EC2 API calls: " + ", ".join(f"{k} x{v}" for k, v in sorted(calls.items())),
              file=self.out)
        print(f"  forbidden calls: {forbidden or 'none'}", file=self.out, flush=True)
        success = (
            builds_done and ok == len(self.brids) and revived > 0 and not still_up
            and not forbidden
        )
        self.say("demo " + ("succeeded: revived, built and suspended" if success else "FAILED"))
        return success

    def shutdown(self) -> None:
        self.say("shutting down the master, workers and sandbox ...")
        try:
            self.lab.stop()
        finally:
            cleanup_all()


def run(
    *,
    short: bool = False,
    duration: float | None = None,
    www_port: int = 8010,
    workdir: Path | None = None,
    keep: bool = False,
) -> int:
    plan = DemoPlan.short() if short else DemoPlan()
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ec2-hybrid-demo-"))
    demo = Demo(plan, tmp, www_port=www_port)
    deadline = time.monotonic() + duration if duration else None

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    success = False
    try:
        success = demo.run(deadline)
    except KeyboardInterrupt:
        demo.say("interrupted")
    finally:
        demo.shutdown()
        signal.signal(signal.SIGTERM, previous)
        if not keep and workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if success else 1
