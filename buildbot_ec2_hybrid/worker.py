"""The latent worker for one pre-created EC2 instance: revive it, suspend it, nothing else.

``start_instance`` revives the instance (StartInstances), ``stop_instance`` suspends it
(StopInstances, with Hibernate where the instance supports it and it was asked for). The worker
never creates or terminates instances and refuses to touch one that is outside its VPC, has a
public IPv4 address, lacks the pool tag, or whose Name is ambiguous.

Used on its own, it behaves like any Buildbot latent worker (a build request binds it and waits for
the boot). Managed by an :class:`~buildbot_ec2_hybrid.pool.EC2Pool`, it never binds a request while
cold: only the pool revives it, and the first free worker takes the request.
"""

from __future__ import annotations

import inspect
import time
from typing import TYPE_CHECKING
from typing import Any

from buildbot import config
from buildbot.interfaces import LatentWorkerFailedToSubstantiate
from buildbot.worker.latent import AbstractLatentWorker
from buildbot.worker.latent import States
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.python import log

from buildbot_ec2_hybrid import ec2
from buildbot_ec2_hybrid import validation

if TYPE_CHECKING:
    from buildbot_ec2_hybrid.pool import EC2Pool

POOL_TAG = "buildbot-ec2-hybrid:pool"
MASTER_TAG = "buildbot-ec2-hybrid:master"


#: states from which an instance can be revived, adopted or waited out
_LIVE_STATES = {"pending", "running"}
_GONE_STATES = {"shutting-down", "terminated"}

DEFAULT_BOOT_TIMEOUT = 600.0
#: starts and stops asked for within this many seconds go out in one EC2 call
BATCH_WINDOW = 0.05


class InstanceRefused(LatentWorkerFailedToSubstantiate):
    """The instance behind a worker may not be touched; the message says why and what to do."""

    def __init__(self, worker: str, instance_id: str | None, reason: str) -> None:
        self.worker = worker
        self.instance_id = instance_id
        self.reason = reason
        super().__init__(worker, reason)

    def __str__(self) -> str:
        where = f" (instance {self.instance_id})" if self.instance_id else ""
        return f"worker {self.worker}{where} refused: {self.reason}"


def check_instance(
    info: ec2.InstanceInfo, *, worker: str, vpc_id: str, pool: str | None, pool_tag: str = POOL_TAG
) -> None:
    """Raise InstanceRefused unless the plugin may start and stop this instance."""
    iid = info.instance_id
    if info.vpc_id != vpc_id:
        raise InstanceRefused(
            worker, iid, f"it is in VPC {info.vpc_id or '(none)'}, not in the pool's VPC {vpc_id}"
        )
    if info.public_ip:
        raise InstanceRefused(
            worker,
            iid,
            f"it has the public IPv4 address {info.public_ip}; pool instances must live in a "
            "private subnet reachable only over the VPN",
        )
    found = info.tags.get(pool_tag)
    if found is None or (pool is not None and found != pool):
        # a worker without a pool still needs the tag: the plugin only ever acts on instances an
        # operator has marked for it
        have = f"its {pool_tag} tag is {found!r}" if found else f"it has no {pool_tag} tag"
        want = pool if pool is not None else "<pool name>"
        raise InstanceRefused(
            worker, iid, f"{have}; tag it {pool_tag}={want} to put it in the pool"
        )
    if info.state in _GONE_STATES:
        raise InstanceRefused(
            worker, iid, f"it is {info.state}; the plugin never creates instances"
        )


class UsesEC2:
    """Holds one reference to the master's shared EC2 client for its ``aws`` settings, so that
    every pool and worker with the same settings shares one batcher and one state poller."""

    aws: ec2.AWSSettings
    master: Any
    _poll_interval: float = 2.0
    _client: ec2.EC2Client | None = None

    @property
    def client(self) -> ec2.EC2Client:
        if self._client is None:
            self._client = ec2.EC2Client.shared(
                self.aws,
                self.master.reactor,
                poll_interval=self._poll_interval,
                batch_window=BATCH_WINDOW,
            )
        return self._client

    def _release_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


class EC2PoolWorker(UsesEC2, AbstractLatentWorker):
    """A latent worker backed by one existing EC2 instance, found by its Name tag (or id)."""

    # secrets in kwargs that BuildbotService renders
    secrets = ("aws_secret_access_key",)

    pool: EC2Pool | None = None
    instance: ec2.InstanceInfo | None = None

    def checkConfig(  # type: ignore[override]
        self,
        name: str,
        password: Any = None,
        *,
        vpc_id: str | None = None,
        region: str | None = None,
        pool: str | None = None,
        instance_id: str | None = None,
        endpoint_url: str | None = None,
        aws_profile: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: Any = None,
        hibernate: bool = False,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        poll_interval: float = 2.0,
        check_peer_address: bool = True,
        pool_managed: bool = False,
        **kwargs: Any,
    ) -> None:
        # password, vpc_id and region default to None here only so that leaving one out is
        # reported with its fix rather than as a TypeError.
        where = f"EC2PoolWorker {name!r}"

        def error(msg: str) -> None:
            config.error(f"{where}: {msg}")

        base: set[str] = set()
        for klass in AbstractLatentWorker.__mro__:
            method = klass.__dict__.get("checkConfig")
            if method is not None:
                base.update(inspect.signature(method).parameters)
        base -= {"self", "args", "kwargs", "name", "password"}
        unknown = set(kwargs) - base
        own = set(inspect.signature(self.checkConfig).parameters)
        validation.unknown_arguments(error, unknown, (base | own) - {"kwargs"})
        for arg in unknown:
            del kwargs[arg]
        if password is None or password == "":
            error(
                "password is missing: give it after the name, e.g. EC2PoolWorker("
                f"{name!r}, util.Secret('ec2-worker-password'), ...)"
            )
        validation.check_vpc(error, vpc_id, "the instance's")
        validation.check_region(error, region, "the instance")
        if pool is not None and (not isinstance(pool, str) or not pool):
            error(
                f"pool={pool!r}: give the value of the instance's pool tag, e.g. pool='b2g-aws', "
                "or leave it out"
            )
        if instance_id is not None:
            validation.check_instance_id(
                error, "instance_id", instance_id,
                alternative=", or leave it out to find the instance by its Name tag",
            )
        validation.check_seconds(error, "boot_timeout", boot_timeout, most=86400, example=600)
        validation.check_seconds(error, "poll_interval", poll_interval, most=300, example=2)
        validation.check_flags(
            error, hibernate=hibernate, check_peer_address=check_peer_address,
            pool_managed=pool_managed,
        )
        validation.check_aws_access(
            error,
            endpoint_url=endpoint_url,
            aws_profile=aws_profile,
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
        )
        kwargs.setdefault("missing_timeout", boot_timeout)
        super().checkConfig(name, password, **kwargs)

    @defer.inlineCallbacks
    def reconfigService(  # type: ignore[override]
        self,
        name: str,
        password: Any,
        *,
        vpc_id: str,
        region: str,
        pool: str | None = None,
        instance_id: str | None = None,
        endpoint_url: str | None = None,
        aws_profile: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: Any = None,
        hibernate: bool = False,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        poll_interval: float = 2.0,
        check_peer_address: bool = True,
        pool_managed: bool = False,
        **kwargs: Any,
    ):
        self.vpc_id = vpc_id
        self.pool_name = pool
        self.configured_instance_id = instance_id
        self.hibernate = hibernate
        self.boot_timeout = boot_timeout
        self.check_peer_address = check_peer_address
        self.pool_managed = pool_managed
        self.aws = ec2.AWSSettings(
            region=region,
            endpoint_url=endpoint_url,
            profile=aws_profile,
            access_key_id=aws_access_key_id,
            secret_access_key=aws_secret_access_key,
        )
        self._poll_interval = poll_interval
        self._release_client()
        if pool_managed:
            # The pool owns idle stops; Buildbot's own timer only arms after a build and would
            # fight the pool's decisions.
            kwargs["build_wait_timeout"] = 10 * 365 * 24 * 3600
        kwargs.setdefault("missing_timeout", boot_timeout)
        #: time the worker last became idle (connected with no build), for the pool's policy
        self.idle_since: float | None = None
        #: builder the worker last ran a build for (warm disk)
        self.last_builder: str | None = None
        #: set by the pool while it suspends the worker so no build starts under the stop
        self.draining = False
        #: set while start_instance found the instance already running (adopted, not started)
        self.adopted = False
        #: when the instance was last revived or adopted, until it is stopped (instance-hours)
        self.running_since: float | None = None
        res = yield super().reconfigService(name, password, **kwargs)
        return res

    # -- AWS plumbing -------------------------------------------------------------------------

    @defer.inlineCallbacks
    def stopService(self):
        # the base class suspends a running instance first, which needs the client
        yield super().stopService()
        self._release_client()

    def _log(self, msg: str) -> None:
        prefix = f"ec2-hybrid[{self.pool_name}]" if self.pool_name else "ec2-hybrid"
        log.msg(f"{prefix}: worker {self.name}: {msg}")

    @defer.inlineCallbacks
    def resolve_instance(self, fresh: bool = True):
        """Find and vet this worker's instance; raise InstanceRefused if it may not be used."""
        info = None
        if not fresh and self.pool is not None:
            info = self.pool.known_instance(self.name)
        if info is None:
            if self.configured_instance_id:
                found = yield self.client.describe(instance_ids=[self.configured_instance_id])
            else:
                # by Name across the region, not only in the VPC: an instance that sits in the
                # wrong VPC is then refused with that reason rather than "not found"
                found = yield self.client.describe(
                    filters=[{"Name": "tag:Name", "Values": [self.name]}]
                )
            info = self.pick_instance(found)
        check_instance(info, worker=self.name, vpc_id=self.vpc_id, pool=self.pool_name)
        self.instance = info
        return info

    def pick_instance(self, found: list[ec2.InstanceInfo]) -> ec2.InstanceInfo:
        candidates = [i for i in found if i.state not in _GONE_STATES] or list(found)
        in_vpc = [i for i in candidates if i.vpc_id == self.vpc_id]
        if in_vpc:
            candidates = in_vpc
        if not candidates:
            raise InstanceRefused(
                self.name,
                self.configured_instance_id,
                f"no instance named {self.name!r}; create the instance in VPC {self.vpc_id} "
                f"with the tag Name={self.name} (the plugin never creates instances)",
            )
        if len(candidates) > 1:
            ids = ", ".join(sorted(i.instance_id for i in candidates))
            raise InstanceRefused(
                self.name,
                None,
                f"the Name {self.name!r} matches {len(candidates)} instances ({ids}); "
                "give each pool instance a unique Name or set instance_id",
            )
        return candidates[0]

    # -- latent worker interface ------------------------------------------------------------

    @defer.inlineCallbacks
    def start_instance(self, build):
        self.adopted = False
        info = yield self.resolve_instance(fresh=self.pool is None)
        iid = info.instance_id
        if info.state == "stopping":
            self._log(f"instance {iid} is stopping; waiting for it to stop before reviving it")
            info = yield self.client.wait_for_state(iid, {"stopped"}, self.boot_timeout)
        if info.state in _LIVE_STATES:
            self.adopted = True
            self._log(f"adopting instance {iid}, already {info.state}")
        else:
            self._log(f"reviving instance {iid} ({info.instance_type}, {info.availability_zone})")
            try:
                yield self.client.start_instance(iid)
            except ec2.IncorrectState:
                # it moved under us (another actor stopped it, or it is still stopping): look
                # again, wait it out, and try once more
                info = yield self.resolve_instance(fresh=True)
                if info.state == "stopping":
                    yield self.client.wait_for_state(iid, {"stopped"}, self.boot_timeout)
                if info.state not in _LIVE_STATES:
                    yield self.client.start_instance(iid)
        if self.running_since is None:
            self.running_since = self.master.reactor.seconds()
        info = yield self.client.wait_for_state(iid, {"running"}, self.boot_timeout)
        self.instance = info
        self._log(f"instance {iid} is running at {info.private_ip}; waiting for the worker")
        return True

    @defer.inlineCallbacks
    def stop_instance(self, fast=False):
        info = self.instance
        if info is None:
            return True
        iid = info.instance_id
        hibernate = bool(self.hibernate and info.hibernation_configured)
        latest = self.client.latest(iid)
        if latest is not None and not self._still_ours(latest):
            # the operator moved it out of the pool (tag removed, other VPC) while it ran: it is
            # theirs now, and the plugin never touches an instance outside its pool
            self._log(f"not stopping instance {iid}: it is no longer a tagged pool instance")
            self._close_stay()
            return True
        verb = "hibernating" if hibernate else "stopping"
        self._log(f"{verb} instance {iid}")
        try:
            try:
                yield self.client.stop_instance(iid, hibernate=hibernate)
            except ec2.HibernationUnsupported:
                # AWS refused the hibernation (not configured, or the instance cannot hibernate
                # right now): a plain stop still suspends it
                self._log(f"instance {iid} cannot hibernate now; stopping it instead")
                yield self.client.stop_instance(iid, hibernate=False)
        except ec2.IncorrectState:
            current = yield self.client.describe(instance_ids=[iid])
            state = current[0].state if current else "unknown"
            if state == "pending":
                # AWS refuses to stop a pending instance: wait for it to run, then stop it
                yield self.client.wait_for_state(iid, {"running"}, self.boot_timeout)
                yield self.client.stop_instance(iid, hibernate=False)
            elif state not in ("stopping", "stopped"):
                raise
        if not fast:
            yield self.client.wait_for_state(iid, {"stopped"}, self.boot_timeout)
            self._log(f"instance {iid} is stopped")
        self._close_stay()
        if self.pool is not None:
            self.pool.instance_stopped(self)
        return True

    def _still_ours(self, info: ec2.InstanceInfo) -> bool:
        if info.vpc_id is not None and info.vpc_id != self.vpc_id:
            return False
        return POOL_TAG in info.tags if self.pool_name is None else (
            info.tags.get(POOL_TAG) == self.pool_name
        )

    def _close_stay(self) -> None:
        if self.running_since is None:
            return
        start, self.running_since = self.running_since, None
        if self.pool is not None and self.instance is not None:
            self.pool.usage.record(
                self.name, self.instance.instance_type, start, self.master.reactor.seconds()
            )

    def check_instance(self):
        # called while waiting for the worker to connect: an instance that stopped again (an
        # interruption, someone else's stop) will never connect, so fail the substantiation now
        if self.instance is None:
            return (True, "")
        latest = self.client.latest(self.instance.instance_id)
        if latest is not None and latest.state not in _LIVE_STATES:
            return (False, f"instance {latest.instance_id} is {latest.state}")
        return (True, "")

    # -- connections --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def attached(self, conn):
        # Stock latent workers reject an unexpected connection with a RuntimeError that makes the
        # remote worker stop its reactor; UnauthorizedLogin makes it retry later instead, which is
        # what an instance the pool will adopt in a moment needs.
        if self.state != States.SUBSTANTIATING_STARTING:
            self._log(f"connection refused: not reviving or adopting it (state {self.state.name})")
            raise UnauthorizedLogin()
        if self.check_peer_address and self.instance is not None and self.instance.private_ip:
            peer = _peer_host(conn)
            if peer is not None and peer != self.instance.private_ip:
                self._log(
                    f"connection from {peer} refused: instance {self.instance.instance_id} "
                    f"has private IP {self.instance.private_ip}"
                )
                raise UnauthorizedLogin()
        yield super().attached(conn)
        if self.conn is None:
            return
        self.idle_since = self.master.reactor.seconds()
        yield self._publish_instance_info(conn)
        if self.pool is not None:
            self.pool.worker_changed(self)

    @defer.inlineCallbacks
    def _publish_instance_info(self, conn):
        info = self.instance
        if info is None or self.workerid is None:
            return
        workerinfo = {
            "admin": conn.info.get("admin"),
            "host": conn.info.get("host"),
            "access_uri": conn.info.get("access_uri"),
            "version": conn.info.get("version"),
            "ec2_instance_id": info.instance_id,
            "ec2_instance_type": info.instance_type,
            "ec2_availability_zone": info.availability_zone,
            "ec2_private_ip": info.private_ip,
            "ec2_pool": self.pool_name,
            "ec2_adopted": self.adopted,
        }
        for key in ("ec2_instance_id", "ec2_instance_type", "ec2_availability_zone",
                    "ec2_private_ip", "ec2_pool"):
            self.info.setProperty(key, workerinfo[key], "EC2")
        yield self.master.data.updates.workerConnected(
            workerid=self.workerid, masterid=self.master.masterid, workerinfo=workerinfo
        )

    @defer.inlineCallbacks
    def detached(self):
        was_substantiated = self.state == States.SUBSTANTIATED
        yield super().detached()
        self.idle_since = None
        if self.pool_managed and was_substantiated and not self.draining:
            # The worker went away on its own (instance stopped behind our back, crash, network):
            # bring the latent state back to NOT_SUBSTANTIATED so it can be revived again, and
            # make sure the instance is not left running without a worker.
            self._log("worker disconnected unexpectedly; resetting so it can be revived")
            self._deferwaiter.add(self.insubstantiate())
        if self.pool is not None:
            self.pool.worker_changed(self)

    def canStartBuild(self):
        if self.pool_managed:
            # Cold or booting pool workers must not be chosen by the build request distributor:
            # the request would be bound to an instance that is still booting.
            if self.conn is None or self.draining:
                return False
            if self.pool is not None and self.name in self.pool.refused:
                return False
            if self.state not in (States.SUBSTANTIATED, States.SUBSTANTIATING_STARTING):
                return False
        return super().canStartBuild()

    def buildStarted(self, wfb):
        self.idle_since = None
        self.last_builder = wfb.builder_name
        super().buildStarted(wfb)
        if self.pool is not None:
            self.pool.worker_changed(self)

    def buildFinished(self, wfb):
        super().buildFinished(wfb)
        if not self.building:
            self.idle_since = self.master.reactor.seconds()
        if self.pool is not None:
            self.pool.worker_changed(self)

    @property
    def is_idle(self) -> bool:
        return self.conn is not None and not self.building

    def describe_state(self) -> dict[str, Any]:
        """A snapshot for status output and the pool page."""
        info = self.instance
        return {
            "name": self.name,
            "latent_state": self.state.name,
            "connected": self.conn is not None,
            "building": len(self.building),
            "instance_id": info.instance_id if info else None,
            "instance_state": info.state if info else None,
            "availability_zone": info.availability_zone if info else None,
            "idle_since": self.idle_since,
            "last_builder": self.last_builder,
            "wall_time": time.time(),
        }


def _peer_host(conn) -> str | None:
    try:
        peer = conn.get_peer()
    except Exception:
        return None
    # "127.0.0.1:54321" or "IPv4Address(...)" depending on the protocol
    if isinstance(peer, str):
        host = peer.rsplit(":", 1)[0]
        return host.strip("[]")
    return getattr(peer, "host", None)
