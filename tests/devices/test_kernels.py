"""The card's shortened kernels give Hugging Face's Llama bits: RoPE as a roll, RMSNorm as one call."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from devices import rope

transformers = pytest.importorskip("transformers")
from transformers.models.llama import modeling_llama as hf  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [8, 16, 64, 128])
def test_rope_as_a_roll_is_hf_rotate_half_bit_for_bit(dtype, head_dim):
    torch.manual_seed(head_dim)
    freq = rope.inv_freq(head_dim, 10000.0, None)
    positions = torch.arange(0, 4000, 13)
    x = (torch.randn(len(positions), 6, head_dim) * 4).to(dtype)
    cos, sin = rope.cos_sin(positions, freq, dtype)
    want = x * cos[:, None, :] + hf.rotate_half(x) * sin[:, None, :]  # HF's apply_rotary_pos_emb, per head
    assert torch.equal(rope.apply(x, *rope.tables(positions, freq, dtype)), want)


@pytest.mark.parametrize("shape", [(1, 64), (4, 128), (37, 128), (3, 4096), (2, 5, 96)])
def test_float32_rms_norm_is_hf_llama_rmsnorm_bit_for_bit(shape):
    """The executor uses F.rms_norm in float32 only: there it equals HF's LlamaRMSNorm exactly."""
    torch.manual_seed(len(shape) * 100 + shape[-1])
    x = torch.randn(*shape) * 3
    norm = hf.LlamaRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]))
        assert torch.equal(F.rms_norm(x, (shape[-1],), norm.weight, 1e-5), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_tables_cached_by_position_are_the_bits_computed_per_step(dtype, monkeypatch):
    """The cache grows by doubling as positions rise and computes past its bound: every step's
    tables are the ones computed for that step's positions alone."""
    monkeypatch.setattr(rope.TableCache, "MAX_POSITIONS", 3000)
    freq = rope.inv_freq(64, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    cache = rope.TableCache(freq, dtype)
    gen = torch.Generator().manual_seed(7)
    sizes = []
    for top in [5, 40, 300, 301, 1000, 2999, 3000, 9000, 17]:
        positions = torch.cat([torch.randint(0, top + 1, (6,), generator=gen), torch.tensor([top])])
        got = cache(positions, top)
        want = rope.tables(positions, freq, dtype)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), top
        sizes.append(cache.size)
    assert sizes == [256, 256, 512, 512, 1024, 3000, 3000, 3000, 3000]  # doubled, then held at the bound
