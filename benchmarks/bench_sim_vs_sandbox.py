"""Benchmark 4b: the simulator against the sandbox, on one short trace.

A short bursty trace (about four minutes) is played into a real master running an EC2Pool
(2 in-house workers, a pool of 6 hibernating instances, real buildbot-worker processes on the
revived instances). Afterwards the master's own database is exported with ``export-trace`` and
replayed by the simulator with the sandbox's timings: pending and stopping times as configured,
the boot (instance running -> worker connected) as measured in this run. Waits come from the
database for the sandbox (whole seconds, as Buildbot stores them) and from the virtual clock for
the simulator; instance time is billed the same way for both (from ``running`` until the stop
call, and to ``stopped`` for a hibernation), from the sandbox's state changes.

    .venv/bin/python benchmarks/bench_sim_vs_sandbox.py [--seed 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time

from _common import loopback_only
from _common import percentile
from _common import wait_until
from _common import workdir

POOL = "sim-aws"
BUILDER = "sim_build"
OVERFLOW_AFTER = 4
IDLE_TIMEOUT = 15
PENDING = 2.0
RESUME_PENDING = 1.0
STOPPING = 2.0
#: tolerances stated in docs/performance.rst
WAIT_TOLERANCE_S = 3.0
HOURS_TOLERANCE = 0.15


def make_trace(seed: int) -> list[tuple[float, float]]:
    """(offset, duration) pairs: two bursts, a trickle between, a quiet end."""
    rng = random.Random(seed)
    trace = [(0.0, rng.uniform(15, 30)) for _ in range(6)]
    t = 10.0
    while t < 100:
        t += rng.expovariate(1 / 9)
        trace.append((t, rng.uniform(6, 20)))
    trace += [(120.0 + rng.uniform(0, 1), rng.uniform(10, 25)) for _ in range(7)]
    t = 125.0
    while t < 170:
        t += rng.expovariate(1 / 12)
        trace.append((t, rng.uniform(6, 15)))
    return sorted((round(o, 2), round(d)) for o, d in trace)


class Watcher:
    """Instance state changes (from the region) and worker connections (polled over REST)."""

    def __init__(self, lab, workers: list[str]) -> None:
        self.lab = lab
        self.workers = workers
        self.changes: list[tuple[float, str, str | None, str]] = []
        self.connects: dict[str, list[float]] = {w: [] for w in workers}
        self._stop = threading.Event()
        lab.region.add_listener(self._on_change)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _on_change(self, iid, old, new) -> None:
        self.changes.append((time.time(), iid, old, new))

    def _poll(self) -> None:
        rest = self.lab.rest
        seen: dict[str, bool] = {}
        while not self._stop.is_set():
            try:
                now = time.time()
                for w in rest.workers():
                    if w["name"] in self.connects:
                        up = bool(w["connected_to"])
                        if up and not seen.get(w["name"]):
                            self.connects[w["name"]].append(now)
                        seen[w["name"]] = up
            except Exception:
                pass
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def billed(self, ids: set[str], hibernate: bool, until: float) -> tuple[float, int]:
        """Billed instance-seconds and the number of starts."""
        total, starts = 0.0, 0
        since: dict[str, float] = {}
        for t, iid, _old, new in self.changes:
            if iid not in ids:
                continue
            if new == "running":
                since[iid] = t
                starts += 1
            elif new == "stopping" and iid in since and not hibernate:
                total += t - since.pop(iid)
            elif new == "stopped" and iid in since:
                total += t - since.pop(iid)
        total += sum(until - t for t in since.values())
        return total, starts

    def boot_delays(self, names: dict[str, str]) -> list[float]:
        """running -> worker seen connected, per revival."""
        out = []
        for t, iid, _old, new in self.changes:
            if new == "running" and iid in names:
                later = [c for c in self.connects[names[iid]] if c >= t]
                if later:
                    out.append(later[0] - t)
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    loopback_only()
    from buildbot_ec2_hybrid import simulate as sim
    from buildbot_ec2_hybrid import traces
    from buildbot_ec2_hybrid.policy import PolicyConfig
    from buildbot_ec2_hybrid.sandbox.lab import BuilderSpec
    from buildbot_ec2_hybrid.sandbox.lab import LabSpec
    from buildbot_ec2_hybrid.sandbox.lab import PoolSpec
    from buildbot_ec2_hybrid.sandbox.lab import SandboxLab

    plan = make_trace(args.seed)
    spec = LabSpec(
        pools=[PoolSpec(name=POOL, size=6, overflow_after=OVERFLOW_AFTER,
                        idle_timeout=IDLE_TIMEOUT, hibernate=True, boot_timeout=120,
                        poll_interval=0.5, reconcile_interval=600)],
        builders=[BuilderSpec(BUILDER, pool=POOL)],
        inhouse_workers=2,
        pending_seconds=PENDING,
        hibernate_resume_seconds=RESUME_PENDING,
        stopping_seconds=STOPPING,
        boot_delay=0.5,
    )
    lab = SandboxLab(workdir("simcheck"), spec)
    lab.start()
    try:
        rest = lab.rest
        wait_until(lambda: all(rest.worker_connected(n) for n in lab.inhouse_names), 60,
                   what="in-house workers")
        pool_ids = {lab.instance_id(w): w for w in lab.pool_workers(POOL)}
        watcher = Watcher(lab, lab.pool_workers(POOL))
        print(f"playing {len(plan)} requests over {plan[-1][0]:.0f}s into the sandbox ...")
        t0 = time.time() + 1
        brids = []
        for offset, duration in plan:
            delay = t0 + offset - time.time()
            if delay > 0:
                time.sleep(delay)
            _, ids = rest.force_build("force", BUILDER, duration=str(int(duration)))
            brids.extend(ids.values())
        lab.wait_requests_complete(brids, timeout=600)
        wait_until(lambda: not lab.running_instances(), 120, what="pool idle and suspended")
        end = time.time()
        watcher.stop()
        billed, starts = watcher.billed(set(pool_ids), hibernate=True, until=end)
        boots = watcher.boot_delays(pool_ids)
        db_url = f"sqlite:///{lab.master.basedir / 'state.sqlite'}"
        trace_path = lab.workdir / "sandbox-trace.csv"
        n = traces.export_trace(db_url, trace_path)
        requests = sim.read_trace(trace_path)
        builds = lab.builds_for(brids)
        by_req = {}
        for b in builds:
            by_req[b["buildrequestid"]] = b  # the last build of a retried request
        reqs = {r["buildrequestid"]: r for r in
                (rest.get(f"buildrequests/{b}")["buildrequests"][0] for b in brids)}
        sandbox_waits = [by_req[b]["started_at"] - reqs[b]["submitted_at"] for b in brids]
        names = lab.worker_name_by_id()
        on_pool = sum(1 for b in by_req.values() if names[b["workerid"]].startswith(POOL))
    finally:
        lab.stop()

    boot = statistics.mean(boots) if boots else 3.0
    cloud = sim.CloudModel(pending=PENDING, resume_pending=RESUME_PENDING, boot=boot,
                           resume=boot, stopping=STOPPING, hibernating=STOPPING, min_billed=0)
    farm = sim.Farm((sim.InhouseGroup(("*",), 2),), pool_size=6)
    strategy = sim.Strategy("simulator", "event",
                            PolicyConfig(overflow_after=OVERFLOW_AFTER, idle_timeout=IDLE_TIMEOUT),
                            hibernate=True, reaction=0.15)
    result = sim.simulate(requests, farm, strategy, cloud)

    print(f"exported {n} requests from the sandbox master's database; measured boot "
          f"(running -> worker connected) {boot:.1f}s mean over {len(boots)} revivals")
    rows = [
        ("p50 wait (s)", percentile(sandbox_waits, 50), result.wait(50)),
        ("p95 wait (s)", percentile(sandbox_waits, 95), result.wait(95)),
        ("mean wait (s)", statistics.mean(sandbox_waits), statistics.mean(result.waits)),
        ("EC2 builds", on_pool, result.ec2_builds),
        ("instance starts", starts, result.revivals),
        ("instance-minutes", billed / 60, result.billed / 60),
    ]
    print(f"{'':18}{'sandbox':>10}{'simulator':>11}")
    for label, a, b in rows:
        print(f"{label:18}{a:>10.1f}{b:>11.1f}")
    waits_ok = all(abs(a - b) <= WAIT_TOLERANCE_S for _, a, b in rows[:3])
    hours_ok = abs(result.billed - billed) <= HOURS_TOLERANCE * billed
    print(f"waits within {WAIT_TOLERANCE_S:.0f}s: {'yes' if waits_ok else 'NO'}; "
          f"instance time within {HOURS_TOLERANCE:.0%}: {'yes' if hours_ok else 'NO'} "
          f"({(result.billed - billed) / billed:+.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
