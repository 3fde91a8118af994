"""The only module of buildbot-ec2-hybrid that talks to AWS.

boto3 runs in Twisted's thread pool; callers (the worker and the pool, in the master's reactor)
get Deferreds. The plugin revives and suspends pre-created instances, so the only EC2 actions
this module can send are DescribeInstances, StartInstances and StopInstances, plus CreateTags
limited to the one tag that tells a revived instance which master to join in a multi-master farm
(see ``_OPERATIONS`` and ``WRITABLE_TAGS``); RunInstances and TerminateInstances are deliberately
not reachable from here.

What it adds on top of boto3:

* Coalescing: every ``start_instance``/``stop_instance`` asked for in the same reactor turn (plus
  ``batch_window`` seconds) goes out as one call per action, chunked at ``chunk_size`` ids.
* Partial failure: EC2 fails a whole StartInstances/StopInstances call when one id is bad. Such a
  batch is split (ids named in the error message first, then halves) until every good id has gone
  through and every bad id has its own error.
* One shared DescribeInstances poll for every instance somebody waits on (``wait_for_state``).
* Our own retries: botocore's retries are switched off (``total_max_attempts=1``) so every attempt
  is visible in ``stats``. Throttling and transport failures are retried here with exponential
  backoff and full jitter; everything else goes back to the caller, classified.

Error taxonomy (``EC2Error.kind``):

=====================  ==========================================================================
``throttled``          RequestLimitExceeded, Throttling, ... Retried here; raised when exhausted.
``insufficient_capacity``  Insufficient*Capacity. Not retried here: the pool picks another
                       instance or AZ, or tries later. ``retryable`` is True.
``incorrect_state``    IncorrectInstanceState, IncorrectState. UnsupportedHibernationConfiguration
                       (and UnsupportedOperation about hibernation) is the subclass
                       ``HibernationUnsupported``, same kind: the instance cannot be hibernated
                       now, and the caller should fall back to a plain stop.
``not_found``          InvalidInstanceID.NotFound / .Malformed, or an instance that vanished.
``unauthorized``       UnauthorizedOperation, AuthFailure, AccessDenied*, bad or missing
                       credentials. Never retried.
``unreachable``        Transport failures (connect/read timeouts, refused, closed connections,
                       unparsable answers) and EC2's own 5xx (InternalError, Unavailable...).
                       Retried here. StartInstances and StopInstances are safe to repeat.
``timeout``            ``wait_for_state`` waited longer than asked.
``other``              Anything else (including DryRunOperation, which ``dry_run`` handles).
=====================  ==========================================================================
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import os
import random
import re
import threading
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from types import MappingProxyType
from typing import Any
from typing import ClassVar
from typing import TypeVar

from botocore import exceptions as botoexc
from botocore.config import Config
from botocore.parsers import ResponseParserError
from twisted.internet import defer
from twisted.internet import task
from twisted.internet.threads import deferToThreadPool
from twisted.python import log

__all__ = [
    "AWSSettings",
    "EC2Client",
    "EC2Error",
    "HibernationUnsupported",
    "IncorrectState",
    "InstanceInfo",
    "InsufficientCapacity",
    "NotFound",
    "StateTimeout",
    "Throttled",
    "Unauthorized",
    "Unreachable",
    "classify",
    "transition_verdict",
]

LOG_PREFIX = "ec2-hybrid[ec2]"

DESCRIBE = "DescribeInstances"
START = "StartInstances"
STOP = "StopInstances"
TAG = "CreateTags"
#: the only tag the plugin ever writes: where a revived instance's worker should connect
#: (multi-master); every other tag is the operator's
WRITABLE_TAGS = frozenset({"buildbot-ec2-hybrid:master"})

# The whole surface this module can send to AWS. Keep it this way: the IAM policy documented for
# the plugin grants only these (CreateTags only for WRITABLE_TAGS), and the plugin must never
# create or destroy instances.
_OPERATIONS: Mapping[str, str] = MappingProxyType(
    {
        DESCRIBE: "describe_instances",
        START: "start_instances",
        TAG: "create_tags",
        STOP: "stop_instances",
    }
)

DRY_RUN_CODE = "DryRunOperation"

# State given to an instance whose description carries no state at all.
STATE_UNKNOWN = "unknown"

_T = TypeVar("_T")

# Process-local key: settings.key() may carry a digest of a secret, and that digest must be of
# no use to anyone who sees it outside this process (a log line, a core dump of another run).
_KEY_SALT = os.urandom(32)


def _digest(secret: str | None) -> str | None:
    if secret is None:
        return None
    return hmac.new(_KEY_SALT, secret.encode("utf-8"), hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True, repr=False)
class AWSSettings:
    """Where and as whom to call EC2. Secrets never show in repr()/str()."""

    region: str
    endpoint_url: str | None = None
    profile: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 20.0

    def __post_init__(self) -> None:
        if not self.region:
            raise ValueError("AWSSettings: region is required")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError(
                "AWSSettings: give both access_key_id and secret_access_key, or neither"
            )
        if self.session_token is not None and self.access_key_id is None:
            raise ValueError("AWSSettings: session_token needs access_key_id/secret_access_key")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ValueError("AWSSettings: timeouts must be positive")

    def key(self) -> tuple:
        """Identity for sharing one client; secrets only enter as a process-local HMAC."""
        return (
            self.region,
            self.endpoint_url,
            self.profile,
            self.access_key_id,
            _digest(self.secret_access_key),
            _digest(self.session_token),
            self.connect_timeout,
            self.read_timeout,
        )

    @property
    def credentials_source(self) -> str:
        if self.access_key_id is not None:
            return "static"
        if self.profile is not None:
            return "profile"
        return "default-chain"

    def _masked_key_id(self) -> str | None:
        if self.access_key_id is None:
            return None
        # The key id is not a secret, but a full one in logs helps nobody; the tail identifies it.
        return "..." + self.access_key_id[-4:]

    def describe(self) -> str:
        """One line safe for logs."""
        parts = [f"region={self.region}"]
        if self.endpoint_url:
            parts.append(f"endpoint={self.endpoint_url}")
        if self.profile:
            parts.append(f"profile={self.profile}")
        parts.append(f"credentials={self.credentials_source}")
        if self.access_key_id is not None:
            parts.append(f"key_id={self._masked_key_id()}")
        return " ".join(parts)

    def __repr__(self) -> str:
        def hidden(value: str | None) -> str:
            return "None" if value is None else "'***'"

        return (
            f"AWSSettings(region={self.region!r}, endpoint_url={self.endpoint_url!r}, "
            f"profile={self.profile!r}, access_key_id={self._masked_key_id()!r}, "
            f"secret_access_key={hidden(self.secret_access_key)}, "
            f"session_token={hidden(self.session_token)}, "
            f"connect_timeout={self.connect_timeout!r}, read_timeout={self.read_timeout!r})"
        )

    __str__ = __repr__

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.secret_access_key, self.session_token) if s)


# --------------------------------------------------------------------------------------------
# Instance descriptions


def _as_dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _as_str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text or None


def _as_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class InstanceInfo:
    """What the plugin needs to know about one instance, from a DescribeInstances item."""

    instance_id: str
    state: str
    name: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict, hash=False)
    vpc_id: str | None = None
    subnet_id: str | None = None
    availability_zone: str | None = None
    instance_type: str | None = None
    private_ip: str | None = None
    public_ip: str | None = None
    hibernation_configured: bool = False
    launch_time: datetime | None = None
    state_reason: str | None = None
    # e.g. "Server.InsufficientInstanceCapacity" after a start that fell back to stopped.
    state_reason_code: str | None = None

    @classmethod
    def from_api(cls, raw: Any) -> InstanceInfo:
        """Build from one ``Reservations[].Instances[]`` item; missing parts become None/empty."""
        raw = _as_dict(raw)
        tags: dict[str, str] = {}
        raw_tags = raw.get("Tags")
        for tag in raw_tags if isinstance(raw_tags, list) else ():
            tag = _as_dict(tag)
            key = tag.get("Key")
            if key is None:
                continue
            value = tag.get("Value")
            tags[str(key)] = "" if value is None else str(value)
        state = _as_str(_as_dict(raw.get("State")).get("Name")) or STATE_UNKNOWN
        reason = _as_dict(raw.get("StateReason"))
        return cls(
            instance_id=_as_str(raw.get("InstanceId")) or "",
            state=state,
            name=tags.get("Name") or None,
            tags=MappingProxyType(tags),
            vpc_id=_as_str(raw.get("VpcId")),
            subnet_id=_as_str(raw.get("SubnetId")),
            availability_zone=_as_str(_as_dict(raw.get("Placement")).get("AvailabilityZone")),
            instance_type=_as_str(raw.get("InstanceType")),
            private_ip=_as_str(raw.get("PrivateIpAddress")),
            public_ip=_as_str(raw.get("PublicIpAddress")),
            hibernation_configured=bool(_as_dict(raw.get("HibernationOptions")).get("Configured")),
            launch_time=_as_datetime(raw.get("LaunchTime")),
            state_reason=(
                _as_str(reason.get("Message")) or _as_str(raw.get("StateTransitionReason"))
            ),
            state_reason_code=_as_str(reason.get("Code")),
        )


# --------------------------------------------------------------------------------------------
# Errors


class EC2Error(Exception):
    """An EC2 failure, classified so the pool can act on ``kind`` without parsing text."""

    default_kind: ClassVar[str] = "other"
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        kind: str | None = None,
        code: str | None = None,
        instance_ids: Iterable[str] = (),
        retryable: bool | None = None,
        operation: str | None = None,
    ) -> None:
        self.kind: str = kind or self.default_kind
        self.code: str | None = code
        self.message: str = message
        self.instance_ids: tuple[str, ...] = tuple(instance_ids)
        self.retryable: bool = self.default_retryable if retryable is None else retryable
        self.operation: str | None = operation
        super().__init__(str(self))

    def __str__(self) -> str:
        text = self.kind
        if self.code:
            text += f" ({self.code})"
        if self.operation:
            text += f" on {self.operation}"
        text += f": {self.message}"
        if self.instance_ids:
            text += f" [{_short_ids(self.instance_ids)}]"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self!s})"

    def for_instances(self, instance_ids: Iterable[str]) -> EC2Error:
        """The same error, about other instances (one per id when a batch is split)."""
        ids = tuple(instance_ids)
        if ids == self.instance_ids:
            return self
        clone = type(self)(
            self.message,
            kind=self.kind,
            code=self.code,
            instance_ids=ids,
            retryable=self.retryable,
            operation=self.operation,
        )
        clone.__cause__ = self.__cause__
        return clone

    def named_in_message(self, candidates: Iterable[str]) -> list[str]:
        """Those of ``candidates`` that the AWS message names (it often names the culprit)."""
        return [c for c in candidates if c and _mentions(self.message, c)]


class Throttled(EC2Error):
    default_kind = "throttled"
    default_retryable = True


class InsufficientCapacity(EC2Error):
    default_kind = "insufficient_capacity"
    default_retryable = True


class IncorrectState(EC2Error):
    default_kind = "incorrect_state"


class HibernationUnsupported(IncorrectState):
    """Hibernate=True refused for this instance: stop it without hibernation instead."""


class NotFound(EC2Error):
    default_kind = "not_found"


class Unauthorized(EC2Error):
    default_kind = "unauthorized"


class Unreachable(EC2Error):
    default_kind = "unreachable"
    default_retryable = True


class StateTimeout(EC2Error):
    default_kind = "timeout"


_THROTTLE_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "SlowDown",
        "EC2ThrottledException",
        "PriorRequestNotComplete",
        "BandwidthLimitExceeded",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
    }
)
_INCORRECT_STATE_CODES = frozenset({"IncorrectInstanceState", "IncorrectState"})
_HIBERNATION_CODES = frozenset({"UnsupportedHibernationConfiguration"})
_UNAUTHORIZED_CODES = frozenset(
    {
        "UnauthorizedOperation",
        "AuthFailure",
        "AccessDenied",
        "AccessDeniedException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "OptInRequired",
        "Blocked",
        "UnrecognizedClientException",
        "InvalidAccessKeyId",
    }
)
_SERVICE_UNAVAILABLE_CODES = frozenset(
    {
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
# Codes that concern one instance of a batch although they fail the whole call.
_PER_INSTANCE_CODES = frozenset({"UnsupportedOperation", "OperationNotPermitted"})

_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    botoexc.HTTPClientError,  # ReadTimeout, ConnectionClosed, ResponseStreaming
    botoexc.ConnectionError,  # EndpointConnection, ConnectTimeout, Proxy, SSL
    ResponseParserError,  # a proxy's HTML page or a truncated answer
    ConnectionError,
    TimeoutError,
)
_CREDENTIAL_ERRORS: tuple[type[BaseException], ...] = (
    botoexc.NoCredentialsError,
    botoexc.PartialCredentialsError,
    botoexc.CredentialRetrievalError,
    botoexc.ProfileNotFound,
)


def _class_for_code(
    code: str | None, message: str = "", status: int | None = None
) -> type[EC2Error]:
    if not code:
        return Unreachable if status is not None and status >= 500 else EC2Error
    if code in _THROTTLE_CODES:
        return Throttled
    if code.startswith("Insufficient") and "Capacity" in code:
        return InsufficientCapacity
    if code in _HIBERNATION_CODES or (
        code == "UnsupportedOperation" and "hibernat" in message.lower()
    ):
        return HibernationUnsupported
    if code in _INCORRECT_STATE_CODES:
        return IncorrectState
    if code.startswith("InvalidInstanceID"):
        return NotFound
    if code in _UNAUTHORIZED_CODES or code.startswith("AccessDenied"):
        return Unauthorized
    if code in _SERVICE_UNAVAILABLE_CODES:
        return Unreachable
    return EC2Error


def classify(exc: BaseException, instance_ids: Iterable[str] = ()) -> EC2Error:
    """Map a botocore/transport exception onto the taxonomy; unknown -> kind "other"."""
    ids = tuple(instance_ids)
    if isinstance(exc, EC2Error):
        return exc.for_instances(ids) if ids and not exc.instance_ids else exc
    err: EC2Error
    if isinstance(exc, botoexc.ClientError):
        response = exc.response if isinstance(exc.response, Mapping) else {}
        error = _as_dict(response.get("Error"))
        code = _as_str(error.get("Code"))
        message = _as_str(error.get("Message")) or str(exc)
        status = _as_dict(response.get("ResponseMetadata")).get("HTTPStatusCode")
        cls = _class_for_code(code, message, status if isinstance(status, int) else None)
        err = cls(message, code=code, instance_ids=ids, operation=exc.operation_name)
    else:
        if isinstance(exc, _TRANSPORT_ERRORS):
            cls = Unreachable
        elif isinstance(exc, _CREDENTIAL_ERRORS):
            cls = Unauthorized
        else:
            cls = EC2Error
        name = type(exc).__name__
        err = cls(str(exc) or name, code=name, instance_ids=ids)
    err.__cause__ = exc
    return err


def _is_per_instance(err: EC2Error) -> bool:
    return isinstance(err, (IncorrectState, InsufficientCapacity, NotFound)) or (
        err.code in _PER_INSTANCE_CODES
    )


def _mentions(text: str, instance_id: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(instance_id)}(?![\w-])", text) is not None


def _short_ids(ids: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(ids[:limit])
    if len(ids) > limit:
        shown += f", ... (+{len(ids) - limit} more)"
    return shown


def _chunks(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _unique(ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(ids))


# --------------------------------------------------------------------------------------------
# Waiting for states

WAIT = "wait"
DONE = "done"
FAIL = "fail"

_TERMINAL = frozenset({"shutting-down", "terminated"})
# target -> (states on the way there, states meaning the transition did not happen or was undone)
_PATHS: Mapping[str, tuple[frozenset[str], frozenset[str]]] = MappingProxyType(
    {
        "running": (frozenset({"pending"}), frozenset({"stopping", "stopped"})),
        "stopped": (frozenset({"stopping"}), frozenset({"pending", "running"})),
    }
)


def _path(targets: frozenset[str]) -> tuple[frozenset[str], frozenset[str]]:
    forward: frozenset[str] = frozenset()
    backward: frozenset[str] | None = None
    for target in targets:
        fwd, back = _PATHS.get(target, (frozenset(), frozenset()))
        forward |= fwd
        backward = back if backward is None else backward & back
    forward -= targets
    return forward, (backward or frozenset()) - targets - forward


def transition_verdict(
    state: str,
    targets: Iterable[str],
    *,
    progressed: bool,
    polls_seen: int,
    grace_polls: int = 1,
) -> str:
    """DONE, WAIT or FAIL for one observation of an instance expected to reach ``targets``.

    ``progressed``: a state on the way (pending for running, stopping for stopped) was seen
    before. ``polls_seen`` counts observations including this one. A state on the wrong side
    (stopped while waiting for running) is only trusted after the transition visibly began or
    after ``grace_polls`` observations, because DescribeInstances lags behind Start/StopInstances.
    """
    targets = frozenset(targets)
    if state in targets:
        return DONE
    if state in _TERMINAL and not targets & _TERMINAL:
        return FAIL
    _, backward = _path(targets)
    if state in backward and (progressed or polls_seen > grace_polls):
        return FAIL
    return WAIT


@dataclass(eq=False)
class _Watch:
    instance_id: str
    targets: frozenset[str]
    first_seq: int
    grace_polls: int
    deferred: defer.Deferred | None = None
    timer: Any = None
    progressed: bool = False
    polls_seen: int = 0
    missing_polls: int = 0
    last_state: str | None = None


# A watched instance absent from this many consecutive polls is reported NotFound.
_MISSING_POLLS_TO_FAIL = 2


# --------------------------------------------------------------------------------------------
# The client


class EC2Client:
    """Twisted-friendly EC2 access for one region/account: batched, polled, retried, counted."""

    _shared: ClassVar[dict[tuple, EC2Client]] = {}

    def __init__(
        self,
        settings: AWSSettings,
        reactor: Any,
        *,
        chunk_size: int = 100,
        poll_interval: float = 2.0,
        max_throttle_retries: int = 8,
        backoff_base: float = 0.5,
        backoff_cap: float = 20.0,
        threadpool: Any = None,
        boto_client: Any = None,
        batch_window: float = 0.0,
        max_concurrent_calls: int = 4,
        describe_page_size: int = 1000,
        grace_polls: int = 1,
        rng: random.Random | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        if max_throttle_retries < 0 or backoff_base < 0 or backoff_cap < 0 or batch_window < 0:
            raise ValueError("retry and batching settings must not be negative")
        if grace_polls < 0:
            raise ValueError("grace_polls must not be negative")
        if not 5 <= describe_page_size <= 1000:
            raise ValueError("describe_page_size must be within 5..1000 (EC2's MaxResults)")
        self.settings = settings
        self.reactor = reactor
        self.chunk_size = chunk_size
        self.poll_interval = poll_interval
        self.max_throttle_retries = max_throttle_retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.batch_window = batch_window
        self.describe_page_size = describe_page_size
        self.grace_polls = grace_polls
        self._threadpool = threadpool
        self._rng = rng or random.Random()
        self._semaphore = defer.DeferredSemaphore(max(1, max_concurrent_calls))
        self._max_concurrent_calls = max(1, max_concurrent_calls)

        self._boto = boto_client
        self._boto_lock = threading.Lock()
        self._boto_events: list[tuple[str, Callable[..., Any]]] = []

        # API attempts by action ("StartInstances"), by outcome ("StartInstances.ok",
        # "StartInstances.throttled"), retries ("StartInstances.retry"), batch splits
        # ("StartInstances.bisect") and polls ("poll"). Only touched in the reactor thread.
        self.stats: collections.Counter[str] = collections.Counter()
        # The backoff delays actually slept, newest last (for benchmarks and tests).
        self.backoff_delays: collections.deque[float] = collections.deque(maxlen=1000)

        self._latest: dict[str, tuple[InstanceInfo, float]] = {}

        # op -> instance id -> Deferreds waiting for that id's outcome
        self._pending: dict[tuple[str, bool], dict[str, list[defer.Deferred]]] = {}
        self._flush_call: Any = None

        self._watches: dict[str, list[_Watch]] = {}
        self._poll_call: Any = None
        self._poll_running = False
        self._poll_seq = 0
        self._poll_failures = 0

        self._closed = False
        self._refs = 1
        self._shared_key: tuple | None = None

    # -- construction and sharing ------------------------------------------------------------

    @classmethod
    def shared(cls, settings: AWSSettings, reactor: Any, **kw: Any) -> EC2Client:
        """One client per (settings, reactor), so all pools and workers of a master share its
        batcher and poller. ``kw`` only matters to the first caller; each caller should
        ``close()`` once, and the client really closes with the last one."""
        key = (settings.key(), reactor)
        client = cls._shared.get(key)
        if client is not None and not client._closed:
            client._refs += 1
            return client
        client = cls(settings, reactor, **kw)
        client._shared_key = key
        cls._shared[key] = client
        return client

    def register_event(self, event_name: str, handler: Callable[..., Any]) -> None:
        """Register a botocore event handler now, or as soon as the boto3 client exists."""
        with self._boto_lock:
            self._boto_events.append((event_name, handler))
            if self._boto is not None:
                self._boto.meta.events.register(event_name, handler)

    def get_boto_client(self) -> Any:
        """The boto3 client, created on first use. Blocking: call it off the reactor thread."""
        with self._boto_lock:
            if self._boto is None:
                # A thread still running after close() must not build a fresh client.
                self._check_open()
                self._boto = self._make_boto_client()
                for event_name, handler in self._boto_events:
                    self._boto.meta.events.register(event_name, handler)
            return self._boto

    def prepare(self) -> defer.Deferred[None]:
        """Build the boto3 client in the thread pool now (loading botocore's EC2 model takes a
        noticeable fraction of a second), so the first real call does not pay for it."""
        if self._boto is not None:
            return defer.succeed(None)
        d = deferToThreadPool(self.reactor, self._pool(), self.get_boto_client)
        d.addCallback(lambda _: None)
        return d

    def boto_config(self) -> Config:
        s = self.settings
        return Config(
            region_name=s.region,
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            # Every retry is ours: counted in stats, jittered, and never hidden inside botocore
            # (which otherwise retries capacity errors that arrive as HTTP 500).
            retries={"mode": "standard", "total_max_attempts": 1},
            max_pool_connections=max(10, self._max_concurrent_calls),
            user_agent_extra="buildbot-ec2-hybrid",
        )

    def _make_boto_client(self) -> Any:
        import boto3.session

        s = self.settings
        session = boto3.session.Session(
            aws_access_key_id=s.access_key_id,
            aws_secret_access_key=s.secret_access_key,
            aws_session_token=s.session_token,
            region_name=s.region,
            profile_name=s.profile,
        )
        client = session.client("ec2", endpoint_url=s.endpoint_url, config=self.boto_config())
        self._log(f"boto3 EC2 client ready ({s.describe()}; botocore retries off)")
        return client

    def _pool(self) -> Any:
        return self._threadpool if self._threadpool is not None else self.reactor.getThreadPool()

    # -- logging ---------------------------------------------------------------------------

    def _log(self, text: str) -> None:
        for secret in self.settings.secrets():
            text = text.replace(secret, "***")
        log.msg(f"{LOG_PREFIX}: {text}")

    # -- the one place that calls boto3 ----------------------------------------------------

    def _invoke(self, action: str, params: Mapping[str, Any]) -> Any:
        method = getattr(self.get_boto_client(), _OPERATIONS[action])
        return method(**params)

    def _backoff(self, attempt: int) -> float:
        return self._rng.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))

    async def _call(
        self,
        action: str,
        params: Mapping[str, Any],
        instance_ids: Sequence[str] = (),
        *,
        max_retries: int | None = None,
    ) -> dict[str, Any]:
        """One API call, with our retries for throttling and transport failures."""
        retries = self.max_throttle_retries if max_retries is None else max_retries
        attempt = 0
        while True:
            self._check_open()
            try:
                response = await self._semaphore.run(
                    deferToThreadPool, self.reactor, self._pool(), self._invoke, action, params
                )
            except Exception as exc:
                err = classify(exc, instance_ids)
                if err.operation is None:
                    err.operation = action
                outcome = "dry_run" if err.code == DRY_RUN_CODE else err.kind
                self.stats[action] += 1
                self.stats[f"{action}.{outcome}"] += 1
                if isinstance(err, (Throttled, Unreachable)) and attempt < retries:
                    if self._closed:
                        raise err from exc
                    delay = self._backoff(attempt)
                    attempt += 1
                    self.stats[f"{action}.retry"] += 1
                    self.backoff_delays.append(delay)
                    self._log(
                        f"{action} {err.kind} ({err.code}); retry {attempt}/{retries} "
                        f"in {delay:.2f}s"
                    )
                    await task.deferLater(self.reactor, delay, lambda: None)
                    continue
                if outcome != "dry_run":
                    self._log(f"{action} failed: {err}")
                raise err from exc
            self.stats[action] += 1
            self.stats[f"{action}.ok"] += 1
            return response if isinstance(response, dict) else {}

    def _check_open(self) -> None:
        if self._closed:
            raise EC2Error("the EC2 client is closed", code="ClientClosed")

    # -- cache -----------------------------------------------------------------------------

    def latest(self, instance_id: str) -> InstanceInfo | None:
        """Last description seen by any describe or poll (state also updated by start/stop)."""
        entry = self._latest.get(instance_id)
        return entry[0] if entry else None

    def latest_at(self, instance_id: str) -> float | None:
        """reactor.seconds() when ``latest(instance_id)`` was recorded."""
        entry = self._latest.get(instance_id)
        return entry[1] if entry else None

    def _remember(self, infos: Iterable[InstanceInfo]) -> None:
        now = self.reactor.seconds()
        for info in infos:
            if info.instance_id:
                self._latest[info.instance_id] = (info, now)

    def _note_state(self, instance_id: str, state: str | None) -> None:
        entry = self._latest.get(instance_id)
        if entry and state:
            self._latest[instance_id] = (
                dataclasses.replace(entry[0], state=state),
                self.reactor.seconds(),
            )

    # -- describe --------------------------------------------------------------------------

    def describe(
        self,
        instance_ids: Iterable[str] | None = None,
        filters: Sequence[Mapping[str, Any]] | None = None,
        *,
        missing_ok: bool = False,
        max_retries: int | None = None,
    ) -> defer.Deferred[list[InstanceInfo]]:
        """Describe instances (all pages; id lists chunked).

        Unknown ids make EC2 fail the call: that arrives as NotFound naming them, unless
        ``missing_ok``, in which case unknown ids are simply absent from the result.
        ``max_retries`` caps the throttling/unreachable retries (a periodic caller that will
        ask again soon wants few, so that it notices a recovery quickly).
        """
        return defer.Deferred.fromCoroutine(
            self._describe(instance_ids, filters, missing_ok, max_retries)
        )

    async def _describe(
        self,
        instance_ids: Iterable[str] | None,
        filters: Sequence[Mapping[str, Any]] | None,
        missing_ok: bool,
        max_retries: int | None = None,
    ) -> list[InstanceInfo]:
        base_filters = [dict(f) for f in filters or ()]
        if instance_ids is None:
            params: dict[str, Any] = {"MaxResults": self.describe_page_size}
            if base_filters:
                params["Filters"] = base_filters
            return await self._describe_pages(params, (), max_retries)
        ids = _unique(instance_ids)
        if not ids:
            return []
        batches = []
        for chunk in _chunks(ids, self.chunk_size):
            if missing_ok:
                # A filter, unlike InstanceIds, does not fail the call for an unknown id.
                params = {
                    "Filters": [*base_filters, {"Name": "instance-id", "Values": chunk}],
                    "MaxResults": self.describe_page_size,
                }
            else:
                params = {"InstanceIds": chunk}
                if base_filters:
                    params["Filters"] = base_filters
            batches.append(
                defer.Deferred.fromCoroutine(self._describe_pages(params, chunk, max_retries))
            )
        results = await defer.gatherResults(batches, consumeErrors=True).addErrback(_first_error)
        return [info for chunk_infos in results for info in chunk_infos]

    async def _describe_pages(
        self, params: dict[str, Any], ids: Sequence[str], max_retries: int | None
    ) -> list[InstanceInfo]:
        infos: list[InstanceInfo] = []
        token: str | None = None
        tokens_seen: set[str] = set()
        while True:
            page_params = dict(params)
            if token:
                page_params["NextToken"] = token
            try:
                response = await self._call(DESCRIBE, page_params, ids, max_retries=max_retries)
            except NotFound as err:
                raise err.for_instances(err.named_in_message(ids) or ids) from err.__cause__
            for reservation in response.get("Reservations") or ():
                for raw in _as_dict(reservation).get("Instances") or ():
                    infos.append(InstanceInfo.from_api(raw))
            token = response.get("NextToken") or None
            if not token:
                break
            if token in tokens_seen:
                raise EC2Error("DescribeInstances pagination loops", operation=DESCRIBE)
            tokens_seen.add(token)
        self._remember(infos)
        return infos

    # -- start / stop: coalesced -----------------------------------------------------------

    def start_instance(self, instance_id: str) -> defer.Deferred[InstanceInfo | None]:
        """Start one instance, in one StartInstances call with every other start asked for in
        this reactor turn. Fires with the cached description (state updated) or None; errbacks
        with this instance's own classified error."""
        return self._enqueue((START, False), instance_id)

    def stop_instance(self, instance_id: str, hibernate: bool = False) -> defer.Deferred[None]:
        """Stop (or hibernate) one instance, coalesced like ``start_instance``; plain stops and
        hibernations go in separate calls."""
        d = self._enqueue((STOP, bool(hibernate)), instance_id)
        d.addCallback(lambda _: None)
        return d

    def tag_instances(self, ids: Iterable[str], tags: Mapping[str, str]) -> defer.Deferred[None]:
        """Set tags on instances in one CreateTags call per chunk. Only the tags in
        ``WRITABLE_TAGS`` may be written: the plugin never rewrites an operator's tags (Name, the
        pool tag) and the documented IAM policy allows just these keys."""
        ids = _unique(ids)
        forbidden = set(tags) - WRITABLE_TAGS
        if forbidden:
            return defer.fail(ValueError(f"the plugin may not write tags {sorted(forbidden)}"))
        tag_list = [{"Key": k, "Value": v} for k, v in sorted(tags.items())]

        async def run() -> None:
            for chunk in _chunks(ids, self.chunk_size):
                await self._call(TAG, {"Resources": chunk, "Tags": tag_list}, chunk)

        return defer.Deferred.fromCoroutine(run())

    def start_instances(self, ids: Iterable[str]) -> defer.Deferred[dict[str, EC2Error | None]]:
        """Start several; fires with {id: None on success, else its EC2Error}. Never errbacks."""
        return self._enqueue_many((START, False), ids)

    def stop_instances(
        self, ids: Iterable[str], hibernate: bool = False
    ) -> defer.Deferred[dict[str, EC2Error | None]]:
        """Stop several; fires with {id: None on success, else its EC2Error}. Never errbacks."""
        return self._enqueue_many((STOP, bool(hibernate)), ids)

    def _enqueue_many(
        self, op: tuple[str, bool], ids: Iterable[str]
    ) -> defer.Deferred[dict[str, EC2Error | None]]:
        ids = _unique(ids)

        def on_failure(failure: Any, instance_id: str) -> EC2Error:
            return classify(failure.value, (instance_id,))

        ds = []
        for instance_id in ids:
            d = self._enqueue(op, instance_id)
            d.addCallbacks(lambda _: None, on_failure, errbackArgs=(instance_id,))
            ds.append(d)
        gathered = defer.gatherResults(ds)
        gathered.addCallback(lambda results: dict(zip(ids, results, strict=True)))
        return gathered

    def _enqueue(self, op: tuple[str, bool], instance_id: str) -> defer.Deferred:
        if self._closed:
            return defer.fail(EC2Error("the EC2 client is closed", code="ClientClosed"))
        waiters = self._pending.setdefault(op, {})

        def cancel(d: defer.Deferred) -> None:
            # Only a request not yet sent can be withdrawn; one in flight just loses its waiter.
            queued = self._pending.get(op, {}).get(instance_id)
            if queued and d in queued:
                queued.remove(d)
                if not queued:
                    del self._pending[op][instance_id]

        d: defer.Deferred = defer.Deferred(canceller=cancel)
        waiters.setdefault(instance_id, []).append(d)
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(self.batch_window, self._flush)
        return d

    def _flush(self) -> None:
        self._flush_call = None
        pending, self._pending = self._pending, {}
        earlier: list[tuple[set[str], defer.Deferred]] = []
        for op, waiters in pending.items():
            if not waiters:
                continue
            ids = set(waiters)
            # Start then stop of one instance in one turn: keep the order they were asked in.
            after = [d for other, d in earlier if other & ids]
            d = defer.Deferred.fromCoroutine(self._run_op(op, waiters, after))
            d.addErrback(log.err, f"{LOG_PREFIX}: unexpected failure in batched {op[0]}")
            earlier.append((ids, d))

    async def _run_op(
        self,
        op: tuple[str, bool],
        waiters: dict[str, list[defer.Deferred]],
        after: list[defer.Deferred],
    ) -> None:
        action, hibernate = op
        if after:
            await defer.DeferredList(after)
        ids = list(waiters)
        what = "hibernate" if hibernate else action
        self._log(f"{what}: {len(ids)} instance(s): {_short_ids(ids)}")
        attempt = self._start_stop_attempt(action, hibernate)
        try:
            parts = await defer.gatherResults(
                [
                    defer.Deferred.fromCoroutine(
                        self._isolate(action, chunk, attempt, _is_per_instance)
                    )
                    for chunk in _chunks(ids, self.chunk_size)
                ],
                consumeErrors=True,
            ).addErrback(_first_error)
            outcomes: dict[str, Any] = {}
            for part in parts:
                outcomes.update(part)
        except Exception as exc:
            err = classify(exc)
            outcomes = {i: err.for_instances((i,)) for i in ids}
        for instance_id, ds in waiters.items():
            result = outcomes.get(instance_id)
            for d in ds:
                if d.called:
                    continue
                if isinstance(result, EC2Error):
                    d.errback(result)
                else:
                    d.callback(self.latest(instance_id))

    def _start_stop_attempt(
        self, action: str, hibernate: bool
    ) -> Callable[[list[str]], Awaitable[dict[str, Any]]]:
        key = "StartingInstances" if action == START else "StoppingInstances"

        async def attempt(ids: list[str]) -> dict[str, Any]:
            params: dict[str, Any] = {"InstanceIds": ids}
            if hibernate:
                params["Hibernate"] = True
            response = await self._call(action, params, ids)
            states: dict[str, str | None] = {}
            for item in response.get(key) or ():
                item = _as_dict(item)
                instance_id = _as_str(item.get("InstanceId"))
                if instance_id:
                    states[instance_id] = _as_str(_as_dict(item.get("CurrentState")).get("Name"))
                    self._note_state(instance_id, states[instance_id])
            return {i: states.get(i) for i in ids}

        return attempt

    async def _isolate(
        self,
        action: str,
        ids: list[str],
        attempt: Callable[[list[str]], Awaitable[dict[str, _T]]],
        splittable: Callable[[EC2Error], bool],
    ) -> dict[str, _T | EC2Error]:
        """Run ``attempt`` on ``ids``; when a per-instance error fails the batch, give the ids
        the message names their error and retry the rest, else split in halves. Each round
        settles at least one id, so a batch of n costs at most 2n-1 calls."""
        try:
            return dict(await attempt(ids))
        except EC2Error as err:
            if len(ids) < 2 or not splittable(err):
                return {i: err.for_instances((i,)) for i in ids}
            out: dict[str, _T | EC2Error] = {}
            named = err.named_in_message(ids)
            if named:
                for instance_id in named:
                    out[instance_id] = err.for_instances((instance_id,))
                rest = [i for i in ids if i not in out]
                if rest:
                    self.stats[f"{action}.split"] += 1
                    out.update(await self._isolate(action, rest, attempt, splittable))
                return out
            self.stats[f"{action}.bisect"] += 1
            self._log(f"{action} refused for a batch of {len(ids)} ({err.code}); bisecting")
            middle = len(ids) // 2
            out.update(await self._isolate(action, ids[:middle], attempt, splittable))
            out.update(await self._isolate(action, ids[middle:], attempt, splittable))
            return out

    # -- dry runs --------------------------------------------------------------------------

    def dry_run(self, action: str, instance_ids: Iterable[str]) -> defer.Deferred[dict[str, str]]:
        """DryRun=True ``action`` (StartInstances or StopInstances): {id: 'allowed' | kind}."""
        if action not in (START, STOP):
            raise ValueError(f"dry_run only covers {START} and {STOP}")
        return defer.Deferred.fromCoroutine(self._dry_run(action, _unique(instance_ids)))

    def dry_run_start_stop(self, instance_ids: Iterable[str]) -> defer.Deferred[dict[str, str]]:
        """Whether we may start and stop each instance: 'allowed' when both are, else the
        first refusal's kind ('unauthorized', 'not_found', ...)."""
        return defer.Deferred.fromCoroutine(self._dry_run_start_stop(_unique(instance_ids)))

    async def _dry_run_start_stop(self, ids: list[str]) -> dict[str, str]:
        start = await self._dry_run(START, ids)
        stop = await self._dry_run(STOP, ids)
        verdicts = {}
        for instance_id in ids:
            refusals = [v for v in (start[instance_id], stop[instance_id]) if v != "allowed"]
            verdicts[instance_id] = refusals[0] if refusals else "allowed"
        return verdicts

    async def _dry_run(self, action: str, ids: list[str]) -> dict[str, str]:
        async def attempt(chunk: list[str]) -> dict[str, str]:
            try:
                await self._call(action, {"InstanceIds": chunk, "DryRun": True}, chunk)
            except EC2Error as err:
                if err.code == DRY_RUN_CODE:
                    return dict.fromkeys(chunk, "allowed")
                raise
            self._log(f"{action} DryRun was not honoured by the endpoint: it really ran")
            return dict.fromkeys(chunk, "allowed")

        def splittable(err: EC2Error) -> bool:
            # A tag-scoped IAM policy refuses the whole call for one untagged instance.
            return _is_per_instance(err) or isinstance(err, Unauthorized)

        verdicts: dict[str, str] = {}
        for chunk in _chunks(ids, self.chunk_size):
            outcome = await self._isolate(action, chunk, attempt, splittable)
            for instance_id, value in outcome.items():
                verdicts[instance_id] = value.kind if isinstance(value, EC2Error) else value
        return verdicts

    # -- waiting for states: one shared poll -----------------------------------------------

    def wait_for_state(
        self,
        instance_id: str,
        states: Iterable[str] | str,
        timeout: float,
        *,
        grace_polls: int | None = None,
    ) -> defer.Deferred[InstanceInfo]:
        """Fire with the instance's description once it is in one of ``states``.

        Errbacks with StateTimeout after ``timeout`` seconds, NotFound if it vanished, and
        IncorrectState (InsufficientCapacity when EC2 says so in the state reason) if it
        settled on the wrong side, e.g. stopped after pending while waiting for running. All
        waits share one DescribeInstances poll every ``poll_interval``; cancelling the
        Deferred ends the wait, and the poll stops when nothing is waited on.
        """
        targets = frozenset({states} if isinstance(states, str) else states)
        if not targets:
            raise ValueError("wait_for_state needs at least one target state")
        if self._closed:
            return defer.fail(EC2Error("the EC2 client is closed", code="ClientClosed"))
        watch = _Watch(
            instance_id=instance_id,
            targets=targets,
            # A poll already in flight (its seq is below _poll_seq) was sent before this wait
            # began: its answer does not count.
            first_seq=self._poll_seq,
            grace_polls=self.grace_polls if grace_polls is None else grace_polls,
        )
        watch.deferred = defer.Deferred(canceller=lambda _d: self._drop_watch(watch))
        watch.timer = self.reactor.callLater(timeout, self._watch_timed_out, watch, timeout)
        self._watches.setdefault(instance_id, []).append(watch)
        self._ensure_polling()
        return watch.deferred

    def watched_ids(self) -> list[str]:
        return sorted(self._watches)

    def is_polling(self) -> bool:
        return self._poll_call is not None or self._poll_running

    def _drop_watch(self, watch: _Watch) -> None:
        watches = self._watches.get(watch.instance_id)
        if watches and watch in watches:
            watches.remove(watch)
            if not watches:
                del self._watches[watch.instance_id]
        if watch.timer is not None and watch.timer.active():
            watch.timer.cancel()
        watch.timer = None
        if not self._watches and self._poll_call is not None:
            self._poll_call.cancel()
            self._poll_call = None

    def _finish_watch(self, watch: _Watch, result: InstanceInfo | EC2Error) -> None:
        self._drop_watch(watch)
        d = watch.deferred
        if d is None or d.called:
            return
        if isinstance(result, EC2Error):
            d.errback(result)
        else:
            d.callback(result)

    def _watch_timed_out(self, watch: _Watch, timeout: float) -> None:
        watch.timer = None
        wanted = "|".join(sorted(watch.targets))
        self._finish_watch(
            watch,
            StateTimeout(
                f"not {wanted} after {timeout:g}s (last seen: {watch.last_state or 'nothing'})",
                instance_ids=(watch.instance_id,),
                operation=DESCRIBE,
            ),
        )

    def _ensure_polling(self) -> None:
        if self._closed or not self._watches or self._poll_running or self._poll_call:
            return
        delay = self.poll_interval
        if self._poll_failures:
            delay = max(delay, min(self.backoff_cap, delay * 2**self._poll_failures))
        self._poll_call = self.reactor.callLater(delay, self._poll_tick)

    def _poll_tick(self) -> None:
        self._poll_call = None
        if not self._watches or self._closed:
            return
        self._poll_running = True
        d = defer.Deferred.fromCoroutine(self._poll_once())
        d.addErrback(log.err, f"{LOG_PREFIX}: unexpected failure in the state poll")

        def done(_: Any) -> None:
            self._poll_running = False
            self._ensure_polling()

        d.addBoth(done)

    async def _poll_once(self) -> None:
        seq = self._poll_seq
        self._poll_seq += 1
        ids = sorted(self._watches)
        self.stats["poll"] += 1
        try:
            # The poll is itself a retry loop: no inner retries, just a longer next interval.
            infos = await self._describe(ids, None, missing_ok=True, max_retries=0)
        except EC2Error as err:
            self._poll_failures += 1
            self._log(f"state poll of {len(ids)} instance(s) failed: {err}")
            if isinstance(err, Unauthorized):
                for watches in list(self._watches.values()):
                    for watch in list(watches):
                        self._finish_watch(watch, err.for_instances((watch.instance_id,)))
            return
        self._poll_failures = 0
        found = {info.instance_id: info for info in infos}
        for instance_id in ids:
            for watch in list(self._watches.get(instance_id, ())):
                if watch.first_seq <= seq:
                    self._observe(watch, found.get(instance_id))

    def _observe(self, watch: _Watch, info: InstanceInfo | None) -> None:
        if info is None:
            watch.missing_polls += 1
            if watch.missing_polls >= _MISSING_POLLS_TO_FAIL:
                self._finish_watch(
                    watch,
                    NotFound(
                        "instance no longer exists",
                        code="InvalidInstanceID.NotFound",
                        instance_ids=(watch.instance_id,),
                        operation=DESCRIBE,
                    ),
                )
            return
        watch.missing_polls = 0
        watch.polls_seen += 1
        watch.last_state = info.state
        verdict = transition_verdict(
            info.state,
            watch.targets,
            progressed=watch.progressed,
            polls_seen=watch.polls_seen,
            grace_polls=watch.grace_polls,
        )
        if info.state in _path(watch.targets)[0]:
            watch.progressed = True
        if verdict == DONE:
            self._finish_watch(watch, info)
        elif verdict == FAIL:
            self._finish_watch(watch, self._wrong_state_error(watch, info))

    def _wrong_state_error(self, watch: _Watch, info: InstanceInfo) -> EC2Error:
        wanted = "|".join(sorted(watch.targets))
        message = f"instance is {info.state}, will not become {wanted}"
        if info.state_reason:
            message += f" (reason: {info.state_reason})"
        cls: type[EC2Error] = IncorrectState
        reason_code = info.state_reason_code or ""
        # "Server.InsufficientInstanceCapacity": the start was accepted, then EC2 gave up.
        if _class_for_code(reason_code.rsplit(".", 1)[-1]) is InsufficientCapacity:
            cls = InsufficientCapacity
        self._log(f"{watch.instance_id}: {message}")
        return cls(
            message,
            code=reason_code or None,
            instance_ids=(watch.instance_id,),
            operation=DESCRIBE,
        )

    # -- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        """Release this user's hold; the last one fails pending work and drops the client."""
        if self._closed:
            return
        self._refs -= 1
        if self._refs > 0:
            return
        self._closed = True
        if self._shared_key is not None and self._shared.get(self._shared_key) is self:
            del self._shared[self._shared_key]
        closed = EC2Error("the EC2 client is closed", code="ClientClosed")
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
        pending, self._pending = self._pending, {}
        for waiters in pending.values():
            for instance_id, ds in waiters.items():
                for d in ds:
                    if not d.called:
                        d.errback(closed.for_instances((instance_id,)))
        if self._poll_call is not None:
            self._poll_call.cancel()
            self._poll_call = None
        for watches in list(self._watches.values()):
            for watch in list(watches):
                self._finish_watch(watch, closed.for_instances((watch.instance_id,)))
        with self._boto_lock:
            boto, self._boto = self._boto, None
        if boto is not None and hasattr(boto, "close"):
            boto.close()
        self._log("closed")


def _first_error(failure: Any) -> Any:
    """gatherResults wraps failures in FirstError: hand callers the real one."""
    failure.trap(defer.FirstError)
    return failure.value.subFailure
