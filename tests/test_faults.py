"""A misbehaving AWS never loses a build request: each fault against the sandbox with the real
master and real worker processes."""

from __future__ import annotations

import time

from buildbot_ec2_hybrid.sandbox.farm import LocalWorker
from buildbot_ec2_hybrid.sandbox.farm import wait_for
from buildbot_ec2_hybrid.sandbox.lab import WORKER_PASSWORD
from buildbot_ec2_hybrid.sandbox.lab import BuilderSpec
from buildbot_ec2_hybrid.sandbox.lab import LabSpec
from buildbot_ec2_hybrid.sandbox.lab import PoolSpec

SUCCESS = 0
RETRY = 5
POOL = "b2g-aws"
MASTER_TAG = "buildbot-ec2-hybrid:master"


def _ec2_only(size=3, extra=(), **pool):
    """A builder with no in-house worker: every build needs the pool."""
    pool.setdefault("overflow_after", 0)
    pool.setdefault("idle_timeout", 4)
    return LabSpec(
        pools=[PoolSpec(name=POOL, size=size, **pool)],
        inhouse_workers=0,
        builders=[BuilderSpec("b2g_build", pool=POOL, workers=[])],
        extra_instances=list(extra),
    )


def _results(reqs):
    return [r["results"] for r in reqs]


def _build_workers(lab, brids):
    names = lab.worker_name_by_id()
    return [(names[b["workerid"]], b["results"]) for b in lab.builds_for(brids)]


def test_interruption_mid_build_is_retried_elsewhere(make_lab):
    lab = make_lab(_ec2_only(size=2))
    brids = lab.force("b2g_build", duration=20)

    def running_build():
        builds = [b for b in lab.builds_for(brids) if not b["complete"]]
        return builds[0] if builds else None

    build = wait_for(running_build, 60, what="the build to start on an EC2 worker")
    victim = lab.worker_name_by_id()[build["workerid"]]
    time.sleep(2)
    lab.region.interrupt(lab.instance_id(victim))
    reqs = lab.wait_requests_complete(brids, timeout=120)
    assert _results(reqs) == [SUCCESS]
    outcomes = _build_workers(lab, brids)
    assert outcomes[0] == (victim, RETRY), outcomes
    assert outcomes[-1][1] == SUCCESS
    # the pool's picture is corrected: the interrupted worker is no longer connected
    assert not lab.rest.worker_connected(victim) or lab.instance_state(victim) == "running"
    wait_for(lambda: not lab.running_instances(), 60, what="instances suspended")


def test_throttling_storm_backs_off_and_revives_everything(make_lab):
    lab = make_lab(_ec2_only(size=5))
    lab.region.set_throttle(0.5, until=time.time() + 15, seed=7)
    brids = lab.force("b2g_build", duration=2, count=5)
    reqs = lab.wait_requests_complete(brids, timeout=180)
    assert _results(reqs) == [SUCCESS] * 5
    calls = lab.plugin_calls()
    throttled = [c for c in calls if c.outcome == "RequestLimitExceeded"]
    assert throttled, "the storm never hit"
    # bounded: backoff, not a retry storm of our own
    assert len(calls) <= 150, f"{len(calls)} EC2 calls"
    wait_for(lambda: not lab.running_instances(), 60, what="instances suspended")


def test_insufficient_capacity_in_one_az_revives_elsewhere(make_lab):
    lab = make_lab(_ec2_only(size=6))
    lab.region.set_capacity_error(azs={"us-west-2a"})
    brids = lab.force("b2g_build", duration=2, count=3)
    reqs = lab.wait_requests_complete(brids, timeout=120)
    assert _results(reqs) == [SUCCESS] * 3
    failed = [c for c in lab.plugin_calls("StartInstances")
              if c.outcome == "InsufficientInstanceCapacity"]
    assert failed, "the capacity error was never seen"
    # no build ran in the AZ without capacity
    azs = {v.instance_id: v.az for v in lab.region.instance_views()}
    for worker, _ in _build_workers(lab, brids):
        assert azs[lab.instance_id(worker)] != "us-west-2a"
    assert "quarantined" in lab.master.log_text()


def test_worker_that_never_connects_is_suspended_and_quarantined(make_lab):
    # b2g-aws-000 sorts first, so the policy picks it; its worker dials a dead address
    broken = {"name": "b2g-aws-000", "pool": POOL, "pool_tag": POOL, "pool_member": True,
              "extra_tags": {MASTER_TAG: "127.0.0.1:1"}}
    lab = make_lab(_ec2_only(size=2, extra=[broken], boot_timeout=6))
    brids = lab.force("b2g_build", duration=1)
    reqs = lab.wait_requests_complete(brids, timeout=120)
    assert _results(reqs) == [SUCCESS]
    assert all(w != "b2g-aws-000" for w, _ in _build_workers(lab, brids))
    log = lab.master.log_text()
    assert "revival of b2g-aws-000 failed" in log and "quarantined" in log
    wait_for(lambda: lab.instance_state("b2g-aws-000") == "stopped", 30,
             what="the never-connecting instance suspended")


def test_stuck_pending_is_reported_and_never_started_twice(make_lab):
    lab = make_lab(_ec2_only(size=3, boot_timeout=5, extra=[
        {"name": "b2g-aws-000", "pool": POOL, "pool_tag": POOL, "pool_member": True}]))
    stuck = lab.instance_id("b2g-aws-000")
    lab.region.set_stuck(stuck, "pending")
    brids = lab.force("b2g_build", duration=1)
    reqs = lab.wait_requests_complete(brids, timeout=120)
    assert _results(reqs) == [SUCCESS]
    starts = [c for c in lab.plugin_calls("StartInstances") if stuck in c.instance_ids]
    assert len(starts) == 1, starts
    assert "revival of b2g-aws-000 failed" in lab.master.log_text()
    lab.region.set_stuck(stuck, None)
    # once it finally boots, nobody needs it: it is stopped, not left running
    wait_for(lambda: lab.instance_state("b2g-aws-000") == "stopped", 60,
             what="the late instance stopped")
    starts = [c for c in lab.plugin_calls("StartInstances") if stuck in c.instance_ids]
    assert len(starts) == 1, starts


def test_aws_unreachable_inhouse_goes_on_and_pool_recovers(make_lab):
    spec = LabSpec(
        pools=[PoolSpec(name=POOL, size=2, overflow_after=0, idle_timeout=4,
                        reconcile_interval=3)],
        inhouse_workers=1,
        builders=[BuilderSpec("b2g_build", pool=POOL), BuilderSpec("win64_build")],
    )
    lab = make_lab(spec)
    wait_for(lambda: lab.rest.worker_connected("inhouse-1"), 60, what="in-house worker")
    lab.region.set_unreachable(True, mode="refuse")
    try:
        inhouse = lab.force("win64_build", duration=1)
        reqs = lab.wait_requests_complete(inhouse, timeout=60)
        assert _results(reqs) == [SUCCESS]
        overflow = lab.force("b2g_build", duration=8, count=2)
        wait_for(lambda: "degraded" in lab.master.log_text(), 60, what="the pool degraded")
    finally:
        lab.region.set_unreachable(False)
    wait_for(lambda: "no longer degraded" in lab.master.log_text(), 60,
             what="the pool to recover by itself")
    reqs = lab.wait_requests_complete(overflow, timeout=120)
    assert _results(reqs) == [SUCCESS, SUCCESS]


def test_connection_accepted_only_while_reviving(make_lab):
    lab = make_lab(_ec2_only(size=1))
    name = lab.pool_workers()[0]
    # an impostor with the right name and password, while the pool is not reviving it
    impostor = LocalWorker(lab.workdir / "impostor", name, WORKER_PASSWORD,
                           master=f"127.0.0.1:{lab.pb_port}")
    impostor.start()
    try:
        wait_for(lambda: "connection refused: not reviving or adopting it"
                 in lab.master.log_text(), 30, what="the refusal")
        assert not lab.rest.worker_connected(name)
    finally:
        impostor.stop()


def test_stuck_stopping_is_reported_and_never_started_under_it(make_lab):
    lab = make_lab(_ec2_only(size=2, boot_timeout=5, idle_timeout=3))
    first = lab.force("b2g_build", duration=1)
    reqs = lab.wait_requests_complete(first, timeout=90)
    assert _results(reqs) == [SUCCESS]
    victim = _build_workers(lab, first)[0][0]
    iid = lab.instance_id(victim)
    lab.region.set_stuck(iid, "stopping")  # the coming suspension will hang in stopping
    wait_for(lambda: lab.instance_state(victim) == "stopping", 30, what="suspension started")
    wait_for(lambda: "instance " + iid in lab.master.log_text()
             and "while insubstantiating" in lab.master.log_text(), 30,
             what="the stuck stop reported")
    # the next request wants the warm-disk instance, which cannot start while it stops: served
    # elsewhere, and nothing ever sends StartInstances at a stopping instance
    second = lab.force("b2g_build", duration=1)
    reqs = lab.wait_requests_complete(second, timeout=120)
    assert _results(reqs) == [SUCCESS]
    starts = [c for c in lab.plugin_calls("StartInstances") if iid in c.instance_ids]
    assert len(starts) == 1, starts
    lab.region.set_stuck(iid, None)
    wait_for(lambda: lab.instance_state(victim) == "stopped", 60, what="the stop to complete")
