"""Plot metrics of a run's metrics.jsonl against the step: how docs/preference.md's figures were drawn.

    python examples/plot_run.py runs/smollm2-tifu-dpo/metrics.jsonl --keys rewards/margins,val_rewards/margins \\
        --keys2 val_rewards/accuracies --title "DPO on SmolLM2-135M-Instruct" --out docs/images/dpo.png

``--keys`` go on the left axis, ``--keys2`` (optional) on a right one; validation keys (``val_...``) are drawn
with markers. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def series(path: Path, key: str) -> tuple[list[int], list[float]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    points = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", type=Path)
    p.add_argument("--keys", required=True)
    p.add_argument("--keys2", default="")
    p.add_argument("--title", default="")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    axes = [(ax, [k for k in args.keys.split(",") if k])]
    if args.keys2:
        axes.append((ax.twinx(), [k for k in args.keys2.split(",") if k]))
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    lines = []
    for axis, keys in axes:
        for key in keys:
            x, y = series(args.metrics, key)
            style = "o-" if key.startswith("val_") else "-"
            lines += axis.plot(x, y, style, label=key, color=next(colours), lw=1.3)
        axis.set_ylabel(", ".join(keys))
    ax.set_xlabel("optimizer step")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(lines, [line.get_label() for line in lines], loc="best", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
