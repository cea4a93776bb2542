"""Generation: sampling with the KV cache (``sampling``) and oneDNN weight pre-packing for CPU
decoding (``cpu_prepack``)."""

from .sampling import SamplingConfig, generate, next_token

__all__ = ["SamplingConfig", "generate", "next_token"]
