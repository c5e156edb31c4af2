"""grouped_query_attention (the CUDA path's GQA without enable_gqa) against SDPA's own GQA."""

import pytest
import torch
import torch.nn.functional as F

from engine.model import grouped_query_attention


@pytest.mark.parametrize("hq,hkv", [(8, 2), (16, 1), (4, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_sdpa_gqa(hq, hkv, masked):
    g = torch.Generator().manual_seed(hq * 10 + hkv)
    q = torch.randn(hq, 7, 32, generator=g)
    k, v = torch.randn(hkv, 11, 32, generator=g), torch.randn(hkv, 11, 32, generator=g)
    mask = None
    if masked:  # a causal mask over a cached prefix, as encoder mode builds it
        mask = torch.arange(11)[None, :] <= torch.arange(4, 11)[:, None]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=hq != hkv)
    got = grouped_query_attention(q, k, v, mask)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
