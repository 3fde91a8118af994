"""The sandbox region, seen the way the plugin sees it: plain boto3 over HTTP on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config

from buildbot_ec2_hybrid.sandbox.region import POOL_TAG
from buildbot_ec2_hybrid.sandbox.region import SETUP_CLIENT
from buildbot_ec2_hybrid.sandbox.region import SandboxControl
from buildbot_ec2_hybrid.sandbox.region import SandboxError
from buildbot_ec2_hybrid.sandbox.region import SandboxRegion

PENDING = 0.3
STOPPING = 0.3
RESUME = 0.1
REGION = "us-west-2"


@pytest.fixture(autouse=True)
def _no_real_aws(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("MOTO_ACCOUNT_ID", raising=False)


@pytest.fixture
def region() -> Iterator[SandboxRegion]:
    with SandboxRegion(
        pending_seconds=PENDING, stopping_seconds=STOPPING, hibernate_resume_seconds=RESUME
    ) as r:
        yield r


def make_client(endpoint_url: str, appid: str = "sandbox-test", region_name: str = REGION):
    assert endpoint_url.startswith("http://127.0.0.1:")
    return boto3.client(
        "ec2",
        endpoint_url=endpoint_url,
        region_name=region_name,
        config=Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            user_agent_appid=appid,
            connect_timeout=2,
            read_timeout=5,
        ),
    )


@pytest.fixture
def ec2(region: SandboxRegion):
    return make_client(region.endpoint_url)


def describe(ec2, instance_id: str) -> dict:
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


def state_of(ec2, instance_id: str) -> str:
    return describe(ec2, instance_id)["State"]["Name"]


def wait_state(ec2, instance_id: str, wanted: str, timeout: float = 5.0) -> list[str]:
    """Poll DescribeInstances until `wanted`; returns the states seen on the way."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        state = state_of(ec2, instance_id)
        if not seen or seen[-1] != state:
            seen.append(state)
        if state == wanted:
            return seen
        assert time.monotonic() < deadline, f"{instance_id} never reached {wanted}: {seen}"
        time.sleep(0.03)


def error_of(excinfo: pytest.ExceptionInfo) -> tuple[str, int]:
    response = excinfo.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def start_running(ec2, *instance_ids: str) -> None:
    ec2.start_instances(InstanceIds=list(instance_ids))
    for instance_id in instance_ids:
        wait_state(ec2, instance_id, "running")


# ------------------------------------------------------------------------------------------
# fixtures


def test_create_pool_shape(region: SandboxRegion, ec2) -> None:
    pool = region.create_pool("bld", 4)

    assert list(pool.instances) == ["bld-001", "bld-002", "bld-003", "bld-004"]
    assert set(pool.subnet_ids) == {"us-west-2a", "us-west-2b", "us-west-2c"}
    igws = ec2.describe_internet_gateways(
        Filters=[{"Name": "attachment.vpc-id", "Values": [pool.vpc_id]}]
    )["InternetGateways"]
    assert igws == []
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [pool.vpc_id]}])
    by_id = {s["SubnetId"]: s for s in subnets["Subnets"]}
    assert set(by_id) == set(pool.subnet_ids.values())
    for az, subnet_id in pool.subnet_ids.items():
        assert by_id[subnet_id]["AvailabilityZone"] == az
        assert by_id[subnet_id]["MapPublicIpOnLaunch"] is False

    instances = {
        i["InstanceId"]: i
        for r in ec2.describe_instances(Filters=[{"Name": f"tag:{POOL_TAG}", "Values": ["bld"]}])[
            "Reservations"
        ]
        for i in r["Instances"]
    }
    assert set(instances) == set(pool.instances.values())
    azs_used = []
    for name, instance_id in pool.instances.items():
        inst = instances[instance_id]
        tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
        assert tags["Name"] == name and tags[POOL_TAG] == "bld"
        assert inst["State"] == {"Code": 80, "Name": "stopped"}
        assert inst["VpcId"] == pool.vpc_id
        assert "PublicIpAddress" not in inst
        assert inst["InstanceType"] == "m5.large"
        assert inst["HibernationOptions"] == {"Configured": True}
        assert inst["SubnetId"] == pool.subnet_ids[inst["Placement"]["AvailabilityZone"]]
        azs_used.append(inst["Placement"]["AvailabilityZone"])
    assert azs_used == ["us-west-2a", "us-west-2b", "us-west-2c", "us-west-2a"]

    # A second pool shares the VPC; asking again for the first one reuses its instances.
    other = region.create_pool("try", 2, hibernation=False)
    assert other.vpc_id == pool.vpc_id
    assert region.create_pool("bld", 4).instances == pool.instances

    views = {v.instance_id: v for v in region.instance_views()}
    view = views[pool.instances["bld-002"]]
    assert (view.name, view.state, view.az) == ("bld-002", "stopped", "us-west-2b")
    assert view.tags[POOL_TAG] == "bld" and view.private_ip.startswith("10.")
    assert view.hibernated_last_stop is False


def test_setup_calls_are_marked_and_hidden_by_default(region: SandboxRegion, ec2) -> None:
    pool = region.create_pool("bld", 2)
    assert region.calls() == []
    setup = region.calls(include_setup=True)
    assert setup and {c.client for c in setup} == {SETUP_CLIENT}
    run = [c for c in setup if c.action == "RunInstances"]
    assert sorted(i for c in run for i in c.instance_ids) == sorted(pool.instances.values())

    ec2.describe_instances()
    assert [(c.action, c.client) for c in region.calls()] == [("DescribeInstances", "sandbox-test")]


def test_create_instance_for_refusal_tests(region: SandboxRegion, ec2) -> None:
    pool = region.create_pool("bld", 1)
    elsewhere = region.create_vpc("another-vpc")
    assert elsewhere.vpc_id != pool.vpc_id

    public = region.create_instance(
        "bld-public", vpc_id=pool.vpc_id, public_ip=True, pool_tag="bld"
    )
    untagged = region.create_instance("bld-untagged", vpc_id=pool.vpc_id)
    outside = region.create_instance(
        "bld-outside", vpc_id=elsewhere.vpc_id, pool_tag="bld", state="running"
    )

    inst = describe(ec2, public)
    assert inst["State"]["Name"] == "stopped" and inst["PublicIpAddress"]
    assert inst["HibernationOptions"] == {"Configured": False}
    assert POOL_TAG not in {t["Key"] for t in describe(ec2, untagged)["Tags"]}
    inst = describe(ec2, outside)
    assert inst["VpcId"] == elsewhere.vpc_id and inst["State"]["Name"] == "running"
    assert "PublicIpAddress" not in inst


# ------------------------------------------------------------------------------------------
# states that take time


def test_start_goes_pending_then_running(region: SandboxRegion, ec2) -> None:
    events: list[tuple[str, str | None, str]] = []
    region.add_listener(lambda *e: events.append(e))
    instance_id = region.create_pool("bld", 1).instances["bld-001"]

    started = time.monotonic()
    answer = ec2.start_instances(InstanceIds=[instance_id])["StartingInstances"]
    assert answer == [
        {
            "InstanceId": instance_id,
            "CurrentState": {"Code": 0, "Name": "pending"},
            "PreviousState": {"Code": 80, "Name": "stopped"},
        }
    ]
    assert describe(ec2, instance_id)["State"] == {"Code": 0, "Name": "pending"}
    seen = wait_state(ec2, instance_id, "running")
    elapsed = time.monotonic() - started
    assert seen[0] == "pending"
    assert PENDING * 0.9 <= elapsed < PENDING + 2.0
    assert describe(ec2, instance_id)["State"] == {"Code": 16, "Name": "running"}

    # Starting a running instance is a no-op that reports it running, as AWS does.
    again = ec2.start_instances(InstanceIds=[instance_id])["StartingInstances"][0]
    assert again["CurrentState"]["Name"] == again["PreviousState"]["Name"] == "running"

    deadline = time.monotonic() + 2
    while (instance_id, "pending", "running") not in events and time.monotonic() < deadline:
        time.sleep(0.01)
    mine = [e for e in events if e[0] == instance_id]
    assert mine == [
        (instance_id, None, "stopped"),
        (instance_id, "stopped", "pending"),
        (instance_id, "pending", "running"),
    ]


def test_states_progress_without_api_calls(region: SandboxRegion) -> None:
    instance_id = region.create_pool("bld", 1).instances["bld-001"]
    make_client(region.endpoint_url).start_instances(InstanceIds=[instance_id])
    # Nobody calls the API from here on: the ticker alone must finish the transition.
    assert region.wait_for_state(instance_id, "running", timeout=5) == "running"
    view = next(v for v in region.instance_views() if v.instance_id == instance_id)
    assert view.state == "running" and time.time() - view.state_since < 5


def test_stop_goes_stopping_then_stopped(region: SandboxRegion, ec2) -> None:
    instance_id = region.create_pool("bld", 1).instances["bld-001"]
    start_running(ec2, instance_id)

    started = time.monotonic()
    answer = ec2.stop_instances(InstanceIds=[instance_id])["StoppingInstances"][0]
    assert answer["CurrentState"] == {"Code": 64, "Name": "stopping"}
    assert answer["PreviousState"] == {"Code": 16, "Name": "running"}
    assert describe(ec2, instance_id)["State"] == {"Code": 64, "Name": "stopping"}
    seen = wait_state(ec2, instance_id, "stopped")
    assert seen[0] == "stopping"
    assert time.monotonic() - started >= STOPPING * 0.9
    inst = describe(ec2, instance_id)
    assert inst["State"] == {"Code": 80, "Name": "stopped"}
    assert inst["StateReason"]["Code"] == "Client.UserInitiatedShutdown"


# ------------------------------------------------------------------------------------------
# hibernation


def test_hibernate_configured_instance_and_faster_resume() -> None:
    with SandboxRegion(
        pending_seconds=0.8, stopping_seconds=0.2, hibernate_resume_seconds=0.1
    ) as region:
        ec2 = make_client(region.endpoint_url)
        pool = region.create_pool("bld", 2)
        hibernated, plain = pool.instances["bld-001"], pool.instances["bld-002"]
        start_running(ec2, hibernated, plain)

        ec2.stop_instances(InstanceIds=[hibernated], Hibernate=True)
        ec2.stop_instances(InstanceIds=[plain])
        wait_state(ec2, hibernated, "stopped")
        wait_state(ec2, plain, "stopped")
        assert describe(ec2, hibernated)["StateReason"]["Code"] == "Client.UserInitiatedHibernate"
        views = {v.instance_id: v for v in region.instance_views()}
        assert views[hibernated].hibernated_last_stop is True
        assert views[plain].hibernated_last_stop is False

        durations = {}
        for instance_id in (hibernated, plain):
            began = time.monotonic()
            ec2.start_instances(InstanceIds=[instance_id])
            region.wait_for_state(instance_id, "running", timeout=5)
            durations[instance_id] = time.monotonic() - began
        assert durations[hibernated] < 0.6 <= durations[plain]


def test_hibernate_unconfigured_instance_is_refused(region: SandboxRegion, ec2) -> None:
    good = region.create_pool("bld", 1).instances["bld-001"]
    bad = region.create_pool("try", 1, hibernation=False).instances["try-001"]
    assert describe(ec2, bad)["HibernationOptions"] == {"Configured": False}
    start_running(ec2, good, bad)

    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        ec2.stop_instances(InstanceIds=[good, bad], Hibernate=True)
    assert error_of(excinfo) == ("UnsupportedHibernationConfiguration", 400)
    assert bad in excinfo.value.response["Error"]["Message"]
    # The batch failed as a whole: the configured instance was not hibernated either.
    assert state_of(ec2, good) == state_of(ec2, bad) == "running"

    ec2.stop_instances(InstanceIds=[bad])  # a plain stop is fine
    assert state_of(ec2, bad) == "stopping"
    outcomes = [(c.action, c.outcome) for c in region.calls(action="StopInstances")]
    assert outcomes == [
        ("StopInstances", "UnsupportedHibernationConfiguration"),
        ("StopInstances", "ok"),
    ]


# ------------------------------------------------------------------------------------------
# refused state changes


def test_start_while_stopping_is_refused_as_a_batch(region: SandboxRegion, ec2) -> None:
    pool = region.create_pool("bld", 2)
    busy, idle = pool.instances["bld-001"], pool.instances["bld-002"]
    start_running(ec2, busy)
    ec2.stop_instances(InstanceIds=[busy])

    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        ec2.start_instances(InstanceIds=[idle, busy])
    assert error_of(excinfo) == ("IncorrectInstanceState", 400)
    assert busy in excinfo.value.response["Error"]["Message"]
    assert state_of(ec2, idle) == "stopped"  # untouched: the whole call failed
    wait_state(ec2, busy, "stopped")
    start_running(ec2, busy)


def test_start_terminated_is_refused(region: SandboxRegion, ec2) -> None:
    instance_id = region.create_pool("bld", 1).instances["bld-001"]
    ec2.terminate_instances(InstanceIds=[instance_id])
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        ec2.start_instances(InstanceIds=[instance_id])
    assert error_of(excinfo) == ("IncorrectInstanceState", 400)
    assert state_of(ec2, instance_id) == "terminated"


def test_stop_pending_is_refused(region: SandboxRegion, ec2) -> None:
    instance_id = region.create_pool("bld", 1).instances["bld-001"]
    ec2.start_instances(InstanceIds=[instance_id])
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        ec2.stop_instances(InstanceIds=[instance_id])
    assert error_of(excinfo) == ("IncorrectInstanceState", 400)
    wait_state(ec2, instance_id, "running")


def test_unknown_instance_and_dry_run_are_left_to_moto(region: SandboxRegion, ec2) -> None:
    instance_id = region.create_pool("bld", 1).instances["bld-001"]
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        ec2.start_instances(InstanceIds=[instance_id, "i-0123456789abcdef0"])
    assert error_of(excinfo)[0] == "InvalidInstanceID.NotFound"
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        ec2.start_instances(InstanceIds=[instance_id], DryRun=True)
    assert error_of(excinfo)[0] == "DryRunOperation"
    assert state_of(ec2, instance_id) == "stopped"


def test_wrong_region_signature_is_refused(region: SandboxRegion) -> None:
    ec2 = make_client(region.endpoint_url, region_name="us-east-1")
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        ec2.describe_instances()
    assert error_of(excinfo) == ("AuthFailure", 401)


# ------------------------------------------------------------------------------------------
# injected faults


def test_throttle(region: SandboxRegion, ec2) -> None:
    instance_id = region.create_pool("bld", 1).instances["bld-001"]
    region.set_throttle(1.0, actions={"StartInstances"})
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        ec2.start_instances(InstanceIds=[instance_id])
    assert error_of(excinfo) == ("RequestLimitExceeded", 400)
    assert state_of(ec2, instance_id) == "stopped"  # DescribeInstances is not throttled

    region.set_throttle(1.0, until=time.time() + 0.3)
    with pytest.raises(botocore.exceptions.ClientError):
        ec2.describe_instances()
    time.sleep(0.35)
    ec2.describe_instances()  # the throttle has expired

    # A partial, seeded throttle is reproducible.
    outcomes = []
    for _ in range(2):
        region.set_throttle(0.5, seed=7)
        codes = []
        for _ in range(20):
            try:
                ec2.describe_instances()
                codes.append("ok")
            except botocore.exceptions.ClientError as e:
                codes.append(e.response["Error"]["Code"])
        outcomes.append(codes)
    assert outcomes[0] == outcomes[1]
    assert {"ok", "RequestLimitExceeded"} == set(outcomes[0])

    region.clear_faults()
    ec2.start_instances(InstanceIds=[instance_id])
    records = region.calls(action="StartInstances")
    assert [c.outcome for c in records] == ["RequestLimitExceeded", "ok"]


@pytest.mark.parametrize("by", ["instance", "az"])
def test_capacity_error_fails_the_batch(region: SandboxRegion, ec2, by: str) -> None:
    pool = region.create_pool("bld", 2)
    short, fine = pool.instances["bld-001"], pool.instances["bld-002"]  # us-west-2a, us-west-2b
    if by == "instance":
        region.set_capacity_error(instance_ids=[short])
    else:
        region.set_capacity_error(azs=["us-west-2a"])

    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        ec2.start_instances(InstanceIds=[fine, short])
    assert error_of(excinfo) == ("InsufficientInstanceCapacity", 500)
    assert state_of(ec2, short) == state_of(ec2, fine) == "stopped"
    ec2.start_instances(InstanceIds=[fine])  # unaffected alone
    assert state_of(ec2, fine) == "pending"

    region.set_capacity_error()
    ec2.start_instances(InstanceIds=[short])
    assert state_of(ec2, short) == "pending"
    assert [c.outcome for c in region.calls(action="StartInstances")] == [
        "InsufficientInstanceCapacity",
        "ok",
        "ok",
    ]


def test_interrupt(region: SandboxRegion, ec2) -> None:
    instance_id = region.create_pool("bld", 1).instances["bld-001"]
    with pytest.raises(SandboxError):
        region.interrupt(instance_id)  # stopped: nothing to interrupt
    start_running(ec2, instance_id)
    region.clear_calls()

    region.interrupt(instance_id)
    inst = describe(ec2, instance_id)
    assert inst["State"]["Name"] == "stopping"
    assert inst["StateReason"]["Code"] == "Server.ScheduledStop"
    wait_state(ec2, instance_id, "stopped")
    assert describe(ec2, instance_id)["StateReason"]["Code"] == "Server.ScheduledStop"
    assert region.calls(action="StopInstances") == []  # no client asked for this stop


@pytest.mark.parametrize("stuck_in", ["pending", "stopping"])
def test_stuck(region: SandboxRegion, ec2, stuck_in: str) -> None:
    instance_id = region.create_pool("bld", 1).instances["bld-001"]
    if stuck_in == "stopping":
        start_running(ec2, instance_id)
    region.set_stuck(instance_id, stuck_in)
    if stuck_in == "pending":
        ec2.start_instances(InstanceIds=[instance_id])
    else:
        ec2.stop_instances(InstanceIds=[instance_id])

    time.sleep(max(PENDING, STOPPING) * 3)
    assert state_of(ec2, instance_id) == stuck_in
    region.set_stuck(instance_id, None)
    final = "running" if stuck_in == "pending" else "stopped"
    # Overdue already, so it completes as soon as it is released.
    assert region.wait_for_state(instance_id, final, timeout=1.0) == final


def test_unreachable_refuse_then_recover(region: SandboxRegion, ec2) -> None:
    ec2.describe_instances()
    region.set_unreachable(True)
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        ec2.describe_instances()
    region.set_unreachable(False)
    ec2.describe_instances()

    region.set_unreachable(True, seconds=0.3)
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        ec2.describe_instances()
    deadline = time.monotonic() + 5
    while True:
        try:
            ec2.describe_instances()
            break
        except botocore.exceptions.EndpointConnectionError:
            assert time.monotonic() < deadline, "the endpoint never came back"
            time.sleep(0.05)
    # Unanswered calls never reached "AWS", so they are not in its log.
    assert [c.outcome for c in region.calls()] == ["ok", "ok", "ok"]


def test_unreachable_drop_driven_over_http(region: SandboxRegion, ec2) -> None:
    control = SandboxControl(region.endpoint_url)
    with pytest.raises(SandboxError, match="needs 'seconds'"):
        control.set_unreachable(True, mode="refuse")  # nothing could clear it over HTTP
    control.set_unreachable(True, mode="drop")
    with pytest.raises(
        (botocore.exceptions.ConnectionClosedError, botocore.exceptions.EndpointConnectionError)
    ):
        ec2.describe_instances()
    assert control.info()["region"] == REGION  # the control endpoint still answers
    control.clear_faults()
    ec2.describe_instances()


def test_faults_over_http(region: SandboxRegion, ec2) -> None:
    control = SandboxControl(region.endpoint_url)
    pool = control.create_pool("bld", 2)
    first, second = pool.instances["bld-001"], pool.instances["bld-002"]

    control.set_capacity_error(azs=["us-west-2b"])
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        ec2.start_instances(InstanceIds=[second])
    assert error_of(excinfo) == ("InsufficientInstanceCapacity", 500)
    control.set_throttle(1.0, actions=["StopInstances"])
    control.set_stuck(first, "pending")
    ec2.start_instances(InstanceIds=[first])
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        ec2.stop_instances(InstanceIds=[first])
    assert error_of(excinfo) == ("RequestLimitExceeded", 400)
    time.sleep(PENDING * 2)
    assert {v.instance_id: v.state for v in control.instance_views()}[first] == "pending"

    control.clear_faults()
    region.wait_for_state(first, "running", timeout=2)
    control.interrupt(first)
    assert state_of(ec2, first) == "stopping"
    with pytest.raises(SandboxError, match="cannot interrupt"):
        control.interrupt(second)

    records = control.calls(action="StartInstances")
    assert [(c.instance_ids, c.outcome) for c in records] == [
        ((second,), "InsufficientInstanceCapacity"),
        ((first,), "ok"),
    ]
    control.clear_calls()
    assert control.calls() == []


# ------------------------------------------------------------------------------------------
# call log


def test_call_log(region: SandboxRegion, ec2) -> None:
    pool = region.create_pool("bld", 2)
    ids = list(pool.instances.values())
    before = time.time()
    ec2.start_instances(InstanceIds=ids)
    with pytest.raises(botocore.exceptions.ClientError):
        ec2.stop_instances(InstanceIds=ids)  # pending: refused
    other = make_client(region.endpoint_url, appid="master-2")
    other.describe_instances(Filters=[{"Name": f"tag:{POOL_TAG}", "Values": ["bld"]}])
    ec2.create_tags(Resources=[ids[1]], Tags=[{"Key": "note", "Value": "x"}])

    records = region.calls(since=before)
    assert [(c.action, c.instance_ids, c.outcome, c.client) for c in records] == [
        ("StartInstances", tuple(ids), "ok", "sandbox-test"),
        ("StopInstances", tuple(ids), "IncorrectInstanceState", "sandbox-test"),
        ("DescribeInstances", (), "ok", "master-2"),
        ("CreateTags", (ids[1],), "ok", "sandbox-test"),
    ]
    assert records[0].params == {"InstanceId.1": ids[0], "InstanceId.2": ids[1]}
    assert records[2].params["Filter.1.Name"] == f"tag:{POOL_TAG}"
    assert all(before <= c.time <= time.time() for c in records)
    assert region.calls(action="StopInstances") == [records[1]]
    assert region.calls(since=time.time() + 1) == []

    with urllib.request.urlopen(region.endpoint_url + "/_sandbox/calls?action=StartInstances") as r:
        as_json = json.loads(r.read())
    assert as_json == [
        {
            "time": records[0].time,
            "action": "StartInstances",
            "instance_ids": ids,
            "outcome": "ok",
            "params": records[0].params,
            "client": "sandbox-test",
        }
    ]
    region.clear_calls()
    assert region.calls(include_setup=True) == []


def test_call_log_keeps_no_secrets(region: SandboxRegion, ec2) -> None:
    fixture = region.create_pool("bld", 1)
    subnet = fixture.subnet_ids["us-west-2a"]
    ec2.run_instances(
        ImageId="ami-12c6146b",
        MinCount=1,
        MaxCount=1,
        SubnetId=subnet,
        UserData="worker-password=hunter2",
    )
    (record,) = region.calls(action="RunInstances")
    assert record.params["SubnetId"] == subnet
    assert "UserData" not in record.params
    assert "hunter2" not in json.dumps(record.to_json())


# ------------------------------------------------------------------------------------------
# lifecycle


def test_sequential_regions_are_isolated() -> None:
    with SandboxRegion() as first:
        ids_first = set(first.create_pool("bld", 2).instances.values())
        first.set_throttle(1.0, actions={"StartInstances"})
        port_first = first.port
    with SandboxRegion() as second:
        ec2 = make_client(second.endpoint_url)
        seen = {
            i["InstanceId"]
            for r in ec2.describe_instances()["Reservations"]
            for i in r["Instances"]
        }
        assert seen == set()
        assert second.instance_views() == []
        assert second.calls(include_setup=True)[0].action == "DescribeInstances"
        ids_second = set(second.create_pool("bld", 2).instances.values())
        assert not ids_first & ids_second
        ec2.start_instances(InstanceIds=sorted(ids_second))  # no throttle carried over
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port_first}/_sandbox/info", timeout=2)


def test_listener_may_call_back_into_the_region(region: SandboxRegion, ec2) -> None:
    instance_id = region.create_pool("bld", 1).instances["bld-001"]
    seen: list[str] = []
    done = threading.Event()

    def on_change(changed: str, old: str | None, new: str) -> None:
        # The agent reads the views from inside its callback: that must not deadlock.
        seen.append(next(v.state for v in region.instance_views() if v.instance_id == changed))
        if new == "running":
            done.set()

    region.add_listener(on_change)
    ec2.start_instances(InstanceIds=[instance_id])
    assert done.wait(5)
    assert seen[-1] == "running"


def test_cli_serve(tmp_path) -> None:
    state_file = tmp_path / "sandbox.json"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "buildbot_ec2_hybrid.sandbox",
            "serve",
            "--port",
            "0",
            "--pool",
            "bld",
            "--count",
            "2",
            "--pending-seconds",
            "0.2",
            "--state-file",
            str(state_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        described = json.loads(line)
        assert json.loads(state_file.read_text()) == described
        assert described["endpoint_url"].startswith("http://127.0.0.1:")
        assert list(described["instances"]) == ["bld-001", "bld-002"]

        ec2 = make_client(described["endpoint_url"])
        reservations = ec2.describe_instances(
            Filters=[{"Name": "vpc-id", "Values": [described["vpc_id"]]}]
        )["Reservations"]
        found = {i["InstanceId"]: i["State"]["Name"] for r in reservations for i in r["Instances"]}
        assert found == {i: "stopped" for i in described["instances"].values()}
        ec2.start_instances(InstanceIds=[described["instances"]["bld-001"]])
        wait_state(ec2, described["instances"]["bld-001"], "running")
        control = SandboxControl(described["endpoint_url"])
        assert [c.action for c in control.calls()][:1] == ["DescribeInstances"]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
