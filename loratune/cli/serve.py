"""``loratune serve``: an OpenAI-compatible server for a base model and many adapters (see loratune/serve)."""

from __future__ import annotations

import argparse
import math
import signal
import socket
import threading
import time

from ..errors import ConfigError
from .common import add_model_args, log, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model and its adapters over an OpenAI-compatible HTTP API",
                       description="Continuous batching of requests for many adapters on one base; the request's "
                                   "'model' field names the adapter (the base model's name: none).")
    add_model_args(p)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter to serve (repeatable)")
    p.add_argument("--adapter-dir", help="the only directory /v1/load_lora_adapter may load adapters from")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--max-batch", type=positive_int, default=16,
                   help="sequences decoded together (default 16; their KV cache must fit the device's free memory)")
    p.add_argument("--max-adapters", type=positive_int, default=8, help="adapters held at once; least recently used go")
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests before HTTP 429 (default 64)")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=None, help="default: half the model's context")
    p.add_argument("--max-body-bytes", type=positive_int, default=None,
                   help="request bodies past this are refused with HTTP 413 unread (default: 1 MiB + 768 bytes per "
                        "--max-prompt-tokens)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="the largest max_tokens a request may ask for (default: 512, or what the context leaves after "
                        "--max-prompt-tokens where that is less)")
    p.add_argument("--prefill-tokens", type=int, default=512,
                   help="prompt tokens prefilled between two decode steps (at least one request; default 512)")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="positions per sequence in the KV cache (default: the model's context; it sizes the cache)")
    p.add_argument("--timeout", type=_seconds, default=300.0, help="seconds a request may take (HTTP 504 after)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (HTTP 401 otherwise)")
    p.add_argument("--served-model-name", help="the base model's name in the API (default: --model)")
    p.set_defaults(run=run)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in [1, 65535], got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _check_bind(host: str, port: int) -> None:
    """Bind once before loading the model, so that a port in use or a host that is not this machine's is one
    clear line at once (uvicorn would log its errno and exit after the model had loaded)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ConfigError(f"could not serve on {host}:{port}: {why}; give another --port (or --host)") from None


def build(args: argparse.Namespace):
    """(FastAPI app, OpenAIServer) for the parsed arguments: the model, its adapters, the engine's thread."""
    from ..data.tokenizer import load_tokenizer
    from ..models import check_tokenizer_fits, load_model
    from ..serve.adapters import AdapterRegistry
    from ..serve.app import OpenAIServer, ServeConfig, create_app
    from ..generate.engine import Engine
    from ..serve.worker import Worker
    from .common import device_and_dtype

    device, dtype = device_and_dtype(args)
    model, model_dir = load_model(args.model, dtype=dtype, device=device)
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer_fits(model, tokenizer)
    name = args.served_model_name or args.model
    registry = AdapterRegistry(model, name, args.adapter_dir, args.max_adapters)
    if len(args.adapter) > args.max_adapters:
        raise ConfigError(f"{len(args.adapter)} --adapter given but --max-adapters is {args.max_adapters}: raise it, "
                          "or load the others at run time")
    for item in args.adapter:
        adapter, sep, path = item.partition("=")
        if not sep or not adapter or not path:
            raise ConfigError(f"--adapter takes NAME=DIR, got {item!r}")
        registry.load(adapter, path, set(), trusted=True)
    engine = Engine(model, max_batch=args.max_batch, max_len=args.max_model_len, prefill_tokens=args.prefill_tokens)
    context = engine.max_len
    prompt = args.max_prompt_tokens or max(1, context // 2)
    tokens = min(512, max(1, context - prompt)) if args.max_tokens is None else args.max_tokens
    cfg = ServeConfig(name, context, model.lm_head.weight.shape[0], args.api_key, prompt, tokens, args.timeout,
                      getattr(args, "max_body_bytes", None))
    if cfg.max_prompt_tokens + cfg.max_tokens > context:
        raise ConfigError(f"--max-prompt-tokens {cfg.max_prompt_tokens} + --max-tokens {cfg.max_tokens} exceed the "
                          f"model's context of {context}")
    server = OpenAIServer(Worker(engine, args.max_queue), registry, tokenizer, cfg)
    return create_app(server), server


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("loratune serve needs FastAPI and uvicorn: pip install -e '.[serve]'") from None
    _check_bind(args.host, args.port)
    app, server = build(args)
    web = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                        timeout_graceful_shutdown=30))
    http = threading.Thread(target=web.run, name="loratune-http", daemon=True)

    def shutdown(signum, frame) -> None:  # SIGTERM or Ctrl-C: no new connections, the open ones finish (30 s)
        if web.should_exit:  # a second one: stop now
            web.force_exit = True
        log.info(f"{signal.Signals(signum).name} received: finishing the requests in flight")
        web.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, shutdown)
    http.start()  # the web server in a thread; the engine keeps the main thread (see Worker.run_until)
    while http.is_alive() and not web.started:
        time.sleep(0.05)
    if not web.started:
        raise ConfigError(f"could not serve on {args.host}:{args.port} (uvicorn's message is above): is the port "
                          "in use? Give another with --port")
    log.info(f"serving {server.cfg.model_name} with adapters {', '.join(server.registry.names()) or '(none)'} on "
             f"http://{args.host}:{args.port}/v1")
    try:
        server.worker.run_until(lambda: not http.is_alive())
    finally:
        server.worker.stop()
    return 0
