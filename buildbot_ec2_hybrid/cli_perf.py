"""The ``simulate``, ``generate-trace`` and ``export-trace`` subcommands.

:func:`add_subcommands` registers them on the ``buildbot-ec2-hybrid`` argument parser; each sets
``handler`` (and ``func``, the same) to its handler, which takes the parsed arguments and returns
the exit code. Run on its
own, ``python -m buildbot_ec2_hybrid.cli_perf`` offers the same three commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

from buildbot_ec2_hybrid import simulate as sim
from buildbot_ec2_hybrid import traces
from buildbot_ec2_hybrid.policy import PolicyConfig

STRATEGY_NAMES = ("ours", "best", "mozilla-2012", "per-build", "clairvoyant")


def add_subcommands(subparsers: Any) -> None:
    """Add ``simulate``, ``generate-trace`` and ``export-trace`` to an argparse subparsers
    object (what ``ArgumentParser.add_subparsers()`` returns)."""
    p = subparsers.add_parser(
        "simulate",
        help="replay a build-request trace through the pool's policy and compare strategies",
        description=(
            "Replay TRACE (CSV: submitted,builder,duration) on a virtual clock through the "
            "pool's own policy, with an in-house fleet, EC2 boot times and prices, and compare "
            "the pool with Mozilla RelEng's 2012 scripts, a fresh instance per build and a "
            "clairvoyant lower bound."
        ),
    )
    p.add_argument("trace", help="trace CSV (see generate-trace and export-trace)")
    p.add_argument(
        "--farm",
        choices=("synthetic",),
        help="use the fleet generate-trace's synthetic week was made for "
        "(its --inhouse, --overflow and --pool-size)",
    )
    p.add_argument(
        "--inhouse",
        action="append",
        default=[],
        metavar="PATTERN[,PATTERN]=COUNT",
        help="COUNT in-house workers serving the builders matching the glob patterns "
        "(repeat for each group; default '*=10')",
    )
    p.add_argument(
        "--overflow",
        action="append",
        default=[],
        metavar="PATTERN",
        help="builders that may overflow onto the pool (repeat; default: all)",
    )
    p.add_argument("--pool-size", type=int, help="instances in the pool (default 50)")
    p.add_argument(
        "--strategy",
        action="append",
        choices=STRATEGY_NAMES,
        help="strategies to run (repeat; default: all). 'ours' uses --overflow-after, "
        "--idle-timeout, --idle-grace and --hibernate; 'best' is the documented tuned setting",
    )
    p.add_argument("--overflow-after", type=float, default=60.0)
    p.add_argument("--idle-timeout", type=float, default=3600.0)
    p.add_argument(
        "--idle-grace",
        type=float,
        help="adaptive idle timeout: suspend after this long idle when in-house has room",
    )
    p.add_argument("--hibernate", action="store_true", help="'ours' hibernates instead of stops")
    p.add_argument("--reaction", type=float, default=0.1,
                   help="seconds from a decision to its EC2 call (default 0.1)")
    cloud = sim.CloudModel()
    for name, help_text in (
        ("pending", "seconds StartInstances -> running"),
        ("boot", "seconds running -> worker connected after a stop"),
        ("resume", "seconds running -> worker connected after a hibernation"),
        ("stopping", "seconds StopInstances -> stopped"),
        ("hibernating", "seconds StopInstances(Hibernate) -> stopped (billed)"),
        ("price", "USD per instance-hour"),
    ):
        field = "price_per_hour" if name == "price" else name
        p.add_argument(f"--{name}", type=float, default=getattr(cloud, field),
                       help=f"{help_text} (default {getattr(cloud, field)})")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(handler=cmd_simulate, func=cmd_simulate)

    g = subparsers.add_parser(
        "generate-trace",
        help="write a synthetic week of build requests (daily and weekly cycles, bursts)",
    )
    g.add_argument("output", help="CSV file to write ('-' for standard output)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--days", type=float, default=7.0)
    g.add_argument("--pushes-per-weekday", type=float, default=240.0)
    g.add_argument("--storms", type=int, default=4, help="retrigger storms in the week")
    g.set_defaults(handler=cmd_generate_trace, func=cmd_generate_trace)

    e = subparsers.add_parser(
        "export-trace",
        help="write the build-request trace of a real Buildbot database",
        description=(
            "Read a Buildbot database (an SQLAlchemy URL, e.g. sqlite:///master/state.sqlite or "
            "postgresql+psycopg2://user@host/buildbot) and write one line per build request "
            "that ran: submitted,builder,duration."
        ),
    )
    e.add_argument("db_url", help="the master's db_url")
    e.add_argument("output", help="CSV file to write ('-' for standard output)")
    e.add_argument("--since", type=traces.parse_time, help="epoch seconds or ISO date (UTC)")
    e.add_argument("--until", type=traces.parse_time, help="epoch seconds or ISO date (UTC)")
    e.add_argument("--builder", action="append", help="only this builder (repeat)")
    e.set_defaults(handler=cmd_export_trace, func=cmd_export_trace)


def _farm(args: argparse.Namespace) -> sim.Farm:
    inhouse, overflow, pool_size = list(args.inhouse), list(args.overflow), args.pool_size
    if args.farm == "synthetic":
        syn_inhouse, syn_overflow = traces.synthetic_farm_args()
        inhouse = inhouse or syn_inhouse
        overflow = overflow or syn_overflow
        pool_size = pool_size or traces.POOL_SIZE
    return sim.Farm(
        inhouse=sim.parse_inhouse(inhouse or ["*=10"]),
        pool_size=pool_size or 50,
        overflow=tuple(overflow or ["*"]),
    )


def strategies_from_args(args: argparse.Namespace, cloud: sim.CloudModel) -> list[sim.Strategy]:
    ours = PolicyConfig(
        overflow_after=args.overflow_after,
        idle_timeout=args.idle_timeout,
        idle_grace=args.idle_grace,
    )
    standard = {s.name: s for s in sim.standard_strategies(ours, sim.best_config(cloud))}
    chosen = {
        "ours": replace(standard["ours (defaults)"], name="ours", hibernate=args.hibernate,
                        reaction=args.reaction),
        "best": replace(standard["ours (best)"], reaction=args.reaction),
        "mozilla-2012": standard["mozilla-2012"],
        "per-build": standard["per-build"],
        "clairvoyant": standard["clairvoyant"],
    }
    if args.idle_grace is None and args.idle_timeout == 3600 and not args.hibernate:
        chosen["ours"] = replace(chosen["ours"], name="ours (defaults)")
    return [chosen[n] for n in (args.strategy or STRATEGY_NAMES)]


def cmd_simulate(args: argparse.Namespace) -> int:
    try:
        trace = sim.read_trace(args.trace)
        farm = _farm(args)
    except (OSError, ValueError) as e:
        print(f"simulate: {e}", file=sys.stderr)
        return 2
    cloud = sim.CloudModel(
        pending=args.pending,
        boot=args.boot,
        resume=args.resume,
        stopping=args.stopping,
        hibernating=args.hibernating,
        price_per_hour=args.price,
    )
    results = sim.compare(trace, farm, strategies_from_args(args, cloud), cloud)
    if args.json:
        json.dump([r.row() for r in results], sys.stdout, indent=2)
        print()
        return 0
    print(f"trace: {traces.trace_summary(trace)}")
    groups = ", ".join(f"{'|'.join(g.patterns)}={g.count}" for g in farm.inhouse)
    print(f"farm: in-house {groups}; pool of {farm.pool_size} for {', '.join(farm.overflow)}")
    print(f"waits are of requests on overflow builders ({len(results[0].waits)} of "
          f"{results[0].requests})")
    print(sim.format_table(results))
    return 0


def _open_output(path: str):
    if path == "-":
        return sys.stdout, False
    return open(path, "w", newline="", encoding="utf-8"), True


def cmd_generate_trace(args: argparse.Namespace) -> int:
    requests = traces.synthetic_week(
        args.seed,
        days=args.days,
        pushes_per_weekday=args.pushes_per_weekday,
        storms=args.storms,
    )
    out, close = _open_output(args.output)
    try:
        sim.write_trace(requests, out)
    finally:
        if close:
            out.close()
    if args.output != "-":
        inhouse, overflow = traces.synthetic_farm_args()
        print(f"wrote {args.output}: {traces.trace_summary(requests)}")
        print(
            "its farm: --farm synthetic (" + " ".join(f"--inhouse {s}" for s in inhouse)
            + " " + " ".join(f"--overflow '{o}'" for o in overflow)
            + f" --pool-size {traces.POOL_SIZE})"
        )
    return 0


def cmd_export_trace(args: argparse.Namespace) -> int:
    out, close = _open_output(args.output)
    try:
        n = traces.export_trace(
            args.db_url, out, since=args.since, until=args.until, builders=args.builder
        )
    except Exception as e:  # SQLAlchemy's errors name the URL's problem well enough
        print(f"export-trace: {type(e).__name__}: {_masked(str(e), args.db_url)}",
              file=sys.stderr)
        return 2
    finally:
        if close:
            out.close()
    if args.output != "-":
        print(f"wrote {n} build requests to {args.output}")
    return 0


def _masked(text: str, db_url: str) -> str:
    """``text`` without the database password, should a driver have quoted it."""
    try:
        import sqlalchemy as sa

        password = sa.engine.make_url(db_url).password
    except Exception:
        return text
    return text.replace(str(password), "***") if password else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m buildbot_ec2_hybrid.cli_perf")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
