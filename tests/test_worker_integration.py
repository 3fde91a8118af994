"""The EC2 worker on its own, with a real master, real worker processes and the sandbox region.

One master serves every test of this module: each test uses its own worker and builder.
"""

from __future__ import annotations

import time

import pytest

from buildbot_ec2_hybrid.sandbox.farm import wait_for
from buildbot_ec2_hybrid.sandbox.lab import BuilderSpec
from buildbot_ec2_hybrid.sandbox.lab import LabSpec
from buildbot_ec2_hybrid.sandbox.lab import PoolSpec

SUCCESS = 0
POOL = "solo"


def _solo(name: str, **extra):
    return {"name": name, "pool": POOL, "build_wait_timeout": 0, **extra}


REFUSED = {
    # worker -> what the refusal message must say
    "bad-public": "public IPv4 address",
    "bad-untagged": "has no buildbot-ec2-hybrid:pool",
    "bad-dup": "matches 2 instances",
    "bad-othervpc": "not in the pool's VPC",
}

SPEC = LabSpec(
    pools=[PoolSpec(name=POOL, size=1, service=False)],
    inhouse_workers=0,
    pending_seconds=1.0,
    stopping_seconds=1.0,
    extra_instances=[
        {"name": "solo-plain", "pool": POOL, "pool_tag": POOL, "hibernation": False,
         "allowed": True},
        {"name": "solo-adopt", "pool": POOL, "pool_tag": POOL, "state": "running",
         "allowed": True},
        {"name": "solo-wait", "pool": POOL, "pool_tag": POOL, "state": "running",
         "allowed": True},
        {"name": "bad-public", "pool": POOL, "pool_tag": POOL, "public_ip": True},
        {"name": "bad-untagged", "pool": POOL, "pool_tag": None},
        {"name": "bad-dup", "pool": POOL, "pool_tag": POOL},
        {"name": "bad-dup", "pool": POOL, "pool_tag": POOL},
        {"name": "bad-othervpc", "pool": POOL, "pool_tag": POOL, "vpc": "other"},
    ],
    standalone_workers=[
        _solo("solo-001", hibernate=True),
        _solo("solo-plain", hibernate=True),
        _solo("solo-adopt"),
        _solo("solo-wait"),
        *(_solo(name) for name in REFUSED),
    ],
    builders=[
        BuilderSpec(f"{name}_build", workers=[name])
        for name in ("solo-001", "solo-plain", "solo-adopt", "solo-wait", *REFUSED)
    ],
)


@pytest.fixture(scope="module")
def lab(make_module_lab):
    return make_module_lab(SPEC)


def _build_one(lab, worker: str, duration: float = 1, timeout: float = 90):
    brids = lab.force(f"{worker}_build", duration=duration)
    reqs = lab.wait_requests_complete(brids, timeout=timeout)
    builds = lab.builds_for(brids)
    return reqs, builds


def _worker_of(lab, build) -> str:
    return lab.worker_name_by_id()[build["workerid"]]


def test_round_trip_revive_build_suspend(lab):
    iid = lab.instance_id("solo-001")
    assert lab.instance_state("solo-001") == "stopped"
    since = time.time()
    reqs, builds = _build_one(lab, "solo-001")
    assert [r["results"] for r in reqs] == [SUCCESS]
    assert [_worker_of(lab, b) for b in builds] == ["solo-001"]
    # build_wait_timeout=0: suspended right after the build
    wait_for(lambda: lab.instance_state("solo-001") == "stopped", 30, what="solo-001 stopped")
    calls = [c for c in lab.region.calls(since=since) if iid in c.instance_ids]
    actions = [c.action for c in calls]
    assert set(actions) <= {"DescribeInstances", "StartInstances", "StopInstances"}
    assert actions.count("StartInstances") == 1
    stops = [c for c in calls if c.action == "StopInstances"]
    assert stops and stops[0].params.get("Hibernate") == "true", stops
    # the worker process really ran the build on the instance's disk
    disk = lab.agent.disk_dir(iid)
    assert list(disk.rglob("built-here.txt")), f"no build output under {disk}"


def test_plain_stop_when_instance_not_configured_for_hibernation(lab):
    iid = lab.instance_id("solo-plain")
    reqs, _ = _build_one(lab, "solo-plain")
    assert [r["results"] for r in reqs] == [SUCCESS]
    wait_for(lambda: lab.instance_state("solo-plain") == "stopped", 30, what="stopped")
    stops = [c for c in lab.region.calls(action="StopInstances") if iid in c.instance_ids]
    assert stops, "no StopInstances for solo-plain"
    assert all(c.params.get("Hibernate") in (None, "false") for c in stops), stops
    assert all(c.outcome == "ok" for c in stops)


def test_adopts_an_instance_that_is_already_running(lab):
    iid = lab.instance_id("solo-adopt")
    assert lab.instance_state("solo-adopt") == "running"
    reqs, builds = _build_one(lab, "solo-adopt")
    assert [r["results"] for r in reqs] == [SUCCESS]
    assert [_worker_of(lab, b) for b in builds] == ["solo-adopt"]
    starts = [c for c in lab.region.calls(action="StartInstances") if iid in c.instance_ids]
    assert starts == [], "an instance already running must be adopted, not started"


def test_waits_out_stopping_before_reviving(lab):
    iid = lab.instance_id("solo-wait")
    lab.region.set_stuck(iid, "stopping")
    lab.region.interrupt(iid)
    assert lab.instance_state("solo-wait") == "stopping"
    brids = lab.force("solo-wait_build", duration=1)
    time.sleep(3)  # the worker is now waiting for the instance to finish stopping
    assert lab.instance_state("solo-wait") == "stopping"
    released = time.time()
    lab.region.set_stuck(iid, None)
    reqs = lab.wait_requests_complete(brids, timeout=90)
    assert [r["results"] for r in reqs] == [SUCCESS]
    starts = [c for c in lab.region.calls(action="StartInstances") if iid in c.instance_ids]
    assert starts, "solo-wait was never started"
    # no start was attempted while it was stopping (AWS would refuse it)
    assert all(c.time >= released for c in starts), starts
    assert all(c.outcome == "ok" for c in starts), starts


def test_refuses_instances_it_must_not_touch(lab):
    since = time.time()
    for name in REFUSED:
        lab.force(f"{name}_build", duration=1)

    def all_refused():
        text = lab.master.log_text()
        return all(f"worker {name}" in text and why in text for name, why in REFUSED.items())

    wait_for(all_refused, 60, what="a refusal message for every bad instance")
    bad_ids = {iid for name in REFUSED for iid in lab.extras[name]}
    touched = [
        c for c in lab.region.calls(since=since)
        if c.action != "DescribeInstances" and bad_ids & set(c.instance_ids)
    ]
    assert touched == [], f"refused instances were acted on: {touched}"
    for name in REFUSED:
        for iid in lab.extras[name]:
            assert lab.region.instance_state(iid) == "stopped"


def test_throttled_start_is_retried(lab):
    iid = lab.instance_id("solo-001")
    since = time.time()
    lab.region.set_throttle(0.6, actions={"StartInstances"}, seed=3)
    try:
        reqs, _ = _build_one(lab, "solo-001")
    finally:
        lab.region.clear_faults()
    assert [r["results"] for r in reqs] == [SUCCESS]
    starts = [c for c in lab.region.calls(since=since, action="StartInstances")
              if iid in c.instance_ids]
    outcomes = [c.outcome for c in starts]
    assert "RequestLimitExceeded" in outcomes, outcomes
    assert outcomes[-1] == "ok"
    assert len(starts) <= 10, f"too many StartInstances calls: {outcomes}"
