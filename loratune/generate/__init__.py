"""Generation: text from a model, token by token.

- ``sampling``: greedy, temperature, top-k and top-p sampling with the KV cache, seeded.
- ``cpu_prepack``: oneDNN weight pre-packing for CPU decoding (weight layouts, not sequence packing).
- ``decode_step``: one token's forward over a static KV cache (fixed shapes, optionally torch.compiled).
- ``engine``: continuous batching with per-row adapters (the server's, and GRPO's rollouts): runs the
  steps the scheduler picks.
- ``scheduler``: the engine's scheduling policy (admission, prefill budget), apart from execution.
- ``chat``: chat prompts (the template's generation prompt) and end-of-turn stops.
- ``scoring``: held-out prompts completed and scored against their references (ROUGE-L, exact match, length).
"""

from .sampling import SamplingConfig, generate, next_token

__all__ = ["SamplingConfig", "generate", "next_token"]
