"""Wrong master.cfg files are refused at load, by ``buildbot checkconfig`` too, with a message that
names the field and the fix; a right one loads with no AWS I/O at all.

Every case is the same small valid master.cfg (``TEMPLATE``) with one part changed: ``pool`` edits
the ``POOL`` arguments (or ``NAME``) before the pool is built, ``extra`` runs after the whole config
is assembled.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from buildbot.config.errors import ConfigErrors
from buildbot.config.master import FileLoader

from buildbot_ec2_hybrid import ec2
from buildbot_ec2_hybrid.checks import master_config_problems


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# nothing listens here: a config load that tried to reach EC2 would fail (and be caught below)
ENDPOINT = f"http://127.0.0.1:{_closed_port()}"

TEMPLATE = """\
from buildbot.plugins import schedulers
from buildbot.plugins import util
from buildbot.plugins import worker

from buildbot_ec2_hybrid import EC2Pool
from buildbot_ec2_hybrid import EC2PoolWorker
from buildbot_ec2_hybrid.checks import HybridConfigCheck

c = BuildmasterConfig = {}
c["buildbotNetUsageData"] = None
c["protocols"] = {"pb": {"port": "tcp:0:interface=127.0.0.1"}}
c["configurators"] = [HybridConfigCheck()]
factory = util.BuildFactory()
inhouse = ["bld-linux64-001", "bld-linux64-002"]
c["workers"] = [worker.Worker(n, util.Secret("inhouse-password")) for n in inhouse]
NAME = "b2g-aws"
POOL = dict(
    region="us-west-2",
    vpc_id="vpc-0123abcd",
    workers=["linux64-ec2-001", "linux64-ec2-002", "linux64-ec2-003"],
    password=util.Secret("ec2-worker-password"),
    endpoint_url="@ENDPOINT@",
)
# @POOL@
aws = EC2Pool(NAME, **POOL)
c["workers"] += aws.workers
c["services"] = [aws]
c["builders"] = [
    aws.builder(name="b2g_build", workernames=inhouse, factory=factory, overflow=True),
    util.BuilderConfig(name="win64_build", workernames=inhouse, factory=factory),
]
# @EXTRA@
c["schedulers"] = [
    schedulers.ForceScheduler(
        name="force",
        builderNames=[b["name"] if isinstance(b, dict) else b.name for b in c["builders"]],
    )
]
"""


def write_master(basedir: Path, pool: str = "", extra: str = "") -> Path:
    """A master directory whose master.cfg is the template with the given parts substituted."""
    basedir.mkdir(parents=True, exist_ok=True)
    text = (
        TEMPLATE.replace("@ENDPOINT@", ENDPOINT)
        .replace("# @POOL@", textwrap.dedent(pool).strip())
        .replace("# @EXTRA@", textwrap.dedent(extra).strip())
    )
    (basedir / "master.cfg").write_text(text)
    return basedir


def load_errors(basedir: Path) -> list[str]:
    try:
        FileLoader(str(basedir), "master.cfg").loadConfig()
    except ConfigErrors as e:
        return list(e.errors)
    return []


@dataclass(frozen=True)
class Case:
    id: str
    expect: tuple[str, ...]  # all in one message: the field, the fix
    pool: str = ""
    extra: str = ""


SECOND_POOL = """\
other = EC2Pool({name!r}, **dict(POOL, workers={workers!r}))
c["workers"] += other.workers
c["services"].append(other)
"""

P = "EC2Pool 'b2g-aws': "
SECONDS = "give a number of seconds"

CASES = [
    # -- the pool's own arguments ------------------------------------------------------------
    Case("vpc-missing", (P + "vpc_id is missing", "vpc_id='vpc-0123abcd'"),
         pool='del POOL["vpc_id"]'),
    Case("vpc-malformed", (P + "vpc_id='vpc-XYZ' is not a VPC id", "8 or 17 lowercase hex"),
         pool='POOL["vpc_id"] = "vpc-XYZ"'),
    Case("vpc-is-a-subnet", (P + "vpc_id='subnet-0123abcd' is not a VPC id", "'vpc-'"),
         pool='POOL["vpc_id"] = "subnet-0123abcd"'),
    Case("region-missing", (P + "region is missing", "region='us-west-2'"),
         pool='del POOL["region"]'),
    Case("region-is-an-az", (P + "region='us-west-2a' is not an AWS region",
                             "not an availability zone"),
         pool='POOL["region"] = "us-west-2a"'),
    Case("region-malformed", (P + "region='US West 2'", "region='us-west-2'"),
         pool='POOL["region"] = "US West 2"'),
    Case("workers-empty", (P + "workers=[]", "non-empty list of the instances' EC2 Name tags"),
         pool='POOL["workers"] = []'),
    Case("workers-missing", (P + "workers=None", "non-empty list"),
         pool='del POOL["workers"]'),
    Case("workers-a-string", (P + "workers='linux64-ec2-001' is a string, not a list",
                              "workers=['linux64-ec2-001']"),
         pool='POOL["workers"] = "linux64-ec2-001"'),
    Case("workers-duplicate", (P + "workers: 'linux64-ec2-002' listed more than once",
                               "list each name once"),
         pool='POOL["workers"] = ["linux64-ec2-001", "linux64-ec2-002", "linux64-ec2-002"]'),
    Case("worker-name-not-identifier", (P + "workers: 'linux64 ec2/001' cannot be a Buildbot "
                                        "worker name", "give the instance that Name tag"),
         pool='POOL["workers"] = ["linux64 ec2/001"]'),
    Case("pool-name-empty", ("EC2Pool '': name:", "EC2Pool('b2g-aws', ...)"),
         pool='NAME = ""'),
    Case("password-missing", (P + "password is missing",
                              "password=util.Secret('ec2-worker-password')"),
         pool='del POOL["password"]'),
    Case("idle-timeout-zero", (P + "idle_timeout=0: " + SECONDS, "e.g. idle_timeout=3600"),
         pool='POOL["idle_timeout"] = 0'),
    Case("idle-timeout-negative", (P + "idle_timeout=-60: " + SECONDS, "more than 0"),
         pool='POOL["idle_timeout"] = -60'),
    Case("idle-timeout-absurd", (P + "idle_timeout=31536000: " + SECONDS, "at most 604800"),
         pool='POOL["idle_timeout"] = 365 * 86400'),
    Case("boot-timeout-nan", (P + "boot_timeout=nan: " + SECONDS, "e.g. boot_timeout=600"),
         pool='POOL["boot_timeout"] = float("nan")'),
    Case("boot-timeout-a-string", (P + "boot_timeout='600': " + SECONDS, "boot_timeout=600"),
         pool='POOL["boot_timeout"] = "600"'),
    Case("poll-interval-zero", (P + "poll_interval=0: " + SECONDS, "e.g. poll_interval=2"),
         pool='POOL["poll_interval"] = 0'),
    Case("poll-interval-over-boot-timeout", (P + "poll_interval=120 is not shorter than "
                                             "boot_timeout=60", "poll_interval=2"),
         pool='POOL.update(poll_interval=120, boot_timeout=60)'),
    Case("reconcile-interval-infinite", (P + "reconcile_interval=inf: " + SECONDS,
                                         "reconcile_interval=300"),
         pool='POOL["reconcile_interval"] = float("inf")'),
    Case("overflow-after-negative", (P + "overflow_after=-1: " + SECONDS, "0 or more"),
         pool='POOL["overflow_after"] = -1'),
    Case("max-running-negative", (P + "max_running=-2", "1 or more (e.g. max_running=10)"),
         pool='POOL["max_running"] = -2'),
    Case("max-running-zero", (P + "max_running=0", "leave it out to allow the whole pool"),
         pool='POOL["max_running"] = 0'),
    Case("max-running-bool", (P + "max_running=True", "whole number of instances"),
         pool='POOL["max_running"] = True'),
    Case("hibernate-not-bool", (P + "hibernate='yes'", "give True or False"),
         pool='POOL["hibernate"] = "yes"'),
    Case("endpoint-url-no-scheme", (P + "endpoint_url='127.0.0.1:5000'", "give a full URL"),
         pool='POOL["endpoint_url"] = "127.0.0.1:5000"'),
    Case("access-key-without-secret", (P + "aws_secret_access_key is missing",
                                       "give both aws_access_key_id and aws_secret_access_key"),
         pool='POOL["aws_access_key_id"] = "AKIAEXAMPLEKEYID"'),
    Case("secret-without-access-key", (P + "aws_access_key_id is missing", "or neither"),
         pool='POOL["aws_secret_access_key"] = "s3cr3t-value"'),
    Case("access-key-id-as-secret", (P + "aws_access_key_id must be a plain string",
                                     "aws_secret_access_key=util.Secret('...')"),
         pool='POOL.update(aws_access_key_id=util.Secret("k"), '
              'aws_secret_access_key=util.Secret("s"))'),
    Case("profile-and-keys", (P + "aws_profile and aws_access_key_id are both given",
                              "remove the other"),
         pool='POOL.update(aws_profile="ci", aws_access_key_id="AKIAEXAMPLEKEYID", '
              'aws_secret_access_key=util.Secret("s"))'),
    Case("instance-ids-unknown-worker", (P + "instance_ids: 'linux64-ec2-009' is not one of the "
                                         "pool's workers", "add it to workers"),
         pool='POOL["instance_ids"] = {"linux64-ec2-009": "i-0123456789abcdef0"}'),
    Case("instance-ids-malformed", (P + "instance_ids['linux64-ec2-001']='i-xyz' is not an "
                                    "instance id", "e.g. 'i-0123456789abcdef0'"),
         pool='POOL["instance_ids"] = {"linux64-ec2-001": "i-xyz"}'),
    Case("instance-ids-shared", (P + "instance_ids: 'i-0123abcd' is given to 'linux64-ec2-001' "
                                 "and to 'linux64-ec2-002'", "give each its own id"),
         pool='POOL["instance_ids"] = {"linux64-ec2-001": "i-0123abcd", '
              '"linux64-ec2-002": "i-0123abcd"}'),
    Case("instance-ids-not-a-dict", (P + "instance_ids must be a dict",
                                     "instance_ids={'linux64-ec2-001': 'i-0123456789abcdef0'}"),
         pool='POOL["instance_ids"] = ["i-0123456789abcdef0"]'),
    Case("argument-typo", (P + "unknown argument idle_timout", "did you mean idle_timeout?"),
         pool='POOL["idle_timout"] = 600'),
    Case("worker-kwargs-build-wait-timeout", (P + "worker_kwargs['build_wait_timeout']",
                                              "set idle_timeout on the EC2Pool instead"),
         pool='POOL["worker_kwargs"] = {"build_wait_timeout": 0}'),
    Case("worker-kwargs-typo", (P + "worker_kwargs['max_build']", "did you mean max_builds?"),
         pool='POOL["worker_kwargs"] = {"max_build": 2}'),
    Case("worker-kwargs-pool-argument", (P + "worker_kwargs['vpc_id']",
                                         "give vpc_id to the EC2Pool itself"),
         pool='POOL["worker_kwargs"] = {"vpc_id": "vpc-0123abcd"}'),
    # -- the whole config --------------------------------------------------------------------
    Case("pool-worker-is-also-inhouse", ("c['workers']: 'linux64-ec2-002' is both a worker of "
                                         "EC2Pool 'b2g-aws' and an in-house",
                                         "rename one of them"),
         extra='c["workers"].append(worker.Worker("linux64-ec2-002", "pw"))'),
    Case("inhouse-name-in-pool-workers", ("'bld-linux64-001' is both a worker of EC2Pool "
                                          "'b2g-aws'", "rename one of them"),
         pool='POOL["workers"] = ["bld-linux64-001", "linux64-ec2-002"]'),
    Case("worker-in-two-pools", ("workers 'linux64-ec2-003' are in EC2Pool 'b2g-aws' and "
                                 "EC2Pool 'try-aws'", "in the workers of one pool only"),
         extra=SECOND_POOL.format(name="try-aws", workers=["linux64-ec2-003", "try-ec2-001"])),
    Case("two-pools-same-name", ("c['services']: two EC2Pools are named 'b2g-aws'",
                                 "give each pool its own name"),
         extra=SECOND_POOL.format(name="b2g-aws", workers=["try-ec2-001"])),
    Case("pool-listed-twice", ("EC2Pool 'b2g-aws' is listed more than once", "list each pool "
                               "once"),
         extra='c["services"].append(aws)'),
    Case("overflow-pool-not-in-services", ("builder 'b2g_build' overflows to EC2Pool 'b2g-aws', "
                                           "which is not in c['services']",
                                           "c['services'].append(pool)"),
         extra='c["services"] = []'),
    Case("pool-workers-but-no-pool", ("c['workers'] holds workers of EC2Pool 'b2g-aws' "
                                      "('linux64-ec2-001'", "c['services'].append(pool)"),
         extra='c["services"] = []'),
    Case("pool-workers-not-in-c-workers", ("EC2Pool 'b2g-aws': its workers 'linux64-ec2-001', "
                                           "'linux64-ec2-002', 'linux64-ec2-003' are not in "
                                           "c['workers']", "c['workers'] += pool.workers"),
         extra='c["workers"] = [w for w in c["workers"] if w.workername in inhouse]'),
    Case("pool-workers-added-twice", ("c['workers']: 'linux64-ec2-001', 'linux64-ec2-002', "
                                      "'linux64-ec2-003' listed more than once",
                                      "add each worker (and each pool's workers) once"),
         extra='c["workers"] += aws.workers'),
    Case("pool-itself-in-c-workers", ("c['workers'] contains the EC2Pool 'b2g-aws' itself",
                                      "c['workers'] += pool.workers"),
         extra='c["workers"].append(aws)'),
    Case("two-inhouse-workers-same-name", ("c['workers']: 2 different workers are named "
                                           "'bld-linux64-001'", "give each worker its own name"),
         extra='c["workers"].append(worker.Worker("bld-linux64-001", "pw"))'),
    Case("pool-workers-in-plain-builder", ("builder 'linux_plain': workernames lists workers of "
                                           "EC2Pool 'b2g-aws' ('linux64-ec2-001'",
                                           "pool.builder(name='linux_plain'", "overflow=True"),
         extra='c["builders"].append(util.BuilderConfig(name="linux_plain", '
               'workernames=inhouse + aws.workernames, factory=factory))'),
    Case("pool-workers-in-builder-dict", ("builder 'linux_dict': workernames lists workers of "
                                          "EC2Pool 'b2g-aws'", "overflow=True"),
         extra='c["builders"].append({"name": "linux_dict", "workernames": ["linux64-ec2-002"], '
               '"factory": factory})'),
    Case("gate-replaced", ("builder 'b2g_build': canStartBuild was replaced after "
                           "pool.builder()", "pool.builder(..., canStartBuild=your_function)"),
         extra='c["builders"][0].canStartBuild = None'),
    Case("builder-overflows-to-one-pool-lists-another",
         ("builder 'b2g_build' overflows to EC2Pool 'b2g-aws' but its workernames also lists "
          "workers of EC2Pool 'try-aws' ('try-ec2-001')", "remove them from workernames"),
         extra=SECOND_POOL.format(name="try-aws", workers=["try-ec2-001"])
         + 'c["builders"][0].workernames.append("try-ec2-001")\n'),
    Case("instance-id-in-two-workers", ("instance_id 'i-0123456789abcdef0' is given to workers "
                                        "'linux64-ec2-001', 'solo-ec2-001'",
                                        "give each its own instance_id"),
         pool='POOL["instance_ids"] = {"linux64-ec2-001": "i-0123456789abcdef0"}',
         extra='c["workers"].append(EC2PoolWorker("solo-ec2-001", "pw", vpc_id="vpc-0123abcd", '
               'region="us-west-2", instance_id="i-0123456789abcdef0"))'),
    # -- EC2PoolWorker on its own ------------------------------------------------------------
    Case("standalone-password-missing", ("EC2PoolWorker 'solo-ec2-001': password is missing",
                                         "EC2PoolWorker('solo-ec2-001', util.Secret("),
         extra='c["workers"].append(EC2PoolWorker("solo-ec2-001", vpc_id="vpc-0123abcd", '
               'region="us-west-2"))'),
    Case("standalone-vpc-missing", ("EC2PoolWorker 'solo-ec2-001': vpc_id is missing",
                                    "vpc_id='vpc-0123abcd'"),
         extra='c["workers"].append(EC2PoolWorker("solo-ec2-001", "pw", region="us-west-2"))'),
    Case("standalone-region-malformed", ("EC2PoolWorker 'solo-ec2-001': region='uswest2'",
                                         "region='us-west-2'"),
         extra='c["workers"].append(EC2PoolWorker("solo-ec2-001", "pw", vpc_id="vpc-0123abcd", '
               'region="uswest2"))'),
    Case("standalone-boot-timeout-negative", ("EC2PoolWorker 'solo-ec2-001': boot_timeout=-5",
                                              "e.g. boot_timeout=600"),
         extra='c["workers"].append(EC2PoolWorker("solo-ec2-001", "pw", vpc_id="vpc-0123abcd", '
               'region="us-west-2", boot_timeout=-5))'),
    Case("standalone-instance-id-malformed", ("EC2PoolWorker 'solo-ec2-001': "
                                              "instance_id='0123abcd' is not an instance id",
                                              "instance_id='i-0123456789abcdef0'"),
         extra='c["workers"].append(EC2PoolWorker("solo-ec2-001", "pw", vpc_id="vpc-0123abcd", '
               'region="us-west-2", instance_id="0123abcd"))'),
    Case("standalone-argument-typo", ("EC2PoolWorker 'solo-ec2-001': unknown argument "
                                      "instanceid", "did you mean instance_id?"),
         extra='c["workers"].append(EC2PoolWorker("solo-ec2-001", "pw", vpc_id="vpc-0123abcd", '
               'region="us-west-2", instanceid="i-0123abcd"))'),
]

# every value typed into a credential argument above; none may appear in any message
CREDENTIALS = ("AKIAEXAMPLEKEYID", "s3cr3t-value")


def _find(errors: list[str], expect: tuple[str, ...]) -> str | None:
    return next((e for e in errors if all(part in e for part in expect)), None)


def test_the_template_itself_is_good(tmp_path):
    assert load_errors(write_master(tmp_path / "m")) == []


def test_catalogue_is_big_enough():
    assert len(CASES) >= 20
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_wrong_config_is_refused_with_field_and_fix(tmp_path, case: Case):
    errors = load_errors(write_master(tmp_path / "m", case.pool, case.extra))
    shown = "\n".join(errors)
    assert errors, f"{case.id}: the config loaded without errors"
    assert _find(errors, case.expect), f"{case.id}: no message with {case.expect} in:\n{shown}"
    # a clean config error, not a crash while the file ran
    assert "error while parsing config file" not in shown, shown
    for value in CREDENTIALS:
        assert value not in shown, f"{case.id}: a credential value leaked into:\n{shown}"


def test_whole_config_problems_need_the_configurator_line(tmp_path):
    """Without ``c['configurators']`` Buildbot loads a builder that lists pool workers but
    bypasses the pool's builder(); the check is what refuses it (and can find it later in a
    loaded config)."""
    basedir = write_master(
        tmp_path / "m",
        extra="""\
            c["configurators"] = []
            c["builders"].append(util.BuilderConfig(name="linux_plain",
                                 workernames=inhouse + aws.workernames, factory=factory))
        """,
    )
    cfg = FileLoader(str(basedir), "master.cfg").loadConfig()
    problems = master_config_problems(cfg)
    assert _find(problems, ("builder 'linux_plain'", "overflow=True")), problems


# -- no AWS I/O at load --------------------------------------------------------------------


GOOD_EXTRA = """\
    other = EC2Pool("try-aws", **dict(POOL, workers=["try-ec2-001", "try-ec2-002"],
                    instance_ids={"try-ec2-001": "i-0123456789abcdef0"}, hibernate=True,
                    aws_access_key_id="testing", aws_secret_access_key=util.Secret("aws-key")))
    c["workers"] += other.workers
    c["services"].append(other)
    c["builders"].append(other.builder(name="try_build", workernames=inhouse, factory=factory))
    c["workers"].append(EC2PoolWorker("solo-ec2-001", util.Secret("pw"), vpc_id="vpc-0123abcd",
                        region="us-west-2", endpoint_url=POOL["endpoint_url"]))
    c["builders"].append(util.BuilderConfig(name="solo_build", workernames=["solo-ec2-001"],
                         factory=factory))
"""


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection, DNS lookup or boto3/botocore client is recorded and refused."""
    import boto3
    import boto3.session
    import botocore.session

    attempts: list[str] = []

    def refuse(what):
        def refused(*args, **kwargs):
            attempts.append(what)
            raise AssertionError(f"{what} during config load")

        return refused

    monkeypatch.setattr(boto3, "client", refuse("boto3.client"))
    monkeypatch.setattr(boto3.session.Session, "client", refuse("boto3 Session.client"))
    monkeypatch.setattr(botocore.session.Session, "create_client", refuse("botocore client"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    shared_before = dict(ec2.EC2Client._shared)
    yield attempts
    assert attempts == []
    assert ec2.EC2Client._shared == shared_before  # no EC2 client object was even built


def test_loading_a_good_config_does_no_aws_io(tmp_path, no_network):
    basedir = write_master(tmp_path / "m", extra=GOOD_EXTRA)
    cfg = FileLoader(str(basedir), "master.cfg").loadConfig()

    assert no_network == []
    assert sorted(cfg.services) == ["b2g-aws", "try-aws"]
    names = {w.workername for w in cfg.workers}
    assert {"linux64-ec2-001", "try-ec2-002", "solo-ec2-001"} <= names
    assert master_config_problems(cfg) == []


def test_the_production_example_loads_offline_and_passes_the_checks(tmp_path, no_network):
    example = Path(__file__).resolve().parent.parent / "master_examples" / "hybrid.cfg"
    basedir = tmp_path / "m"
    (basedir / "secrets").mkdir(parents=True, mode=0o700)
    (basedir / "master.cfg").write_text(example.read_text())
    cfg = FileLoader(str(basedir), "master.cfg").loadConfig()

    assert no_network == []
    assert any(s.__class__.__name__ == "EC2Pool" for s in cfg.services.values())
    assert master_config_problems(cfg) == []


# -- the real `buildbot checkconfig` command -----------------------------------------------

# In the child process: any socket connection or boto3/botocore client makes it exit with 97.
OFFLINE_SITECUSTOMIZE = """\
import os
import socket
import sys


def _refuse(what):
    def refused(*args, **kwargs):
        sys.stderr.write(f"NETWORK-OR-AWS-ATTEMPT: {what}\\n")
        sys.stderr.flush()
        os._exit(97)

    return refused


socket.socket.connect = _refuse("socket connect")
socket.socket.connect_ex = _refuse("socket connect_ex")
socket.create_connection = _refuse("create_connection")
socket.getaddrinfo = _refuse("getaddrinfo")

import botocore.session  # noqa: E402

botocore.session.Session.create_client = _refuse("botocore create_client")
"""

CLI_CASES = {c.id: c for c in CASES if c.id in (
    "vpc-malformed",
    "overflow-pool-not-in-services",
    "pool-workers-in-plain-builder",
    "standalone-password-missing",
)}


@pytest.fixture(scope="module")
def checkconfig_runs(tmp_path_factory):
    """Run `buildbot checkconfig` on every CLI case and on a good config, all at once."""
    root = tmp_path_factory.mktemp("checkconfig")
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(OFFLINE_SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get(
        "PYTHONPATH", "")]).rstrip(os.pathsep))
    buildbot = Path(sys.executable).parent / "buildbot"
    dirs = {cid: write_master(root / cid, c.pool, c.extra) for cid, c in CLI_CASES.items()}
    dirs["good"] = write_master(root / "good", extra=GOOD_EXTRA)
    procs = {
        cid: subprocess.Popen(
            [str(buildbot), "checkconfig", str(d)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for cid, d in dirs.items()
    }
    results = {}
    for cid, proc in procs.items():
        out, _ = proc.communicate(timeout=60)
        results[cid] = (proc.returncode, out)
    return results


@pytest.mark.parametrize("cid", sorted(CLI_CASES))
def test_buildbot_checkconfig_refuses(checkconfig_runs, cid):
    rc, out = checkconfig_runs[cid]
    assert rc not in (0, 97), out
    assert "Configuration Errors:" in out, out
    expect = CLI_CASES[cid].expect
    assert any(all(part in line for part in expect) for line in out.splitlines()), out


def test_buildbot_checkconfig_passes_offline(checkconfig_runs):
    rc, out = checkconfig_runs["good"]
    assert "NETWORK-OR-AWS-ATTEMPT" not in out, out
    assert rc == 0, out
    assert "Config file is good!" in out
