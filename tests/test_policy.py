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


# -- the fast decision must decide exactly what the straightforward one did -------------------


def _reference_decide(demand, workers, config, now, unhealthy_azs=(), inhouse_free=None):
    """The first, quadratic formulation of ``decide``'s revivals and idle claims, kept to check
    the indexed one against on random pools."""
    unhealthy = frozenset(unhealthy_azs)
    free = inhouse_free or {}
    need = {}
    for b in demand.builders():
        n = demand.eligible(b, now, config.overflow_after) - free.get(b, 0)
        if n > 0:
            need[b] = n
    running, idle, stopped, az_load = 0, [], [], {}
    for w in workers:
        if w.phase in (Phase.BOOTING, Phase.IDLE, Phase.BUSY, Phase.STOPPING):
            running += 1
            if w.availability_zone:
                az_load[w.availability_zone] = az_load.get(w.availability_zone, 0) + 1
        if w.phase is Phase.BOOTING and w.booked_for and need.get(w.booked_for):
            need[w.booked_for] -= 1
        elif w.phase is Phase.IDLE:
            idle.append(w)
        elif w.phase is Phase.STOPPED and not (
            w.quarantined_until is not None and w.quarantined_until > now
        ):
            stopped.append(w)
    for w in sorted(idle, key=lambda v: v.name):
        targets = [b for b in w.builders if need.get(b)]
        if targets:
            need[w.last_builder if w.last_builder in targets else min(targets)] -= 1
    order = sorted((b for b, n in need.items() if n > 0),
                   key=lambda b: (demand.oldest(b) or now, b))
    capacity = max(0, config.max_running - running)
    taken, revive, unmet = set(), [], {}
    for b in order:
        wanted = need[b]
        cands = [w for w in stopped if b in w.builders and w.name not in taken]
        while wanted > 0 and capacity > 0 and cands:
            def rank(w, b=b):
                az = w.availability_zone or ""
                return (az in unhealthy, w.last_builder != b, az_load.get(az, 0), w.name)

            choice = min(cands, key=rank)
            cands.remove(choice)
            taken.add(choice.name)
            if choice.availability_zone:
                az_load[choice.availability_zone] = az_load.get(choice.availability_zone, 0) + 1
            revive.append((choice.name, b))
            wanted -= 1
            capacity -= 1
        if wanted > 0:
            unmet[b] = wanted
    return revive, unmet


def test_indexed_decision_matches_reference_on_random_pools():
    import random

    rng = random.Random(7)
    builders = [f"b{i}" for i in range(6)]
    checked = 0
    for _ in range(400):
        pending = {b: [rng.uniform(0, 100) for _ in range(rng.randint(0, 8))]
                   for b in rng.sample(builders, rng.randint(0, 6))}
        workers = []
        for i in range(rng.randint(0, 25)):
            serves = frozenset(rng.sample(builders, rng.randint(1, 6)))
            phase = rng.choice([Phase.STOPPED] * 3 + [Phase.IDLE, Phase.BOOTING, Phase.BUSY,
                                                      Phase.STOPPING, Phase.UNUSABLE])
            workers.append(WorkerView(
                f"w{rng.randint(0, 999):03d}-{i}", phase, serves,
                rng.choice(["a", "b", "c", None]),
                rng.choice([None, *builders]),
                idle_since=rng.uniform(0, 100) if phase is Phase.IDLE else None,
                booked_for=rng.choice([None, *builders]) if phase is Phase.BOOTING else None,
                quarantined_until=rng.choice([None, None, 50.0, 500.0]),
            ))
        cfg = PolicyConfig(overflow_after=rng.choice([0, 10, 60]),
                           max_running=rng.randint(1, 30))
        free = {b: rng.randint(0, 3) for b in rng.sample(builders, 2)}
        unhealthy = set(rng.sample(["a", "b", "c"], rng.randint(0, 1)))
        plan = decide(Demand(pending), workers, cfg, now=100.0, unhealthy_azs=unhealthy,
                      inhouse_free=free)
        revive, unmet = _reference_decide(Demand(pending), workers, cfg, 100.0, unhealthy, free)
        assert [(r.worker, r.builder) for r in plan.revive] == revive
        assert plan.unmet == unmet
        checked += bool(revive)
    assert checked > 50  # the random pools did exercise revivals


# -- adaptive idle timeout (idle_grace) --------------------------------------------------------


def test_idle_grace_suspends_early_when_inhouse_has_room():
    cfg = PolicyConfig(idle_timeout=3600, idle_grace=120)
    w = WorkerView("w", Phase.IDLE, B, "a", "b2g", idle_since=1000)
    # in-house has a free worker for b2g: new requests go there; keep only for the grace
    plan = decide(Demand(), [w], cfg, now=1119, inhouse_free={"b2g": 1})
    assert plan.suspend == []
    assert plan.wake_at == 1120
    plan = decide(Demand(), [w], cfg, now=1120, inhouse_free={"b2g": 1})
    assert [s.worker for s in plan.suspend] == ["w"]
    assert "in-house workers free" in plan.suspend[0].reason


def test_idle_grace_keeps_full_timeout_while_inhouse_saturated():
    cfg = PolicyConfig(idle_timeout=3600, idle_grace=120)
    both = frozenset({"b2g", "android"})
    w = WorkerView("w", Phase.IDLE, both, "a", "b2g", idle_since=1000)
    # android's in-house fleet is full: its next request overflows, so keep the instance
    plan = decide(Demand(), [w], cfg, now=2000, inhouse_free={"b2g": 3})
    assert plan.suspend == []
    assert plan.wake_at == 4600
    plan = decide(Demand(), [w], cfg, now=4600, inhouse_free={"b2g": 3})
    assert [s.worker for s in plan.suspend] == ["w"]


def test_idle_grace_never_suspends_with_backlog_and_is_off_by_default():
    w = WorkerView("w", Phase.IDLE, B, "a", "b2g", idle_since=0)
    cfg = PolicyConfig(idle_timeout=3600, idle_grace=10)
    plan = decide(Demand({"b2g": [999]}), [w], cfg, now=1000, inhouse_free={"b2g": 1})
    assert plan.suspend == []
    plan = decide(Demand(), [w], PolicyConfig(idle_timeout=3600), now=1000,
                  inhouse_free={"b2g": 1})
    assert plan.suspend == [] and plan.wake_at == 3600


def test_break_even_idle():
    from buildbot_ec2_hybrid.policy import break_even_idle

    assert break_even_idle(25) == 60  # EC2 bills at least a minute per start
    assert break_even_idle(90) == 90
