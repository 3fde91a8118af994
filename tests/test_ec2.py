"""buildbot_ec2_hybrid.ec2 against moto's EC2 served over HTTP on 127.0.0.1, driven by a real
Twisted reactor running in a background thread (see twisted_helpers).

Errors moto cannot produce (throttling, incorrect state, refused permissions, a pending state)
are injected the way EC2 sends them: a botocore ``before-send`` hook answers chosen requests
with EC2's XML, so the client parses, classifies and counts them like real answers.
"""

from __future__ import annotations

import ast
import functools
import json
import random
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import boto3
import pytest
from botocore import exceptions as botoexc
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from moto.server import ThreadedMotoServer
from twisted.internet import defer
from twisted.python import log
from twisted_helpers import call
from twisted_helpers import reactor_thread  # noqa: F401  (fixture)
from twisted_helpers import wait_until

from buildbot_ec2_hybrid import ec2
from buildbot_ec2_hybrid.ec2 import AWSSettings
from buildbot_ec2_hybrid.ec2 import EC2Client
from buildbot_ec2_hybrid.ec2 import InstanceInfo

REGION = "us-west-2"
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRETKEY"
TOKEN = "FwoGZXIvYXdzEXAMPLE-SESSION-TOKEN-42"
UNKNOWN_ID = "i-0123456789abcdef0"

pytestmark = pytest.mark.usefixtures("reactor_thread")


# ---------------------------------------------------------------------------------------------
# moto over HTTP, and a plain boto3 client for test set-up


@pytest.fixture(scope="session")
def moto_url() -> Any:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _plain_boto(url: str) -> Any:
    return boto3.client(
        "ec2",
        region_name=REGION,
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )


@dataclass
class Region:
    url: str
    admin: Any
    vpc_id: str
    subnet_id: str
    ami: str

    def make(self, n: int, *, prefix: str = "w", hibernate: bool = False, stopped: bool = True):
        """n instances (one RunInstances: test set-up only, never the plugin)."""
        kw: dict[str, Any] = {}
        if hibernate:
            kw["HibernationOptions"] = {"Configured": True}
        tags = [
            {"Key": "Name", "Value": f"{prefix}-ec2"},
            {"Key": "buildbot-ec2-hybrid:pool", "Value": "test"},
        ]
        made = self.admin.run_instances(
            ImageId=self.ami,
            MinCount=n,
            MaxCount=n,
            SubnetId=self.subnet_id,
            InstanceType="t3.micro",
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
            **kw,
        )
        ids = [i["InstanceId"] for i in made["Instances"]]
        if stopped:
            self.admin.stop_instances(InstanceIds=ids)
        return ids

    def states(self, ids: list[str]) -> dict[str, str]:
        out = {}
        for start in range(0, len(ids), 100):
            resp = self.admin.describe_instances(InstanceIds=ids[start : start + 100])
            for r in resp["Reservations"]:
                for i in r["Instances"]:
                    out[i["InstanceId"]] = i["State"]["Name"]
        return out


@pytest.fixture
def region(moto_url: str) -> Region:
    req = urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST", data=b"")
    urllib.request.urlopen(req, timeout=10).read()
    admin = _plain_boto(moto_url)
    vpc_id = admin.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet_id = admin.create_subnet(VpcId=vpc_id, CidrBlock="10.0.0.0/16")["Subnet"]["SubnetId"]
    return Region(moto_url, admin, vpc_id, subnet_id, _ami(moto_url))


@functools.cache
def _ami(url: str) -> str:
    # DescribeImages costs a second in moto, and its built-in images survive a reset
    return _plain_boto(url).describe_images(Owners=["amazon"])["Images"][0]["ImageId"]


def _settings(url: str) -> AWSSettings:
    return AWSSettings(
        region=REGION,
        endpoint_url=url,
        access_key_id="testing",
        secret_access_key=SECRET,
        session_token=TOKEN,
        connect_timeout=2.0,
        read_timeout=10.0,
    )


@pytest.fixture
def make_client(reactor_thread: Any, moto_url: str) -> Any:  # noqa: F811
    clients: list[EC2Client] = []

    def make(url: str | None = None, **kw: Any) -> EC2Client:
        kw.setdefault("poll_interval", 0.1)
        kw.setdefault("backoff_base", 0.005)
        kw.setdefault("backoff_cap", 0.05)
        client = EC2Client(_settings(url or moto_url), reactor_thread, **kw)
        clients.append(client)
        return client

    yield make
    for client in clients:
        call(client.close)


# ---------------------------------------------------------------------------------------------
# botocore hooks: count what goes on the wire, and answer like EC2 where moto cannot


class CallLog:
    """``before-call.ec2`` hook: every API attempt, with its query parameters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[tuple[str, dict[str, str]]] = []

    def __call__(self, params: dict, event_name: str, **_: Any) -> None:
        action = event_name.rsplit(".", 1)[-1]
        body = params.get("body")
        with self._lock:
            self.calls.append((action, dict(body) if isinstance(body, dict) else {}))

    def of(self, action: str) -> list[dict[str, str]]:
        with self._lock:
            return [p for a, p in self.calls if a == action]

    def count(self, action: str) -> int:
        return len(self.of(action))


def ids_in(params: dict[str, str]) -> list[str]:
    """Instance ids of a query-protocol request, from InstanceId.N or an instance-id filter."""
    return [v for k, v in sorted(params.items()) if k.startswith("InstanceId.")] + [
        v for k, v in sorted(params.items()) if k.startswith("Filter.") and ".Value." in k
    ]


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Any:
        yield self._data


def ec2_error(code: str, message: str, status: int = 400) -> tuple[int, bytes]:
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
        f"<Code>{code}</Code><Message>{message}</Message>"
        "</Error></Errors><RequestID>injected</RequestID></Response>"
    )
    return status, xml.encode()


Rule = Callable[[str, dict[str, str]], "tuple[int, bytes] | None"]


class Injector:
    """``before-send.ec2.*`` hook: when ``rule(action, params)`` returns (status, body), that is
    EC2's answer and the request never reaches moto."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self._lock = threading.Lock()
        self.answered = 0

    def __call__(self, request: Any, **_: Any) -> AWSResponse | None:
        body = request.body
        if isinstance(body, bytes):
            body = body.decode()
        params = {k: v[0] for k, v in parse_qs(body or "").items()}
        answer = self.rule(params.get("Action", ""), params)
        if answer is None:
            return None
        with self._lock:
            self.answered += 1
        status, data = answer
        return AWSResponse(request.url, status, {"Content-Type": "text/xml"}, _Body(data))


def hooks(client: EC2Client, rule: Rule | None = None) -> tuple[CallLog, Injector | None]:
    calls = CallLog()
    client.register_event("before-call.ec2", calls)
    injector = None
    if rule is not None:
        injector = Injector(rule)
        client.register_event("before-send.ec2", injector)
    return calls, injector


def gather(ds: list[defer.Deferred]) -> defer.Deferred:
    """Outcome per Deferred: its result, or its exception (never errbacks)."""
    return defer.DeferredList(ds, consumeErrors=True).addCallback(
        lambda results: [r if ok else r.value for ok, r in results]
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# InstanceInfo.from_api


def test_from_api_full_item() -> None:
    raw = {
        "InstanceId": "i-0abc",
        "State": {"Code": 80, "Name": "stopped"},
        "Tags": [{"Key": "Name", "Value": "b2g-linux64-ec2-007"}, {"Key": "team", "Value": "rel"}],
        "VpcId": "vpc-1",
        "SubnetId": "subnet-1",
        "Placement": {"AvailabilityZone": "us-west-2b"},
        "InstanceType": "c5.2xlarge",
        "PrivateIpAddress": "10.0.1.7",
        "PublicIpAddress": "54.1.2.3",
        "HibernationOptions": {"Configured": True},
        "LaunchTime": "2024-05-01T10:00:00Z",
        "StateReason": {"Code": "Client.UserInitiatedShutdown", "Message": "User initiated"},
    }
    info = InstanceInfo.from_api(raw)
    assert info.instance_id == "i-0abc"
    assert info.state == "stopped"
    assert info.name == "b2g-linux64-ec2-007"
    assert dict(info.tags) == {"Name": "b2g-linux64-ec2-007", "team": "rel"}
    assert (info.vpc_id, info.subnet_id, info.availability_zone) == (
        "vpc-1",
        "subnet-1",
        "us-west-2b",
    )
    assert (info.instance_type, info.private_ip, info.public_ip) == (
        "c5.2xlarge",
        "10.0.1.7",
        "54.1.2.3",
    )
    assert info.hibernation_configured is True
    assert info.launch_time == datetime.fromisoformat("2024-05-01T10:00:00+00:00")
    assert info.state_reason == "User initiated"
    assert info.state_reason_code == "Client.UserInitiatedShutdown"
    hash(info)  # usable as a key although tags is a mapping


@pytest.mark.parametrize("raw", [{}, None, {"State": None, "Tags": None, "Placement": "x"}])
def test_from_api_empty_items_never_raise(raw: Any) -> None:
    info = InstanceInfo.from_api(raw)
    assert info.instance_id == ""
    assert info.state == ec2.STATE_UNKNOWN
    assert info.name is None
    assert dict(info.tags) == {}
    assert info.vpc_id is info.subnet_id is info.availability_zone is None
    assert info.instance_type is info.private_ip is info.public_ip is None
    assert info.hibernation_configured is False
    assert info.launch_time is None
    assert info.state_reason is None


def test_from_api_odd_values() -> None:
    info = InstanceInfo.from_api(
        {
            "InstanceId": "i-1",
            "State": {"Name": "rebooting-into-the-future"},
            "Tags": [{"Key": "Name"}, {"Value": "orphan"}, "junk", {"Key": "k", "Value": 3}],
            "HibernationOptions": {},
            "LaunchTime": "not a date",
            "StateReason": {"Code": "", "Message": ""},
            "StateTransitionReason": "User initiated (2024-05-01 10:00:00 GMT)",
        }
    )
    assert info.state == "rebooting-into-the-future"  # unknown states are kept as they are
    assert dict(info.tags) == {"Name": "", "k": "3"}
    assert info.name is None  # an empty Name tag is no name
    assert info.launch_time is None
    assert info.state_reason == "User initiated (2024-05-01 10:00:00 GMT)"
    assert info.state_reason_code is None


# ---------------------------------------------------------------------------------------------
# classify


def client_error(code: str, message: str = "msg", status: int = 400, op: str = "StartInstances"):
    return botoexc.ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        op,
    )


@pytest.mark.parametrize(
    ("code", "status", "cls", "kind", "retryable"),
    [
        ("RequestLimitExceeded", 503, ec2.Throttled, "throttled", True),
        ("Throttling", 400, ec2.Throttled, "throttled", True),
        ("ThrottlingException", 400, ec2.Throttled, "throttled", True),
        (
            "InsufficientInstanceCapacity",
            500,
            ec2.InsufficientCapacity,
            "insufficient_capacity",
            True,
        ),
        ("InsufficientHostCapacity", 500, ec2.InsufficientCapacity, "insufficient_capacity", True),
        ("IncorrectInstanceState", 400, ec2.IncorrectState, "incorrect_state", False),
        ("IncorrectState", 400, ec2.IncorrectState, "incorrect_state", False),
        (
            "UnsupportedHibernationConfiguration",
            400,
            ec2.HibernationUnsupported,
            "incorrect_state",
            False,
        ),
        ("InvalidInstanceID.NotFound", 400, ec2.NotFound, "not_found", False),
        ("InvalidInstanceID.Malformed", 400, ec2.NotFound, "not_found", False),
        ("UnauthorizedOperation", 403, ec2.Unauthorized, "unauthorized", False),
        ("AuthFailure", 401, ec2.Unauthorized, "unauthorized", False),
        ("AccessDenied", 403, ec2.Unauthorized, "unauthorized", False),
        ("AccessDeniedException", 403, ec2.Unauthorized, "unauthorized", False),
        ("InternalError", 500, ec2.Unreachable, "unreachable", True),
        ("ServiceUnavailable", 503, ec2.Unreachable, "unreachable", True),
        ("InvalidParameterValue", 400, ec2.EC2Error, "other", False),
        ("DryRunOperation", 412, ec2.EC2Error, "other", False),
    ],
)
def test_classify_client_errors(code, status, cls, kind, retryable) -> None:
    err = ec2.classify(client_error(code, "it went wrong", status), ["i-1", "i-2"])
    assert type(err) is cls
    assert isinstance(err, ec2.EC2Error)
    assert err.kind == kind
    assert err.code == code
    assert err.message == "it went wrong"
    assert err.instance_ids == ("i-1", "i-2")
    assert err.retryable is retryable
    assert err.operation == "StartInstances"
    assert kind in str(err) and code in str(err)


def test_classify_hibernation_unsupported_operation() -> None:
    err = ec2.classify(client_error("UnsupportedOperation", "Hibernation is not enabled", 400))
    assert isinstance(err, ec2.HibernationUnsupported) and err.kind == "incorrect_state"
    err = ec2.classify(client_error("UnsupportedOperation", "root device is not EBS", 400))
    assert type(err) is ec2.EC2Error and err.kind == "other"


def test_classify_real_endpoint_connection_error() -> None:
    port = closed_port()
    boto = _plain_boto(f"http://127.0.0.1:{port}")
    with pytest.raises(botoexc.EndpointConnectionError) as info:
        boto.describe_instances()
    err = ec2.classify(info.value, ["i-9"])
    assert isinstance(err, ec2.Unreachable)
    assert (err.kind, err.code, err.retryable) == ("unreachable", "EndpointConnectionError", True)
    assert err.instance_ids == ("i-9",)
    assert err.__cause__ is info.value


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (botoexc.ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), ec2.Unreachable),
        (botoexc.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), ec2.Unreachable),
        (botoexc.ConnectionClosedError(endpoint_url="http://127.0.0.1:1"), ec2.Unreachable),
        (botoexc.NoCredentialsError(), ec2.Unauthorized),
        (botoexc.ProfileNotFound(profile="nope"), ec2.Unauthorized),
        (ValueError("surprise"), ec2.EC2Error),
    ],
)
def test_classify_other_exceptions(exc: BaseException, cls: type) -> None:
    err = ec2.classify(exc)
    assert type(err) is cls
    assert err.code == type(exc).__name__
    if cls is ec2.EC2Error:
        assert err.kind == "other" and err.message == "surprise"


def test_classify_keeps_ec2_errors() -> None:
    original = ec2.Throttled("slow down", code="Throttling")
    assert ec2.classify(original) is original
    narrowed = ec2.classify(original, ["i-5"])
    assert isinstance(narrowed, ec2.Throttled) and narrowed.instance_ids == ("i-5",)


# ---------------------------------------------------------------------------------------------
# settings, secrets, construction


def test_settings_hide_secrets() -> None:
    settings = _settings("http://127.0.0.1:1")
    for text in (repr(settings), str(settings), f"{settings}", settings.describe()):
        assert SECRET not in text and TOKEN not in text
        assert "***" in text or "credentials=static" in text
    assert SECRET not in repr(settings.key()) and TOKEN not in repr(settings.key())
    hash(settings.key())
    other = AWSSettings(**{**settings.__dict__, "secret_access_key": "another"})
    assert other.key() != settings.key()
    assert _settings("http://127.0.0.1:1").key() == settings.key()
    with pytest.raises(ValueError):
        AWSSettings(region=REGION, access_key_id="AKIA")


def test_boto_client_has_our_retry_and_timeout_config(make_client: Any) -> None:
    client = make_client()
    boto = client.get_boto_client()  # blocking is fine here: this is the test thread
    assert boto.meta.config.retries == {"mode": "standard", "total_max_attempts": 1}
    assert boto.meta.config.connect_timeout == 2.0
    assert boto.meta.config.read_timeout == 10.0
    assert boto.meta.endpoint_url == client.settings.endpoint_url
    assert boto.meta.region_name == REGION
    assert client.get_boto_client() is boto


def test_only_describe_start_stop_are_reachable() -> None:
    # plus CreateTags, limited to the multi-master tag (see the next test)
    assert set(ec2._OPERATIONS) == {
        "DescribeInstances", "StartInstances", "StopInstances", "CreateTags"
    }
    assert ec2.WRITABLE_TAGS == {"buildbot-ec2-hybrid:master"}
    source = Path(ec2.__file__).read_text()
    tree = ast.parse(source)
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    for forbidden in ("run_instances", "terminate_instances"):
        assert forbidden not in names and not any(forbidden in str(s) for s in strings)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not any(m.startswith("moto") or "sandbox" in m for m in imported)
    assert not any("terminat" in a or a.startswith("run") for a in dir(EC2Client))


def test_tag_instances_refuses_any_other_tag(reactor_thread: Any) -> None:  # noqa: F811
    client = EC2Client(_settings("http://127.0.0.1:1"), reactor_thread)
    try:
        for tags in ({"Name": "x"}, {"buildbot-ec2-hybrid:pool": "p"}):
            with pytest.raises(ValueError):
                call(client.tag_instances, ["i-0123456789abcdef0"], tags)
        assert client.stats["CreateTags"] == 0
    finally:
        call(client.close)


def test_shared_client_per_settings_and_reactor(reactor_thread: Any) -> None:  # noqa: F811
    a = EC2Client.shared(_settings("http://127.0.0.1:1"), reactor_thread)
    b = EC2Client.shared(_settings("http://127.0.0.1:1"), reactor_thread)
    c = EC2Client.shared(_settings("http://127.0.0.1:2"), reactor_thread)
    try:
        assert a is b and a is not c
        call(a.close)  # one of two users gone: still open
        assert EC2Client.shared(_settings("http://127.0.0.1:1"), reactor_thread) is a
        call(a.close)
        call(a.close)  # last user
        d = EC2Client.shared(_settings("http://127.0.0.1:1"), reactor_thread)
        assert d is not a
        call(d.close)
        with pytest.raises(ec2.EC2Error) as info:
            call(a.start_instance, "i-1")
        assert info.value.code == "ClientClosed"
    finally:
        call(c.close)


# ---------------------------------------------------------------------------------------------
# describe


def test_describe_returns_instance_info_and_caches(region: Region, make_client: Any) -> None:
    ids = region.make(2, prefix="b2g", hibernate=True, stopped=False)
    client = make_client()
    infos = call(client.describe, ids)
    assert sorted(i.instance_id for i in infos) == sorted(ids)
    for info in infos:
        assert info.state == "running"
        assert info.name == "b2g-ec2"
        assert info.tags["buildbot-ec2-hybrid:pool"] == "test"
        assert info.vpc_id == region.vpc_id and info.subnet_id == region.subnet_id
        assert info.availability_zone and info.availability_zone.startswith(REGION)
        assert info.instance_type == "t3.micro"
        assert info.private_ip and info.private_ip.startswith("10.0.")
        assert info.hibernation_configured is True
        assert isinstance(info.launch_time, datetime)
        assert client.latest(info.instance_id) == info
        assert client.latest_at(info.instance_id) is not None
    assert client.stats["DescribeInstances"] == 1
    assert client.latest(UNKNOWN_ID) is None


def test_describe_follows_pages(region: Region, make_client: Any) -> None:
    for k in range(7):  # moto pages by reservation: one RunInstances each
        region.make(1, prefix=f"p{k}", stopped=False)
    client = make_client(describe_page_size=5)
    calls, _ = hooks(client)
    infos = call(
        client.describe,
        filters=[{"Name": "tag:buildbot-ec2-hybrid:pool", "Values": ["test"]}],
    )
    assert len(infos) == 7
    assert calls.count("DescribeInstances") == 2
    assert str(calls.of("DescribeInstances")[0]["MaxResults"]) == "5"
    assert "NextToken" in calls.of("DescribeInstances")[1]


def test_describe_unknown_id_is_not_found(region: Region, make_client: Any) -> None:
    (good,) = region.make(1, stopped=False)
    client = make_client()
    with pytest.raises(ec2.NotFound) as info:
        call(client.describe, [good, UNKNOWN_ID])
    assert info.value.instance_ids == (UNKNOWN_ID,)
    assert info.value.kind == "not_found"
    infos = call(client.describe, [good, UNKNOWN_ID], missing_ok=True)
    assert [i.instance_id for i in infos] == [good]
    assert call(client.describe, []) == []


def test_unreachable_endpoint_is_retried_then_raised(make_client: Any) -> None:
    client = make_client(f"http://127.0.0.1:{closed_port()}", max_throttle_retries=2)
    with pytest.raises(ec2.Unreachable) as info:
        call(client.describe, ["i-1"])
    assert info.value.code == "EndpointConnectionError"
    assert client.stats["DescribeInstances"] == 3
    assert client.stats["DescribeInstances.unreachable"] == 3
    assert client.stats["DescribeInstances.retry"] == 2


# ---------------------------------------------------------------------------------------------
# start/stop: coalescing, chunking, partial failure


def test_starts_in_one_reactor_turn_are_one_call(region: Region, make_client: Any) -> None:
    ids = region.make(5)
    client = make_client()
    calls, _ = hooks(client)
    call(client.describe, ids[:2])  # cached ones come back updated; others come back None

    def five_starts() -> defer.Deferred:
        # a second request for the same instance joins the first
        return gather([client.start_instance(i) for i in ids] + [client.start_instance(ids[0])])

    results = call(five_starts)
    assert client.stats["StartInstances"] == 1
    assert calls.count("StartInstances") == 1
    assert sorted(ids_in(calls.of("StartInstances")[0])) == sorted(ids)
    assert [r.state for r in results[:2]] == ["pending", "pending"]
    assert results[2:5] == [None, None, None]
    assert results[5] == results[0]
    assert set(region.states(ids).values()) == {"running"}


def test_batch_window_joins_later_turns(region: Region, make_client: Any) -> None:
    ids = region.make(3)
    client = make_client(batch_window=0.3)
    calls, _ = hooks(client)

    def staggered() -> defer.Deferred:
        from twisted.internet import task

        reactor = client.reactor
        ds = [client.start_instance(ids[0])]
        ds.append(task.deferLater(reactor, 0.05, client.start_instance, ids[1]))
        ds.append(task.deferLater(reactor, 0.1, client.start_instance, ids[2]))
        return gather(ds)

    call(staggered)
    assert calls.count("StartInstances") == 1
    assert sorted(ids_in(calls.of("StartInstances")[0])) == sorted(ids)


def test_batch_is_chunked(region: Region, make_client: Any) -> None:
    ids = region.make(250)
    client = make_client(chunk_size=100)
    calls, _ = hooks(client)
    outcome = call(client.start_instances, ids, timeout=30)
    assert outcome == dict.fromkeys(ids)
    assert calls.count("StartInstances") == 3
    assert client.stats["StartInstances"] == 3
    sizes = sorted(len(ids_in(p)) for p in calls.of("StartInstances"))
    assert sizes == [50, 100, 100]
    assert set(region.states(ids).values()) == {"running"}


def _refuse_start_of(bad: str, message: str) -> Rule:
    def rule(action: str, params: dict[str, str]) -> tuple[int, bytes] | None:
        if action == "StartInstances" and bad in ids_in(params):
            return ec2_error("IncorrectInstanceState", message)
        return None

    return rule


def test_bad_instance_is_bisected_out(region: Region, make_client: Any) -> None:
    ids = region.make(6)
    bad = ids[4]
    client = make_client()
    # EC2 fails the whole call; this message does not say which instance is at fault
    calls, injector = hooks(
        client, _refuse_start_of(bad, "An instance is not in a state from which it can be started.")
    )
    outcome = call(client.start_instances, ids)
    assert isinstance(outcome[bad], ec2.IncorrectState)
    assert outcome[bad].instance_ids == (bad,)
    assert all(outcome[i] is None for i in ids if i != bad)
    states = region.states(ids)
    assert states[bad] == "stopped"
    assert all(states[i] == "running" for i in ids if i != bad)
    n = calls.count("StartInstances")
    assert 3 <= n <= 2 * len(ids) - 1
    assert client.stats["StartInstances.bisect"] >= 1
    assert client.stats["StartInstances.incorrect_state"] == injector.answered


def test_named_bad_instance_skips_bisection(region: Region, make_client: Any) -> None:
    ids = region.make(6)
    bad = ids[1]
    client = make_client()
    calls, _ = hooks(
        client,
        _refuse_start_of(
            bad, f"The instance '{bad}' is not in a state from which it can be started."
        ),
    )

    def per_instance() -> defer.Deferred:
        return gather([client.start_instance(i) for i in ids])

    results = dict(zip(ids, call(per_instance), strict=True))
    assert isinstance(results[bad], ec2.IncorrectState)
    assert all(not isinstance(results[i], Exception) for i in ids if i != bad)
    assert calls.count("StartInstances") == 2
    assert client.stats["StartInstances.bisect"] == 0
    assert region.states(ids)[ids[0]] == "running"


def test_unknown_id_in_batch_gets_not_found(region: Region, make_client: Any) -> None:
    ids = region.make(3)
    client = make_client()
    calls, _ = hooks(client)
    outcome = call(client.start_instances, [*ids, UNKNOWN_ID])  # moto's own error
    assert isinstance(outcome[UNKNOWN_ID], ec2.NotFound)
    assert outcome[UNKNOWN_ID].code == "InvalidInstanceID.NotFound"
    assert all(outcome[i] is None for i in ids)
    assert calls.count("StartInstances") == 2
    assert set(region.states(ids).values()) == {"running"}


def test_hibernate_and_plain_stops_are_separate_calls(region: Region, make_client: Any) -> None:
    sleepy, plain = region.make(2, hibernate=True, stopped=False)
    client = make_client()
    calls, _ = hooks(client)

    def stops() -> defer.Deferred:
        return gather([client.stop_instance(sleepy, hibernate=True), client.stop_instance(plain)])

    assert call(stops) == [None, None]
    stop_calls = calls.of("StopInstances")
    assert len(stop_calls) == 2
    by_ids = {tuple(ids_in(p)): p for p in stop_calls}
    assert by_ids[(sleepy,)].get("Hibernate") == "true"
    assert "Hibernate" not in by_ids[(plain,)]
    assert set(region.states([sleepy, plain]).values()) == {"stopped"}


def test_close_fails_queued_requests(region: Region, make_client: Any) -> None:
    (iid,) = region.make(1)
    client = make_client()
    calls, _ = hooks(client)

    def start_then_close() -> defer.Deferred:
        d = client.start_instance(iid)
        client.close()
        return gather([d])

    (err,) = call(start_then_close)
    assert isinstance(err, ec2.EC2Error) and err.code == "ClientClosed"
    assert calls.count("StartInstances") == 0


# ---------------------------------------------------------------------------------------------
# throttling


def _throttle_first(n: int | None) -> Rule:
    seen = {"count": 0}
    lock = threading.Lock()

    def rule(action: str, params: dict[str, str]) -> tuple[int, bytes] | None:
        if action != "StartInstances":
            return None
        with lock:
            seen["count"] += 1
            if n is not None and seen["count"] > n:
                return None
        return ec2_error("RequestLimitExceeded", "Request limit exceeded.", 503)

    return rule


def test_throttling_is_retried_with_full_jitter(region: Region, make_client: Any) -> None:
    (iid,) = region.make(1)
    base, cap = 0.01, 0.03
    client = make_client(backoff_base=base, backoff_cap=cap, rng=random.Random(7))
    calls, injector = hooks(client, _throttle_first(4))
    call(client.start_instance, iid)
    assert injector.answered == 4
    assert calls.count("StartInstances") == 5
    assert client.stats["StartInstances"] == 5
    assert client.stats["StartInstances.throttled"] == 4
    assert client.stats["StartInstances.retry"] == 4
    assert client.stats["StartInstances.ok"] == 1
    delays = list(client.backoff_delays)
    bounds = [min(cap, base * 2**attempt) for attempt in range(4)]
    assert all(0 <= d <= b for d, b in zip(delays, bounds, strict=True))
    expected = random.Random(7)
    assert delays == [expected.uniform(0, b) for b in bounds]  # uniform over [0, bound]
    assert region.states([iid])[iid] == "running"


def test_throttling_gives_up_after_max_retries(region: Region, make_client: Any) -> None:
    (iid,) = region.make(1)
    client = make_client(max_throttle_retries=3)
    calls, _ = hooks(client, _throttle_first(None))
    with pytest.raises(ec2.Throttled) as info:
        call(client.start_instance, iid)
    assert info.value.code == "RequestLimitExceeded"
    assert info.value.instance_ids == (iid,)
    assert calls.count("StartInstances") == 4
    assert client.stats["StartInstances.retry"] == 3
    assert region.states([iid])[iid] == "stopped"


# ---------------------------------------------------------------------------------------------
# wait_for_state


@pytest.mark.parametrize(
    ("state", "targets", "progressed", "polls", "verdict"),
    [
        ("running", {"running"}, False, 1, ec2.DONE),
        ("pending", {"running"}, False, 5, ec2.WAIT),
        ("stopped", {"running"}, False, 1, ec2.WAIT),  # DescribeInstances lags behind Start
        ("stopped", {"running"}, False, 2, ec2.FAIL),  # ... but not for two polls
        ("stopped", {"running"}, True, 1, ec2.FAIL),  # pending then stopped: the start failed
        ("stopping", {"running"}, True, 1, ec2.FAIL),
        ("terminated", {"running"}, False, 1, ec2.FAIL),
        ("shutting-down", {"stopped"}, False, 1, ec2.FAIL),
        ("running", {"stopped"}, False, 1, ec2.WAIT),
        ("running", {"stopped"}, True, 1, ec2.FAIL),
        ("stopping", {"stopped"}, False, 9, ec2.WAIT),
        ("stopped", {"running", "stopped"}, False, 9, ec2.DONE),
        ("stopping", {"running", "stopped"}, False, 9, ec2.WAIT),
        ("shutting-down", {"terminated"}, False, 9, ec2.WAIT),
        ("weird", {"running"}, True, 9, ec2.WAIT),
    ],
)
def test_transition_verdict(state, targets, progressed, polls, verdict) -> None:
    got = ec2.transition_verdict(
        state, targets, progressed=progressed, polls_seen=polls, grace_polls=1
    )
    assert got == verdict


def test_waits_share_one_poll(region: Region, make_client: Any) -> None:
    ids = region.make(10)
    client = make_client(poll_interval=0.15)
    calls, _ = hooks(client)

    def wait_all() -> list[defer.Deferred]:
        # started by someone else, later: no grace needed for "still stopped"
        return [client.wait_for_state(i, {"running"}, 10, grace_polls=10**6) for i in ids]

    waits = call(wait_all)
    wait_until(lambda: client.stats["poll"] >= 1, what="first poll")
    region.admin.start_instances(InstanceIds=ids[:5])
    wait_until(lambda: all(d.called for d in waits[:5]), what="first five running")
    assert not any(d.called for d in waits[5:])
    region.admin.start_instances(InstanceIds=ids[5:])
    results = call(lambda: gather(waits))
    assert [r.state for r in results] == ["running"] * 10
    assert [r.instance_id for r in results] == ids

    polls = client.stats["poll"]
    assert polls >= 2
    describes = calls.of("DescribeInstances")
    assert len(describes) == polls == client.stats["DescribeInstances"]
    assert sorted(ids_in(describes[0])) == sorted(ids)  # all ten in the one call
    assert sorted(ids_in(describes[-1])) == sorted(ids[5:])
    # nothing watched: the poll stops
    wait_until(lambda: not client.is_polling(), timeout=5, what="poll stopped")
    time.sleep(0.4)
    assert client.stats["DescribeInstances"] == polls


def test_wait_times_out(region: Region, make_client: Any) -> None:
    (iid,) = region.make(1, stopped=False)
    client = make_client(poll_interval=0.05)
    call(client.prepare)  # the first call builds the boto3 client: keep that out of the timing
    with pytest.raises(ec2.StateTimeout) as info:
        call(client.wait_for_state, iid, {"stopped"}, 0.5, grace_polls=10**6)
    assert info.value.kind == "timeout"
    assert info.value.instance_ids == (iid,)
    assert "running" in info.value.message
    assert client.stats["poll"] >= 2
    wait_until(lambda: not client.is_polling(), timeout=5, what="poll stopped")
    assert call(client.watched_ids) == []


def test_wait_fails_when_start_never_happened(region: Region, make_client: Any) -> None:
    (iid,) = region.make(1)
    client = make_client(poll_interval=0.05)
    with pytest.raises(ec2.IncorrectState) as info:
        call(client.wait_for_state, iid, {"running"}, 5)
    assert "stopped" in info.value.message
    assert client.stats["poll"] == 2  # the first "stopped" is forgiven, the second is not


def test_wait_fails_on_terminated_and_vanished(region: Region, make_client: Any) -> None:
    (iid,) = region.make(1, stopped=False)
    region.admin.terminate_instances(InstanceIds=[iid])  # test set-up, not the plugin
    client = make_client(poll_interval=0.05)

    def both() -> defer.Deferred:
        return gather(
            [
                client.wait_for_state(iid, {"running"}, 5),
                client.wait_for_state(UNKNOWN_ID, {"running"}, 5),
            ]
        )

    terminated, vanished = call(both)
    assert isinstance(terminated, ec2.IncorrectState) and "terminated" in terminated.message
    assert isinstance(vanished, ec2.NotFound) and vanished.instance_ids == (UNKNOWN_ID,)


def _describe_xml(iid: str, state: str, code: int, reason: tuple[str, str] | None) -> bytes:
    reason_xml = ""
    if reason:
        reason_xml = (
            f"<stateReason><code>{reason[0]}</code><message>{reason[1]}</message></stateReason>"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
        "<requestId>injected</requestId><reservationSet><item><reservationId>r-1</reservationId>"
        f"<instancesSet><item><instanceId>{iid}</instanceId>"
        f"<instanceState><code>{code}</code><name>{state}</name></instanceState>{reason_xml}"
        "</item></instancesSet></item></reservationSet></DescribeInstancesResponse>"
    ).encode()


def test_pending_then_stopped_is_a_failed_start(make_client: Any) -> None:
    iid = "i-0aaaabbbbccccdddd"
    answers = [
        _describe_xml(iid, "pending", 0, None),
        _describe_xml(
            iid,
            "stopped",
            80,
            ("Server.InsufficientInstanceCapacity", "Server.InsufficientInstanceCapacity"),
        ),
    ]

    def rule(action: str, params: dict[str, str]) -> tuple[int, bytes] | None:
        if action == "DescribeInstances":
            return 200, answers.pop(0) if len(answers) > 1 else answers[0]
        return None

    client = make_client(poll_interval=0.05)
    hooks(client, rule)
    with pytest.raises(ec2.InsufficientCapacity) as info:
        # a huge grace: the failure comes from having seen pending, not from the grace
        call(client.wait_for_state, iid, {"running"}, 5, grace_polls=10**6)
    assert info.value.code == "Server.InsufficientInstanceCapacity"
    assert client.stats["poll"] == 2
    assert client.latest(iid).state == "stopped"


def test_cancelling_a_wait_removes_it(region: Region, make_client: Any) -> None:
    (iid,) = region.make(1)
    client = make_client(poll_interval=0.05)
    d = call(lambda: [client.wait_for_state(iid, {"running"}, 10, grace_polls=10**6)])[0]
    wait_until(lambda: client.stats["poll"] >= 2, what="two polls")
    call(d.cancel)
    with pytest.raises(defer.CancelledError):
        call(lambda: d)
    assert call(client.watched_ids) == []
    wait_until(lambda: not client.is_polling(), what="poll stopped")
    polls = client.stats["poll"]
    time.sleep(0.25)
    assert client.stats["poll"] == polls


# ---------------------------------------------------------------------------------------------
# dry runs


def test_dry_run_start_stop(region: Region, make_client: Any) -> None:
    ids = region.make(3, stopped=False)
    denied = ids[2]

    def rule(action: str, params: dict[str, str]) -> tuple[int, bytes] | None:
        if action == "StopInstances" and denied in ids_in(params):
            return ec2_error("UnauthorizedOperation", "You are not authorized.", 403)
        return None

    client = make_client()
    calls, _ = hooks(client, rule)
    verdicts = call(client.dry_run_start_stop, ids)
    assert verdicts == {ids[0]: "allowed", ids[1]: "allowed", denied: "unauthorized"}
    assert all(p.get("DryRun") == "true" for a, p in calls.calls if a != "DescribeInstances")
    assert set(region.states(ids).values()) == {"running"}  # nothing really happened
    assert client.stats["StartInstances.dry_run"] >= 1


# ---------------------------------------------------------------------------------------------
# logs never carry secrets


def test_secrets_never_logged(region: Region, make_client: Any) -> None:
    ids = region.make(2, stopped=False)
    lines: list[str] = []

    def observer(event: dict) -> None:
        lines.append(log.textFromEventDict(event) or "")
        lines.append(json.dumps({k: repr(v) for k, v in event.items()}))

    def rule(action: str, params: dict[str, str]) -> tuple[int, bytes] | None:
        if action == "StopInstances":
            return ec2_error("AuthFailure", "AWS was not able to validate the credentials.", 401)
        return None

    log.addObserver(observer)
    try:
        client = make_client(max_throttle_retries=1)
        hooks(client, rule)
        call(client.describe, ids)
        outcome = call(client.stop_instances, ids)
        assert all(isinstance(e, ec2.Unauthorized) for e in outcome.values())
        assert call(client.start_instances, ids) == dict.fromkeys(ids)
        with pytest.raises(ec2.NotFound):
            call(client.describe, [UNKNOWN_ID])
        call(client.close)
    finally:
        log.removeObserver(observer)
    text = "\n".join(lines)
    assert "ec2-hybrid[ec2]" in text  # the client did log
    assert "boto3 EC2 client ready" in text
    assert SECRET not in text and TOKEN not in text
    for err in outcome.values():
        assert SECRET not in str(err) and SECRET not in repr(err)
