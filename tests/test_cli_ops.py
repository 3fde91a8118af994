"""`buildbot-ec2-hybrid check` and `status`, run the way an operator runs them: the installed
command in a subprocess, against the sandbox region over HTTP (and, for status, a real master)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from buildbot_ec2_hybrid import cli
from buildbot_ec2_hybrid.cli_ops import format_duration
from buildbot_ec2_hybrid.sandbox.farm import free_port
from buildbot_ec2_hybrid.sandbox.lab import BuilderSpec
from buildbot_ec2_hybrid.sandbox.lab import LabSpec
from buildbot_ec2_hybrid.sandbox.lab import PoolSpec
from buildbot_ec2_hybrid.sandbox.region import POOL_TAG
from buildbot_ec2_hybrid.sandbox.region import SETUP_CLIENT
from buildbot_ec2_hybrid.sandbox.region import SandboxRegion

CLI = Path(sys.executable).with_name("buildbot-ec2-hybrid")
POOL = "b2g-aws"
REGION = "us-west-2"
AWS_SECRET = "cli-ops-aws-secret"
DOC_POLICY = Path(__file__).resolve().parents[1] / "docs" / "iam-policy.json"


def run_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    env.pop("AWS_PROFILE", None)
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture
def region() -> Iterator[SandboxRegion]:
    with SandboxRegion(pending_seconds=0.3, stopping_seconds=0.3) as r:
        yield r


def write_master(
    basedir: Path,
    region: SandboxRegion,
    *,
    vpc_id: str,
    workers: list[str],
    hibernate: bool = True,
    key_id: str = "testing",
    secret: str = AWS_SECRET,
    instance_ids: dict[str, str] | None = None,
    standalone: dict | None = None,
    endpoint_url: str | None = None,
    pool: str = POOL,
) -> Path:
    """A master directory whose master.cfg declares one EC2Pool (and maybe a standalone
    EC2PoolWorker); the AWS secret comes from a SecretInAFile provider, as in production."""
    secrets = basedir / "secrets"
    secrets.mkdir(parents=True, mode=0o700)
    (secrets / "aws-secret-key").write_text(secret)
    (secrets / "aws-secret-key").chmod(0o600)
    solo = ""
    if standalone:
        solo = f"""
c["workers"].append(EC2PoolWorker(
    {standalone["name"]!r}, "pw", vpc_id={vpc_id!r}, region={REGION!r},
    endpoint_url={endpoint_url or region.endpoint_url!r}, pool={standalone["pool"]!r},
    aws_access_key_id={key_id!r}, aws_secret_access_key=util.Secret("aws-secret-key"),
    hibernate={standalone.get("hibernate", False)!r}))
c["builders"].append(util.BuilderConfig(name="solo", workernames=[{standalone["name"]!r}],
                                        factory=util.BuildFactory()))
"""
    cfg = f"""\
from buildbot.plugins import schedulers
from buildbot.plugins import secrets
from buildbot.plugins import util

from buildbot_ec2_hybrid import EC2Pool
from buildbot_ec2_hybrid import EC2PoolWorker

c = BuildmasterConfig = {{}}
c["buildbotNetUsageData"] = None
c["protocols"] = {{"pb": {{"port": "tcp:0:interface=127.0.0.1"}}}}
# relative on purpose: the master (and check) run from the base directory
c["secretsProviders"] = [secrets.SecretInAFile(dirname="secrets")]
pool = EC2Pool(
    {pool!r},
    region={REGION!r},
    vpc_id={vpc_id!r},
    endpoint_url={endpoint_url or region.endpoint_url!r},
    workers={workers!r},
    instance_ids={instance_ids or {}!r},
    password=util.Secret("ec2-worker-password"),
    hibernate={hibernate!r},
    aws_access_key_id={key_id!r},
    aws_secret_access_key=util.Secret("aws-secret-key"),
)
c["workers"] = list(pool.workers)
c["services"] = [pool]
c["builders"] = [pool.builder("b2g_build", workernames=[], factory=util.BuildFactory())]
{solo}
c["schedulers"] = [schedulers.ForceScheduler(
    name="force", builderNames=[b.name for b in c["builders"]])]
"""
    (basedir / "master.cfg").write_text(cfg)
    return basedir


def check_json(basedir: Path) -> tuple[int, dict, str]:
    proc = run_cli("check", "--json", str(basedir))
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def rows_by_worker(doc: dict) -> dict[str, dict]:
    return {r["worker"]: r for r in doc["rows"]}


def table_rows(stdout: str) -> dict[str, str]:
    """worker -> its table row (with its continuation lines)."""
    rows: dict[str, str] = {}
    current = None
    for line in stdout.splitlines()[1:-1]:  # header and summary line
        if line.startswith(" ") and current:
            rows[current] += "\n" + line
        elif line and not line.startswith(" "):
            current = line.split()[0]
            rows[current] = line
    return rows


def assert_read_only(region: SandboxRegion, refused_ids: set[str] = frozenset()) -> None:
    """Only DescribeInstances and DryRun Start/Stop, and no dry run on a refused instance."""
    calls = region.calls()
    assert calls, "check made no EC2 call"
    assert {c.action for c in calls} <= {"DescribeInstances", "StartInstances", "StopInstances"}
    for c in calls:
        if c.action != "DescribeInstances":
            assert c.params.get("DryRun") == "true", c
            assert c.outcome in ("DryRunOperation", "AccessDenied", "UnauthorizedOperation"), c
            assert not refused_ids & set(c.instance_ids), c


def states(region: SandboxRegion) -> dict[str, str]:
    return {v.instance_id: v.state for v in region.instance_views()}


# ---------------------------------------------------------------------------------------------
# check


def test_check_all_ok(region: SandboxRegion, tmp_path: Path) -> None:
    fixture = region.create_pool(POOL, 3)
    running = region.create_instance(
        "b2g-aws-run", vpc_id=fixture.vpc_id, pool_tag=POOL, hibernation=True, state="running"
    )
    solo = region.create_instance("solo-001", vpc_id=fixture.vpc_id, pool_tag="solo")
    workers = [*fixture.instances, "b2g-aws-run"]
    basedir = write_master(
        tmp_path / "master",
        region,
        vpc_id=fixture.vpc_id,
        workers=workers,
        standalone={"name": "solo-001", "pool": "solo"},
    )
    before = states(region)

    proc = run_cli("check", str(basedir))

    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    assert proc.stdout.splitlines()[0].split() == [
        "WORKER", "POOL", "INSTANCE", "STATE", "AZ", "VERDICT", "FIX"
    ]
    assert set(rows) == {*workers, "solo-001"}
    for name, iid in fixture.instances.items():
        assert rows[name].split()[2:6] == [iid, "stopped", rows[name].split()[4], "OK"]
    assert f"{running}  running" in rows["b2g-aws-run"]
    assert "OK" in rows["b2g-aws-run"].split() and "adopts it" in rows["b2g-aws-run"]
    assert solo in rows["solo-001"] and " OK " in rows["solo-001"]
    assert "5 instance(s) checked: 5 OK, 0 FAIL" in proc.stdout
    assert "describing 5 instance(s)" in proc.stderr  # progress: one describe for all
    assert "dry-running" in proc.stderr
    assert AWS_SECRET not in proc.stdout + proc.stderr
    # read-only: every instance dry-run for start and stop, nothing really started or stopped
    assert_read_only(region)
    dry = {i for c in region.calls() if c.action != "DescribeInstances" for i in c.instance_ids}
    assert dry == {*fixture.instances.values(), running, solo}
    assert states(region) == before


def test_check_reports_each_failing_verdict(region: SandboxRegion, tmp_path: Path) -> None:
    fixture = region.create_pool(POOL, 1)
    vpc = fixture.vpc_id
    other = region.create_vpc("other-vpc").vpc_id
    made = {
        "bad-public": region.create_instance(
            "bad-public", vpc_id=vpc, public_ip=True, pool_tag=POOL, hibernation=True
        ),
        "bad-untagged": region.create_instance("bad-untagged", vpc_id=vpc, hibernation=True),
        "bad-wrongtag": region.create_instance(
            "bad-wrongtag", vpc_id=vpc, pool_tag="try-aws", hibernation=True
        ),
        "bad-vpc": region.create_instance(
            "bad-vpc", vpc_id=other, pool_tag=POOL, hibernation=True
        ),
        "bad-nohib": region.create_instance("bad-nohib", vpc_id=vpc, pool_tag=POOL),
        "bad-term": region.create_instance(
            "bad-term", vpc_id=vpc, pool_tag=POOL, hibernation=True
        ),
        "bad-many": region.create_instance("bad-many", vpc_id=other, public_ip=True),
    }
    dups = [
        region.create_instance("bad-dup", vpc_id=vpc, pool_tag=POOL, hibernation=True)
        for _ in range(2)
    ]
    # terminated by "someone else" (the set-up client's calls are not in the call log)
    admin = boto3.client(
        "ec2",
        endpoint_url=region.endpoint_url,
        region_name=REGION,
        config=Config(user_agent_appid=SETUP_CLIENT, retries={"total_max_attempts": 1}),
    )
    admin.terminate_instances(InstanceIds=[made["bad-term"]])
    region.wait_for_state(made["bad-term"], "terminated", 5)
    good = next(iter(fixture.instances))
    workers = [good, *made, "bad-dup", "bad-missing", "bad-id"]
    basedir = write_master(
        tmp_path / "master",
        region,
        vpc_id=vpc,
        workers=workers,
        instance_ids={"bad-id": "i-0123456789abcdef0"},
    )
    before = states(region)

    proc = run_cli("check", str(basedir))
    code, doc, _ = check_json(basedir)

    assert proc.returncode == 1 and code == 1, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    verdict = {name: row.splitlines()[0].split()[5] for name, row in rows.items()}
    assert verdict == {good: "OK", **dict.fromkeys(workers[1:], "FAIL")}
    wanted_words = {
        "bad-public": "public IPv4 address",
        "bad-untagged": f"tag it {POOL_TAG}={POOL}",
        "bad-wrongtag": f"its {POOL_TAG} tag is 'try-aws'",
        "bad-vpc": "not in the pool's VPC",
        "bad-nohib": "HibernationOptions.Configured is false",
        "bad-term": "it is terminated",
        "bad-dup": "matches 2 instances",
        "bad-missing": "no instance named 'bad-missing'",
        "bad-id": "no instance i-0123456789abcdef0",
    }
    for name, words in wanted_words.items():
        assert words in rows[name], rows[name]
    assert "11 instance(s) checked: 1 OK, 10 FAIL" in proc.stdout

    codes = {name: [p["code"] for p in r["problems"]] for name, r in rows_by_worker(doc).items()}
    assert codes == {
        good: [],
        "bad-public": ["public-ip"],
        "bad-untagged": ["pool-tag"],
        "bad-wrongtag": ["pool-tag"],
        "bad-vpc": ["other-vpc"],
        "bad-nohib": ["hibernation"],
        "bad-term": ["terminated"],
        "bad-many": ["other-vpc", "public-ip", "pool-tag", "hibernation"],
        "bad-dup": ["duplicate-name"],
        "bad-missing": ["not-found"],
        "bad-id": ["not-found"],
    }
    assert rows_by_worker(doc)["bad-public"]["instance_id"] == made["bad-public"]
    assert rows_by_worker(doc)["bad-term"]["state"] == "terminated"
    # the fix says what to do, not only what is wrong
    fixes = {n: r["problems"][0]["fix"] for n, r in rows_by_worker(doc).items() if r["problems"]}
    assert "or correct vpc_id" in fixes["bad-vpc"]
    assert "give each pool instance a unique Name or set instance_id" in fixes["bad-dup"]
    assert "set hibernate=False" in fixes["bad-nohib"]

    # refused instances are not even dry-run; the usable one (bad-nohib stops instead of
    # hibernating) is
    refused = {made[n] for n in made if n != "bad-nohib"} | set(dups)
    assert_read_only(region, refused)
    dry = {i for c in region.calls() if c.action != "DescribeInstances" for i in c.instance_ids}
    assert dry == {fixture.instances[good], made["bad-nohib"]}
    assert states(region) == before


def test_check_denied_stop_with_key_from_secret_provider(
    region: SandboxRegion, tmp_path: Path
) -> None:
    """The credentials of master.cfg (key id + util.Secret read offline from SecretInAFile) may
    describe and start but not stop: every instance FAILs with the stop denied."""
    from moto.core.authorization import enable_iam_authentication

    fixture = region.create_pool(POOL, 2)
    iam = boto3.client("iam", endpoint_url=region.endpoint_url, region_name=REGION)
    user = f"cli-ops-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(
        UserName=user,
        PolicyName="no-stop",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Action": ["ec2:DescribeInstances", "ec2:StartInstances"],
                        "Resource": "*",
                    }
                ],
            }
        ),
    )
    key = iam.create_access_key(UserName=user)["AccessKey"]
    basedir = write_master(
        tmp_path / "master",
        region,
        vpc_id=fixture.vpc_id,
        workers=list(fixture.instances),
        key_id=key["AccessKeyId"],
        secret=key["SecretAccessKey"],
    )

    with enable_iam_authentication():
        proc = run_cli("check", str(basedir))

    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    first, second = fixture.instances
    assert " FAIL " in rows[first] and " FAIL " in rows[second]
    assert "may not stop it" in rows[first] and "ec2:StopInstances" in rows[first]
    assert "may not start" not in rows[first]
    assert rows[second].endswith("(same as above)")
    assert "(stop-denied: 2)" in proc.stdout
    assert key["SecretAccessKey"] not in proc.stdout + proc.stderr
    assert_read_only(region)
    outcomes = {(c.action, c.outcome) for c in region.calls()}
    assert ("StartInstances", "DryRunOperation") in outcomes
    assert ("StopInstances", "AccessDenied") in outcomes


def test_check_under_the_documented_iam_policy(region: SandboxRegion, tmp_path: Path) -> None:
    """Under docs/iam-policy.json (enforced by the sandbox, tag conditions included) check passes
    for a pool the policy names; for a pool it does not name, start and stop are refused."""
    document = json.loads(DOC_POLICY.read_text())
    granted = [
        value
        for statement in document["Statement"]
        for keys in (statement.get("Condition") or {}).values()
        for key, values in keys.items()
        if key.endswith(f"ResourceTag/{POOL_TAG}")
        for value in (values if isinstance(values, list) else [values])
    ]
    assert POOL in granted, f"{DOC_POLICY} does not grant the pool {POOL}: {granted}"
    named = region.create_pool(POOL, 2)
    other = region.create_pool("nightly-aws", 1)
    region.set_iam_policy(document)

    proc = run_cli("check", str(write_master(
        tmp_path / "named", region, vpc_id=named.vpc_id, workers=list(named.instances)
    )))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 instance(s) checked: 2 OK, 0 FAIL" in proc.stdout

    proc = run_cli("check", str(write_master(
        tmp_path / "other", region, vpc_id=other.vpc_id, workers=list(other.instances),
        pool="nightly-aws",
    )))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (row,) = table_rows(proc.stdout).values()
    assert "may not start it" in row and "may not stop it" in row
    assert "instances tagged buildbot-ec2-hybrid:pool=nightly-aws" in row
    assert "(start-denied: 1, stop-denied: 1)" in proc.stdout
    assert_read_only(region)
    assert {c.outcome for c in region.calls() if c.action != "DescribeInstances"} == {
        "DryRunOperation", "UnauthorizedOperation"
    }


def test_check_config_errors_and_unreachable_ec2(region: SandboxRegion, tmp_path: Path) -> None:
    fixture = region.create_pool(POOL, 1)
    broken = write_master(
        tmp_path / "broken", region, vpc_id="vpc-nope", workers=list(fixture.instances)
    )
    proc = run_cli("check", str(broken / "master.cfg"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "configuration errors" in proc.stderr
    assert "vpc_id='vpc-nope' is not a VPC id" in proc.stderr

    proc = run_cli("check", str(tmp_path / "no-such-master"))
    assert proc.returncode == 2
    assert "no such file or directory" in proc.stderr
    assert region.calls() == []  # a config that does not load sends nothing

    closed = f"http://127.0.0.1:{free_port()}"
    away = write_master(
        tmp_path / "away",
        region,
        vpc_id=fixture.vpc_id,
        workers=list(fixture.instances),
        endpoint_url=closed,
    )
    proc = run_cli("check", str(away))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"could not reach {closed}" in proc.stdout
    assert "not checked" in proc.stdout
    assert "0 OK, 1 FAIL (describe-failed: 1)" in proc.stdout


# ---------------------------------------------------------------------------------------------
# status


def _status_json(*args: str) -> dict:
    proc = run_cli("status", "--json", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


class _NoPluginProxy(http.server.BaseHTTPRequestHandler):
    """A master without the pool page: 404 for /plugins/, everything else from the real one."""

    upstream = ""

    def do_GET(self) -> None:
        status, body = 404, b"{}"
        if not self.path.startswith("/plugins/"):
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            try:
                with opener.open(self.upstream + self.path, timeout=10) as response:
                    status, body = response.status, response.read()
            except urllib.error.HTTPError as e:
                status, body = e.code, e.read()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_status_of_a_running_master(make_lab) -> None:
    lab = make_lab(
        LabSpec(
            pools=[PoolSpec(name=POOL, size=3, overflow_after=0, idle_timeout=120)],
            # no in-house worker: the build has to overflow
            inhouse_workers=0,
            builders=[BuilderSpec("b2g_build", pool=POOL, workers=[])],
        )
    )
    brids = lab.force("b2g_build", duration=1)
    lab.wait_requests_complete(brids, timeout=90)
    names = lab.worker_name_by_id()
    (busy,) = [names[b["workerid"]] for b in lab.builds_for(brids)]
    assert busy.startswith(POOL)
    master = f"http://127.0.0.1:{lab.www_port}/"
    aws = ["--endpoint-url", lab.region.endpoint_url, "--region", REGION]

    def assert_pool_as_it_stands(doc: dict) -> dict[str, dict]:
        assert [p["pool"] for p in doc["pools"]] == [POOL]
        instances = {i["name"]: i for i in doc["pools"][0]["instances"]}
        # every pool instance, also those whose worker never connected
        assert sorted(instances) == lab.pool_workers()
        for name, i in instances.items():
            assert i["instance_id"] == lab.instance_id(name)
            assert i["ec2_state_source"] == "ec2"
            assert i["ec2_state"] == lab.instance_state(name)
            assert i["instance_type"] == "m5.large"
        b = instances[busy]
        assert (b["ec2_state"], b["connected"], b["building"]) == ("running", True, False)
        assert b["last_builder"] == "b2g_build"
        assert b["idle_for"] is not None and b["idle_for"] >= 0
        assert b["uptime_today"] > 0 and b["cost_today_usd"] > 0
        for name in set(instances) - {busy}:
            assert (instances[name]["ec2_state"], instances[name]["connected"]) == (
                "stopped", False
            )
            assert instances[name]["uptime_today"] is None
        assert doc["sources"]["ec2"].startswith("DescribeInstances in us-west-2")
        return instances

    # the pool page's JSON when the master serves it (the sandbox master enables the plugin)
    doc = _status_json("--master", master, *aws)
    assert_pool_as_it_stands(doc)
    if doc["pools"][0]["source"] == "plugin":
        assert doc["sources"]["pools"] == master + "plugins/ec2_hybrid/pools.json"
        assert "b2g_build" in doc["pools"][0]["backlog"]
    # the REST API (and EC2's pool tags) when it does not
    _NoPluginProxy.upstream = master.rstrip("/")
    with serve(_NoPluginProxy) as bare:
        doc = _status_json("--master", bare, *aws)
    assert_pool_as_it_stands(doc)
    assert doc["pools"][0]["source"] == "rest"
    assert any("using the REST API" in w for w in doc["warnings"])

    proc = run_cli("status", "--master", master + "#/workers", *aws)  # as copied from a browser
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[2:] if line.strip()}
    assert lines[busy].split()[1:5] == [lab.instance_id(busy), "running", "yes", "b2g_build"] or (
        lines[busy].split()[1:6]
        == [lab.instance_id(busy), "running", "yes", "(idle)", "b2g_build"]
    )
    for name in set(lab.pool_workers()) - {busy}:
        assert lines[name].split()[1:4] == [lab.instance_id(name), "stopped", "no"]
    assert proc.stdout.startswith(f"pool {POOL}")
    assert "sources:" in proc.stdout and "reading" in proc.stderr

    # check on the running master's own directory (buildbot.tac, secrets from SecretInAFile)
    proc = run_cli("check", str(lab.master.basedir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 instance(s) checked: 3 OK, 0 FAIL" in proc.stdout
    assert "adopts it" in table_rows(proc.stdout)[busy]

    # without EC2: what the master knows; an endpoint nobody listens on proves EC2 is not asked
    # (an attempt would fail and make status exit 1)
    closed = f"http://127.0.0.1:{free_port()}"
    doc = _status_json("--master", master, "--no-ec2", "--endpoint-url", closed)
    instances = {i["name"]: i for i in doc["pools"][0]["instances"]}
    assert instances[busy]["connected"] is True
    assert doc["sources"]["ec2"] == "skipped (--no-ec2)"
    assert not any("EC2" in w for w in doc["warnings"])
    assert all(i["ec2_state_source"] in ("master", None) for i in instances.values())


def test_status_says_what_to_do_when_the_master_is_not_there() -> None:
    url = f"http://127.0.0.1:{free_port()}/"
    proc = run_cli("status", "--master", url, "--no-ec2")
    assert proc.returncode == 2
    assert f"cannot reach {url}" in proc.stderr
    assert "is the master running? pass --master" in proc.stderr


class _CannedMaster(http.server.BaseHTTPRequestHandler):
    pages: dict[str, object] = {}

    def do_GET(self) -> None:
        page = self.pages.get(self.path.split("?")[0])
        body = json.dumps(page).encode()
        self.send_response(200 if page is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_status_reads_the_pool_page_json(capsys) -> None:
    """The plugin's pools.json (EC2Pool.status() of each pool) takes precedence over the REST
    API: backlog, phase, idle time, refusals, events and usage come from the pool itself."""
    now = time.time()
    worker = {
        "latent_state": "NOT_SUBSTANTIATED", "connected": False, "building": 0,
        "availability_zone": "us-west-2b", "idle_since": None, "last_builder": None,
        "wall_time": now, "phase": "stopped", "refused": None, "quarantined_until": None,
    }
    _CannedMaster.pages = {
        "/plugins/ec2_hybrid/pools.json": {
            "schema": 1,
            "generated_at": now,
            "refresh_seconds": 5,
            "pools": [
                {
                    "pool": POOL,
                    "degraded": None,
                    "decisions": 7,
                    "backlog": {"b2g_build": 2},
                    "workers": [
                        dict(worker, name="b2g-aws-001", latent_state="SUBSTANTIATED",
                             connected=True, instance_id="i-0123456789abcdef0",
                             instance_type="m5.large",
                             instance_state="running", idle_since=now - 125,
                             last_builder="b2g_build", phase="idle"),
                        dict(worker, name="b2g-aws-002", instance_id="i-0123456789abcdef1",
                             instance_state="stopped", phase="unusable",
                             refused="it has the public IPv4 address 203.0.113.9"),
                    ],
                    "events": [{"time": now - 200, "event": "revive", "worker": "b2g-aws-001",
                                "reason": "backlog of b2g_build"}],
                    "usage": {"today_instance_hours": 1.5, "today_cost_usd": 0.144,
                              "week_instance_hours": 3.0, "week_cost_usd": 0.288},
                    "settings": {"overflow_after": 60, "idle_timeout": 3600, "max_running": None,
                                 "hibernate": True, "vpc_id": "vpc-0123abcd",
                                 "region": REGION},
                },
                {"pool": "try-aws", "error": "not started yet"},
            ]
        },
        "/api/v2/workers": {"workers": [
            {"workerid": 1, "name": "b2g-aws-001", "connected_to": [{"masterid": 1}],
             "workerinfo": {"ec2_instance_id": "i-0123456789abcdef0", "ec2_pool": POOL}},
            {"workerid": 2, "name": "b2g-aws-002", "connected_to": [], "workerinfo": {}},
            {"workerid": 3, "name": "inhouse-1", "connected_to": [{"masterid": 1}],
             "workerinfo": {}},
            {"workerid": 4, "name": "try-aws-001", "connected_to": [],
             "workerinfo": {"ec2_pool": "try-aws", "ec2_instance_id": "i-0123456789abcdef2"}},
        ]},
        "/api/v2/builders": {"builders": [{"builderid": 1, "name": "b2g_build"}]},
        "/api/v2/builds": {"builds": []},
    }
    with serve(_CannedMaster) as url:
        assert cli.main(["status", "--master", url, "--no-ec2", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert cli.main(["status", "--master", url, "--no-ec2"]) == 0
        table = capsys.readouterr().out
        # EC2 asked but out of reach: the master's picture is still shown, and the exit
        # status says something is missing
        closed = f"http://127.0.0.1:{free_port()}"
        degraded = run_cli("status", "--master", url, "--endpoint-url", closed)

    pool, broken = doc["pools"]
    assert pool["source"] == "plugin" and pool["backlog"] == {"b2g_build": 2}
    # a pool the plugin could not report is still listed, from what REST knows
    assert broken["error"] == "not started yet"
    assert [i["instance_id"] for i in broken["instances"]] == ["i-0123456789abcdef2"]
    assert any("could not report pool try-aws" in w for w in doc["warnings"])
    one, two = pool["instances"]
    assert (one["name"], one["ec2_state"], one["ec2_state_source"]) == (
        "b2g-aws-001", "running", "master"
    )
    assert one["connected"] is True and one["last_builder"] == "b2g_build"
    assert one["instance_type"] == "m5.large"
    assert 124 <= one["idle_for"] <= 130
    assert two["refused"].startswith("it has the public IPv4")
    assert "inhouse-1" not in {i["name"] for i in pool["instances"]}
    assert doc["sources"]["pools"].endswith("/plugins/ec2_hybrid/pools.json")

    assert f"pool {POOL} ({REGION}, vpc-0123abcd, hibernate)  backlog: b2g_build 2" in table
    row = next(line for line in table.splitlines() if "b2g-aws-001" in line)
    assert row.split()[1:7] == [
        "i-0123456789abcdef0", "running*", "yes", "(idle)", "b2g_build", row.split()[6]
    ]
    assert row.split()[6].startswith("2m0")
    assert "refused: it has the public IPv4" in table
    assert "today: 1.50 instance-hours, $0.14; this week: 3.00 instance-hours, $0.29" in table
    assert "revive b2g-aws-001: backlog of b2g_build" in table
    assert "pool try-aws  error: not started yet" in table

    assert degraded.returncode == 1, degraded.stdout + degraded.stderr
    assert f"could not reach {closed}" in degraded.stderr
    assert "b2g-aws-001  i-0123456789abcdef0  running*" in degraded.stdout


def test_format_duration() -> None:
    assert [format_duration(s) for s in (None, 0, 59.9, 60, 185, 3600, 7620, 93600)] == [
        "-", "0s", "59s", "1m00s", "3m05s", "1h00m", "2h07m", "1d02h"
    ]


def test_subcommands_are_registered() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["check", "m"]).handler.__name__ == "run_check"
    assert parser.parse_args(["status"]).handler.__name__ == "run_status"
