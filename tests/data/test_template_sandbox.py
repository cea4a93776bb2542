"""Chat templates are untrusted code: each hostile one ends, within about RENDER_SECONDS, in a DataError of one
line naming the bound it crossed; ordinary template code still renders as before; reserved variables are
refused; and one render's budget is its own (a hostile render in one thread leaves another's alone)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from loratune.data import DataConfig
from loratune.data.chat_template import (
    RESERVED_TEMPLATE_VARIABLES,
    ChatTemplate,
    check_template_variables,
)
from loratune.data.template_bounds import MAX_OUTPUT_CHARS, RENDER_SECONDS
from loratune.errors import ConfigError, DataError

HI = [{"role": "user", "content": "hi"}]
WALL = RENDER_SECONDS + 1.5  # the bound, plus one slow step and a loaded machine

HOSTILE = [
    ("nested range loops", "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
     "ran for more than 2 s"),
    ("nested empty loops", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "ran for more than 2 s"),
    ("loops over a string", "{% set s = 'x' * 50000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
     "ran for more than 2 s"),
    ("a recursive loop", "{% for m in [1] recursive %}{% for i in range(100000) %}{% endfor %}{{ loop([1]) }}"
     "{% endfor %}", "ran for more than 2 s|nested calls more than"),
    ("range(10**12)", "{% for i in range(10**12) %}{% endfor %}", "range of 1,000,000,000,000 items"),
    ("range(10**30)", "{{ range(10**30)|length }}", "range of more than 2**63 items"),
    ("a recursive macro", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "nested calls more than 64"),
    ("'x' * 10**11", "{{ 'x' * 10**11 }}", "100,000,000,000 characters or items with '*'"),
    ("a list * 10**11", "{{ ['x'] * 10**11 }}", "with '*'"),
    ("2 ** 10**9", "{{ 2 ** 1000000000 }}", "past 65,536 bits"),
    ("doubling with ~", "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}", "with '~'"),
    ("doubling with +", "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}", "with '+'"),
    ("include", "{% include 'x' %}", "uses {% include %}"),
    ("import", "{% import 'x' as y %}", "uses {% import %}"),
    ("from import", "{% from 'x' import y %}", "uses {% from ... import %}"),
    ("extends", "{% extends 'x' %}", "uses {% extends %}"),
    ("a huge output", "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "produced more than"),
    ("a huge set block", "{% set b %}{% for i in range(100000) %}{{ 'y' * 5000000 }}{% endfor %}{% endset %}",
     "wrote more than"),
    ("center(10**11)", "{{ 'x'|center(10**11) }}", "passed 100,000,000,000 to the filter 'center'"),
    ("indent", "{{ ('a\n' * 1000000)|indent(1000) }}", "with the filter 'indent'"),
    ("wordwrap", "{{ ('a ' * 1000000)|wordwrap(1, wrapstring='z' * 100) }}", "with the filter 'wordwrap'"),
    ("truncate(10**11)", "{{ 'x'|truncate(10**11) }}", "to the filter 'truncate'"),
    ("batch", "{{ [1]|batch(10**10, 'x')|list }}", "to the filter 'batch'"),
    ("slice", "{{ [1]|slice(10**10, 'x')|list }}", "to the filter 'slice'"),
    ("replace filter", "{{ ('x' * 100000)|replace('', 'y' * 100000) }}", "with the filter 'replace'"),
    ("str.replace", "{{ ('x' * 100000).replace('', 'y' * 100000) }}", "with str.replace"),
    ("str.center", "{{ 'x'.center(10**10) }}", "with str.center"),
    ("str.expandtabs", "{{ ('\t' * 1000000).expandtabs(100000) }}", "with str.expandtabs"),
    ("str.translate", "{{ ('x' * 1000000).translate({120: 'y' * 1000}) }}", "with str.translate"),
    ("join of a map", "{{ range(100000)|map('center', 5000000)|join }}", "with the filter 'join'"),
    ("str.join of a map", "{{ ''.join(range(100000)|map('center', 5000000)) }}", "with str.join"),
    ("a % width", "{{ '%0999999999d' % 1 }}", "width or precision of 999,999,999 in a '%' format"),
    ("a % * width", "{{ '%*d' % (10**9, 1) }}", "in a '%' format"),
    ("the format filter", "{{ '%0999999999d'|format(1) }}", "in a '%' format"),
    ("a str.format width", "{{ '{:>9999999999}'.format(1) }}", "in a str.format spec"),
    ("a nested str.format width", "{{ '{:>{w}}'.format(1, w=10**10) }}", "in a str.format spec"),
    ("tojson indent", "{{ messages|tojson(indent=1000) }}", "indent of 1,000"),
    ("division by zero", "{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
    ("an internal attribute", "{{ ''.__class__.__mro__ }}", "sandbox refuses"),
    ("deeply nested brackets", "{{ " + "[" * 3000 + "]" * 3000 + " }}", "nests too deeply to parse"),
    ("a template of 1 MiB and more", "x" * (2**20 + 1), "is 1,048,577 characters (the bound is 1,048,576)"),
]


@pytest.mark.parametrize("template, needle", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_a_hostile_template_is_refused_in_bounded_time(template, needle):
    start = time.monotonic()
    with pytest.raises(DataError) as caught:
        ChatTemplate(template).render(HI)
    took = time.monotonic() - start
    message = str(caught.value)
    assert took < WALL, f"{took:.1f} s"
    assert "\n" not in message and message.startswith("the chat template ")
    assert any(part in message for part in needle.split("|")), message


def test_the_time_bound_lets_a_render_finish_that_fits_it():
    # 200 x 200 loop steps: a fraction of a second, well inside RENDER_SECONDS
    text, _ = ChatTemplate("{% for i in range(200) %}{% for j in range(200) %}{% endfor %}{% endfor %}ok").render(HI)
    assert text == "ok"


@pytest.mark.parametrize("template, expected", [
    ("{% for i in range(3) %}{{ loop.index }}/{{ loop.length }}{{ ',' if not loop.last }}{% endfor %}",
     "1/3,2/3,3/3"),
    ("{{ range(5)|list|join(',') }}|{{ range(10, 0, -3)|list }}|{{ range(4)|reverse|first }}",
     "0,1,2,3,4|[10, 7, 4, 1]|3"),
    ("{% for m in messages if m.role == 'user' %}{{ m.content|upper }}{% else %}none{% endfor %}", "HI"),
    ("{% for m in [] %}x{% else %}empty{% endfor %}", "empty"),
    ("{% macro f(n) %}{% if n %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(5) }}", "54321"),
    ("{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}", "a=1"),
    ("{{ 'ab' * 3 }}{{ [0] * 2 }}{{ 2 ** 10 }}{{ 'x' ~ 1 ~ 'y' }}{{ '%05.1f|%s' % (3.14159, 'z') }}",
     "ababab[0, 0]1024x1y003.1|z"),
    ("{{ '{:>6}|{}'.format('r', 2) }}{{ 'a b'.replace(' ', '-') }}{{ 'x'|center(5) }}", "     r|2a-b  x  "),
    ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}", "1"),
    ("{{ messages|tojson(indent=2) }}", '[\n  {\n    "role": "user",\n    "content": "hi"\n  }\n]'),
    ("{% for i in [[1, [2]], [3]] recursive %}{% if i is iterable %}{{ loop(i) }}{% else %}{{ i }}{% endif %}"
     "{% endfor %}", "123"),
    ("{% set b %}{% for m in messages %}<{{ m.content }}>{% endfor %}{% endset %}{{ b }}{{ b|length }}", "<hi>4"),
    ("{{ (messages|map(attribute='content')|list)[0] }}{{ messages|selectattr('role', 'eq', 'user')|list|length }}",
     "hi1"),
    ("{{ 'abc'|wordwrap(2) }}|{{ 'a\nb'|indent(2, true) }}|{{ 'xyz'|truncate(3) }}", "ab\nc|  a\n  b|xyz"),
])
def test_ordinary_template_code_renders_as_before(template, expected):
    assert ChatTemplate(template).render(HI)[0] == expected


def test_an_output_just_under_the_bound_renders():
    n = MAX_OUTPUT_CHARS // 1000
    text, _ = ChatTemplate("{% for i in range(N) %}{{ 'x' * 1000 }}{% endfor %}".replace("N", str(n))).render(HI)
    assert len(text) == n * 1000


def test_training_data_with_a_template_that_never_ends_is_refused_once(tmp_path):
    """The encoder's probe render already crosses the bound: refused there, not after two more renders."""
    from loratune.data.chat import ChatEncoder
    from loratune.data.tokenizer import load_tokenizer

    path = Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "qwen3"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"{path} is not present (../shared holds the real tokenizers)")
    start = time.monotonic()
    with pytest.raises(DataError, match="ran for more than 2 s"):
        ChatEncoder(load_tokenizer(path), HOSTILE[0][1], DataConfig(task="chat"), seq_len=64)
    assert time.monotonic() - start < WALL


def test_one_render_budget_does_not_touch_another_thread():
    """A server renders in worker threads: a hostile render in one must not cut or stall another."""
    hostile = ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    good = ChatTemplate("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    errors: list[str] = []

    def run_hostile():
        try:
            hostile.render(HI)
        except DataError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=run_hostile)
    start = time.monotonic()
    thread.start()
    answers = []
    while thread.is_alive() and time.monotonic() - start < WALL + 2:
        answers.append(good.render(HI)[0])
        time.sleep(0.05)
    thread.join(WALL)
    assert not thread.is_alive() and errors and "ran for more than" in errors[0]
    assert answers and set(answers) == {"user: hi\n"}


@pytest.mark.parametrize("name", sorted(RESERVED_TEMPLATE_VARIABLES))
def test_reserved_variables_are_refused_by_name(name):
    with pytest.raises(ConfigError, match=f"data.template_kwargs: '{name}' is set by loratune itself"):
        DataConfig(task="chat", template_kwargs={name: True})
    with pytest.raises(ConfigError, match=f"'{name}' is set by loratune itself"):
        ChatTemplate("x", None, **{name: True})
    if name != "add_generation_prompt":  # render's own parameter
        with pytest.raises(ConfigError, match=f"'{name}' is set by loratune itself"):
            ChatTemplate("x").render(HI, **{name: True})


@pytest.mark.parametrize("variables, needle", [
    ({1: "x"}, "1 is not a variable name"),
    ({"not a name": 1}, "'not a name' is not a variable name"),
    (["enable_thinking"], "must map variable names to values"),
])
def test_template_variables_must_be_a_mapping_of_names(variables, needle):
    with pytest.raises(ConfigError, match=needle):
        check_template_variables(variables, "--template-var")


def test_other_variables_still_reach_the_template():
    check_template_variables({"enable_thinking": False, "tools": [{"name": "x"}]}, "data.template_kwargs")
    text, _ = ChatTemplate("{{ bos_token }}{{ enable_thinking }}", {"bos_token": "<s>"}, enable_thinking=False
                           ).render(HI)
    assert text == "<s>False"
