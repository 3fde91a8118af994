"""The pool page: a Buildbot www plugin that shows every EC2Pool of the master.

Enable it in ``master.cfg`` (the package registers the ``ec2_hybrid`` entry point in the
``buildbot.www`` group)::

    c["www"] = {"port": 8010, "plugins": {"ec2_hybrid": {}}}

The plugin's only option is ``refresh_seconds`` (how often the page reloads its data, default 5),
e.g. ``"plugins": {"ec2_hybrid": {"refresh_seconds": 10}}``.

It serves, from the master's own web server and reactor:

``/plugins/ec2_hybrid/``
    a self-contained HTML page (inline CSS and JS, nothing fetched from elsewhere) that reads
    ``pools.json`` every ``refresh_seconds`` and shows, per pool, the backlog per overflow
    builder, the instances by state with a table of the workers, the last revive and suspend
    events with their reasons, instance-hours and estimated cost today and this week, and a
    banner while the pool is degraded.
``/plugins/ec2_hybrid/pools.json``
    the data behind the page, also read by ``buildbot-ec2-hybrid status``.
``/plugins/ec2_hybrid/scripts.js`` and ``styles.css``
    loaded by Buildbot's web UI for every configured plugin: they add an "EC2 pools" menu entry
    that frames the page.

Reading ``pools.json`` needs the same permission as reading ``/api/v2/workers`` under the
master's ``authz`` (anyone, unless the operator restricted it); otherwise it answers HTTP 403.

pools.json (schema 1)
---------------------
Additions are allowed within schema 1; a removal or a change of meaning bumps ``schema``.
Times are seconds since the epoch on the master's clock; durations are seconds; ``null`` means
unknown or not applicable. No secret is ever part of it.

::

    {
      "schema": 1,
      "generated_at": 1767225600.0,       # master clock: compute "idle for", "ago" against it
      "refresh_seconds": 5,
      "pools": [
        {
          "pool": "b2g-aws",              # the EC2Pool's name (its pool tag's value)
          "degraded": null,               # or why EC2 cannot be used right now, e.g.
                                          #   "EC2 throttled: ...": revivals are held back
          "decisions": 42,                # scaling decisions taken since the master started
          "backlog": {"b2g_build": 3},    # every overflow builder -> unclaimed requests
          "workers": [{
            "name": "b2g-aws-001",        # worker name = the instance's EC2 Name tag
            "phase": "idle",              # stopped|booting|idle|busy|stopping|unusable
            "latent_state": "SUBSTANTIATED",   # Buildbot's latent worker state
            "connected": true,
            "building": 0,                # builds running on it
            "instance_id": "i-0123456789abcdef0",
            "instance_state": "running",  # last EC2 state seen (pending, running, ...)
            "instance_type": "m5.large",
            "availability_zone": "us-west-2a",
            "idle_since": 1767225500.0,   # set while idle
            "last_builder": "b2g_build",  # builder it last built for (warm disk)
            "refused": null,              # why the instance may not be used (wrong VPC...)
            "quarantined_until": null,    # revivals of it held back until then
            "wall_time": 1767225600.0
          }],
          "events": [                     # oldest first, the last 50
            {"time": 1767225400.0, "event": "revive", "worker": "b2g-aws-001",
             "reason": "..."}             # event: revive, connected, suspend, adopt, lost,
          ],                              #   refused, quarantine, degraded, recovered
          "usage": {
            "today_instance_hours": 1.25, "today_cost_usd": 0.12,   # cost null: unknown price
            "week_instance_hours": 9.5, "week_cost_usd": 0.91       # today: UTC day; week: ISO
          },
          "settings": {"overflow_after": 60, "idle_timeout": 3600, "max_running": 50,
                       "hibernate": true, "vpc_id": "vpc-0123abcd", "region": "us-west-2"}
        }
      ]
    }

A pool whose status cannot be read (e.g. while the master is still starting it) appears as
``{"pool": NAME, "error": "..."}``.
"""

from __future__ import annotations

import datetime
import enum
import json
import math
from pathlib import Path
from typing import Any

from buildbot.util import unicode2bytes
from buildbot.www import resource as bb_resource
from twisted.internet import defer
from twisted.python import log
from twisted.web import static

from buildbot_ec2_hybrid import __version__

PLUGIN_NAME = "ec2_hybrid"
SCHEMA = 1
DEFAULT_REFRESH_SECONDS = 5.0
STATIC_DIR = Path(__file__).resolve().parent / "static"

# the permission the page asks for: whoever may list the workers may see the pool
_AUTHZ_ENDPOINT = ("workers",)


def _jsonable(value: Any) -> Any:
    # a status field whose type drifts must not turn the whole page into an HTTP 500
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value.timestamp()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, enum.Enum):
        return value.value
    return str(value)


def pool_status(pool: Any) -> dict[str, Any]:
    """One pool's entry in pools.json: ``pool.status()``, with every overflow builder listed in
    ``backlog`` (at 0 when nothing waits) and each worker's instance as last seen by the pool
    (stopped ones included), or an ``error`` entry."""
    try:
        status = dict(pool.status())
    except Exception as e:
        # one broken pool must not hide the others
        log.err(e, f"ec2-hybrid[{pool.name}]: pool status for the web page failed")
        return {"pool": pool.name, "error": f"{type(e).__name__}: {e}"}
    try:
        status["workers"] = [_with_latest_instance(pool, dict(w)) for w in status["workers"]]
    except Exception as e:
        log.err(e, f"ec2-hybrid[{pool.name}]: looking up the pool's instances failed")
    try:
        backlog = dict(status.get("backlog") or {})
        for builder in pool.overflow_builders():
            backlog.setdefault(builder, 0)
        status["backlog"] = {b: backlog[b] for b in sorted(backlog)}
    except Exception as e:
        log.err(e, f"ec2-hybrid[{pool.name}]: listing overflow builders failed")
    return status


def _with_latest_instance(pool: Any, entry: dict[str, Any]) -> dict[str, Any]:
    # A worker knows its instance only once it has revived it, and then keeps the description
    # from that moment; the pool's picture (reconcile, then every describe and poll) is fresher
    # and also covers the stopped instances.
    info = pool.known_instance(entry["name"])
    entry.setdefault("instance_type", None)
    if info is not None and entry.get("instance_id") in (None, info.instance_id):
        entry["instance_id"] = info.instance_id
        entry["instance_state"] = info.state
        entry["availability_zone"] = info.availability_zone or entry.get("availability_zone")
        entry["instance_type"] = info.instance_type or entry["instance_type"]
    return entry


def pools_document(master: Any, refresh_seconds: float = DEFAULT_REFRESH_SECONDS) -> dict:
    """The whole pools.json document for ``master`` (see the module docstring)."""
    from buildbot_ec2_hybrid.pool import pools_of

    return {
        "schema": SCHEMA,
        "generated_at": master.reactor.seconds(),
        "refresh_seconds": refresh_seconds,
        "pools": [pool_status(p) for p in sorted(pools_of(master), key=lambda p: p.name)],
    }


class PoolsJsonResource(bb_resource.Resource):
    """``GET pools.json``; rendered on the reactor thread, where the pools live."""

    isLeaf = True

    def __init__(self, app: PoolPageApp) -> None:
        super().__init__(None)
        self.app = app

    def render_GET(self, request):
        return self.asyncRenderHelper(request, self._render)

    @defer.inlineCallbacks
    def _render(self, request):
        master = self.app.master
        if master is None:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"the master has not started the pool page yet"
        yield master.www.assertUserAllowed(request, _AUTHZ_ENDPOINT, "get", {})
        doc = pools_document(master, self.app.refresh_seconds)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return unicode2bytes(json.dumps(doc, default=_jsonable, allow_nan=False, indent=1))


class PoolPageApp:
    """The object behind the ``buildbot.www`` entry point ``ec2_hybrid``.

    Buildbot's www service calls :meth:`setMaster` and :meth:`setConfiguration` on every
    (re)configuration and mounts :attr:`resource` at ``/plugins/ec2_hybrid/``.
    """

    description = "EC2 overflow pools: backlog, instances, events and cost"
    ui = True  # ships scripts.js: a menu entry in Buildbot's web UI

    def __init__(self, static_dir: Path = STATIC_DIR) -> None:
        self.version = __version__
        self.static_dir = str(static_dir)
        self.master: Any = None
        self.config: dict[str, Any] = {}
        self.refresh_seconds = DEFAULT_REFRESH_SECONDS
        # a directory resource: "/" serves index.html, and a request without the trailing
        # slash is redirected to it, so the page's relative "pools.json" resolves
        self.resource = static.File(self.static_dir)
        self.resource.putChild(b"pools.json", PoolsJsonResource(self))

    def setMaster(self, master: Any) -> None:
        self.master = master

    def setConfiguration(self, config: Any) -> None:
        self.config, self.refresh_seconds = parse_configuration(config)

    def __repr__(self) -> str:
        return f"<PoolPageApp {PLUGIN_NAME} {self.version} static_dir={self.static_dir}>"


def parse_configuration(config: Any) -> tuple[dict[str, Any], float]:
    """Check the value of ``c["www"]["plugins"]["ec2_hybrid"]``; return it and the refresh.

    Raises ValueError saying what to write instead.
    """
    where = f'c["www"]["plugins"]["{PLUGIN_NAME}"]'
    if config is None or config is True:
        config = {}
    if not isinstance(config, dict):
        raise ValueError(f"{where}={config!r}: give a dict, e.g. {{}} or {{'refresh_seconds': 5}}")
    unknown = sorted(set(map(str, config)) - {"refresh_seconds"})
    if unknown:
        raise ValueError(
            f"{where}: unknown option(s) {', '.join(unknown)}; the only option is refresh_seconds"
        )
    refresh = config.get("refresh_seconds", DEFAULT_REFRESH_SECONDS)
    if (
        isinstance(refresh, bool)
        or not isinstance(refresh, (int, float))
        or not math.isfinite(refresh)
        or not 1 <= refresh <= 3600
    ):
        raise ValueError(
            f"{where}: refresh_seconds={refresh!r}: give a number of seconds from 1 to 3600, "
            "e.g. refresh_seconds=5"
        )
    return dict(config), float(refresh)


#: the ``buildbot.www`` entry point: ``ec2_hybrid = buildbot_ec2_hybrid.www:ep``
ep = PoolPageApp()
