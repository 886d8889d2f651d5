"""Rotary position embeddings (rotate-half layout) and their context-extension variants.

Angles are computed in fp32 and only the final cos/sin are cast to the activation dtype: bf16 positions
lose integer precision above 256, which visibly corrupts long contexts.

Scaling variants use Hugging Face's `rope_scaling` vocabulary so config.json round-trips:
- none:    angle(p, i) = p · θ_i,            θ_i = base^(−2i/D)
- linear:  angle(p, i) = (p / f) · θ_i        (position interpolation; the released 16K chat models)
- dynamic: when the current length L exceeds L₀ = max_position_embeddings,
           base' = base · ((f·L/L₀) − (f − 1))^(D/(D−2)); angle = p · base'^(−2i/D)
A later variant (NTK-aware static, YaRN, ...) is one more branch in `inv_freq_and_scale`.
"""

from __future__ import annotations

import torch

SCALING_KINDS = ("linear", "dynamic")


def inv_freq_and_scale(head_dim: int, base: float, scaling: dict | None, seq_len: int,
                       max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Returns (θ [D/2] fp32, position divisor) for a sequence of `seq_len` positions."""
    kind = scaling["type"] if scaling else None
    factor = float(scaling["factor"]) if scaling else 1.0
    if kind == "dynamic" and seq_len > max_position_embeddings:
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base ** exponents)
    return inv_freq, (factor if kind == "linear" else 1.0)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float, scaling: dict | None = None,
                 max_position_embeddings: int = 2048, seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, D] for integer `positions`.

    `seq_len` is the total length the dynamic variant scales for (default: max position + 1).
    """
    if seq_len is None:
        seq_len = int(positions.max()) + 1 if positions.numel() else 1
    inv_freq, divisor = inv_freq_and_scale(head_dim, base, scaling, seq_len, max_position_embeddings)
    inv_freq = inv_freq.to(positions.device)
    pos = positions.to(torch.float32)
    if divisor != 1.0:
        pos = pos / divisor
    freqs = pos[..., None] * inv_freq  # [..., D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute q/k projection rows from Meta/FlagAI interleaved pairs to rotate-half (seed-spec §2.3)."""
    out_dim, d_in = w.shape
    hd = out_dim // n_heads
    return w.view(n_heads, hd // 2, 2, d_in).transpose(1, 2).reshape(out_dim, d_in)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, d_in = w.shape
    hd = out_dim // n_heads
    return w.view(n_heads, 2, hd // 2, d_in).transpose(1, 2).reshape(out_dim, d_in)
