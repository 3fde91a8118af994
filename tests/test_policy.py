"""The pure scaling policy: the decisions the pool and the simulator share."""

from __future__ import annotations

from buildbot_ec2_hybrid.policy import Demand
from buildbot_ec2_hybrid.policy import Phase
from buildbot_ec2_hybrid.policy import PolicyConfig
from buildbot_ec2_hybrid.policy import WorkerView
from buildbot_ec2_hybrid.policy import decide
from buildbot_ec2_hybrid.policy import quarantine_delay

B = frozenset({"b2g"})
CFG = PolicyConfig(overflow_after=60, idle_timeout=3600, max_running=10)


def stopped(name, az="a", last=None, builders=B, quarantined_until=None):
    return WorkerView(name, Phase.STOPPED, builders, az, last, None, None, quarantined_until)


def test_no_backlog_no_revival():
    plan = decide(Demand(), [stopped("w1")], CFG, now=1000)
    assert plan.empty
    assert plan.wake_at is None


def test_request_waits_overflow_after_before_eligible():
    demand = Demand({"b2g": [990]})
    plan = decide(demand, [stopped("w1")], CFG, now=1000)
    assert plan.revive == []
    assert plan.wake_at == 1050  # 990 + 60
    plan = decide(demand, [stopped("w1")], CFG, now=1050)
    assert [r.worker for r in plan.revive] == ["w1"]


def test_revive_exactly_backlog_minus_idle_and_booting():
    demand = Demand({"b2g": [0, 1, 2, 3, 4]})
    workers = [
        WorkerView("idle", Phase.IDLE, B, "a", None, 500, None),
        WorkerView("boot", Phase.BOOTING, B, "a", None, None, "b2g"),
        *(stopped(f"s{i}") for i in range(10)),
    ]
    plan = decide(demand, workers, CFG, now=1000)
    assert len(plan.revive) == 3
    assert all(r.builder == "b2g" for r in plan.revive)


def test_max_running_caps_revivals_and_reports_unmet():
    demand = Demand({"b2g": list(range(20))})
    workers = [stopped(f"s{i:02d}") for i in range(20)]
    cfg = PolicyConfig(overflow_after=0, idle_timeout=10, max_running=4)
    plan = decide(demand, workers, cfg, now=1000)
    assert len(plan.revive) == 4
    assert plan.unmet == {"b2g": 16}


def test_busy_workers_count_against_max_running():
    demand = Demand({"b2g": [0, 1]})
    workers = [WorkerView("busy", Phase.BUSY, B), stopped("s1"), stopped("s2")]
    plan = decide(demand, workers, PolicyConfig(overflow_after=0, max_running=2), now=10)
    assert [r.worker for r in plan.revive] == ["s1"]


def test_prefers_warm_disk_then_spreads_azs():
    demand = Demand({"b2g": [0, 1, 2]})
    workers = [
        stopped("a1", az="a"),
        stopped("a2", az="a"),
        stopped("b1", az="b"),
        stopped("c1", az="c", last="b2g"),
    ]
    plan = decide(demand, workers, PolicyConfig(overflow_after=0), now=10)
    chosen = [r.worker for r in plan.revive]
    assert chosen[0] == "c1"  # warm disk first
    assert sorted(chosen[1:]) == ["a1", "b1"]  # then one per remaining AZ


def test_skips_quarantined_and_unhealthy_azs():
    demand = Demand({"b2g": [0]})
    workers = [stopped("q", az="a", quarantined_until=500), stopped("bad", az="b"),
               stopped("good", az="c")]
    plan = decide(demand, workers, PolicyConfig(overflow_after=0), now=10, unhealthy_azs={"b"})
    assert [r.worker for r in plan.revive] == ["good"]
    # quarantine end is a wake-up: the decision can change then
    assert plan.wake_at == 500


def test_only_workers_serving_the_builder_are_revived():
    demand = Demand({"android": [0]})
    workers = [stopped("b2g-only"), stopped("droid", builders=frozenset({"android"}))]
    plan = decide(demand, workers, PolicyConfig(overflow_after=0), now=10)
    assert [r.worker for r in plan.revive] == ["droid"]


def test_idle_suspended_after_timeout_without_backlog():
    w = WorkerView("w", Phase.IDLE, B, "a", "b2g", idle_since=100)
    plan = decide(Demand(), [w], CFG, now=100 + 3599)
    assert plan.suspend == []
    assert plan.wake_at == 3700
    plan = decide(Demand(), [w], CFG, now=3700)
    assert [s.worker for s in plan.suspend] == ["w"]


def test_idle_not_suspended_while_its_builder_has_backlog():
    w = WorkerView("w", Phase.IDLE, B, "a", "b2g", idle_since=0)
    # backlog not yet eligible still counts: the worker will take it in a moment
    plan = decide(Demand({"b2g": [9990]}), [w], CFG, now=10000)
    assert plan.suspend == []


def test_busy_and_booting_never_suspended():
    workers = [WorkerView("busy", Phase.BUSY, B), WorkerView("boot", Phase.BOOTING, B)]
    plan = decide(Demand(), workers, PolicyConfig(idle_timeout=1), now=1e9)
    assert plan.suspend == []


def test_oldest_backlog_served_first_under_cap():
    shared = frozenset({"old", "new"})
    demand = Demand({"new": [500], "old": [100]})
    workers = [stopped("s1", builders=shared)]
    plan = decide(demand, workers, PolicyConfig(overflow_after=0, max_running=1), now=1000)
    assert [(r.worker, r.builder) for r in plan.revive] == [("s1", "old")]


def test_demand_bookkeeping():
    d = Demand()
    d.add("b", 5)
    d.add("b", 1)
    d.add("b", 3)
    assert d.count("b") == 3
    assert d.eligible("b", now=10, overflow_after=7) == 2  # 1 and 3
    assert d.next_eligible_at("b", now=10, overflow_after=7) == 12
    d.remove("b", 3)
    d.remove("b", 42)  # unknown: ignored
    assert d.count("b") == 2
    d.remove("b", 1)
    d.remove("b", 5)
    assert list(d.builders()) == []


def test_quarantine_grows_and_caps():
    assert quarantine_delay(1) == 60
    assert quarantine_delay(2) == 120
    assert quarantine_delay(3) == 240
    assert quarantine_delay(50) == 3600


def test_free_inhouse_workers_cover_backlog_first():
    demand = Demand({"b2g": [0, 1, 2]})
    workers = [stopped(f"s{i}") for i in range(5)]
    plan = decide(demand, workers, PolicyConfig(overflow_after=0), now=10,
                  inhouse_free={"b2g": 2})
    assert len(plan.revive) == 1
    plan = decide(demand, workers, PolicyConfig(overflow_after=0), now=10,
                  inhouse_free={"b2g": 5})
    assert plan.revive == []
