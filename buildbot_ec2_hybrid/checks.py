"""Checks of a whole ``master.cfg`` that no single pool, worker or builder can make on its own.

Each :class:`~buildbot_ec2_hybrid.pool.EC2Pool` and
:class:`~buildbot_ec2_hybrid.worker.EC2PoolWorker` checks its own arguments when it is built. The
mistakes below only show when pools, workers and builders are seen together:

* a pool worker's name also used by an in-house (or any other) worker, or a worker listed twice;
* the same worker in two pools, or two pools with the same name;
* a pool whose workers are not in ``c['workers']``, or pool workers whose pool is not in
  ``c['services']`` (nothing would ever revive them);
* an overflow builder whose pool is not in ``c['services']``;
* pool workers listed in a builder that was not made with that pool's ``builder()`` (requests
  would bind to cold instances and skip the in-house-first wait), or whose chooser/gate was
  replaced afterwards;
* one instance id given to two workers.

They run in a Buildbot configurator, the one hook that sees the whole config dict while
``master.cfg`` is loaded (so ``buildbot checkconfig`` reports them too), before Buildbot turns the
dict into its config; errors are collected with Buildbot's own, all shown at once. Nothing here
talks to AWS.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any
from typing import NamedTuple

from buildbot import config
from buildbot.config import BuilderConfig
from buildbot.interfaces import IConfigurator
from zope.interface import implementer

from buildbot_ec2_hybrid.pool import EC2Pool
from buildbot_ec2_hybrid.worker import POOL_TAG
from buildbot_ec2_hybrid.worker import EC2PoolWorker

_ADD_POOL = "add the pool to c['services'] (c['services'].append(pool))"
_ADD_WORKERS = "add them with c['workers'] += pool.workers"


@implementer(IConfigurator)
class HybridConfigCheck:
    """Checks the pools, workers and builders of a whole ``master.cfg`` together.

    Add it to ``master.cfg``, last among the configurators so that it sees what the others added::

        c["configurators"] = [HybridConfigCheck()]

    (``c["configurators"].append(HybridConfigCheck())`` if there are others.) It changes nothing
    in the config; every problem it finds is a config error, reported by ``buildbot checkconfig``
    and at master start or reconfig, next to Buildbot's own errors.

    Why a line at all: Buildbot hands the whole config dict to configurators only; a service
    such as ``EC2Pool`` sees its own arguments and nothing else while the config loads, and
    nothing but configurators runs over the dict before the master starts.
    """

    def configure(self, config_dict: dict[str, Any]) -> None:
        for problem in config_problems(config_dict):
            config.error(problem)


def config_problems(config_dict: dict[str, Any]) -> list[str]:
    """The whole-config problems of a ``BuildmasterConfig`` dict, as config error messages."""
    return find_problems(
        _as_list(config_dict.get("workers")),
        _as_list(config_dict.get("builders")),
        _as_list(config_dict.get("services")),
    )


def master_config_problems(master_config: Any) -> list[str]:
    """The same problems in a loaded ``MasterConfig`` (e.g. from a running master)."""
    return find_problems(
        list(master_config.workers),
        list(master_config.builders),
        list(master_config.services.values()),
    )


class _Builder(NamedTuple):
    name: Any
    workernames: list[Any]
    next_worker: Any
    can_start: Any


def _as_list(value: Any) -> list[Any]:
    # a wrong type is Buildbot's own error to report; here it only means "nothing to check"
    return list(value) if isinstance(value, (list, tuple)) else []


def _names(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _builder_view(b: Any) -> _Builder | None:
    if isinstance(b, BuilderConfig):
        names = _as_list(b.workernames)
        return _Builder(b.name, names, b.nextWorker, b.canStartBuild)
    if isinstance(b, dict):
        names = b.get("workernames") or []
        names = [names] if isinstance(names, str) else _as_list(names)
        if isinstance(b.get("workername"), str):
            names.append(b["workername"])
        return _Builder(b.get("name"), names, b.get("nextWorker"), b.get("canStartBuild"))
    return None


def _pool_of(worker: Any) -> str | None:
    """The pool a worker in ``c['workers']`` was built for by an ``EC2Pool``, if any."""
    if not isinstance(worker, EC2PoolWorker):
        return None
    kwargs = worker.getConfigDict()["kwargs"]
    return kwargs.get("pool") if kwargs.get("pool_managed") else None


def find_problems(
    workers: list[Any], builders: list[Any], services: list[Any]
) -> list[str]:
    """Problems among ``c['workers']``, ``c['builders']`` and ``c['services']`` taken together."""
    problems: list[str] = []
    pools = _pools(services, problems)
    pool_names = {p.name for p in pools}

    listed: dict[str, list[Any]] = collections.defaultdict(list)
    for w in workers:
        if isinstance(w, EC2Pool):
            problems.append(
                f"c['workers'] contains the EC2Pool {w.name!r} itself: put its workers there "
                "(c['workers'] += pool.workers) and the pool in c['services']"
            )
            continue
        name = getattr(w, "workername", None)
        if isinstance(name, str):
            listed[name].append(w)

    # worker name -> the pools that claim it, from the pools and from the workers themselves
    owners: dict[str, set[str]] = collections.defaultdict(set)
    for p in pools:
        for wname in p.workernames:
            owners[wname].add(p.name)
    orphans: dict[str, list[str]] = collections.defaultdict(list)
    for wname, objs in listed.items():
        for pname in {_pool_of(o) for o in objs} - {None}:
            owners[wname].add(pname)
            if pname not in pool_names:
                orphans[pname].append(wname)

    _shared_workers(owners, problems)
    for pname, wnames in sorted(orphans.items()):
        problems.append(
            f"c['workers'] holds workers of EC2Pool {pname!r} ({_names(wnames)}) but that pool "
            f"is not in c['services']: {_ADD_POOL}; without it nothing ever revives them"
        )
    clashes = _worker_list(pools, listed, problems)
    for wname in clashes:
        # the rename the clash message asks for fixes the builders too: do not blame them
        owners.pop(wname, None)
    for b in builders:
        view = _builder_view(b)
        if view is not None:
            _builder(view, owners, pool_names, problems)
    _instance_ids(workers, problems)
    return problems


def _pools(services: list[Any], problems: list[str]) -> list[EC2Pool]:
    pools: list[EC2Pool] = []
    for s in services:
        if not isinstance(s, EC2Pool):
            continue
        if any(s is p for p in pools):
            problems.append(
                f"c['services']: EC2Pool {s.name!r} is listed more than once; list each pool once"
            )
        elif any(s.name == p.name for p in pools):
            problems.append(
                f"c['services']: two EC2Pools are named {s.name!r}; give each pool its own name "
                f"(it is also the {POOL_TAG} tag value of the pool's instances)"
            )
        else:
            pools.append(s)
    return pools


def _shared_workers(owners: dict[str, set[str]], problems: list[str]) -> None:
    shared: dict[tuple[str, ...], list[str]] = collections.defaultdict(list)
    for wname, pnames in owners.items():
        if len(pnames) > 1:
            shared[tuple(sorted(pnames))].append(wname)
    for pnames, wnames in sorted(shared.items()):
        which = " and ".join(f"EC2Pool {p!r}" for p in pnames)
        problems.append(
            f"workers {_names(wnames)} are in {which}: pools never share instances; list each "
            "worker in the workers of one pool only"
        )


def _worker_list(
    pools: list[EC2Pool], listed: dict[str, list[Any]], problems: list[str]
) -> set[str]:
    """Check c['workers'] against the pools; return the names both a pool and another worker
    use."""
    clashes: set[str] = set()
    for p in pools:
        clash: list[str] = []
        missing: list[str] = []
        for wname in p.workernames:
            objs = listed.get(wname, [])
            if any(_pool_of(o) is None for o in objs):
                clash.append(wname)
            elif not any(_pool_of(o) == p.name for o in objs):
                missing.append(wname)
        clashes.update(clash)
        if clash:
            problems.append(
                f"c['workers']: {_names(clash)} is both a worker of EC2Pool {p.name!r} and an "
                "in-house (or other) worker; rename one of them (a pool worker's name is its "
                "instance's EC2 Name tag)"
            )
        if missing:
            problems.append(
                f"EC2Pool {p.name!r}: its workers {_names(missing)} are not in c['workers']; "
                f"{_ADD_WORKERS}"
            )
    pool_workers = {w for p in pools for w in p.workernames}
    repeated: list[str] = []
    for wname, objs in sorted(listed.items()):
        if len(objs) < 2:
            continue
        if all(o is objs[0] for o in objs):
            repeated.append(wname)
        elif wname not in pool_workers and all(_pool_of(o) is None for o in objs):
            problems.append(
                f"c['workers']: {len(objs)} different workers are named {wname!r}; give each "
                "worker its own name"
            )
    if repeated:
        problems.append(
            f"c['workers']: {_names(repeated)} listed more than once; add each worker (and each "
            "pool's workers) once"
        )
    return clashes


def _builder(
    b: _Builder, owners: dict[str, set[str]], pool_names: set[str], problems: list[str]
) -> None:
    where = f"builder {b.name!r}"
    chooser = getattr(b.next_worker, "pool_name", None)
    gate = getattr(b.can_start, "pool_name", None)
    overflow_to = chooser or gate
    if chooser and gate and chooser != gate:
        problems.append(
            f"{where}: nextWorker comes from EC2Pool {chooser!r} and canStartBuild from EC2Pool "
            f"{gate!r}; make the builder with one pool's builder() only"
        )
    elif chooser != gate:
        replaced = "nextWorker" if chooser is None else "canStartBuild"
        problems.append(
            f"{where}: {replaced} was replaced after pool.builder() made the builder, which drops "
            "the pool's in-house-first choice or its overflow_after wait; pass your own as "
            f"pool.builder(..., {replaced}=your_function) instead"
        )
    if overflow_to is not None and overflow_to not in pool_names:
        problems.append(
            f"{where} overflows to EC2Pool {overflow_to!r}, which is not in c['services']: "
            f"{_ADD_POOL}; without it nothing revives its instances"
        )
    by_pool: dict[str, list[str]] = collections.defaultdict(list)
    for wname in b.workernames:
        pnames = owners.get(wname, set()) if isinstance(wname, str) else set()
        if overflow_to in pnames:
            # a worker shared with another pool is reported once, as shared
            continue
        for pname in pnames:
            by_pool[pname].append(wname)
    for pname, wnames in sorted(by_pool.items()):
        if pname == overflow_to:
            continue
        if overflow_to is None:
            problems.append(
                f"{where}: workernames lists workers of EC2Pool {pname!r} ({_names(wnames)}) but "
                "the builder was not made with that pool's builder(), so requests would wait "
                "for cold instances and skip the in-house-first wait (overflow_after); make it "
                f"with pool.builder(name={b.name!r}, workernames=<in-house workers only>, "
                "factory=..., overflow=True)"
            )
        else:
            problems.append(
                f"{where} overflows to EC2Pool {overflow_to!r} but its workernames also lists "
                f"workers of EC2Pool {pname!r} ({_names(wnames)}); a builder overflows to one "
                "pool: remove them from workernames"
            )


def _instance_ids(workers: list[Any], problems: list[str]) -> None:
    by_id: dict[str, list[str]] = collections.defaultdict(list)
    for w in workers:
        if isinstance(w, EC2PoolWorker):
            iid = w.getConfigDict()["kwargs"].get("instance_id")
            if isinstance(iid, str):
                by_id[iid].append(w.workername)
    for iid, wnames in sorted(by_id.items()):
        if len(set(wnames)) > 1:
            problems.append(
                f"instance_id {iid!r} is given to workers {_names(sorted(set(wnames)))}; each "
                "instance backs exactly one worker: give each its own instance_id"
            )
