from __future__ import annotations

import datetime

from buildbot_ec2_hybrid.usage import Stay
from buildbot_ec2_hybrid.usage import UsageLedger
from buildbot_ec2_hybrid.usage import period_starts

# Wednesday 2026-12-02 12:00 UTC
NOW = datetime.datetime(2026, 12, 2, 12, tzinfo=datetime.timezone.utc).timestamp()


def test_period_starts_are_utc_midnight_and_monday():
    day, week = period_starts(NOW)
    assert NOW - day == 12 * 3600
    assert day - week == 2 * 86400  # Monday


def test_hours_and_cost_split_by_period():
    ledger = UsageLedger({"m5.large": 0.1})
    ledger.record("w1", "m5.large", NOW - 2 * 3600, NOW - 3600)  # 1 h today
    ledger.record("w2", "m5.large", NOW - 3 * 86400, NOW - 3 * 86400 + 7200)  # last week
    ledger.record("w3", "m5.large", NOW - 86400, NOW - 86400 + 1800)  # yesterday, this week
    t = ledger.totals(NOW, running=[Stay("w4", "m5.large", NOW - 1800, None)])
    assert t["today_instance_hours"] == 1.5
    assert t["week_instance_hours"] == 2.0
    assert t["today_cost_usd"] == 0.15


def test_unknown_price_makes_cost_unknown_not_zero():
    ledger = UsageLedger()
    ledger.record("w1", "x9.weird", NOW - 3600, NOW)
    t = ledger.totals(NOW)
    assert t["today_instance_hours"] == 1.0
    assert t["today_cost_usd"] is None
