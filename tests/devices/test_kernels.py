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
