"""Load on ``loratune serve``: concurrent clients over a mix of adapters, against one request at a time and
against transformers + PEFT switching adapters per request, in one run.

    python benchmarks/serve_load.py --out benchmarks/results/serve.json [--requests 32] [--max-tokens 24]

The model is GPT-2 124M with random weights (saved by transformers, GPT-2's tokenizer), with K = 4 random
LoRA adapters (rank 8 on q and v, saved by PEFT). Prompts are the first 48 tokens of real reddit_tifu posts
(../shared; seeded random text without it). Every request asks for ``--max-tokens`` tokens, greedily, and
streams (for the time to first token). For each configuration a real ``loratune serve`` process is started on
a free loopback port, and C clients (1, 8, 32) each send their share of the requests one after another;
throughput is generated tokens over the wall time of the whole burst, latency is per request.

Configurations: mixed adapters with continuous batching (``--max-batch 32``); the same with batching off
(``--max-batch 1``: one request at a time); all requests on one adapter, batched (what per-row adapters
cost); and transformers + PEFT in this process, one request at a time with ``set_adapter`` before each (the
peer: no server, so its numbers are an upper bound of what a server around it would do), with our engine the
same way beside it (in this process, one request at a time, no HTTP: what the server's layers cost).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_families as families
from bench_dist import free_port
from common import DATA, bench_cache, machine, make_checkpoint

ADAPTERS = ["t0", "t1", "t2", "t3"]
PROMPT_TOKENS = 48


def make_adapters(ckpt: Path, root: Path, names: list[str] = ADAPTERS) -> dict[str, Path]:
    """Random LoRA adapters (r 8, q and v) saved by PEFT, one per name (seeded by its place)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    out = {}
    for i, name in enumerate(names):
        path = root / name
        out[name] = path
        if (path / "adapter_config.json").exists():
            continue
        peft = get_peft_model(GPT2LMHeadModel.from_pretrained(ckpt), LoraConfig(
            r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        peft.save_pretrained(path)
    return out


def prompts(ckpt: Path, n: int) -> list[str]:
    from loratune.data.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    if DATA.is_file():
        texts = [json.loads(line)["documents"] for line in DATA.read_text().splitlines()[:n]]
    else:
        rng = random.Random(0)
        texts = [" ".join(rng.choice(["the", "cat", "went", "home", "today", "and"]) for _ in range(80))
                 for _ in range(n)]
    return [tok.decode(tok.encode(t)[:PROMPT_TOKENS]) for t in texts]


class Server:
    """A ``loratune serve`` process on a free loopback port (``extra``: more flags; later ones win)."""

    def __init__(self, ckpt: Path, adapters: dict[str, Path], max_batch: int, adapter_dir: Path | None = None,
                 extra: list[str] = ()) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "loratune", "serve", "--model", str(ckpt), "--served-model-name", "base",
               "--device", "cpu", "--port", str(self.port), "--max-batch", str(max_batch), "--max-queue", "256",
               "--max-tokens", "256", *[a for n, p in adapters.items() for a in ("--adapter", f"{n}={p}")],
               *(["--adapter-dir", str(adapter_dir)] if adapter_dir else []), *extra]
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="loratune-serve-")  # a pipe could fill
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        import httpx

        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {self.stderr()[-2000:]}")
            time.sleep(0.5)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


async def _one(client, prompt: str, model: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json={"model": model, "prompt": prompt, "temperature": 0,
                                                              "max_tokens": max_tokens, "stream": True,
                                                              "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - t0
    return {"latency": time.perf_counter() - t0, "ttft": first, "tokens": tokens}


async def _burst(port: int, jobs: list[tuple[str, str]], clients: int, max_tokens: int) -> tuple[list[dict], float]:
    import httpx

    shares = [jobs[i::clients] for i in range(clients)]

    async def client_loop(share):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            return [await _one(client, p, m, max_tokens) for p, m in share]

    t0 = time.perf_counter()
    results = await asyncio.gather(*(client_loop(s) for s in shares))
    return [r for rs in results for r in rs], time.perf_counter() - t0


def summarise(name: str, clients: int, results: list[dict], wall: float) -> dict:
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in results)
    return {"config": name, "clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1,
                                                                                          int(0.99 * len(lat)))],
            "ttft_p50_s": statistics.median(ttft) if ttft else None}


def peer_run(ckpt: Path, adapters: dict[str, Path], jobs: list[tuple[str, str]], max_tokens: int) -> dict:
    """transformers + PEFT, one request at a time, set_adapter before each."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(ckpt)
    names = list(adapters)
    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(ckpt), adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapters[n], adapter_name=n)
    model.eval()
    results = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for prompt, name in jobs:
            s = time.perf_counter()
            model.set_adapter(name)
            ids = tok(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
            results.append({"latency": time.perf_counter() - s, "ttft": None, "tokens": out.shape[1] - ids.shape[1]})
    return summarise("transformers+PEFT, set_adapter per request", 1, results, time.perf_counter() - t0)


def engine_run(ckpt: Path, adapters: dict[str, Path], jobs: list[tuple[str, str]], max_tokens: int) -> dict:
    """Our engine in this process, one request at a time (no HTTP): like for like with the peer's row."""
    import torch

    from loratune.data.tokenizer import load_tokenizer
    from loratune.generate.sampling import SamplingConfig
    from loratune.models import load_model
    from loratune.serve.adapters import AdapterRegistry
    from loratune.generate.engine import Engine, Request

    model, _ = load_model(ckpt, dtype=torch.float32, device="cpu")
    registry = AdapterRegistry(model, "base", None, len(adapters))
    for name, path in adapters.items():
        registry.load(name, path, set(), trusted=True)
    engine, tok = Engine(model, max_batch=1), load_tokenizer(ckpt)
    results = []
    t0 = time.perf_counter()
    for prompt, name in jobs:
        s = time.perf_counter()
        engine.submit(Request(tok.encode(prompt), name, SamplingConfig(max_new_tokens=max_tokens, temperature=0.0)))
        tokens = 0
        while engine.busy():
            tokens += len(engine.step()[0])
        results.append({"latency": time.perf_counter() - s, "ttft": None, "tokens": tokens})
    return summarise("loratune engine in-process, one request at a time", 1, results, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--clients", default="1,8,32")
    args = p.parse_args(argv)
    ckpt = make_checkpoint("124m", bench_cache())
    adapters = make_adapters(ckpt, bench_cache() / "serve-adapters")
    texts = prompts(ckpt, args.requests)
    mixed = [(t, ADAPTERS[i % len(ADAPTERS)]) for i, t in enumerate(texts)]
    single = [(t, ADAPTERS[0]) for t in texts]
    import torch

    result = {"format": "serve", "machine": {**machine(), "matmul": families.matmul_rate()},
              "job": {"model": "gpt2 124m (random)", "adapters": len(ADAPTERS), "adapter": "r 8 on q and v",
                      "prompt_tokens": PROMPT_TOKENS, "max_tokens": args.max_tokens, "requests": args.requests,
                      "threads": torch.get_num_threads()}, "rows": []}
    clients = [int(c) for c in args.clients.split(",")]
    plan = [("mixed adapters, continuous batching", 32, mixed, clients),
            ("mixed adapters, one request at a time", 1, mixed, clients),
            ("one adapter, continuous batching", 32, single, [max(clients)])]
    for name, max_batch, jobs, counts in plan:
        server = Server(ckpt, adapters, max_batch)
        try:
            asyncio.run(_burst(server.port, jobs[:4], 4, 4))  # warm-up
            for c in counts:
                rows, wall = asyncio.run(_burst(server.port, jobs, c, args.max_tokens))
                result["rows"].append(summarise(name, c, rows, wall))
                print(result["rows"][-1], flush=True)
        finally:
            server.close()
    for run in (engine_run, peer_run):
        result["rows"].append(run(ckpt, adapters, mixed, args.max_tokens))
        print(result["rows"][-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
