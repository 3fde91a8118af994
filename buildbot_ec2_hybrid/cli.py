"""`buildbot-ec2-hybrid`: the operator's command line.

Subcommands live next to what they drive; this module only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: modules that contribute subcommands through ``add_subcommands(subparsers)``
SUBCOMMAND_MODULES = (
    "buildbot_ec2_hybrid.cli_ops",  # check, status
    "buildbot_ec2_hybrid.cli_perf",  # simulate, generate-trace, export-trace
)


def _demo(args: argparse.Namespace) -> int:
    try:
        from buildbot_ec2_hybrid.sandbox import demo
    except ImportError as e:
        print(
            f"the demo needs the sandbox extra: pip install 'buildbot-ec2-hybrid[sandbox]' ({e})",
            file=sys.stderr,
        )
        return 2
    return demo.run(
        short=args.short,
        duration=args.duration,
        www_port=args.www_port,
        workdir=args.workdir,
        keep=args.keep,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="buildbot-ec2-hybrid",
        description="Overflow a Buildbot farm onto a pool of stopped EC2 instances.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="run the whole story on a local sandbox region (web UI on 127.0.0.1:8010)",
        description=(
            "Start a sandbox EC2 region with stopped instances, a real master with the web UI, "
            "two in-house workers, fire a burst of builds and narrate what the pool does. "
            "Ctrl-C stops everything."
        ),
    )
    demo.add_argument("--short", action="store_true",
                      help="a quick run (small burst, short builds and idle timeout)")
    demo.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                      help="stop after this many seconds even if the story is not over")
    demo.add_argument("--www-port", type=int, default=8010, help="web UI port (127.0.0.1)")
    demo.add_argument("--workdir", default=None,
                      help="keep the master, worker and disk directories here")
    demo.add_argument("--keep", action="store_true", help="do not delete the work directory")
    demo.set_defaults(handler=_demo)

    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        module.add_subcommands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
