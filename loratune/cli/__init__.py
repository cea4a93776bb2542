"""``loratune`` command line: one sub-command per job, each in its own module.

Every mistake a user can make ends in one line on stderr and exit status 2 (a ``LoratuneError``
or an ``OSError`` such as a missing file); anything else is a bug in loratune, reported in one
line with exit status 1, and the full traceback appears only with ``-v``.

- ``train``: run a training recipe, resumable.
- ``data``: the first examples as the model will see them, trained tokens marked.
- ``evaluate``: ``loratune eval``, loss and perplexity on a data file; with ``--generate``, completions scored
  against references (ROUGE-L, exact match, length), base and adapter side by side.
- ``compare``: LoRA against full fine-tuning on one recipe.
- ``generate``: continue a prompt (or a chat) with a model and an optional adapter.
- ``merge``: fold adapters into the base and write a Hugging Face model.
- ``export``: the model or adapter as GGUF (llama.cpp, Ollama), a Hugging Face directory or PEFT.
- ``serve``: the OpenAI-compatible server.
- ``info``: a model's architecture and what LoRA would train.
- ``init_model``: ``loratune init-model``, a random model in Hugging Face format.
- ``common``: the arguments and loading steps several commands share.

Adding a command: a module with ``add_parser(sub)`` (which sets ``run``) and one entry in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback

from ..errors import LoratuneError
from . import compare, data, evaluate, export, generate, info, init_model, merge, serve, train

COMMANDS = [train, data, evaluate, compare, generate, merge, export, serve, info, init_model]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loratune", description="LoRA fine-tuning of causal language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``loratune`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(_negative_lists(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        return int(args.run(args) or 0)
    except LoratuneError as exc:
        return _fail(args, str(exc), 2)
    except OSError as exc:  # a file or directory the user named, or a full disk
        where = f" ({exc.filename})" if exc.filename else ""
        return _fail(args, f"{exc.strerror or exc}{where}", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in loratune: short by default, the traceback with -v
        return _fail(args, f"unexpected {type(exc).__name__}: {exc}. This is a bug in loratune; please report it "
                           f"with the output of the same command run with -v (loratune -v {args.command} ...)", 1,
                     label="internal error")


_NEGATIVE_LIST = re.compile(r"^-\d[\d.eE+-]*(,\s*[-+]?[\d.eE+-]+)+$")


def _negative_lists(argv: list[str]) -> list[str]:
    """``--weights -1,-1`` as ``--weights=-1,-1``: argparse takes a value that starts with '-' for an option
    unless it is one plain number, and a comma-separated list of numbers (negative weights are legitimate)
    is none."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_LIST.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _fail(args: argparse.Namespace, message: str, code: int, label: str = "error") -> int:
    """One line on stderr (the whole traceback only with -v); returns the exit status."""
    if args.verbose:
        traceback.print_exc(file=sys.stderr)
    first = message.strip().splitlines()[0] if message.strip() else "(no message)"
    rank = f" [rank {os.environ['RANK']}]" if "RANK" in os.environ and "WORLD_SIZE" in os.environ else ""
    print(f"loratune {args.command}{rank}: {label}: {first}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
