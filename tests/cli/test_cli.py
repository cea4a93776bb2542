"""loratune/cli: `info` and `generate` in-process, the exit codes, and the module entry point."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import randomize_lora_
from loratune.adapters.peft_format import save_adapter
from loratune.cli import main
from loratune.generate import SamplingConfig, generate
from loratune.adapters.lora import LoRAConfig
from loratune.adapters.targets import inject_lora

PROMPT = "The quick brown fox"
MAX_NEW = 16


def _expected_text(model, tokenizer) -> str:
    """What `generate --temperature 0` must print: the greedy continuation only, cut at eos."""
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    new = generate(model, ids, SamplingConfig(max_new_tokens=MAX_NEW), eos_ids=tokenizer.eos_ids)[0].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in tokenizer.eos_ids), len(new))]
    assert new, "the continuation should not be empty"
    return tokenizer.decode(new) + "\n"


def _generate_args(ckpt, *extra: str) -> list[str]:
    return ["generate", "--model", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW),
            "--temperature", "0", *extra]


def test_module_help_runs_as_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "loratune", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: loratune")
    for command in ("info", "generate"):
        assert command in proc.stdout


def test_info_reports_lora_parameter_count(tiny_ckpt, model, capsys):
    base_total = sum(p.numel() for p in model.parameters())
    assert main(["info", "--model", str(tiny_ckpt), "--lora-targets", "q,v", "--lora-r", "4"]) == 0
    out = capsys.readouterr().out
    trainable = 2 * 2 * (4 * 64 + 64 * 4)  # layers x slices (q, v) x (A + B)
    total = base_total + trainable
    assert f"trainable: {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)\n" in out
    assert "trainable: 2,048 / " in out
    assert "2 layers adapted" in out
    assert "GPT-2, 2 layers, 4 heads, hidden 64, mlp 256, context 128, vocab 50257" in out


def test_info_without_lora_counts_everything(tiny_ckpt, model, capsys):
    n = sum(p.numel() for p in model.parameters())
    assert main(["info", "--model", str(tiny_ckpt)]) == 0
    assert f"trainable: {n:,} / {n:,} (100.00%)" in capsys.readouterr().out


@pytest.mark.parametrize("flags, bits", [([], 4.127), (["--no-double-quant"], 4.5)])
def test_info_reports_the_quantized_base_bits_per_parameter(tiny_ckpt, model, capsys, flags, bits):
    """GPT-2's projections hold 4 x 64 x 64 + 64 x 192 + 2 x 64 x 256 values per layer: NF4 at block 64 stores
    4 bits each plus one absmax per 64 (8 bits + a float32 per 256 blocks with double quantization, else 32)."""
    assert main(["info", "--model", str(tiny_ckpt), "--quantize", "nf4", *flags]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("base: nf4"))
    assert abs(float(line.split(", ")[1].split()[0]) - bits) < 0.01, line
    assert "quantized projections" in line


def test_generate_greedy_prints_only_the_continuation(tiny_ckpt, model, tokenizer, capsys):
    assert main(_generate_args(tiny_ckpt)) == 0
    captured = capsys.readouterr()
    assert captured.out == _expected_text(model, tokenizer)
    assert PROMPT not in captured.out


def test_generate_with_adapter_merged_or_not(tmp_path, tiny_ckpt, model, tokenizer, capsys):
    base_text = _expected_text(model, tokenizer)
    cfg = LoRAConfig(r=4, alpha=16, targets=["q", "v", "mlp.fc"])
    inject_lora(model, cfg)
    randomize_lora_(model, seed=21, std=0.5)
    save_adapter(model, tmp_path / "adapter", cfg, base_model=str(tiny_ckpt))
    expected = _expected_text(model, tokenizer)
    assert expected != base_text, "the adapter should change the continuation"
    assert main(_generate_args(tiny_ckpt, "--adapter", str(tmp_path / "adapter"))) == 0
    unmerged = capsys.readouterr().out
    assert main(_generate_args(tiny_ckpt, "--adapter", str(tmp_path / "adapter"), "--merge")) == 0
    merged = capsys.readouterr().out
    assert unmerged == expected
    assert merged == expected


def test_missing_model_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: loratune info" in err and "--model" in err


def test_missing_model_directory_exits_2_without_traceback(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path / "no-such-model")]) == 2
    captured = capsys.readouterr()
    assert "error:" in captured.err and "does not exist" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_missing_adapter_directory_exits_2(tmp_path, tiny_ckpt, capsys):
    assert main(_generate_args(tiny_ckpt, "--adapter", str(tmp_path / "no-adapter"))) == 2
    captured = capsys.readouterr()
    assert "adapter directory" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--top-p", "2"), ("--top-k", "0")])
def test_bad_sampling_flags_exit_2(tiny_ckpt, capsys, flag, value):
    args = _generate_args(tiny_ckpt)
    args[args.index("--temperature"):args.index("--temperature") + 2] = []
    assert main(args + [flag, value]) == 2
    err = capsys.readouterr().err
    assert flag.lstrip("-").replace("-", "_") in err and "Traceback" not in err
