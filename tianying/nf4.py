"""4-bit NormalFloat (NF4) weights for Q-LoRA: blockwise absmax with double quantization, pure PyTorch.

The Q-LoRA paper (Dettmers et al. 2023) stores a frozen base weight as:
- blocks of 64 consecutive weights, each scaled by its absolute maximum c into [-1, 1] and rounded to the
  nearest of 16 NF4 code values (quantiles of N(0, 1), rescaled so the ends are ±1 and 0 is exact);
- the per-block constants c themselves quantized to 8 bits in blocks of 256 ("double quantization"), after
  subtracting their mean, which cuts their cost from 32/64 = 0.5 to 8/64 + 32/(64·256) ≈ 0.127 bits/weight.
The paper stores the second level as 8-bit floats (bitsandbytes' dynamic map); we use symmetric int8, whose
error is simply bounded: |c - ĉ| ≤ s₂/2 with s₂ = max|c - mean| / 127 over the 256-block. The element error
is then |w - ŵ| ≤ c·g/2 + |c - ĉ|, g being the gap between the two NF4 codes around w/c (`error_bound`).

Total storage: 4 + 0.127 ≈ 4.13 bits per weight. The weight is dequantized on the fly in forward (and again in
backward, so autograd never keeps a full-precision copy). On CUDA the dequantization is compiled with
`torch.compile` into one fused kernel when Triton is present; elsewhere it is four vectorized torch ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tianying.errors import TianyingError

# The 16 NF4 code values (Q-LoRA paper, appendix E; bitsandbytes `create_normal_map`), ascending.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCKSIZE = 64
ABSMAX_BLOCKSIZE = 256


class NF4Error(TianyingError):
    """A tensor that cannot be stored as NF4."""


def _code(device: torch.device | str) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@dataclass
class NF4Tensor:
    """A quantized weight: packed 4-bit indices plus double-quantized block constants."""

    packed: torch.Tensor  # uint8 [n/2]: two indices per byte, first in the high nibble
    absmax_q: torch.Tensor  # int8 [n_blocks]: (c - offset) / absmax_scale, rounded
    absmax_scale: torch.Tensor  # fp32 [ceil(n_blocks / 256)]
    absmax_offset: torch.Tensor  # fp32 scalar: mean of c
    shape: tuple[int, ...]
    blocksize: int = BLOCKSIZE

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.packed, self.absmax_q, self.absmax_scale, self.absmax_offset))

    def absmax(self) -> torch.Tensor:
        """The dequantized per-block constants ĉ [n_blocks] (fp32)."""
        return dequantize_absmax(self.absmax_q, self.absmax_scale, self.absmax_offset)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self, dtype)


def quantize_absmax(c: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second-level (double) quantization of the block constants: int8 per 256-block after removing the mean."""
    offset = c.mean()
    d = c - offset
    n = d.numel()
    pad = (-n) % blocksize
    blocks = F.pad(d, (0, pad)).view(-1, blocksize)
    scale = blocks.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8).view(-1)[:n]
    return q, scale, offset


def dequantize_absmax(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      blocksize: int = ABSMAX_BLOCKSIZE) -> torch.Tensor:
    n = q.numel()
    s = scale.repeat_interleave(blocksize)[:n]
    return q.float() * s + offset


def quantize_nf4(w: torch.Tensor, blocksize: int = BLOCKSIZE) -> NF4Tensor:
    """Quantize `w` (any shape, numel divisible by `blocksize`) to NF4 with double-quantized constants."""
    n = w.numel()
    if n % blocksize or blocksize % 2:
        raise NF4Error(f"a tensor of {n} elements cannot be split into NF4 blocks of {blocksize}")
    blocks = w.detach().float().reshape(-1, blocksize)
    c = blocks.abs().amax(dim=1)
    safe = torch.where(c > 0, c, torch.ones_like(c))
    x = blocks / safe[:, None]
    code = _code(w.device)
    mids = (code[1:] + code[:-1]) / 2
    idx = torch.bucketize(x, mids).to(torch.uint8).view(-1)  # nearest code; a tie goes to the lower one
    packed = (idx[0::2] << 4) | idx[1::2]
    q, scale, offset = quantize_absmax(c)
    return NF4Tensor(packed, q, scale, offset, tuple(w.shape), blocksize)


def _dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    idx = torch.stack((packed >> 4, packed & 0x0F), dim=-1).view(-1, blocksize).long()
    return code[idx] * absmax[:, None]


_compiled = None


def _fast_dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The fused kernel on CUDA (torch.compile + Triton) when it can be built; the plain ops otherwise."""
    global _compiled
    if packed.is_cuda and _compiled is None:
        try:
            import triton  # noqa: F401

            _compiled = torch.compile(_dequantize, dynamic=True)
        except Exception:  # no Triton (or no compiler): stay on the reference path
            _compiled = False
    if packed.is_cuda and _compiled:
        try:
            return _compiled(packed, absmax, code, blocksize)
        except Exception:
            _compiled = False
    return _dequantize(packed, absmax, code, blocksize)


def dequantize_nf4(t: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ŵ = code[index] · ĉ[block], reshaped to the original shape and cast to `dtype`."""
    w = _fast_dequantize(t.packed, t.absmax(), _code(t.packed.device), t.blocksize)
    return w.view(t.shape).to(dtype)


def error_bound(w: torch.Tensor, t: NF4Tensor) -> torch.Tensor:
    """Per-element bound on |w - dequantize(t)|: half the gap between the NF4 codes around w/c, times c, plus
    the double-quantization error of c (checked in the tests; tight up to float rounding)."""
    blocks = w.detach().float().reshape(-1, t.blocksize)
    c = blocks.abs().amax(dim=1)
    safe = torch.where(c > 0, c, torch.ones_like(c))
    x = (blocks / safe[:, None]).clamp(-1, 1)
    code = _code(w.device)
    hi = torch.bucketize(x, code).clamp(1, 15)  # code[hi-1] <= x <= code[hi] (roughly)
    gap = code[hi] - code[hi - 1]
    dc = (c - t.absmax()).abs()
    return (c[:, None] * gap / 2 + dc[:, None]).view(t.shape)


class _NF4Matmul(torch.autograd.Function):
    """y = x · ŵᵀ, re-dequantizing ŵ in backward instead of saving it (the point of a 4-bit base)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:  # noqa: ANN001
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantize(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen bias-free linear layer whose weight is stored as NF4 (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, blocksize: int = BLOCKSIZE,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.blocksize = in_features, out_features, blocksize
        n = in_features * out_features
        if n % blocksize:
            raise NF4Error(f"a {out_features}x{in_features} weight cannot be split into NF4 blocks of {blocksize}")
        nb = n // blocksize
        self.register_buffer("packed", torch.zeros(n // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_q", torch.zeros(nb, dtype=torch.int8, device=device))
        self.register_buffer("absmax_scale", torch.zeros(-(-nb // ABSMAX_BLOCKSIZE), device=device))
        self.register_buffer("absmax_offset", torch.zeros((), device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = BLOCKSIZE) -> NF4Linear:
        if linear.bias is not None:
            raise NF4Error("NF4Linear has no bias (Aquila's linear layers have none)")
        layer = cls(linear.in_features, linear.out_features, blocksize, device=linear.weight.device)
        layer.load_nf4(quantize_nf4(linear.weight, blocksize))
        return layer

    def load_nf4(self, t: NF4Tensor) -> None:
        self.packed, self.absmax_q = t.packed, t.absmax_q
        self.absmax_scale, self.absmax_offset = t.absmax_scale, t.absmax_offset

    @property
    def nf4(self) -> NF4Tensor:
        return NF4Tensor(self.packed, self.absmax_q, self.absmax_scale, self.absmax_offset,
                         (self.out_features, self.in_features), self.blocksize)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.nf4, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4Matmul.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocksize={self.blocksize}"


NF4_DEFAULT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_model_nf4(model: nn.Module, modules: tuple[str, ...] = NF4_DEFAULT_MODULES,
                       blocksize: int = BLOCKSIZE) -> list[str]:
    """Replace the decoder's linear layers named in `modules` by NF4Linear, in place; returns their names.

    The embedding, the norms and the LM head stay in full precision, as in Q-LoRA (they are a small share of a
    7B model's weights and quantizing the head hurts most).
    """
    names = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child_name in modules:
                setattr(module, child_name, NF4Linear.from_linear(child, blocksize))
                names.append(f"{name}.{child_name}" if name else child_name)
    return names


def dequantize_model_nf4(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every NF4Linear by an nn.Linear holding its dequantized weight (in place); returns their names."""
    names = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, NF4Linear):
                lin = nn.Linear(child.in_features, child.out_features, bias=False, device=child.packed.device,
                                dtype=dtype)
                with torch.no_grad():
                    lin.weight.copy_(child.dequantize(dtype))
                setattr(module, child_name, lin)
                names.append(f"{name}.{child_name}" if name else child_name)
    return names
