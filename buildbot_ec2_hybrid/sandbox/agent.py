"""The sandbox's stand-in for the instance image's boot script.

For every sandbox instance that is ``running`` the agent runs a real ``buildbot-worker`` process
(a :class:`~buildbot_ec2_hybrid.sandbox.farm.LocalWorker`) named by the instance's ``Name`` tag,
``boot_delay`` seconds after the instance entered ``running``; it ends that process as soon as the
instance leaves ``running``. Each instance's worker directory lives at
``disks_dir/<instance_id>/`` and survives stop/start, as its EBS root volume would.

The agent knows the region only through two callables, so it does not depend on how the region
is implemented:

- ``views()`` returns the current instances, each with ``instance_id``, ``name``, ``state``,
  ``tags`` (dict) and ``state_since`` (``time.time()`` when it entered ``state``);
- ``subscribe(callback)``, optional, registers ``callback(instance_id, old_state, new_state)``,
  which may be called from any thread; it only makes the agent react sooner than its next poll.

A worker process that exits by itself while its instance is still running is not restarted (a
crashed ``buildbot-worker`` on a real instance stays down too); it is started again the next
time the instance enters ``running``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from buildbot_ec2_hybrid.sandbox.farm import LocalWorker

log = logging.getLogger(__name__)

MASTER_TAG = "buildbot-ec2-hybrid:master"

# Event kinds recorded in InstanceAgent.events.
SPAWNED = "spawned"  # a worker process was started for the instance
ENDED = "ended"  # the process the agent ended (instance left `running`) has exited
EXITED = "exited"  # the process exited by itself while its instance was still running

# How often a process being ended is checked on, whatever the polling interval.
_REAP_INTERVAL = 0.05


class InstanceView(Protocol):
    instance_id: str
    name: str | None
    state: str
    tags: dict[str, str]
    state_since: float


@dataclass
class _Boot:
    """One worker process, started for one stay of an instance in `running`."""

    worker: LocalWorker
    running_since: float
    ending: bool = False


class InstanceAgent:
    """Runs a real buildbot-worker process for every running sandbox instance."""

    def __init__(
        self,
        views: Callable[[], Iterable[InstanceView]],
        disks_dir: Path,
        *,
        master: str,
        password: str | Callable[[str], str],
        subscribe: Callable[[Callable[[str, str, str], None]], None] | None = None,
        boot_delay: float = 0.0,
        hard: bool = False,
        interval: float = 0.15,
        stop_timeout: float = 10.0,
        maxdelay: int = 2,
        keepalive: int = 600,
        env: dict[str, str] | None = None,
    ) -> None:
        self._views = views
        self.disks_dir = Path(disks_dir)
        self.master = master
        self._password = password
        self._subscribe = subscribe
        self.boot_delay = boot_delay
        self.hard = hard
        self.interval = interval
        self.stop_timeout = stop_timeout
        self._worker_options = {"maxdelay": maxdelay, "keepalive": keepalive, "env": env}

        # _reconcile_lock serialises passes (and stop()); _lock guards what other threads read.
        self._reconcile_lock = threading.Lock()
        self._lock = threading.Lock()
        self._subscribed = False
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._boots: dict[str, _Boot] = {}
        # Stays in `running` whose worker already ran and exited by itself: not started again.
        self._spent: dict[str, float] = {}
        self._events: list[tuple[float, str, str]] = []
        self._warned_unnamed: set[str] = set()

    # -- public API ------------------------------------------------------------------------

    @property
    def events(self) -> list[tuple[float, str, str]]:
        """(time.time(), instance_id, "spawned" | "ended" | "exited"), oldest first."""
        with self._lock:
            return list(self._events)

    def disk_dir(self, instance_id: str) -> Path:
        return self.disks_dir / instance_id

    def worker_for(self, instance_id: str) -> LocalWorker | None:
        """The worker the agent currently runs for the instance (possibly still ending)."""
        with self._lock:
            boot = self._boots.get(instance_id)
            return boot.worker if boot is not None else None

    def start(self) -> None:
        if self._thread is not None:
            return
        self.disks_dir.mkdir(parents=True, exist_ok=True)
        if self._subscribe is not None and not self._subscribed:
            self._subscribe(self._on_state_change)
            self._subscribed = True
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, name="sandbox-instance-agent", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop reconciling and end every worker process the agent runs."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            self._wake.set()
            thread.join()
        with self._reconcile_lock:
            with self._lock:
                boots = dict(self._boots)
            # Signal them all first so that they shut down in parallel.
            for boot in boots.values():
                self._end(boot)
            for instance_id, boot in boots.items():
                boot.worker.stop(timeout=self.stop_timeout)
                self._forget(instance_id, boot, ENDED)

    def reconcile(self) -> None:
        """One pass: start due workers, end those whose instance left `running`, reap."""
        with self._reconcile_lock:
            self._reconcile()

    # -- internals -------------------------------------------------------------------------

    def _reconcile(self) -> float:
        """One pass; returns how long the next one may wait."""
        try:
            views = {v.instance_id: v for v in self._views()}
        except Exception:
            # The region may be starting or shutting down; the next pass will try again.
            log.exception("instance agent: listing instances failed")
            return self.interval
        now = time.time()
        next_pass = self.interval
        with self._lock:
            boots = dict(self._boots)
        for instance_id, boot in boots.items():
            view = views.get(instance_id)
            if view is None or view.state != "running" or view.state_since != boot.running_since:
                self._end(boot)
            if not boot.worker.poll():
                if boot.ending:
                    next_pass = min(next_pass, _REAP_INTERVAL)
            elif boot.ending:
                self._forget(instance_id, boot, ENDED)
            else:
                log.warning(
                    "instance agent: worker %s of %s exited by itself (code %s)",
                    boot.worker.name,
                    instance_id,
                    boot.worker.returncode,
                )
                self._spent[instance_id] = boot.running_since
                self._forget(instance_id, boot, EXITED)
        for instance_id, view in views.items():
            if (
                view.state != "running"
                or instance_id in self._boots
                or self._spent.get(instance_id) == view.state_since
            ):
                continue
            if not view.name:
                if instance_id not in self._warned_unnamed:
                    self._warned_unnamed.add(instance_id)
                    log.warning("instance agent: %s has no Name tag; no worker", instance_id)
                continue
            due_in = view.state_since + self.boot_delay - now
            if due_in > 0:
                next_pass = min(next_pass, due_in)
            else:
                self._boot(view)
        return next_pass

    def _on_state_change(self, instance_id: str, old_state: str, new_state: str) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            # Cleared before the pass, so a change announced during it triggers another.
            self._wake.clear()
            next_pass = self.interval
            try:
                with self._reconcile_lock:
                    next_pass = self._reconcile()
            except Exception:
                log.exception("instance agent: reconcile failed")
            self._wake.wait(next_pass)

    def _boot(self, view: InstanceView) -> None:
        name = view.name
        assert name, "unnamed instances are filtered out by _reconcile"
        password = self._password(name) if callable(self._password) else self._password
        worker = LocalWorker(
            self.disk_dir(view.instance_id),
            name,
            password,
            (view.tags or {}).get(MASTER_TAG, self.master),
            **self._worker_options,
        )
        worker.start()
        with self._lock:
            self._boots[view.instance_id] = _Boot(worker, view.state_since)
            self._events.append((time.time(), view.instance_id, SPAWNED))
        log.info(
            "instance agent: started worker %s for %s (pid %s, master %s)",
            name,
            view.instance_id,
            worker.pid,
            worker.master,
        )

    def _end(self, boot: _Boot) -> None:
        if boot.ending:
            return
        boot.ending = True
        if self.hard:
            boot.worker.kill(wait=False)
        else:
            boot.worker.stop(timeout=self.stop_timeout, wait=False)

    def _forget(self, instance_id: str, boot: _Boot, kind: str) -> None:
        with self._lock:
            if self._boots.get(instance_id) is boot:
                del self._boots[instance_id]
                self._events.append((time.time(), instance_id, kind))
