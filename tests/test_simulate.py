"""The simulator: hand-made traces whose waits and billed seconds can be worked out on paper."""

from __future__ import annotations

import io

import pytest

from buildbot_ec2_hybrid import policy
from buildbot_ec2_hybrid.policy import PolicyConfig
from buildbot_ec2_hybrid.simulate import CloudModel
from buildbot_ec2_hybrid.simulate import Farm
from buildbot_ec2_hybrid.simulate import InhouseGroup
from buildbot_ec2_hybrid.simulate import Request
from buildbot_ec2_hybrid.simulate import Strategy
from buildbot_ec2_hybrid.simulate import compare
from buildbot_ec2_hybrid.simulate import format_table
from buildbot_ec2_hybrid.simulate import parse_inhouse
from buildbot_ec2_hybrid.simulate import percentile
from buildbot_ec2_hybrid.simulate import read_trace
from buildbot_ec2_hybrid.simulate import simulate
from buildbot_ec2_hybrid.simulate import standard_strategies
from buildbot_ec2_hybrid.simulate import write_trace

# round numbers: StartInstances -> running 10 s, -> connected 20 s more (5 s after hibernation)
CLOUD = CloudModel(pending=10, boot=20, resume=5, stopping=10, hibernating=10, min_billed=0,
                   price_per_hour=3600)  # a dollar per billed second
CFG = PolicyConfig(overflow_after=30, idle_timeout=100)
ONE_INHOUSE = Farm((InhouseGroup(("*",), 1),), pool_size=2)
# r0 keeps the only in-house worker busy until 100; r1 must overflow
TRACE = [Request(0, "b", 100), Request(10, "b", 50)]


def run(kind, trace=TRACE, farm=ONE_INHOUSE, cfg=CFG, **kw):
    kw.setdefault("reaction", 0)
    return simulate(trace, farm, Strategy(kind, kind, cfg, **kw), CLOUD)


def test_event_driven_pool():
    r = run("event")
    # r1 eligible at 40 -> StartInstances at 40, running 50, connected 70: waited 60
    assert r.waits == [0, 60]
    assert (r.revivals, r.start_calls, r.ec2_builds) == (1, 1, 1)
    # idle from 120; suspended at the wake-up just after 120 + idle_timeout: billed 50 -> 220
    assert r.billed == pytest.approx(170, abs=0.02)
    assert r.cost == pytest.approx(r.billed + r.storage_cost, abs=0.02)


def test_reaction_delay_adds_to_the_wait():
    assert run("event", reaction=0.25).waits == [0, 60.25]


def test_one_minute_poll_reacts_late():
    r = run("poll", poll_interval=60)
    # eligible at 40, but the poll comes at 60: running 70, connected 90
    assert r.waits == [0, 80]
    # finished 140; polls at 180 (idle 40 s) and 240 (idle 100 s): stopped at 240
    assert r.billed == 170
    assert r.revivals == 1


def test_per_build_binds_a_fresh_instance():
    r = run("per-build")
    assert r.waits == [0, 60]
    assert r.billed == 70  # running 50 -> build done 120, then gone
    assert r.start_calls == 1


def test_per_build_request_stays_bound_when_inhouse_frees():
    # the in-house worker frees at 45, before the instance connects at 70: a bound request
    # still waits for its instance
    trace = [Request(0, "b", 45), Request(10, "b", 50)]
    assert run("per-build", trace=trace).waits == [0, 60]
    # the pool does not bind: in-house takes it at 45 and the revived instance idles
    r = run("event", trace=trace)
    assert r.waits == [0, 35]
    assert r.ec2_builds == 0 and r.revivals == 1


def test_clairvoyant_bound():
    r = run("clairvoyant")
    assert r.waits == [0, 30]
    # build 40 -> 90, plus the cheapest revival: min(boot 20, resume 5 + hibernate 10) = 15
    assert r.billed == 65


def test_clairvoyant_keeps_an_instance_for_a_short_gap_only():
    cloud = CloudModel(pending=10, boot=20, resume=5, stopping=10, hibernating=10,
                       min_billed=60)
    farm = Farm((), pool_size=5)
    cfg = PolicyConfig(overflow_after=0)
    # gaps of 30 s (kept: cheaper than a 60 s minimum start) and 500 s (a new start)
    trace = [Request(0, "b", 10), Request(40, "b", 10), Request(550, "b", 10)]
    r = simulate(trace, farm, Strategy("cv", "clairvoyant", cfg), cloud)
    assert r.revivals == 2
    assert r.billed == (15 + 50) + 60  # 15 s boot + 0..50; then a minimum-billed start


def test_hibernated_instance_resumes_faster():
    farm = Farm((), pool_size=1)
    cfg = PolicyConfig(overflow_after=0, idle_timeout=10)
    trace = [Request(0, "b", 10), Request(1000, "b", 10)]
    stop = run("event", trace=trace, farm=farm, cfg=cfg)
    hib = run("event", trace=trace, farm=farm, cfg=cfg, hibernate=True)
    # first revival is a cold boot either way; the second resumes from hibernation
    assert stop.waits == [30, 30]
    assert hib.waits == [30, 15]
    # a hibernation is billed while memory is written out (10 s each), and saves 15 s of boot
    assert hib.billed == pytest.approx(stop.billed + 10 + 10 - 15, abs=0.05)


def test_pool_size_caps_instances():
    farm = Farm((), pool_size=1)
    trace = [Request(0, "b", 100), Request(0, "b", 100), Request(0, "b", 100)]
    r = run("event", trace=trace, farm=farm, cfg=PolicyConfig(overflow_after=0, idle_timeout=50))
    # one instance, connected at 30, runs them one after the other
    assert sorted(r.waits) == [30, 130, 230]
    assert r.revivals == 1


def test_builders_that_do_not_overflow_queue_in_house():
    farm = Farm((InhouseGroup(("win*",), 1),), pool_size=3, overflow=("linux*",))
    trace = [Request(0, "win64", 100), Request(0, "win64", 100)]
    r = run("event", trace=trace, farm=farm)
    assert r.ec2_builds == 0 and r.revivals == 0 and r.billed == 0
    assert sorted(r.all_waits) == [0, 100]
    assert r.waits == []  # no request on an overflow builder


def test_oldest_request_first_across_builders():
    farm = Farm((InhouseGroup(("*",), 1),), pool_size=0)
    trace = [Request(0, "a", 10), Request(1, "b", 10), Request(2, "a", 10)]
    r = run("event", trace=trace, farm=farm)
    assert r.all_waits == [0, 9, 18]


def test_adaptive_idle_grace_saves_idle_time():
    # the in-house worker is free again long before the pool worker's idle timeout
    trace = [Request(0, "b", 100), Request(10, "b", 50)]
    fixed = run("event", trace=trace, cfg=PolicyConfig(overflow_after=30, idle_timeout=1000))
    grace = run("event", trace=trace,
                cfg=PolicyConfig(overflow_after=30, idle_timeout=1000, idle_grace=20))
    assert fixed.waits == grace.waits == [0, 60]
    assert fixed.billed == pytest.approx(120 + 1000 - 50, abs=0.05)
    assert grace.billed == pytest.approx(120 + 20 - 50, abs=0.05)


def test_uses_the_pool_policy_code(monkeypatch):
    calls = []
    real = policy.decide

    def spy(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(policy, "decide", spy)
    run("event")
    assert calls and calls == sorted(calls)
    calls.clear()
    run("poll", poll_interval=60)
    assert calls and all(t % 60 == 0 for t in calls)


def test_standard_comparison_on_a_burst():
    farm = Farm((InhouseGroup(("*",), 2),), pool_size=10)
    trace = [Request(5, "b", 600) for i in range(12)] + [Request(4000, "b", 60)]
    results = compare(trace, farm, standard_strategies(), CLOUD)
    by = {r.strategy: r for r in results}
    assert set(by) == {"ours (defaults)", "ours (best)", "mozilla-2012", "per-build",
                       "clairvoyant"}
    assert all(r.requests == 13 and len(r.waits) == 13 for r in results)
    # the clairvoyant bound waits exactly overflow_after for what in-house cannot take
    assert max(by["clairvoyant"].waits) == 60
    assert by["clairvoyant"].billed <= min(r.billed for r in results)
    # the poll reacts later than the event-driven pool with the same settings
    assert by["mozilla-2012"].wait(95) > by["ours (defaults)"].wait(95)
    # ten overflow builds revived in one batched call by the pool, one call each per-build
    assert by["ours (defaults)"].start_calls < by["per-build"].start_calls == 10
    table = format_table(results)
    assert "mozilla-2012" in table and "inst-hours" in table


def test_trace_csv_round_trip_and_errors():
    buf = io.StringIO()
    write_trace([Request(5, "b", 1.5), Request(1, "a", 60)], buf)
    assert buf.getvalue().splitlines() == ["submitted,builder,duration", "5,b,1.500", "1,a,60"]
    buf.seek(0)
    assert read_trace(buf) == [Request(1, "a", 60), Request(5, "b", 1.5)]
    with pytest.raises(ValueError, match="columns"):
        read_trace(io.StringIO("when,builder,duration\n1,a,2\n"))
    with pytest.raises(ValueError, match="line 3"):
        read_trace(io.StringIO("submitted,builder,duration\n1,a,2\nx,a,2\n"))


def test_parse_inhouse_and_percentile():
    groups = parse_inhouse(["linux*,android*=20", "win*=3"])
    assert groups[0].count == 20 and groups[0].serves("android-opt")
    assert not groups[1].serves("linux64")
    with pytest.raises(ValueError):
        parse_inhouse(["linux*"])
    assert percentile([], 95) == 0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 95) == 95
