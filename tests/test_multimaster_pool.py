"""The pool across several real masters: one PostgreSQL database, one crossbar router, real
worker processes and the sandbox region. Revivals happen once per backlog, not once per master;
a killed master's requests and instances are taken over; a master can join a busy farm."""

from __future__ import annotations

import collections
import time

import pytest

from buildbot_ec2_hybrid.sandbox.farm import wait_for
from buildbot_ec2_hybrid.sandbox.lab import BuilderSpec
from buildbot_ec2_hybrid.sandbox.lab import LabSpec
from buildbot_ec2_hybrid.sandbox.lab import PoolSpec
from buildbot_ec2_hybrid.sandbox.multimaster import MultiMasterLab

pytestmark = pytest.mark.multimaster

SUCCESS = 0
POOL = "b2g-aws"


def _spec(inhouse: int, size: int = 6, **pool) -> LabSpec:
    pool.setdefault("overflow_after", 1)
    pool.setdefault("idle_timeout", 6)
    pool.setdefault("takeover_after", 8)
    pool.setdefault("reconcile_interval", 5)
    return LabSpec(
        pools=[PoolSpec(name=POOL, size=size, **pool)],
        inhouse_workers=inhouse,
        builders=[BuilderSpec("b2g_build", pool=POOL)],
    )


@pytest.fixture
def make_lab(make_multimaster_lab):
    return make_multimaster_lab


def _wait_inhouse(lab: MultiMasterLab) -> None:
    wait_for(
        lambda: all(lab.rest.worker_connected(n) for n in lab.inhouse_names),
        60, what="in-house workers connected",
    )


def _force_on(lab: MultiMasterLab, i: int, count: int, duration: float) -> list[int]:
    brids: list[int] = []
    for _ in range(count):
        _, ids = lab.rest_of(i).force_build("force", "b2g_build", duration=str(duration))
        brids.extend(ids.values())
    return brids


def _each_request_succeeded(lab: MultiMasterLab, brids: list[int]) -> None:
    builds = lab.builds_for(brids)
    for brid in brids:
        results = [b["results"] for b in builds if b["buildrequestid"] == brid]
        assert SUCCESS in results, f"request {brid}: builds {results}"


def _never_double_started(lab: MultiMasterLab) -> None:
    """Between two starts of an instance there is always a stop: no second master started an
    instance that was already running."""
    last: dict[str, str] = {}
    for c in lab.plugin_calls():
        if c.action not in ("StartInstances", "StopInstances") or c.outcome != "ok":
            continue
        for iid in c.instance_ids:
            if c.action == "StartInstances":
                assert last.get(iid) != "StartInstances", f"{iid} started twice"
            last[iid] = c.action


def _leader(lab: MultiMasterLab) -> int:
    def find():
        leaders = [i for i, m in enumerate(lab.masters) if m.running
                   and m.log_text().rfind("now leads the pool")
                   > m.log_text().rfind("no longer leads the pool")]
        return leaders[0] + 1 if len(leaders) == 1 else None

    return wait_for(find, 30, what="one pool leader") - 1


def test_burst_split_across_masters_revives_once(make_lab):
    lab = make_lab(_spec(inhouse=2, overflow_after=2), masters=2)
    _wait_inhouse(lab)
    brids = _force_on(lab, 0, 3, 8) + _force_on(lab, 1, 3, 8)
    reqs = lab.wait_requests_complete(brids, timeout=180)
    assert [r["results"] for r in reqs] == [SUCCESS] * 6
    started = [i for c in lab.plugin_calls("StartInstances") if c.outcome == "ok"
               for i in c.instance_ids]
    # 6 requests, 2 in-house workers: 4 revivals in all, not 4 per master
    assert len(started) == len(set(started)) == 4, started
    _never_double_started(lab)
    # every revived instance was pointed at the leader before it started
    tags = [c for c in lab.plugin_calls("CreateTags") if c.outcome == "ok"]
    assert {i for c in tags for i in c.instance_ids} >= set(started)
    wait_for(lambda: not lab.running_instances(), 60, what="instances suspended")


def test_killed_master_is_taken_over(make_lab):
    lab = make_lab(_spec(inhouse=3, size=6), masters=3)
    _wait_inhouse(lab)
    leader = _leader(lab)
    brids = _force_on(lab, (leader + 1) % 3, 8, 12)
    # the leader's EC2 workers are building when it dies
    wait_for(
        lambda: sum(1 for w in lab.rest.workers() if w["name"].startswith(POOL)
                    and w["connected_to"]) >= 2,
        60, what="EC2 workers connected to the leader",
    )
    time.sleep(2)
    killed_at = time.time()
    lab.kill(leader)
    survivor = next(i for i, m in enumerate(lab.masters) if m.running)
    takeover = wait_for(
        lambda: next((m for m in lab.masters if m.running
                      and "stopped answering" in m.log_text()), None),
        60, what="a survivor taking over",
    )
    took_over_after = time.time() - killed_at
    reqs = lab.rest_of(survivor).wait_for(
        lambda: all(r["complete"] for r in lab.rest_of(survivor).buildrequests()
                    if r["buildrequestid"] in set(brids)) or None,
        240, what="every request complete",
    )
    assert reqs
    all_done_after = time.time() - killed_at
    _each_request_succeeded(lab, brids)
    _never_double_started(lab)
    wait_for(lambda: not lab.running_instances(), 90, what="instances suspended, none leaked")
    retried = collections.Counter(b["results"] for b in lab.builds_for(brids))
    print(f"\nkill-a-master: takeover {took_over_after:.1f}s after the kill "
          f"(takeover_after=8s), every request complete {all_done_after:.1f}s after it; "
          f"build results {dict(retried)}; takeover log: {takeover.basedir.name}")


def test_master_added_while_busy(make_lab):
    lab = make_lab(_spec(inhouse=2, size=6), masters=2)
    _wait_inhouse(lab)
    brids = _force_on(lab, 0, 6, 6)
    wait_for(lambda: lab.plugin_calls("StartInstances"), 60, what="revivals")
    new = lab.add_master()
    brids += _force_on(lab, new, 3, 3)
    reqs = lab.wait_requests_complete(brids, timeout=240)
    assert [r["results"] for r in reqs] == [SUCCESS] * len(brids)
    _never_double_started(lab)
    wait_for(lambda: not lab.running_instances(), 90, what="instances suspended")
