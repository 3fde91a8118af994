"""Run the sandbox as its own process: ``python -m buildbot_ec2_hybrid.sandbox serve ...``.

``serve`` prints one JSON line (endpoint_url, vpc_id, instances, ...) once the region answers,
optionally writes the same JSON to ``--state-file``, and runs until SIGTERM or SIGINT. Faults
are driven from outside through ``<endpoint_url>/_sandbox/`` (see ``region.SandboxControl``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from buildbot_ec2_hybrid.sandbox.region import SandboxRegion


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m buildbot_ec2_hybrid.sandbox",
        description="A local stand-in for one AWS EC2 region (moto plus realism).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_command(commands)
    return parser


def add_region_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that make a SandboxRegion; shared by every command that runs one."""
    parser.add_argument("--region", default="us-west-2")
    parser.add_argument("--account-id", default="123456789012")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--pending-seconds", type=float, default=2.0)
    parser.add_argument("--stopping-seconds", type=float, default=2.0)
    parser.add_argument("--hibernate-resume-seconds", type=float, default=1.0)
    parser.add_argument(
        "--pool", action="append", default=[], metavar="NAME", help="a pool to create; repeatable"
    )
    parser.add_argument("--count", type=int, default=3, help="instances in each pool")
    parser.add_argument(
        "--no-hibernation",
        dest="hibernation",
        action="store_false",
        help="create the pools' instances without hibernation configured",
    )
    parser.add_argument("--state-file", type=Path, help="also write the JSON description here")


def add_serve_command(commands: Any) -> None:
    serve = commands.add_parser("serve", help="serve the region until SIGTERM/SIGINT")
    add_region_arguments(serve)
    serve.set_defaults(func=serve_command)


def start_region(args: argparse.Namespace) -> tuple[SandboxRegion, dict[str, Any]]:
    """Start a region with its pools as the arguments say; returns it and its description."""
    region = SandboxRegion(
        region=args.region,
        port=args.port,
        pending_seconds=args.pending_seconds,
        stopping_seconds=args.stopping_seconds,
        hibernate_resume_seconds=args.hibernate_resume_seconds,
        account_id=args.account_id,
    ).start()
    pools = {
        name: region.create_pool(name, args.count, hibernation=args.hibernation)
        for name in args.pool
    }
    description = {
        "endpoint_url": region.endpoint_url,
        "control_url": region.endpoint_url + "/_sandbox/",
        "region": region.region,
        "account_id": region.account_id,
        "pid": os.getpid(),
        "vpc_id": next((p.vpc_id for p in pools.values()), None),
        "pools": {name: pool.to_json() for name, pool in pools.items()},
        "instances": {n: i for pool in pools.values() for n, i in pool.instances.items()},
    }
    return region, description


def write_state_file(path: Path, description: dict[str, Any]) -> None:
    # Written whole then renamed, so a process polling for the file never reads half of it.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)


def serve_command(args: argparse.Namespace) -> int:
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    region, description = start_region(args)
    try:
        if args.state_file is not None:
            write_state_file(args.state_file, description)
        print(json.dumps(description), flush=True)
        while not done.wait(1.0):
            pass
    finally:
        region.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
