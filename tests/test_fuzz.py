"""Every parser of outside input, fuzzed: it accepts an input or raises our own error, never crashes or hangs.

The targets and strategies live in tests/fuzz_targets.py (shared with the long run,
benchmarks/fuzz.py). Here each target gets a fixed, derandomized set of examples, so the suite
is reproducible and bounded (about 20 s in all); a failure is shrunk by hypothesis to a minimal
input. A crash is any exception that is not a LoratuneError; a hang is an example that takes
longer than fuzz_targets.DEADLINE_S.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_targets import TARGETS, Fixtures

EXAMPLES = 250
"""Per target; the long run (benchmarks/fuzz.py) tries thousands."""


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fixtures:
    return Fixtures(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_parser_accepts_or_raises_our_error(fx, target):
    seen: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(target.strategy(fx))
    def check(value) -> None:
        seen[target.run(fx, value)] += 1  # anything but a LoratuneError (or a Hang) propagates: a failure

    check()
    print(f"\n{target.name}: {sum(seen.values())} inputs, {dict(seen.most_common())}")
    assert "accepted" in seen and len(seen) >= 2, f"the inputs never got past (or never failed) the checks: {seen}"
