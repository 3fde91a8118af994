"""What the sandbox benchmarks share: a loopback-only environment and small statistics."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def loopback_only() -> None:
    """boto3 here and in every child process talks to the sandbox on 127.0.0.1 only."""
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-west-2")
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        os.environ.pop(proxy, None)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"


def workdir(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))


def percentile(values, q: float) -> float:
    from buildbot_ec2_hybrid.simulate import percentile as p

    return p(list(values), q)


def at_second_start(margin: float = 0.15) -> None:
    """Sleep until just after a wall-clock second turns: requests forced now share a
    submitted_at second (Buildbot keeps whole seconds)."""
    frac = time.time() % 1
    if frac > margin:
        time.sleep(1.02 - frac)


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
