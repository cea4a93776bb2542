"""What several CLI tests build: a tiny random Qwen3 with Qwen3's real tokenizer (from ../shared; the test is
skipped where it is absent), through ``loratune init-model``. Each module wraps it in its own fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from loratune.cli import main

QWEN3 = Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "qwen3"


def qwen3_model_dir(tmp_path_factory) -> Path:
    if not (QWEN3 / "tokenizer.json").is_file():
        pytest.skip(f"{QWEN3} is not present (../shared holds the real tokenizers)")
    out = tmp_path_factory.mktemp("qwen3") / "model"
    assert main(["init-model", "--arch", "qwen3", "--preset", "tiny", "--tokenizer", str(QWEN3),
                 "--out", str(out)]) == 0
    return out
