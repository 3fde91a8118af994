"""The pool page (buildbot_ec2_hybrid.www): served by a real master running the sandbox farm,
read over plain HTTP and rendered by a real headless Chromium (Debian's chromium and
chromedriver, installed by tests/browser_setup.sh when missing).

Screenshots are kept in test-artifacts/ at the top of the repository (gitignored).
"""

from __future__ import annotations

import base64
import functools
import http.server
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest
import requests

from buildbot_ec2_hybrid.sandbox import lab as lab_module
from buildbot_ec2_hybrid.sandbox.farm import wait_for
from buildbot_ec2_hybrid.sandbox.lab import AWS_SECRET
from buildbot_ec2_hybrid.sandbox.lab import INHOUSE_PASSWORD
from buildbot_ec2_hybrid.sandbox.lab import WORKER_PASSWORD
from buildbot_ec2_hybrid.sandbox.lab import BuilderSpec
from buildbot_ec2_hybrid.sandbox.lab import LabSpec
from buildbot_ec2_hybrid.sandbox.lab import PoolSpec

POOL = "b2g-aws"
PLUGIN_NAME = "ec2_hybrid"
PHASES = {"stopped", "booting", "idle", "busy", "stopping", "unusable"}
REPO = Path(__file__).resolve().parents[1]
# not imported from buildbot_ec2_hybrid.www: that pulls twisted.web.static, whose import-time
# deprecation warnings are errors in any test process that imported buildbot.test
STATIC_DIR = REPO / "buildbot_ec2_hybrid" / "www" / "static"
ARTIFACTS = REPO / "test-artifacts"
BROWSER_SETUP = Path(__file__).with_name("browser_setup.sh")
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# the flags every Chromium started on these machines must have, plus a resolver that maps every
# host name to nothing: the page must need nothing beyond the master it came from
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--window-size=1280,900",
)


def _session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # loopback only: no proxy from the environment
    return s


# -- the master, with the plugin enabled ----------------------------------------------------


def _entry_point_installed() -> bool:
    return any(
        ep.name == PLUGIN_NAME for ep in importlib.metadata.entry_points(group="buildbot.www")
    )


@pytest.fixture(scope="module")
def plugin_enabled(tmp_path_factory):
    """Have the sandbox master load the plugin whether or not the installed metadata and
    master_examples/sandbox.cfg already enable it (a no-op once they both do)."""
    with pytest.MonkeyPatch.context() as mp:
        if not _entry_point_installed():
            # the master finds www plugins by entry point only: give its process one
            shim = tmp_path_factory.mktemp("www-entry-point")
            dist = shim / "buildbot_ec2_hybrid_www_test_shim-0.dist-info"
            dist.mkdir()
            (dist / "METADATA").write_text(
                "Metadata-Version: 2.1\nName: buildbot-ec2-hybrid-www-test-shim\nVersion: 0\n"
            )
            (dist / "entry_points.txt").write_text(
                f"[buildbot.www]\n{PLUGIN_NAME} = buildbot_ec2_hybrid.www:ep\n"
            )
            path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)
            mp.setenv("PYTHONPATH", path)
        cfg = lab_module.SANDBOX_CFG.read_text()
        if not re.search(rf"[\"']{PLUGIN_NAME}[\"']\s*:", cfg):
            patched = cfg.replace('"plugins": {}', f'"plugins": {{"{PLUGIN_NAME}": {{}}}}', 1)
            assert patched != cfg, "sandbox.cfg no longer has '\"plugins\": {}': update this test"
            copy = tmp_path_factory.mktemp("cfg") / "sandbox.cfg"
            copy.write_text(patched)
            mp.setattr(lab_module, "SANDBOX_CFG", copy)
        yield


@pytest.fixture(scope="module")
def lab(plugin_enabled, make_module_lab):
    # max_running 2 of 4 and a long idle timeout: a burst leaves two instances running, two
    # stopped and requests waiting, for as long as the test looks at the page
    spec = LabSpec(
        pools=[PoolSpec(name=POOL, size=4, overflow_after=0, idle_timeout=300, max_running=2)],
        inhouse_workers=1,
        builders=[
            BuilderSpec("b2g_build", pool=POOL),
            BuilderSpec("win64_build", workers=["inhouse-1"]),
        ],
    )
    return make_module_lab(spec)


def _page_url(lab) -> str:
    return f"http://127.0.0.1:{lab.www_port}/plugins/{PLUGIN_NAME}/"


def _pools_json(lab) -> dict:
    resp = _session().get(_page_url(lab) + "pools.json", timeout=10)
    assert resp.status_code == 200, resp.text[:500]
    return resp.json()


def _the_pool(lab) -> dict:
    pools = _pools_json(lab)["pools"]
    assert [p["pool"] for p in pools] == [POOL]
    return pools[0]


# -- the resource on its own (no master process) ------------------------------------------


def _www():
    # twisted.web.static warns at import time; quiet here so that a process in which
    # buildbot.test made warnings errors can still import the plugin
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import buildbot_ec2_hybrid.www as www
    return www


class _FakePool:
    def __init__(self, name, status=None, fail=None, known=None, overflow=("b2g_build",)):
        self.name = name
        self._status, self._fail, self._known = status, fail, known or {}
        self._overflow = overflow

    def status(self):
        if self._fail:
            raise self._fail
        return self._status

    def overflow_builders(self):
        return {b: object() for b in self._overflow}

    def known_instance(self, name):
        return self._known.get(name)


class _FakeMaster:
    def __init__(self, allowed=True):
        from twisted.internet import defer
        from twisted.internet import task

        self.reactor = task.Clock()
        self.reactor.advance(1_767_225_600)
        self.allowed = allowed
        self.www = self
        self._defer = defer

    def assertUserAllowed(self, request, ep, action, options):
        from buildbot.www.authz.authz import Forbidden

        assert (ep, action) == (("workers",), "get")
        if self.allowed:
            return self._defer.succeed(None)
        return self._defer.fail(Forbidden(b"you need to have role 'admins'"))


def _get_pools_json(app):
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([b""])
    resource = app.resource.getChildWithDefault(b"pools.json", request)
    resource.render(request)
    assert request.finished
    return request.responseCode or 200, b"".join(request.written), request


def test_pools_json_resource_with_fake_pools(monkeypatch):
    www = _www()
    import buildbot_ec2_hybrid.pool as pool_module
    from buildbot_ec2_hybrid.ec2 import InstanceInfo

    stopped = InstanceInfo("i-0123456789abcdef0", "stopped", name="w-2",
                           availability_zone="us-west-2c", instance_type="c5.large")
    good = _FakePool(
        "b2g-aws",
        status={
            "pool": "b2g-aws", "degraded": None, "backlog": {"other_build": 3},
            "workers": [{"name": "w-1", "instance_id": None, "phase": "stopped"},
                        {"name": "w-2", "instance_id": None, "phase": "stopped"}],
            "events": [], "usage": {}, "settings": {"region": "us-west-2"},
        },
        known={"w-2": stopped},
    )
    broken = _FakePool("a-pool", fail=AttributeError("no demand yet"))
    monkeypatch.setattr(pool_module, "pools_of", lambda master: [good, broken])
    app = www.PoolPageApp()
    master = _FakeMaster()
    app.setMaster(master)
    app.setConfiguration({"refresh_seconds": 10})
    code, body, request = _get_pools_json(app)
    assert code == 200, body
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"application/json; charset=utf-8"
    ]
    doc = json.loads(body)
    assert doc["schema"] == 1 and doc["refresh_seconds"] == 10
    assert doc["generated_at"] == master.reactor.seconds()
    # sorted by name; a pool that cannot answer is an entry, not an HTTP 500
    assert [p["pool"] for p in doc["pools"]] == ["a-pool", "b2g-aws"]
    assert doc["pools"][0] == {"pool": "a-pool", "error": "AttributeError: no demand yet"}
    pool = doc["pools"][1]
    assert pool["backlog"] == {"b2g_build": 0, "other_build": 3}
    w1, w2 = pool["workers"]
    assert w1["instance_id"] is None and w1["instance_type"] is None
    assert (w2["instance_id"], w2["instance_state"], w2["availability_zone"],
            w2["instance_type"]) == ("i-0123456789abcdef0", "stopped", "us-west-2c", "c5.large")


def test_pools_json_obeys_authz_and_waits_for_the_master(monkeypatch):
    www = _www()
    import buildbot_ec2_hybrid.pool as pool_module

    monkeypatch.setattr(pool_module, "pools_of", lambda master: [])
    app = www.PoolPageApp()
    code, body, _ = _get_pools_json(app)
    assert code == 503
    app.setMaster(_FakeMaster(allowed=False))
    code, body, _ = _get_pools_json(app)
    assert code == 403 and b"admins" in body
    app.setMaster(_FakeMaster(allowed=True))
    code, body, _ = _get_pools_json(app)
    assert code == 200 and json.loads(body)["pools"] == []


@pytest.mark.parametrize(
    ("config", "complaint"),
    [
        ([], "give a dict"),
        ({"refresh": 5}, "unknown option(s) refresh"),
        ({"refresh_seconds": 0}, "from 1 to 3600"),
        ({"refresh_seconds": float("nan")}, "from 1 to 3600"),
        ({"refresh_seconds": True}, "from 1 to 3600"),
    ],
)
def test_plugin_configuration_errors_say_what_to_write(config, complaint):
    www = _www()
    with pytest.raises(ValueError, match=re.escape(complaint)):
        www.parse_configuration(config)
    assert www.parse_configuration({}) == ({}, 5.0)
    assert www.parse_configuration(None) == ({}, 5.0)


# -- pools.json over plain HTTP -------------------------------------------------------------


def test_pools_json_and_page_over_http(lab):
    s = _session()
    base = _page_url(lab)
    resp = s.get(base + "pools.json", timeout=10)
    assert resp.status_code == 200, resp.text[:500]
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["cache-control"] == "no-store"
    for secret in (WORKER_PASSWORD, INHOUSE_PASSWORD, AWS_SECRET):
        assert secret not in resp.text
    doc = resp.json()
    assert doc["schema"] == 1
    assert abs(doc["generated_at"] - time.time()) < 60
    assert doc["refresh_seconds"] == 5
    [pool] = doc["pools"]
    assert pool["pool"] == POOL
    assert pool["degraded"] is None
    # every overflow builder, waiting or not; a builder that never overflows is not listed
    assert set(pool["backlog"]) == {"b2g_build"}
    assert pool["settings"] == {
        "overflow_after": 0,
        "idle_timeout": 300,
        "max_running": 2,
        "hibernate": True,
        "vpc_id": lab.fixtures[POOL].vpc_id,
        "region": "us-west-2",
    }
    assert set(pool["usage"]) == {
        "today_instance_hours", "today_cost_usd", "week_instance_hours", "week_cost_usd"
    }
    assert [w["name"] for w in pool["workers"]] == lab.pool_workers(POOL)

    # stopped instances are shown too, once the pool's start-up reconcile has seen them
    def described():
        workers = _the_pool(lab)["workers"]
        return workers if all(w["instance_id"] for w in workers) else None

    workers = wait_for(described, 30, what="every pool instance described in pools.json")
    for w in workers:
        assert w["instance_id"] == lab.instance_id(w["name"])
        assert w["availability_zone"].startswith("us-west-2")
        assert w["instance_type"] == "m5.large"
        assert w["phase"] in PHASES
        assert w["instance_state"] == lab.instance_state(w["name"]) or w["phase"] != "stopped"

    # the page: one self-contained document; without the trailing slash, a redirect to it
    page = s.get(base, timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'fetch("pools.json"' in page.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(""", page.text)
    bare = s.get(base.rstrip("/"), timeout=10, allow_redirects=False)
    assert bare.status_code in (301, 302)
    assert bare.headers["location"].endswith(f"/plugins/{PLUGIN_NAME}/")
    # what Buildbot's own UI loads for each configured plugin: the menu entry
    scripts = s.get(base + "scripts.js", timeout=10)
    assert scripts.status_code == 200 and "buildbotSetupPlugin" in scripts.text
    assert s.get(base + "styles.css", timeout=10).status_code == 200
    assert s.get(base + "no-such-file", timeout=10).status_code == 404


# -- a real headless Chromium ---------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        # a fresh machine: install Debian's chromium and chromedriver (never a downloaded build)
        result = subprocess.run(
            ["bash", str(BROWSER_SETUP)], capture_output=True, text=True, timeout=900
        )
        if result.returncode == 3:
            pytest.skip(f"cannot install Chromium here: {result.stderr.strip()}")
        assert result.returncode == 0, f"{BROWSER_SETUP} failed:\n{result.stdout}{result.stderr}"
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -e '.[test]'")
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: Selenium Manager (which would download one) is never run
    service = Service(
        executable_path=str(CHROMEDRIVER),
        log_output=str(tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"),
    )
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(driver, name: str, *, full_page: bool = True) -> Path:
    """A PNG in test-artifacts/ (the whole page, not just the window), its path printed."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    if full_page:
        size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                         "scale": 1},
            },
        )
        path.write_bytes(base64.b64decode(shot["data"]))
    else:
        assert driver.save_screenshot(str(path)), f"no screenshot written to {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert path.stat().st_size > 10_000, f"{path} is suspiciously small"
    print(f"screenshot: {path}")
    return path


def _page_rows(driver) -> dict[str, dict[str, str]]:
    """The workers table as the browser renders it: name -> column texts."""
    return driver.execute_script(
        """
        const rows = {};
        for (const tr of document.querySelectorAll(
                'section[data-pool] table[data-role="workers"] tbody tr')) {
          const cell = (c) => (tr.querySelector('td.' + c) || {}).innerText || '';
          rows[tr.dataset.worker] = {
            phase_attr: tr.dataset.phase, phase: cell('phase').trim(), ec2: cell('ec2-state'),
            instance: (tr.querySelector('.iid') || {}).innerText || '', az: cell('az'),
            idle: cell('idle'), last_builder: cell('last-builder'), notes: cell('notes'),
          };
        }
        return rows;
        """
    )


def _severe_console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


# the first browser test may include installing Chromium with apt (tests/browser_setup.sh)
@pytest.mark.timeout(900)
def test_pool_page_in_headless_chromium(lab, browser):
    from selenium.webdriver.common.by import By

    wait_for(
        lambda: all(lab.rest.worker_connected(n) for n in lab.inhouse_names),
        60,
        what="in-house worker connected",
    )
    # 5 requests: the in-house worker takes one, the pool revives its max_running 2, and two
    # keep waiting while the builds run
    brids = lab.force("b2g_build", duration=90, count=5)

    def busy_pool_workers():
        workers = _the_pool(lab)["workers"]
        busy = {w["name"] for w in workers if w["phase"] == "busy"}
        return busy if len(busy) == 2 else None

    revived = wait_for(busy_pool_workers, 90, what="two pool workers building")
    started = {i for c in lab.plugin_calls("StartInstances") for i in c.instance_ids}
    assert {lab.instance_id(n) for n in revived} == started
    stopped = set(lab.pool_workers(POOL)) - revived

    browser.get(_page_url(lab))

    def page_shows_the_burst():
        rows = _page_rows(browser)
        if set(rows) != set(lab.pool_workers(POOL)):
            return None
        if any(rows[n]["phase"] != "busy" for n in revived):
            return None
        if any(rows[n]["phase"] != "stopped" for n in stopped):
            return None
        return rows

    try:
        rows = wait_for(page_shows_the_burst, 30, what="the page showing the burst")
    except TimeoutError:
        _screenshot(browser, "pool-page-failed.png")
        raise
    for name in revived:
        assert rows[name]["phase_attr"] == "busy"
        assert rows[name]["ec2"] == "running"
        assert rows[name]["last_builder"] == "b2g_build"
        assert "1 build running" in rows[name]["notes"]
    for name in stopped:
        assert rows[name]["ec2"] == "stopped"
        assert rows[name]["last_builder"] == "\u2014"
    for name, row in rows.items():
        assert row["instance"] == lab.instance_id(name)
        assert row["az"].startswith("us-west-2")

    section = browser.find_element(By.CSS_SELECTOR, f'section[data-pool="{POOL}"]')
    counts = {
        e.get_attribute("data-phase-count"): int(e.find_element(By.CSS_SELECTOR, ".pill").text)
        for e in section.find_elements(By.CSS_SELECTOR, "[data-phase-count]")
    }
    assert counts["busy"] == 2 and counts["stopped"] == 2, counts
    backlog = section.find_element(
        By.CSS_SELECTOR, 'table[data-role="backlog"] tr[data-builder="b2g_build"] .backlog-n'
    )
    assert int(backlog.text) >= 1
    tile = section.find_element(By.CSS_SELECTOR, '[data-tile="running"] .value').text
    assert tile == "2 / 4"
    hours_today = section.find_element(By.CSS_SELECTOR, '[data-tile="hours-today"] .value').text
    assert re.fullmatch(r"\d+\.\d+ h", hours_today), hours_today
    cost_today = section.find_element(By.CSS_SELECTOR, '[data-tile="cost-today"] .value').text
    assert re.fullmatch(r"\$\d+\.\d+", cost_today), cost_today
    assert not section.find_elements(By.CSS_SELECTOR, '[data-role="degraded"]')
    # the revivals, with the policy's reasons
    revive_rows = section.find_elements(
        By.CSS_SELECTOR, 'table[data-role="events"] tr[data-event="revive"]'
    )
    assert {r.get_attribute("data-worker") for r in revive_rows} == revived
    assert all(r.find_element(By.CSS_SELECTOR, "td.reason").text for r in revive_rows)
    last = section.find_element(By.CSS_SELECTOR, '[data-role="last-revive"]').text
    assert any(name in last for name in revived), last
    assert _severe_console_errors(browser) == []
    _screenshot(browser, "pool-page.png")

    # Buildbot's own web UI lists the page in its menu and frames it
    browser.get(f"http://127.0.0.1:{lab.www_port}/#/")
    link = wait_for(
        lambda: next(
            (a for a in browser.find_elements(By.CSS_SELECTOR, "a.bb-sidebar-item")
             if "EC2 pools" in a.text),
            None,
        ),
        30,
        what="the 'EC2 pools' menu entry in Buildbot's UI",
    )
    link.click()
    frame = wait_for(
        lambda: next(iter(browser.find_elements(By.CSS_SELECTOR, "iframe.bb-ec2-hybrid-frame")),
                     None),
        15,
        what="the pool page framed in Buildbot's UI",
    )
    browser.switch_to.frame(frame)
    try:
        wait_for(lambda: set(_page_rows(browser)) == set(lab.pool_workers(POOL)), 15,
                 what="the framed page's workers table")
        # Buildbot's title bar is enough: the page drops its own inside the frame
        assert not browser.find_element(By.CSS_SELECTOR, "header.top").is_displayed()
    finally:
        browser.switch_to.default_content()
    _screenshot(browser, "pool-page-in-buildbot-ui.png", full_page=False)
    # the builds themselves are not the point here: stop them rather than wait
    _stop_builds(lab, brids)


def _stop_builds(lab, brids) -> None:
    s = _session()
    for brid in brids:
        s.post(
            f"http://127.0.0.1:{lab.www_port}/api/v2/buildrequests/{brid}",
            json={"jsonrpc": "2.0", "method": "cancel", "id": 1, "params": {"reason": "done"}},
            timeout=10,
        )
    for build in lab.builds_for(brids):
        if not build["complete"]:
            s.post(
                f"http://127.0.0.1:{lab.www_port}/api/v2/builds/{build['buildid']}",
                json={"jsonrpc": "2.0", "method": "stop", "id": 1, "params": {"reason": "done"}},
                timeout=10,
            )


# -- the page's own rendering, on canned data -----------------------------------------------


class _CannedServer:
    """index.html and a pools.json of our choosing on 127.0.0.1, from a throwaway directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        shutil.copy(STATIC_DIR / "index.html", root / "index.html")
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def serve(self, doc: dict | None) -> None:
        path = self.root / "pools.json"
        if doc is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(json.dumps(doc))

    def __enter__(self) -> _CannedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _canned_pool(**overrides) -> dict:
    now = time.time()
    pool = {
        "pool": "try-aws",
        "degraded": None,
        "decisions": 7,
        "backlog": {"try_build": 0},
        "workers": [
            {"name": "try-aws-001", "phase": "idle", "latent_state": "SUBSTANTIATED",
             "connected": True, "building": 0, "instance_id": "i-0aaaaaaaaaaaaaaa1",
             "instance_state": "running", "instance_type": "c5.xlarge",
             "availability_zone": "us-west-2b", "idle_since": now - 125,
             "last_builder": "try_build", "refused": None, "quarantined_until": None,
             "wall_time": now},
        ],
        "events": [],
        "usage": {"today_instance_hours": 0.5, "today_cost_usd": 0.085,
                  "week_instance_hours": 12.25, "week_cost_usd": None},
        "settings": {"overflow_after": 60, "idle_timeout": 3600, "max_running": 10,
                     "hibernate": False, "vpc_id": "vpc-0123abcd", "region": "us-west-2"},
    }
    pool.update(overrides)
    return pool


@pytest.mark.timeout(900)
def test_page_renders_degraded_refused_and_errors(browser, tmp_path):
    from selenium.webdriver.common.by import By

    now = time.time()
    hostile = '<img src="x" onerror="document.title=\'pwned\'">'
    degraded = _canned_pool(
        degraded="EC2 throttled: Request limit exceeded",
        workers=[
            *_canned_pool()["workers"],
            {"name": "try-aws-002", "phase": "unusable", "instance_id": "i-0aaaaaaaaaaaaaaa2",
             "instance_state": "stopped", "availability_zone": "us-west-2a", "idle_since": None,
             "last_builder": None, "building": 0,
             "refused": "instance i-0aaaaaaaaaaaaaaa2 has a public IP", "quarantined_until": None},
            {"name": "try-aws-003", "phase": "stopped", "instance_id": "i-0aaaaaaaaaaaaaaa3",
             "instance_state": "stopped", "availability_zone": "us-west-2c", "idle_since": None,
             "last_builder": None, "building": 0, "refused": None,
             "quarantined_until": now + 240},
        ],
        events=[
            {"time": now - 300, "event": "revive", "worker": "try-aws-001",
             "reason": "try_build: 1 request waiting"},
            {"time": now - 200, "event": "quarantine", "worker": "try-aws-003",
             "reason": hostile},
            {"time": now - 100, "event": "suspend", "worker": "try-aws-001",
             "reason": "idle 3600s, no backlog"},
        ],
    )
    broken = {"pool": "bld-aws", "error": "AttributeError: 'EC2Pool' object has no attribute"}
    doc = {"schema": 1, "generated_at": now, "refresh_seconds": 1, "pools": [broken, degraded]}
    with _CannedServer(tmp_path) as server:
        server.serve(doc)
        browser.get(server.url)
        wait_for(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                 == "ready", 15, what="the page to load canned data")
        banner = browser.find_element(By.CSS_SELECTOR, "[data-pool=try-aws] [data-role=degraded]")
        assert "EC2 throttled: Request limit exceeded" in banner.text
        error = browser.find_element(By.CSS_SELECTOR, "[data-pool=bld-aws] [data-role=pool-error]")
        assert "has no attribute" in error.text
        rows = _page_rows(browser)
        assert rows["try-aws-001"]["idle"] in ("2m 5s", "2m 6s", "2m 4s")
        assert rows["try-aws-002"]["phase"] == "unusable"
        refused = rows["try-aws-002"]["notes"]
        assert "refused: instance i-0aaaaaaaaaaaaaaa2 has a public IP" in refused
        assert re.search(r"quarantined for [34]m", rows["try-aws-003"]["notes"])
        # an EC2 message is text, never markup
        assert hostile in browser.find_element(By.CSS_SELECTOR, "table[data-role=events]").text
        assert not browser.find_elements(By.CSS_SELECTOR, "main img")
        assert browser.title != "pwned"
        week = browser.find_element(By.CSS_SELECTOR, '[data-tile="cost-week"] .value').text
        assert week == "n/a"  # an instance type without a price
        last = browser.find_element(By.CSS_SELECTOR, '[data-role="last-suspend"]').text
        assert "idle 3600s, no backlog" in last and "try-aws-001" in last
        _screenshot(browser, "pool-page-degraded.png")

        # the master goes away: the last figures stay, under a banner that says so
        server.serve(None)
        wait_for(lambda: browser.find_element(By.ID, "conn-error").is_displayed(), 15,
                 what="the connection error banner")
        assert "HTTP 404" in browser.find_element(By.ID, "conn-error").text
        assert browser.find_elements(By.CSS_SELECTOR, '[data-pool="try-aws"]')
        # and comes back: the banner goes
        server.serve(dict(doc, pools=[]))
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "[data-role=no-pools]"), 15,
                 what="the page to show a master without pools")
        assert not browser.find_element(By.ID, "conn-error").is_displayed()
