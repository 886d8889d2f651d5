"""A decode step for natively quantized models on CPU: one C call for all layers instead of ~1,000 PyTorch ops.

At batch 1 a decode step of the ~240M benchmark model reads 80–160 MB of int4/int8 weights (6–11 ms here),
while the ~1,000 small PyTorch ops around them (norms, RoPE, cache writes, attention over a short cache,
views, dtype checks) cost another 7–8 ms of dispatch. `NativeDecoder` runs the same arithmetic (fp32,
the formulas of tianying.model) as `ty_decode` in native.cpp: RMSNorm, the projections (native kernels),
RoPE + cache write + attention, SwiGLU and the residuals of every layer inside one OpenMP region (no thread
wake-ups between the ~60 matrix-vector products), with every pointer prepared once. q/k/v and gate/up are
one product each: their canonical weights are concatenated once and the modules' `qweight` buffers become
views of the fused tensor (still the canonical layout, no second copy). The LM head stays an ordinary
(quantized or float) layer.

`Transformer` calls it through its `fast_decode` hook for a decode step (one token per row, each row at its own
length and rotary position, no LogN, no sliding window, fp32 activations and cache on CPU); anything else, or a model
whose projections are not all `QuantLinear`s served by the native kernels, without bias (act-order is
fine: the columns are gathered while the activations are rounded), takes the ordinary path. The result
equals the ordinary path up to summation order (tests/test_native_decode.py).
"""

from __future__ import annotations

import torch

from tianying.quantize import native
from tianying.quantize.linear import QuantLinear

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


class _Proj:
    """One kernel call (one QuantLinear, or several fused along the output rows) with its operands bound."""

    def __init__(self, mods: list[QuantLinear]) -> None:
        m = mods[0]
        self.int8 = m.spec.bits == 8
        ops = [native.operands(x.scales, x.zeros, self.int8, x.in_features) for x in mods]
        if len(mods) == 1:
            self.weight, self.ops = m.qweight, ops[0]
        else:
            # one weight tensor, the modules' own buffers become views of it (no second copy)
            self.weight = torch.cat([x.qweight for x in mods])
            rows = 0
            for x in mods:
                n = x.qweight.shape[0]
                x.qweight = self.weight[rows:rows + n]
                rows += n
            if self.int8:
                offs = [o[2] if o[2] is not None else torch.zeros_like(o[1]) for o in ops]
                any_off = any(o[2] is not None for o in ops)
                self.ops = (ops[0][0], torch.cat([o[1] for o in ops]), torch.cat(offs) if any_off else None)
            else:
                self.ops = (ops[0][0], torch.cat([o[1] for o in ops]), torch.cat([o[2] for o in ops]))
        self.K, self.N = m.in_features, self.weight.shape[0]
        self.N8 = self.ops[1].shape[0] * (1 if self.int8 else 8)
        kb, s, oz = self.ops[0], self.ops[1], self.ops[2]
        ptr = None if oz is None else oz.data_ptr()
        self.perm = None if m.perm is None else m.perm.to(torch.int64).contiguous()  # shared by all (`fusable`)
        self.struct = native.Proj(self.weight.data_ptr(), s.data_ptr(), ptr if self.int8 else None,
                                  None if self.int8 else ptr, self.N, self.N8, self.K, kb,
                                  1 if self.int8 else s.shape[1], int(self.int8),
                                  None if self.perm is None else self.perm.data_ptr())

    @staticmethod
    def fusable(mods: list[QuantLinear]) -> bool:
        m = mods[0]
        same_perm = all((x.perm is None) == (m.perm is None) and (m.perm is None or torch.equal(x.perm, m.perm))
                        for x in mods)  # GPTQ act-order: q/k/v (and gate/up) see one input, so one Hessian order
        return same_perm and all(x.in_features == m.in_features and x.spec == m.spec and x.out_features % 8 == 0
                                 for x in mods)

def _eligible(m: object) -> bool:
    return (type(m) is QuantLinear and m.path_for(torch.float32) == "native" and m.bias is None and m.cache_ops
            and m.qweight.is_contiguous())


class NativeDecoder:
    """Built by `attach`; holds the per-layer operands (and keeps the tensors behind their pointers alive)."""

    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        self.model = model
        self.D, self.H, self.KVH, self.HD = cfg.hidden_size, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.projs = []  # keeps the fused weights and operands behind the raw pointers alive
        self.watch = []  # (parent, attribute, module, qweight): what must not change under the decoder
        self.norms = []  # (RMSNorm, weight address): `.to()` swaps a parameter's storage in place
        layers = []
        for block in model.model.layers:
            q, k, v, o, g, u, d = (block.get_submodule(n) for n in PROJECTIONS)
            projs = (_Proj([q, k, v]), _Proj([o]), _Proj([g, u]), _Proj([d]))  # fused (`supported` checked)
            self.projs.append(projs)
            n1, n2 = block.input_layernorm, block.post_attention_layernorm
            self.norms += [(n, n.weight.data_ptr()) for n in (n1, n2)]
            layers.append(native.Layer(n1.weight.data_ptr(), n2.weight.data_ptr(), *(p.struct for p in projs)))
            for name, m in zip(PROJECTIONS, (q, k, v, o, g, u, d)):
                parent, attr = name.split(".")
                self.watch.append((getattr(block, parent), attr, m, m.qweight))
        self.F = g.out_features
        self.eps = model.model.layers[0].input_layernorm.eps
        self.structs = (native.Layer * len(layers))(*layers)

    @staticmethod
    def supported(model: torch.nn.Module) -> bool:
        cfg = model.config
        if not native.available() or cfg.head_dim > 1024 or cfg.n_head % cfg.n_kv_head:
            return False
        if cfg.n_head * cfg.head_dim != cfg.hidden_size:  # config.json's own head_dim: not what the kernel assumes
            return False
        for b in model.model.layers:
            mods = [b.get_submodule(n) for n in PROJECTIONS]
            if not all(map(_eligible, mods)) or not _Proj.fusable(mods[:3]) or not _Proj.fusable(mods[4:6]):
                return False
        return True

    def still_valid(self) -> bool:
        """False once a projection was replaced or repacked (LoRA, `.to()`, a new backend...) or a norm's
        weight moved."""
        return (all(getattr(p, a) is m and m.qweight is w for p, a, m, w in self.watch)
                and all(n.weight.data_ptr() == ptr for n, ptr in self.norms))

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step) -> torch.Tensor | None:  # noqa: ANN001
        """x [B, 1, D] fp32 → the hidden state after every layer (writes each row's keys/values into the cache
        rows of `step`, a `tianying.model.CacheStep`), or None when this step is not one it handles."""
        cache = step.cache
        k = cache.k
        if (x.dtype != torch.float32 or x.device.type != "cpu" or k.dtype != torch.float32 or cache.window
                or k.device.type != "cpu" or not k.is_contiguous() or step.hi - step.lo != x.shape[0]):
            return None
        M = x.shape[0]
        x = x.reshape(M, self.D).contiguous().clone()
        cos = cos.reshape(-1, 1, self.HD)[:, -1].expand(M, self.HD).contiguous()
        sin = sin.reshape(-1, 1, self.HD)[:, -1].expand(M, self.HD).contiguous()
        pos = torch.tensor(step.lengths, dtype=torch.int64)
        row = step.lo * k.shape[2] * k.shape[3] * k.shape[4] * k.element_size()  # offset of row lo in each layer
        native._LIB.ty_decode(x.data_ptr(), M, self.D, self.H, self.KVH, self.HD, self.F, self.eps, self.structs,
                              len(self.projs), cos.data_ptr(), sin.data_ptr(), k.data_ptr() + row,
                              cache.v.data_ptr() + row, k.shape[1], k.shape[3], pos.data_ptr(),
                              torch.get_num_threads())
        return x.view(M, 1, self.D)


def attach(model: torch.nn.Module) -> bool:
    """Give `model` a native decode step when every projection qualifies; returns whether it did."""
    if not hasattr(model, "fast_decode") or not NativeDecoder.supported(model):
        return False
    model.fast_decode = _Hook(model)
    return True


class _Hook:
    """Builds the decoder on first use, rebuilds it when the model's projections changed since, and declines
    (None) when they no longer qualify. Copies and pickles carry only the model reference (the decoder holds
    raw pointers), so `copy.deepcopy(model)` gets a hook of its own."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.dec = model, None

    def __call__(self, x, cos, sin, cache):  # noqa: ANN001, ANN204
        if self.dec is None or not self.dec.still_valid():
            if not NativeDecoder.supported(self.model):
                return None
            self.dec = NativeDecoder(self.model)
        return self.dec(x, cos, sin, cache)

    def __getstate__(self) -> dict:
        return {"model": self.model, "dec": None}
