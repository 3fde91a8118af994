"""Multi-master Buildbot on loopback: a throwaway PostgreSQL cluster, a crossbar WAMP router, and a
:class:`MultiMasterLab` that runs several real masters sharing both, for the multi-master tests.

- :class:`PostgresServer` runs ``initdb``/``postgres`` from Debian's ``postgresql`` package (or any
  PostgreSQL on PATH) in a directory of its own, listening only on 127.0.0.1 and on a unix socket
  inside its data directory. PostgreSQL refuses to run as root: as root, the server runs as the
  ``postgres`` OS user that the Debian package creates.
- :class:`CrossbarRouter` runs ``crossbar`` (PyPI) with one web transport on 127.0.0.1 carrying
  a ``ws`` WebSocket path and the realm ``realm1`` open to anonymous clients.
- :class:`MultiMasterLab` is a :class:`~buildbot_ec2_hybrid.sandbox.lab.SandboxLab` with N masters
  on one database and one router: same ``master_examples/sandbox.cfg``, same sandbox region,
  instance agent and in-house workers, each in-house worker attached to one of the masters.

``tests/multimaster_setup.sh`` installs both on a fresh Debian machine. Nothing here talks to
anything but 127.0.0.1; the crossbar node runs the ``standalone`` personality, which has no
management uplink (the ``edge`` personality would dial a "fabric" controller).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from buildbot_ec2_hybrid.sandbox.farm import ChildProcess
from buildbot_ec2_hybrid.sandbox.farm import FarmError
from buildbot_ec2_hybrid.sandbox.farm import LocalMaster
from buildbot_ec2_hybrid.sandbox.farm import LocalWorker
from buildbot_ec2_hybrid.sandbox.farm import MasterStartError
from buildbot_ec2_hybrid.sandbox.farm import ProcessOwner
from buildbot_ec2_hybrid.sandbox.farm import RestClient
from buildbot_ec2_hybrid.sandbox.farm import child_env
from buildbot_ec2_hybrid.sandbox.farm import free_port
from buildbot_ec2_hybrid.sandbox.farm import tail_lines
from buildbot_ec2_hybrid.sandbox.farm import wait_for
from buildbot_ec2_hybrid.sandbox.lab import INHOUSE_PASSWORD
from buildbot_ec2_hybrid.sandbox.lab import SANDBOX_CFG
from buildbot_ec2_hybrid.sandbox.lab import LabSpec
from buildbot_ec2_hybrid.sandbox.lab import SandboxLab

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
REALM = "realm1"
#: what a master logs once it has joined the WAMP realm; "BuildMaster is running" is not enough,
#: a master whose router is unreachable says that too
WAMP_JOINED = "Wamp connection succeed!"

# a unix socket path (sun_path) holds at most 107 bytes
_MAX_SOCKET_PATH = 107
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class InfraError(FarmError):
    """PostgreSQL or crossbar is missing, or did not start."""


def find_postgres_bindir() -> Path | None:
    """The directory holding ``initdb``, ``postgres`` and ``createdb``, or None.

    Debian keeps them out of PATH, in /usr/lib/postgresql/<version>/bin: PATH first (following
    symlinks into the real directory), then the newest Debian version.
    """
    found = shutil.which("pg_ctl")
    if found:
        bindir = Path(found).resolve().parent
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    versions = []
    for candidate in Path("/usr/lib/postgresql").glob("*/bin"):
        if (candidate / "initdb").exists() and candidate.parent.name.isdigit():
            versions.append((int(candidate.parent.name), candidate))
    return max(versions)[1] if versions else None


def find_crossbar() -> str | None:
    """The ``crossbar`` executable of this venv (or on PATH), or None."""
    candidate = Path(sys.executable).parent / "crossbar"
    if candidate.exists():
        return str(candidate)
    return shutil.which("crossbar")


def missing_infra() -> list[str]:
    """What the multi-master tests need and this machine lacks (empty: all there)."""
    import importlib.util

    missing = []
    if find_postgres_bindir() is None:
        missing.append("PostgreSQL (initdb/postgres)")
    elif os.geteuid() == 0 and not _has_user("postgres"):
        missing.append("the 'postgres' OS user (PostgreSQL refuses to run as root)")
    if find_crossbar() is None:
        missing.append("crossbar")
    if importlib.util.find_spec("psycopg2") is None:
        missing.append("psycopg2")
    return missing


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


# --------------------------------------------------------------------------------------------
# PostgreSQL


class PostgresServer(ProcessOwner):
    """A throwaway PostgreSQL cluster in ``datadir``, on 127.0.0.1:``port`` (default: a free one).

    Trust authentication for the superuser ``postgres``, durability off (fsync, synchronous
    commit, full-page writes): nothing here outlives the test run. The server runs in the
    foreground as a child of this process (not daemonised by ``pg_ctl``), so the farm's process
    registry ends it with everything else if a test run is torn down early.

    As root the cluster runs as the ``postgres`` user, which must be able to reach its data
    directory; when ``datadir`` lies under a directory it cannot enter (pytest's tmp_path is
    under a 0700 directory), the cluster lives in a private directory under the system temp dir
    instead, ``datadir/data`` is a symlink to it, and stop() removes it. The server's log is
    always ``datadir/postgres.log``.
    """

    def __init__(self, datadir: Path, port: int | None = None) -> None:
        self.datadir = Path(datadir).resolve()
        self.port = port or free_port()
        self.host = LOOPBACK
        self._bindir: Path | None = None
        self._run_as: pwd.struct_passwd | None = None
        self._pgdata: Path | None = None
        self._outside: Path | None = None  # the private directory used instead of datadir
        self._proc: ChildProcess | None = None

    def __repr__(self) -> str:
        return f"<PostgresServer {self.host}:{self.port} in {self.datadir}>"

    @property
    def log_path(self) -> Path:
        return self.datadir / "postgres.log"

    @property
    def pgdata(self) -> Path:
        """The cluster directory (PGDATA), once started."""
        if self._pgdata is None:
            raise InfraError("PostgresServer not started")
        return self._pgdata

    def url(self, database: str) -> str:
        """SQLAlchemy URL of ``database``; psycopg2 named explicitly, as SQLAlchemy 2.1 would
        pick psycopg 3 for a bare ``postgresql://``."""
        return f"postgresql+psycopg2://postgres@{self.host}:{self.port}/{database}"

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> PostgresServer:
        if self.running:
            return self
        self._bindir = find_postgres_bindir()
        if self._bindir is None:
            raise InfraError("PostgreSQL not found: run tests/multimaster_setup.sh as root")
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam("postgres")
            except KeyError:
                raise InfraError(
                    "running as root, and PostgreSQL refuses to: no 'postgres' user to run it as "
                    "(Debian's postgresql package creates it)"
                ) from None
        self.datadir.mkdir(parents=True, exist_ok=True)
        if self._pgdata is None:
            self._pgdata = self._make_pgdata()
            self._initdb()
        socket_dir = str(self._pgdata)
        if len(socket_dir) + len(f"/.s.PGSQL.{self.port}") > _MAX_SOCKET_PATH:
            socket_dir = ""  # TCP only: a longer socket path would not bind
        argv = [
            str(self._bindir / "postgres"),
            "-D", str(self._pgdata),
            "-c", f"listen_addresses={LOOPBACK}",
            "-c", f"port={self.port}",
            "-c", f"unix_socket_directories={socket_dir}",
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
        ]  # fmt: skip
        self._proc = ChildProcess(
            f"postgres :{self.port}",
            self._as_postgres(argv),
            self.datadir,
            child_env(None),
            self.log_path,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self._proc.end(hard=True)
            raise
        log.info("postgres listening on %s:%d (%s)", self.host, self.port, self._pgdata)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Fast shutdown (SIGINT: disconnect clients, then exit), SIGKILL after ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is not None and not proc.poll():
            # SIGTERM would be a "smart" shutdown, which waits for every client to leave.
            try:
                os.kill(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while not proc.poll() and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.end(hard=True)
        if self._outside is not None:
            shutil.rmtree(self._outside, ignore_errors=True)
            (self.datadir / "data").unlink(missing_ok=True)
            self._outside = None
            self._pgdata = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- databases ----------------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        """Create database ``name`` (lower-case identifier) and return its SQLAlchemy URL."""
        self._client("createdb", name)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self._client("dropdb", "--if-exists", "--force", name)

    def _client(self, tool: str, *args: str) -> None:
        name = args[-1]
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"database name must be a lower-case identifier, got {name!r}")
        if not self.running:
            raise InfraError(f"{self!r} is not running")
        assert self._bindir is not None
        argv = [str(self._bindir / tool), "-h", self.host, "-p", str(self.port), "-U", "postgres"]
        result = subprocess.run(
            [*argv, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        )
        if result.returncode != 0:
            raise InfraError(f"{tool} {' '.join(args)} failed: {result.stderr.strip()}")

    # -- internals ----------------------------------------------------------------------------

    def _as_postgres(self, argv: list[str]) -> list[str]:
        if self._run_as is None:
            return argv
        # setpriv execs in place (no supervising parent as with runuser/su): the process this
        # module starts and signals is postgres itself.
        return [
            "setpriv",
            f"--reuid={self._run_as.pw_uid}",
            f"--regid={self._run_as.pw_gid}",
            "--clear-groups",
            "--",
            *argv,
        ]

    def _make_pgdata(self) -> Path:
        pgdata = self.datadir / "data"
        if pgdata.is_symlink():
            pgdata.unlink()
        if self._run_as is None:
            return pgdata
        os.chown(self.datadir, self._run_as.pw_uid, self._run_as.pw_gid)
        probe = subprocess.run(
            self._as_postgres(["test", "-w", str(self.datadir)]), stdin=subprocess.DEVNULL
        )
        if probe.returncode == 0:
            return pgdata
        self._outside = Path(tempfile.mkdtemp(prefix="bbec2h-pg-"))
        os.chown(self._outside, self._run_as.pw_uid, self._run_as.pw_gid)
        real = self._outside / "data"
        pgdata.symlink_to(real)
        return real

    def _initdb(self) -> None:
        assert self._bindir is not None and self._pgdata is not None
        argv = [
            str(self._bindir / "initdb"),
            "-D", str(self._pgdata),
            "-A", "trust",
            "-U", "postgres",
            "-E", "UTF8",
            "--locale=C",  # the machine may have no other locale generated
            "--no-sync",
        ]  # fmt: skip
        result = subprocess.run(
            self._as_postgres(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tempfile.gettempdir(),  # a directory the postgres user may stand in
        )
        (self.datadir / "initdb.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise InfraError(f"initdb failed in {self._pgdata}:\n{result.stderr[-2000:]}")

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None and self._pgdata is not None
        pidfile = self._pgdata / "postmaster.pid"
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll():
                raise InfraError(
                    f"postgres exited with code {self._proc.returncode} while starting:\n"
                    + tail_lines(self.log_path)
                )
            # line 8 of postmaster.pid is the server's status; "ready" = accepting connections
            try:
                lines = pidfile.read_text().splitlines()
            except (FileNotFoundError, PermissionError):
                lines = []
            if len(lines) >= 8 and lines[7].strip() == "ready" and _port_open(self.port):
                return
            if time.monotonic() >= deadline:
                raise InfraError(
                    f"postgres not ready after {timeout:g}s:\n" + tail_lines(self.log_path)
                )
            time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# crossbar


def crossbar_config(port: int, realm: str = REALM) -> dict[str, Any]:
    """A crossbar node config: one router, one web transport on 127.0.0.1:port serving only a
    WebSocket at ``/ws``, one realm whose anonymous role may publish, subscribe, call and register.

    No rawsocket transport, no static root or ``nodeinfo`` path (a ``nodeinfo`` resource at the
    root swallows ``/ws``), no web status page, no management uplink.
    """
    anyone = {
        "uri": "",
        "match": "prefix",
        "allow": {"call": True, "register": True, "publish": True, "subscribe": True},
        "disclose": {"caller": False, "publisher": False},
        "cache": True,
    }
    return {
        "version": 2,
        "controller": {},
        "workers": [
            {
                "type": "router",
                "realms": [
                    {"name": realm, "roles": [{"name": "anonymous", "permissions": [anyone]}]}
                ],
                "transports": [
                    {
                        "type": "web",
                        "endpoint": {"type": "tcp", "interface": LOOPBACK, "port": port},
                        "paths": {
                            "ws": {
                                "type": "websocket",
                                "serializers": ["cbor", "msgpack", "json"],
                                "options": {"enable_webstatus": False},
                            }
                        },
                    }
                ],
            }
        ],
    }


class CrossbarRouter(ProcessOwner):
    # pid is the node controller's; the router runs in a child process of it
    """A crossbar WAMP router node in ``workdir``, serving ``ws://127.0.0.1:PORT/ws``.

    The node directory is ``workdir/.crossbar``; ``crossbar init`` is not run: it only writes a
    template config (replaced here anyway) and the node's key pair, which ``crossbar start``
    generates itself when missing, and it costs ~4 s of start-up.
    """

    def __init__(self, workdir: Path, port: int | None = None, *, realm: str = REALM) -> None:
        self.workdir = Path(workdir).resolve()
        self.port = port or free_port()
        self.realm = realm
        self._proc: ChildProcess | None = None
        self._deadline = 0.0

    def __repr__(self) -> str:
        return f"<CrossbarRouter {self.url} in {self.workdir}>"

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws"

    @property
    def cbdir(self) -> Path:
        return self.workdir / ".crossbar"

    @property
    def log_path(self) -> Path:
        return self.workdir / "crossbar.log"

    def mq_config(self) -> dict[str, str]:
        """What a master's ``c['mq']`` needs to use this router."""
        return {"type": "wamp", "router_url": self.url, "realm": self.realm}

    def start(self, timeout: float = 60.0, *, wait: bool = True) -> CrossbarRouter:
        """Start the node; unless ``wait`` is False, return once ``/ws`` answers (~4 s)."""
        if self.running:
            return self
        executable = find_crossbar()
        if executable is None:
            raise InfraError("crossbar not found: run tests/multimaster_setup.sh")
        self.cbdir.mkdir(parents=True, exist_ok=True)
        (self.cbdir / "config.json").write_text(json.dumps(crossbar_config(self.port, self.realm)))
        env = child_env({"PYTHONUNBUFFERED": "1"})
        # none of these may point the node at another directory, config or controller
        for var in ("CROSSBAR_DIR", "CROSSBAR_CONFIG", "CROSSBAR_FABRIC_URL"):
            env.pop(var, None)
        argv = [
            executable,
            "standalone",  # what `crossbar start` falls back to; said explicitly
            "start",
            "--cbdir", str(self.cbdir),
            "--color", "false",
            "--logformat", "standard",
            "--loglevel", "info",
        ]  # fmt: skip
        self._proc = ChildProcess(f"crossbar :{self.port}", argv, self.workdir, env, self.log_path)
        self._deadline = time.monotonic() + timeout
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Wait until the WebSocket path is served (the port listens a moment before it is)."""
        assert self._proc is not None, "start() first"
        session = requests.Session()
        session.trust_env = False
        while True:
            if self._proc.poll():
                raise InfraError(
                    f"crossbar exited with code {self._proc.returncode} while starting:\n"
                    + tail_lines(self.log_path)
                )
            try:
                # a plain GET on a WebSocket path is refused with a 4xx other than 404
                status = session.get(f"http://{LOOPBACK}:{self.port}/ws", timeout=1).status_code
            except requests.RequestException:
                status = None
            if status is not None and status != 404:
                log.info("crossbar router serving %s", self.url)
                return
            if time.monotonic() >= self._deadline:
                self._proc.end(hard=True)
                raise InfraError(
                    "crossbar did not serve /ws in time:\n" + tail_lines(self.log_path)
                )
            time.sleep(0.2)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the node stops its router worker), SIGKILL after ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.end(timeout=timeout)

    def __enter__(self) -> CrossbarRouter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Several masters


class MultiMasterLab(SandboxLab):
    """A sandbox farm with ``masters`` real masters on one PostgreSQL database and one router.

    Every master runs ``master_examples/sandbox.cfg`` with the same ``sandbox.json`` but its own
    basedir (``workdir/master1`` ...), PB and web ports, plus ``db_url`` (a fresh database of the
    shared server), ``multiMaster: true`` and the router as ``mq``. In-house workers are spread
    over the masters round-robin (inhouse-1 on master 0, inhouse-2 on master 1...) unless
    ``worker_masters`` names a master index per worker. The instance agent sends instance
    workers to master 0 unless an instance's ``buildbot-ec2-hybrid:master`` tag says otherwise.

    ``postgres`` and ``router``, if given, are shared infrastructure started by the caller (start
    them once per test module: crossbar takes seconds) and are left running by stop(); otherwise
    the lab starts and stops its own. Labs sharing a router must not run at the same time: they
    share its realm.

    The inherited single-master API (``master``, ``pb_port``, ``www_port``, ``rest``, ``force``,
    ``wait_requests_complete``...) acts on the *primary* master: master 0 at first, and the first
    running master once the primary is killed or stopped. ``rest_of(i)`` talks to master i
    (``rest`` is the inherited property, so it cannot take an index).
    """

    def __init__(
        self,
        workdir: Path,
        spec: LabSpec | None = None,
        *,
        masters: int = 2,
        postgres: PostgresServer | None = None,
        router: CrossbarRouter | None = None,
        database: str | None = None,
        worker_masters: dict[str, int] | None = None,
        wamp_timeout: float = 20.0,
    ) -> None:
        if masters < 1:
            raise ValueError("masters must be at least 1")
        super().__init__(workdir, spec)
        bad = {w: i for w, i in (worker_masters or {}).items() if not 0 <= i < masters}
        if bad:
            raise ValueError(f"worker_masters names masters that do not exist: {bad}")
        self.n_masters = masters
        self.postgres = postgres
        self.router = router
        self._own_postgres = postgres is None
        self._own_router = router is None
        self.database = database or f"lab_{os.getpid()}_{time.monotonic_ns() % 10**9}"
        self.db_url: str | None = None
        self.worker_masters = dict(worker_masters or {})
        self.wamp_timeout = wamp_timeout
        self.masters: list[LocalMaster] = []
        self.primary = 0
        self._workers_by_name: dict[str, LocalWorker] = {}
        self._used_ports: set[int] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> MultiMasterLab:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_infra()
        self.start_region()
        # master 0 alone runs upgrade-master, which creates the schema; the others share it
        for _ in range(self.n_masters):
            self.add_master()
        self.start_agent(self.masters[0].pb_address)
        for name in self.inhouse_names:
            self.move_worker(name, self.master_of(name))

    def _start_infra(self) -> None:
        if self.router is None:
            self.router = CrossbarRouter(self.workdir / "crossbar")
        if self.postgres is None:
            self.postgres = PostgresServer(self.workdir / "postgres")
        # crossbar takes seconds to boot: let it while PostgreSQL starts
        router_starting = not self.router.running
        if router_starting:
            self.router.start(wait=False)
        if not self.postgres.running:
            self.postgres.start()
        if router_starting:
            self.router.wait_ready()
        self.db_url = self.postgres.create_database(self.database)

    def stop(self) -> None:
        for w in self.inhouse:
            w.stop(wait=False)
        for w in self.inhouse:
            w.stop()
        # masters before the router: a master that loses its router shuts itself down
        for m in self.masters:
            if m.running:
                m.stop()
        if self.agent is not None:
            self.agent.stop()
        if self.region is not None:
            self.region.stop()
        if self.postgres is not None and self.postgres.running and self.db_url is not None:
            if not self._own_postgres:
                try:
                    self.postgres.drop_database(self.database)
                except FarmError as e:
                    log.warning("dropping %s: %s", self.database, e)
        if self._own_router and self.router is not None:
            self.router.stop()
        if self._own_postgres and self.postgres is not None:
            self.postgres.stop()

    def __enter__(self) -> MultiMasterLab:
        return self.start()

    # -- masters ------------------------------------------------------------------------------

    def add_master(self) -> int:
        """Create and start one more master on the shared database and router (a master joining
        a running farm); return its index. It has no worker until move_worker() sends one."""
        i = len(self.masters)
        pb_port, www_port = self._free_port(), self._free_port()
        master = LocalMaster(
            self.workdir / f"master{i + 1}",
            SANDBOX_CFG.read_text(),
            pb_port=pb_port,
            www_port=www_port,
        )
        self.masters.append(master)
        if i == 0:
            self._set_primary(0)
        else:
            # The first master's upgrade-master created the shared schema; running it again for
            # every master would cost ~3 s each and race a busy farm for nothing. (farm.py has
            # no public switch for this yet.)
            master.write_config()
            master._created = True
        self._write_master_files(i)
        self.start_master(i)
        return i

    def start_master(self, i: int, timeout: float = 90.0) -> None:
        """Start (or restart, after kill() or stop_master()) master i, and wait until its REST
        API reports it active and it has joined the WAMP realm."""
        master = self.masters[i]
        offset = master.log_path.stat().st_size if master.log_path.exists() else 0
        master.start(timeout=timeout)
        self._wait_wamp_joined(i, offset)
        if not self.masters[self.primary].running:
            self._set_primary(i)

    def kill(self, i: int) -> None:
        """SIGKILL master i, as a crash would."""
        self.masters[i].kill()
        self._repoint_primary()

    def stop_master(self, i: int) -> None:
        """Stop master i cleanly (SIGTERM)."""
        self.masters[i].stop()
        self._repoint_primary()

    def rest_of(self, i: int) -> RestClient:
        return self.masters[i].rest

    def master_ids(self) -> dict[int, int]:
        """{master index: Buildbot masterid}, from the database (any running master answers)."""
        by_suffix = {f":{m.basedir}": i for i, m in enumerate(self.masters)}
        ids = {}
        for row in self.rest.get("masters")["masters"]:
            for suffix, i in by_suffix.items():
                if row["name"].endswith(suffix):
                    ids[i] = row["masterid"]
        return ids

    def _wait_wamp_joined(self, i: int, offset: int) -> None:
        master = self.masters[i]
        log_path = master.log_path

        def joined() -> bool:
            with open(log_path, "rb") as f:
                f.seek(offset)
                return WAMP_JOINED.encode() in f.read()

        try:
            wait_for(joined, self.wamp_timeout, what=f"master {i} to join the WAMP realm")
        except TimeoutError as e:
            master.stop(timeout=10)
            raise MasterStartError(
                f"master {i} ({master.basedir}) started but never joined the WAMP realm at "
                f"{self.router.url if self.router else '?'} within {self.wamp_timeout:g}s.\n"
                f"--- tail of {log_path} ---\n{tail_lines(log_path)}"
            ) from e

    def _set_primary(self, i: int) -> None:
        self.primary = i
        self.master = self.masters[i]
        self.pb_port = self.master.pb_port
        self.www_port = self.master.www_port

    def _repoint_primary(self) -> None:
        if self.masters[self.primary].running:
            return
        for i, m in enumerate(self.masters):
            if m.running:
                self._set_primary(i)
                return

    def _free_port(self) -> int:
        while True:
            port = free_port()
            if port not in self._used_ports:
                self._used_ports.add(port)
                return port

    # -- workers ------------------------------------------------------------------------------

    def master_of(self, worker: str) -> int:
        """The index of the master in-house ``worker`` connects to (or will, at start)."""
        if worker in self._workers_by_name:
            return self._master_index_of(self._workers_by_name[worker].master)
        if worker in self.worker_masters:
            return self.worker_masters[worker]
        return self.inhouse_names.index(worker) % self.n_masters

    def move_worker(self, worker: str, i: int) -> LocalWorker:
        """(Re)start in-house ``worker`` attached to master i; its directory is kept."""
        old = self._workers_by_name.pop(worker, None)
        if old is not None:
            old.stop()
            self.inhouse.remove(old)
        new = LocalWorker(
            self.workdir / "inhouse" / worker,
            worker,
            INHOUSE_PASSWORD,
            master=self.masters[i].pb_address,
        )
        new.start()
        self.inhouse.append(new)
        self._workers_by_name[worker] = new
        self.worker_masters[worker] = i
        return new

    def _master_index_of(self, pb_address: str) -> int:
        for i, m in enumerate(self.masters):
            if m.pb_address == pb_address:
                return i
        raise KeyError(pb_address)

    # -- configuration ------------------------------------------------------------------------

    def settings(self, i: int | None = None) -> dict[str, Any]:
        """sandbox.json of master i (default: the primary)."""
        assert self.router is not None and self.db_url is not None
        master = self.masters[self.primary if i is None else i]
        return {
            **super().settings(),
            "pb_port": master.pb_port,
            "www_port": master.www_port,
            "db_url": self.db_url,
            "multiMaster": True,
            "mq": self.router.mq_config(),
        }

    def write_master_settings(self, basedir=None, settings=None) -> None:
        if basedir is not None:
            super().write_master_settings(basedir, settings)
            return
        for i in range(len(self.masters)):
            self._write_master_files(i)

    def _write_master_files(self, i: int) -> None:
        super().write_master_settings(self.masters[i].basedir, self.settings(i))
