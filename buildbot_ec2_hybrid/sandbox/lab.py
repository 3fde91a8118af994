"""A whole hybrid farm on loopback: sandbox region, instance agent, a real master, in-house workers.

The demo and the integration tests both assemble their farm with :class:`SandboxLab`, so what the
tests prove is what the demo shows.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from buildbot_ec2_hybrid.ec2 import WRITABLE_TAGS
from buildbot_ec2_hybrid.sandbox.agent import InstanceAgent
from buildbot_ec2_hybrid.sandbox.farm import LocalMaster
from buildbot_ec2_hybrid.sandbox.farm import LocalWorker
from buildbot_ec2_hybrid.sandbox.farm import RestClient
from buildbot_ec2_hybrid.sandbox.farm import free_port
from buildbot_ec2_hybrid.sandbox.farm import wait_for
from buildbot_ec2_hybrid.sandbox.region import SandboxRegion

REPO_ROOT = Path(__file__).resolve().parents[2]
SANDBOX_CFG = REPO_ROOT / "master_examples" / "sandbox.cfg"

# throwaway sandbox secrets, served to the master through a SecretInAFile provider
WORKER_PASSWORD = "sandbox-worker-password"
INHOUSE_PASSWORD = "sandbox-inhouse-password"
AWS_SECRET = "sandbox-aws-secret"

#: EC2 actions the plugin may ever call
ALLOWED_ACTIONS = frozenset(
    {"DescribeInstances", "StartInstances", "StopInstances", "DescribeInstanceStatus", "CreateTags"}
)


@dataclass
class PoolSpec:
    name: str = "b2g-aws"
    size: int = 4
    overflow_after: float = 0
    idle_timeout: float = 30
    max_running: int | None = None
    hibernate: bool = True
    hibernation_configured: bool = True
    boot_timeout: float = 60
    poll_interval: float = 0.5
    reconcile_interval: float = 10
    name_format: str = "{pool}-{i:03d}"
    #: multi-master: how long a silent master keeps its lease and claims
    takeover_after: float = 60
    #: False: only the tagged instances are made, no EC2Pool service (standalone worker tests)
    service: bool = True


@dataclass
class BuilderSpec:
    name: str
    pool: str | None = None  # the pool this builder overflows to (None: in-house only)
    overflow: bool = True
    workers: list[str] | None = None  # in-house workers (default: all)


@dataclass
class LabSpec:
    pools: list[PoolSpec] = field(default_factory=lambda: [PoolSpec()])
    builders: list[BuilderSpec] = field(
        default_factory=lambda: [BuilderSpec("b2g_build", pool="b2g-aws")]
    )
    inhouse_workers: int = 2
    standalone_workers: list[dict[str, Any]] = field(default_factory=list)
    pending_seconds: float = 1.0
    stopping_seconds: float = 1.0
    hibernate_resume_seconds: float = 0.5
    boot_delay: float = 0.5
    #: instances made to order before the master starts, as keyword arguments of
    #: SandboxRegion.create_instance plus "pool" (whose VPC they go in, unless "vpc" is
    #: "other"), "allowed" (True: a legitimate pool instance the plugin may start) and
    #: "pool_member" (True: also one of the pool's workers)
    extra_instances: list[dict[str, Any]] = field(default_factory=list)
    title: str = "buildbot-ec2-hybrid sandbox"


class SandboxLab:
    """Start and stop a complete sandbox farm in ``workdir``."""

    def __init__(
        self, workdir: Path, spec: LabSpec | None = None, *, www_port: int | None = None
    ) -> None:
        self.workdir = Path(workdir)
        self.spec = spec or LabSpec()
        self.region: SandboxRegion | None = None
        self.agent: InstanceAgent | None = None
        self.master: LocalMaster | None = None
        self.inhouse: list[LocalWorker] = []
        self.fixtures: dict[str, Any] = {}
        #: name -> instance id of the extra instances
        self.extras: dict[str, list[str]] = {}
        self._allowed_extras: set[str] = set()
        self.pb_port = free_port()
        self.www_port = www_port or free_port()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> SandboxLab:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_region()
        self.master = LocalMaster(
            self.workdir / "master",
            SANDBOX_CFG.read_text(),
            pb_port=self.pb_port,
            www_port=self.www_port,
        )
        self.write_master_settings()
        self.master.create()
        self.master.start()
        self.start_agent(f"127.0.0.1:{self.pb_port}")
        for name in self.inhouse_names:
            w = LocalWorker(
                self.workdir / "inhouse" / name,
                name,
                INHOUSE_PASSWORD,
                master=f"127.0.0.1:{self.pb_port}",
            )
            w.start()
            self.inhouse.append(w)
        return self

    def start_region(self) -> None:
        """The sandbox region with the pools' stopped instances and the extra instances."""
        spec = self.spec
        self.region = SandboxRegion(
            pending_seconds=spec.pending_seconds,
            stopping_seconds=spec.stopping_seconds,
            hibernate_resume_seconds=spec.hibernate_resume_seconds,
        )
        self.region.start()
        for pool in spec.pools:
            self.fixtures[pool.name] = self.region.create_pool(
                pool.name,
                pool.size,
                name_format=pool.name_format,
                hibernation=pool.hibernation_configured,
            )
        self._create_extra_instances()

    def start_agent(self, master: str) -> None:
        """The instance agent: a real worker process per running instance, sent to ``master``
        unless the instance's master tag says otherwise."""
        assert self.region is not None
        self.agent = InstanceAgent(
            views=self.region.instance_views,
            subscribe=self.region.add_listener,
            master=master,
            password=WORKER_PASSWORD,
            boot_delay=self.spec.boot_delay,
            disks_dir=self.workdir / "disks",
        )
        self.agent.start()

    def _create_extra_instances(self) -> None:
        assert self.region is not None
        other_vpc = None
        for spec in self.spec.extra_instances:
            kwargs = dict(spec)
            pool = kwargs.pop("pool")
            # a pool member is a legitimate instance the pool's worker list names
            member = kwargs.pop("pool_member", False)
            allowed = kwargs.pop("allowed", False) or member
            if kwargs.pop("vpc", None) == "other":
                if other_vpc is None:
                    other_vpc = self.region.create_vpc("other-vpc")
                kwargs["vpc_id"] = other_vpc.vpc_id
                kwargs.setdefault("subnet_id", next(iter(other_vpc.subnet_ids.values())))
            else:
                kwargs["vpc_id"] = self.fixtures[pool].vpc_id
            iid = self.region.create_instance(**kwargs)
            self.extras.setdefault(spec["name"], []).append(iid)
            if allowed:
                self._allowed_extras.add(iid)

    def stop(self) -> None:
        for w in self.inhouse:
            w.stop()
        if self.master is not None and self.master.running:
            self.master.stop()
        if self.agent is not None:
            self.agent.stop()
        if self.region is not None:
            self.region.stop()

    def __enter__(self) -> SandboxLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- configuration ------------------------------------------------------------------------

    @property
    def inhouse_names(self) -> list[str]:
        return [f"inhouse-{i + 1}" for i in range(self.spec.inhouse_workers)]

    def pool_workers(self, pool: str | None = None) -> list[str]:
        name = pool or self.spec.pools[0].name
        members = [
            e["name"] for e in self.spec.extra_instances
            if e.get("pool_member") and e["pool"] == name
        ]
        return sorted([*self.fixtures[name].instances, *members])

    def instance_id(self, worker: str) -> str:
        for fixture in self.fixtures.values():
            if worker in fixture.instances:
                return fixture.instances[worker]
        if worker in self.extras:
            return self.extras[worker][0]
        raise KeyError(worker)

    def settings(self) -> dict[str, Any]:
        spec = self.spec
        assert self.region is not None
        pools = []
        for p in spec.pools:
            if not p.service:
                continue
            fixture = self.fixtures[p.name]
            pools.append(
                {
                    "name": p.name,
                    "vpc_id": fixture.vpc_id,
                    "workers": self.pool_workers(p.name),
                    "overflow_after": p.overflow_after,
                    "idle_timeout": p.idle_timeout,
                    "max_running": p.max_running,
                    "hibernate": p.hibernate,
                    "boot_timeout": p.boot_timeout,
                    "poll_interval": p.poll_interval,
                    "reconcile_interval": p.reconcile_interval,
                    "takeover_after": p.takeover_after,
                }
            )
        builders = []
        for b in spec.builders:
            entry: dict[str, Any] = {"name": b.name, "overflow": b.overflow}
            if b.pool:
                entry["pool"] = b.pool
            entry["workers"] = b.workers if b.workers is not None else self.inhouse_names
            builders.append(entry)
        return {
            "title": spec.title,
            "pb_port": self.pb_port,
            "www_port": self.www_port,
            "region": "us-west-2",
            "endpoint_url": self.region.endpoint_url,
            "inhouse_workers": self.inhouse_names,
            "pools": pools,
            "builders": builders,
            "standalone_workers": [
                {"vpc_id": self.fixtures[w["pool"]].vpc_id, **w} if w.get("pool") else w
                for w in spec.standalone_workers
            ],
        }

    def write_master_settings(
        self, basedir: Path | None = None, settings: dict[str, Any] | None = None
    ) -> None:
        """sandbox.json and the secrets directory next to a master's master.cfg."""
        if basedir is None:
            assert self.master is not None
            basedir = self.master.basedir
        basedir.mkdir(parents=True, exist_ok=True)
        settings = self.settings() if settings is None else settings
        (basedir / "sandbox.json").write_text(json.dumps(settings, indent=2))
        secrets = basedir / "secrets"
        if secrets.exists():
            shutil.rmtree(secrets)
        secrets.mkdir(mode=0o700)
        for key, value in (
            ("ec2-worker-password", WORKER_PASSWORD),
            ("inhouse-password", INHOUSE_PASSWORD),
            ("aws-secret-key", AWS_SECRET),
        ):
            path = secrets / key
            path.write_text(value)
            path.chmod(0o600)

    # -- driving and observing ----------------------------------------------------------------

    @property
    def rest(self) -> RestClient:
        return RestClient(f"http://127.0.0.1:{self.www_port}/")

    def force(self, builder: str, duration: float = 2, count: int = 1) -> list[int]:
        brids: list[int] = []
        for _ in range(count):
            _, ids = self.rest.force_build("force", builder, duration=str(duration))
            brids.extend(ids.values())
        return brids

    def wait_requests_complete(self, brids: Iterable[int], timeout: float = 120) -> list[dict]:
        wanted = set(brids)

        def done():
            reqs = [self.rest.get(f"buildrequests/{b}")["buildrequests"][0] for b in wanted]
            return reqs if all(r["complete"] for r in reqs) else None

        return wait_for(done, timeout, what=f"build requests {sorted(wanted)} complete")

    def builds_for(self, brids: Iterable[int]) -> list[dict]:
        builds = []
        for brid in brids:
            builds.extend(self.rest.get("builds", buildrequestid=brid)["builds"])
        return builds

    def worker_name_by_id(self) -> dict[int, str]:
        return {w["workerid"]: w["name"] for w in self.rest.get("workers")["workers"]}

    def instance_state(self, worker: str) -> str:
        assert self.region is not None
        iid = self.instance_id(worker)
        for view in self.region.instance_views():
            if view.instance_id == iid:
                return view.state
        raise KeyError(worker)

    def running_instances(self) -> list[str]:
        assert self.region is not None
        pool_ids = {iid for f in self.fixtures.values() for iid in f.instances.values()}
        return sorted(
            v.name
            for v in self.region.instance_views()
            if v.instance_id in pool_ids and v.state in ("pending", "running", "stopping")
        )

    def plugin_calls(self, action: str | None = None) -> list[Any]:
        assert self.region is not None
        return self.region.calls(action=action)

    def forbidden_calls(self) -> list[str]:
        """Every plugin call that the safety rules forbid: any action other than describe,
        start and stop, and any call naming an instance that is not a tagged pool instance."""
        allowed_ids = {iid for f in self.fixtures.values() for iid in f.instances.values()}
        allowed_ids |= self._allowed_extras
        bad = []
        for c in self.plugin_calls():
            if c.action == "CreateTags":
                keys = {v for k, v in c.params.items() if k.startswith("Tag.") and
                        k.endswith(".Key")}
                if keys - WRITABLE_TAGS:
                    bad.append(f"CreateTags {sorted(keys)} on {c.instance_ids}")
            elif c.action not in ALLOWED_ACTIONS:
                bad.append(f"{c.action} {c.instance_ids} -> {c.outcome}")
            elif c.action != "DescribeInstances":
                stray = [i for i in c.instance_ids if i not in allowed_ids]
                if stray:
                    bad.append(f"{c.action} on non-pool instances {stray} -> {c.outcome}")
        return bad
