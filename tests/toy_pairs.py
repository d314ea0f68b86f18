"""Shared test helpers for the circuits tests: a tiny looped transformer with a clean/corrupt
token pair that differs at position 1, and a log-prob metric."""

from __future__ import annotations

import torch

from loopscope.circuits import toys


def tiny_pair(B: int = 2, P: int = 4, seed: int = 1):
    """``(model, clean [B, P], corrupt [B, P])``; corrupt shifts token 1 by 3 (mod 8)."""
    model = toys.TinyLoopedTransformer(vocab_size=8, n_ctx=8, d_model=16, n_heads=2, d_mlp=24)
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 8, (B, P), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1] = (corrupt[:, 1] + 3) % 8
    return model, clean, corrupt


def lp0(lg: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """Log-probability of token 0 at the last position."""
    return lg[:, -1].log_softmax(-1)[:, 0]
