"""The multi-master harness itself: real masters on one PostgreSQL database and one crossbar
router, with in-house workers only (no pool), before any pool logic is tested on top of it.

PostgreSQL and the router start once for the module; each test gets a lab with a fresh database.
If either is missing, the module runs ``tests/multimaster_setup.sh`` once, and skips if that
cannot install them (not root, no package registry).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from buildbot_ec2_hybrid.sandbox.farm import MasterStartError
from buildbot_ec2_hybrid.sandbox.farm import free_port
from buildbot_ec2_hybrid.sandbox.farm import wait_for
from buildbot_ec2_hybrid.sandbox.lab import BuilderSpec
from buildbot_ec2_hybrid.sandbox.lab import LabSpec
from buildbot_ec2_hybrid.sandbox.multimaster import LOOPBACK
from buildbot_ec2_hybrid.sandbox.multimaster import MultiMasterLab

pytestmark = pytest.mark.multimaster

SUCCESS = 0

# No pool at all: builder "on_m1" can only run on inhouse-1, attached to master 0 (shown as
# "master 1" in messages), and "on_m2" only on inhouse-2, attached to master 1.
SPEC = LabSpec(
    pools=[],
    builders=[
        BuilderSpec("on_m1", workers=["inhouse-1"]),
        BuilderSpec("on_m2", workers=["inhouse-2"]),
    ],
    inhouse_workers=2,
)


@pytest.fixture
def infra(multimaster_infra):
    return multimaster_infra


@pytest.fixture
def make_lab(make_multimaster_lab):
    def make(spec: LabSpec = SPEC, **kwargs) -> MultiMasterLab:
        return make_multimaster_lab(spec, **kwargs)

    return make


def _connected_to(lab: MultiMasterLab, worker: str) -> set[int]:
    """masterids the worker is attached to, as the shared database says."""
    found = lab.rest.worker(worker)
    return {c["masterid"] for c in found["connected_to"]} if found else set()


def _wait_attached(lab: MultiMasterLab, layout: dict[str, int], timeout: float = 60) -> None:
    """Wait until each worker is attached to the master (index) given, and to no other live
    master. (A killed master stays "active", and so do its workers' attachments to it, until
    another master expires it: Buildbot 4.3 takes ~10 minutes.)"""
    ids = lab.master_ids()
    dead = {ids[i] for i, m in enumerate(lab.masters) if not m.running}
    wait_for(
        lambda: all(_connected_to(lab, w) - dead == {ids[i]} for w, i in layout.items()),
        timeout,
        what=f"workers attached as {layout}",
    )


def _built_where(lab: MultiMasterLab, brid: int) -> tuple[str, int]:
    """(worker name, masterid) of the one build of a request."""
    [build] = lab.builds_for([brid])
    return lab.worker_name_by_id()[build["workerid"]], build["masterid"]


def test_router_and_database_listen_on_loopback_only(infra):
    psutil = pytest.importorskip("psutil")  # installed with crossbar
    postgres, router = infra
    seen = []
    for pid in (postgres.pid, router.pid):
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            for conn in proc.net_connections(kind="inet"):
                seen.append((proc.name(), conn.laddr, conn.raddr, conn.status))
    listening = {(laddr.ip, laddr.port) for _, laddr, _, status in seen if status == "LISTEN"}
    assert listening == {(LOOPBACK, postgres.port), (LOOPBACK, router.port)}, seen
    assert all(laddr.ip == LOOPBACK and (not raddr or raddr.ip == LOOPBACK)
               for _, laddr, raddr, _ in seen), seen


def test_request_forced_on_one_master_is_built_by_a_worker_of_the_other(make_lab):
    lab = make_lab()
    ids = lab.master_ids()
    assert len(set(ids.values())) == 2
    masters = lab.rest_of(1).get("masters")["masters"]
    assert sorted(m["masterid"] for m in masters if m["active"]) == sorted(ids.values())
    _wait_attached(lab, {"inhouse-1": 0, "inhouse-2": 1})

    # through master 1's REST API, for a builder only master 2 has a worker for
    submitted = time.monotonic()
    _, brids = lab.rest_of(0).force_build("force", "on_m2", duration="1")
    [brid] = brids.values()
    # claimed by master 2 at once: it heard of the request over WAMP (nothing polls for it)
    claim = wait_for(
        lambda: (r := lab.rest_of(1).get(f"buildrequests/{brid}")["buildrequests"][0])["claimed"]
        and r,
        15,
        interval=0.1,
        what="master 2 to claim the request",
    )
    assert time.monotonic() - submitted < 10
    assert claim["claimed_by_masterid"] == ids[1]
    [req] = lab.wait_requests_complete([brid], timeout=60)
    assert req["results"] == SUCCESS
    assert _built_where(lab, brid) == ("inhouse-2", ids[1])

    # and the other way round: forced on master 2, built on master 1
    _, brids = lab.rest_of(1).force_build("force", "on_m1", duration="1")
    [brid] = brids.values()
    [req] = lab.wait_requests_complete([brid], timeout=60)
    assert req["results"] == SUCCESS
    assert _built_where(lab, brid) == ("inhouse-1", ids[0])
    for m in lab.masters:
        assert m.log_text().count("Wamp connection succeed!") == 1


def test_survivor_serves_its_workers_after_a_master_is_killed(make_lab):
    lab = make_lab()
    ids = lab.master_ids()
    _wait_attached(lab, {"inhouse-1": 0, "inhouse-2": 1})
    # a build in flight on master 2 while master 1 dies
    _, brids = lab.rest_of(1).force_build("force", "on_m2", duration="3")
    [running] = brids.values()
    wait_for(
        lambda: lab.rest_of(1).builds(buildrequestid=running), 30, what="the build to start"
    )
    lab.kill(0)
    assert lab.masters[0].returncode == -9
    assert lab.primary == 1  # the lab's own helpers now talk to the survivor
    [req] = lab.wait_requests_complete([running], timeout=60)
    assert req["results"] == SUCCESS
    assert _built_where(lab, running) == ("inhouse-2", ids[1])

    # the survivor keeps taking new work for its own workers
    _, brids = lab.rest_of(1).force_build("force", "on_m2", duration="1")
    [brid] = brids.values()
    [req] = lab.wait_requests_complete([brid], timeout=60)
    assert req["results"] == SUCCESS
    assert _built_where(lab, brid) == ("inhouse-2", ids[1])

    # a master joining the busy farm takes over the dead master's worker
    _, brids = lab.rest_of(1).force_build("force", "on_m2", duration="3")
    [busy] = brids.values()
    third = lab.add_master()
    assert third == 2 and lab.masters[2].running
    lab.move_worker("inhouse-1", third)
    ids = lab.master_ids()
    _wait_attached(lab, {"inhouse-1": 2, "inhouse-2": 1})
    _, brids = lab.rest_of(1).force_build("force", "on_m1", duration="1")
    [brid] = brids.values()
    reqs = lab.wait_requests_complete([busy, brid], timeout=60)
    assert [r["results"] for r in reqs] == [SUCCESS, SUCCESS]
    assert _built_where(lab, brid) == ("inhouse-1", ids[2])
    assert _built_where(lab, busy) == ("inhouse-2", ids[1])


class _UnreachableRouterLab(MultiMasterLab):
    """Every master is pointed at a router URL where nothing listens."""

    dead_port = free_port()

    def settings(self, i: int | None = None) -> dict[str, Any]:
        s = super().settings(i)
        s["mq"] = {**s["mq"], "router_url": f"ws://{LOOPBACK}:{self.dead_port}/ws"}
        return s


def test_a_master_that_never_joins_the_router_fails_to_start(infra, tmp_path):
    postgres, router = infra
    lab = _UnreachableRouterLab(
        tmp_path / "lab", SPEC, masters=1, postgres=postgres, router=router, wamp_timeout=5
    )
    with pytest.raises(MasterStartError, match="never joined the WAMP realm"):
        lab.start()
    # which is why the lab checks: the master itself claimed to be running
    text = lab.masters[0].log_text()
    assert "BuildMaster is running" in text
    assert "Wamp connection succeed!" not in text
    assert not lab.masters[0].running
