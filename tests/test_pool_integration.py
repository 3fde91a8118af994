"""The overflow pool end to end: a real master running EC2Pool, real in-house worker processes,
real buildbot-worker processes on sandbox instances, EC2 over HTTP."""

from __future__ import annotations

import threading
import time

from buildbot_ec2_hybrid.sandbox.farm import wait_for
from buildbot_ec2_hybrid.sandbox.lab import BuilderSpec
from buildbot_ec2_hybrid.sandbox.lab import LabSpec
from buildbot_ec2_hybrid.sandbox.lab import PoolSpec

SUCCESS = 0
POOL = "b2g-aws"


def _spec(inhouse=2, builders=None, **pool):
    return LabSpec(
        pools=[PoolSpec(name=POOL, **pool)],
        inhouse_workers=inhouse,
        builders=builders or [BuilderSpec("b2g_build", pool=POOL)],
    )


def _wait_inhouse_connected(lab):
    wait_for(
        lambda: all(lab.rest.worker_connected(n) for n in lab.inhouse_names),
        60,
        what="in-house workers connected",
    )


def _at_second_start():
    """Buildbot stores submission times in whole seconds: start a burst just after a second
    turns, so that all of it shares one submission second and becomes eligible together."""
    frac = time.time() % 1
    if frac > 0.2:
        time.sleep(1.02 - frac)


def _results(reqs):
    return [r["results"] for r in reqs]


def _workers_of(lab, brids):
    names = lab.worker_name_by_id()
    return [names[b["workerid"]] for b in lab.builds_for(brids)]


def test_inhouse_free_means_no_start_and_non_overflow_builder_never_overflows(make_lab):
    lab = make_lab(
        _spec(
            inhouse=2,
            size=3,
            overflow_after=0,
            builders=[
                BuilderSpec("b2g_build", pool=POOL),
                BuilderSpec("win64_build", workers=["inhouse-1"]),
            ],
        )
    )
    _wait_inhouse_connected(lab)
    brids = lab.force("b2g_build", duration=1, count=2)
    reqs = lab.wait_requests_complete(brids, timeout=60)
    assert _results(reqs) == [SUCCESS, SUCCESS]
    assert set(_workers_of(lab, brids)) <= set(lab.inhouse_names)
    # a builder without the overflow flag queues on its in-house worker, however long
    brids = lab.force("win64_build", duration=1, count=4)
    reqs = lab.wait_requests_complete(brids, timeout=90)
    assert _results(reqs) == [SUCCESS] * 4
    assert set(_workers_of(lab, brids)) == {"inhouse-1"}
    assert lab.plugin_calls("StartInstances") == []
    assert lab.running_instances() == []


def test_burst_revives_exactly_what_is_needed_in_one_call(make_lab):
    lab = make_lab(_spec(inhouse=2, size=6, overflow_after=2, idle_timeout=4))
    _wait_inhouse_connected(lab)
    _at_second_start()
    brids = lab.force("b2g_build", duration=8, count=6)
    reqs = lab.wait_requests_complete(brids, timeout=120)
    assert _results(reqs) == [SUCCESS] * 6
    starts = lab.plugin_calls("StartInstances")
    # one decision per eligibility time: Buildbot records submission times in whole seconds, so
    # a burst submitted within one second (the usual case) is revived in a single call
    seconds = {lab.rest.get(f"buildrequests/{b}")["buildrequests"][0]["submitted_at"]
               for b in brids}
    assert len(starts) <= len(seconds), [(c.instance_ids, c.outcome) for c in starts]
    revived = [i for c in starts for i in c.instance_ids]
    assert len(revived) == len(set(revived)) == 4  # 6 requests - 2 in-house workers
    used = _workers_of(lab, brids)
    assert sum(1 for w in used if w.startswith(POOL)) == 4
    # the web UI (REST API) shows the EC2 worker under its Name with its instance details
    pool_worker = next(w for w in used if w.startswith(POOL))
    info = lab.rest.worker(pool_worker)["workerinfo"]
    assert info["ec2_instance_id"] == lab.instance_id(pool_worker)
    assert info["ec2_pool"] == POOL
    assert info["ec2_instance_type"] == "m5.large"
    assert info["ec2_availability_zone"].startswith("us-west-2")
    assert info["ec2_private_ip"]
    # idle suspension: every revived instance is stopped again once idle with no backlog
    wait_for(lambda: not lab.running_instances(), 60, what="revived instances suspended")
    stops = lab.plugin_calls("StopInstances")
    assert {i for c in stops for i in c.instance_ids} == set(revived)


def test_overflow_after_is_honoured(make_lab):
    lab = make_lab(_spec(inhouse=1, size=2, overflow_after=6, idle_timeout=3))
    _wait_inhouse_connected(lab)
    busy = lab.force("b2g_build", duration=15)
    time.sleep(1)
    brids = lab.force("b2g_build", duration=1)
    submitted = lab.rest.get(f"buildrequests/{brids[0]}")["buildrequests"][0]["submitted_at"]
    wait_for(lambda: lab.plugin_calls("StartInstances"), 30, what="a revival")
    start = lab.plugin_calls("StartInstances")[0]
    waited = start.time - submitted
    assert 5.9 <= waited <= 9, f"revived after {waited:.1f}s; overflow_after is 6s"
    reqs = lab.wait_requests_complete(brids + busy, timeout=90)
    assert _results(reqs) == [SUCCESS, SUCCESS]
    assert _workers_of(lab, brids)[0].startswith(POOL)


def test_inhouse_worker_that_frees_during_boot_takes_the_request(make_lab):
    spec = _spec(inhouse=1, size=2, overflow_after=0, idle_timeout=3)
    spec.pending_seconds = 6  # a slow boot
    lab = make_lab(spec)
    _wait_inhouse_connected(lab)
    first = lab.force("b2g_build", duration=2)
    time.sleep(0.5)
    second = lab.force("b2g_build", duration=1)
    wait_for(lambda: lab.plugin_calls("StartInstances"), 20, what="a revival")
    reqs = lab.wait_requests_complete(first + second, timeout=90)
    assert _results(reqs) == [SUCCESS, SUCCESS]
    # the request was not bound to the booting instance
    assert _workers_of(lab, second) == ["inhouse-1"]
    # and the instance nobody needed is suspended after its idle timeout
    wait_for(lambda: not lab.running_instances(), 60, what="unneeded instance suspended")


def test_max_running_holds(make_lab):
    lab = make_lab(_spec(inhouse=0, size=5, overflow_after=0, idle_timeout=3, max_running=2,
                         builders=[BuilderSpec("b2g_build", pool=POOL, workers=[])]))
    peak = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            views = lab.region.instance_views()
            peak.append(sum(1 for v in views if v.state in ("pending", "running")))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        brids = lab.force("b2g_build", duration=2, count=5)
        reqs = lab.wait_requests_complete(brids, timeout=150)
    finally:
        stop.set()
        sampler.join()
    assert _results(reqs) == [SUCCESS] * 5
    assert max(peak) == 2, f"peak running instances {max(peak)}"


def test_master_killed_and_restarted_adopts_running_instances(make_lab):
    lab = make_lab(_spec(inhouse=1, size=3, overflow_after=0, idle_timeout=5))
    _wait_inhouse_connected(lab)
    brids = lab.force("b2g_build", duration=4, count=3)
    wait_for(lambda: len(lab.running_instances()) >= 2, 30, what="instances revived")
    wait_for(
        lambda: sum(1 for w in lab.rest.workers() if w["name"].startswith(POOL)
                    and w["connected_to"]) >= 1,
        30, what="a pool worker connected",
    )
    lab.master.kill()
    running = set(lab.running_instances())
    assert running, "the kill should leave revived instances running"
    since = time.time()
    lab.master.start()
    reqs = lab.wait_requests_complete(brids, timeout=180)
    assert all(r["complete"] for r in reqs)
    # every request ends with a successful build (interrupted ones are retried)
    builds = lab.builds_for(brids)
    for brid in brids:
        assert any(b["results"] == SUCCESS for b in builds if b["buildrequestid"] == brid)
    # none leaked: all suspended after the idle timeout
    wait_for(lambda: not lab.running_instances(), 60, what="pool instances suspended")
    # instances found running after the restart were adopted, not started again
    for name in running:
        iid = lab.instance_id(name)
        after = [c for c in lab.plugin_calls() if c.time >= since and iid in c.instance_ids
                 and c.action != "DescribeInstances"]
        assert after and after[0].action == "StopInstances", (name, after)
