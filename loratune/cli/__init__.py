"""``loratune`` command line: one sub-command per job, each in its own module."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import LoratuneError
from . import compare, evaluate, generate, info, init_model, merge, train

COMMANDS = [train, evaluate, compare, generate, merge, info, init_model]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loratune", description="LoRA fine-tuning of causal language models (GPT-2).")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``loratune`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        return int(args.run(args) or 0)
    except LoratuneError as exc:
        print(f"loratune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
