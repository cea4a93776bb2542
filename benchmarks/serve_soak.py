"""Ten minutes of mixed load on ``loratune serve``: no crash, no leaked KV slots, flat memory, every completed
answer equal to ``generate`` alone.

    python benchmarks/serve_soak.py --out benchmarks/results/serve_soak.json [--seconds 600] [--clients 24]

The model is GPT-2 124M with random weights (saved by transformers, GPT-2's tokenizer) and six random LoRA
adapters (rank 8 on q and v, saved by PEFT) in one --adapter-dir, at most four held at once
(``--max-adapters 4``: a load past that evicts the least recently used one). Prompts are eight real
reddit_tifu posts cut to 8..220 tokens (the two longest are prefilled in chunks: ``--prefill-tokens 128``).

C clients (tests/soak_client.py) ask for 16 greedy tokens from the base or any of the six adapters, streamed
or whole; 15% of their requests hang up after 0-3 chunks; every 2 s an adapter is unloaded or loaded. Each
completed answer is compared with the reference: what ``generate`` gives that prompt with that adapter alone,
computed in this process before the server starts. Every 5 s the server's resident memory (VmRSS) and its
/metrics are sampled. At the end the clients stop, the server must go idle with every KV slot free, and a
SIGTERM must end it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import threading
import time
from pathlib import Path

import bench_families as families
from common import DATA, bench_cache, machine, make_checkpoint, tests_module
from serve_load import Server, make_adapters

_soak = tests_module("soak_client")  # tests/soak_client.py: the soak's clients, shared with its test
Soak, SoakPlan, metrics, settle = _soak.Soak, _soak.SoakPlan, _soak.metrics, _soak.settle

ADAPTERS = [f"t{i}" for i in range(6)]
LENGTHS = [8, 16, 24, 32, 48, 64, 160, 220]
MAX_TOKENS = 16


def soak_prompts(ckpt: Path) -> list[str]:
    from loratune.data.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    texts = [json.loads(line)["documents"] for line in DATA.read_text().splitlines()[:40]] if DATA.is_file() else \
        [" ".join(["the cat went home today and"] * 60)] * len(LENGTHS)
    texts = [t for t in texts if len(tok.encode(t)) >= max(LENGTHS)] or texts
    return [tok.decode(tok.encode(texts[i % len(texts)])[:n]) for i, n in enumerate(LENGTHS)]


def references(ckpt: Path, adapters: dict[str, Path], prompts: list[str]) -> dict[tuple[int, str], str]:
    """What greedy ``generate`` gives each prompt with each adapter alone, and with the bare base."""
    from family_models import generate_alone

    from loratune.adapters.peft_format import load_adapter
    from loratune.data.tokenizer import load_tokenizer
    from loratune.generate import SamplingConfig
    from loratune.models import load_model

    model, _ = load_model(ckpt)
    for name, path in adapters.items():
        load_adapter(model, path, name=name, activate=False)
    model.eval()
    tok, cfg = load_tokenizer(ckpt), SamplingConfig(max_new_tokens=MAX_TOKENS, temperature=0.0)
    return {(i, name): tok.decode(generate_alone(model, tok.encode(prompt), None if name == "base" else name, cfg,
                                                 tok.eos_ids))
            for i, prompt in enumerate(prompts) for name in ["base", *adapters]}


class Sampler:
    """The server's VmRSS (MB) and /metrics every ``every`` seconds, in a thread."""

    def __init__(self, server: Server, every: float = 5.0) -> None:
        self.server, self.every, self.samples = server, every, []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import httpx

        started = time.monotonic()
        while not self._stop.wait(self.every):
            status = Path(f"/proc/{self.server.proc.pid}/status").read_text()
            rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024
            m = metrics(httpx.get(f"http://127.0.0.1:{self.server.port}/metrics", timeout=30).text)
            self.samples.append({"t_s": round(time.monotonic() - started, 1), "rss_mb": round(rss, 1),
                                 "running": m["loratune_requests_running"], "waiting": m["loratune_requests_waiting"],
                                 "slots_free": m["loratune_kv_slots_free"]})

    def stop(self) -> list[dict]:
        self._stop.set()
        self.thread.join()
        return self.samples


def memory_summary(samples: list[dict]) -> dict:
    """RSS over the run: the median of the first and of the last fifth (after the first minute's warm-up)."""
    warm = [s for s in samples if s["t_s"] >= 60] or samples
    k = max(1, len(warm) // 5)
    first, last = statistics.median(s["rss_mb"] for s in warm[:k]), statistics.median(s["rss_mb"] for s in warm[-k:])
    return {"rss_first_mb": first, "rss_last_mb": last, "rss_max_mb": max(s["rss_mb"] for s in samples),
            "rss_growth_mb": round(last - first, 1), "samples": len(samples)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_soak.json"))
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--clients", type=int, default=24)
    args = p.parse_args(argv)
    ckpt = make_checkpoint("124m", bench_cache())
    adapters = make_adapters(ckpt, bench_cache() / "serve-adapters", ADAPTERS)
    prompts = soak_prompts(ckpt)
    t0 = time.monotonic()
    refs = references(ckpt, adapters, prompts)
    print(f"{len(refs)} references in {time.monotonic() - t0:.0f} s", flush=True)
    server = Server(ckpt, {n: adapters[n] for n in ADAPTERS[:4]}, 16, adapter_dir=bench_cache() / "serve-adapters",
                    extra=["--max-adapters", "4", "--prefill-tokens", "128", "--max-model-len", "512",
                           "--max-tokens", "64", "--timeout", "120"])
    try:
        sampler = Sampler(server)
        plan = SoakPlan(f"http://127.0.0.1:{server.port}", "base", prompts, refs, ADAPTERS, seconds=args.seconds,
                        clients=args.clients, max_tokens=MAX_TOKENS)
        result = asyncio.run(Soak(plan).run())
        final = settle(f"http://127.0.0.1:{server.port}")
        samples = sampler.stop()
        alive = server.proc.poll() is None
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=60)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    import torch

    out = {"format": "soak", "machine": {**machine(), "matmul": families.matmul_rate()},
           "job": {"model": "gpt2 124m (random)", "adapters": len(ADAPTERS), "max_adapters": 4, "clients": args.clients,
                   "max_batch": 16, "prompt_tokens": LENGTHS, "max_tokens": MAX_TOKENS, "seconds": args.seconds,
                   "threads": torch.get_num_threads()},
           "rows": [{"outcome": k, "count": v} for k, v in sorted(result.outcomes.items())]
           + [{"outcome": f"adapter {k}", "count": v} for k, v in sorted(result.churn.items())],
           "tokens": result.tokens, "wall_s": result.seconds, "alive_at_end": alive, "sigterm_exit": code,
           "final_metrics": final, "memory": memory_summary(samples), "wrong": result.wrong[:20],
           "server_log_tail": server.stderr()[-3000:],
           "samples": samples}
    print(json.dumps({k: v for k, v in out.items() if k != "samples"}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
