"""loratune/train/rewards.py: GRPO's reward functions from the recipe's ``grpo.rewards``: the built-ins, user
functions called as TRL calls them, and every mistake refused with the reward (and the record) named."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from loratune.errors import ConfigError, DataError
from loratune.recipe import GRPOConfig
from loratune.train.rewards import Completions, build_rewards, score_completions


def _batch(texts, records=None, prompts=None) -> Completions:
    n = len(texts)
    records = records or [{"prompt": f"q{i}", "answer": "42"} for i in range(n)]
    return Completions(prompts or [r.get("prompt") for r in records], list(texts), [[1, 2]] * n, records,
                       list(range(10, 10 + n)))


def _scores(specs, batch) -> list[list[float]]:
    return score_completions(build_rewards(specs), batch).tolist()


def test_exact_regex_length_format():
    batch = _batch([" 42 ", "The answer is 42.", "forty-two", "I think so"],
                   [{"answer": "42"}, {"answer": "42"}, {"answer": "4[0-9]|forty-two"}, {"answer": "42"}])
    assert _scores([{"type": "exact", "field": "answer"}], batch) == [[1.0], [0.0], [0.0], [0.0]]
    assert _scores([{"type": "regex", "field": "answer", "pattern": r"answer is (\d+)"}], batch) == \
        [[0.0], [1.0], [0.0], [0.0]]
    assert _scores([{"type": "regex", "field": "answer"}], batch) == [[1.0], [1.0], [1.0], [0.0]]  # the field is the regex
    assert _scores([{"type": "length", "min_words": 2, "max_words": 3}], batch) == [[0.0], [0.0], [0.0], [1.0]]
    assert _scores([{"type": "length", "max_words": 1}], batch) == [[1.0], [0.0], [1.0], [0.0]]
    assert _scores([{"type": "format", "pattern": r"^\s*I\b"}], batch) == [[0.0], [0.0], [0.0], [1.0]]
    assert _scores([{"type": "format", "pattern": r"^The.*42\.$"}], _batch(["The\nanswer: 42."])) == [[1.0]]  # DOTALL


def test_weights_and_names():
    rewards = build_rewards([{"type": "exact", "field": "answer"}, {"type": "exact", "field": "answer", "weight": 0.5},
                             {"type": "length", "max_words": 3, "name": "short"}])
    assert [(r.name, r.weight) for r in rewards] == [("exact", 1.0), ("exact_2", 0.5), ("short", 1.0)]


def _write(tmp_path, source: str, name: str = "my_rewards"):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def test_function_called_as_trl_calls_it(tmp_path, monkeypatch):
    """prompts, completions (assistant messages for conversational prompts), completion_ids and every record
    field as a list; by module name (on the path) or by file."""
    _write(tmp_path, """
        SEEN = []
        def score(prompts, completions, completion_ids, answer, **kwargs):
            SEEN.append(dict(prompts=prompts, completions=completions, ids=completion_ids, answer=answer, **kwargs))
            return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    records = [{"prompt": "p0", "answer": "a", "level": 1}, {"prompt": "p1", "answer": "b", "level": 2}]
    (reward,) = build_rewards([{"type": "function", "function": "my_rewards:score", "weight": 2}])
    assert (reward.name, reward.weight) == ("score", 2.0)
    assert score_completions([reward], _batch(["xy", "xyz"], records)).tolist() == [[2.0], [3.0]]
    import my_rewards

    seen = my_rewards.SEEN[-1]
    assert callable(seen.pop("log_extra")) and callable(seen.pop("log_metric")) and "trainer_state" in seen
    seen.pop("trainer_state")
    assert seen == {"prompts": ["p0", "p1"], "completions": ["xy", "xyz"], "ids": [[1, 2], [1, 2]],
                    "answer": ["a", "b"], "level": [1, 2]}
    chat = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
    (by_file,) = build_rewards([{"type": "function", "function": f"{tmp_path / 'my_rewards.py'}:score"}])
    assert score_completions([by_file], _batch(["xy", "xyz"], records, chat)).tolist() == [[2.0], [3.0]]


def test_none_is_not_applicable_nan_in_the_table(tmp_path):
    path = _write(tmp_path, """
        def odd(completions, **kwargs):
            return [1.0 if i % 2 else None for i in range(len(completions))]
    """, "partial")
    specs = [{"type": "function", "function": f"{path}:odd"}, {"type": "length", "max_words": 5}]
    table = score_completions(build_rewards(specs), _batch(["a", "b", "c"]))
    assert math.isnan(table[0, 0]) and table[1, 0] == 1.0 and table[:, 1].tolist() == [1.0, 1.0, 1.0]
    assert table.dtype == torch.float32


@pytest.mark.parametrize("specs, match", [
    ([], r"grpo.rewards is empty: write e.g. grpo.rewards: \[\{type: exact, field: answer\}\]"),
    ([{"type": "bleu"}], r"grpo.rewards\[0\]: unknown reward type 'bleu'; choose one of exact, regex"),
    ([{"type": "exact"}], r"grpo.rewards\[0\] \(exact\): give the record field"),
    ([{"type": "format"}], r"grpo.rewards\[0\] \(format\): give the pattern"),
    ([{"type": "format", "pattern": "("}], r"grpo.rewards\[0\] \(format\): the pattern '\(' is not a valid regex"),
    ([{"type": "length"}], r"give min_words, max_words or both"),
    ([{"type": "length", "min_words": 5, "max_words": 2}], r"min_words 5 is above max_words 2"),
    ([{"type": "exact", "field": "answer", "weight": "high"}], r"weight must be a finite number"),
    ([{"type": "exact", "field": "answer", "patern": "x"}], r"unknown key\(s\) patern"),
    ([{"type": "length", "max_words": 3}, {"type": "function", "function": "no_such_module_xyz:f"}],
     r"grpo.rewards\[1\] \(function no_such_module_xyz:f\): cannot import no_such_module_xyz: ModuleNotFoundError"),
    ([{"type": "function", "function": "math:no_such"}], r"math has no function 'no_such'"),
    ([{"type": "function", "function": "score"}], r"'module:function' or 'path/to/file.py:function', got 'score'"),
    ([{"type": "function", "function": "/nowhere/r.py:f"}], r"no such file /nowhere/r.py"),
])
def test_bad_reward_configs_are_refused(specs, match):
    with pytest.raises(ConfigError, match=match):
        build_rewards(specs)


def test_group_size_one_is_refused_by_the_recipe():
    with pytest.raises(ConfigError, match="grpo.group_size must be >= 2: a group of 1 completion has no relative "
                                          "advantage"):
        GRPOConfig(group_size=1)


BAD_FUNCTIONS = {
    "raises": ("""
        def f(completions, answer, **kwargs):
            return [1.0 / int(a) for a in answer]
    """, (r"grpo.rewards\[0\] \(function .*:f\) raised ZeroDivisionError: float division by zero on record 11 "
          r"\(prompt 'q1'\), completion 'b'")),
    "nan": ("""
        def f(completions, **kwargs):
            return [1.0, float("nan"), 0.0]
    """, r"returned nan for record 11 \(prompt 'q1'\): a reward must be a finite number"),
    "text": ("""
        def f(completions, **kwargs):
            return ["1"] * len(completions)
    """, r"returned '1' for record 10"),
    "short": ("""
        def f(completions, **kwargs):
            return [1.0]
    """, r"returned 1 rewards for 3 completions: it must return one per completion"),
    "scalar": ("""
        def f(completions, **kwargs):
            return 1.0
    """, r"returned float, not a list of 3 floats"),
}


@pytest.mark.parametrize("case", BAD_FUNCTIONS)
def test_bad_reward_functions_name_the_function_and_the_record(tmp_path, case):
    source, match = BAD_FUNCTIONS[case]
    path = _write(tmp_path, source, f"bad_{case.replace(' ', '_')}")
    records = [{"prompt": f"q{i}", "answer": a} for i, a in enumerate(["1", "0", "2"])]
    rewards = build_rewards([{"type": "function", "function": f"{path}:f"}])
    with pytest.raises(DataError, match=match):
        score_completions(rewards, _batch(["a", "b", "c"], records))


def test_a_record_without_the_field_is_named():
    with pytest.raises(DataError, match=r"grpo.rewards\[0\] \(exact\): record 11 \(prompt 'q1'\) has no field "
                                        r"'answer' to compare with \(its fields: prompt\)"):
        _scores([{"type": "exact", "field": "answer"}], _batch(["a", "b"], [{"prompt": "q0", "answer": "a"},
                                                                          {"prompt": "q1"}]))


def test_what_trl_accepts_from_a_reward_function_is_accepted(tmp_path, caplog):
    """numpy numbers, bools (0/1) and one-element tensors are rewards, as TRL's ``torch.tensor`` reads them; the
    function gets TRL's ``trainer_state`` / ``log_extra`` / ``log_metric``; a completion no function scores
    (every one returned None) is warned about and scored NaN, which gives it advantage 0 (TRL's)."""
    from loratune.train.grpo import group_advantages

    path = _write(tmp_path, """
        import numpy as np
        import torch

        def f(completions, trainer_state, log_extra, log_metric, **kwargs):
            log_metric("seen", 1.0)
            return [np.float32(0.5), True, torch.tensor(2.0), None]
    """, "trl_like")
    batch = _batch(["a", "b", "c", "d"])
    with caplog.at_level("WARNING", logger="loratune"):
        table = score_completions(build_rewards([{"type": "function", "function": f"{path}:f"}]), batch)
    assert table[:3, 0].tolist() == [0.5, 1.0, 2.0] and math.isnan(float(table[3, 0]))
    assert "1 of 4 completions were scored by no reward function" in caplog.text and "record 13" in caplog.text
    advantages, _, _ = group_advantages(table, torch.ones(1), 4, "group")
    assert float(advantages[3]) == 0.0 and float(advantages[2]) > 0
