"""Rotary position embeddings, computed as Hugging Face's Llama code computes them."""
from __future__ import annotations

import math

import torch


def inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling {kind!r}")
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between blended
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_wavelen, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    mid = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(mid, blended, scaled)


def cos_sin(positions: torch.Tensor, freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, head_dim) cos and sin for integer positions (T,), in float32 then cast, as HF does."""
    freqs = positions.float()[:, None] * freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def tables(positions: torch.Tensor, freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos_sin`` shaped for ``apply`` (T, 1, head_dim), with the sign of rotate_half folded into sin:
    HF's x * cos + cat(-x2, x1) * sin is x * cos + roll(x) * cat(-sin1, sin2), bit for bit (a
    product's sign does not change its rounding), in four ops instead of nine."""
    cos, sin = cos_sin(positions, freq, dtype)
    half = sin.shape[-1] // 2
    return cos[:, None, :], torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)[:, None, :]


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, head_dim); cos, sin from ``tables``."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin
