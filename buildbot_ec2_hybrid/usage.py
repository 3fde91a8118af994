"""Instance-hours and estimated cost of a pool, today and this week.

Pure bookkeeping (no I/O): the pool records each stay of an instance in ``running``; the pool page
and the status command read the totals. Prices are estimates the operator can override per
instance type with the pool's ``instance_prices`` argument.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass

#: on-demand Linux prices in USD per hour (us-west-2, for estimates only)
DEFAULT_PRICES: Mapping[str, float] = {
    "t3.large": 0.0832,
    "t3.xlarge": 0.1664,
    "m5.large": 0.096,
    "m5.xlarge": 0.192,
    "m5.2xlarge": 0.384,
    "m5.4xlarge": 0.768,
    "c5.large": 0.085,
    "c5.xlarge": 0.17,
    "c5.2xlarge": 0.34,
    "c5.4xlarge": 0.68,
    "c5.9xlarge": 1.53,
}

_KEEP_SECONDS = 8 * 86400


@dataclass(frozen=True)
class Stay:
    worker: str
    instance_type: str | None
    start: float
    end: float | None  # None: still running


def period_starts(now: float) -> tuple[float, float]:
    """Start of today (UTC midnight) and of this ISO week (Monday 00:00 UTC)."""
    day = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    week = day - datetime.timedelta(days=day.weekday())
    return day.timestamp(), week.timestamp()


class UsageLedger:
    def __init__(self, prices: Mapping[str, float] | None = None) -> None:
        self.prices = {**DEFAULT_PRICES, **(prices or {})}
        self._closed: deque[Stay] = deque()

    def record(self, worker: str, instance_type: str | None, start: float, end: float) -> None:
        if end > start:
            self._closed.append(Stay(worker, instance_type, start, end))
        while self._closed and self._closed[0].end is not None and (
            end - self._closed[0].end > _KEEP_SECONDS
        ):
            self._closed.popleft()

    def totals(self, now: float, running: Iterable[Stay] = ()) -> dict[str, float | None]:
        day, week = period_starts(now)
        stays = [*self._closed, *running]
        out: dict[str, float | None] = {}
        for label, since in (("today", day), ("week", week)):
            hours = 0.0
            cost: float | None = 0.0
            for s in stays:
                end = s.end if s.end is not None else now
                overlap = max(0.0, min(end, now) - max(s.start, since))
                if not overlap:
                    continue
                hours += overlap / 3600
                price = self.prices.get(s.instance_type or "")
                if price is None or cost is None:
                    cost = None
                else:
                    cost += price * overlap / 3600
            out[f"{label}_instance_hours"] = round(hours, 4)
            out[f"{label}_cost_usd"] = round(cost, 4) if cost is not None else None
        return out
