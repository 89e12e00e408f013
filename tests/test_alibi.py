"""ALiBi slopes equal HF's build_alibi_tensor for power-of-two and other head counts (BLOOM's 16,
32, 112 included), and each TP rank gets exactly the slopes of the heads it owns. HF raises a
float32 base to integer powers; we compute in double and round once, so the two may differ by
one float32 ulp (relative 6e-8 per step of the power): rtol 1e-6."""
import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from training.model.alibi import alibi_slopes, alibi_slopes_for_rank

HEAD_COUNTS = [1, 2, 3, 4, 6, 12, 16, 20, 32, 48, 112]


def hf_slopes(num_heads: int) -> torch.Tensor:
    # HF's tensor is slope * key position; position 1 gives the slopes themselves.
    return build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float32)[:, 0, 1]


@pytest.mark.parametrize("heads", HEAD_COUNTS)
def test_slopes_match_hf(heads):
    torch.testing.assert_close(alibi_slopes(heads), hf_slopes(heads), rtol=1e-6, atol=0)


@pytest.mark.parametrize("heads,tp", [(16, 2), (12, 4), (112, 4), (32, 4), (6, 2)])
def test_rank_slices_cover_heads_in_order(heads, tp):
    ranks = [alibi_slopes_for_rank(heads, rank, tp) for rank in range(tp)]
    torch.testing.assert_close(torch.cat(ranks), alibi_slopes(heads), rtol=0, atol=0)
