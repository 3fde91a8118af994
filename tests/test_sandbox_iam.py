"""The sandbox region enforces an IAM policy, Resource ARNs and ``ec2:ResourceTag`` conditions
included, and the plugin works under exactly the least-privilege policy in docs/.

Three layers: the evaluator on its own; the region over HTTP with plain boto3; a real master,
real workers and the plugin's own EC2 client under the documented policy.

The documented policy is ``docs/iam-policy.json``; when it is missing, an equivalent policy
defined here stands in. Which one ran is printed (``pytest -s`` or ``-rP`` shows it).
"""

from __future__ import annotations

import base64
import copy
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config
from twisted_helpers import call
from twisted_helpers import reactor_thread  # noqa: F401  (fixture)

from buildbot_ec2_hybrid.ec2 import AWSSettings
from buildbot_ec2_hybrid.ec2 import EC2Client
from buildbot_ec2_hybrid.sandbox.farm import wait_for
from buildbot_ec2_hybrid.sandbox.iam import Decision
from buildbot_ec2_hybrid.sandbox.iam import Policy
from buildbot_ec2_hybrid.sandbox.iam import PolicyError
from buildbot_ec2_hybrid.sandbox.iam import instance_arn
from buildbot_ec2_hybrid.sandbox.lab import AWS_SECRET
from buildbot_ec2_hybrid.sandbox.lab import BuilderSpec
from buildbot_ec2_hybrid.sandbox.lab import LabSpec
from buildbot_ec2_hybrid.sandbox.lab import PoolSpec
from buildbot_ec2_hybrid.sandbox.region import POOL_TAG
from buildbot_ec2_hybrid.sandbox.region import SandboxRegion

REGION = "us-west-2"
ACCOUNT = "123456789012"  # SandboxRegion's default account, the one SandboxLab uses
DOC_POLICY = Path(__file__).resolve().parents[1] / "docs" / "iam-policy.json"
FALLBACK_POOL = "b2g-aws"
OTHER_POOL = "not-a-documented-pool"
INTRUDER = "iam-test-intruder"
SUCCESS = 0


# ---------------------------------------------------------------------------------------------
# The policy under test


def fallback_policy(pool: str = FALLBACK_POOL) -> dict[str, Any]:
    """What docs/iam-policy.json is meant to say, for when it is not there."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Describe",
                "Effect": "Allow",
                "Action": ["ec2:DescribeInstances", "ec2:DescribeInstanceStatus"],
                "Resource": "*",
            },
            {
                "Sid": "StartStopPoolInstances",
                "Effect": "Allow",
                "Action": ["ec2:StartInstances", "ec2:StopInstances"],
                "Resource": "arn:aws:ec2:*:*:instance/*",
                "Condition": {"StringEquals": {f"ec2:ResourceTag/{POOL_TAG}": pool}},
            },
        ],
    }


@dataclass
class PolicyUnderTest:
    document: dict[str, Any]
    source: str
    pool: str  # the pool name the tests use: one the policy grants
    substitutions: list[str] = field(default_factory=list)

    @property
    def policy(self) -> Policy:
        return Policy(self.document)

    def describe(self) -> str:
        subs = "; ".join(self.substitutions) if self.substitutions else "none"
        return f"{self.source} (test pool {self.pool!r}; substitutions: {subs})"


_PLACEHOLDER_WORDS = {"region", "account", "account-id", "account_id", "accountid", "pool"}


def _is_placeholder(value: str) -> bool:
    return (
        bool(re.search(r"\$\{|[<>{}]", value))
        or re.fullmatch(r"[A-Z][A-Z0-9_]*", value) is not None
        or value.lower() in _PLACEHOLDER_WORDS
    )


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def adapt_documented_policy(document: dict[str, Any]) -> tuple[dict[str, Any], str, list[str]]:
    """(document to enforce, pool name to test with, what was substituted).

    Only placeholders are replaced (a pool named like ``${pool}`` or ``POOL_NAME``, a region or
    account written as a placeholder), plus a concrete region or account that the sandbox cannot
    serve; concrete pool names are kept and the test uses the first one."""
    doc = copy.deepcopy(document)
    notes: list[str] = []
    pools: list[str] = []
    statements = doc.get("Statement")
    for statement in _as_list(statements):
        for operator, keys in (statement.get("Condition") or {}).items():
            for key in list(keys):
                if not re.fullmatch(rf"(?i)(ec2|aws):ResourceTag/{re.escape(POOL_TAG)}", key):
                    continue
                values = []
                for value in _as_list(keys[key]):
                    if _is_placeholder(str(value)):
                        notes.append(f"pool {value!r} -> {FALLBACK_POOL!r} in {operator}")
                        value = FALLBACK_POOL
                    values.append(value)
                keys[key] = values if isinstance(keys[key], list) else values[0]
                pools.extend(values)
        for res_key in ("Resource", "NotResource"):
            if res_key not in statement:
                continue
            fixed = []
            for arn in _as_list(statement[res_key]):
                parts = arn.split(":", 5)
                if len(parts) == 6 and parts[0] == "arn":
                    for index, want, what in ((3, REGION, "region"), (4, ACCOUNT, "account")):
                        have = parts[index]
                        if have != want and ("*" not in have or _is_placeholder(have)):
                            notes.append(f"{what} {have!r} -> {want!r} in {arn}")
                            parts[index] = want
                    arn = ":".join(parts)
                fixed.append(arn)
            statement[res_key] = fixed if isinstance(statement[res_key], list) else fixed[0]
    if not pools:
        pytest.fail(f"{DOC_POLICY} has no condition on the {POOL_TAG} tag: it must have one")
    # A StringLike pattern needs a concrete name that it matches.
    pool = pools[0].replace("*", "pool").replace("?", "x")
    return doc, pool, notes


@pytest.fixture(scope="module")
def policy_under_test() -> PolicyUnderTest:
    if DOC_POLICY.exists():
        document, pool, notes = adapt_documented_policy(json.loads(DOC_POLICY.read_text()))
        put = PolicyUnderTest(document, "docs/iam-policy.json", pool, notes)
    else:
        put = PolicyUnderTest(
            fallback_policy(),
            "fallback policy in tests/test_sandbox_iam.py (docs/iam-policy.json not found)",
            FALLBACK_POOL,
        )
    print(f"\nIAM policy under test: {put.describe()}")
    # The tests lean on these; a policy that fails them is not the documented least privilege.
    policy = put.policy
    tagged = {"i-0aaaaaaaaaaaaaaaa": {POOL_TAG: put.pool}}
    other = {"i-0bbbbbbbbbbbbbbbb": {POOL_TAG: OTHER_POOL}}
    context = {"region": REGION, "account_id": ACCOUNT}
    assert policy.authorize("DescribeInstances", **context) is None, put.describe()
    for action in ("StartInstances", "StopInstances"):
        assert policy.authorize(action, instances=tagged, **context) is None, put.describe()
        assert policy.authorize(action, instances=other, **context) is not None, put.describe()
    for action in ("RunInstances", "TerminateInstances", "CreateTags"):
        assert policy.authorize(action, instances=tagged, **context) is not None, put.describe()
    return put


# ---------------------------------------------------------------------------------------------
# The evaluator


def _arn(instance_id: str, region: str = REGION) -> str:
    return instance_arn(region, ACCOUNT, instance_id)


def _authorize(document: dict[str, Any], action: str, instances=None, region: str = REGION):
    return Policy(document).authorize(
        action, region=region, account_id=ACCOUNT, instances=instances
    )


def test_action_wildcards_are_case_insensitive() -> None:
    policy = Policy(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "EC2:describe*", "Resource": "*"},
                {"Effect": "Allow", "Action": "ec2:?topInstances", "Resource": "*"},
            ],
        }
    )
    assert policy.decide("ec2:DescribeInstances")[0] is Decision.ALLOW
    assert policy.decide("ec2:DescribeInstanceStatus")[0] is Decision.ALLOW
    assert policy.decide("ec2:StopInstances")[0] is Decision.ALLOW
    assert policy.decide("ec2:StartInstances")[0] is Decision.IMPLICIT_DENY
    assert policy.decide("ec2:RunInstances")[0] is Decision.IMPLICIT_DENY
    # a wildcard matches within the action name only, and the service must match too
    assert policy.decide("iam:DescribeInstances")[0] is Decision.IMPLICIT_DENY
    everything = Policy({"Statement": {"Effect": "Allow", "Action": "*", "Resource": "*"}})
    assert everything.decide("ec2:TerminateInstances")[0] is Decision.ALLOW


def test_resource_arns_and_wildcards() -> None:
    doc = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "ec2:StartInstances",
                "Resource": [f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-0abc*"],
            },
            {
                "Effect": "Allow",
                "Action": "ec2:StopInstances",
                "Resource": "arn:aws:ec2:*:*:instance/*",
            },
        ],
    }
    assert _authorize(doc, "StartInstances", {"i-0abc123": {}}) is None
    denial = _authorize(doc, "StartInstances", {"i-0def456": {}})
    assert denial is not None and denial.resource == _arn("i-0def456")
    # another region's ARN is not covered by a region-specific pattern
    assert _authorize(doc, "StartInstances", {"i-0abc123": {}}, region="eu-west-1") is not None
    assert _authorize(doc, "StopInstances", {"i-0def456": {}}, region="eu-west-1") is None
    # an ARN-scoped statement does not cover a call on "*" (no instances named)
    assert _authorize(doc, "StopInstances") is not None
    # ARN matching is case-sensitive, unlike action matching
    assert Policy(doc).decide("ec2:StartInstances", _arn("I-0ABC123"))[0] is not Decision.ALLOW


def test_describe_is_judged_on_star_even_when_naming_instances() -> None:
    arn_only = {
        "Statement": [
            {"Effect": "Allow", "Action": "ec2:Describe*", "Resource": "arn:aws:ec2:*:*:instance/*"}
        ]
    }
    star = {"Statement": [{"Effect": "Allow", "Action": "ec2:Describe*", "Resource": "*"}]}
    named = {"i-0abc": {POOL_TAG: "p"}}
    # EC2 has no resource-level permissions for Describe*: only Resource "*" can grant it
    assert _authorize(arn_only, "DescribeInstances", named) is not None
    assert _authorize(star, "DescribeInstances", named) is None
    assert _authorize(star, "DescribeInstances") is None


def _tag_doc(operator: str, values: Any, key: str = f"ec2:ResourceTag/{POOL_TAG}"):
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["ec2:StartInstances", "ec2:StopInstances"],
                "Resource": "arn:aws:ec2:*:*:instance/*",
                "Condition": {operator: {key: values}},
            }
        ],
    }


def test_string_equals_on_resource_tag() -> None:
    doc = _tag_doc("StringEquals", ["bld-linux64", "try-linux64"])
    assert _authorize(doc, "StartInstances", {"i-1": {POOL_TAG: "bld-linux64"}}) is None
    assert _authorize(doc, "StartInstances", {"i-1": {POOL_TAG: "try-linux64"}}) is None
    assert _authorize(doc, "StartInstances", {"i-1": {POOL_TAG: "BLD-linux64"}}) is not None
    assert _authorize(doc, "StartInstances", {"i-1": {POOL_TAG: "other"}}) is not None
    assert _authorize(doc, "StartInstances", {"i-1": {"Name": "bld-linux64"}}) is not None
    assert _authorize(doc, "StartInstances", {"i-1": {}}) is not None
    # an instance the region does not know has no tags
    assert _authorize(doc, "StartInstances", {"i-1": None}) is not None
    # aws:ResourceTag is the same key as ec2:ResourceTag
    aws_key = _tag_doc("StringEquals", "p", key=f"aws:ResourceTag/{POOL_TAG}")
    assert _authorize(aws_key, "StopInstances", {"i-1": {POOL_TAG: "p"}}) is None
    assert _authorize(aws_key, "StopInstances", {"i-1": {POOL_TAG: "q"}}) is not None


def test_string_like_negations_and_if_exists() -> None:
    like = _tag_doc("StringLike", "b2g-*")
    assert _authorize(like, "StartInstances", {"i-1": {POOL_TAG: "b2g-aws"}}) is None
    assert _authorize(like, "StartInstances", {"i-1": {POOL_TAG: "try-aws"}}) is not None
    single = _tag_doc("StringLike", "pool-?")
    assert _authorize(single, "StartInstances", {"i-1": {POOL_TAG: "pool-7"}}) is None
    assert _authorize(single, "StartInstances", {"i-1": {POOL_TAG: "pool-17"}}) is not None
    # a negated operator holds when the key is absent, as in AWS
    not_equals = _tag_doc("StringNotEquals", "prod")
    assert _authorize(not_equals, "StartInstances", {"i-1": {POOL_TAG: "dev"}}) is None
    assert _authorize(not_equals, "StartInstances", {"i-1": {}}) is None
    assert _authorize(not_equals, "StartInstances", {"i-1": {POOL_TAG: "prod"}}) is not None
    if_exists = _tag_doc("StringEqualsIfExists", "p")
    assert _authorize(if_exists, "StartInstances", {"i-1": {}}) is None
    assert _authorize(if_exists, "StartInstances", {"i-1": {POOL_TAG: "q"}}) is not None


def test_requested_region_and_several_conditions_all_hold() -> None:
    doc = _tag_doc("StringEquals", "p")
    doc["Statement"][0]["Condition"]["StringEquals"]["aws:RequestedRegion"] = REGION
    tagged = {"i-1": {POOL_TAG: "p"}}
    assert _authorize(doc, "StartInstances", tagged) is None
    assert _authorize(doc, "StartInstances", tagged, region="eu-west-1") is not None
    assert _authorize(doc, "StartInstances", {"i-1": {POOL_TAG: "q"}}) is not None


def test_explicit_deny_wins() -> None:
    doc = {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "Everything", "Effect": "Allow", "Action": "ec2:*", "Resource": "*"},
            {
                "Sid": "NeverDestroy",
                "Effect": "Deny",
                "Action": ["ec2:TerminateInstances", "ec2:RunInstances"],
                "Resource": "*",
            },
            {
                "Sid": "NotProduction",
                "Effect": "Deny",
                "Action": "ec2:StopInstances",
                "Resource": "*",
                "Condition": {"StringEquals": {"ec2:ResourceTag/env": "prod"}},
            },
        ],
    }
    policy = Policy(doc)
    assert policy.decide("ec2:TerminateInstances") == (Decision.EXPLICIT_DENY, "NeverDestroy")
    assert policy.decide("ec2:StartInstances") == (Decision.ALLOW, "Everything")
    denial = _authorize(doc, "StopInstances", {"i-1": {"env": "dev"}, "i-2": {"env": "prod"}})
    assert denial is not None and denial.decision is Decision.EXPLICIT_DENY
    assert denial.statement == "NotProduction" and denial.resource == _arn("i-2")
    assert "explicit deny" in denial.message
    assert _authorize(doc, "StopInstances", {"i-1": {"env": "dev"}}) is None


def test_not_action_and_not_resource() -> None:
    doc = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "NotAction": "ec2:Terminate*", "Resource": "*"},
            {
                "Effect": "Deny",
                "Action": "ec2:StartInstances",
                "NotResource": "arn:aws:ec2:*:*:instance/i-0ok*",
            },
        ],
    }
    assert _authorize(doc, "TerminateInstances", {"i-0ok1": {}}) is not None
    assert _authorize(doc, "StartInstances", {"i-0ok1": {}}) is None
    assert _authorize(doc, "StartInstances", {"i-0bad": {}}) is not None


def test_a_call_naming_several_instances_fails_whole_on_one_denied() -> None:
    doc = _tag_doc("StringEquals", "p")
    good = {POOL_TAG: "p"}
    assert _authorize(doc, "StartInstances", {"i-1": good, "i-2": good, "i-3": good}) is None
    denial = _authorize(doc, "StartInstances", {"i-1": good, "i-2": {}, "i-3": good})
    assert denial is not None
    assert (denial.status, denial.code) == (403, "UnauthorizedOperation")
    assert denial.action == "ec2:StartInstances" and denial.resource == _arn("i-2")
    assert denial.decision is Decision.IMPLICIT_DENY


def test_denial_message_names_the_action_and_resource_and_encodes_the_decision() -> None:
    denial = _authorize(_tag_doc("StringEquals", "p"), "StopInstances", {"i-9": {"Name": "x"}})
    assert denial is not None
    message = denial.message
    assert message.startswith("You are not authorized to perform this operation.")
    assert "ec2:StopInstances" in message and _arn("i-9") in message
    blob = message.split("Encoded authorization failure message: ", 1)[1]
    decoded = json.loads(base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4)))
    assert decoded["allowed"] is False and decoded["explicitDeny"] is False
    assert decoded["action"] == "ec2:StopInstances" and decoded["resource"] == _arn("i-9")
    assert decoded["conditions"]["ec2:ResourceTag/Name"] == "x"


@pytest.mark.parametrize(
    "document, fragment",
    [
        ("{not json", "not JSON"),
        ({"Statement": []}, "non-empty"),
        ({"Version": "2020-01-01", "Statement": {}}, "Version"),
        ({"Statement": [{"Effect": "Permit", "Action": "ec2:*", "Resource": "*"}]}, "Effect"),
        ({"Statement": [{"Effect": "Allow", "Resource": "*"}]}, "exactly one of Action"),
        (
            {"Statement": [{"Effect": "Allow", "Action": "*", "NotAction": "*", "Resource": "*"}]},
            "exactly one of Action",
        ),
        ({"Statement": [{"Effect": "Allow", "Action": "ec2:*"}]}, "exactly one of Resource"),
        ({"Statement": [{"Effect": "Allow", "Action": "Start", "Resource": "*"}]}, "prefix"),
        (
            {"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*"}]},
            "Principal",
        ),
        (_tag_doc("NumericLessThan", "3"), "not supported"),
        (_tag_doc("ForAnyValue:StringEquals", "p"), "not supported"),
        (_tag_doc("StringEquals", "${aws:username}"), "policy variables"),
        (_tag_doc("StringEquals", []), "empty"),
    ],
)
def test_policies_it_cannot_judge_faithfully_are_refused(document: Any, fragment: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(fragment)):
        Policy(document)


def test_adapting_a_placeholder_policy() -> None:
    template = fallback_policy("${pool}")
    template["Statement"][1]["Resource"] = "arn:aws:ec2:REGION:ACCOUNT_ID:instance/*"
    doc, pool, notes = adapt_documented_policy(template)
    assert pool == FALLBACK_POOL
    assert doc["Statement"][1]["Resource"] == f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/*"
    assert len(notes) == 3
    concrete, pool, notes = adapt_documented_policy(fallback_policy("bld-linux64"))
    assert (pool, notes) == ("bld-linux64", [])
    assert concrete == fallback_policy("bld-linux64")


# ---------------------------------------------------------------------------------------------
# The region over HTTP


@dataclass
class PolicedRegion:
    region: SandboxRegion
    put: PolicyUnderTest
    client: Any
    pool_ids: list[str]
    other_pool: str  # stopped, tagged for a pool the policy does not grant
    other_running: str  # running, same tag
    untagged: str  # stopped, in the pool's VPC, without the pool tag

    def state(self, instance_id: str) -> str:
        return self.region.instance_state(instance_id)


def _client(endpoint_url: str, appid: str, secret: str = "testing") -> Any:
    assert endpoint_url.startswith("http://127.0.0.1:")
    return boto3.client(
        "ec2",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key=secret,
        config=Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            user_agent_appid=appid,
            connect_timeout=2,
            read_timeout=10,
        ),
    )


@pytest.fixture
def policed(policy_under_test: PolicyUnderTest) -> Iterator[PolicedRegion]:
    with SandboxRegion(pending_seconds=0.3, stopping_seconds=0.3) as region:
        pool = region.create_pool(policy_under_test.pool, 2)
        other = region.create_pool(OTHER_POOL, 1)
        vpc = pool.vpc_id
        other_running = region.create_instance(
            "other-running", vpc_id=vpc, pool_tag=OTHER_POOL, state="running"
        )
        untagged = region.create_instance("untagged-001", vpc_id=vpc)
        region.set_iam_policy(policy_under_test.document)
        yield PolicedRegion(
            region,
            policy_under_test,
            _client(region.endpoint_url, "iam-test"),
            list(pool.instances.values()),
            next(iter(other.instances.values())),
            other_running,
            untagged,
        )


def _refused(fn: Any, **kwargs: Any) -> botocore.exceptions.ClientError:
    with pytest.raises(botocore.exceptions.ClientError) as info:
        fn(**kwargs)
    return info.value


def _assert_unauthorized(err: botocore.exceptions.ClientError, action: str) -> None:
    assert err.response["Error"]["Code"] == "UnauthorizedOperation", err.response
    assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    message = err.response["Error"]["Message"]
    assert f"ec2:{action}" in message and "Encoded authorization failure message" in message


def test_describe_is_allowed(policed: PolicedRegion) -> None:
    reservations = policed.client.describe_instances()["Reservations"]
    seen = {i["InstanceId"] for r in reservations for i in r["Instances"]}
    assert {*policed.pool_ids, policed.untagged, policed.other_pool} <= seen
    # naming an instance the policy would not let us start is still just a description
    one = policed.client.describe_instances(InstanceIds=[policed.untagged])["Reservations"]
    assert one[0]["Instances"][0]["InstanceId"] == policed.untagged


def test_start_and_stop_of_pool_instances_are_allowed(policed: PolicedRegion) -> None:
    ec2, ids = policed.client, policed.pool_ids
    started = ec2.start_instances(InstanceIds=ids)["StartingInstances"]
    assert {s["InstanceId"] for s in started} == set(ids)
    for instance_id in ids:
        policed.region.wait_for_state(instance_id, "running", timeout=10)
    ec2.stop_instances(InstanceIds=ids, Hibernate=True)
    for instance_id in ids:
        policed.region.wait_for_state(instance_id, "stopped", timeout=10)
    outcomes = [
        (c.action, c.outcome) for c in policed.region.calls() if not c.action.startswith("Describe")
    ]
    assert outcomes == [("StartInstances", "ok"), ("StopInstances", "ok")]


def test_start_or_stop_of_other_instances_is_refused(policed: PolicedRegion) -> None:
    ec2, region = policed.client, policed.region
    for instance_id in (policed.untagged, policed.other_pool):
        err = _refused(ec2.start_instances, InstanceIds=[instance_id])
        _assert_unauthorized(err, "StartInstances")
        assert instance_arn(REGION, ACCOUNT, instance_id) in err.response["Error"]["Message"]
        assert policed.state(instance_id) == "stopped"
    err = _refused(ec2.stop_instances, InstanceIds=[policed.other_running])
    _assert_unauthorized(err, "StopInstances")
    assert policed.state(policed.other_running) == "running"
    # an id the region does not know has no tags either
    err = _refused(ec2.start_instances, InstanceIds=["i-0123456789abcdef0"])
    _assert_unauthorized(err, "StartInstances")
    assert [c.outcome for c in region.calls()] == ["UnauthorizedOperation"] * 4


def test_one_forbidden_instance_fails_the_whole_call(policed: PolicedRegion) -> None:
    batch = [policed.pool_ids[0], policed.untagged, policed.pool_ids[1]]
    err = _refused(policed.client.start_instances, InstanceIds=batch)
    _assert_unauthorized(err, "StartInstances")
    assert instance_arn(REGION, ACCOUNT, policed.untagged) in err.response["Error"]["Message"]
    assert [policed.state(i) for i in batch] == ["stopped"] * 3
    (record,) = policed.region.calls()
    assert (record.instance_ids, record.outcome) == (tuple(batch), "UnauthorizedOperation")


def test_run_and_terminate_are_refused(policed: PolicedRegion) -> None:
    ec2, region = policed.client, policed.region
    before = {v.instance_id: v.state for v in region.instance_views()}
    subnet = ec2.describe_instances(InstanceIds=[policed.pool_ids[0]])["Reservations"][0][
        "Instances"
    ][0]["SubnetId"]
    err = _refused(
        ec2.run_instances,
        ImageId="ami-12c6146b",
        MinCount=1,
        MaxCount=1,
        InstanceType="m5.large",
        SubnetId=subnet,
    )
    _assert_unauthorized(err, "RunInstances")
    for ids in ([policed.pool_ids[0]], [policed.other_running], policed.pool_ids):
        _assert_unauthorized(
            _refused(ec2.terminate_instances, InstanceIds=ids), "TerminateInstances"
        )
    # nothing created, nothing terminated
    assert {v.instance_id: v.state for v in region.instance_views()} == before


def test_dry_run_answers_like_ec2(policed: PolicedRegion) -> None:
    ec2 = policed.client

    def dry(fn: Any, **kwargs: Any) -> tuple[str, int]:
        err = _refused(fn, DryRun=True, **kwargs)
        return err.response["Error"]["Code"], err.response["ResponseMetadata"]["HTTPStatusCode"]

    allowed = ("DryRunOperation", 412)
    refused = ("UnauthorizedOperation", 403)
    assert dry(ec2.describe_instances) == allowed
    assert dry(ec2.start_instances, InstanceIds=policed.pool_ids) == allowed
    assert dry(ec2.stop_instances, InstanceIds=policed.pool_ids, Hibernate=True) == allowed
    assert dry(ec2.start_instances, InstanceIds=[policed.untagged]) == refused
    assert dry(ec2.start_instances, InstanceIds=[policed.pool_ids[0], policed.untagged]) == refused
    assert dry(ec2.stop_instances, InstanceIds=[policed.other_running]) == refused
    assert dry(ec2.terminate_instances, InstanceIds=policed.pool_ids) == refused
    assert [policed.state(i) for i in policed.pool_ids] == ["stopped", "stopped"]
    assert policed.state(policed.other_running) == "running"


def test_the_plugins_dry_run_vetting_sees_the_tag_boundary(
    policed: PolicedRegion,
    reactor_thread: Any,  # noqa: F811
) -> None:
    settings = AWSSettings(
        region=REGION,
        endpoint_url=policed.region.endpoint_url,
        access_key_id="testing",
        secret_access_key="testing",
        connect_timeout=2.0,
        read_timeout=10.0,
    )
    client = EC2Client(settings, reactor_thread, backoff_base=0.005, backoff_cap=0.05)
    try:
        ids = [*policed.pool_ids, policed.untagged, policed.other_pool]
        verdicts = call(client.dry_run_start_stop, ids)
    finally:
        call(client.close)
    assert verdicts == {
        policed.pool_ids[0]: "allowed",
        policed.pool_ids[1]: "allowed",
        policed.untagged: "unauthorized",
        policed.other_pool: "unauthorized",
    }


def test_no_policy_allows_everything_as_before(policed: PolicedRegion) -> None:
    region, ec2 = policed.region, policed.client
    _refused(ec2.start_instances, InstanceIds=[policed.untagged])
    region.set_iam_policy(None)
    err = _refused(ec2.terminate_instances, InstanceIds=[policed.untagged], DryRun=True)
    assert err.response["Error"]["Code"] == "DryRunOperation"
    ec2.start_instances(InstanceIds=[policed.untagged])
    region.wait_for_state(policed.untagged, "running", timeout=10)


def test_a_policy_the_evaluator_cannot_judge_is_refused_and_the_old_one_stays(
    policed: PolicedRegion,
) -> None:
    with pytest.raises(PolicyError):
        policed.region.set_iam_policy(_tag_doc("DateLessThan", "2030-01-01T00:00:00Z"))
    _assert_unauthorized(
        _refused(policed.client.start_instances, InstanceIds=[policed.untagged]), "StartInstances"
    )


# ---------------------------------------------------------------------------------------------
# End to end: the plugin under exactly the documented policy


def test_plugin_works_under_the_documented_policy_and_a_forbidden_call_is_refused(
    make_lab: Any, policy_under_test: PolicyUnderTest
) -> None:
    print(f"\nIAM policy under test: {policy_under_test.describe()}")
    pool = policy_under_test.pool
    lab = make_lab(
        LabSpec(
            pools=[PoolSpec(name=pool, size=3, overflow_after=0, idle_timeout=3)],
            inhouse_workers=1,
            builders=[BuilderSpec("b2g_build", pool=pool)],
            extra_instances=[
                {"name": "untagged-001", "pool": pool},
                {"name": "other-001", "pool": pool, "pool_tag": OTHER_POOL},
            ],
        )
    )
    region = lab.region
    region.set_iam_policy(policy_under_test.document)
    policed_since = time.time()
    policy = policy_under_test.policy

    wait_for(lambda: lab.rest.worker_connected("inhouse-1"), 60, what="in-house worker connected")
    brids = lab.force("b2g_build", duration=3, count=3)
    reqs = lab.wait_requests_complete(brids, timeout=120)
    assert [r["results"] for r in reqs] == [SUCCESS] * 3
    names = lab.worker_name_by_id()
    used = [names[b["workerid"]] for b in lab.builds_for(brids)]
    assert sum(1 for w in used if w in lab.pool_workers(pool)) >= 2, used

    def suspended() -> bool:
        refused = [c for c in region.calls() if c.outcome == "UnauthorizedOperation"]
        assert not refused, f"the documented policy refused the plugin: {refused}"
        return not lab.running_instances()

    wait_for(suspended, 60, what="revived instances suspended")

    calls = region.calls()
    tags = {v.instance_id: v.tags for v in region.instance_views()}
    starts = [c for c in calls if c.action == "StartInstances"]
    stops = [c for c in calls if c.action == "StopInstances"]
    assert starts and all(c.outcome == "ok" for c in starts), starts
    assert stops and all(c.outcome == "ok" for c in stops), stops
    # every start and stop was judged live against the policy...
    assert all(c.time >= policed_since for c in starts + stops)
    # ...nothing the plugin sent was refused, and what it sent before the policy was set (a
    # start-up DescribeInstances) is something the policy allows too
    assert [c for c in calls if c.outcome == "UnauthorizedOperation"] == []
    for c in calls:
        named = {i: tags.get(i) for i in c.instance_ids}
        denial = policy.authorize(c.action, region=REGION, account_id=ACCOUNT, instances=named)
        assert denial is None, (c, denial.message)
    assert lab.forbidden_calls() == []

    # The same credentials, used by someone else, cannot step outside the policy.
    intruder = _client(region.endpoint_url, INTRUDER, secret=AWS_SECRET)
    pool_instance = lab.instance_id(lab.pool_workers(pool)[0])
    untagged = lab.extras["untagged-001"][0]
    other = lab.extras["other-001"][0]
    before = {v.instance_id: v.state for v in region.instance_views()}
    attempts = [
        ("TerminateInstances", intruder.terminate_instances, {"InstanceIds": [pool_instance]}),
        ("StartInstances", intruder.start_instances, {"InstanceIds": [untagged]}),
        ("StartInstances", intruder.start_instances, {"InstanceIds": [other]}),
        ("StopInstances", intruder.stop_instances, {"InstanceIds": [untagged, pool_instance]}),
    ]
    for action, fn, kwargs in attempts:
        _assert_unauthorized(_refused(fn, **kwargs), action)
    # the credentials themselves work: a dry-run start of a pool instance would succeed
    dry = _refused(intruder.start_instances, InstanceIds=[pool_instance], DryRun=True)
    assert dry.response["Error"]["Code"] == "DryRunOperation"
    after = {v.instance_id: v.state for v in region.instance_views()}
    assert after == before
    assert before[pool_instance] == "stopped" and before[untagged] == "stopped"
    tried = [(c.action, c.outcome) for c in region.calls() if c.client == INTRUDER]
    assert tried == [(a, "UnauthorizedOperation") for a, _, _ in attempts] + [
        ("StartInstances", "DryRunOperation")
    ]

    # The suite-wide safety check (conftest) judges the plugin's calls: it must not blame the
    # plugin for what the intruder just tried. The plugin's record was checked above; what it
    # does from here on (its shutdown) is still checked there.
    region.clear_calls()
