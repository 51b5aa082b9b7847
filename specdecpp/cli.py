"""`specdecpp` console entry point: one subcommand per module in specdecpp/commands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from specdecpp import __version__

COMMANDS = ("generate", "models", "serve", "heads", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdecpp", description=__doc__)
    parser.add_argument("--version", action="version", version=f"specdecpp {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"specdecpp.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"specdecpp.commands.{name}":
                raise
            continue  # command not installed in this build
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # results files record the command line
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"specdecpp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
