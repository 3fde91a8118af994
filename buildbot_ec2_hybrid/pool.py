"""The overflow pool: a scheduler hook inside the master that turns backlog into revived instances
and idle instances back into stopped ones.

Event-driven: build requests, builds and worker connections arrive over Buildbot's message queue;
each event schedules one decision (coalesced into the next reactor turn), the pure policy says what
to do, and the pool drives its workers. A periodic reconcile with EC2 is the safety net.
"""

from __future__ import annotations

import collections
import datetime
import difflib
import inspect
import random
from collections.abc import Iterable
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from buildbot import config
from buildbot.config import BuilderConfig
from buildbot.data import resultspec
from buildbot.interfaces import LatentWorkerSubstantiatiationCancelled
from buildbot.util import service
from buildbot.util.identifiers import isIdentifier
from buildbot.worker.latent import States
from twisted.internet import defer
from twisted.python import log
from twisted.python.failure import Failure

from buildbot_ec2_hybrid import ec2
from buildbot_ec2_hybrid import policy
from buildbot_ec2_hybrid import validation
from buildbot_ec2_hybrid.coordination import Coordinator
from buildbot_ec2_hybrid.usage import Stay
from buildbot_ec2_hybrid.usage import UsageLedger
from buildbot_ec2_hybrid.worker import MASTER_TAG
from buildbot_ec2_hybrid.worker import EC2PoolWorker
from buildbot_ec2_hybrid.worker import InstanceRefused
from buildbot_ec2_hybrid.worker import UsesEC2
from buildbot_ec2_hybrid.worker import check_instance

_NAME_CHUNK = 200  # filter values per DescribeInstances filter
#: how long an AZ that answered InsufficientInstanceCapacity is avoided
UNHEALTHY_AZ_SECONDS = 300.0
#: back-off of the whole pool while EC2 throttles every call or cannot be reached
REGION_BACKOFF_BASE = 2.0
REGION_BACKOFF_CAP = 60.0
#: how many recently settled request ids the pool remembers
_SETTLED_MEMORY = 10_000
#: throttling/unreachable retries of the periodic reconcile's describe
RECONCILE_RETRIES = 2

# the arguments a pool hands to each of its workers unchanged
_WORKER_ARGS = (
    "region",
    "endpoint_url",
    "aws_profile",
    "aws_access_key_id",
    "aws_secret_access_key",
    "hibernate",
    "boot_timeout",
    "poll_interval",
    "check_peer_address",
)


def _epoch(value: Any) -> float:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value.timestamp()
    return float(value)


class EC2Pool(UsesEC2, service.BuildbotService):
    """A pool of pre-created EC2 instances that overflow builders spill onto.

    ``workers`` are the instances' EC2 Name tags; they become the Buildbot worker names.
    """

    secrets = ("aws_secret_access_key",)
    _index: _BuilderIndex | None = None

    def __init__(self, name: str, **kwargs: Any) -> None:
        self._config_ok = True
        super().__init__(name=name, **kwargs)
        # a bad value is already reported by checkConfig; float() would only add a traceback
        self.overflow_after = float(kwargs.get("overflow_after", 60)) if self._config_ok else 0.0
        names = kwargs.get("workers") or []
        self.workers: list[EC2PoolWorker] = []
        self.workernames: list[str] = []
        if self._config_ok:
            instance_ids = kwargs.get("instance_ids") or {}
            worker_kwargs = dict(kwargs.get("worker_kwargs") or {})
            # an instance is one build machine, as in-house machines are
            worker_kwargs.setdefault("max_builds", 1)
            passed = {k: kwargs[k] for k in _WORKER_ARGS if k in kwargs}
            # a per-worker password (a secret per instance) overrides the pool's
            own_passwords = kwargs.get("worker_passwords") or {}
            for wname in names:
                self.workers.append(
                    EC2PoolWorker(
                        wname,
                        own_passwords.get(wname, kwargs.get("password")),
                        vpc_id=kwargs["vpc_id"],
                        pool=self.name,
                        instance_id=instance_ids.get(wname),
                        pool_managed=True,
                        **passed,
                        **worker_kwargs,
                    )
                )
            self.workernames = list(names)

    # -- configuration ------------------------------------------------------------------------

    def checkConfig(  # type: ignore[override]
        self,
        *,
        region: str | None = None,
        vpc_id: str | None = None,
        workers: Sequence[str] | None = None,
        password: Any = None,
        overflow_after: float = 60,
        idle_timeout: float = 3600,
        max_running: int | None = None,
        hibernate: bool = False,
        endpoint_url: str | None = None,
        aws_profile: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: Any = None,
        boot_timeout: float = 600,
        poll_interval: float = 2.0,
        reconcile_interval: float = 300,
        check_peer_address: bool = True,
        instance_ids: dict[str, str] | None = None,
        worker_kwargs: dict[str, Any] | None = None,
        instance_prices: dict[str, float] | None = None,
        master_address: str | None = None,
        takeover_after: float = 60,
        worker_passwords: dict[str, Any] | None = None,
        **unknown: Any,
    ) -> None:
        # Every message names the argument and says what to write instead.

        where = f"EC2Pool {self.name!r}"

        def error(msg: str) -> None:
            self._config_ok = False
            config.error(f"{where}: {msg}")

        known = [p for p in inspect.signature(self.checkConfig).parameters if p != "unknown"]
        validation.unknown_arguments(error, unknown, known)
        name = self.name
        if (
            not isinstance(name, str)
            or not 0 < len(name) <= 255
            or not all(ch.isalnum() or ch in " _.:/=+-@" for ch in name)
        ):
            error(
                "name: give the pool a name of 1 to 255 letters, digits, spaces or _.:/=+-@ "
                "(it is the pool tag's value on its instances), e.g. EC2Pool('b2g-aws', ...)"
            )
        validation.check_region(error, region, "the pool")
        validation.check_vpc(error, vpc_id, "the pool's")
        names: list[str] = []
        if isinstance(workers, str):
            error(
                f"workers={workers!r} is a string, not a list: give a list of the instances' EC2 "
                f"Name tags, e.g. workers=[{workers!r}]"
            )
        elif not isinstance(workers, (list, tuple)) or not workers:
            error(
                f"workers={workers!r}: give a non-empty list of the instances' EC2 Name tags, "
                "e.g. workers=[f'linux64-ec2-{i:03d}' for i in range(1, 51)]"
            )
        else:
            twice: list[str] = []
            for w in workers:
                if (
                    not isinstance(w, str)
                    or not isIdentifier(50, w)
                    or w in ("debug", "change", "status")
                ):
                    error(
                        f"workers: {w!r} cannot be a Buildbot worker name: use at most 50 "
                        "letters, digits, '-' and '_', not starting with a digit, and give the "
                        "instance that Name tag"
                    )
                elif w in names:
                    twice.append(w)
                else:
                    names.append(w)
            if twice:
                error(
                    f"workers: {', '.join(map(repr, twice))} listed more than once: each "
                    "instance is one worker, list each name once"
                )
        own = worker_passwords if isinstance(worker_passwords, dict) else {}
        if worker_passwords is not None and not isinstance(worker_passwords, dict):
            error("worker_passwords must map worker names to secrets, e.g. "
                  "worker_passwords={'linux64-ec2-001': util.Secret('ec2-001-password')}")
        for w in own:
            if isinstance(workers, (list, tuple)) and w not in workers:
                error(f"worker_passwords: {w!r} is not one of the pool's workers")
        covered = isinstance(workers, (list, tuple)) and workers and all(
            own.get(w) not in (None, "") for w in workers
        )
        if (password is None or password == "") and not covered:
            error(
                "password is missing: give the pool workers' password as a secret, e.g. "
                "password=util.Secret('ec2-worker-password'), or one per worker with "
                "worker_passwords"
            )
        for field, value, most, example in (
            ("overflow_after", overflow_after, 7 * 86400, 60),
            ("idle_timeout", idle_timeout, 7 * 86400, 3600),
            ("boot_timeout", boot_timeout, 86400, 600),
            ("poll_interval", poll_interval, 300, 2),
            ("reconcile_interval", reconcile_interval, 86400, 300),
            ("takeover_after", takeover_after, 86400, 60),
        ):
            validation.check_seconds(
                error, field, value, allow_zero=field == "overflow_after", most=most,
                example=example,
            )
        if (
            all(isinstance(v, (int, float)) for v in (poll_interval, boot_timeout))
            and 0 < boot_timeout <= poll_interval
        ):
            error(
                f"poll_interval={poll_interval!r} is not shorter than boot_timeout="
                f"{boot_timeout!r}: poll more often than the boot timeout, e.g. poll_interval=2"
            )
        if max_running is not None and (
            isinstance(max_running, bool) or not isinstance(max_running, int) or max_running < 1
        ):
            error(
                f"max_running={max_running!r}: give a whole number of instances, 1 or more "
                "(e.g. max_running=10), or leave it out to allow the whole pool"
            )
        validation.check_flags(error, hibernate=hibernate, check_peer_address=check_peer_address)
        validation.check_aws_access(
            error,
            endpoint_url=endpoint_url,
            aws_profile=aws_profile,
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
        )
        validation.check_address(error, "master_address", master_address)
        validation.check_prices(error, instance_prices)
        if instance_ids is not None:
            if not isinstance(instance_ids, dict):
                error(
                    "instance_ids must be a dict mapping worker names to instance ids, e.g. "
                    "instance_ids={'linux64-ec2-001': 'i-0123456789abcdef0'}"
                )
            else:
                owner: dict[str, Any] = {}
                for w, iid in instance_ids.items():
                    if names and w not in names:
                        error(
                            f"instance_ids: {w!r} is not one of the pool's workers: use a name "
                            "from workers, or add it to workers"
                        )
                    valid = validation.check_instance_id(
                        error, f"instance_ids[{w!r}]", iid, keyword=False
                    )
                    if valid and iid in owner:
                        error(
                            f"instance_ids: {iid!r} is given to {owner[iid]!r} and to {w!r}: "
                            "each instance backs one worker, give each its own id"
                        )
                    elif valid:
                        owner[iid] = w
        if worker_kwargs is not None:
            if not isinstance(worker_kwargs, dict):
                error(
                    "worker_kwargs must be a dict of extra worker arguments, e.g. "
                    "worker_kwargs={'properties': {'cloud': 'aws'}}"
                )
            else:
                # what Buildbot's latent worker accepts, minus what the pool sets itself
                extra: set[str] = set()
                for klass in EC2PoolWorker.__mro__[1:]:
                    method = klass.__dict__.get("checkConfig")
                    if method is not None:
                        extra.update(inspect.signature(method).parameters)
                extra -= {"self", "args", "kwargs", "name", "password", "build_wait_timeout",
                          "missing_timeout"}
                instead = {
                    "build_wait_timeout": "the pool stops idle workers itself: set idle_timeout "
                    "on the EC2Pool instead",
                    "missing_timeout": "set boot_timeout on the EC2Pool instead",
                    "instance_id": "set instance_ids on the EC2Pool instead",
                    "pool": "the pool sets it: remove it",
                    "pool_managed": "the pool sets it: remove it",
                    "name": "worker names come from workers: remove it",
                }
                for key in sorted(map(str, worker_kwargs)):
                    if key in extra:
                        continue
                    if key in instead:
                        hint = instead[key]
                    elif key in known:
                        hint = f"give {key} to the EC2Pool itself"
                    else:
                        close = difflib.get_close_matches(key, sorted(extra), n=1)
                        hint = (
                            f"did you mean {close[0]}?"
                            if close
                            else f"the extra worker arguments are {', '.join(sorted(extra))}"
                        )
                    error(f"worker_kwargs[{key!r}]: {hint}")

    @defer.inlineCallbacks
    def reconfigService(  # type: ignore[override]
        self,
        *,
        region: str,
        vpc_id: str,
        workers: Sequence[str],
        password: Any = None,
        overflow_after: float = 60,
        idle_timeout: float = 3600,
        max_running: int | None = None,
        hibernate: bool = False,
        endpoint_url: str | None = None,
        aws_profile: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: Any = None,
        boot_timeout: float = 600,
        poll_interval: float = 2.0,
        reconcile_interval: float = 300,
        check_peer_address: bool = True,
        instance_ids: dict[str, str] | None = None,
        worker_kwargs: dict[str, Any] | None = None,
        instance_prices: dict[str, float] | None = None,
        master_address: str | None = None,
        takeover_after: float = 60,
        worker_passwords: dict[str, Any] | None = None,
    ):
        self.master_address = master_address
        self.takeover_after = float(takeover_after)
        self.vpc_id = vpc_id
        self.usage = UsageLedger(instance_prices)
        self.workernames = list(workers)
        self.overflow_after = float(overflow_after)
        self.hibernate = hibernate
        self.reconcile_interval = float(reconcile_interval)
        self.boot_timeout = float(boot_timeout)
        self.policy_config = policy.PolicyConfig(
            overflow_after=float(overflow_after),
            idle_timeout=float(idle_timeout),
            max_running=max_running if max_running is not None else len(self.workernames),
        )
        self.aws = ec2.AWSSettings(
            region=region,
            endpoint_url=endpoint_url,
            profile=aws_profile,
            access_key_id=aws_access_key_id,
            secret_access_key=aws_secret_access_key,
        )
        self._poll_interval = poll_interval
        self._release_client()  # the settings may have changed: the next use makes a new one
        if self.running:
            self._attach_workers()
            self.schedule_decision()
        yield defer.succeed(None)

    @staticmethod
    def checks():
        """The whole-config checks, for ``c["configurators"] = [EC2Pool.checks()]``.

        A service only sees its own arguments while master.cfg loads; this configurator sees the
        whole config, so ``buildbot checkconfig`` also catches a pool worker reused in-house, a
        worker in two pools, a pool missing from c["services"], and the like.
        """
        from buildbot_ec2_hybrid.checks import HybridConfigCheck

        return HybridConfigCheck()

    # -- builder helpers (used in master.cfg) --------------------------------------------------

    def builder(
        self,
        name: str,
        workernames: Iterable[str] = (),
        factory: Any = None,
        overflow: bool = True,
        **kwargs: Any,
    ) -> BuilderConfig:
        """A BuilderConfig whose in-house workers come first and which, when ``overflow`` is
        true, may spill onto this pool's workers once a request has waited ``overflow_after``."""
        names = list(workernames)
        if overflow:
            clash = sorted(set(names) & set(self.workernames))
            if clash:
                config.error(
                    f"builder {name!r}: {clash} are {self.name} pool workers; list only in-house "
                    "workers in workernames, overflow=True adds the pool"
                )
            names += self.workernames
            kwargs["nextWorker"] = self.next_worker_chooser(kwargs.get("nextWorker"))
            kwargs["canStartBuild"] = self.start_gate(kwargs.get("canStartBuild"))
        return BuilderConfig(name=name, workernames=names, factory=factory, **kwargs)

    def next_worker_chooser(self, user_choice=None):
        """In-house workers first; among pool workers, the one that built this builder last."""
        pool_names = frozenset(self.workernames)

        def choose(builder, wfbs, request):
            inhouse = [w for w in wfbs if w.worker.name not in pool_names]
            candidates = inhouse
            if not candidates:
                warm = [
                    w for w in wfbs if getattr(w.worker, "last_builder", None) == builder.name
                ]
                candidates = warm or list(wfbs)
            if not candidates:
                return None
            if user_choice is not None:
                return user_choice(builder, candidates, request)
            return random.choice(candidates)

        choose.pool_name = self.name  # type: ignore[attr-defined]
        return choose

    def start_gate(self, user_gate=None):
        """A pool worker takes a request only once it has waited ``overflow_after``."""
        pool_names = frozenset(self.workernames)
        overflow_after = self.overflow_after

        pool_name = self.name

        @defer.inlineCallbacks
        def can_start(builder, wfb, request):
            if wfb.worker.name in pool_names and request.submittedAt is not None:
                waited = builder.master.reactor.seconds() - request.submittedAt
                if waited < overflow_after:
                    return False
            if user_gate is not None:
                allowed = yield user_gate(builder, wfb, request)
                if not allowed:
                    return False
            # The build starts now, but the "claimed" event may come back later (with several
            # masters it goes round the WAMP router): stop counting the request as backlog at
            # once, or the pool would revive an instance for a request that is being built.
            for pool in pools_of(builder.master):
                if pool.name == pool_name:
                    pool.request_starting(request.id)
            return True

        can_start.pool_name = self.name  # type: ignore[attr-defined]
        return can_start

    # -- runtime ------------------------------------------------------------------------------

    def _log(self, msg: str) -> None:
        log.msg(f"ec2-hybrid[{self.name}]: {msg}")

    @defer.inlineCallbacks
    def startService(self):
        self.demand = policy.Demand()
        self._requests: dict[int, tuple[str, float]] = {}
        self._builder_names: dict[int, str] = {}
        #: recently claimed or completed requests, oldest first (see _track_request)
        self._settled: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._instances: dict[str, ec2.InstanceInfo] = {}
        self.refused: dict[str, str] = {}
        self._booked: dict[str, str] = {}
        self._quarantine: dict[str, float] = {}
        self._failures: collections.Counter[str] = collections.Counter()
        self._unhealthy_azs: dict[str, float] = {}
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=500)
        self.degraded: str | None = None
        self._region_failures = 0
        self._region_backoff_until = 0.0
        self._last_unmet: dict[str, int] = {}
        self._decision_call = None
        self._wake_call = None
        self._reconcile_call = None
        self._consumers = []
        self._stopping = False
        self.decisions = 0
        self._claiming: set[str] = set()
        self._index: _BuilderIndex | None = None
        self._heartbeat_call = None
        #: set in a multi-master farm (at bootstrap, once configured): leases and claims in the
        #: shared database
        self.coordinator: Coordinator | None = None
        yield super().startService()
        mq = self.master.mq
        for path, cb in (
            (("buildrequests", None, None), self._on_buildrequest),
            (("workers", None, None), self._on_worker_event),
            (("builds", None, None), self._on_build_event),
        ):
            consumer = yield mq.startConsuming(cb, path)
            self._consumers.append(consumer)
        # the botmaster and the workers finish their own start-up in this reactor turn
        self.master.reactor.callLater(0, self._bootstrap)

    @defer.inlineCallbacks
    def stopService(self):
        self._stopping = True
        for consumer in self._consumers:
            consumer.stopConsuming()
        self._consumers = []
        if self.coordinator is not None and self.coordinator.is_leader:
            try:
                yield self.coordinator.resign()
            except Exception as e:
                self._log(f"could not give up the pool lease: {e}")
        for attr in ("_decision_call", "_wake_call", "_reconcile_call", "_heartbeat_call"):
            call = getattr(self, attr, None)
            if call is not None and call.active():
                call.cancel()
            setattr(self, attr, None)
        self._release_client()
        yield super().stopService()


    def _bootstrap(self):
        if self._stopping:
            return
        registry = self.master.workers.workers
        if any(not hasattr(registry.get(n), "aws") for n in self.workernames):
            # the worker manager configures its workers in this start-up too: look again soon
            self.master.reactor.callLater(0.2, self._bootstrap)
            return
        d = self._bootstrap_impl()
        d.addErrback(log.err, f"ec2-hybrid[{self.name}]: start-up failed")

    @defer.inlineCallbacks
    def _bootstrap_impl(self):
        self._attach_workers()
        if self.master.config.multiMaster:
            if not self.master_address:
                self._log("multi-master without master_address: revived instances cannot be "
                          "told which master to join; set EC2Pool(master_address='host:port')")
            self.coordinator = Coordinator(
                self.master, self.name, address=self.master_address,
                takeover_after=self.takeover_after,
            )
            yield self.coordinator.setup()
            yield self._heartbeat()
        # builder ids first, so that request events map to builders without waiting
        yield self._learn_builder_ids()
        yield self._resync_requests()
        yield self.reconcile()
        self._arm_reconcile()
        self._arm_heartbeat()
        self.schedule_decision()

    def _attach_workers(self) -> None:
        for w in self.live_workers():
            w.pool = self

    def live_workers(self) -> list[EC2PoolWorker]:
        """The running worker objects (after a reconfig they are not the config-time objects)."""
        registry = self.master.workers.workers
        return [registry[n] for n in self.workernames if n in registry]

    def _builder_index(self) -> _BuilderIndex:
        """Which builders overflow here, each pool worker's builders and each builder's in-house
        links: rebuilt only when the builders' configuration or worker links change, so that a
        decision does not walk every builder's every worker (2,000 workers x 200 builders)."""
        builders = self.master.botmaster.builders
        key = tuple((n, id(b.config), len(b.workers)) for n, b in builders.items())
        if self._index is None or self._index.key != key:
            self._index = _BuilderIndex.build(key, builders, set(self.workernames))
        return self._index

    def overflow_builders(self) -> dict[str, Any]:
        """Builders that may spill onto this pool: those listing any of its workers."""
        return self._builder_index().overflow

    @defer.inlineCallbacks
    def _learn_builder_ids(self):
        for bname, b in self.master.botmaster.builders.items():
            bid = yield b.getBuilderId()
            self._builder_names[bid] = bname

    @defer.inlineCallbacks
    def _builder_name(self, builderid: int):
        if builderid not in self._builder_names:
            yield self._learn_builder_ids()
        return self._builder_names.get(builderid)


    @defer.inlineCallbacks
    def _track_request(self, br: dict[str, Any]):
        brid = br["buildrequestid"]
        if brid in self._requests:
            return
        name = self._builder_names.get(br["builderid"])
        if name is None:
            name = yield self._builder_name(br["builderid"])
            if brid in self._settled:
                # claimed (or completed) while we looked its builder up: events of different
                # requests, and with several masters of different masters, arrive interleaved
                return
        if name is None or name not in self.overflow_builders():
            return
        submitted = _epoch(br["submitted_at"])
        self._requests[brid] = (name, submitted)
        self.demand.add(name, submitted)

    def request_starting(self, brid: int) -> None:
        """A build is starting for this request on this master (the pool's builder gate)."""
        if brid in self._requests:
            self._untrack_request(brid)
            self.schedule_decision()

    @defer.inlineCallbacks
    def _resync_requests(self):
        """Make the backlog picture equal to the database's unclaimed requests again (a request
        whose build failed to start after the gate, an event lost with a master)."""
        brs = yield self.master.data.get(
            ("buildrequests",),
            filters=[
                resultspec.Filter("claimed", "eq", [False]),
                resultspec.Filter("complete", "eq", [False]),
            ],
        )
        pending = {br["buildrequestid"] for br in brs}
        for brid in [b for b in self._requests if b not in pending]:
            self._untrack_request(brid)
        for br in brs:
            yield self._track_request(br)

    def _untrack_request(self, brid: int) -> None:
        entry = self._requests.pop(brid, None)
        if entry is not None:
            self.demand.remove(*entry)

    @defer.inlineCallbacks
    def _on_buildrequest(self, key, msg):
        event = key[-1]
        brid = msg.get("buildrequestid")
        if brid is None:
            return
        if event in ("new", "unclaimed"):
            if not msg.get("claimed") and not msg.get("complete"):
                self._settled.pop(brid, None)
                yield self._track_request(msg)
        elif event in ("claimed", "complete", "canceled", "cancelled"):
            self._settled[brid] = None
            while len(self._settled) > _SETTLED_MEMORY:
                self._settled.popitem(last=False)
            self._untrack_request(brid)
        self.schedule_decision()

    def _on_worker_event(self, key, msg):
        if msg.get("name") in self.workernames or key[-1] in ("connected", "disconnected"):
            self.schedule_decision()

    def _on_build_event(self, key, msg):
        if key[-1] in ("new", "finished"):
            self.schedule_decision()

    def worker_changed(self, worker: EC2PoolWorker) -> None:
        """Called by pool workers when they connect, disconnect, start or finish a build."""
        if worker.conn is not None:
            self._booked.pop(worker.name, None)
        self.schedule_decision()

    def known_instance(self, name: str) -> ec2.InstanceInfo | None:
        info = self._instances.get(name) if hasattr(self, "_instances") else None
        if info is None:
            return None
        latest = self.client.latest(info.instance_id)
        return latest or info

    # -- decisions ----------------------------------------------------------------------------

    def schedule_decision(self) -> None:
        if self._stopping or not self.running or getattr(self, "_decision_call", None):
            return
        self._decision_call = self.master.reactor.callLater(0, self._decide)

    def _worker_view(self, w: EC2PoolWorker, builders: frozenset[str], now: float):
        if w.name in self.refused:
            phase = policy.Phase.UNUSABLE
        elif w.name in self._claiming:
            phase = policy.Phase.BOOTING
        elif self.coordinator is not None and self.coordinator.claimed_elsewhere(w.name):
            # another live master revived it: it runs (and costs) but is not ours to use
            phase = policy.Phase.BUSY
        elif w.state == States.NOT_SUBSTANTIATED:
            phase = policy.Phase.STOPPED
        elif w.state in (States.SUBSTANTIATING, States.SUBSTANTIATING_STARTING) and w.conn is None:
            phase = policy.Phase.BOOTING
        elif w.state in (States.SUBSTANTIATING_STARTING, States.SUBSTANTIATED) and w.conn:
            if w.draining:
                phase = policy.Phase.STOPPING
            elif w.building:
                phase = policy.Phase.BUSY
            else:
                phase = policy.Phase.IDLE
        elif w.state == States.SHUT_DOWN:
            phase = policy.Phase.UNUSABLE
        else:
            phase = policy.Phase.STOPPING
        info = self.known_instance(w.name)
        return policy.WorkerView(
            name=w.name,
            phase=phase,
            builders=builders,
            availability_zone=info.availability_zone if info else None,
            last_builder=w.last_builder,
            idle_since=w.idle_since if phase is policy.Phase.IDLE else None,
            booked_for=self._booked.get(w.name),
            quarantined_until=self._quarantine.get(w.name),
        )

    def inhouse_free(self) -> dict[str, int]:
        """Per overflow builder, in-house workers free to take a request right now."""
        free = {}
        for name, wfbs in self._builder_index().inhouse.items():
            n = sum(1 for wfb in wfbs if wfb.isAvailable())
            if n:
                free[name] = n
        return free

    def worker_views(self, now: float) -> list[policy.WorkerView]:
        builders_of = self._builder_index().builders_of
        empty: frozenset[str] = frozenset()
        return [
            self._worker_view(w, builders_of.get(w.name, empty), now)
            for w in self.live_workers()
        ]

    def _decide(self) -> None:
        self._decision_call = None
        if self._stopping:
            return
        now = self.master.reactor.seconds()
        self._unhealthy_azs = {az: t for az, t in self._unhealthy_azs.items() if t > now}
        views = self.worker_views(now)
        plan = policy.decide(
            self.demand,
            views,
            self.policy_config,
            now,
            unhealthy_azs=self._unhealthy_azs.keys(),
            inhouse_free=self.inhouse_free(),
        )
        self.decisions += 1
        self._offer_to_idle(views, now)
        workers = {w.name: w for w in self.live_workers()}
        if self.coordinator is not None and not self.coordinator.is_leader:
            # the leading master revives for everyone, and reports what it cannot cover
            plan.revive = []
            plan.unmet = {}
        if plan.revive and now < self._region_backoff_until:
            # EC2 itself is throttling us or unreachable: hold revivals until the back-off ends
            # rather than blaming (and quarantining) one instance after another
            plan.wake_at = min(plan.wake_at or self._region_backoff_until,
                               self._region_backoff_until)
            plan.unmet = {r.builder: 0 for r in plan.revive} | plan.unmet
            plan.revive = []
        if plan.revive:
            self._log(
                f"reviving {len(plan.revive)} instance(s): "
                + ", ".join(f"{r.worker} for {r.builder}" for r in plan.revive)
            )
        if self.coordinator is not None and plan.revive:
            self._revive_claimed(
                [(workers[r.worker], r.builder, r.reason) for r in plan.revive]
            )
        else:
            for revival in plan.revive:
                self._revive(workers[revival.worker], revival.builder, revival.reason)
        for suspension in plan.suspend:
            self._suspend(workers[suspension.worker], suspension.reason)
        unmet = {b: n for b, n in plan.unmet.items() if n}
        if unmet != self._last_unmet:
            if unmet:
                self._log(
                    "backlog not covered (max_running, quarantine or no revivable instance): "
                    + ", ".join(f"{b}: {n}" for b, n in sorted(unmet.items()))
                )
            self._last_unmet = unmet
        self._arm_wake(plan.wake_at, now)

    def _offer_to_idle(self, views: list[policy.WorkerView], now: float) -> None:
        """Buildbot looks for work only when something happens; a request that just became
        eligible while a pool worker sits idle is no such event: ask Buildbot to look."""
        after = self.policy_config.overflow_after
        # idle workers of one pool mostly share one builder set: look at each set once
        sets = {v.builders for v in views if v.phase is policy.Phase.IDLE}
        builders = {b for group in sets for b in group if self.demand.eligible(b, now, after)}
        for name in sorted(builders):
            self.master.botmaster.maybeStartBuildsForBuilder(name)

    def _arm_wake(self, wake_at: float | None, now: float) -> None:
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        self._wake_call = None
        if wake_at is not None:
            # a hair late so that the request is really eligible when we look again
            delay = max(0.0, wake_at - now) + 0.01
            self._wake_call = self.master.reactor.callLater(delay, self.schedule_decision)

    def _record(self, kind: str, worker: str | None, reason: str) -> None:
        self.events.append(
            {"time": self.master.reactor.seconds(), "event": kind, "worker": worker,
             "reason": reason}
        )

    def _revive_claimed(self, revivals: list[tuple[EC2PoolWorker, str, str]]) -> None:
        """Multi-master: claim the instances in the shared database, point them at this master,
        then revive the ones this master got (another master may have claimed some first)."""
        names = [w.name for w, _, _ in revivals]
        self._claiming.update(names)

        @defer.inlineCallbacks
        def claim_and_revive():
            try:
                got = set((yield self.coordinator.claim(names)))
                ids = [self._instances[n].instance_id for n in got if n in self._instances]
                if ids and self.master_address:
                    yield self.client.tag_instances(ids, {MASTER_TAG: self.master_address})
            finally:
                self._claiming.difference_update(names)
            for worker, builder, reason in revivals:
                if worker.name in got:
                    self._revive(worker, builder, reason)
            self.schedule_decision()

        d = claim_and_revive()
        d.addErrback(self._claim_failed, names)

    def _claim_failed(self, failure, names: list[str]) -> None:
        self._log(f"could not claim {', '.join(names)}: {failure.getErrorMessage()}")
        if self.coordinator is not None:
            d = self.coordinator.release(names)
            d.addErrback(log.err, f"ec2-hybrid[{self.name}]: releasing claims")
        self.schedule_decision()

    def instance_stopped(self, worker: EC2PoolWorker) -> None:
        """Called by a pool worker once its instance is stopped: release its claim."""
        if self.coordinator is not None:
            d = self.coordinator.release([worker.name])
            d.addErrback(log.err, f"ec2-hybrid[{self.name}]: releasing {worker.name}")

    # -- multi-master heartbeat and takeover --------------------------------------------------

    def _arm_heartbeat(self) -> None:
        if self._stopping or self.coordinator is None:
            return
        interval = max(1.0, self.takeover_after / 4)
        self._heartbeat_call = self.master.reactor.callLater(interval, self._periodic_heartbeat)

    def _periodic_heartbeat(self):
        d = self._heartbeat()
        d.addErrback(log.err, f"ec2-hybrid[{self.name}]: heartbeat failed")
        d.addBoth(lambda _: self._arm_heartbeat())

    @defer.inlineCallbacks
    def _heartbeat(self):
        was_leader = self.coordinator.is_leader
        dead = yield self.coordinator.heartbeat()
        for master in dead:
            yield self._take_over(master)
        if self.coordinator.is_leader and not was_leader:
            # a new leader looks at what is running before it revives anything
            yield self.reconcile()
        self.schedule_decision()

    @defer.inlineCallbacks
    def _take_over(self, dead):
        brids = yield self.coordinator.release_dead_master(dead)
        orphans = self.coordinator.claimed_by(dead.masterid)
        self._log(
            f"master {dead.name} (id {dead.masterid}) stopped answering: released "
            f"{len(brids)} build request(s) it had claimed; taking over {len(orphans)} "
            "instance(s) it had revived"
        )
        self._record("takeover", None, f"master {dead.name}: {len(brids)} request(s), "
                     f"{len(orphans)} instance(s)")
        got = yield self.coordinator.claim(orphans)
        for name in got:
            # its worker was connected to the dead master: stop it; the backlog it leaves
            # is revived again through the normal decision
            yield self._stop_unowned(name, f"taken over from dead master {dead.name}")
        yield self.coordinator.forget_master(dead.masterid)

    @defer.inlineCallbacks
    def _stop_unowned(self, name: str, reason: str):
        info = self.known_instance(name)
        if info is None:
            yield self.coordinator.release([name])
            return
        self._record("suspend", name, reason)
        self._log(f"stopping {name} ({info.instance_id}): {reason}")
        try:
            if info.state == "pending":
                yield self.client.wait_for_state(info.instance_id, {"running"}, self.boot_timeout)
            yield self.client.stop_instance(info.instance_id, hibernate=False)
            yield self.client.wait_for_state(info.instance_id, {"stopped"}, self.boot_timeout)
        except ec2.EC2Error as e:
            self._log(f"could not stop {name}: {e}")
            return
        if self.coordinator is not None:
            yield self.coordinator.release([name])

    def _revive(self, worker: EC2PoolWorker, builder: str, reason: str) -> None:
        self._booked[worker.name] = builder
        self._record("revive", worker.name, reason)
        d = worker.substantiate(None, None)
        d.addCallbacks(
            self._revived, self._revive_failed, callbackArgs=(worker,), errbackArgs=(worker,)
        )

    def _revived(self, result, worker: EC2PoolWorker):
        if isinstance(result, BaseException):
            # Buildbot's missing timer (our connect timeout) "succeeds" the substantiation with
            # a TimeoutError instance instead of failing it
            return self._revive_failed(Failure(result), worker)
        self._booked.pop(worker.name, None)
        self._failures.pop(worker.name, None)
        self._ec2_answers()
        if result:
            self._record("connected", worker.name, "worker connected")
            self.master.botmaster.maybeStartBuildsForWorker(worker.name)
        self.schedule_decision()

    def _revive_failed(self, failure, worker: EC2PoolWorker):
        self._booked.pop(worker.name, None)
        if self._stopping:
            return None
        now = self.master.reactor.seconds()
        if failure.check(LatentWorkerSubstantiatiationCancelled):
            self.schedule_decision()
            return None
        if failure.check(InstanceRefused):
            self.refused[worker.name] = str(failure.value)
            self._record("refused", worker.name, str(failure.value))
            self._log(f"worker {worker.name} is unusable: {failure.value}")
        elif failure.check(ec2.Throttled, ec2.Unreachable):
            # the region, not the instance, is at fault: back off the whole pool
            self._region_failures += 1
            delay = min(REGION_BACKOFF_CAP, REGION_BACKOFF_BASE * 2 ** (self._region_failures - 1))
            self._region_backoff_until = max(self._region_backoff_until, now + delay)
            self.degraded = f"EC2 {failure.value.kind}: {failure.value}"
            self._record("degraded", worker.name, f"{self.degraded}; retrying in {delay:.0f}s")
            self._log(f"degraded: {self.degraded}; revivals resume in {delay:.0f}s")
        else:
            self._failures[worker.name] += 1
            delay = policy.quarantine_delay(self._failures[worker.name])
            if failure.check(ec2.InsufficientCapacity):
                info = self.known_instance(worker.name)
                if info and info.availability_zone:
                    self._unhealthy_azs[info.availability_zone] = now + UNHEALTHY_AZ_SECONDS
            self._quarantine[worker.name] = now + delay
            self._record(
                "quarantine", worker.name, f"{_describe_failure(failure)} (for {delay:.0f}s)"
            )
            self._log(
                f"revival of {worker.name} failed: {_describe_failure(failure)}; "
                f"quarantined for {delay:.0f}s"
            )
        self.schedule_decision()
        return None

    def _ec2_answers(self) -> None:
        self._region_failures = 0
        self._region_backoff_until = 0.0
        if self.degraded:
            self._log("EC2 answers again; pool no longer degraded")
            self._record("recovered", None, "EC2 answers again")
            self.degraded = None
            self.schedule_decision()

    def _suspend(self, worker: EC2PoolWorker, reason: str) -> None:
        if worker.building or worker.draining:
            return
        worker.draining = True
        self._record("suspend", worker.name, reason)
        self._log(f"suspending {worker.name}: {reason}")
        d = worker._soft_disconnect()

        def done(result):
            worker.draining = False
            self.schedule_decision()
            return result

        d.addBoth(done)
        d.addErrback(log.err, f"ec2-hybrid[{self.name}]: while suspending {worker.name}")

    # -- reconcile with EC2 -------------------------------------------------------------------

    def _arm_reconcile(self) -> None:
        if self._stopping:
            return
        self._reconcile_call = self.master.reactor.callLater(
            self.reconcile_interval, self._periodic_reconcile
        )

    @defer.inlineCallbacks
    def _reconcile_all(self):
        yield self._resync_requests()
        yield self.reconcile()

    def _periodic_reconcile(self):
        d = self._reconcile_all()
        d.addErrback(log.err, f"ec2-hybrid[{self.name}]: reconcile failed")
        d.addBoth(lambda _: self._arm_reconcile())

    @defer.inlineCallbacks
    def reconcile(self):
        """Compare the pool's picture with EC2 and correct it.

        Instances of the pool found running with no worker are adopted (the worker waits for its
        connection; the idle timeout then decides); instances stopped behind our back have their
        worker dropped so Buildbot retries the build.
        """
        names = list(self.workernames)
        found: list[ec2.InstanceInfo] = []
        try:
            for i in range(0, len(names), _NAME_CHUNK):
                chunk = yield self.client.describe(
                    filters=[{"Name": "tag:Name", "Values": names[i : i + _NAME_CHUNK]}],
                    # the next reconcile asks again: few retries, so a recovery shows soon
                    max_retries=RECONCILE_RETRIES,
                )
                found.extend(chunk)
        except ec2.EC2Error as e:
            self.degraded = f"EC2 {e.kind}: {e}"
            self._log(f"degraded: reconcile could not describe the pool: {e}")
            return
        self._ec2_answers()
        by_name: dict[str, list[ec2.InstanceInfo]] = collections.defaultdict(list)
        for info in found:
            if info.name:
                by_name[info.name].append(info)
        workers = {w.name: w for w in self.live_workers()}
        for name in names:
            worker = workers.get(name)
            if worker is None:
                continue
            try:
                if worker.configured_instance_id:
                    matches = [
                        i for i in by_name.get(name, [])
                        if i.instance_id == worker.configured_instance_id
                    ]
                    if not matches:
                        matches = yield self.client.describe(
                            instance_ids=[worker.configured_instance_id]
                        )
                else:
                    matches = by_name.get(name, [])
                info = worker.pick_instance(matches)
                check_instance(info, worker=name, vpc_id=self.vpc_id, pool=self.name)
            except InstanceRefused as e:
                if self.refused.get(name) != str(e):
                    self._log(f"worker {name} is unusable: {e}")
                    self._record("refused", name, str(e))
                self.refused[name] = str(e)
                self._instances.pop(name, None)
                if worker.conn is not None and not worker.building:
                    # it became unusable while running (tag removed, public IP): no more builds
                    # on it; the worker stops it only if it is still a tagged pool instance
                    self._suspend(worker, f"refused: {e.reason}")
                continue
            except ec2.EC2Error as e:
                self._log(f"could not look up {name}: {e}")
                continue
            self.refused.pop(name, None)
            self._instances[name] = info
            self._reconcile_worker(worker, info)
        self.schedule_decision()

    def _reconcile_worker(self, worker: EC2PoolWorker, info: ec2.InstanceInfo) -> None:
        coordinator = self.coordinator
        if (
            coordinator is not None
            and info.state in ("pending", "running")
            and worker.state == States.NOT_SUBSTANTIATED
        ):
            # multi-master: instances of live masters are theirs; the leader takes care of the
            # rest (its own from before a restart are adopted, others' are stopped)
            if coordinator.claimed_elsewhere(worker.name) or not coordinator.is_leader:
                return
            if info.tags.get(MASTER_TAG) not in (None, self.master_address):
                self._orphan(worker.name)
                return
        if info.state in ("pending", "running") and worker.state == States.NOT_SUBSTANTIATED:
            if self._quarantine.get(worker.name, 0) > self.master.reactor.seconds():
                # a quarantined instance that came up anyway (a boot that finished late) is
                # needed by nobody: do not leave it running
                if info.state == "running":
                    self._log(f"instance {info.instance_id} of quarantined {worker.name} is "
                              "running: stopping it")
                    self._record("suspend", worker.name, "quarantined instance found running")
                    d = self.client.stop_instance(info.instance_id, hibernate=False)
                    d.addErrback(log.err, f"ec2-hybrid[{self.name}]: stopping {worker.name}")
                return
            self._log(f"instance {info.instance_id} of {worker.name} is {info.state} with no "
                      "worker: adopting it")
            self._record("adopt", worker.name, f"found {info.state} at reconcile")
            d = worker.substantiate(None, None)
            d.addCallbacks(
                self._revived, self._revive_failed, callbackArgs=(worker,), errbackArgs=(worker,)
            )
        elif info.state in ("stopping", "stopped") and worker.state == States.SUBSTANTIATED:
            self._log(
                f"instance {info.instance_id} of {worker.name} is {info.state} behind our back: "
                "dropping its worker so Buildbot retries its builds"
            )
            self._record("lost", worker.name, f"instance {info.state} outside the pool's control")
            if worker.conn is not None:
                worker.conn.loseConnection()
            else:
                worker._deferwaiter.add(worker.insubstantiate())

    def _orphan(self, name: str) -> None:
        @defer.inlineCallbacks
        def claim_and_stop():
            got = yield self.coordinator.claim([name])
            if got:
                yield self._stop_unowned(name, "running, claimed by no live master")

        d = claim_and_stop()
        d.addErrback(log.err, f"ec2-hybrid[{self.name}]: stopping orphan {name}")

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.master.reactor.seconds()
        views = {v.name: v for v in self.worker_views(now)}
        return {
            "pool": self.name,
            "degraded": self.degraded,
            "decisions": self.decisions,
            "backlog": {b: self.demand.count(b) for b in sorted(self.demand.builders())},
            "workers": [
                dict(w.describe_state(), phase=views[w.name].phase.value,
                     refused=self.refused.get(w.name),
                     quarantined_until=self._quarantine.get(w.name))
                for w in self.live_workers()
            ],
            "events": list(self.events)[-50:],
            "usage": self.usage.totals(
                self.master.reactor.seconds(),
                running=[
                    Stay(w.name, w.instance.instance_type if w.instance else None,
                         w.running_since, None)
                    for w in self.live_workers() if w.running_since is not None
                ],
            ),
            "settings": {
                "overflow_after": self.policy_config.overflow_after,
                "idle_timeout": self.policy_config.idle_timeout,
                "max_running": self.policy_config.max_running,
                "hibernate": self.hibernate,
                "vpc_id": self.vpc_id,
                "region": self.aws.region,
            },
        }


@dataclass(frozen=True)
class _BuilderIndex:
    key: tuple
    overflow: dict[str, Any]  # builder name -> Builder
    builders_of: dict[str, frozenset[str]]  # pool worker -> its overflow builders
    inhouse: dict[str, list[Any]]  # builder name -> its in-house WorkerForBuilders

    @classmethod
    def build(cls, key: tuple, builders: dict[str, Any], pool: set[str]) -> _BuilderIndex:
        overflow = {
            n: b for n, b in builders.items()
            if b.config is not None and not pool.isdisjoint(b.config.workernames)
        }
        names_of: dict[str, set[str]] = collections.defaultdict(set)
        for n, b in overflow.items():
            for w in b.config.workernames:
                if w in pool:
                    names_of[w].add(n)
        # workers serving the same builders share one frozenset
        shared: dict[frozenset[str], frozenset[str]] = {}
        builders_of = {}
        for w, names in names_of.items():
            fs = frozenset(names)
            builders_of[w] = shared.setdefault(fs, fs)
        inhouse = {
            n: [wfb for wfb in b.workers if wfb.worker is not None and wfb.worker.name not in pool]
            for n, b in overflow.items()
        }
        return cls(key, overflow, builders_of, inhouse)


def _describe_failure(failure) -> str:
    if isinstance(failure.value, defer.TimeoutError):
        return "its worker did not connect within boot_timeout"
    return failure.getErrorMessage() or type(failure.value).__name__


def pools_of(master) -> list[EC2Pool]:
    """The EC2Pool services running in ``master`` (for the web page and the status command)."""
    manager = getattr(master, "service_manager", None)
    services = getattr(manager, "namedServices", {}) if manager is not None else {}
    return [s for s in services.values() if isinstance(s, EC2Pool)]
