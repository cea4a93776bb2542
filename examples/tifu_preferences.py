"""Build the offline preference and GRPO data sets of docs/preference.md from reddit_tifu posts.

    python examples/tifu_preferences.py --source ../shared/data/reddit_tifu_long/train.jsonl --out runs/tifu_pref

Writes, in TRL's conversational formats (the post as the user's turn, each answer as the assistant's):

- ``train.jsonl`` / ``heldout.jsonl``: prompt / chosen / rejected pairs for DPO (and the other preference
  objectives). ``chosen`` is the post's own TL;DR; ``rejected`` is the TL;DR of another post (a seeded
  derangement: no post gets its own), so the pair asks the model to prefer the summary that matches the post.
  The first ``--train`` posts train, the last ``--heldout`` are held out (never trained on).
- ``prompts.jsonl`` / ``prompts_heldout.jsonl``: GRPO prompts asking for a TL;DR of at most ``--max-words``
  words that begins with "I", with the post's real TL;DR kept as the ``tldr`` field.

Posts are cut to their first ``--post-words`` words so that prompt and answer fit a short sequence on a CPU.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def user_turn(instruction: str, post: str, words: int) -> list[dict]:
    text = " ".join(post.split()[:words])
    return [{"role": "user", "content": f"{instruction}\n\n{text}"}]


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n) with no fixed point."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        if all(i != j for i, j in enumerate(order)):
            return order


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="../shared/data/reddit_tifu_long/train.jsonl")
    p.add_argument("--out", default="runs/tifu_pref")
    p.add_argument("--train", type=int, default=894)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--post-words", type=int, default=64)
    p.add_argument("--max-words", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rows = [json.loads(line) for line in Path(args.source).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("documents", "").strip() and r.get("tldr", "").strip()]
    if len(rows) < args.train + args.heldout:
        raise SystemExit(f"{args.source} has {len(rows)} usable posts; --train + --heldout asks for "
                         f"{args.train + args.heldout}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": rows[:args.train], "heldout": rows[-args.heldout:]}
    summarize = "Summarize this Reddit post in one sentence."
    ask = f"Write a TL;DR of this Reddit post in at most {args.max_words} words. Begin with \"I\"."
    for name, part in splits.items():
        other = derangement(len(part), args.seed)
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i, r in enumerate(part):
                f.write(json.dumps({"prompt": user_turn(summarize, r["documents"], args.post_words),
                                    "chosen": [{"role": "assistant", "content": r["tldr"].strip()}],
                                    "rejected": [{"role": "assistant", "content": part[other[i]]["tldr"].strip()}]})
                        + "\n")
        prompts = out / ("prompts.jsonl" if name == "train" else "prompts_heldout.jsonl")
        with open(prompts, "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps({"prompt": user_turn(ask, r["documents"], args.post_words),
                                    "tldr": r["tldr"].strip()}) + "\n")
    print(f"wrote {out}/train.jsonl ({len(splits['train'])} pairs), heldout.jsonl ({len(splits['heldout'])}), "
          f"prompts.jsonl, prompts_heldout.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
