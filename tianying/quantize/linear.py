"""Weight-only quantized linear layers that replace `nn.Linear` in place.

One uniform affine quantizer serves every setting, the one GPTQ and its checkpoints use: with
`maxq = 2^bits − 1`, a group of weights w is stored as integers q ∈ [0, maxq] and reconstructed as

    ŵ = s · (q − z),   q = clamp(round(w / s) + z, 0, maxq)

- asymmetric: range [min(w, 0), max(w, 0)] → s = (max − min) / maxq, z = round(−min / s)
- symmetric:  range [−m, m] with m = max|w| → s = 2m / maxq, z = (maxq + 1) / 2 (8 for int4, 128 for int8)

Rounding to nearest gives |w − ŵ| ≤ s/2 for every element (the clamp only ever moves a value that was
within s/2 of the boundary). Scales are stored in fp16 as GPTQ does, rounded *up* so that the bound still
holds with the stored scale. int8 is per output channel (one group spanning the row); int4 is group-wise
along the input dimension (group size 32/64/128). Act-order (GPTQ `desc_act`) stores the columns in a
permuted order `perm` so that each group is contiguous; the layer gathers `x[..., perm]` before the matmul.

One source of truth. A layer's integer weights exist once, in a canonical layout that every CPU reads the
same way: `qweight` int8 [N, K] holding q − 128 (8 bits) or uint8 [N, K/2] nibbles, column 2c in the low
nibble of byte c (4 bits), with `scales`, `zeros` and `perm`. Dequantize, save (GPTQ words are packed from
it), LoRA merge, `.to()` and every kernel start from these tensors; a layout owned by a library (PyTorch's
int4pack, whose byte order depends on the instruction set torch dispatches to) is an opaque per-process
cache made from them and never read back, unpacked or saved.

Backends (`TIANYING_QUANT_BACKEND=auto|native|aten|reference`; auto tries them in this order):
- native: tianying/ops/cpu.cpp, reading the canonical tensors in place (fp32 activations).
- aten: `aten._weight_int8pack_mm(x, q − 128, s)` computes x·(q'·s)ᵀ (the canonical int8 tensor is its
  operand; the asymmetric offset s·(128 − z) adds a rank-one term Σx ⊗ s(128 − z)); int4 with group size
  32/64/128/256: `aten._weight_int4pack_mm_for_cpu` on the int4pack cache, ŵ = s'(q − 8) + z' with s' = s,
  z' = s(8 − z); it wants out_features % 32 == 0, so other widths are padded with zero rows. These kernels
  are only fast in bf16, so fp32/fp16 inputs are rounded to bf16 for them (`QuantLinear.act_bf16`).
- reference: dequantize, then `F.linear`: pure PyTorch, every device and dtype, no compiler.
Each fast backend checks itself on first use in the process (`self_check`): its product on a small probe
must equal the reference within the analytic bound of its arithmetic; one that does not is switched off
for the process with one warning naming it, and the next backend serves.

Group sizes. GPTQ-format files carry one group size for the whole model. `group_size=None` means "the
default" (128 for int4): when it does not divide some layer's input width (the demo model's FFN width 688),
`resolve_group_size` falls back, with a warning, to the largest power of two below it that divides every
width (688 and 256 → 16; there is no fast kernel below 32, so such a model runs the reference path), and to
per channel if none ≥ 8 does. A group size the caller asked for explicitly is never changed: a width it
does not divide is an error naming the group that would work.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tianying import ops as native
from tianying.errors import TianyingError


class QuantizeError(TianyingError, ValueError):
    """Settings that cannot quantize a model (unsupported bits, group size not dividing the width, ...)."""


SUPPORTED_BITS = (4, 8)
NATIVE_MAX_ROWS = 16  # up to this many activation rows the native GEMV kernel streams the weights once
DEQUANT_CHUNK_ELEMENTS = 1 << 24  # above it: dequantize ≤ 64 MiB of fp32 rows at a time for the GEMM


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: `group_size=-1` means one group per output row (per channel)."""

    bits: int = 8
    group_size: int = -1
    sym: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QuantizeError(f"bits={self.bits} is not supported; use 8 or 4")
        if self.group_size != -1 and self.group_size <= 0:
            raise QuantizeError(f"group_size={self.group_size} must be positive (or -1 for per channel)")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check(self, in_features: int, out_features: int, name: str = "layer") -> None:
        """Shape constraints: groups tile the row; int4 packs two columns a byte and 8 values an int32."""
        if self.group_size != -1 and in_features % self.group_size:
            raise QuantizeError(f"{name}: group_size {self.group_size} does not divide in_features {in_features}")
        pack = 32 // self.bits
        if in_features % pack or out_features % pack:
            raise QuantizeError(f"{name}: {self.bits}-bit packing needs in/out features divisible by {pack}, "
                                f"got {in_features}×{out_features}")


def parse_options(spec: str | dict | QuantSpec | None) -> dict | None:
    """`"int8"`, `"int4"`, `"int4-g64"`, `"int4-g32-asym"`, `"int8-head"` (LM head too), a dict, or a QuantSpec.

    → {bits, group_size (None: the default, which may fall back), sym, lm_head}, or None for no quantization.
    """
    if spec is None:
        return None
    if isinstance(spec, QuantSpec):
        return {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym, "lm_head": False}
    if isinstance(spec, dict):
        bits = int(spec.get("bits", 8))
        g = spec.get("group_size")
        return {"bits": bits, "group_size": None if g is None else int(g), "sym": bool(spec.get("sym", True)),
                "lm_head": bool(spec.get("lm_head", False))}
    parts = str(spec).lower().split("-")
    if parts[0] not in ("int8", "int4"):
        raise QuantizeError(f"unknown quantization {spec!r}; use int8, int4, int4-g64, int4-g128-asym, int8-head, ...")
    out = {"bits": int(parts[0][3:]), "group_size": None, "sym": True, "lm_head": False}
    for p in parts[1:]:
        if p.startswith("g") and p[1:].isdigit():
            out["group_size"] = int(p[1:])
        elif p in ("asym", "sym"):
            out["sym"] = p == "sym"
        elif p == "head":
            out["lm_head"] = True
        else:
            raise QuantizeError(f"unknown quantization option {p!r} in {spec!r}")
    QuantSpec(out["bits"], -1 if out["group_size"] is None else out["group_size"], out["sym"])  # validate
    return out


def parse_spec(spec: str | dict | QuantSpec | None) -> QuantSpec | None:
    """Like `parse_options`, as a QuantSpec with the default group filled in (before any fallback)."""
    if spec is None or isinstance(spec, QuantSpec):
        return spec
    o = parse_options(spec)
    return QuantSpec(o["bits"], default_group_size(o["bits"]) if o["group_size"] is None else o["group_size"],
                     o["sym"])


def resolve_group_size(bits: int, group_size: int | None, widths: dict[str, int]) -> int:
    """The group size to use for layers with these input `widths` ({name: in_features}); see module docstring."""
    QuantSpec(bits, -1 if group_size is None else group_size)  # bits and sign checks first
    if group_size is not None:
        for name, k in widths.items():
            if group_size != -1 and k % group_size:
                raise QuantizeError(f"{name}: group_size {group_size} does not divide in_features {k}; use "
                                    f"{_fallback_group(group_size, widths.values())} (or leave it unset)")
        return group_size
    want = default_group_size(bits)
    if want == -1 or all(k % want == 0 for k in widths.values()):
        return want
    g = _fallback_group(want, widths.values())
    odd = sorted({k for k in widths.values() if k % want})
    warnings.warn(f"int{bits}: default group size {want} does not divide input width(s) {odd}; using group size "
                  f"{g}{' (per channel)' if g == -1 else ''} for every layer"
                  + ("" if g in (32, 64, 128, 256, -1) else " (no fast int4 kernel for it: reference path)"),
                  stacklevel=3)
    return g


def _fallback_group(want: int, widths) -> int:  # noqa: ANN001 - any iterable of ints
    g = want
    while g >= 8:
        if all(k % g == 0 for k in widths):
            return g
        g //= 2
    return -1


# ---------------------------------------------------------------------------------------------- quantizer
def _round_up_fp16(s: torch.Tensor) -> torch.Tensor:
    """fp16 value ≥ s (so the stored scale still covers the range); tiny scales clamp to fp16's normal min."""
    s = s.clamp(min=torch.finfo(torch.float16).tiny, max=torch.finfo(torch.float16).max)
    h = s.half()
    up = torch.nextafter(h, torch.full_like(h, math.inf))
    return torch.where(h.float() < s, up, h)


def find_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16) and integer zero point for each row of a group `w` [N, g]."""
    w = w.float()
    maxq = spec.maxq
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    if spec.sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    flat = (lo == 0) & (hi == 0)
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    scale = _round_up_fp16((hi - lo) / maxq)
    if spec.sym:
        zero = torch.full_like(lo, (maxq + 1) // 2)
    else:
        zero = torch.round(-lo / scale.float()).clamp(0, maxq)
    return scale, zero.to(torch.int16)


def quantize_group(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """q = clamp(round(w/s) + z, 0, maxq) with per-row s, z; w [N, g] → uint8 [N, g]."""
    q = torch.round(w.float() / scale.float()[:, None]) + zero.float()[:, None]
    return q.clamp_(0, maxq).to(torch.uint8)


def quantize_rtn(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: w [N, K] → q uint8 [N, K], scales fp16 [G, N], zeros int16 [G, N]."""
    N, K = w.shape
    g = spec.group_width(K)
    wg = w.float().reshape(N, K // g, g)
    lo = wg.amin(dim=2).clamp(max=0)
    hi = wg.amax(dim=2).clamp(min=0)
    # find_params on every group at once: flatten groups into rows
    scale, zero = find_params(torch.stack([lo, hi], dim=2).reshape(-1, 2), spec)
    scale, zero = scale.reshape(N, -1), zero.reshape(N, -1)
    q = torch.round(wg / scale.float()[..., None]) + zero.float()[..., None]
    q = q.clamp_(0, spec.maxq).to(torch.uint8).reshape(N, K)
    return q, scale.t().contiguous(), zero.t().contiguous()


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """ŵ = s·(q − z) computed in fp32: q [N, K], scales/zeros [G, N] (groups contiguous along K)."""
    N, K = q.shape
    G = scales.shape[0]
    w = (q.float().reshape(N, G, K // G) - zeros.t().float()[..., None]) * scales.t().float()[..., None]
    return w.reshape(N, K).to(dtype)


# ---------------------------------------------------------------------------------------------- packing
def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] (values < 16) → uint8 [N, K/2]: column 2j in the low nibble, 2j+1 in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1)


# ---------------------------------------------------------------------------------------------- kernels
_CAPS: dict[str, bool] = {}


def _probe(name: str) -> bool:
    """Whether an aten kernel exists and runs here (probed once per process on a tiny input)."""
    if name not in _CAPS:
        try:
            if name == "int8_cpu":
                torch.ops.aten._weight_int8pack_mm(torch.ones(1, 32), torch.ones(32, 32, dtype=torch.int8),
                                                   torch.ones(32))
            elif name == "int4_cpu":
                p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(32, 64, dtype=torch.int32), 1)
                torch.ops.aten._weight_int4pack_mm_for_cpu(torch.ones(1, 64), p, 32, torch.zeros(2, 32, 2))
            _CAPS[name] = True
        except (AttributeError, RuntimeError, NotImplementedError):
            _CAPS[name] = False
    return _CAPS[name]


BACKENDS = ("auto", "native", "aten", "reference")


def _forced_backend() -> str:
    name = os.environ.get("TIANYING_QUANT_BACKEND", "auto").lower()
    if name not in BACKENDS:
        raise QuantizeError(f"TIANYING_QUANT_BACKEND={name!r} is not a backend; use one of {', '.join(BACKENDS)}")
    return name


_CHECKED: dict[str, bool] = {}


def _probe_layers(path: str) -> list[QuantLinear]:
    """Small layers with asymmetric zeros, a last partial row block (N % 8, N % 32 ≠ 0) and heavy-tailed rows."""
    gen = torch.Generator().manual_seed(1234)
    specs = {"native": [QuantSpec(8, -1, False), QuantSpec(4, 32, False)], "int8_cpu": [QuantSpec(8, -1, False)],
             "int4_cpu": [QuantSpec(4, 32, False)]}[path]
    out = []
    for spec in specs:
        n = 44 if spec.bits == 8 else 40
        w = torch.randn(n, 128, generator=gen) * torch.rand(n, 1, generator=gen) * 0.1
        out.append(QuantLinear.from_int(*quantize_rtn(w, spec), spec))
    return out


def self_check(path: str) -> bool:
    """Whether kernel `path` ("native", "int8_cpu", "int4_cpu") agrees with the reference on this machine.

    Probed once per process (module docstring) for 1, 3 and 20 rows: |y − x·Ŵᵀ| ≤ `product_bound`; a wrong
    byte order misses by the size of the product itself."""
    if path in _CHECKED:
        return _CHECKED[path]
    _CHECKED[path] = True  # (the probe's own forward calls must not recurse into the check)
    why = ""
    try:
        if path == "native" and not native.available():
            why = "native kernels unavailable"
        elif path == "int8_cpu" and not _probe("int8_cpu") or path == "int4_cpu" and not _probe("int4_cpu"):
            why = "not in this torch build"
        else:
            gen = torch.Generator().manual_seed(4321)
            for m in _probe_layers(path):
                m.cache_ops = False
                w = m.dequantize()
                for rows in (1, 3, 20):
                    x = torch.randn(rows, m.in_features, generator=gen)
                    x[:, 5] *= 30  # an outlier column, as real activations have
                    y = m._forward_fast(x, path)
                    err = (y - x @ w.t()).abs()
                    bound = product_bound(x, w, path, m.spec)
                    if not bool(torch.isfinite(y).all()) or bool((err > bound).any()):
                        why = (f"int{m.spec.bits} product off by up to {float((err / bound).max()):.3g}× its error "
                               f"bound on a {rows}×{m.in_features} probe")
                        break
                if why:
                    break
    except (RuntimeError, NotImplementedError, AttributeError, OSError) as e:
        why = f"{type(e).__name__}: {e}"
    ok = not why
    if not ok and why != "not in this torch build":
        warnings.warn(f"quantized backend {path!r} switched off for this process: {why} (CPU capability "
                      f"{native.cpu_capability()}); using the next backend", stacklevel=3)
    _CHECKED[path] = ok
    return ok


def product_bound(x: torch.Tensor, w: torch.Tensor, path: str, spec: QuantSpec) -> torch.Tensor:
    """Analytic bound on |kernel(x) − x·Ŵᵀ| for fp32 x [M, K] and Ŵ [N, K] (both in stored column order).

    native: activations rounded to int16 per block of kb columns, |Δx| ≤ max|x_block| / 65534, then exact
    integer sums scaled in fp32 (≤ 1e-5 relative to |x|·|Ŵ|ᵀ for any K here), or above NATIVE_MAX_ROWS rows
    on a CPU with native bf16 (`ops.bf16_gemm`) x and Ŵ rounded to bf16 with fp32 sums (2⁻⁷·|x|·|Ŵ|ᵀ);
    PyTorch's kernels round x and the output to bf16 (2⁻⁹ each) and sum in reduced precision: 2⁻⁶·|x|·|Ŵ|ᵀ;
    the reference: fp32 sums."""
    mag = x.abs() @ w.abs().t()
    if path == "native" and x.shape[0] > NATIVE_MAX_ROWS and native.bf16_gemm():
        return 2 ** -7 * mag + 1e-6  # prefill in bf16: x and Ŵ rounded to 2⁻⁹ each, fp32 sums
    if path == "native":
        K = x.shape[-1]
        kb = native.act_block(K, spec.group_width(K))
        xmax = x.abs().reshape(x.shape[0], -1, kb).amax(-1)  # [M, blocks]
        wsum = w.abs().reshape(w.shape[0], -1, kb).sum(-1)  # [N, blocks]
        return (xmax / 65534) @ wsum.t() + 1e-5 * mag + 1e-6
    return (2 ** -6 if path in ("int8_cpu", "int4_cpu") else 1e-5) * mag + 1e-6


class QuantLinear(nn.Module):
    """y = x·Ŵᵀ + b with Ŵ stored as integers (see module docstring); a drop-in for `nn.Linear` at inference.

    Buffers (the canonical tensors, module docstring): `qweight` (int8 [N, K] holding q − 128 for 8 bits;
    uint8 [N, K/2] nibbles for 4 bits), `scales` fp16 [G, N], `zeros` int16 [G, N] (int16: GPTQ v1 files can
    mean z = maxq + 1), optional `perm` int64 [K]
    (act-order: stored column i is input column perm[i]), optional `bias`.
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 act_order: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        spec.check(in_features, out_features)
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        G = spec.groups(in_features)
        if spec.bits == 8:
            qw = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        else:
            qw = torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        self.register_buffer("qweight", qw)
        self.register_buffer("scales", torch.ones(G, out_features, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(G, out_features, dtype=torch.int16, device=device))
        self.register_buffer("perm", torch.arange(in_features, device=device) if act_order else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.backend = "auto"  # "auto" | "reference"
        self._fast: dict = {}  # per-kernel caches made from the canonical tensors (operands, int4pack weight)
        self.cache_ops = True  # False when the buffers are refilled in place (streamed layers)
        self.act_bf16 = True  # run fp32/fp16 activations through the kernels in bf16 (module docstring)

    @property
    def weight(self) -> None:
        """There is no float weight; code that probes `module.weight` before checking the type (the decode
        layout hook of `Transformer`, on a quantized LM head) reads None instead of failing."""
        return None

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
                f"group_size={s.group_size}, sym={s.sym}, act_order={self.perm is not None}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_int(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec,
                 perm: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> QuantLinear:
        """From integer weights q uint8 [N, K] in stored (perm) order, scales/zeros [G, N]."""
        q = q.contiguous()
        N, K = q.shape
        G = spec.groups(K)
        if scales.shape != (G, N) or zeros.shape != (G, N):
            raise QuantizeError(f"scales/zeros must be [{G}, {N}], got {tuple(scales.shape)}/{tuple(zeros.shape)}")
        m = cls(K, N, spec, bias=bias is not None, act_order=perm is not None, dtype=dtype, device="meta")
        m.qweight = (q.to(torch.int16) - 128).to(torch.int8) if spec.bits == 8 else pack_nibbles(q)
        m.scales = scales.to(torch.float16).contiguous()
        m.zeros = zeros.to(torch.int16).contiguous()
        if perm is not None:
            # canonical order: ascending input column within each group. The weights are the same either
            # way, but a checkpoint's g_idx only records the groups, so this makes save → load bit-exact.
            g = spec.group_width(K)
            perm = perm.to(device=q.device, dtype=torch.long)
            order = (torch.argsort(perm.view(G, g), dim=1) + torch.arange(0, K, g, device=q.device)[:, None]).flatten()
            perm, q = perm[order], q[:, order]
            m.qweight = (q.to(torch.int16) - 128).to(torch.int8) if spec.bits == 8 else pack_nibbles(q)
            m.perm = perm
        if bias is not None:
            m.bias = bias.detach().to(dtype)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> QuantLinear:
        """Round-to-nearest quantization of an `nn.Linear`."""
        q, scales, zeros = quantize_rtn(linear.weight.detach(), spec)
        return cls.from_int(q, scales, zeros, spec, bias=linear.bias, dtype=linear.weight.dtype)

    # ------------------------------------------------------------------ views of the weight
    def int_weight(self) -> torch.Tensor:
        """q uint8 [N, K] in stored (perm) column order, from the canonical tensor."""
        if self.spec.bits == 8:
            return (self.qweight.to(torch.int16) + 128).to(torch.uint8)
        return unpack_nibbles(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ [N, K] in the original input-column order."""
        w = dequantize(self.int_weight(), self.scales, self.zeros, torch.float32)
        if self.perm is not None:
            out = torch.empty_like(w)
            out[:, self.perm] = w
            w = out
        return w.to(dtype)

    # ------------------------------------------------------------------ kernels
    def prepare(self) -> None:
        """Drop the kernel caches (they are rebuilt from the canonical tensors on the next forward)."""
        self._fast.clear()

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        """`.to(device)` moves the buffers; `.to(dtype)` must not round the fp16 scales (to bf16: 3 bits fewer)."""
        scales = self.scales
        out = super()._apply(fn, recurse)
        if self.scales.dtype != torch.float16:
            self.scales = scales.to(device=self.scales.device)
        self.prepare()
        return out

    def path_for(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> str:
        """Which kernel `forward` uses for inputs of this dtype and device: "native", "int8_cpu", "int4_cpu" or
        "reference" (each fast one only once it passed its `self_check` in this process)."""
        forced = _forced_backend()
        if self.backend == "reference" or forced == "reference" or torch.device(device).type != "cpu":
            return "reference"
        if dtype not in (torch.float32, torch.bfloat16, torch.float16) or self.qweight.device.type != "cpu":
            return "reference"
        g = self.spec.group_width(self.in_features)
        if forced in ("auto", "native") and native.supports(self.in_features, g) and (
                self.spec.bits == 4 or self.spec.group_size == -1) and native.available() and self_check("native"):
            return "native"
        if forced in ("auto", "aten"):
            if self.spec.bits == 8 and self.scales.shape[0] == 1 and self_check("int8_cpu"):
                return "int8_cpu"
            if self.spec.bits == 4 and g in (32, 64, 128, 256) and self_check("int4_cpu"):
                return "int4_cpu"
        return "reference"

    def native_weight(self) -> native.Weight | None:
        """This layer as a `tianying.ops.linear` operand (fp32 activations), or None when the native kernels do
        not serve it (another backend, a bias). Kept until the buffers are replaced, moved or reloaded."""
        w = self._fast.get("op")  # (the backend a layer's first use chose stays until `prepare`)
        if w is not None and w.tensors[0] is self._buffers["qweight"]:
            return w
        if self.bias is not None or self.path_for(torch.float32) != "native" or not self.qweight.is_contiguous():
            return None
        int8 = self.spec.bits == 8
        ops = self._fast.get("native") or native.operands(self.scales, self.zeros, int8, self.in_features)
        if self.cache_ops:
            self._fast["native"] = ops  # (the prefill path reads the same operands)
        perm = None if self.perm is None else self.perm.to(torch.int64).contiguous()
        w = native.quant_weight(self.qweight, ops, int8, self.in_features, perm)
        if self.cache_ops:
            self._fast["op"] = w
        return w

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self.prepare()  # buffers refilled in place: the kernels' operands are made from them again

    def kernel(self, x: torch.Tensor) -> str:
        """Which path `forward` takes for this input (see `path_for`)."""
        return self.path_for(x.dtype, x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        path = self.kernel(x)
        if path != "reference":
            try:
                y = self._forward_fast(x, path)
                return y if self.bias is None else y + self.bias.to(y.dtype)
            except (RuntimeError, NotImplementedError) as e:  # a kernel refusing this input: fall back for good
                warnings.warn(f"quantized kernel {path} failed ({e}); using the reference path", stacklevel=2)
                self.backend = "reference"
                self.prepare()
        w = dequantize(self.int_weight(), self.scales, self.zeros, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 activations throughout: GEMV kernel for ≤ NATIVE_MAX_ROWS rows, else dequantized chunks + GEMM."""
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features)
        if dtype != torch.float32:
            x2 = x2.float()
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        ops = self._fast.get("native")
        int8 = self.spec.bits == 8
        if ops is None:
            ops = native.operands(self.scales, self.zeros, int8, self.in_features)
            if self.cache_ops:
                self._fast["native"] = ops
        M, N = x2.shape[0], self.out_features
        if M <= NATIVE_MAX_ROWS:
            y = native.gemm_i8(x2, self.qweight, *ops) if int8 else native.gemm_i4(x2, self.qweight, *ops)
            if N % 8:
                y = y[:, :N]
            if dtype != torch.float32:
                y = y.to(dtype)
            return y.reshape(*shape[:-1], N)
        step = max(8, DEQUANT_CHUNK_ELEMENTS // self.in_features)
        buf = torch.empty(min(step, N), self.in_features, dtype=torch.float32)
        lowp = native.bf16_gemm()  # bf16 products, fp32 sums, where the CPU multiplies bf16 natively
        on_ops = not lowp and native.dense_gemm(torch.float32, M)  # else PyTorch's GEMM
        xg = x2.to(torch.bfloat16) if lowp else x2
        parts = []
        for n0 in range(0, N, step):
            n1 = min(N, n0 + step)
            w = (native.dequant_i8 if int8 else native.dequant_i4)(self.qweight, self.scales, self.zeros, n0, n1, buf)
            if on_ops:
                part = native.linear(x2, native.dense_weight(w))
            else:
                part = xg @ (w.to(torch.bfloat16) if lowp else w).t()
            parts.append(part)
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (one chunk, the usual case: no copy)
        return y.to(dtype).reshape(*shape[:-1], N)

    def _int4pack(self) -> torch.Tensor:
        """PyTorch's int4pack weight, made from the canonical tensor (rows zero-padded to a multiple of 32).

        Opaque: its byte order depends on the instruction set torch dispatches to; nothing reads it but the
        kernel it was made for."""
        q = F.pad(self.int_weight().to(torch.int32), (0, 0, 0, -self.out_features % 32), value=8)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)

    def _forward_fast(self, x: torch.Tensor, path: str) -> torch.Tensor:
        if path == "native":
            return self._forward_native(x)
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features)
        if self.act_bf16 and dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        x2 = x2.contiguous()
        ops = self._fast.get((path, x2.dtype))
        if ops is None:
            s = self.scales.float()  # [G, N]
            if path == "int8_cpu":
                off = s[0] * (128.0 - self.zeros[0].float())
                ops = (s[0].to(x2.dtype), None if bool((self.zeros == 128).all()) else off.to(x2.dtype))
            else:  # int4pack: ŵ = s(q − 8) + z' with z' = s(8 − z); padded rows get s = z' = 0
                sz = torch.stack([s, s * (8.0 - self.zeros.float())], dim=-1)
                sz = F.pad(sz, (0, 0, 0, -self.out_features % 32))
                ops = (sz.to(x2.dtype).contiguous(),)
            if self.cache_ops:
                self._fast[(path, x2.dtype)] = ops
        if path == "int8_cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, ops[0])
            if ops[1] is not None:
                y = y + x2.sum(dim=-1, keepdim=True) * ops[1]
        else:
            packed = self._fast.get("int4pack")  # one per layer, whatever the activation dtype
            if packed is None:
                packed = self._int4pack()
                if self.cache_ops:
                    self._fast["int4pack"] = packed
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.spec.group_width(self.in_features), ops[0])
            if y.shape[-1] != self.out_features:
                y = y[:, :self.out_features]
        return y.to(dtype).reshape(*shape[:-1], self.out_features)


# ---------------------------------------------------------------------------------------------- model-level
def default_group_size(bits: int) -> int:
    return -1 if bits == 8 else 128


def quantize_model(model: nn.Module, bits: int = 8, group_size: int | None = None, sym: bool = True,
                   skip: tuple[str, ...] | None = None, backend: str = "auto", lm_head: bool = False) -> nn.Module:
    """Replace every `nn.Linear` (except names ending in `skip`) by a RTN `QuantLinear`, in place.

    The LM head stays in floating point unless `lm_head` (AutoGPTQ's default too: it costs the most
    quality per byte), although on a 100k vocabulary it is the largest matrix a decode step reads.
    `group_size=None` is the default with fallback (see `resolve_group_size`).
    Layers are swapped one at a time and each float weight is released as soon as its replacement exists,
    so peak memory is the model plus one layer, never two models. Returns the same `model` object.
    """
    if skip is None:
        skip = () if lm_head else ("lm_head",)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith(skip)]
    group_size = resolve_group_size(bits, group_size, {n: m.in_features for n, m in targets})
    spec = QuantSpec(bits, group_size, sym)
    for name, lin in targets:  # validate every shape before touching anything
        spec.check(lin.in_features, lin.out_features, name)
    for name, lin in targets:
        q = QuantLinear.from_linear(lin, spec)
        q.backend = backend
        set_submodule(model, name, q)
        lin.weight = None  # release the float weight now (the model may hold the last reference)

    return model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
