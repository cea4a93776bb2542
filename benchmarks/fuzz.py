"""The long fuzz run: every parser of outside input, thousands of malformed inputs each.

The targets and strategies are those of the test suite (tests/fuzz_targets.py); here hypothesis
runs them in rounds of fresh random examples (no shrinking, no example database) until each
target's time share is spent, and every outcome is counted instead of stopping at the first
failure. An outcome is "accepted", a clean error (one of loratune's error types, counted by
name), a crash (any other exception, counted by type and first line), or a hang (no answer
within the per-example deadline).

    python benchmarks/fuzz.py --seconds 300            # all targets, 300 s in all
    python benchmarks/fuzz.py --seconds 60 --target data --json out.json

Exit status 1 when anything crashed or hung.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

import common

_targets = common.tests_module("fuzz_targets")  # tests/fuzz_targets.py, shared with tests/test_fuzz.py
TARGETS, Fixtures, Hang = _targets.TARGETS, _targets.Fixtures, _targets.Hang


def fuzz_target(target, fx: Fixtures, seconds: float, seed: int, batch: int = 200) -> dict:
    """Run ``target`` for about ``seconds``; returns its counts."""
    counts = {"tried": 0, "accepted": 0, "errors": Counter(), "crashes": Counter(), "hangs": 0}
    examples, distinct = {}, set()
    strategy = target.strategy(fx)
    end = time.monotonic() + seconds
    round_ = 0
    while time.monotonic() < end:
        @settings(max_examples=batch, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def one(value):
            if time.monotonic() >= end:
                return
            counts["tried"] += 1
            distinct.add(hash(repr(value)))
            try:
                result = target.run(fx, value)
            except Hang:
                counts["hangs"] += 1
                examples.setdefault("hang", repr(value)[:300])
                return
            except Exception as exc:  # a crash: record it, keep going
                first = str(exc).splitlines()[0] if str(exc) else ""
                key = f"{type(exc).__name__}: {re.sub(r'[0-9]+', 'N', first)[:100]}"  # one key per kind of crash
                counts["crashes"][key] += 1
                if key not in examples:
                    examples[key] = repr(value)[:300] + "\n" + "".join(traceback.format_exc().splitlines(True)[-6:])
                return
            if result == "accepted":
                counts["accepted"] += 1
            else:
                counts["errors"][result] += 1

        hypothesis_seed(seed * 1_000_003 + round_)(one)()  # a fresh stream of examples each round
        round_ += 1
    counts["examples"], counts["distinct"] = examples, len(distinct)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="time budget for all targets together")
    parser.add_argument("--target", action="append", help="only these targets (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the counts here")
    parser.add_argument("-v", "--verbose", action="store_true", help="print an input and a traceback per crash")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # the loaders warn about odd inputs; the counts are what matter
    chosen = [t for t in TARGETS if not args.target or t.name in args.target]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        fx = Fixtures(Path(tmp))
        for target in chosen:
            start = time.monotonic()
            counts = fuzz_target(target, fx, args.seconds / len(chosen), args.seed)
            counts["seconds"] = round(time.monotonic() - start, 1)
            results[target.name] = counts
            errors = sum(counts["errors"].values())
            crashes = sum(counts["crashes"].values())
            print(f"{target.name:16s} tried {counts['tried']:6d} ({counts['distinct']:6d} distinct)  "
                  f"accepted {counts['accepted']:5d}  "
                  f"clean errors {errors:6d}  crashes {crashes:4d}  hangs {counts['hangs']:3d}  "
                  f"({counts['seconds']} s)", flush=True)
            for key, n in counts["crashes"].most_common():
                print(f"    CRASH x{n}: {key}", flush=True)
                if args.verbose:
                    print(f"      {counts['examples'][key]}", flush=True)
    total = {k: sum(r[k] if isinstance(r[k], int) else sum(r[k].values()) for r in results.values())
             for k in ("tried", "distinct", "accepted", "errors", "crashes", "hangs")}
    print(f"{'all':16s} tried {total['tried']:6d} ({total['distinct']:6d} distinct)  "
          f"accepted {total['accepted']:5d}  clean errors "
          f"{total['errors']:6d}  crashes {total['crashes']:4d}  hangs {total['hangs']:3d}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": args.seconds, "seed": args.seed, "targets": results,
                                               "total": total}, indent=2, default=dict))
    return 1 if total["crashes"] or total["hangs"] else 0


if __name__ == "__main__":
    sys.exit(main())
