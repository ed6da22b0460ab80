"""The chunked response-token loss."""

import torch
from train_utils import demo_batch, lora_grads


def test_chunked_cross_entropy_equals_one_chunk():
    batch = demo_batch()
    _, whole = lora_grads(batch, chunk_rows=10**9)
    _, chunked = lora_grads(batch, chunk_rows=7)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
