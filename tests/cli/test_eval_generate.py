"""``loratune eval --generate`` end to end on the tiny GPT-2 (and a tiny Qwen3 with its real chat template):
each completion is the one ``loratune generate`` prints for that prompt, with and without the adapter; the
report's files hold those completions, their scores and means that agree with them; the report directory
follows runtime/outdir.py's rules; and every bad input is one line on stderr with nothing written."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from cli_models import qwen3_model_dir

pytest.importorskip("rouge_score")

from conftest import randomize_lora_  # noqa: E402
from loratune.adapters.lora import LoRAConfig  # noqa: E402
from loratune.adapters.peft_format import save_adapter  # noqa: E402
from loratune.adapters.targets import inject_lora  # noqa: E402
from loratune.cli import main  # noqa: E402
from loratune.generate.scoring import rouge_l  # noqa: E402
from loratune.models import load_model  # noqa: E402
from loratune.runtime.outdir import MANIFEST_NAME  # noqa: E402

MAX_NEW = 12
PROMPTS = ["The quick brown fox", "Once upon a time there was", "My cat ate the birthday cake and"]


def _generate(capsys, model: Path, prompt: str, *extra: str) -> str:
    """What `loratune generate` prints for ``prompt`` (greedy), without the final newline."""
    assert main(["generate", "--model", str(model), "--prompt", prompt, "--max-new-tokens", str(MAX_NEW),
                 *extra]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory) -> Path:
    return qwen3_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_ckpt):
    """An adapter that changes the tiny model's output, and three prompts whose first reference is exactly what
    the base model writes (so that exact match and ROUGE-L have something to find)."""
    root = tmp_path_factory.mktemp("evalgen")
    model, _ = load_model(tiny_ckpt)
    cfg = LoRAConfig(r=4, alpha=16, targets=["q", "v", "mlp.fc"])
    inject_lora(model, cfg)
    randomize_lora_(model, seed=21, std=0.5)
    save_adapter(model, root / "adapter", cfg, base_model=str(tiny_ckpt))
    return root


def _data(root: Path, base_first: str) -> Path:
    references = [base_first, "a story about a dragon", "the cake was gone"]
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps({"post": p, "tldr": r}) + "\n" for p, r in zip(PROMPTS, references)),
                    encoding="utf-8")
    return path


def _args(model: Path, data: Path, *extra: str) -> list[str]:
    return ["eval", "--generate", "--model", str(model), "--data", str(data), "--task", "completion",
            "--prompt-template", "{post}", "--completion-template", "{tldr}", "--max-new-tokens", str(MAX_NEW),
            *extra]


def test_base_and_adapter_side_by_side_equal_loratune_generate(setup, tiny_ckpt, capsys):
    base = [_generate(capsys, tiny_ckpt, p) for p in PROMPTS]
    adapter = [_generate(capsys, tiny_ckpt, p, "--adapter", str(setup / "adapter")) for p in PROMPTS[:1]]
    assert base[0].strip(), "the base model's first completion should not be empty"
    data = _data(setup, base[0])
    report = setup / "report"
    assert main(_args(tiny_ckpt, data, "--adapter", str(setup / "adapter"), "--report", str(report))) == 0
    table = capsys.readouterr().out

    rows = [json.loads(line) for line in (report / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and [r["where"] for r in rows][1] == f"{data}, line 2"
    assert [r["base"]["completion"] for r in rows] == base  # base = the adapter disabled
    assert rows[0]["adapter"]["completion"] == adapter[0]
    assert any(r["adapter"]["completion"] != r["base"]["completion"] for r in rows), "the adapter changes nothing"
    first = rows[0]["base"]
    assert first["exact"] is True and first["rouge_l"] == rouge_l(base[0], base[0]) == 1.0
    for r in rows:
        for name in ("base", "adapter"):
            assert r[name]["rouge_l"] == rouge_l(r[name]["completion"], r["reference"])
            assert r[name]["words"] == len(r[name]["completion"].split()) and 0 < r[name]["tokens"] <= MAX_NEW

    result = json.loads((report / "report.json").read_text())
    assert (result["model"], result["adapter"], result["examples"]) == (str(tiny_ckpt), str(setup / "adapter"), 3)
    assert result["settings"]["max_new_tokens"] == MAX_NEW and result["settings"]["decoding"] == "greedy"
    for name in ("base", "adapter"):
        means = result["models"][name]
        assert means["rouge_l"] == pytest.approx(sum(r[name]["rouge_l"] for r in rows) / 3, abs=1e-12)
        assert means["exact"] == pytest.approx(sum(r[name]["exact"] for r in rows) / 3, abs=1e-12)
        assert means["tokens"] == pytest.approx(sum(r[name]["tokens"] for r in rows) / 3, abs=1e-12)
    d = result["difference"]
    assert d["rouge_l"] == pytest.approx(result["models"]["adapter"]["rouge_l"] - result["models"]["base"]["rouge_l"])
    assert d["better"] + d["worse"] + d["same"] == 3
    assert result["reference"]["words"] == pytest.approx(sum(r["reference_words"] for r in rows) / 3)

    markdown = (report / "report.md").read_text()
    assert table in markdown and "| adapter - base |" in table and f"| base ({tiny_ckpt}) |" in table
    assert (report / "rouge_l.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(json.loads((report / MANIFEST_NAME).read_text())["outputs"]) == {
        "generations.jsonl", "report.json", "report.md", "rouge_l.png"}

    # --json without --report: the same result as one JSON object; three prompts of different lengths in one
    # left-padded batch give the same completions as one at a time
    assert main(_args(tiny_ckpt, data, "--adapter", str(setup / "adapter"), "--json", "--batch-size", "3")) == 0
    batched = json.loads(capsys.readouterr().out)
    assert batched["settings"].pop("batch_size") == 3 and result["settings"].pop("batch_size") == 1
    assert batched == result


def test_the_report_directory_is_new_or_overwritten_keeping_the_users_files(setup, tiny_ckpt, tmp_path, capsys):
    data = _data(tmp_path, "a fox")
    report = tmp_path / "report"
    assert main(_args(tiny_ckpt, data, "--max-examples", "1", "--report", str(report))) == 0
    first = (report / "generations.jsonl").read_text()
    assert len(first.splitlines()) == 1 and "adapter" not in json.loads(first)
    (report / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(_args(tiny_ckpt, data, "--max-examples", "2", "--report", str(report))) == 2
    assert "--report" in capsys.readouterr().err and (report / "generations.jsonl").read_text() == first
    assert main(_args(tiny_ckpt, data, "--max-examples", "2", "--report", str(report), "--overwrite")) == 0
    assert len((report / "generations.jsonl").read_text().splitlines()) == 2
    assert (report / "notes.txt").read_text() == "mine"


def test_without_matplotlib_the_plot_is_skipped_with_a_notice(tiny_ckpt, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without the package raises
    report = tmp_path / "report"
    with caplog.at_level(logging.WARNING, logger="loratune"):
        assert main(_args(tiny_ckpt, _data(tmp_path, "a fox"), "--max-examples", "1", "--report", str(report))) == 0
    assert "matplotlib is not installed: skipping rouge_l.png (pip install 'loratune[plot]')" in caplog.text
    assert sorted(p.name for p in report.iterdir() if not p.name.startswith(".")) == [
        "generations.jsonl", "report.json", "report.md"]


def _bad_records(root: Path) -> dict[str, Path]:
    files = {"empty": "", "no-reference": '{"post": "The fox"}\n',
             "blank-reference": '{"post": "The fox", "tldr": " "}\n', "no-prompt": '{"post": "", "tldr": "a fox"}\n'}
    paths = {}
    for name, text in files.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text(text, encoding="utf-8")
    paths["chat"] = root / "chat.jsonl"
    paths["chat"].write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", encoding="utf-8")
    return paths


BAD = [
    ("empty data", ["{empty}"], "the data is empty: no records in"),
    ("a reference missing", ["{no-reference}"], "field 'tldr' is not in the records of"),
    ("a blank reference", ["{blank-reference}"], "has a prompt and a reference: every one has an empty or missing"),
    ("no prompt", ["{no-prompt}"], "has a prompt and a reference: every one has an empty or missing"),
    ("chat without an answer", ["{chat}", "--task", "chat", "--chat-template", "chatml"],
     "line 1: no assistant message, so no reference to score against"),
    ("causal_lm", ["{no-reference}", "--task", "causal_lm"], "--generate needs prompts and references"),
    ("no room for a prompt", ["{no-reference}", "--max-new-tokens", "128"], "--max-new-tokens 128 leaves no room"),
    ("the report is the model", ["{no-reference}", "--report", "{model}"], "exists and is not empty"),
    ("the report holds the data", ["{no-reference}", "--report", "{root}", "--overwrite"],
     "--report {root} holds the data"),
]


@pytest.mark.parametrize("extra, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(tiny_ckpt, tmp_path, capsys, extra, message):
    paths = {**_bad_records(tmp_path), "model": tiny_ckpt, "root": tmp_path}
    fill = lambda s: s.format(**{k: str(v) for k, v in paths.items()}) if s.startswith("{") else s  # noqa: E731
    args = ["eval", "--generate", "--model", str(tiny_ckpt), "--data", *map(fill, extra), "--task", "completion",
            "--prompt-template", "{post}", "--completion-template", "{tldr}"]
    if "--task" in extra:  # the row's own --task comes last and wins
        args += ["--task", extra[extra.index("--task") + 1]]
    if "--report" not in extra:
        args += ["--report", str(tmp_path / "report")]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("loratune eval: error: ")
    assert message.replace("{root}", str(tmp_path)) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no report directory, nothing else


def test_report_flags_without_generate_are_refused(tiny_ckpt, tmp_path, capsys):
    data = _data(tmp_path, "a fox")
    assert main(["eval", "--model", str(tiny_ckpt), "--data", str(data), "--text-field", "post",
                 "--report", str(tmp_path / "r")]) == 2
    assert "--report, --overwrite and --max-new-tokens apply to --generate" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()



def test_chat_completions_equal_generate_chat(qwen3_model, tmp_path, capsys):
    """The last assistant turn is the reference; the conversation before it is the prompt, as `generate --chat`
    renders a user message, and the completion stops where that command's does."""
    questions = ["Translate to French: cat", "What is 2 plus 2?"]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": "chat"}]}) + "\n"
                            for q in questions), encoding="utf-8")
    expected = [_generate(capsys, qwen3_model, q, "--chat", "--template-var", "enable_thinking=false")
                for q in questions]
    report = tmp_path / "report"
    assert main(["eval", "--generate", "--model", str(qwen3_model), "--data", str(data), "--task", "chat",
                 "--template-var", "enable_thinking=false", "--max-new-tokens", str(MAX_NEW),
                 "--report", str(report)]) == 0
    result = json.loads((report / "report.json").read_text())
    assert result["examples"] == 2 and result["settings"]["template_vars"] == {"enable_thinking": False}
    rows = [json.loads(line) for line in (report / "generations.jsonl").read_text().splitlines()]
    assert [r["base"]["completion"] for r in rows] == expected
    assert all(r["reference"] == "chat" and r["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
               for r in rows)


def test_chat_loss_counts_the_assistant_tokens_as_training_does(qwen3_model, tmp_path, capsys):
    """Without --generate, --task chat is the loss on the assistant turns and their end-of-turn tokens."""
    from loratune.data import DataConfig, build_examples, load_records, load_tokenizer

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in [("Translate to French: cat", "chat"), ("2 plus 2?", "4")]), encoding="utf-8")
    assert main(["eval", "--model", str(qwen3_model), "--data", str(data), "--task", "chat", "--template-var",
                 "enable_thinking=false", "--json"]) == 0
    cfg = DataConfig(source=str(data), task="chat", template_kwargs={"enable_thinking": False})
    examples = build_examples(load_records(str(data), cfg), cfg, load_tokenizer(qwen3_model), 128)
    loss = json.loads(capsys.readouterr().out)
    assert loss["examples"] == 2 and loss["tokens"] == sum(sum(t != -100 for t in e.labels) for e in examples) > 0
