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
    # the whole of Buildbot. An AttributeError raised while importing would be reported by Python
    # as "cannot import name": surface it as the import failure it is.
    if name not in ("EC2Pool", "EC2PoolWorker"):
        raise AttributeError(name)
    try:
        if name == "EC2Pool":
            from buildbot_ec2_hybrid.pool import EC2Pool as found
        else:
            from buildbot_ec2_hybrid.worker import EC2PoolWorker as found
    except AttributeError as e:
        raise ImportError(f"buildbot_ec2_hybrid.{name} failed to import: {e}") from e
    return found
