"""Answer one chat message with llama.cpp (llama-cpp-python), greedily, optionally with a LoRA adapter GGUF:
how the README's real fine-tune runs its export in llama.cpp.

    python examples/llama_cpp_chat.py --model base.gguf [--lora adapter.gguf] --prompt-file post.txt

The chat template is the GGUF's own (``tokenizer.chat_template``), applied by llama.cpp.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a model GGUF")
    p.add_argument("--lora", help="a LoRA adapter GGUF (loratune export --format gguf --adapter ...)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="the user's message")
    group.add_argument("--prompt-file", help="a file holding the user's message")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--n-ctx", type=int, default=2048)
    args = p.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python (or the prebuilt wheel in "
              "../shared/wheels)", file=sys.stderr)
        return 2
    prompt = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text(encoding="utf-8")
    llm = Llama(model_path=args.model, lora_path=args.lora, n_ctx=args.n_ctx, verbose=False)
    answer = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
                                        temperature=0.0, top_k=1)
    print(answer["choices"][0]["message"]["content"])
    llm.close()  # freed now: left to interpreter shutdown, llama-cpp-python's finalizer prints a TypeError
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
