"""Overflow a Buildbot farm onto a pool of pre-created, stopped EC2 instances.

Public API (see README.rst)::

    from buildbot_ec2_hybrid import EC2Pool
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["EC2Pool", "EC2PoolWorker", "__version__"]

if TYPE_CHECKING:
    from buildbot_ec2_hybrid.pool import EC2Pool
    from buildbot_ec2_hybrid.worker import EC2PoolWorker


def __getattr__(name: str):
    # Lazy so that `import buildbot_ec2_hybrid.policy` (simulator, benchmarks) does not pull in
    # the whole of Buildbot.
    if name == "EC2Pool":
        from buildbot_ec2_hybrid.pool import EC2Pool

        return EC2Pool
    if name == "EC2PoolWorker":
        from buildbot_ec2_hybrid.worker import EC2PoolWorker

        return EC2PoolWorker
    raise AttributeError(name)
