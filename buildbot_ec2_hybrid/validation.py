"""Argument checks shared by EC2Pool and EC2PoolWorker.

Each check reports through ``error(message)`` (which prefixes the pool or worker and calls
Buildbot's ``config.error``), so one wrong master.cfg gets every problem at once, each naming the
argument and what to write instead. Values of credential arguments are never echoed: they may be
secrets typed into master.cfg.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

Report = Callable[[str], None]

VPC_ID_RE = re.compile(r"^vpc-[0-9a-f]{8}([0-9a-f]{9})?$")
INSTANCE_ID_RE = re.compile(r"^i-[0-9a-f]{8}([0-9a-f]{9})?$")
REGION_RE = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d$")
ADDRESS_RE = re.compile(r"^[A-Za-z0-9_.:\[\]-]+:\d{1,5}$")


def unknown_arguments(error: Report, given: Iterable[str], known: Iterable[str]) -> None:
    """A typo'd keyword gets "did you mean ...?" instead of a Python TypeError."""
    known = sorted(known)
    for arg in sorted(given):
        close = difflib.get_close_matches(arg, known, n=1)
        hint = f"did you mean {close[0]}?" if close else f"the arguments are {', '.join(known)}"
        error(f"unknown argument {arg}: {hint}")


def check_region(error: Report, region: Any, whose: str) -> None:
    if region is None:
        error(f"region is missing: give the AWS region of {whose}, e.g. region='us-west-2'")
    elif not isinstance(region, str) or not REGION_RE.match(region):
        error(
            f"region={region!r} is not an AWS region name: give one like region='us-west-2' "
            "(a region, not an availability zone such as 'us-west-2a')"
        )


def check_vpc(error: Report, vpc_id: Any, whose: str) -> None:
    if vpc_id is None:
        error(
            f"vpc_id is missing: give the id of {whose} private VPC, e.g. "
            "vpc_id='vpc-0123abcd'; instances outside it are never started"
        )
    elif not isinstance(vpc_id, str) or not VPC_ID_RE.match(vpc_id):
        error(
            f"vpc_id={vpc_id!r} is not a VPC id: give 'vpc-' followed by 8 or 17 lowercase "
            "hex digits, e.g. vpc_id='vpc-0123abcd'"
        )


def check_seconds(
    error: Report,
    field: str,
    value: Any,
    *,
    allow_zero: bool = False,
    most: float,
    example: float | None = None,
) -> None:
    # NaN and infinity fail the chained comparison as well
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= most
    if ok and value == 0 and not allow_zero:
        ok = False
    if not ok:
        low = "0 or more" if allow_zero else "more than 0"
        hint = f", e.g. {field}={example:g}" if example is not None else ""
        error(f"{field}={value!r}: give a number of seconds, {low} and at most {most:.0f}{hint}")


def check_flags(error: Report, **flags: Any) -> None:
    for field, flag in flags.items():
        if not isinstance(flag, bool):
            error(f"{field}={flag!r}: give True or False")


def check_aws_access(
    error: Report,
    *,
    endpoint_url: Any,
    aws_profile: Any,
    aws_access_key_id: Any,
    aws_secret_access_key: Any,
) -> None:
    """Endpoint and credentials: one way of signing in, complete, and the secret as a secret."""
    if endpoint_url is not None and (
        not isinstance(endpoint_url, str) or not endpoint_url.startswith(("http://", "https://"))
    ):
        error(
            f"endpoint_url={endpoint_url!r}: give a full URL such as "
            "'https://ec2.us-west-2.amazonaws.com', or leave it out to use the region's own"
        )
    if aws_access_key_id is not None and not isinstance(aws_access_key_id, str):
        error(
            "aws_access_key_id must be a plain string (the key id is not secret); give the "
            "secret key as aws_secret_access_key=util.Secret('...')"
        )
    if (aws_access_key_id is None) != (aws_secret_access_key is None):
        missing = "aws_secret_access_key" if aws_access_key_id else "aws_access_key_id"
        error(
            f"{missing} is missing: give both aws_access_key_id and aws_secret_access_key "
            "(the secret as util.Secret('...')), or neither to use boto3's credential chain "
            "or aws_profile"
        )
    if aws_profile is not None:
        if not isinstance(aws_profile, str) or not aws_profile:
            error("aws_profile: give the name of a profile in ~/.aws/config, or leave it out")
        elif aws_access_key_id is not None:
            error(
                "aws_profile and aws_access_key_id are both given: keep one way of signing "
                "in to AWS, remove the other"
            )


def check_instance_id(
    error: Report, field: str, value: Any, *, alternative: str = "", keyword: bool = True
) -> bool:
    if isinstance(value, str) and INSTANCE_ID_RE.match(value):
        return True
    example = f"{field}='i-0123456789abcdef0'" if keyword else "'i-0123456789abcdef0'"
    error(
        f"{field}={value!r} is not an instance id: give 'i-' followed by 8 or 17 hex digits, "
        f"e.g. {example}{alternative}"
    )
    return False


def check_address(error: Report, field: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not ADDRESS_RE.match(value)):
        error(
            f"{field}={value!r}: give the host:port the instances' workers connect to "
            "(this master's PB port over the VPN), e.g. master_address='10.0.0.5:9989'"
        )


def check_prices(error: Report, prices: Any) -> None:
    if prices is None:
        return
    if not isinstance(prices, dict):
        error("instance_prices must map instance types to USD per hour, e.g. "
              "instance_prices={'c5.4xlarge': 0.68}")
        return
    for kind, price in prices.items():
        if (
            not isinstance(kind, str)
            or isinstance(price, bool)
            or not isinstance(price, (int, float))
            or not 0 <= price < 1000
        ):
            error(f"instance_prices[{kind!r}]={price!r}: give USD per hour as a number, "
                  "e.g. 0.68")
