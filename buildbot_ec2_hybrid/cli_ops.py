"""`buildbot-ec2-hybrid check` and `buildbot-ec2-hybrid status`: what an operator runs every day.

``check`` loads ``master.cfg`` offline with Buildbot's own loader and vets, with read-only EC2
calls (DescribeInstances, and StartInstances/StopInstances with ``DryRun``), every instance the
config's pools and pool workers would touch. ``status`` shows a running master's pool as it stands:
from the pool page's JSON (``/plugins/ec2_hybrid/pools.json``) when the master serves it, else from
the standard REST API, plus an EC2 describe.

Progress and diagnostics go to stderr; tables (or ``--json``) go to stdout. Buildbot, boto3 and
Twisted's reactor are imported inside the commands so that the other subcommands stay quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from buildbot_ec2_hybrid.ec2 import AWSSettings
    from buildbot_ec2_hybrid.ec2 import InstanceInfo

EXIT_OK = 0
#: check: an instance failed; status: shown, but a source (EC2, the plugin's JSON) failed
EXIT_PROBLEMS = 1
#: check: the config does not load; status: the master cannot be read at all
EXIT_UNUSABLE = 2

DEFAULT_MASTER = "http://127.0.0.1:8010/"
PLUGIN_PATH = "plugins/ec2_hybrid/pools.json"
#: filter values per DescribeInstances filter (EC2's limit)
_FILTER_CHUNK = 200
#: secret providers that can be read without the network
_OFFLINE_PROVIDERS = ("SecretInAFile", "SecretInPass")
_GONE_STATES = frozenset({"shutting-down", "terminated"})
_UP_STATES = frozenset({"pending", "running", "stopping"})


def add_subcommands(subparsers: Any) -> None:
    check = subparsers.add_parser(
        "check",
        help="vet every pool instance of a master.cfg with read-only EC2 calls",
        description=(
            "Load the master config offline (as `buildbot checkconfig` does), then verify with "
            "read-only EC2 calls that every pool worker's instance exists exactly once, sits in "
            "the pool's VPC without a public IPv4 address, carries the pool tag, is stopped or "
            "running, is configured for hibernation where the pool hibernates, and that the "
            "credentials may start and stop it (DryRun). Exit status: 0 all OK, 1 a problem, "
            "2 the config does not load."
        ),
    )
    check.add_argument(
        "path",
        metavar="MASTER_DIR_OR_CFG",
        help="the master's base directory (master.cfg, or the file buildbot.tac names) or a "
        "config file",
    )
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.add_argument(
        "--verbose", action="store_true", help="show the plugin's and Buildbot's log on stderr"
    )
    check.set_defaults(handler=run_check)

    status = subparsers.add_parser(
        "status",
        help="the pools of a running master: instances, states, workers, idle time, cost today",
        description=(
            "Show each pool instance of a running master: EC2 state, whether its worker is "
            "connected, the builder it last ran, how long it has been idle, its uptime and "
            "estimated cost today. Reads the pool page's JSON if the master serves it, else the "
            "REST API; EC2 states come from DescribeInstances (credentials from the options or "
            "the environment, as for the AWS CLI)."
        ),
    )
    status.add_argument(
        "--master",
        default=DEFAULT_MASTER,
        metavar="URL",
        help=f"the master's web UI address (default {DEFAULT_MASTER})",
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument(
        "--no-ec2", action="store_true", help="do not call EC2; show what the master knows"
    )
    status.add_argument("--region", help="AWS region (default: the pool's, then AWS_REGION)")
    status.add_argument("--endpoint-url", metavar="URL", help="EC2 endpoint (default: AWS's)")
    status.add_argument("--profile", help="AWS profile for EC2 calls (default: the environment)")
    status.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="TYPE=USD",
        help="hourly price of an instance type for the cost estimate, e.g. m5.large=0.096 "
        "(repeatable; built-in on-demand prices otherwise)",
    )
    status.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="per HTTP request"
    )
    status.set_defaults(handler=run_status)


# ---------------------------------------------------------------------------------------------
# shared helpers


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _react(main: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``main(reactor)`` under the global reactor; return its result or raise its exception
    (once per process: the reactor cannot be restarted)."""
    from twisted.internet import defer
    from twisted.internet import task

    box: list[tuple[bool, Any]] = []

    async def wrapper(reactor: Any) -> None:
        try:
            box.append((True, await main(reactor)))
        except Exception as e:
            box.append((False, e))

    try:
        task.react(lambda reactor: defer.ensureDeferred(wrapper(reactor)))
    except SystemExit:
        pass  # react always exits; the outcome is in the box
    if not box:
        raise RuntimeError("the reactor stopped before the command finished")
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    rows = [list(map(str, r)) for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        for i, cell in enumerate(r):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(widths[i]) for i, c in enumerate(cells[:-1])]
        return "  ".join([*padded, cells[-1]]).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def format_duration(seconds: float | None) -> str:
    """45s, 3m05s, 2h07m, 1d02h; '-' for unknown."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _midnight_utc(now: float) -> float:
    day = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    return day.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value.timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# check: what to verify


@dataclass
class Target:
    """One worker whose instance the config would have the plugin start and stop."""

    worker: str
    pool: str | None  # the pool tag value the instance must carry (None: not checked)
    owner: str  # the pool's name, or "(worker)" for a standalone EC2PoolWorker
    vpc_id: str
    instance_id: str | None
    hibernate: bool
    aws: AWSSettings
    #: what the credentials are (for the operator), never the secret itself
    credentials: str = ""


@dataclass(frozen=True)
class Problem:
    code: str
    fix: str


@dataclass
class Row:
    target: Target
    info: InstanceInfo | None = None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        info = self.info
        return {
            "worker": self.target.worker,
            "pool": self.target.owner,
            "instance_id": info.instance_id if info else self.target.instance_id,
            "state": info.state if info else None,
            "availability_zone": info.availability_zone if info else None,
            "verdict": "OK" if self.ok else "FAIL",
            "problems": [dataclasses.asdict(p) for p in self.problems],
            "notes": list(self.notes),
        }


def pick_instance(
    found: list[InstanceInfo], *, worker: str, vpc_id: str, instance_id: str | None = None
) -> InstanceInfo:
    """The instance a worker would use among ``found``, chosen exactly as
    :meth:`EC2PoolWorker.pick_instance` does; raises InstanceRefused (none, or ambiguous).

    Pure: a candidate for ``worker.py`` as a module-level function the worker method calls.
    """
    from types import SimpleNamespace

    from buildbot_ec2_hybrid.worker import EC2PoolWorker

    shim = SimpleNamespace(name=worker, vpc_id=vpc_id, configured_instance_id=instance_id)
    return EC2PoolWorker.pick_instance(shim, found)  # type: ignore[arg-type]


def placement_problems(info: InstanceInfo, target: Target) -> list[Problem]:
    """Every reason :func:`worker.check_instance` has to refuse ``info``, not only the first.

    check_instance stops at the first failed rule. Repairing one attribute at a time (in its
    order) and asking again names each failed rule with check_instance's own words, so the rules
    stay in one place.
    """
    from buildbot_ec2_hybrid.worker import POOL_TAG
    from buildbot_ec2_hybrid.worker import InstanceRefused
    from buildbot_ec2_hybrid.worker import check_instance

    def refusal(candidate: InstanceInfo) -> str | None:
        try:
            check_instance(candidate, worker=target.worker, vpc_id=target.vpc_id, pool=target.pool)
        except InstanceRefused as e:
            return e.reason
        return None

    repairs: list[tuple[str, Callable[[InstanceInfo], InstanceInfo]]] = [
        ("other-vpc", lambda i: dataclasses.replace(i, vpc_id=target.vpc_id)),
        ("public-ip", lambda i: dataclasses.replace(i, public_ip=None)),
        (
            "pool-tag",
            lambda i: dataclasses.replace(i, tags={**i.tags, POOL_TAG: target.pool or ""}),
        ),
        ("terminated", lambda i: dataclasses.replace(i, state="stopped")),
    ]
    more = {
        "other-vpc": f"; use an instance in {target.vpc_id} named {target.worker}, or correct "
        "vpc_id",
        "public-ip": "; release its address, or replace it with an instance in a private subnet",
        "terminated": f"; create a stopped instance named {target.worker} in {target.vpc_id}"
        + (f" tagged {POOL_TAG}={target.pool}" if target.pool else "")
        + ", or remove the worker from the config",
    }
    problems: list[Problem] = []
    candidate = info
    reason = refusal(candidate)
    step = 0
    while reason is not None:
        while step < len(repairs):
            code, repair = repairs[step]
            step += 1
            candidate = repair(candidate)
            after = refusal(candidate)
            if after != reason:
                problems.append(Problem(code, reason + more.get(code, "")))
                reason = after
                break
        else:
            # a rule this command does not know yet: report it as the worker would
            problems.append(Problem("refused", reason))
            break
    return problems


# ---------------------------------------------------------------------------------------------
# check: loading the config


class ConfigLoadFailed(Exception):
    def __init__(self, errors: list[str], detail: str = "") -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
        self.detail = detail


def load_master_config(path: str) -> tuple[Any, str, str]:
    """(MasterConfig, basedir, config file name), loaded the way the master loads it: with
    Buildbot's FileLoader, from the base directory. Raises ConfigLoadFailed."""
    from buildbot.config.errors import ConfigErrors
    from buildbot.config.master import FileLoader
    from twisted.python import log

    target = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(target):
        basedir, filename = target, "master.cfg"
        if os.path.exists(os.path.join(basedir, "buildbot.tac")):
            from buildbot.scripts.base import getConfigFileFromTac

            try:
                filename = getConfigFileFromTac(basedir, quiet=True)
            except Exception as e:
                raise ConfigLoadFailed(
                    [f"cannot read {os.path.join(basedir, 'buildbot.tac')}: {e}"]
                ) from None
    elif os.path.exists(target):
        basedir, filename = os.path.dirname(target), os.path.basename(target)
    else:
        raise ConfigLoadFailed(
            [f"{path}: no such file or directory; give the master's base directory (the one "
             "with master.cfg and buildbot.tac) or the path of a config file"]
        )

    failures: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("isError") and event.get("failure") is not None:
            failures.append(event["failure"].getTraceback())

    # Buildbot logs the traceback of an exception in master.cfg and only says "see the log"
    log.addObserver(observer)
    cwd = os.getcwd()
    try:
        # the master runs from its base directory: relative paths in master.cfg mean that
        os.chdir(basedir)
        config = FileLoader(basedir, filename).loadConfig()
    except ConfigErrors as e:
        raise ConfigLoadFailed(list(e.errors), "\n".join(failures)) from None
    finally:
        os.chdir(cwd)
        log.removeObserver(observer)
    return config, basedir, filename


class _OfflineSecrets:
    """What Buildbot's SecretManager answers, from the providers readable without a network."""

    def __init__(self, providers: list[Any]) -> None:
        self.providers = providers
        self._ready = False

    async def prepare(self) -> None:
        from twisted.internet import defer

        if self._ready:
            return
        self._ready = True
        for p in self.providers:
            await defer.maybeDeferred(p.reconfigService, *p._config_args, **p._config_kwargs)

    async def get(self, name: str) -> Any:
        from buildbot.secrets.secret import SecretDetails
        from twisted.internet import defer

        for p in self.providers:
            value = await defer.maybeDeferred(p.get, name)
            if value is not None:
                return SecretDetails(type(p).__name__, name, value)
        return None


async def _resolve_secret(value: Any, config: Any, cache: dict[str, Any]) -> tuple[Any, str]:
    """(plain value or None, how it was found) for a credential argument of master.cfg."""
    from buildbot.interfaces import IRenderable
    from buildbot.process.properties import Properties

    if value is None or isinstance(value, str):
        return value, ""
    if not IRenderable.providedBy(value):
        return None, f"it is a {type(value).__name__}, neither a string nor a secret"
    providers = list(getattr(config, "secretsProviders", None) or [])
    offline = [p for p in providers if type(p).__name__ in _OFFLINE_PROVIDERS]
    others = sorted({type(p).__name__ for p in providers} - {type(p).__name__ for p in offline})
    if "secrets" not in cache:
        cache["secrets"] = _OfflineSecrets(offline)
    secrets: _OfflineSecrets = cache["secrets"]
    try:
        await secrets.prepare()
        props = Properties()
        props.master = _FakeMaster({"secrets": secrets})
        rendered = await props.render(value)
    except Exception as e:
        where = f"the offline providers ({', '.join(type(p).__name__ for p in offline)})" if (
            offline
        ) else "no offline secret provider in c['secretsProviders']"
        skipped = f"; not read offline: {', '.join(others)}" if others else ""
        # e names the secret, never its value
        return None, f"{value!r} could not be read from {where}{skipped} ({e})"
    if not isinstance(rendered, str) or not rendered:
        return None, f"{value!r} rendered to an empty or non-string value"
    return rendered, f"{value!r} read offline"


class _FakeMaster:
    def __init__(self, services: dict[str, Any]) -> None:
        self.namedServices = services


async def _targets_from_config(config: Any) -> tuple[list[Target], list[str]]:
    """The workers to check, and notes about how credentials were found."""
    from buildbot_ec2_hybrid.ec2 import AWSSettings
    from buildbot_ec2_hybrid.pool import EC2Pool
    from buildbot_ec2_hybrid.worker import EC2PoolWorker

    notes: list[str] = []
    cache: dict[str, Any] = {}

    async def settings(kw: dict[str, Any], who: str) -> tuple[AWSSettings, str]:
        key_id = kw.get("aws_access_key_id")
        secret, how = await _resolve_secret(kw.get("aws_secret_access_key"), config, cache)
        if key_id is not None and secret is None:
            notes.append(
                f"{who}: aws_secret_access_key {how}; checking with boto3's default credential "
                "chain (environment, ~/.aws, instance profile) instead: the verdicts on "
                "permissions are about those credentials"
            )
            key_id = None
        aws = AWSSettings(
            region=kw["region"],
            endpoint_url=kw.get("endpoint_url"),
            profile=kw.get("aws_profile") if key_id is None else None,
            access_key_id=key_id,
            secret_access_key=secret if key_id is not None else None,
        )
        described = aws.describe()
        if how and key_id is not None:
            described += f" (secret {how})"
        return aws, described

    targets: list[Target] = []
    services = getattr(config, "services", {}) or {}
    for pool in services.values():
        if not isinstance(pool, EC2Pool):
            continue
        kw = pool._config_kwargs
        aws, creds = await settings(kw, f"pool {pool.name}")
        ids = kw.get("instance_ids") or {}
        for name in kw.get("workers") or ():
            targets.append(
                Target(
                    worker=name,
                    pool=pool.name,
                    owner=pool.name,
                    vpc_id=kw["vpc_id"],
                    instance_id=ids.get(name),
                    hibernate=bool(kw.get("hibernate", False)),
                    aws=aws,
                    credentials=creds,
                )
            )
    for w in getattr(config, "workers", None) or ():
        if not isinstance(w, EC2PoolWorker):
            continue
        kw = w._config_kwargs
        if kw.get("pool_managed"):
            continue  # listed by its pool above
        aws, creds = await settings(kw, f"worker {w.name}")
        targets.append(
            Target(
                worker=w.name,
                pool=kw.get("pool"),
                owner="(worker)",
                vpc_id=kw["vpc_id"],
                instance_id=kw.get("instance_id"),
                hibernate=bool(kw.get("hibernate", False)),
                aws=aws,
                credentials=creds,
            )
        )
    return targets, notes


# ---------------------------------------------------------------------------------------------
# check: talking to EC2


def _describe_fix(err: Any, aws: AWSSettings) -> str:
    where = aws.endpoint_url or f"EC2 in {aws.region}"
    if err.kind == "unauthorized":
        return (
            f"EC2 refused DescribeInstances ({err.code}) for {aws.describe()}: check the key, "
            "profile or role, and allow ec2:DescribeInstances (see docs/iam.rst)"
        )
    if err.kind in ("unreachable", "throttled"):
        return (
            f"could not reach {where} ({err.kind}: {err.code}): check endpoint_url, the network "
            "or proxy, and try again"
        )
    return f"DescribeInstances failed: {err}"


async def _check_group(reactor: Any, aws: AWSSettings, group: list[Target]) -> list[Row]:
    """Describe, vet and dry-run the targets that share one set of AWS settings."""
    from buildbot_ec2_hybrid import ec2
    from buildbot_ec2_hybrid.worker import POOL_TAG
    from buildbot_ec2_hybrid.worker import InstanceRefused

    rows = [Row(t) for t in group]
    client = ec2.EC2Client(aws, reactor, max_throttle_retries=3, backoff_cap=5.0)
    try:
        names = sorted({t.worker for t in group if t.instance_id is None})
        ids = sorted({t.instance_id for t in group if t.instance_id is not None})
        _progress(f"describing {len(names) + len(ids)} instance(s) ({group[0].credentials})...")
        found: list[InstanceInfo] = []
        try:
            for i in range(0, len(names), _FILTER_CHUNK):
                chunk = names[i : i + _FILTER_CHUNK]
                found += await client.describe(filters=[{"Name": "tag:Name", "Values": chunk}])
            if ids:
                found += await client.describe(instance_ids=ids, missing_ok=True)
        except ec2.EC2Error as err:
            fix = _describe_fix(err, aws)
            _progress(f"  {fix}")
            for row in rows:
                row.problems.append(Problem("describe-failed", f"not checked: {fix}"))
            return rows

        by_name: dict[str, list[InstanceInfo]] = {}
        by_id: dict[str, InstanceInfo] = {}
        for info in found:
            by_id[info.instance_id] = info
            if info.name:
                by_name.setdefault(info.name, []).append(info)
        for row in rows:
            t = row.target
            matches = (
                [by_id[t.instance_id]] if t.instance_id in by_id else []
            ) if t.instance_id else by_name.get(t.worker, [])
            try:
                info = pick_instance(
                    matches, worker=t.worker, vpc_id=t.vpc_id, instance_id=t.instance_id
                )
            except InstanceRefused as e:
                if not matches and t.instance_id:
                    fix = (
                        f"no instance {t.instance_id} in {aws.region} (instance_ids["
                        f"{t.worker!r}]): correct the id, or leave it out to find the instance "
                        "by its Name tag"
                    )
                    row.problems.append(Problem("not-found", fix))
                else:
                    row.problems.append(
                        Problem("not-found" if not matches else "duplicate-name", e.reason)
                    )
                continue
            row.info = info
            ignored = [i for i in matches if i.instance_id != info.instance_id]
            if ignored:
                row.notes.append(
                    "also named so, ignored: "
                    + ", ".join(f"{i.instance_id} ({i.state}, {i.vpc_id})" for i in ignored)
                )
            row.problems += placement_problems(info, t)
            if t.hibernate and not info.hibernation_configured:
                row.problems.append(
                    Problem(
                        "hibernation",
                        "the pool hibernates but the instance was launched without hibernation "
                        "(HibernationOptions.Configured is false), so it is only ever stopped and "
                        "loses its memory; hibernation can only be enabled at launch: relaunch "
                        "it with hibernation enabled (see docs/hibernation.rst), or set "
                        "hibernate=False",
                    )
                )
            if info.state in ("pending", "stopping"):
                row.notes.append(f"{info.state}: in transition, look again in a minute")
            elif info.state == "running":
                row.notes.append("running: the master adopts it rather than starting it")
            elif info.state not in ("stopped", *_GONE_STATES):
                row.problems.append(
                    Problem("state", f"it is {info.state}; expected stopped or running")
                )

        # Only instances the pool would start get a dry run: the plugin sends nothing that
        # could change an instance it refuses, not even a DryRun.
        eligible = sorted(
            {
                r.info.instance_id
                for r in rows
                if r.info is not None
                and not any(p.code in _PLACEMENT_CODES for p in r.problems)
            }
        )
        if eligible:
            _progress(f"dry-running StartInstances and StopInstances on {len(eligible)} "
                      "instance(s)...")
            start = await client.dry_run(ec2.START, eligible)
            stop = await client.dry_run(ec2.STOP, eligible)
            for row in rows:
                if row.info is None or row.info.instance_id not in start:
                    continue
                iid = row.info.instance_id
                for action, verb, verdict in (
                    (ec2.START, "start", start[iid]),
                    (ec2.STOP, "stop", stop[iid]),
                ):
                    if verdict == "allowed":
                        continue
                    if verdict == "unauthorized":
                        tag = f"{POOL_TAG}={row.target.pool}" if row.target.pool else "the pool tag"
                        row.problems.append(
                            Problem(
                                f"{verb}-denied",
                                f"the credentials ({aws.describe()}) may not {verb} it ({action} "
                                f"DryRun refused): allow ec2:{action} on instances tagged {tag} "
                                "(see docs/iam.rst)",
                            )
                        )
                    else:
                        row.problems.append(
                            Problem(
                                "dry-run-failed",
                                f"{action} DryRun failed ({verdict}): run check again; if it "
                                "persists, look at the instance in the EC2 console",
                            )
                        )
        return rows
    finally:
        client.close()


_PLACEMENT_CODES = frozenset(
    {"not-found", "duplicate-name", "other-vpc", "public-ip", "pool-tag", "terminated",
     "refused", "state", "describe-failed"}
)


async def _check(reactor: Any, config: Any) -> tuple[list[Row], list[str]]:
    targets, notes = await _targets_from_config(config)
    for note in notes:
        _progress(f"note: {note}")
    groups: dict[tuple, list[Target]] = {}
    for t in targets:
        groups.setdefault(t.aws.key(), []).append(t)
    by_target: dict[int, Row] = {}
    for group in groups.values():
        for row in await _check_group(reactor, group[0].aws, group):
            by_target[id(row.target)] = row
    return [by_target[id(t)] for t in targets], notes


def run_check(args: argparse.Namespace) -> int:
    if args.verbose:
        from twisted.python import log

        log.startLogging(sys.stderr, setStdout=False)
    try:
        config, basedir, filename = load_master_config(args.path)
    except ConfigLoadFailed as e:
        print(f"configuration errors in {args.path}:", file=sys.stderr)
        for err in e.errors:
            print(f"  {err}", file=sys.stderr)
        if e.detail:
            print(e.detail.rstrip(), file=sys.stderr)
        print(
            "fix them and run check again (`buildbot checkconfig` shows the same errors)",
            file=sys.stderr,
        )
        if args.json:
            print(json.dumps({"config": args.path, "config_errors": e.errors}, indent=2))
        return EXIT_UNUSABLE
    cfg_path = os.path.join(basedir, filename)
    _progress(f"loaded {cfg_path}")

    cwd = os.getcwd()
    os.chdir(basedir)  # secret providers may name directories relative to the master
    try:
        rows, notes = _react(lambda reactor: _check(reactor, config))
    finally:
        os.chdir(cwd)

    failed = [r for r in rows if not r.ok]
    counts: dict[str, int] = {}
    for r in failed:
        for p in r.problems:
            counts[p.code] = counts.get(p.code, 0) + 1
    if not rows:
        summary = f"{cfg_path} declares no EC2Pool service and no EC2PoolWorker: nothing to check"
    else:
        ok = len(rows) - len(failed)
        summary = f"{len(rows)} instance(s) checked: {ok} OK, {len(failed)} FAIL"
        if counts:
            summary += " (" + ", ".join(f"{c}: {n}" for c, n in sorted(counts.items())) + ")"
    code = EXIT_PROBLEMS if failed else EXIT_OK
    if args.json:
        print(
            json.dumps(
                {
                    "config": cfg_path,
                    "rows": [r.to_json() for r in rows],
                    "notes": notes,
                    "summary": summary,
                    "exit_code": code,
                },
                indent=2,
            )
        )
        return code
    for line in check_table(rows):
        print(line)
    print(summary)
    return code


def check_table(rows: list[Row]) -> list[str]:
    if not rows:
        return []
    headers = ["WORKER", "POOL", "INSTANCE", "STATE", "AZ", "VERDICT", "FIX"]
    cells: list[list[str]] = []
    extra: dict[int, list[str]] = {}
    previous = None
    for r in rows:
        info = r.info
        fixes = [p.fix for p in r.problems] or [f"note: {n}" for n in r.notes] or ["-"]
        if r.problems and r.notes:
            fixes += [f"note: {n}" for n in r.notes]
        if fixes == previous and len(fixes[0]) > 40:
            fixes = ["(same as above)"]
        else:
            previous = fixes
        cells.append(
            [
                r.target.worker,
                r.target.owner,
                info.instance_id if info else (r.target.instance_id or "-"),
                info.state if info else "-",
                (info.availability_zone if info else None) or "-",
                "OK" if r.ok else "FAIL",
                fixes[0],
            ]
        )
        extra[len(cells) - 1] = fixes[1:]
    lines = _table(headers, cells)
    indent = len(lines[0]) - len("FIX")
    out = [lines[0]]
    for i, line in enumerate(lines[1:]):
        out.append(line)
        out += [" " * indent + more for more in extra[i]]
    return out


# ---------------------------------------------------------------------------------------------
# status: reading the master


class MasterUnreachable(Exception):
    pass


class _Master:
    """GETs JSON from a master's web server."""

    def __init__(self, base: str, timeout: float) -> None:
        if "://" not in base:
            base = "http://" + base
        # an address copied from the browser may carry the web UI's route (#/workers)
        parts = urllib.parse.urlsplit(base)
        self.base = urllib.parse.urlunsplit(parts._replace(query="", fragment="")).rstrip("/")
        self.base += "/"
        self.timeout = timeout
        host = urllib.parse.urlsplit(self.base).hostname or ""
        handlers: list[Any] = []
        if host in ("127.0.0.1", "localhost", "::1"):
            # a proxy from the environment must not intercept a loopback master
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    def get(self, path: str, **query: Any) -> tuple[int, Any]:
        """(HTTP status, parsed JSON or None). Raises MasterUnreachable when nothing answers."""
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise MasterUnreachable(
                f"cannot reach {self.base} ({reason}): is the master running? pass --master "
                "with its web UI's address, e.g. --master http://buildbot.example.com:8010/"
            ) from None
        try:
            return status, json.loads(body)
        except ValueError:
            return status, None

    def rest(self, path: str, **query: Any) -> Any:
        status, data = self.get(f"api/v2/{path}", **query)
        if status in (401, 403):
            raise MasterUnreachable(
                f"{self.base} refused the REST API (HTTP {status}): status needs read access "
                "without a login; allow anonymous viewing in the master's authz settings"
            )
        if status != 200 or not isinstance(data, dict):
            raise MasterUnreachable(
                f"{self.base}api/v2/{path} answered HTTP {status}"
                + ("" if isinstance(data, dict) else " without JSON")
                + ": is --master the address of a Buildbot web UI?"
            )
        return data


@dataclass
class PoolView:
    name: str
    source: str  # "plugin" or "rest"
    workers: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    degraded: str | None = None
    backlog: dict[str, int] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    #: name -> the worker dict of EC2Pool.status()
    reported: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the plugin could not read this pool's status (its workers then come from REST and EC2)
    error: str | None = None

    @property
    def partial(self) -> bool:
        return self.source == "rest" or self.error is not None


def _plugin_pools(master: _Master) -> tuple[list[PoolView] | None, str]:
    """The pools as the pool page's JSON (schema 1, see buildbot_ec2_hybrid.www) has them."""
    status, data = master.get(PLUGIN_PATH)
    if status != 200 or not isinstance(data, dict) or not isinstance(data.get("pools"), list):
        if status in (401, 403):
            why = f"HTTP {status}: the master's authz does not let status read it"
        elif status == 404:
            why = "HTTP 404: enable the www plugin with c['www']['plugins']['ec2_hybrid'] = {}"
        else:
            why = f"HTTP {status}" if status != 200 else "not the pools JSON"
        return None, f"{master.base}{PLUGIN_PATH}: {why}"
    pools = []
    for p in data["pools"]:
        reported = {w["name"]: w for w in p.get("workers") or [] if "name" in w}
        for w in reported.values():
            # idle times are computed against the master's clock
            w.setdefault("wall_time", data.get("generated_at"))
        pools.append(
            PoolView(
                name=p.get("pool", "?"),
                source="plugin",
                workers=list(reported),
                settings=p.get("settings") or {},
                degraded=p.get("degraded"),
                backlog=p.get("backlog") or {},
                usage=p.get("usage"),
                events=list(p.get("events") or []),
                reported=reported,
                error=p.get("error"),
            )
        )
    return pools, f"{master.base}{PLUGIN_PATH}"


def _latest_builds(
    master: _Master, workerids: dict[str, int]
) -> dict[str, dict[str, Any]]:
    """name -> the latest build of each worker (one bulk query, then one per worker not in it)."""
    latest: dict[str, dict[str, Any]] = {}
    names = {wid: name for name, wid in workerids.items()}
    bulk = master.rest("builds", order="-buildid", limit=500)["builds"]
    for b in bulk:
        name = names.get(b.get("workerid"))
        if name is not None and name not in latest:
            latest[name] = b
    for name, wid in workerids.items():
        if name not in latest and len(bulk) >= 500:
            found = master.rest("builds", workerid=wid, order="-buildid", limit=1)["builds"]
            if found:
                latest[name] = found[0]
    return latest


def _parse_prices(values: list[str]) -> dict[str, float]:
    prices = {}
    for v in values:
        kind, _, usd = v.partition("=")
        try:
            prices[kind.strip()] = float(usd)
        except ValueError:
            raise SystemExit(
                f"--price {v!r}: give TYPE=USD_PER_HOUR, e.g. --price m5.large=0.096"
            ) from None
    return prices


async def _describe_for_status(
    reactor: Any, aws: AWSSettings, names: list[str], pool_names: list[str]
) -> list[InstanceInfo]:
    """Pool instances by Name; with no names known (REST fallback), every instance that carries
    the pool tag (naming the pools when known)."""
    from buildbot_ec2_hybrid import ec2
    from buildbot_ec2_hybrid.worker import POOL_TAG

    client = ec2.EC2Client(aws, reactor, max_throttle_retries=3, backoff_cap=5.0)
    try:
        found: list[InstanceInfo] = []
        for i in range(0, len(names), _FILTER_CHUNK):
            chunk = names[i : i + _FILTER_CHUNK]
            found += await client.describe(filters=[{"Name": "tag:Name", "Values": chunk}])
        if pool_names:
            for i in range(0, len(pool_names), _FILTER_CHUNK):
                chunk = pool_names[i : i + _FILTER_CHUNK]
                found += await client.describe(
                    filters=[{"Name": f"tag:{POOL_TAG}", "Values": chunk}]
                )
        elif not names:
            found += await client.describe(filters=[{"Name": "tag-key", "Values": [POOL_TAG]}])
        unique = {i.instance_id: i for i in found}
        return list(unique.values())
    finally:
        client.close()


def _ec2_states(args: argparse.Namespace, pools: list[PoolView], names: list[str],
                pool_names: list[str]) -> tuple[list[InstanceInfo] | None, str]:
    """(instances or None, what happened)."""
    from buildbot_ec2_hybrid import ec2

    if args.no_ec2:
        return None, "skipped (--no-ec2)"
    regions = {p.settings.get("region") for p in pools if p.settings.get("region")}
    region = (
        args.region
        or (sorted(regions)[0] if len(regions) == 1 else None)
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
    )
    if not region:
        return None, "skipped: no region known; pass --region (or set AWS_REGION)"
    if len(regions) > 1 and not args.region:
        _progress(f"note: the pools are in several regions ({', '.join(sorted(regions))}); "
                  f"describing {region} only (pass --region to choose)")
    aws = ec2.AWSSettings(region=region, endpoint_url=args.endpoint_url, profile=args.profile)
    where = aws.endpoint_url or "AWS"
    _progress(f"describing the pool instances in {region} ({where})...")
    try:
        found = _react(lambda reactor: _describe_for_status(reactor, aws, names, pool_names))
    except ec2.EC2Error as err:
        return None, f"failed: {_describe_fix(err, aws)}"
    return found, f"DescribeInstances in {region} ({where})"


def _match_instance(
    name: str, reported_id: str | None, found: list[InstanceInfo], pool: str | None,
    vpc_id: str | None,
) -> InstanceInfo | None:
    from buildbot_ec2_hybrid.worker import POOL_TAG

    if reported_id:
        for info in found:
            if info.instance_id == reported_id:
                return info
    named = [i for i in found if i.name == name]
    for narrow in (
        lambda i: i.state not in _GONE_STATES,
        lambda i: pool is None or i.tags.get(POOL_TAG) == pool,
        lambda i: vpc_id is None or i.vpc_id == vpc_id,
    ):
        if len(named) > 1:
            named = [i for i in named if narrow(i)] or named
    return named[0] if len(named) == 1 else None


@dataclass
class _Sources:
    """What the master's REST API and EC2 said, for building each instance's entry."""

    rest: dict[str, dict[str, Any]]  # worker name -> /api/v2/workers entry
    latest: dict[str, dict[str, Any]]  # worker name -> its latest build
    builders: dict[int, str]
    found: list[InstanceInfo] | None  # None: EC2 not asked
    prices: dict[str, float]
    now: float


def _instance_entry(name: str, pool: PoolView, src: _Sources) -> dict[str, Any]:
    """One row of the status: the plugin's word first, then REST, then EC2 (for the EC2 state,
    EC2 itself first)."""
    reported = pool.reported.get(name, {})
    rest = src.rest.get(name, {})
    rest_info = rest.get("workerinfo") or {}
    reported_id = reported.get("instance_id") or rest_info.get("ec2_instance_id")
    info = None
    if src.found is not None:
        info = _match_instance(name, reported_id, src.found, pool.name, pool.settings.get("vpc_id"))
    connected = bool(rest.get("connected_to")) if rest else bool(reported.get("connected"))
    build = src.latest.get(name)
    if reported:
        building = bool(reported.get("building"))
    else:
        building = bool(build and not build.get("complete"))
    last_builder = reported.get("last_builder") or (
        src.builders.get(build["builderid"]) if build else None
    )
    # the current run: since the master revived it if it says so, else EC2's LaunchTime (the
    # time of the last start)
    started = _epoch(reported.get("running_since"))
    if started is None and info is not None and info.state in _UP_STATES:
        started = _epoch(info.launch_time)
    up_today = None
    if started is not None:
        up_today = max(0.0, src.now - max(started, _midnight_utc(src.now)))
    idle_for = None
    if connected and not building:
        if reported.get("idle_since") is not None:
            wall = _epoch(reported.get("wall_time")) or src.now
            idle_for = max(0.0, wall - float(reported["idle_since"]))
        else:
            since = [
                t
                for t in (_epoch(build.get("complete_at")) if build else None, started)
                if t is not None
            ]
            idle_for = max(0.0, src.now - max(since)) if since else None
    itype = (
        (info.instance_type if info else None)
        or reported.get("instance_type")
        or rest_info.get("ec2_instance_type")
    )
    cost = reported.get("today_cost_usd")
    price = src.prices.get(itype or "")
    if cost is None and up_today is not None and price is not None:
        cost = round(price * up_today / 3600, 4)
    if info is not None:
        state, state_source = info.state, "ec2"
    elif reported.get("instance_state"):
        state, state_source = reported["instance_state"], "master"
    else:
        state, state_source = None, None
    return {
        "name": name,
        "instance_id": info.instance_id if info else reported_id,
        "ec2_state": state,
        "ec2_state_source": state_source,
        "availability_zone": (info.availability_zone if info else None)
        or reported.get("availability_zone")
        or rest_info.get("ec2_availability_zone"),
        "instance_type": itype,
        "connected": connected,
        "building": building,
        "phase": reported.get("phase"),
        "last_builder": last_builder,
        "idle_for": idle_for,
        "uptime_today": up_today,
        "cost_today_usd": cost,
        "refused": reported.get("refused"),
    }


def _add_tagged_workers(
    pools: list[PoolView], found: list[InstanceInfo], configured: Iterable[str]
) -> None:
    """Pool instances (by their pool tag) whose worker never connected: the REST API cannot
    tell them from in-house workers, EC2 can. Only pools the plugin did not describe."""
    from buildbot_ec2_hybrid.worker import POOL_TAG

    configured = set(configured)
    known = {p.name: p for p in pools}
    from_plugin = any(p.source == "plugin" for p in pools)
    for info in found:
        tag = info.tags.get(POOL_TAG)
        if not tag or not info.name or info.name not in configured:
            continue
        if tag not in known:
            if from_plugin:
                continue  # the plugin lists every pool the master runs
            known[tag] = PoolView(tag, "rest", [])
            pools.append(known[tag])
        pool = known[tag]
        if pool.partial and info.name not in pool.workers:
            pool.workers.append(info.name)
    for p in pools:
        p.workers.sort()


def collect_status(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """The status document (what --json prints) and the exit code."""
    from buildbot_ec2_hybrid.usage import DEFAULT_PRICES

    prices = {**DEFAULT_PRICES, **_parse_prices(args.price)}
    master = _Master(args.master, args.timeout)
    warnings: list[str] = []
    code = EXIT_OK
    _progress(f"reading {master.base}...")
    pools, plugin_note = _plugin_pools(master)
    if pools is None:
        warnings.append(
            f"no pool page JSON ({plugin_note}); using the REST API: no backlog, events or "
            "usage, and no instance state without EC2"
        )
        pools_source = f"{master.base}api/v2/workers (REST API)"
    else:
        pools_source = plugin_note
    rest_workers = master.rest("workers")["workers"]
    by_name = {w["name"]: w for w in rest_workers}

    by_pool: dict[str, list[str]] = {}
    for w in rest_workers:
        pool = (w.get("workerinfo") or {}).get("ec2_pool")
        if pool:
            by_pool.setdefault(pool, []).append(w["name"])
    if pools is None:
        pools = [PoolView(n, "rest", sorted(ws)) for n, ws in sorted(by_pool.items())]
    for p in pools:
        if p.error is not None:
            warnings.append(f"the master could not report pool {p.name}: {p.error}")
            p.workers = sorted(set(p.workers) | set(by_pool.get(p.name, ())))

    names = sorted({n for p in pools for n in p.workers})
    found, ec2_note = _ec2_states(args, pools, names, [p.name for p in pools if p.partial])
    if ec2_note.startswith("failed"):
        warnings.append(f"EC2: {ec2_note}")
        code = EXIT_PROBLEMS
    if found is not None:
        _add_tagged_workers(pools, found, by_name)

    workerids = {n: by_name[n]["workerid"] for p in pools for n in p.workers if n in by_name}
    src = _Sources(
        rest=by_name,
        latest=_latest_builds(master, workerids) if workerids else {},
        builders={b["builderid"]: b["name"] for b in master.rest("builders")["builders"]},
        found=found,
        prices=prices,
        now=time.time(),
    )
    doc_pools = [
        {
            "pool": p.name,
            "source": p.source,
            "error": p.error,
            "degraded": p.degraded,
            "backlog": p.backlog,
            "settings": p.settings,
            "usage": p.usage,
            "events": p.events[-10:],
            "instances": [_instance_entry(name, p, src) for name in p.workers],
        }
        for p in pools
    ]
    if not doc_pools:
        if pools_source == plugin_note:
            warnings.append("the master runs no EC2Pool")
        else:
            warnings.append(
                "no pool found: no worker of the master reports an ec2_pool"
                + ("" if found is not None else "; pass --region so EC2 can name the pool "
                   "instances by their tag")
            )
    doc = {
        "master": master.base,
        "generated_at": src.now,
        "sources": {"pools": pools_source, "ec2": ec2_note},
        "warnings": warnings,
        "pools": doc_pools,
    }
    return doc, code


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def status_lines(doc: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for p in doc["pools"]:
        s = p.get("settings") or {}
        head = f"pool {p['pool']}"
        bits = [s[k] for k in ("region", "vpc_id") if s.get(k)]
        if s.get("hibernate"):
            bits.append("hibernate")
        if bits:
            head += f" ({', '.join(bits)})"
        if p.get("error"):
            head += f"  error: {p['error']}"
        elif p["source"] == "plugin":
            backlog = ", ".join(f"{b} {n}" for b, n in sorted(p["backlog"].items())) or "none"
            head += f"  backlog: {backlog}"
            head += f"  degraded: {p['degraded']}" if p.get("degraded") else "  healthy"
        out.append(head)
        rows = []
        for i in p["instances"]:
            state = i["ec2_state"] or "-"
            if i["ec2_state_source"] == "master":
                state += "*"
            activity = "building" if i["building"] else (i["phase"] or "")
            rows.append(
                [
                    i["name"],
                    i["instance_id"] or "-",
                    state,
                    _yes(i["connected"]) + (f" ({activity})" if activity else ""),
                    i["last_builder"] or "-",
                    format_duration(i["idle_for"]),
                    format_duration(i["uptime_today"]),
                    "-" if i["cost_today_usd"] is None else f"${i['cost_today_usd']:.2f}",
                ]
            )
            if i.get("refused"):
                rows[-1][-1] += f"  refused: {i['refused']}"
        out += [
            "  " + line
            for line in _table(
                ["WORKER", "INSTANCE", "EC2", "CONNECTED", "LAST BUILDER", "IDLE FOR",
                 "UP TODAY", "COST TODAY"],
                rows,
            )
        ]
        usage = p.get("usage")
        if usage:
            cost = usage.get("today_cost_usd")
            week = usage.get("week_cost_usd")
            out.append(
                f"  today: {usage.get('today_instance_hours', 0):.2f} instance-hours, "
                + ("cost unknown" if cost is None else f"${cost:.2f}")
                + f"; this week: {usage.get('week_instance_hours', 0):.2f} instance-hours, "
                + ("cost unknown" if week is None else f"${week:.2f}")
            )
        for e in p.get("events", [])[-5:]:
            when = datetime.datetime.fromtimestamp(float(e.get("time", 0))).strftime("%H:%M:%S")
            who = f" {e['worker']}" if e.get("worker") else ""
            out.append(f"  {when} {e.get('event')}{who}: {e.get('reason')}")
        out.append("")
    if any(i["ec2_state_source"] == "master" for p in doc["pools"] for i in p["instances"]):
        out.append("* state as the master last saw it (EC2 not asked)")
    out.append(
        "UP TODAY and COST TODAY cover the instance's current run (estimated from on-demand "
        "prices; --price TYPE=USD to adjust)"
    )
    out.append(f"sources: {doc['sources']['pools']}; EC2: {doc['sources']['ec2']}")
    return out


def run_status(args: argparse.Namespace) -> int:
    try:
        doc, code = collect_status(args)
    except MasterUnreachable as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNUSABLE
    for w in doc["warnings"]:
        _progress(f"warning: {w}")
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        for line in status_lines(doc):
            print(line)
    return code
