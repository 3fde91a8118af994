"""A local stand-in for one AWS EC2 region: moto's EC2 API on loopback, plus the realism it lacks.

moto answers every EC2 call at once: an instance is ``running`` the moment StartInstances returns,
``Hibernate`` is accepted everywhere and nothing ever fails. A WSGI layer in front of moto adds:

* ``pending`` / ``stopping`` states that last a configurable time and then complete on their own
  (a ticker thread drives them, so they progress even when nobody calls the API);
* AWS's refusals: hibernating an instance not configured for it, starting a ``stopping`` or
  ``terminated`` instance, stopping a ``pending`` one; a batch with one bad id fails as a whole;
* injected faults: throttling, insufficient capacity, external interruptions, instances stuck in
  a transition, an endpoint that cannot be reached;
* a log of every EC2 call, and fixtures that build a private VPC with a pool of stopped instances.

Error codes follow AWS: ``RequestLimitExceeded`` (HTTP 400), ``IncorrectInstanceState`` (400),
``InsufficientInstanceCapacity`` (500, a server error in AWS's own classification, which is why
botocore retries it), and ``UnsupportedHibernationConfiguration`` (400), which is what EC2 returns
for ``StopInstances Hibernate=true`` on an instance that was not configured for hibernation at
launch.

Everything runs in this process, so tests and the instance agent read the state directly
(:meth:`SandboxRegion.instance_views`, :meth:`SandboxRegion.add_listener`); another process drives
the same faults over HTTP under ``/_sandbox/`` (see :class:`SandboxControl`).

moto keeps its backends in globals: :meth:`SandboxRegion.start` resets the EC2 backend of its
(account, region), so sequential sandboxes are independent; two sandboxes alive at the same time
need different ``account_id`` or ``region`` values.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import queue
import random
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from xml.sax.saxutils import escape

from moto.ec2.exceptions import InvalidSubnetConflictError
from moto.ec2.models import ec2_backends
from moto.moto_server.werkzeug_app import DomainDispatcherApplication
from moto.moto_server.werkzeug_app import MotoRequestHandler
from moto.moto_server.werkzeug_app import create_backend_app
from werkzeug.serving import BaseWSGIServer
from werkzeug.serving import make_server

from buildbot_ec2_hybrid.sandbox.iam import Policy

log = logging.getLogger(__name__)

POOL_TAG = "buildbot-ec2-hybrid:pool"
SETUP_CLIENT = "sandbox-setup"
CONTROL_PREFIX = "/_sandbox/"

STATE_CODES = {
    "pending": 0,
    "running": 16,
    "shutting-down": 32,
    "terminated": 48,
    "stopping": 64,
    "stopped": 80,
}
# A transitional state and the state it completes to.
_COMPLETES_TO = {"pending": "running", "stopping": "stopped"}

_EC2_XMLNS = "http://ec2.amazonaws.com/doc/2016-11-15/"
_INSTANCE_ID_KEY = re.compile(r"^InstanceId\.(\d+)$")
_RESOURCE_ID_KEY = re.compile(r"^ResourceId\.(\d+)$")
_APPID = re.compile(r"(?:^|\s)app/(\S+)")
_ERROR_CODE = re.compile(rb"<Code>([^<]+)</Code>")
# Parameter names that may carry a secret: the call log must never keep their values.
_SECRET_PARAM = re.compile(
    r"secret|password|passwd|credential|signature|securitytoken|sessiontoken|authtoken|"
    r"userdata|privatekey|accesskey"
)

Listener = Callable[[str, "str | None", str], None]


@dataclass(frozen=True)
class CallRecord:
    """One EC2 API call as the sandbox saw it."""

    time: float
    action: str
    instance_ids: tuple[str, ...]
    outcome: str  # "ok" or the AWS error code
    params: dict[str, str]
    client: str | None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["instance_ids"] = list(self.instance_ids)
        return data


@dataclass(frozen=True)
class InstanceView:
    """What the instance agent needs to know about one instance."""

    instance_id: str
    name: str | None
    state: str
    tags: dict[str, str]
    private_ip: str | None
    az: str | None
    hibernated_last_stop: bool
    state_since: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VpcFixture:
    vpc_id: str
    subnet_ids: dict[str, str]  # availability zone -> subnet id


@dataclass
class PoolFixture:
    pool: str
    vpc_id: str
    subnet_ids: dict[str, str]  # availability zone -> subnet id
    instances: dict[str, str]  # Name tag -> instance id, in creation order

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class SandboxError(Exception):
    """A misuse of the sandbox's own API (not an EC2 error)."""


@dataclass
class _Track:
    """What the sandbox remembers about an instance beyond moto's model."""

    state: str
    since: float
    hibernated_last_stop: bool = False
    # Set while a transitional state is scheduled to complete (time.monotonic()).
    due: float | None = None
    # How long the current transitional state lasts; kept so a stuck one can resume.
    duration: float = 0.0
    entered: float = field(default_factory=time.monotonic)


@dataclass
class _Throttle:
    rate: float
    actions: frozenset[str] | None
    until: float | None
    rng: random.Random


class _Reject(Exception):
    """An AWS-style error answer decided by the sandbox before moto sees the call."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message


class _Handler(MotoRequestHandler):
    """Lets the sandbox drop connections, and keeps werkzeug's per-request lines off stderr."""

    def run_wsgi(self) -> None:
        region: SandboxRegion = self.server.sandbox_region  # type: ignore[attr-defined]
        if region._drops(self.path):
            # A reset with no answer is what a client sees when the path to AWS breaks mid-call.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        super().run_wsgi()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class SandboxRegion:
    """One EC2 region on 127.0.0.1. See the module docstring."""

    def __init__(
        self,
        region: str = "us-west-2",
        port: int = 0,
        pending_seconds: float = 2.0,
        stopping_seconds: float = 2.0,
        hibernate_resume_seconds: float = 1.0,
        account_id: str = "123456789012",
    ) -> None:
        self.region = region
        self.account_id = account_id
        self.pending_seconds = pending_seconds
        self.stopping_seconds = stopping_seconds
        self.hibernate_resume_seconds = hibernate_resume_seconds
        self._requested_port = port
        self._port: int | None = None

        # One lock for moto's model and ours: moto is not written for concurrent requests, and
        # the ticker changes instance states under it too.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._tracks: dict[str, _Track] = {}
        self._calls: list[CallRecord] = []
        self._listeners: list[Listener] = []
        self._events: queue.Queue[tuple[str, str | None, str] | None] = queue.Queue()

        self._throttle: _Throttle | None = None
        self._capacity_ids: frozenset[str] = frozenset()
        self._capacity_azs: frozenset[str] = frozenset()
        self._stuck: dict[str, str] = {}
        self._unreachable: str | None = None  # None, "refuse" or "drop"
        self._reachable_timer: threading.Timer | None = None
        self._iam_policy: Policy | None = None

        self._app: DomainDispatcherApplication | None = None
        self._server: BaseWSGIServer | None = None
        self._server_thread: threading.Thread | None = None
        self._server_lock = threading.Lock()
        self._ticker: threading.Thread | None = None
        self._dispatcher: threading.Thread | None = None
        self._running = False
        self._default_vpc: VpcFixture | None = None
        self._vpc_counter = itertools.count(10)

    # ----------------------------------------------------------------------------------------
    # lifecycle

    def start(self) -> SandboxRegion:
        if self._running:
            raise SandboxError("sandbox region already started")
        env_account = os.environ.get("MOTO_ACCOUNT_ID")
        if env_account and env_account != self.account_id:
            # moto would route every request to that account, away from this sandbox.
            raise SandboxError(
                f"MOTO_ACCOUNT_ID={env_account} overrides the sandbox account {self.account_id}"
            )
        with self._lock:
            self._backend().reset()
            self._tracks.clear()
            self._calls.clear()
            self._default_vpc = None
            self._clear_faults_locked()
        self._app = DomainDispatcherApplication(create_backend_app)
        self._running = True
        self._listen(self._requested_port)
        self._ticker = threading.Thread(
            target=self._tick_loop, name=f"sandbox-{self.region}-ticker", daemon=True
        )
        self._ticker.start()
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name=f"sandbox-{self.region}-events", daemon=True
        )
        self._dispatcher.start()
        log.info("sandbox region %s listening on %s", self.region, self.endpoint_url)
        return self

    def stop(self) -> None:
        """Stop serving. moto's model stays readable until the next start() resets it."""
        if not self._running:
            return
        self._running = False
        self._cancel_reachable_timer()
        self._close_listener()
        with self._changed:
            self._changed.notify_all()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        self._events.put(None)
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=5)
        self._ticker = self._dispatcher = None

    def __enter__(self) -> SandboxRegion:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise SandboxError("sandbox region not started")
        return self._port

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _backend(self) -> Any:
        return ec2_backends[self.account_id][self.region]

    def _listen(self, port: int) -> None:
        with self._server_lock:
            if self._server is not None:
                return
            try:
                server = make_server(
                    "127.0.0.1", port, self._wsgi, threaded=True, request_handler=_Handler
                )
            except SystemExit as e:
                # werkzeug exits the process when it cannot bind; a library must not.
                raise OSError(f"cannot listen on 127.0.0.1:{port}") from e
            server.sandbox_region = self  # type: ignore[attr-defined]
            self._port = server.port
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"sandbox-{self.region}-http",
                daemon=True,
            )
            thread.start()
            self._server, self._server_thread = server, thread

    def _close_listener(self) -> None:
        with self._server_lock:
            server, thread = self._server, self._server_thread
            self._server = self._server_thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    # ----------------------------------------------------------------------------------------
    # fixtures

    def create_vpc(
        self,
        name: str = "sandbox-private",
        *,
        azs: Iterable[str] | None = None,
    ) -> VpcFixture:
        """A VPC with no internet gateway and one private subnet per availability zone
        (default: the region's zones a, b and c)."""
        with self._lock:
            fixture = self._create_vpc_locked(name, self._zones(azs))
            self._sync_locked()
            return fixture

    def create_pool(
        self,
        pool: str,
        count: int,
        *,
        name_format: str = "{pool}-{i:03d}",
        instance_type: str = "m5.large",
        hibernation: bool = True,
        azs: Iterable[str] | None = None,
        vpc_id: str | None = None,
        extra_tags: dict[str, str] | None = None,
    ) -> PoolFixture:
        """`count` stopped, private instances for `pool`, spread over `azs` (default: the
        region's zones a, b and c).

        Without `vpc_id` the pool goes into this region's private VPC, made on first use, so
        several pools share one VPC as they would in one account. Instances that already exist
        with the same Name and pool tag are reused, which makes the call idempotent.
        """
        azs = self._zones(azs)
        if not azs:
            raise SandboxError("create_pool needs at least one availability zone")
        with self._lock:
            if vpc_id is None:
                if self._default_vpc is None:
                    self._default_vpc = self._create_vpc_locked("sandbox-private", azs)
                vpc_id = self._default_vpc.vpc_id
            subnets = self._ensure_subnets_locked(vpc_id, azs)
            existing = self._existing_by_name_locked(pool)
            instances: dict[str, str] = {}
            for i in range(1, count + 1):
                name = name_format.format(pool=pool, i=i)
                if name in existing:
                    instances[name] = existing[name]
                    continue
                tags = {"Name": name, POOL_TAG: pool, **(extra_tags or {})}
                instances[name] = self._run_instance_locked(
                    subnet_id=subnets[azs[(i - 1) % len(azs)]],
                    instance_type=instance_type,
                    tags=tags,
                    hibernation=hibernation,
                    public_ip=False,
                    state="stopped",
                )
            self._sync_locked()
            return PoolFixture(pool, vpc_id, dict(subnets), instances)

    def create_instance(
        self,
        name: str,
        *,
        vpc_id: str,
        subnet_id: str | None = None,
        public_ip: bool = False,
        pool_tag: str | None = None,
        state: str = "stopped",
        hibernation: bool = False,
        instance_type: str = "m5.large",
        extra_tags: dict[str, str] | None = None,
    ) -> str:
        """One instance made to order, typically a "bad" one that the plugin must refuse.

        `pool_tag=None` leaves out the pool tag. `public_ip=True` associates an Elastic IP, which
        (unlike an auto-assigned address) stays visible while the instance is stopped.
        """
        if state not in ("stopped", "running"):
            raise SandboxError("create_instance makes 'stopped' or 'running' instances")
        with self._lock:
            if subnet_id is None:
                subnets = [s for s in self._backend().describe_subnets() if s.vpc_id == vpc_id]
                if not subnets:
                    self._backend().get_vpc(vpc_id)  # an unknown VPC fails here, clearly
                    subnets_by_az = self._ensure_subnets_locked(vpc_id, [f"{self.region}a"])
                    subnet_id = next(iter(subnets_by_az.values()))
                else:
                    subnet_id = sorted(subnets, key=lambda s: s.availability_zone)[0].id
            tags = {"Name": name, **(extra_tags or {})}
            if pool_tag is not None:
                tags[POOL_TAG] = pool_tag
            instance_id = self._run_instance_locked(
                subnet_id=subnet_id,
                instance_type=instance_type,
                tags=tags,
                hibernation=hibernation,
                public_ip=public_ip,
                state=state,
            )
            self._sync_locked()
            return instance_id

    def _zones(self, azs: Iterable[str] | None) -> list[str]:
        return [f"{self.region}{z}" for z in "abc"] if azs is None else list(azs)

    def _create_vpc_locked(self, name: str, azs: list[str]) -> VpcFixture:
        backend = self._backend()
        cidr = f"10.{next(self._vpc_counter)}.0.0/16"
        vpc = backend.create_vpc(cidr, tags=[{"Key": "Name", "Value": name}])
        self._setup_record("CreateVpc", (), {"CidrBlock": cidr})
        return VpcFixture(vpc.id, self._ensure_subnets_locked(vpc.id, azs))

    def _ensure_subnets_locked(self, vpc_id: str, azs: list[str]) -> dict[str, str]:
        backend = self._backend()
        vpc = backend.get_vpc(vpc_id)
        ours = [s for s in backend.describe_subnets() if s.vpc_id == vpc_id]
        by_az = {s.availability_zone: s.id for s in sorted(ours, key=lambda s: s.id)}
        used = {str(s.cidr_block) for s in ours}
        base = vpc.cidr_block.rsplit(".", 2)[0]  # "10.N" of "10.N.0.0/16"
        for az in azs:
            if az in by_az:
                continue
            subnet = None
            for k in range(1, 256):
                cidr = f"{base}.{k}.0/24"
                if cidr in used:
                    continue
                used.add(cidr)
                try:
                    subnet = backend.create_subnet(vpc_id, cidr, availability_zone=az)
                    break
                except InvalidSubnetConflictError:
                    continue  # a subnet made outside the sandbox overlaps; try the next block
            if subnet is None:
                raise SandboxError(f"no free /24 left in {vpc_id} for a subnet in {az}")
            backend.create_tags([subnet.id], {"Name": f"{vpc_id}-private-{az}"})
            self._setup_record("CreateSubnet", (), {"VpcId": vpc_id, "AvailabilityZone": az})
            by_az[az] = subnet.id
        return {az: by_az[az] for az in azs}

    def _existing_by_name_locked(self, pool: str) -> dict[str, str]:
        found = {}
        for inst in self._backend().all_instances():
            tags = _tags_of(inst)
            if inst.state != "terminated" and tags.get(POOL_TAG) == pool and "Name" in tags:
                found[tags["Name"]] = inst.id
        return found

    def _run_instance_locked(
        self,
        *,
        subnet_id: str,
        instance_type: str,
        tags: dict[str, str],
        hibernation: bool,
        public_ip: bool,
        state: str,
    ) -> str:
        backend = self._backend()
        subnet = backend.get_subnet(subnet_id)
        default_sg = backend.get_security_group_from_name("default", vpc_id=subnet.vpc_id)
        reservation = backend.run_instances(
            next(iter(backend.amis), "ami-00000000000000000"),
            1,
            None,
            [],
            instance_type=instance_type,
            is_instance_type_default=False,
            region_name=self.region,
            subnet_id=subnet_id,
            security_group_ids=[default_sg.id] if default_sg else [],
            associate_public_ip=False,
            tags={"instance": dict(tags)},
            hibernation_options={"Configured": hibernation},
        )
        instance = reservation.instances[0]
        self._setup_record(
            "RunInstances",
            (instance.id,),
            {"SubnetId": subnet_id, "InstanceType": instance_type, "Name": tags.get("Name", "")},
        )
        if public_ip:
            eip = backend.allocate_address(domain="vpc")
            backend.associate_address(instance=instance, address=eip.public_ip)
            self._setup_record("AssociateAddress", (instance.id,), {"PublicIp": eip.public_ip})
        if state == "stopped":
            instance.stop()
            self._setup_record("StopInstances", (instance.id,), {})
        return instance.id

    def _setup_record(self, action: str, ids: tuple[str, ...], params: dict[str, str]) -> None:
        self._calls.append(CallRecord(time.time(), action, ids, "ok", params, SETUP_CLIENT))

    # ----------------------------------------------------------------------------------------
    # observation

    def instance_views(self) -> list[InstanceView]:
        """Every instance of the region (terminated ones included), read from moto directly."""
        with self._lock:
            self._sync_locked()
            views = []
            for inst in self._backend().all_instances():
                tags = _tags_of(inst)
                track = self._tracks[inst.id]
                views.append(
                    InstanceView(
                        instance_id=inst.id,
                        name=tags.get("Name"),
                        state=inst.state,
                        tags=tags,
                        private_ip=inst.private_ip,
                        az=inst.availability_zone,
                        hibernated_last_stop=track.hibernated_last_stop,
                        state_since=track.since,
                    )
                )
            return views

    def instance_state(self, instance_id: str) -> str:
        with self._lock:
            return self._backend().get_instance(instance_id).state

    def wait_for_state(self, instance_id: str, states: str | Iterable[str], timeout: float) -> str:
        """Block until the instance is in one of `states`; returns it, or raises TimeoutError."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                state = self._backend().get_instance(instance_id).state
                if state in wanted:
                    return state
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{instance_id} is {state}, not {sorted(wanted)}")
                self._changed.wait(remaining)

    def add_listener(self, callback: Listener) -> None:
        """`callback(instance_id, old_state, new_state)` on every state change.

        Called from the sandbox's event thread, in order, never under the sandbox's lock (so it
        may call back into the sandbox). `old_state` is None for an instance seen for the first
        time.
        """
        with self._lock:
            self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        with self._lock:
            self._listeners.remove(callback)

    def calls(
        self,
        since: float | None = None,
        action: str | None = None,
        *,
        include_setup: bool = False,
    ) -> list[CallRecord]:
        """The EC2 calls made so far, oldest first.

        Fixture set-up (client "sandbox-setup") is left out unless `include_setup`, so a test sees
        only what its client did.
        """
        with self._lock:
            return [
                c
                for c in self._calls
                if (since is None or c.time >= since)
                and (action is None or c.action == action)
                and (include_setup or c.client != SETUP_CLIENT)
            ]

    def clear_calls(self) -> None:
        with self._lock:
            self._calls.clear()

    # ----------------------------------------------------------------------------------------
    # fault injection

    def set_throttle(
        self,
        rate: float,
        actions: Iterable[str] | None = None,
        until: float | None = None,
        *,
        seed: int | None = 0,
    ) -> None:
        """Answer `rate` (0..1) of matching calls with RequestLimitExceeded.

        `actions` limits it to those EC2 actions; `until` is a time.time() after which it stops.
        The draw uses a random.Random seeded with `seed`, so a run is reproducible.
        """
        if not 0.0 <= rate <= 1.0:
            raise SandboxError("throttle rate must be between 0 and 1")
        with self._lock:
            if rate == 0.0:
                self._throttle = None
                return
            self._throttle = _Throttle(
                rate,
                frozenset(actions) if actions is not None else None,
                until,
                random.Random(seed),
            )

    def set_capacity_error(self, instance_ids: Iterable[str] = (), azs: Iterable[str] = ()) -> None:
        """StartInstances that would start any of these instances, or any instance in these
        AZs, fails whole with InsufficientInstanceCapacity. Empty arguments clear it."""
        with self._lock:
            self._capacity_ids = frozenset(instance_ids)
            self._capacity_azs = frozenset(azs)

    def interrupt(
        self,
        instance_id: str,
        *,
        code: str = "Server.ScheduledStop",
        message: str = "Stopped by the sandbox to simulate an interruption",
    ) -> None:
        """Stop a running (or pending) instance behind the client's back."""
        with self._lock:
            inst = self._backend().get_instance(instance_id)
            if inst.state not in ("running", "pending"):
                raise SandboxError(f"cannot interrupt {instance_id}: it is {inst.state}")
            inst.stop()
            _set_reason(inst, code, f"{code}: {message}", "Service initiated")
            track = self._track_locked(inst)
            track.hibernated_last_stop = False
            self._enter_transition_locked(inst, "stopping", self.stopping_seconds)
            self._sync_locked()

    def set_stuck(self, instance_id: str, state: str | None) -> None:
        """Keep the instance in `state` ("pending" or "stopping") once it gets there, until
        `set_stuck(instance_id, None)` or clear_faults() lets it complete."""
        if state not in (None, "pending", "stopping"):
            raise SandboxError("an instance can only be stuck in 'pending' or 'stopping'")
        with self._lock:
            inst = self._backend().get_instance(instance_id)
            if state is None:
                self._stuck.pop(instance_id, None)
                self._resume_locked(inst)
            else:
                self._stuck[instance_id] = state
                if inst.state == state:
                    self._track_locked(inst).due = None
            self._changed.notify_all()

    def set_unreachable(
        self, flag: bool, *, mode: str = "refuse", seconds: float | None = None
    ) -> None:
        """Make the endpoint unreachable until cleared (or for `seconds`).

        mode "refuse": the port stops listening, so connections are refused (the control
        endpoint goes too). mode "drop": connections are accepted and EC2 calls are reset with no
        answer, while ``/_sandbox/`` keeps working for a separate process to clear it.
        """
        if mode not in ("refuse", "drop"):
            raise SandboxError("mode must be 'refuse' or 'drop'")
        if not self._running:
            raise SandboxError("sandbox region not started")
        self._cancel_reachable_timer()
        if not flag:
            self._unreachable = None
            self._listen(self.port)
            return
        self._unreachable = mode
        if mode == "refuse":
            self._close_listener()
        else:
            self._listen(self.port)  # dropping needs the port open, even after a refusal
        if seconds is not None:
            timer = threading.Timer(seconds, self._restore_reachability)
            timer.daemon = True
            self._reachable_timer = timer
            timer.start()

    def clear_faults(self) -> None:
        if self._unreachable is not None and self._running:
            self.set_unreachable(False)
        with self._lock:
            self._clear_faults_locked()

    def _clear_faults_locked(self) -> None:
        self._throttle = None
        self._capacity_ids = self._capacity_azs = frozenset()
        stuck, self._stuck = self._stuck, {}
        for instance_id in stuck:
            inst = self._backend().get_instance_by_id(instance_id)
            if inst is not None:
                self._resume_locked(inst)
        self._changed.notify_all()

    def _restore_reachability(self) -> None:
        if self._running:
            self._unreachable = None
            self._listen(self.port)

    def _cancel_reachable_timer(self) -> None:
        timer, self._reachable_timer = self._reachable_timer, None
        if timer is not None:
            timer.cancel()

    def _drops(self, path: str) -> bool:
        return self._unreachable == "drop" and not path.startswith(CONTROL_PREFIX)

    # ----------------------------------------------------------------------------------------
    # IAM

    def set_iam_policy(self, policy: dict[str, Any] | Policy | None) -> None:
        """Judge every EC2 call against this identity-based policy (None: allow everything).

        Unlike moto's own IAM checks, this honours instance ARNs and ``ec2:ResourceTag/...``
        conditions (see :mod:`buildbot_ec2_hybrid.sandbox.iam`). A refused call gets
        UnauthorizedOperation (HTTP 403) and changes nothing; an allowed DryRun goes on to moto,
        which answers DryRunOperation as it does with no policy. The policy stays in force
        across stop() and start().
        """
        parsed = policy if isinstance(policy, Policy) or policy is None else Policy(policy)
        with self._lock:
            self._iam_policy = parsed

    def _authorize_locked(self, action: str, instance_ids: tuple[str, ...]) -> None:
        if self._iam_policy is None:
            return
        backend = self._backend()
        tags = {}
        for instance_id in instance_ids:
            inst = backend.get_instance_by_id(instance_id)
            tags[instance_id] = _tags_of(inst) if inst is not None else None
        denial = self._iam_policy.authorize(
            action, region=self.region, account_id=self.account_id, instances=tags
        )
        if denial is not None:
            raise _Reject(denial.status, denial.code, denial.message)

    # ----------------------------------------------------------------------------------------
    # states

    def _track_locked(self, inst: Any) -> _Track:
        track = self._tracks.get(inst.id)
        if track is None:
            track = self._tracks[inst.id] = _Track(inst.state, time.time())
            self._events.put((inst.id, None, inst.state))
        return track

    def _sync_locked(self) -> None:
        """Notice every state change (ours, moto's, a client's RunInstances) and announce it."""
        changed = False
        for inst in self._backend().all_instances():
            if not isinstance(inst.hibernation_options, dict) or (
                "Configured" not in inst.hibernation_options
            ):
                # AWS always reports the flag; moto leaves it empty when it was not requested.
                inst.hibernation_options = {"Configured": False}
            track = self._tracks.get(inst.id)
            if track is None:
                self._track_locked(inst)
                changed = True
            elif track.state != inst.state:
                old, track.state, track.since = track.state, inst.state, time.time()
                track.entered = time.monotonic()
                if inst.state not in _COMPLETES_TO:
                    track.due = None
                self._events.put((inst.id, old, inst.state))
                changed = True
        if changed:
            self._changed.notify_all()

    def _enter_transition_locked(self, inst: Any, state: str, duration: float) -> None:
        track = self._track_locked(inst)
        _put_state(inst, state)
        track.duration = duration
        track.entered = time.monotonic()
        stuck = self._stuck.get(inst.id) == state
        track.due = None if stuck else track.entered + duration
        self._changed.notify_all()

    def _resume_locked(self, inst: Any) -> None:
        track = self._track_locked(inst)
        if inst.state in _COMPLETES_TO and track.due is None:
            track.due = max(time.monotonic(), track.entered + track.duration)
            self._changed.notify_all()

    def _advance_locked(self) -> float | None:
        """Complete the transitions that are due; returns when the next one is due."""
        now = time.monotonic()
        next_due = None
        backend = self._backend()
        for instance_id, track in list(self._tracks.items()):
            if track.due is None:
                continue
            inst = backend.get_instance_by_id(instance_id)
            if inst is None or inst.state not in _COMPLETES_TO:
                track.due = None
                continue
            if track.due <= now:
                _put_state(inst, _COMPLETES_TO[inst.state])
                track.due = None
            elif next_due is None or track.due < next_due:
                next_due = track.due
        self._sync_locked()
        return next_due

    def _tick_loop(self) -> None:
        with self._changed:
            while self._running:
                try:
                    next_due = self._advance_locked()
                except Exception:
                    log.exception("sandbox region %s: advancing instance states", self.region)
                    next_due = None
                timeout = 1.0 if next_due is None else max(0.0, next_due - time.monotonic())
                self._changed.wait(timeout)

    def _dispatch_loop(self) -> None:
        while True:
            event = self._events.get()
            if event is None:
                return
            with self._lock:
                listeners = list(self._listeners)
            for callback in listeners:
                try:
                    callback(*event)
                except Exception:
                    log.exception("sandbox region %s: state listener failed", self.region)

    # ----------------------------------------------------------------------------------------
    # HTTP

    def _wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith(CONTROL_PREFIX):
            return self._control(environ, start_response)
        body = _read_body(environ)
        params = _parse_params(environ, body)
        service, signed_region = _credential_scope(environ)
        action = params.get("Action")
        if not action or service not in (None, "ec2"):
            return self._app(environ, start_response)  # type: ignore[misc]
        # Every EC2 call lands in this sandbox's account, whatever key the client signs with.
        environ["HTTP_X_MOTO_ACCOUNT_ID"] = self.account_id
        record_time = time.time()
        instance_ids = _instance_ids(params)
        with self._lock:
            try:
                if signed_region is not None and signed_region != self.region:
                    raise _Reject(
                        401,
                        "AuthFailure",
                        f"Credential should be scoped to a valid region, not '{signed_region}'. "
                        f"This endpoint serves '{self.region}'.",
                    )
                self._maybe_throttle(action)
                self._authorize_locked(action, instance_ids)
                status, headers, payload = self._handle_ec2(environ, action, params, instance_ids)
            except _Reject as reject:
                status, headers, payload = _error(reject.status, reject.code, reject.message)
            outcome = "ok"
            if status >= 400:
                match = _ERROR_CODE.search(payload)
                outcome = match.group(1).decode() if match else f"HTTP{status}"
            self._calls.append(
                CallRecord(
                    record_time,
                    action,
                    instance_ids,
                    outcome,
                    _public_params(params),
                    _client_of(environ),
                )
            )
            self._sync_locked()
        start_response(_status_line(status), headers)
        return [payload]

    def _maybe_throttle(self, action: str) -> None:
        throttle = self._throttle
        if throttle is None:
            return
        if throttle.until is not None and time.time() >= throttle.until:
            self._throttle = None
            return
        if throttle.actions is not None and action not in throttle.actions:
            return
        if throttle.rng.random() < throttle.rate:
            raise _Reject(400, "RequestLimitExceeded", "Request limit exceeded.")

    def _handle_ec2(
        self,
        environ: dict[str, Any],
        action: str,
        params: dict[str, str],
        instance_ids: tuple[str, ...],
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        dry_run = params.get("DryRun", "").lower() == "true"
        backend = self._backend()
        instances = [backend.get_instance_by_id(i) for i in instance_ids]
        # Unknown ids and dry runs are moto's to answer; everything else is checked first so that
        # a refused batch changes nothing.
        checked = action in ("StartInstances", "StopInstances") and not dry_run
        checked = checked and all(inst is not None for inst in instances)
        if checked and action == "StartInstances":
            self._check_start(instances)
        elif checked:
            self._check_stop(instances, params.get("Hibernate", "").lower() == "true")
        before = {inst.id: inst.state for inst in instances if inst is not None}
        status, headers, payload = _call(self._app, environ)
        if not checked or status >= 400:
            return status, headers, payload
        if action == "StartInstances":
            return self._after_start(instances, before)
        return self._after_stop(instances, before, params.get("Hibernate", "").lower() == "true")

    def _check_start(self, instances: list[Any]) -> None:
        for inst in instances:
            if inst.state not in ("stopped", "pending", "running"):
                raise _Reject(
                    400,
                    "IncorrectInstanceState",
                    f"The instance '{inst.id}' is not in a state from which it can be started.",
                )
        for inst in instances:
            if inst.state != "stopped":
                continue  # already has its capacity
            if inst.id in self._capacity_ids or inst.availability_zone in self._capacity_azs:
                raise _Reject(
                    500,
                    "InsufficientInstanceCapacity",
                    f"No {inst.instance_type} capacity is available in "
                    f"{inst.availability_zone} right now to start {inst.id}. Try again later, "
                    "or use an instance in another Availability Zone.",
                )

    def _check_stop(self, instances: list[Any], hibernate: bool) -> None:
        for inst in instances:
            if inst.state not in ("running", "stopping", "stopped"):
                raise _Reject(
                    400,
                    "IncorrectInstanceState",
                    f"The instance '{inst.id}' is not in a state from which it can be stopped.",
                )
        if hibernate:
            for inst in instances:
                if not _hibernation_configured(inst):
                    raise _Reject(
                        400,
                        "UnsupportedHibernationConfiguration",
                        f"Instance {inst.id} was not configured for hibernation when it was "
                        "launched, so it cannot be hibernated.",
                    )

    def _after_start(
        self, instances: list[Any], before: dict[str, str]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        for inst in instances:
            was = before[inst.id]
            if was == "stopped":
                track = self._track_locked(inst)
                duration = (
                    self.hibernate_resume_seconds
                    if track.hibernated_last_stop
                    else self.pending_seconds
                )
                self._enter_transition_locked(inst, "pending", duration)
            elif was == "pending":
                _put_state(inst, "pending")  # moto made it running; its own timer still runs
        return _state_change_response("StartInstances", instances, before)

    def _after_stop(
        self, instances: list[Any], before: dict[str, str], hibernate: bool
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        for inst in instances:
            was = before[inst.id]
            if was == "running":
                self._track_locked(inst).hibernated_last_stop = hibernate
                if hibernate:
                    _set_reason(
                        inst,
                        "Client.UserInitiatedHibernate",
                        "Client.UserInitiatedHibernate: User initiated hibernate",
                        "User initiated",
                    )
                self._enter_transition_locked(inst, "stopping", self.stopping_seconds)
            elif was == "stopping":
                _put_state(inst, "stopping")
        return _state_change_response("StopInstances", instances, before)

    # ----------------------------------------------------------------------------------------
    # control endpoint

    def _control(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        route = environ.get("PATH_INFO", "")[len(CONTROL_PREFIX) :].strip("/")
        query = {
            k: v[-1] for k, v in urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).items()
        }
        status = 200
        try:
            raw = _read_body(environ)
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise SandboxError("the request body must be a JSON object")
            result = self._control_route(method, route, query, body)
        except (SandboxError, KeyError, TypeError, ValueError) as e:
            status, result = 400, {"error": f"{type(e).__name__}: {e}"}
        except LookupError as e:
            status, result = 404, {"error": str(e)}
        except Exception as e:  # moto's own errors, e.g. an unknown instance id
            status, result = 400, {"error": f"{type(e).__name__}: {e}"}
        payload = json.dumps(result).encode()
        start_response(
            _status_line(status),
            [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
        )
        return [payload]

    def _control_route(
        self, method: str, route: str, query: dict[str, str], body: dict[str, Any]
    ) -> Any:
        if (method, route) == ("GET", "info"):
            return {
                "region": self.region,
                "account_id": self.account_id,
                "endpoint_url": self.endpoint_url,
                "pending_seconds": self.pending_seconds,
                "stopping_seconds": self.stopping_seconds,
                "hibernate_resume_seconds": self.hibernate_resume_seconds,
            }
        if (method, route) == ("GET", "calls"):
            since = float(query["since"]) if "since" in query else None
            include_setup = query.get("include_setup", "").lower() in ("1", "true", "yes")
            records = self.calls(since, query.get("action"), include_setup=include_setup)
            return [c.to_json() for c in records]
        if (method, route) == ("DELETE", "calls"):
            self.clear_calls()
            return {}
        if (method, route) == ("GET", "instances"):
            return [v.to_json() for v in self.instance_views()]
        if (method, route) == ("POST", "throttle"):
            self.set_throttle(
                float(body["rate"]),
                body.get("actions"),
                body.get("until"),
                seed=body.get("seed", 0),
            )
            return {}
        if (method, route) == ("POST", "capacity-error"):
            self.set_capacity_error(body.get("instance_ids", ()), body.get("azs", ()))
            return {}
        if (method, route) == ("POST", "interrupt"):
            extra = {k: body[k] for k in ("code", "message") if k in body}
            self.interrupt(body["instance_id"], **extra)
            return {}
        if (method, route) == ("POST", "stuck"):
            self.set_stuck(body["instance_id"], body.get("state"))
            return {}
        if (method, route) == ("POST", "unreachable"):
            flag, mode, seconds = bool(body["flag"]), body.get("mode", "drop"), body.get("seconds")
            if flag and mode == "refuse" and seconds is None:
                raise SandboxError(
                    "mode 'refuse' over HTTP needs 'seconds': nothing could clear it"
                )
            if flag and mode == "refuse":
                # Reply first, then close the port: the caller should not see its own request
                # fail.
                later = threading.Timer(
                    0.05, self.set_unreachable, (True,), {"mode": mode, "seconds": float(seconds)}
                )
                later.daemon = True
                later.start()
            else:
                self.set_unreachable(flag, mode=mode, seconds=seconds)
            return {}
        if (method, route) == ("POST", "clear-faults"):
            self.clear_faults()
            return {}
        if (method, route) == ("POST", "pools"):
            options = {
                k: body[k]
                for k in (
                    "name_format",
                    "instance_type",
                    "hibernation",
                    "azs",
                    "vpc_id",
                    "extra_tags",
                )
                if k in body
            }
            return self.create_pool(body["pool"], int(body["count"]), **options).to_json()
        raise LookupError(f"no sandbox control route {method} /_sandbox/{route}")


class SandboxControl:
    """Drives a SandboxRegion in another process through its ``/_sandbox/`` endpoint."""

    def __init__(self, endpoint_url: str, timeout: float = 10.0) -> None:
        self.base = endpoint_url.rstrip("/") + CONTROL_PREFIX.rstrip("/")
        self.timeout = timeout

    def _request(
        self,
        method: str,
        route: str,
        body: dict[str, Any] | None = None,
        query: dict[str, Any] | None = None,
    ) -> Any:
        url = f"{self.base}/{route}"
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            detail = json.loads(e.read() or b"{}").get("error", str(e))
            raise SandboxError(detail) from None

    def info(self) -> dict[str, Any]:
        return self._request("GET", "info")

    def calls(
        self, since: float | None = None, action: str | None = None, *, include_setup: bool = False
    ) -> list[CallRecord]:
        query = {"since": since, "action": action, "include_setup": int(include_setup)}
        return [
            CallRecord(**{**c, "instance_ids": tuple(c["instance_ids"])})
            for c in self._request("GET", "calls", query=query)
        ]

    def clear_calls(self) -> None:
        self._request("DELETE", "calls")

    def instance_views(self) -> list[InstanceView]:
        return [InstanceView(**v) for v in self._request("GET", "instances")]

    def set_throttle(
        self,
        rate: float,
        actions: Iterable[str] | None = None,
        until: float | None = None,
        *,
        seed: int | None = 0,
    ) -> None:
        self._request(
            "POST",
            "throttle",
            {
                "rate": rate,
                "actions": sorted(actions) if actions is not None else None,
                "until": until,
                "seed": seed,
            },
        )

    def set_capacity_error(self, instance_ids: Iterable[str] = (), azs: Iterable[str] = ()) -> None:
        self._request(
            "POST", "capacity-error", {"instance_ids": list(instance_ids), "azs": list(azs)}
        )

    def interrupt(self, instance_id: str, **reason: str) -> None:
        self._request("POST", "interrupt", {"instance_id": instance_id, **reason})

    def set_stuck(self, instance_id: str, state: str | None) -> None:
        self._request("POST", "stuck", {"instance_id": instance_id, "state": state})

    def set_unreachable(
        self, flag: bool, *, mode: str = "drop", seconds: float | None = None
    ) -> None:
        self._request("POST", "unreachable", {"flag": flag, "mode": mode, "seconds": seconds})

    def clear_faults(self) -> None:
        self._request("POST", "clear-faults", {})

    def create_pool(self, pool: str, count: int, **options: Any) -> PoolFixture:
        return PoolFixture(
            **self._request("POST", "pools", {"pool": pool, "count": count, **options})
        )


# --------------------------------------------------------------------------------------------
# helpers


def _put_state(inst: Any, name: str) -> None:
    # moto mutates this object in place too (Instance.start/stop); its callers copy it first.
    inst._state.name = name
    inst._state.code = STATE_CODES[name]


def _set_reason(inst: Any, code: str, message: str, who: str) -> None:
    from moto.ec2.models.instances import StateReason

    inst.state_reason = StateReason(message, code)
    inst._reason = f"{who} ({time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} GMT)"


def _tags_of(inst: Any) -> dict[str, str]:
    return {t["key"]: t["value"] for t in inst.get_tags()}


def _hibernation_configured(inst: Any) -> bool:
    options = inst.hibernation_options
    return isinstance(options, dict) and str(options.get("Configured", "")).lower() == "true"


def _read_body(environ: dict[str, Any]) -> str:
    stream = environ.get("wsgi.input")
    if stream is None:
        return ""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length:
        raw = stream.read(length)
    elif environ.get("wsgi.input_terminated"):
        raw = stream.read()
    else:
        raw = b""
    # Whoever reads after us (moto) must find the body still there.
    environ["wsgi.input"] = io.BytesIO(raw)
    environ["CONTENT_LENGTH"] = str(len(raw))
    return raw.decode("utf-8", "replace")


def _parse_params(environ: dict[str, Any], body: str) -> dict[str, str]:
    params = {k: v[-1] for k, v in urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).items()}
    if environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
        params.update({k: v[-1] for k, v in urllib.parse.parse_qs(body).items()})
    return params


def _credential_scope(environ: dict[str, Any]) -> tuple[str | None, str | None]:
    """(service, region) from a SigV4 Authorization header, or (None, None) if unsigned."""
    auth = environ.get("HTTP_AUTHORIZATION", "")
    match = re.search(r"Credential=[^/,\s]+/\d{8}/([^/]+)/([^/]+)/aws4_request", auth)
    if not match:
        return None, None
    return match.group(2).lower(), match.group(1)


def _instance_ids(params: dict[str, str]) -> tuple[str, ...]:
    numbered = []
    for key, value in params.items():
        match = _INSTANCE_ID_KEY.match(key)
        if match is None:
            match = _RESOURCE_ID_KEY.match(key)
            if match is None or not value.startswith("i-"):
                continue
        numbered.append((int(match.group(1)), value))
    return tuple(value for _, value in sorted(numbered))


def _public_params(params: dict[str, str]) -> dict[str, str]:
    return {
        k: v
        for k, v in params.items()
        if k not in ("Action", "Version")
        and not _SECRET_PARAM.search(re.sub(r"[^a-z]", "", k.lower()))
    }


def _client_of(environ: dict[str, Any]) -> str | None:
    explicit = environ.get("HTTP_X_SANDBOX_CLIENT")
    if explicit:
        return explicit
    # botocore's Config(user_agent_appid=...) puts "app/<id>" in the User-Agent.
    match = _APPID.search(environ.get("HTTP_USER_AGENT", ""))
    return match.group(1) if match else None


def _call(app: Any, environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured["status"], captured["headers"] = status, headers
        return lambda data: None

    iterable = app(environ, start_response)
    try:
        payload = b"".join(iterable)
    finally:
        if hasattr(iterable, "close"):
            iterable.close()
    headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
    headers.append(("Content-Length", str(len(payload))))
    return int(captured["status"].split()[0]), headers, payload


def _status_line(status: int) -> str:
    from http import HTTPStatus

    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _xml_response(status: int, payload: str) -> tuple[int, list[tuple[str, str]], bytes]:
    data = payload.encode()
    request_id = str(uuid.uuid4())
    return (
        status,
        [
            ("Content-Type", "text/xml;charset=UTF-8"),
            ("Content-Length", str(len(data))),
            ("x-amzn-RequestId", request_id),
        ],
        data,
    )


def _error(status: int, code: str, message: str) -> tuple[int, list[tuple[str, str]], bytes]:
    return _xml_response(
        status,
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{escape(code)}</Code>"
        f"<Message>{escape(message)}</Message></Error></Errors>"
        f"<RequestID>{uuid.uuid4()}</RequestID></Response>",
    )


def _state_change_response(
    action: str, instances: list[Any], before: dict[str, str]
) -> tuple[int, list[tuple[str, str]], bytes]:
    # moto reports "pending"/"stopping" for every id; AWS reports each instance's real state
    # (an already-running instance stays "running").
    def state(tag: str, name: str) -> str:
        return f"<{tag}><code>{STATE_CODES[name]}</code><name>{name}</name></{tag}>"

    items = "".join(
        f"<item><instanceId>{inst.id}</instanceId>{state('currentState', inst.state)}"
        f"{state('previousState', before[inst.id])}</item>"
        for inst in instances
    )
    return _xml_response(
        200,
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{action}Response xmlns="{_EC2_XMLNS}">'
        f"<requestId>{uuid.uuid4()}</requestId><instancesSet>{items}</instancesSet>"
        f"</{action}Response>",
    )
