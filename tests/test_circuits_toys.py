"""The tiny looped transformer used by the patching benchmark is batch-size invariant bit for bit
(the benchmark's max |difference| = 0 claim rests on it)."""

from __future__ import annotations

import pytest
import torch

from loopscope import unroll
from loopscope.circuits import toys


@pytest.mark.parametrize("n_pos", [12, 16])
def test_tiny_looped_transformer_rows_do_not_depend_on_batch(n_pos: int) -> None:
    # n_pos=16 failed (1e-15) when the head tensors were strided: BLAS takes another path at B=1
    model = toys.TinyLoopedTransformer(vocab_size=16, n_ctx=n_pos, d_model=32, n_heads=4, d_mlp=64)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (4, n_pos), generator=g)
    batched = unroll(model, tokens, 6, decode=True).logits
    rows = torch.cat([unroll(model, tokens[i : i + 1], 6, decode=True).logits for i in range(4)], 1)
    big = unroll(model, tokens.repeat(16, 1), 6, decode=True).logits[:, :4]
    assert torch.equal(batched, rows)
    assert torch.equal(batched, big)
