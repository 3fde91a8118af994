"""Shared fixtures: a whole sandbox farm per test (or per module), checked for safety on the way
out. Every integration test goes through :func:`_finish_lab`, so the rule "the plugin never calls
RunInstances or TerminateInstances, and never touches an instance that is not a tagged pool
instance in its VPC" is asserted for the whole suite in one place."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

# boto3 in the test process and in every child process must never reach real AWS or the
# instance metadata service.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-west-2")
for _proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
    os.environ.pop(_proxy, None)
os.environ["NO_PROXY"] = "127.0.0.1,localhost"


def _finish_lab(lab, *, check_leaks: bool = True) -> None:
    from buildbot_ec2_hybrid.sandbox.farm import wait_for
    from buildbot_ec2_hybrid.sandbox.lab import AWS_SECRET
    from buildbot_ec2_hybrid.sandbox.lab import INHOUSE_PASSWORD
    from buildbot_ec2_hybrid.sandbox.lab import WORKER_PASSWORD

    problems = lab.forbidden_calls() if lab.region is not None else []
    leaked: list[str] = []
    exposed: list[str] = []
    if lab.master is not None and lab.master.running:
        # no secret in the web UI's data: worker info, builders, the pool's own pages
        try:
            public = lab.rest.get("workers")
        except Exception:
            public = None
        for secret in (WORKER_PASSWORD, INHOUSE_PASSWORD, AWS_SECRET):
            if public is not None and secret in str(public):
                exposed.append("a secret in /api/v2/workers")
    try:
        if lab.master is not None and lab.master.running:
            lab.master.stop()
        if check_leaks and lab.region is not None:
            # a clean master shutdown suspends every pool instance it had revived
            try:
                wait_for(lambda: not lab.running_instances(), 30, what="pool instances stopped")
            except TimeoutError:
                leaked = lab.running_instances()
    finally:
        if lab.master is not None:
            tail = "\n".join(lab.master.log_text().splitlines()[-60:])
            print(f"--- master log tail ({lab.master.basedir}) ---\n{tail}")
        lab.stop()
    if lab.master is not None:
        text = lab.master.log_text()
        for secret in (WORKER_PASSWORD, INHOUSE_PASSWORD, AWS_SECRET):
            if secret in text:
                exposed.append("a secret in the master's log")
    assert not problems, f"forbidden EC2 calls: {problems}"
    assert not exposed, exposed
    assert not leaked, f"pool instances left running after the master stopped: {leaked}"


@pytest.fixture
def make_lab(tmp_path):
    from buildbot_ec2_hybrid.sandbox.lab import LabSpec
    from buildbot_ec2_hybrid.sandbox.lab import SandboxLab

    labs = []

    def make(spec: LabSpec | None = None, **kwargs):
        lab = SandboxLab(tmp_path / f"lab{len(labs)}", spec or LabSpec(**kwargs))
        labs.append(lab)
        lab.start()
        return lab

    yield make
    for lab in labs:
        _finish_lab(lab)


@pytest.fixture(scope="module")
def make_module_lab(tmp_path_factory):
    from buildbot_ec2_hybrid.sandbox.lab import SandboxLab

    labs = []

    def make(spec):
        lab = SandboxLab(tmp_path_factory.mktemp("lab"), spec)
        labs.append(lab)
        lab.start()
        return lab

    yield make
    for lab in labs:
        _finish_lab(lab)


# -- multi-master: one PostgreSQL server and one crossbar router for the whole session ----------

MULTIMASTER_SETUP = Path(__file__).with_name("multimaster_setup.sh")


def _ensure_multimaster_installed() -> None:
    from buildbot_ec2_hybrid.sandbox.multimaster import missing_infra

    if not missing_infra():
        return
    try:
        done = subprocess.run(
            ["bash", str(MULTIMASTER_SETUP)], capture_output=True, text=True, timeout=900,
            check=False,
        )
        why = (done.stderr or done.stdout).strip()[-500:] or f"exit {done.returncode}"
    except (OSError, subprocess.TimeoutExpired) as e:
        why = str(e)
    missing = missing_infra()
    if missing:
        pytest.skip(
            f"multi-master tests need {', '.join(missing)}: run `bash {MULTIMASTER_SETUP}` as "
            f"root (it tried and said: {why})"
        )


@pytest.fixture(scope="session")
def multimaster_infra(tmp_path_factory):
    """(PostgresServer, CrossbarRouter), started once; each lab gets a fresh database. Labs
    run one at a time, so they may share the router's realm."""
    from buildbot_ec2_hybrid.sandbox.multimaster import CrossbarRouter
    from buildbot_ec2_hybrid.sandbox.multimaster import PostgresServer

    _ensure_multimaster_installed()
    workdir = tmp_path_factory.mktemp("multimaster-infra")
    router = CrossbarRouter(workdir / "crossbar")
    postgres = PostgresServer(workdir / "postgres")
    try:
        router.start(wait=False)  # boots for seconds: meanwhile, PostgreSQL
        postgres.start()
        router.wait_ready()
        yield postgres, router
    finally:
        postgres.stop()
        router.stop()


@pytest.fixture
def make_multimaster_lab(multimaster_infra, tmp_path):
    """Multi-master labs on the session's database server and router, checked on the way out
    like single-master labs: no forbidden call, no secret in a log, nothing left running."""
    postgres, router = multimaster_infra
    from buildbot_ec2_hybrid.sandbox.farm import wait_for
    from buildbot_ec2_hybrid.sandbox.lab import AWS_SECRET
    from buildbot_ec2_hybrid.sandbox.lab import INHOUSE_PASSWORD
    from buildbot_ec2_hybrid.sandbox.lab import WORKER_PASSWORD
    from buildbot_ec2_hybrid.sandbox.multimaster import MultiMasterLab

    labs: list[MultiMasterLab] = []

    def make(spec, **kwargs) -> MultiMasterLab:
        lab = MultiMasterLab(
            tmp_path / f"lab{len(labs)}", spec, postgres=postgres, router=router, **kwargs
        )
        labs.append(lab)
        return lab.start()

    yield make
    for lab in labs:
        problems = lab.forbidden_calls() if lab.region is not None else []
        leaked: list[str] = []
        try:
            for i, m in enumerate(lab.masters):
                if m.running:
                    lab.stop_master(i)
            if lab.region is not None:
                try:
                    wait_for(
                        lambda lab=lab: not lab.running_instances(), 30, what="instances stopped"
                    )
                except TimeoutError:
                    leaked = lab.running_instances()
        finally:
            lab.stop()
        for m in lab.masters:
            text = m.log_text()
            for secret in (WORKER_PASSWORD, INHOUSE_PASSWORD, AWS_SECRET):
                assert secret not in text, f"a secret in {m.log_path}"
        assert not problems, f"forbidden EC2 calls: {problems}"
        assert not leaked, f"instances left running after every master stopped: {leaked}"
