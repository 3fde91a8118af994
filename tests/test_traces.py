"""Traces: the synthetic week, export from a real Buildbot database, and the three commands."""

from __future__ import annotations

import argparse

import pytest

from buildbot_ec2_hybrid import cli_perf
from buildbot_ec2_hybrid.simulate import Request
from buildbot_ec2_hybrid.simulate import read_trace
from buildbot_ec2_hybrid.traces import DAY
from buildbot_ec2_hybrid.traces import DEFAULT_START
from buildbot_ec2_hybrid.traces import export_trace
from buildbot_ec2_hybrid.traces import hourly_counts
from buildbot_ec2_hybrid.traces import parse_time
from buildbot_ec2_hybrid.traces import synthetic_week


@pytest.fixture(scope="module")
def week():
    return synthetic_week(seed=3)


def test_synthetic_week_is_deterministic(week):
    assert synthetic_week(seed=3) == week
    assert synthetic_week(seed=4) != week
    assert week == sorted(week, key=lambda r: (r.submitted, r.builder))
    assert all(DEFAULT_START <= r.submitted < DEFAULT_START + 7 * DAY for r in week)
    assert all(r.duration >= 120 for r in week)
    assert 10_000 < len(week) < 40_000


def test_synthetic_week_has_a_daily_cycle(week):
    hours = hourly_counts(week)
    night = sum(hours[3:6]) / 3  # 03:00-06:00 UTC: Europe asleep, America gone home
    busy = sum(hours[17:21]) / 4  # the American working day
    assert busy > 4 * night


def test_synthetic_week_has_quiet_weekends_and_bursts(week):
    per_day = [0] * 7
    for r in week:
        per_day[int((r.submitted - DEFAULT_START) // DAY)] += 1
    assert max(per_day[5:]) < 0.5 * min(per_day[:5])
    # the nightly: every platform's builds submitted within half a minute of 10:00 UTC
    nightly = [r for r in week if 10 * 3600 <= (r.submitted - DEFAULT_START) % DAY < 10 * 3600 + 31]
    assert {r.builder for r in nightly} >= {"linux64-opt", "android-opt", "win64-debug"}
    # retrigger storms: some ten-minute windows carry several times the busiest hour's average
    windows: dict[int, int] = {}
    for r in week:
        key = int((r.submitted - DEFAULT_START) // 600)
        windows[key] = windows.get(key, 0) + 1
    typical = sorted(windows.values())[len(windows) // 2]
    assert max(windows.values()) > 4 * typical


# -- export from a Buildbot database --------------------------------------------------------


def _buildbot_db(path):
    return _buildbot_db_at(f"sqlite:///{path}")


def _buildbot_db_at(url):
    """A database with Buildbot's own schema and a little history."""
    import sqlalchemy as sa
    from buildbot.db.model import Model

    engine = sa.create_engine(url)
    md = Model.metadata
    md.create_all(engine)
    t = md.tables
    with engine.begin() as conn:
        conn.execute(t["masters"].insert(), [
            {"id": 1, "name": "m", "name_hash": "h", "active": 1, "last_active": 0}])
        conn.execute(t["builders"].insert(), [
            {"id": 1, "name": "linux64-opt", "name_hash": "a"},
            {"id": 2, "name": "win64-opt", "name_hash": "b"},
        ])
        conn.execute(t["buildsets"].insert(), [
            {"id": 1, "submitted_at": 1000, "complete": 1, "reason": "r"}])

        def br(id, builder, submitted):
            return {"id": id, "buildsetid": 1, "builderid": builder, "submitted_at": submitted,
                    "complete": 1}

        conn.execute(t["buildrequests"].insert(), [
            br(1, 1, 1000), br(2, 2, 1005), br(3, 1, 1010),  # 3 was retried
            br(4, 1, 1020),  # cancelled before it ran: no build
            br(5, 2, 5000),
        ])

        def build(id, brid, builder, started, complete):
            return {"id": id, "number": id, "builderid": builder, "buildrequestid": brid,
                    "masterid": 1, "started_at": started, "complete_at": complete,
                    "locks_duration_s": 0, "state_string": "finished"}

        conn.execute(t["builds"].insert(), [
            build(1, 1, 1, 1002, 1602),
            build(2, 2, 2, 1005, 1905),
            build(3, 3, 1, 1011, 1050),  # lost its worker
            build(4, 3, 1, 1100, 1400),  # the retry that counts
            build(5, 5, 2, 5001, None),  # still running
        ])
    engine.dispose()
    return url


def test_export_trace_round_trips_a_buildbot_database(tmp_path):
    url = _buildbot_db(tmp_path / "state.sqlite")
    out = tmp_path / "trace.csv"
    assert export_trace(url, out) == 3
    assert read_trace(out) == [
        Request(1000, "linux64-opt", 600),
        Request(1005, "win64-opt", 900),
        Request(1010, "linux64-opt", 300),
    ]
    assert export_trace(url, out, builders=["win64-opt"]) == 1
    assert export_trace(url, out, since=1001, until=1010) == 1
    assert read_trace(out) == [Request(1005, "win64-opt", 900)]


@pytest.mark.multimaster
def test_export_trace_from_postgresql(tmp_path):
    """The same history in PostgreSQL, Buildbot's multi-master database."""
    from buildbot_ec2_hybrid.sandbox.multimaster import PostgresServer
    from buildbot_ec2_hybrid.sandbox.multimaster import missing_infra

    pytest.importorskip("psycopg2", reason="needs the multimaster extra (psycopg2)")
    if "postgres" in " ".join(missing_infra()).lower():
        pytest.skip("PostgreSQL is not installed: run tests/multimaster_setup.sh as root")
    with PostgresServer(tmp_path / "pg") as server:
        url = _buildbot_db_at(server.create_database("history"))
        out = tmp_path / "trace.csv"
        assert export_trace(url, out) == 3
        assert read_trace(out)[2] == Request(1010, "linux64-opt", 300)


def test_parse_time():
    assert parse_time("1338768000") == DEFAULT_START
    assert parse_time("2012-06-04") == DEFAULT_START
    assert parse_time("2012-06-04T02:00:00+02:00") == DEFAULT_START


# -- the commands -----------------------------------------------------------------------------


def _run(argv):
    """Through the real ``buildbot-ec2-hybrid`` parser when it carries the subcommands."""
    try:
        from buildbot_ec2_hybrid import cli

        return cli.main(argv)
    except ImportError:
        parser = argparse.ArgumentParser()
        cli_perf.add_subcommands(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(argv)
        return args.handler(args)


def test_generate_then_simulate(tmp_path, capsys):
    trace = tmp_path / "day.csv"
    assert _run(["generate-trace", str(trace), "--seed", "1", "--days", "1",
                 "--storms", "1"]) == 0
    requests = read_trace(trace)
    assert requests == synthetic_week(seed=1, days=1, storms=1)
    capsys.readouterr()
    assert _run(["simulate", str(trace), "--farm", "synthetic",
                 "--strategy", "ours", "--strategy", "clairvoyant"]) == 0
    out = capsys.readouterr().out
    assert f"{len(requests)} requests" in out
    lines = [line.split() for line in out.splitlines()]
    assert [cells[0] for cells in lines[-2:]] == ["ours", "clairvoyant"]
    assert _run(["simulate", str(trace), "--inhouse", "*=500", "--json",
                 "--strategy", "mozilla-2012"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    # so many in-house workers that nothing overflows
    assert rows[0]["strategy"] == "mozilla-2012" and rows[0]["ec2_builds"] == 0


def test_export_trace_command(tmp_path, capsys):
    url = _buildbot_db(tmp_path / "state.sqlite")
    assert _run(["export-trace", url, str(tmp_path / "t.csv"), "--since", "1970-01-01"]) == 0
    assert "wrote 3 build requests" in capsys.readouterr().out
    assert _run(["export-trace", "sqlite:////nonexistent/dir/x.sqlite", "-"]) == 2
    assert "export-trace:" in capsys.readouterr().err


def test_simulate_command_reports_a_bad_trace(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert _run(["simulate", str(bad)]) == 2
    assert "submitted,builder,duration" in capsys.readouterr().err
