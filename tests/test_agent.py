"""The sandbox instance agent, driven by a hand-made instance list against real masters."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace

import pytest

from buildbot_ec2_hybrid.sandbox import farm
from buildbot_ec2_hybrid.sandbox.agent import ENDED
from buildbot_ec2_hybrid.sandbox.agent import EXITED
from buildbot_ec2_hybrid.sandbox.agent import MASTER_TAG
from buildbot_ec2_hybrid.sandbox.agent import SPAWNED
from buildbot_ec2_hybrid.sandbox.agent import InstanceAgent
from buildbot_ec2_hybrid.sandbox.farm import LocalMaster
from buildbot_ec2_hybrid.sandbox.farm import wait_for

PASSWORDS = {"ec2-a": "pw-a-51d2", "ec2-b": "pw-b-93e0"}

CFG_BODY = f"""
c["workers"] += [worker.Worker(name, pw) for name, pw in {PASSWORDS!r}.items()]
c["builders"].append(util.BuilderConfig(
    name="noop",
    workernames={sorted(PASSWORDS)!r},
    factory=util.BuildFactory([steps.ShellCommand(command=["true"])]),
))
c["schedulers"].append(schedulers.ForceScheduler(name="force", builderNames=["noop"]))
"""


@dataclass(frozen=True)
class View:
    instance_id: str
    name: str | None
    state: str
    tags: dict[str, str] = field(default_factory=dict)
    state_since: float = field(default_factory=time.time)


class FakeRegion:
    """Just the agent's interface: a mutable instance list and state-change callbacks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._views: dict[str, View] = {}
        self._listeners = []

    def add(self, instance_id: str, name: str | None, state: str = "stopped", **tags: str):
        with self._lock:
            self._views[instance_id] = View(instance_id, name, state, dict(tags, Name=name))

    def set_state(self, instance_id: str, state: str) -> None:
        with self._lock:
            old = self._views[instance_id]
            self._views[instance_id] = replace(old, state=state, state_since=time.time())
            listeners = list(self._listeners)
        for callback in listeners:
            callback(instance_id, old.state, state)

    def views(self) -> list[View]:
        with self._lock:
            return list(self._views.values())

    def subscribe(self, callback) -> None:
        with self._lock:
            self._listeners.append(callback)


def start_master(basedir) -> LocalMaster:
    m = LocalMaster.with_free_ports(basedir, CFG_BODY)
    m.start()
    return m


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    m = start_master(tmp_path_factory.mktemp("agent") / "master")
    yield m
    m.stop()


@pytest.fixture
def region():
    return FakeRegion()


@pytest.fixture
def make_agent(region, master, tmp_path):
    agents = []

    def make(**kwargs) -> InstanceAgent:
        options = dict(
            views=region.views,
            disks_dir=tmp_path / "disks",
            master=master.pb_address,
            password=PASSWORDS.__getitem__,
            subscribe=region.subscribe,
        )
        options.update(kwargs)
        agent = InstanceAgent(**options)
        agents.append(agent)
        agent.start()
        return agent

    yield make
    for agent in agents:
        agent.stop()
    assert not [p for p in farm.live_processes() if p[0].startswith("worker ")]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kinds(agent: InstanceAgent, instance_id: str) -> list[str]:
    return [kind for _, iid, kind in agent.events if iid == instance_id]


def test_running_instance_runs_a_connected_worker_until_it_stops(region, master, make_agent):
    rest = master.rest
    region.add("i-a", "ec2-a", state="pending")
    agent = make_agent(boot_delay=1.0)
    region.set_state("i-a", "running")
    assert agent.worker_for("i-a") is None  # still "booting"

    worker = wait_for(lambda: agent.worker_for("i-a"), 10, what="the agent to start ec2-a")
    [(spawned_at, _, kind)] = agent.events
    assert kind == SPAWNED
    [view] = region.views()
    assert spawned_at - view.state_since >= 1.0
    assert worker.name == "ec2-a"
    assert worker.basedir == agent.disk_dir("i-a").resolve()
    rest.wait_for(lambda: rest.worker_connected("ec2-a"), 30, what="ec2-a to connect")
    pid = worker.pid

    region.set_state("i-a", "stopping")
    wait_for(lambda: kinds(agent, "i-a") == [SPAWNED, ENDED], 15, what="the worker to end")
    assert agent.worker_for("i-a") is None
    assert not pid_alive(pid)
    rest.wait_for(lambda: not rest.worker_connected("ec2-a"), 15, what="ec2-a to disconnect")


def test_worker_dir_survives_stop_and_start(region, master, make_agent):
    rest = master.rest
    region.add("i-a", "ec2-a", state="running")
    agent = make_agent()
    rest.wait_for(lambda: rest.worker_connected("ec2-a"), 30, what="ec2-a to connect")
    disk = agent.disk_dir("i-a")
    (disk / "warm-cache.txt").write_text("incremental, not clobber\n")
    first_pid = agent.worker_for("i-a").pid

    region.set_state("i-a", "stopped")
    wait_for(lambda: agent.worker_for("i-a") is None, 15, what="the worker to end")
    rest.wait_for(lambda: not rest.worker_connected("ec2-a"), 15, what="ec2-a to disconnect")

    region.set_state("i-a", "running")
    rest.wait_for(lambda: rest.worker_connected("ec2-a"), 30, what="ec2-a to reconnect")
    worker = agent.worker_for("i-a")
    assert worker.pid != first_pid
    assert worker.basedir == disk.resolve()
    assert (disk / "warm-cache.txt").read_text() == "incremental, not clobber\n"
    assert worker.log_text().count("Starting Worker") == 2  # one log across both boots
    assert kinds(agent, "i-a") == [SPAWNED, ENDED, SPAWNED]


def test_master_tag_overrides_master_address(region, master, make_agent, tmp_path):
    other = start_master(tmp_path / "other-master")
    try:
        region.add("i-b", "ec2-b", state="running", **{MASTER_TAG: other.pb_address})
        region.add("i-a", "ec2-a", state="running")
        agent = make_agent()
        other.rest.wait_for(
            lambda: other.rest.worker_connected("ec2-b"), 30, what="ec2-b to connect to other"
        )
        master.rest.wait_for(
            lambda: master.rest.worker_connected("ec2-a"), 30, what="ec2-a to connect"
        )
        assert agent.worker_for("i-b").master == other.pb_address
        assert not master.rest.worker_connected("ec2-b")
        assert not other.rest.worker_connected("ec2-a")
    finally:
        other.stop()


def test_callbacks_wake_the_agent_and_hard_stop_kills(region, make_agent):
    region.add("i-a", "ec2-a")
    # Polling every 30 s: only the subscribe() callbacks can make the agent this quick.
    agent = make_agent(hard=True, interval=30)
    region.set_state("i-a", "running")
    worker = wait_for(lambda: agent.worker_for("i-a"), 3, what="the callback to start ec2-a")
    region.set_state("i-a", "stopping")
    wait_for(lambda: kinds(agent, "i-a") == [SPAWNED, ENDED], 3, what="the callback to end it")
    assert worker.returncode == -signal.SIGKILL  # hard=True is a power cut, not a shutdown


def test_worker_that_dies_on_its_own_stays_dead_until_next_boot(region, make_agent):
    region.add("i-a", "ec2-a", state="running")
    agent = make_agent()
    worker = wait_for(lambda: agent.worker_for("i-a"), 10, what="the agent to start ec2-a")
    worker.kill()
    wait_for(lambda: kinds(agent, "i-a") == [SPAWNED, EXITED], 5, what="the agent to notice")
    time.sleep(0.6)  # several passes: a crashed buildbot-worker is not restarted by the agent
    assert agent.worker_for("i-a") is None
    assert kinds(agent, "i-a") == [SPAWNED, EXITED]

    region.set_state("i-a", "stopped")
    region.set_state("i-a", "running")
    wait_for(lambda: agent.worker_for("i-a"), 10, what="the next boot to start ec2-a")
    assert kinds(agent, "i-a") == [SPAWNED, EXITED, SPAWNED]


def test_unnamed_instance_gets_no_worker_and_stop_ends_all(region, make_agent):
    region.add("i-x", None, state="running")
    region.add("i-a", "ec2-a", state="running")
    region.add("i-b", "ec2-b", state="running")
    agent = make_agent()
    wait_for(lambda: agent.worker_for("i-a") and agent.worker_for("i-b"), 10, what="two workers")
    pids = [agent.worker_for(i).pid for i in ("i-a", "i-b")]
    assert agent.worker_for("i-x") is None
    agent.stop()
    assert not any(pid_alive(pid) for pid in pids)
    assert sorted(kind for _, _, kind in agent.events) == [ENDED, ENDED, SPAWNED, SPAWNED]
