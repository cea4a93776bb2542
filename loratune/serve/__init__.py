"""Serving many adapters on one base model over an OpenAI-compatible HTTP API.

- ``app``: the HTTP API (FastAPI): completions and chat completions, streamed or not, models, health.
- ``params``: every field of a request's body checked before it is admitted.
- ``worker``: the engine's thread (the engine is ``generate.engine``: GRPO's rollouts use it too), between the web server's event loop and the engine.
- ``adapters``: the adapters a server holds: loaded by name, banked, evicted least recently used.
- ``detokenize``: an answer's text as its tokens arrive, decoded incrementally.
- ``answers``: OpenAI's answer shapes: choices, usage, server-sent events, logprobs.
- ``metrics``: ``/metrics`` in Prometheus' text format.
"""
