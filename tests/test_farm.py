"""The process harness: real buildbot masters and buildbot-worker processes on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from buildbot_ec2_hybrid.sandbox import farm
from buildbot_ec2_hybrid.sandbox.farm import LocalMaster
from buildbot_ec2_hybrid.sandbox.farm import LocalWorker
from buildbot_ec2_hybrid.sandbox.farm import MasterStartError
from buildbot_ec2_hybrid.sandbox.farm import RestError
from buildbot_ec2_hybrid.sandbox.farm import wait_for

SUCCESS = 0  # buildbot.process.results.SUCCESS, without importing the master into pytest
PASSWORD = "pw-7f3a9c-not-in-argv"

CFG_BODY = f"""
c["workers"].append(worker.Worker("w1", {PASSWORD!r}))
c["builders"].append(util.BuilderConfig(
    name="marker",
    workernames=["w1"],
    factory=util.BuildFactory([
        steps.ShellCommand(command=["sh", "-c", "echo hi > marker.txt"]),
    ]),
))
# A step that outlives a hard-killed worker unless the harness sweeps the worker's session.
c["builders"].append(util.BuilderConfig(
    name="sleeper",
    workernames=["w1"],
    factory=util.BuildFactory([
        steps.ShellCommand(command=["sh", "-c", "echo $$ > step.pid; exec sleep 300"]),
    ]),
))
c["schedulers"].append(schedulers.ForceScheduler(name="force", builderNames=["marker", "sleeper"]))
"""


def process_gone(pid: int) -> bool:
    """True when pid is no process, or only a zombie nobody has reaped yet."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2 :].split()[0] == "Z"


def assert_reaped(pid: int) -> None:
    # Our own children: once reaped, the pid names nothing (os.kill(pid, 0) fails).
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    m = LocalMaster.with_free_ports(tmp_path_factory.mktemp("farm") / "master", CFG_BODY)
    m.start()
    yield m
    pid = m.pid
    m.stop()
    assert m.returncode == 0  # a clean shutdown, not the SIGKILL fallback
    assert_reaped(pid)


@pytest.fixture
def worker(master, tmp_path):
    w = LocalWorker(tmp_path / "w1", "w1", PASSWORD, master.pb_address)
    yield w
    w.stop()


def test_master_serves_on_loopback_only(master):
    assert master.running
    [me] = [m for m in master.rest.get("masters")["masters"] if m["active"]]
    assert me["name"].endswith(f":{master.basedir}")
    loopback = "0100007F"
    assert listening_addresses(master.www_port) == {loopback}
    assert listening_addresses(master.pb_port) == {loopback}


def test_forced_build_runs_on_real_worker(master, worker):
    rest = master.rest
    assert not rest.worker_connected("w1")
    worker.start()
    rest.wait_for(lambda: rest.worker_connected("w1"), 30, what="w1 to connect")

    bsid, brids = rest.force_build("force", "marker", reason="farm test")
    assert set(brids) == {rest.builder_id("marker")}
    buildset = rest.wait_buildset(bsid, timeout=60)
    assert buildset["results"] == SUCCESS
    [build] = rest.builds("marker", buildrequestid=brids[rest.builder_id("marker")])
    assert build["results"] == SUCCESS
    assert (worker.basedir / "marker" / "build" / "marker.txt").read_text() == "hi\n"

    # The password lives in the tac file only: not in argv, not in what the worker logged.
    with open(f"/proc/{worker.pid}/cmdline", "rb") as f:
        assert PASSWORD.encode() not in f.read()
    assert PASSWORD not in worker.log_path.read_text()
    assert PASSWORD not in worker.output_path.read_text()
    assert "Connected to buildmaster" in worker.log_text()

    pid = worker.pid
    worker.stop()
    assert not worker.running
    assert worker.returncode == -signal.SIGTERM  # twistd re-raises it after a clean shutdown
    assert_reaped(pid)
    rest.wait_for(lambda: not rest.worker_connected("w1"), 15, what="w1 to disconnect")
    assert ("worker w1", pid) not in farm.live_processes()


def test_hard_kill_mid_build_leaves_no_step_behind(master, worker):
    rest = master.rest
    worker.start()
    rest.wait_for(lambda: rest.worker_connected("w1"), 30, what="w1 to connect")
    rest.force_build("force", "sleeper")
    pid_file = worker.basedir / "sleeper" / "build" / "step.pid"
    step_pid = int(
        wait_for(
            lambda: pid_file.exists() and pid_file.read_text().strip(),
            30,
            what="the build step to start",
        )
    )
    assert not process_gone(step_pid)

    worker.kill()
    assert not worker.running
    assert worker.returncode == -signal.SIGKILL
    wait_for(lambda: process_gone(step_pid), 5, what=f"build step pid {step_pid} to be gone")


def test_worker_reattaches_after_master_crash(tmp_path):
    m = LocalMaster.with_free_ports(tmp_path / "master", CFG_BODY)
    w = LocalWorker(tmp_path / "w1", "w1", PASSWORD, m.pb_address, maxdelay=1)
    try:
        m.start()
        w.start()
        m.rest.wait_for(lambda: m.rest.worker_connected("w1"), 30, what="w1 to connect")

        crashed = m.pid
        m.kill()
        assert not m.running
        assert_reaped(crashed)

        m.start()
        assert m.pid != crashed
        # Backoff capped at maxdelay=1: the worker is back within a few seconds of the master.
        m.rest.wait_for(lambda: m.rest.worker_connected("w1"), 10, what="w1 to reconnect")
        assert w.running
    finally:
        w.stop()
        m.stop()


def test_config_errors_surface_with_log_tail(tmp_path):
    broken = LocalMaster.with_free_ports(tmp_path / "broken", "c['builders'] = [\n")
    with pytest.raises(MasterStartError, match="upgrade-master failed") as err:
        broken.create()
    assert "Errors loading configuration" in str(err.value)
    assert broken.pid is None

    # Valid Python the master itself refuses: caught at start, reported with twistd.log's tail.
    m = LocalMaster.with_free_ports(tmp_path / "master", CFG_BODY)
    m.create()
    m.master_cfg += textwrap.dedent("""
        c["builders"].append(util.BuilderConfig(
            name="orphan", workernames=["nosuchworker"], factory=util.BuildFactory()))
    """)
    with pytest.raises(MasterStartError) as err:
        m.start(timeout=60)
    message = str(err.value)
    assert "tail of" in message and "twistd.log" in message
    assert "nosuchworker" in message
    assert not m.running
    assert_reaped(m.pid)


def test_rest_client_reports_errors(master):
    rest = master.rest
    with pytest.raises(KeyError, match="nosuchbuilder"):
        rest.builder_id("nosuchbuilder")
    with pytest.raises(RestError, match="nosuchscheduler"):
        rest.force_build("nosuchscheduler", "marker")
    with pytest.raises(RestError, match="HTTP 404"):
        rest.get("nosuchendpoint")


def test_wait_for_names_what_it_waited_for():
    with pytest.raises(TimeoutError, match="the moon to turn blue"):
        wait_for(lambda: False, 0.3, interval=0.05, what="the moon to turn blue")
    assert wait_for(lambda: 42, 1) == 42


HARNESS = """
import sys
from pathlib import Path
from buildbot_ec2_hybrid.sandbox.farm import LocalWorker

# Nothing listens there: the worker just keeps retrying, as a worker without a master does.
w = LocalWorker(Path(sys.argv[1]), "lost", "pw", "127.0.0.1:" + sys.argv[2])
w.start()
print(w.pid, flush=True)
sys.stdin.read()  # until the test closes stdin (normal exit) or kills us
"""


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_no_worker_outlives_its_harness(tmp_path, how):
    """At exit the registry ends what is left; if the harness is SIGKILLed, the tac's watch."""
    port = str(farm.free_port())
    harness = subprocess.Popen(
        [sys.executable, "-c", HARNESS, str(tmp_path / "w"), port],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pid = int(harness.stdout.readline())
        log = tmp_path / "w" / "twistd.log"
        # Wait until the worker is really up (its reactor runs the watch) before the harness dies.
        wait_for(
            lambda: log.exists() and "Starting factory" in log.read_text(),
            30,
            what="the worker to start",
        )
        if how == "sigkill":
            harness.kill()
        else:
            harness.stdin.close()
        assert harness.wait(timeout=30) == (-signal.SIGKILL if how == "sigkill" else 0)
        wait_for(lambda: process_gone(pid), 15, what=f"orphaned worker {pid} to exit")
    finally:
        harness.kill()
        harness.wait()
        harness.stdout.close()
        harness.stdin.close()
