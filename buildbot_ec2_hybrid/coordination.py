"""Coordination of one pool across several Buildbot masters (multi-master).

Every master of a multi-master farm runs the same pool and sees the same backlog over the shared
message queue. Left alone, each would revive instances for the same requests. This module keeps
them in step through three small tables in Buildbot's own (shared) database:

``ec2_hybrid_masters``
    a heartbeat per master running a pool, with the address its revived instances connect to;
``ec2_hybrid_leases``
    one row per pool: the master holding the lease is the pool's *leader*, the only one that
    revives instances for the backlog;
``ec2_hybrid_claims``
    one row per pool instance that a master has revived or adopted: only the claiming master starts,
    adopts or stops that instance.

Why it is safe:

* Every change is one conditional UPDATE (or an INSERT that a unique key lets only one master
  win) inside a transaction, so two masters can never both believe they hold a lease or a claim:
  the database serialises them.
* A lease or claim held by a master whose heartbeat is older than ``takeover_after`` can be taken
  over; a live master renews its heartbeat every ``heartbeat_interval`` (a fraction of
  ``takeover_after``), so it never loses what it holds while alive and reachable.
* A master that loses the lease keeps its claims: it still suspends its own idle instances, it just
  stops reviving new ones. Nobody else touches those instances while its heartbeat is fresh.
* Instances claimed by a dead master are stopped by the leader that takes them over (their workers
  were connected to the dead master), and the dead master's claimed build requests are released
  so that Buildbot runs them again: stock Buildbot only does that for requests claimed by the
  master doing the clean-up, and only after a fixed ten minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from twisted.internet import defer
from twisted.python import log

metadata = sa.MetaData()

masters_table = sa.Table(
    "ec2_hybrid_masters",
    metadata,
    sa.Column("masterid", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(191), nullable=False),
    sa.Column("address", sa.String(191), nullable=True),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
)

leases_table = sa.Table(
    "ec2_hybrid_leases",
    metadata,
    sa.Column("pool", sa.String(191), primary_key=True),
    sa.Column("masterid", sa.Integer, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

claims_table = sa.Table(
    "ec2_hybrid_claims",
    metadata,
    sa.Column("pool", sa.String(191), primary_key=True),
    sa.Column("worker", sa.String(191), primary_key=True),
    sa.Column("masterid", sa.Integer, nullable=False),
    sa.Column("claimed_at", sa.Float, nullable=False),
)


@dataclass(frozen=True)
class DeadMaster:
    masterid: int
    name: str


class Coordinator:
    """The database side of a pool shared by several masters. All methods return Deferreds."""

    def __init__(
        self,
        master,
        pool: str,
        *,
        address: str | None,
        takeover_after: float,
    ) -> None:
        self.master = master
        self.pool = pool
        self.address = address
        self.takeover_after = takeover_after
        self.is_leader = False
        #: worker -> masterid of every claimed instance of the pool, as of the last refresh
        self.claims: dict[str, int] = {}
        self.live_masters: set[int] = set()

    @property
    def masterid(self) -> int:
        return self.master.masterid

    def _log(self, msg: str) -> None:
        log.msg(f"ec2-hybrid[{self.pool}]: {msg}")

    def _now(self) -> float:
        return self.master.reactor.seconds()

    def _do(self, fn, *args):
        return self.master.db.pool.do_with_transaction(fn, *args)

    @defer.inlineCallbacks
    def setup(self):
        """Create the coordination tables if this database does not have them yet."""

        def create(engine):
            metadata.create_all(engine, checkfirst=True)

        try:
            yield self.master.db.pool.do_with_engine(create)
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
            # masters starting together on a new database raced to create the tables: the
            # other one won; check again
            yield self.master.db.pool.do_with_engine(create)

    # -- heartbeat, lease, claims -------------------------------------------------------------

    @defer.inlineCallbacks
    def heartbeat(self):
        """Renew this master's heartbeat and try for the lease; refresh the claim picture.

        Returns the masters found dead (only computed by the leader, who takes them over).
        """
        now = self._now()
        me = self.masterid
        name = self.master.name
        address = self.address
        pool = self.pool
        cutoff = now - self.takeover_after
        expires = now + self.takeover_after

        def thd(conn):
            m = masters_table
            updated = conn.execute(
                m.update()
                .where(m.c.masterid == me)
                .values(heartbeat_at=now, address=address, name=name)
            ).rowcount
            if not updated:
                conn.execute(
                    m.insert().values(masterid=me, name=name, address=address, heartbeat_at=now)
                )
            lease = leases_table
            won = conn.execute(
                lease.update()
                .where(lease.c.pool == pool)
                .where(sa.or_(lease.c.masterid == me, lease.c.expires_at < now))
                .values(masterid=me, expires_at=expires)
            ).rowcount
            if not won:
                exists = conn.execute(
                    sa.select(lease.c.masterid).where(lease.c.pool == pool)
                ).first()
                if exists is None:
                    nested = conn.begin_nested()
                    try:
                        conn.execute(
                            lease.insert().values(pool=pool, masterid=me, expires_at=expires)
                        )
                        nested.commit()
                        won = 1
                    except sa.exc.IntegrityError:
                        nested.rollback()
            rows = conn.execute(
                sa.select(m.c.masterid, m.c.name, m.c.heartbeat_at)
            ).fetchall()
            live = {r.masterid for r in rows if r.heartbeat_at >= cutoff}
            dead = [DeadMaster(r.masterid, r.name) for r in rows if r.heartbeat_at < cutoff]
            c = claims_table
            claims = {
                r.worker: r.masterid
                for r in conn.execute(
                    sa.select(c.c.worker, c.c.masterid).where(c.c.pool == pool)
                ).fetchall()
            }
            return bool(won), live, dead, claims

        won, live, dead, claims = yield self._do(thd)
        if won != self.is_leader:
            self._log("this master now leads the pool" if won else "this master no longer "
                      "leads the pool")
        self.is_leader = won
        self.live_masters = live
        self.claims = claims
        return dead if won else []

    def claimed_elsewhere(self, worker: str) -> bool:
        """Claimed by another master that is still alive."""
        owner = self.claims.get(worker)
        return owner is not None and owner != self.masterid and owner in self.live_masters

    @defer.inlineCallbacks
    def claim(self, workers: list[str]):
        """Claim these instances for this master; returns the ones it got.

        A claim held by this master, by nobody, or by a master whose heartbeat is stale is taken;
        one held by a live master is not.
        """
        if not workers:
            return []
        now = self._now()
        me = self.masterid
        pool = self.pool
        cutoff = now - self.takeover_after

        def thd(conn):
            c = claims_table
            m = masters_table
            stale = sa.select(m.c.masterid).where(m.c.heartbeat_at < cutoff)
            got = []
            for w in workers:
                updated = conn.execute(
                    c.update()
                    .where(c.c.pool == pool, c.c.worker == w)
                    .where(sa.or_(c.c.masterid == me, c.c.masterid.in_(stale)))
                    .values(masterid=me, claimed_at=now)
                ).rowcount
                if updated:
                    got.append(w)
                    continue
                nested = conn.begin_nested()
                try:
                    conn.execute(c.insert().values(pool=pool, worker=w, masterid=me,
                                                   claimed_at=now))
                    nested.commit()
                    got.append(w)
                except sa.exc.IntegrityError:
                    nested.rollback()
            return got

        got = yield self._do(thd)
        for w in got:
            self.claims[w] = me
        return got

    @defer.inlineCallbacks
    def release(self, workers: list[str]):
        """Drop this master's claims on these instances (after it stopped them)."""
        if not workers:
            return
        me = self.masterid
        pool = self.pool

        def thd(conn):
            c = claims_table
            conn.execute(
                c.delete().where(c.c.pool == pool, c.c.worker.in_(workers), c.c.masterid == me)
            )

        yield self._do(thd)
        for w in workers:
            if self.claims.get(w) == me:
                del self.claims[w]

    def claimed_by(self, masterid: int) -> list[str]:
        return sorted(w for w, owner in self.claims.items() if owner == masterid)

    # -- taking over a dead master ------------------------------------------------------------

    @defer.inlineCallbacks
    def release_dead_master(self, dead: DeadMaster):
        """Finish what Buildbot leaves undone when a master dies: mark it stopped (its builds
        become RETRY) and release *its* build request claims so the survivors run them again.
        Returns the released request ids."""
        yield self.master.data.updates.masterStopped(name=dead.name, masterid=dead.masterid)
        requests = yield self.master.db.buildrequests.getBuildRequests(
            complete=False, claimed=dead.masterid
        )
        brids = [br.buildrequestid for br in requests]
        if brids:
            # Buildbot's public unclaim only deletes the calling master's claims
            yield self.master.db.buildrequests._unclaim_buildrequests_for_master(
                brids, dead.masterid
            )
            yield self.master.data.rtypes.buildrequest.generateEvent(brids, "unclaimed")
        return brids

    @defer.inlineCallbacks
    def forget_master(self, masterid: int):
        """Remove a master's heartbeat once everything it held has been taken over."""

        def thd(conn):
            conn.execute(masters_table.delete().where(masters_table.c.masterid == masterid))

        yield self._do(thd)

    @defer.inlineCallbacks
    def resign(self):
        """Clean shutdown: give up the lease and the heartbeat (claims go with the stops)."""
        me = self.masterid
        pool = self.pool

        def thd(conn):
            conn.execute(
                leases_table.delete().where(leases_table.c.pool == pool,
                                            leases_table.c.masterid == me)
            )

        yield self._do(thd)
        self.is_leader = False
