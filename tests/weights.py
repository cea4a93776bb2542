"""Large seeded random weights for parity checks (tests and benchmarks/gpu_check.py share them).

No pytest here: benchmarks/gpu_check.py imports this file on machines that only have the repo.
"""

from __future__ import annotations

import torch


def reinit_(model: torch.nn.Module, seed: int = 0, std: float = 0.2, emb_std: float = 0.1) -> torch.nn.Module:
    """Seeded re-initialisation with larger weights than GPT-2's 0.02.

    At 0.02 a random 2-layer model with tied embeddings mostly repeats the last token under greedy
    decoding, which would make generation tests weak; with these scales it produces varied
    tokens whose top-2 logit gaps stay far above float32 rounding.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "wte" in name or "wpe" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * emb_std)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "ln" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model
