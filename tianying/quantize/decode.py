"""A decode step for natively quantized models on CPU: ~10 C calls per layer instead of ~80 PyTorch ops.

At batch 1 a decode step of the ~240M benchmark model reads 80–160 MB of int4/int8 weights (6–11 ms here),
while the ~1,000 small PyTorch ops around them (norms, RoPE, cache writes, attention over a short cache,
views, dtype checks) cost another 7–8 ms of dispatch. `NativeDecoder` runs the same arithmetic (fp32,
the formulas of tianying.model) through the native library: RMSNorm, the projections (native kernels),
RoPE + cache write + attention, SwiGLU and the residuals, with every pointer and buffer prepared once.

`Transformer` calls it through its `fast_decode` hook for a plain decode step (one token per row, no
padding mask, no LogN, no sliding window, fp32 activations and cache on CPU); anything else, or a model
whose projections are not all native-layout `QuantLinear`s without act-order or bias, takes the ordinary
path. The result equals the ordinary path up to summation order (tests/test_native_decode.py).
"""

from __future__ import annotations

import torch

from tianying.quantize import native
from tianying.quantize.linear import QuantLinear

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


class _Proj:
    """One QuantLinear's kernel call with everything but the activation pointers bound."""

    def __init__(self, m: QuantLinear) -> None:
        self.module, self.weight = m, m.qweight
        self.int8 = m.layout == "int8_x8"
        self.ops = native.operands(m.scales, m.zeros, self.int8, m.in_features)  # kept alive: raw pointers below
        self.K, self.N, self.N8 = m.in_features, m.out_features, -(-m.out_features // 8) * 8
        kb, s, oz = self.ops[0], self.ops[1], self.ops[2]
        self.args = (kb, m.qweight.data_ptr(), s.data_ptr(), None if oz is None else oz.data_ptr())
        self.G = 1 if self.int8 else s.shape[1]

    def __call__(self, x_ptr: int, M: int, y_ptr: int, nt: int) -> None:
        kb, w, s, oz = self.args
        if self.int8:
            native._LIB.ty_gemm_i8(x_ptr, M, self.K, kb, w, s, oz, y_ptr, self.N8, nt)
        else:
            native._LIB.ty_gemm_i4(x_ptr, M, self.K, kb, w, s, oz, self.G, y_ptr, self.N8, nt)


def _eligible(m: object) -> bool:
    return (type(m) is QuantLinear and m.layout in ("int8_x8", "int4_x8") and m.perm is None and m.bias is None
            and m.cache_ops and m.backend != "reference")


class NativeDecoder:
    """Built by `attach`; holds per-layer kernel bindings and per-batch-size scratch buffers."""

    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        self.model = model
        self.D, self.H, self.KVH, self.HD = cfg.hidden_size, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.layers = []
        for block in model.model.layers:
            projs = [_Proj(block.get_submodule(n)) for n in PROJECTIONS]
            norms = (block.input_layernorm, block.post_attention_layernorm)
            self.layers.append((block, projs, norms))
        self.F = self.layers[0][1][4].N
        self._bufs: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def supported(model: torch.nn.Module) -> bool:
        cfg = model.config
        if not native.available() or cfg.head_dim > 1024 or cfg.n_head % cfg.n_kv_head:
            return False
        return all(_eligible(b.get_submodule(n)) for b in model.model.layers for n in PROJECTIONS)

    def still_valid(self) -> bool:
        """False once a projection was replaced or repacked (LoRA, `.to()`, a new backend...)."""
        for block, projs, _ in self.layers:
            for p, name in zip(projs, PROJECTIONS):
                m = block.get_submodule(name)
                if m is not p.module or m.qweight is not p.weight or not _eligible(m):
                    return False
        return True

    def _scratch(self, M: int) -> dict[str, torch.Tensor]:
        b = self._bufs.get(M)
        if b is None:
            L0 = self.layers[0][1]
            f32 = dict(dtype=torch.float32)
            b = self._bufs[M] = {
                "h": torch.empty(M, self.D, **f32), "q": torch.empty(M, L0[0].N8, **f32),
                "k": torch.empty(M, L0[1].N8, **f32), "v": torch.empty(M, L0[2].N8, **f32),
                "att": torch.empty(M, self.H * self.HD, **f32), "o": torch.empty(M, L0[3].N8, **f32),
                "g": torch.empty(M, L0[4].N8, **f32), "u": torch.empty(M, L0[5].N8, **f32),
                "a": torch.empty(M, self.F, **f32), "d": torch.empty(M, L0[6].N8, **f32),
            }
        return b

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor | None:  # noqa: ANN001
        """x [B, 1, D] fp32 → the hidden state after every layer (writes this position's keys/values into
        `cache`), or None when this step is not one it handles."""
        if (x.dtype != torch.float32 or x.device.type != "cpu" or cache.k.dtype != torch.float32
                or cache.k.device.type != "cpu" or not cache.k.is_contiguous()):
            return None
        lib, nt = native._LIB, torch.get_num_threads()
        M, D = x.shape[0], self.D
        x = x.reshape(M, D).contiguous().clone()
        cos = cos.reshape(-1, self.HD)[-1].contiguous()
        sin = sin.reshape(-1, self.HD)[-1].contiguous()
        b = self._scratch(M)
        p = {k: t.data_ptr() for k, t in b.items()}
        xp, L, pos = x.data_ptr(), cache.max_len, cache.pos
        H, KVH, HD, F = self.H, self.KVH, self.HD, self.F
        for i, (_block, (q, k, v, o, g, u, dn), (n1, n2)) in enumerate(self.layers):
            kc, vc = cache._layers[i]
            lib.ty_rmsnorm(xp, n1.weight.data_ptr(), n1.eps, p["h"], M, D)
            q(p["h"], M, p["q"], nt)
            k(p["h"], M, p["k"], nt)
            v(p["h"], M, p["v"], nt)
            lib.ty_attend(p["q"], q.N8, p["k"], k.N8, p["v"], v.N8, cos.data_ptr(), sin.data_ptr(), kc.data_ptr(),
                          vc.data_ptr(), M, H, KVH, HD, L, pos, p["att"], nt)
            o(p["att"], M, p["o"], nt)
            lib.ty_add2(xp, p["o"], o.N8, M, D)
            lib.ty_rmsnorm(xp, n2.weight.data_ptr(), n2.eps, p["h"], M, D)
            g(p["h"], M, p["g"], nt)
            u(p["h"], M, p["u"], nt)
            lib.ty_silu_mul(p["g"], p["u"], g.N8, p["a"], M, F)
            dn(p["a"], M, p["d"], nt)
            lib.ty_add2(xp, p["d"], dn.N8, M, D)
        return x.view(M, 1, D)


def attach(model: torch.nn.Module) -> bool:
    """Give `model` a native decode step when every projection qualifies; returns whether it did."""
    if not hasattr(model, "fast_decode") or not NativeDecoder.supported(model):
        return False
    model.fast_decode = _Hook(NativeDecoder(model))
    return True


class _Hook:
    """Rebuilds the decoder when the model's projections changed since it was built, drops it when they no
    longer qualify."""

    def __init__(self, dec: NativeDecoder) -> None:
        self.dec = dec

    def __call__(self, x, cos, sin, cache):  # noqa: ANN001, ANN204
        if not self.dec.still_valid():
            if not NativeDecoder.supported(self.dec.model):
                return None
            self.dec = NativeDecoder(self.dec.model)
        return self.dec(x, cos, sin, cache)
