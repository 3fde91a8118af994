"""Real Buildbot master and worker processes on loopback, for the demo and the integration tests.

Every process is started by this module in its own session, in the foreground (``twistd
--nodaemon``), with the venv's own executables. Each one is remembered in a registry until it is
reaped, so :func:`cleanup_all` (also run at interpreter exit) can end whatever is left, and the
whole session is swept when its leader exits, so build steps started by a worker never outlive
it. The generated ``buildbot.tac`` files also make a process exit by itself if the harness dies
without cleaning up.

Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from typing import TypeVar

import requests

log = logging.getLogger(__name__)

T = TypeVar("T")

# The masters a test starts must import this very checkout of the plugin, installed or not.
_PROJECT_ROOT = Path(__file__).resolve().parents[2]

_LOG_ROTATE_LENGTH = 10_000_000
_LOG_MAX_ROTATED = 3
_TAIL_LINES = 40
# The web UI shows at most 18 characters of a title (Buildbot warns beyond that).
DEFAULT_TITLE = "EC2 hybrid sandbox"


class FarmError(RuntimeError):
    """A master or worker process could not be set up or started."""


class MasterStartError(FarmError):
    """A master did not come up; the message carries the tail of its logs."""


class RestError(FarmError):
    """The master's REST or JSON-RPC API answered with an error."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    predicate: Callable[[], T], timeout: float, interval: float = 0.2, what: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises TimeoutError naming ``what`` when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def _venv_executable(name: str) -> str:
    # sys.executable is not resolved on purpose: a venv's python is a symlink out of the venv.
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FarmError(f"cannot find the {name!r} executable next to {sys.executable} or on PATH")
    return found


def child_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    # A master running the plugin must never reach the real instance metadata service.
    env.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    if extra:
        env.update(extra)
    return env


def tail_lines(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return f"({path.name} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes in session ``sid``; empty where /proc is unavailable."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after its last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3 and fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry))
    return members


# --------------------------------------------------------------------------------------------
# Process registry


_registry_lock = threading.Lock()
_registry: set[ChildProcess] = set()


class ChildProcess:
    """One child process this module started, ended together with everything in its session."""

    def __init__(self, label: str, argv: list[str], cwd: Path, env: dict[str, str], out: Path):
        self.label = label
        self._lock = threading.Lock()
        self._kill_at: float | None = None
        self._killed = False
        with open(out, "ab") as out_file:
            # A session of its own: a Ctrl-C at the terminal reaches only the harness, which then
            # ends its children in order; and the session id finds every descendant later.
            self._popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self._popen.pid
        with _registry_lock:
            _registry.add(self)

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def poll(self) -> bool:
        """True once the process has exited and been reaped (escalating to SIGKILL if due)."""
        with self._lock:
            if self._popen.returncode is not None:
                return True
            try:
                exited = (
                    os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
                )
            except ChildProcessError:
                exited = True
            if not exited:
                if self._kill_at is not None and not self._killed:
                    if time.monotonic() >= self._kill_at:
                        log.warning("%s (pid %d) ignored SIGTERM: SIGKILL", self.label, self.pid)
                        self._signal(signal.SIGKILL)
                return False
            # The leader is a zombie until reaped, so its pid (= the session id) cannot be reused
            # yet: sweep the session first, then reap.
            for _ in range(10):
                members = [p for p in _session_members(self.pid) if p != self.pid]
                if not members:
                    break
                for pid in members:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.02)
            self._popen.wait()
        with _registry_lock:
            _registry.discard(self)
        return True

    def _signal(self, sig: int) -> None:
        if sig == signal.SIGKILL:
            self._killed = True
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def end(self, *, hard: bool = False, timeout: float = 30.0, wait: bool = True) -> None:
        """SIGTERM (or SIGKILL if ``hard``), SIGKILL after ``timeout``; wait for it if asked."""
        with self._lock:
            if self._popen.returncode is None:
                if hard and not self._killed:
                    self._signal(signal.SIGKILL)
                elif self._kill_at is None:
                    self._signal(signal.SIGTERM)
                if self._kill_at is None:
                    self._kill_at = time.monotonic() + (0.0 if hard else timeout)
        if wait:
            while not self.poll():
                time.sleep(0.05)


def live_processes() -> list[tuple[str, int]]:
    """(label, pid) of every process this module started and has not reaped yet."""
    with _registry_lock:
        return sorted((p.label, p.pid) for p in _registry)


def cleanup_all(timeout: float = 15.0) -> list[str]:
    """End every process this module started (SIGTERM, then SIGKILL); return their labels."""
    ended: list[str] = []
    # More than one round: an instance agent still running may start a worker meanwhile.
    for _ in range(3):
        with _registry_lock:
            procs = list(_registry)
        if not procs:
            break
        for proc in procs:
            proc.end(timeout=timeout, wait=False)
        for proc in procs:
            proc.end(timeout=timeout, wait=True)
        ended += (p.label for p in procs)
    return sorted(ended)


atexit.register(cleanup_all)


# Included in every generated buildbot.tac: the child runs in its own session, so if the harness
# dies without cleaning up (SIGKILL, a killed CI job), nothing else would ever stop it. The
# harness pid is written in, not read at start-up: the harness may already be gone by then.
_ORPHAN_WATCH = """
from twisted.internet import task as _task


class _ExitWhenOrphaned(service.Service):
    _loop = None

    def startService(self):
        service.Service.startService(self)
        from twisted.internet import reactor

        def check():
            if os.getppid() != {harness_pid}:
                self._loop.stop()
                reactor.stop()

        self._loop = _task.LoopingCall(check)
        reactor.callWhenRunning(self._loop.start, 1.0)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return service.Service.stopService(self)


_ExitWhenOrphaned().setServiceParent(application)
"""


def _orphan_watch() -> str:
    return _ORPHAN_WATCH.format(harness_pid=os.getpid())


_LOG_OBSERVER = f"""
from twisted.python.log import FileLogObserver
from twisted.python.log import ILogObserver
from twisted.python.logfile import LogFile

application.setComponent(
    ILogObserver,
    FileLogObserver(
        LogFile.fromFullPath(
            os.path.join(basedir, "twistd.log"),
            rotateLength={_LOG_ROTATE_LENGTH},
            maxRotatedFiles={_LOG_MAX_ROTATED},
        )
    ).emit,
)
"""

_TWISTD_ARGS = ["--nodaemon", "--no_save", "--pidfile=", "-y", "buildbot.tac"]


def _new_log_text(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            # A rotation since `offset` was taken leaves a shorter file: read all of it.
            f.seek(offset if f.tell() >= offset else 0)
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


# --------------------------------------------------------------------------------------------
# Master


def master_cfg_header(
    pb_port: int,
    www_port: int,
    db_url: str = "sqlite:///state.sqlite",
    title: str = DEFAULT_TITLE,
) -> str:
    """The common start of a sandbox master.cfg: loopback-only PB and web, no usage reporting.

    Leaves empty ``workers``, ``builders``, ``schedulers`` and ``services`` lists to append to.
    """
    www_url = f"http://127.0.0.1:{www_port}/"
    return f"""\
# -*- python -*-
from buildbot.plugins import *  # noqa: F401,F403

c = BuildmasterConfig = {{}}
c["title"] = {title!r}
c["titleURL"] = {www_url!r}
c["buildbotURL"] = {www_url!r}
c["protocols"] = {{"pb": {{"port": "tcp:{pb_port}:interface=127.0.0.1"}}}}
c["www"] = {{"port": "tcp:{www_port}:interface=127.0.0.1", "plugins": {{}}}}
c["db"] = {{"db_url": {db_url!r}}}
# Never phone home to buildbot.net: the sandbox talks to loopback only.
c["buildbotNetUsageData"] = None
c["workers"] = []
c["builders"] = []
c["schedulers"] = []
c["services"] = []
"""


class ProcessOwner:
    """What every object running one child process (master, worker, database, router) reports
    about it."""

    _proc: ChildProcess | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and not self._proc.poll()

    @property
    def returncode(self) -> int | None:
        """Exit code of the last process (negative: killed by that signal); None if running."""
        return self._proc.returncode if self._proc is not None else None


class TwistdProcess(ProcessOwner):
    """A twistd process (master or worker) running in ``basedir``."""

    basedir: Path

    @property
    def log_path(self) -> Path:
        return self.basedir / "twistd.log"

    @property
    def output_path(self) -> Path:
        """stdout and stderr of the process: what happens before logging is set up."""
        return self.basedir / "twistd.stdout"


class LocalMaster(TwistdProcess):
    """A real ``buildbot`` master process in ``basedir``, serving REST on 127.0.0.1:www_port."""

    def __init__(
        self,
        basedir: Path,
        master_cfg: str,
        *,
        pb_port: int,
        www_port: int,
        env: dict[str, str] | None = None,
    ) -> None:
        self.basedir = Path(basedir).resolve()
        self.master_cfg = master_cfg
        self.pb_port = pb_port
        self.www_port = www_port
        self.env = env
        self._proc: ChildProcess | None = None
        self._created = False

    @classmethod
    def with_free_ports(
        cls,
        basedir: Path,
        cfg_body: str,
        *,
        db_url: str = "sqlite:///state.sqlite",
        title: str = DEFAULT_TITLE,
        env: dict[str, str] | None = None,
    ) -> LocalMaster:
        """A master whose master.cfg is master_cfg_header() on two free ports, then cfg_body."""
        pb_port, www_port = free_port(), free_port()
        while www_port == pb_port:
            www_port = free_port()
        cfg = master_cfg_header(pb_port, www_port, db_url=db_url, title=title) + cfg_body
        return cls(basedir, cfg, pb_port=pb_port, www_port=www_port, env=env)

    def __repr__(self) -> str:
        return f"<LocalMaster {self.basedir} www={self.www_port} pb={self.pb_port}>"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.www_port}/"

    @property
    def pb_address(self) -> str:
        """What a worker is given as its master address."""
        return f"127.0.0.1:{self.pb_port}"

    @property
    def rest(self) -> RestClient:
        return RestClient(self.url)


    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _tac(self) -> str:
        return (
            f"""\
# Written by buildbot_ec2_hybrid.sandbox.farm.
import os

from twisted.application import service

from buildbot.master import BuildMaster

basedir = {str(self.basedir)!r}
configfile = "master.cfg"

# note: upgrade-master looks for this line to recognise a master directory.
application = service.Application('buildmaster')
"""
            + _LOG_OBSERVER
            + f"""
m = BuildMaster(basedir, configfile, None)
m.setServiceParent(application)
m.log_rotation.rotateLength = {_LOG_ROTATE_LENGTH}
m.log_rotation.maxRotatedFiles = {_LOG_MAX_ROTATED}
"""
            + _orphan_watch()
        )

    def write_config(self) -> None:
        """Write buildbot.tac and the current ``master_cfg`` text into basedir.

        start() does this too, so setting ``master_cfg`` and calling restart() applies it.
        """
        self.basedir.mkdir(parents=True, exist_ok=True)
        (self.basedir / "buildbot.tac").write_text(self._tac(), encoding="utf-8")
        (self.basedir / "master.cfg").write_text(self.master_cfg, encoding="utf-8")

    def create(self, timeout: float = 120.0) -> None:
        """Write the master directory and create or upgrade its database."""
        self.write_config()
        try:
            result = subprocess.run(
                [_venv_executable("buildbot"), "upgrade-master", str(self.basedir)],
                cwd=self.basedir,
                env=child_env(self.env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise MasterStartError(f"buildbot upgrade-master timed out in {self.basedir}") from e
        # Buildbot's scripts have exited 0 on some failures: trust the success line as well.
        if result.returncode != 0 or "upgrade complete" not in result.stdout:
            tail = "\n".join(result.stdout.splitlines()[-_TAIL_LINES:])
            raise MasterStartError(
                f"buildbot upgrade-master failed in {self.basedir} "
                f"(exit {result.returncode}):\n{tail}"
            )
        self._created = True

    def start(self, timeout: float = 60.0) -> None:
        """Start the master and return once its REST API reports it active."""
        if self.running:
            return
        if not self._created:
            self.create()
        else:
            self.write_config()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._proc = ChildProcess(
            f"master {self.basedir.name}",
            [_venv_executable("twistd"), *_TWISTD_ARGS],
            self.basedir,
            child_env(self.env),
            self.output_path,
        )
        try:
            self._wait_started(offset, timeout)
        except BaseException:
            self._proc.end(timeout=10)
            raise

    def _wait_started(self, offset: int, timeout: float) -> None:
        assert self._proc is not None
        rest = self.rest
        deadline = time.monotonic() + timeout
        log_says_running = False
        while True:
            if self._proc.poll():
                self._fail(f"exited with code {self._proc.returncode} while starting")
            if not log_says_running:
                new = _new_log_text(self.log_path, offset)
                if "BuildMaster startup failed" in new:
                    self._fail("reported 'BuildMaster startup failed'")
                log_says_running = "BuildMaster is running" in new
            if log_says_running and self._rest_reports_active(rest):
                return
            if time.monotonic() >= deadline:
                self._fail(f"did not report itself active within {timeout:g}s")
            time.sleep(0.2)

    def _rest_reports_active(self, rest: RestClient) -> bool:
        # The master names itself "<host>:<basedir>"; several masters may share one database.
        suffix = f":{self.basedir}"
        try:
            masters = rest.get("masters", timeout=2.0)["masters"]
        except (requests.RequestException, RestError):
            return False
        return any(m["name"].endswith(suffix) and m["active"] for m in masters)

    def _fail(self, why: str) -> None:
        raise MasterStartError(
            f"master in {self.basedir} {why}.\n"
            f"--- tail of {self.log_path} ---\n{tail_lines(self.log_path)}\n"
            f"--- tail of {self.output_path} ---\n{tail_lines(self.output_path)}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, and SIGKILL if it has not exited after ``timeout`` seconds."""
        if self._proc is not None:
            self._proc.end(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self._proc is not None:
            self._proc.end(hard=True)

    def restart(self, timeout: float = 60.0) -> None:
        self.stop()
        self.start(timeout=timeout)


# --------------------------------------------------------------------------------------------
# REST client


class RestClient:
    """A small client of a master's ``/api/v2`` REST and JSON-RPC API."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.timeout = timeout
        self._session = requests.Session()
        # Loopback only: no proxy from the environment may intercept these requests.
        self._session.trust_env = False

    def _url(self, path: str) -> str:
        return f"{self.base_url}api/v2/{path.lstrip('/')}"

    def get(self, path: str, *, timeout: float | None = None, **params: Any) -> dict:
        """GET ``/api/v2/<path>``; params are Buildbot filters (``claimed=False``), limit..."""
        query = {k: _query_value(v) for k, v in params.items()}
        resp = self._session.get(self._url(path), params=query, timeout=timeout or self.timeout)
        if resp.status_code != 200:
            raise RestError(f"GET {resp.url} -> HTTP {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    def workers(self) -> list[dict]:
        return self.get("workers")["workers"]

    def worker(self, name: str) -> dict | None:
        found = self.get("workers", name=name)["workers"]
        return found[0] if found else None

    def worker_connected(self, name: str) -> bool:
        worker = self.worker(name)
        return bool(worker and worker["connected_to"])

    def builders(self) -> list[dict]:
        return self.get("builders")["builders"]

    def builder_id(self, name: str) -> int:
        found = self.get("builders", name=name)["builders"]
        if not found:
            raise KeyError(f"no builder named {name!r} on {self.base_url}")
        return found[0]["builderid"]

    def builds(self, builder: str | int | None = None, **filters: Any) -> list[dict]:
        """Builds, optionally of one builder (name or id) and matching Buildbot filters."""
        if builder is not None:
            filters["builderid"] = builder if isinstance(builder, int) else self.builder_id(builder)
        return self.get("builds", **filters)["builds"]

    def buildrequests(self, **filters: Any) -> list[dict]:
        return self.get("buildrequests", **filters)["buildrequests"]

    def buildset(self, bsid: int) -> dict:
        return self.get(f"buildsets/{bsid}")["buildsets"][0]

    def force_build(
        self, scheduler_name: str, builder_name: str, **props: Any
    ) -> tuple[int, dict[int, int]]:
        """Force a build of one builder; ``props`` are the scheduler's fields (reason=...).

        Returns (buildset id, {builder id: build request id}).
        """
        params = dict(props, builderid=self.builder_id(builder_name))
        body = {"jsonrpc": "2.0", "method": "force", "id": 1, "params": params}
        resp = self._session.post(
            self._url(f"forceschedulers/{scheduler_name}"), json=body, timeout=self.timeout
        )
        try:
            reply = resp.json()
        except ValueError:
            reply = {}
        if resp.status_code != 200 or "error" in reply or "result" not in reply:
            raise RestError(
                f"force {scheduler_name}/{builder_name} -> HTTP {resp.status_code}: "
                f"{reply.get('error') or resp.text[:500]}"
            )
        bsid, brids = reply["result"]
        return bsid, {int(builderid): brid for builderid, brid in brids.items()}

    def wait_buildset(self, bsid: int, timeout: float = 60.0) -> dict:
        """Wait for a buildset to complete and return it (``results`` holds the outcome)."""
        return self.wait_for(
            lambda: (bs := self.buildset(bsid))["complete"] and bs,
            timeout,
            what=f"buildset {bsid} to complete",
        )

    @staticmethod
    def wait_for(
        predicate: Callable[[], T], timeout: float, interval: float = 0.2, what: str = "condition"
    ) -> T:
        return wait_for(predicate, timeout, interval=interval, what=what)


def _query_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


# --------------------------------------------------------------------------------------------
# Worker


class LocalWorker(TwistdProcess):
    """A real ``buildbot-worker`` process in ``basedir``; the directory outlives the process."""

    def __init__(
        self,
        basedir: Path,
        name: str,
        password: str,
        master: str = "127.0.0.1:9989",
        *,
        maxdelay: int = 2,
        keepalive: int = 600,
        env: dict[str, str] | None = None,
    ) -> None:
        host, _, port = master.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"master address must be 'host:port', got {master!r}")
        self.basedir = Path(basedir).resolve()
        self.name = name
        self.master = master
        self.maxdelay = maxdelay
        self.keepalive = keepalive
        self.env = env
        self._host = host
        self._port = int(port)
        self._password = password
        self._proc: ChildProcess | None = None

    def __repr__(self) -> str:
        return f"<LocalWorker {self.name} -> {self.master} in {self.basedir}>"


    def log_text(self) -> str:
        """twistd.log, with the password masked in case anything ever logged it."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return text.replace(self._password, "********") if self._password else text

    def _tac(self) -> str:
        return (
            f"""\
# Written by buildbot_ec2_hybrid.sandbox.farm.
import functools
import os

from twisted.application import service
from twisted.application.internet import backoffPolicy

import buildbot_worker.pb
from buildbot_worker.bot import Worker

basedir = {str(self.basedir)!r}

# note: this line is how buildbot-worker recognises a worker directory.
application = service.Application('buildbot-worker')
"""
            + _LOG_OBSERVER
            + f"""
# buildbot-worker 4.3 ignores `maxdelay`: it reconnects on twisted's default backoffPolicy(),
# which waits up to a minute. Cap it so the worker re-attaches within seconds of a master
# coming back.
buildbot_worker.pb.backoffPolicy = functools.partial(backoffPolicy, maxDelay={self.maxdelay})

s = Worker(
    {self._host!r},
    {self._port},
    {self.name!r},
    {self._password!r},
    basedir,
    {self.keepalive},
    maxdelay={self.maxdelay},
)
s.setServiceParent(application)
"""
            + _orphan_watch()
        )

    def create(self) -> None:
        """Write (or rewrite) buildbot.tac; everything else in basedir is left alone."""
        self.basedir.mkdir(parents=True, exist_ok=True)
        tac = self.basedir / "buildbot.tac"
        # Created private: the tac holds the password.
        fd = os.open(tac, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(self._tac())

    def start(self) -> None:
        """Spawn the worker process; it connects to the master on its own."""
        if self.running:
            return
        self.create()
        self._proc = ChildProcess(
            f"worker {self.name}",
            [_venv_executable("twistd"), *_TWISTD_ARGS],
            self.basedir,
            child_env(self.env),
            self.output_path,
        )

    def stop(self, timeout: float = 10.0, *, wait: bool = True) -> None:
        """SIGTERM, and SIGKILL after ``timeout``; with ``wait=False``, call poll() later."""
        if self._proc is not None:
            self._proc.end(timeout=timeout, wait=wait)

    def kill(self, *, wait: bool = True) -> None:
        if self._proc is not None:
            self._proc.end(hard=True, wait=wait)

    def poll(self) -> bool:
        """True when no process is running (reaping it, or escalating a due SIGKILL)."""
        return self._proc is None or self._proc.poll()
