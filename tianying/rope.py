"""Rotary position embeddings (rotate-half layout) and their context-extension variants.

Angles are computed in fp32 and only the final cos/sin are cast to the activation dtype: bf16 positions
lose integer precision above 256, which visibly corrupts long contexts.

Scaling variants use Hugging Face's `rope_scaling` vocabulary so config.json round-trips. With head dim D,
base b, θ_i = b^(−2i/D) (i = 0 … D/2−1), factor f and L₀ = max_position_embeddings:
- none:    angle(p, i) = p · θ_i
- linear:  angle(p, i) = (p / f) · θ_i  (position interpolation; the released 16K chat models, seed-spec §9.1)
- dynamic: for a sequence of L positions, b' = b · ((f·max(L, L₀)/L₀) − (f − 1))^(D/(D−2)), angle = p · b'^(−2i/D);
           b' = b while L ≤ L₀ (transformers' `_compute_dynamic_ntk_parameters`)
- ntk:     static NTK-aware scaling, b' = b · f^(D/(D−2)) for every length. Not a transformers kind: it is
           exactly unscaled RoPE with base b', so `Config.to_hf` writes `rope_theta = b'` (transformers loads
           and computes the same thing) and keeps the intent in `tianying_rope_scaling` to read back.
- yarn:    θ'_i = θ_i/f · (1 − γ_i) + θ_i · γ_i, where γ_i = 1 − clamp((i − lo)/(hi − lo), 0, 1) keeps the fast
           (high-frequency) dimensions unscaled and interpolates the slow ones, lo/hi being the dimensions that
           turn β_fast / β_slow times over the original length; cos and sin are multiplied by the attention
           factor 0.1·ln f + 1 (so q·k by its square). As transformers' `_compute_yarn_parameters`.
"""

from __future__ import annotations

import math

import torch

SCALING_KINDS = ("linear", "dynamic", "ntk", "yarn")


def ntk_base(base: float, factor: float, head_dim: int) -> float:
    """Static NTK-aware base b·f^(D/(D−2)): the lowest frequency is stretched by exactly f, the highest kept."""
    return base * factor ** (head_dim / (head_dim - 2))


def inv_freq_and_scale(head_dim: int, base: float, scaling: dict | None, seq_len: int,
                       max_position_embeddings: int) -> tuple[torch.Tensor, float, float]:
    """(θ [D/2] fp32, position divisor, cos/sin multiplier) for a sequence of `seq_len` positions."""
    kind = scaling["type"] if scaling else None
    factor = float(scaling["factor"]) if scaling else 1.0
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if kind == "dynamic" and seq_len > max_position_embeddings:
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
    elif kind == "ntk":
        base = ntk_base(base, factor, head_dim)
    elif kind == "yarn":
        return _yarn(head_dim, base, scaling, max_position_embeddings, exponents)
    inv_freq = 1.0 / (base ** exponents)
    return inv_freq, (factor if kind == "linear" else 1.0), 1.0


def _yarn(head_dim: int, base: float, scaling: dict, max_position_embeddings: int,
          exponents: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """YaRN (arXiv 2309.00071) with transformers' defaults: β_fast 32, β_slow 1, truncated correction range."""
    factor = float(scaling["factor"])
    orig = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
    attn = scaling.get("attention_factor")
    if attn is None:
        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        ms, ms_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attn = mscale(factor, ms) / mscale(factor, ms_all) if ms and ms_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_for(rotations: float) -> float:  # the dimension that turns `rotations` times over `orig` positions
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = dim_for(beta_fast), dim_for(beta_slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    pos_freqs = base ** exponents
    extrapolate = 1 - ramp
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolate) + 1.0 / pos_freqs * extrapolate
    return inv_freq, 1.0, float(attn)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float, scaling: dict | None = None,
                 max_position_embeddings: int = 2048, seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, D] for integer `positions`.

    `seq_len` is the total length the dynamic variant scales for (default: max position + 1).
    """
    if seq_len is None:
        seq_len = int(positions.max()) + 1 if positions.numel() else 1
    inv_freq, divisor, mult = inv_freq_and_scale(head_dim, base, scaling, seq_len, max_position_embeddings)
    inv_freq = inv_freq.to(positions.device)
    pos = positions.to(torch.float32)
    if divisor != 1.0:
        pos = pos / divisor
    freqs = pos[..., None] * inv_freq  # [..., D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if mult != 1.0:
        cos, sin = cos * mult, sin * mult
    return cos.to(dtype), sin.to(dtype)


def logn_scale(positions: torch.Tensor, train_length: int) -> torch.Tensor:
    """LogN attention factor per query: log(p)/log(L) for p > L, else 1, with p = position + 1 (1-based).

    p counts the keys a causal query at 0-based index `position` attends to, which is what attention entropy
    grows with; 1-based also makes the L positions the model was trained on exactly the unscaled ones.
    Computed in fp64 then fp32 so the factor is log(p)/log(L) to fp32 precision.
    """
    p = positions.to(torch.float64) + 1
    return torch.where(p > train_length, p.log() / math.log(train_length), torch.ones_like(p)).float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def rotation_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, D] → (cos, signed sin) [B, 1, T, D] for `apply_rotation`, built once per forward."""
    h = sin.shape[-1] // 2
    return cos.unsqueeze(1), torch.cat((-sin[..., :h], sin[..., h:]), dim=-1).unsqueeze(1)


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`apply_rope` in 3 ops instead of 7 (it runs twice per layer per decode step): rotate_half(x)·sin equals
    roll(x, D/2)·sin_signed with the first half of sin negated."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute q/k projection rows from Meta/FlagAI interleaved pairs to rotate-half (seed-spec §2.3)."""
    out_dim, d_in = w.shape
    hd = out_dim // n_heads
    return w.view(n_heads, hd // 2, 2, d_in).transpose(1, 2).reshape(out_dim, d_in)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, d_in = w.shape
    hd = out_dim // n_heads
    return w.view(n_heads, 2, hd // 2, d_in).transpose(1, 2).reshape(out_dim, d_in)
