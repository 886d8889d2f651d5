"""tianying.ops (the native CPU operations of a decode step) against independent references, and the model
with and without them."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from tianying import ops
from tianying.config import Config
from tianying.model import KVCache, build_model
from tianying.quantize import QuantLinear, QuantSpec, quantize_model
from tianying.quantize.linear import quantize_rtn

pytestmark = pytest.mark.skipif(not ops.enabled(), reason="native ops could not be built (no C++ compiler)")
QUANT_NATIVE = os.environ.get("TIANYING_QUANT_BACKEND", "auto") in ("auto", "native")
EPS32 = 2.0**-24


def _dense_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 accumulation of K products (of exact fp32 values: bf16/fp16 widen exactly): ≤ K·u·Σ|x||w| + 1 ulp."""
    K = x.shape[1]
    return (K + 2) * EPS32 * (x.abs().double() @ w.abs().double().t()) + 1e-30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 3, 8, 11, 37])
@pytest.mark.parametrize("shape", [(37, 70), (64, 96), (5, 8), (203, 1001)], ids=["odd", "even", "small", "chunks"])
def test_dense_linear_equals_matmul(dtype: torch.dtype, M: int, shape: tuple) -> None:
    """One row (the streaming GEMV) and several (tiles of activation × weight rows: partial tiles in both
    directions, weights in several L2 chunks, columns past whole vectors)."""
    N, K = shape
    g = torch.Generator().manual_seed(M * 100 + N)
    w = torch.randn(N, K, generator=g).to(dtype)
    x = torch.randn(M, K, generator=g)
    y = ops.linear(x, ops.dense_weight(w))
    ref = x.double() @ w.double().t()
    assert y.shape == (M, N)
    assert bool(((y.double() - ref).abs() <= _dense_bound(x, w.float())).all())


def test_three_weights_norm_and_residual() -> None:
    """q/k/v side by side after a fused RMSNorm; o with the residual added; SwiGLU in front of down."""
    g = torch.Generator().manual_seed(0)
    M, K, F_ = 3, 40, 24
    x = torch.randn(M, K, generator=g)
    nw = torch.rand(K, generator=g) + 0.5
    wq, wk, wv = (torch.randn(n, K, generator=g) for n in (40, 16, 16))
    y = ops.linear(x, *(ops.dense_weight(w) for w in (wq, wk, wv)), norm=nw, eps=1e-5)
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * nw
    torch.testing.assert_close(y, torch.cat([h @ wq.t(), h @ wk.t(), h @ wv.t()], 1), rtol=1e-5, atol=1e-5)
    res = torch.randn(M, 40, generator=g)
    torch.testing.assert_close(ops.linear(x, ops.dense_weight(wq), add=res), x @ wq.t() + res, rtol=1e-5, atol=1e-5)
    gu = torch.randn(M, 2 * F_, generator=g)
    wd = torch.randn(K, F_, generator=g)
    ref = (F.silu(gu[:, :F_]) * gu[:, F_:]) @ wd.t() + x
    torch.testing.assert_close(ops.linear(gu, ops.dense_weight(wd), swiglu=F_, add=x), ref, rtol=1e-5, atol=1e-5)
    # the whole MLP of a block in one call, in every weight kind
    wg, wu = torch.randn(F_, K, generator=g), torch.randn(F_, K, generator=g)
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * nw
    ref = x + (F.silu(h @ wg.t()) * (h @ wu.t())) @ wd.t()
    for dt in (torch.float32, torch.bfloat16):
        held = [w.to(dt) for w in (wg, wu, wd)]  # an operand reads its tensor in place: it must be alive
        ws = [ops.dense_weight(w) for w in held]
        r = x + (F.silu(h @ wg.to(dt).float().t()) * (h @ wu.to(dt).float().t())) @ wd.to(dt).float().t()
        torch.testing.assert_close(ops.mlp(x, *ws, nw, 1e-5, add=x), r, rtol=1e-5, atol=1e-4)
    del held
    with pytest.raises(ValueError, match="no longer exists"):
        ops.mlp(x, *ws, nw, 1e-5, add=x)
    if QUANT_NATIVE:  # int8 gate/up/down (widths a multiple of the kernels' 16 columns)
        spec = QuantSpec(8, -1, True)
        x, nw = torch.randn(M, 64, generator=g), torch.rand(64, generator=g) + 0.5
        qs = [QuantLinear.from_int(*quantize_rtn(torch.randn(n, k, generator=g), spec), spec)
              for n, k in ((48, 64), (48, 64), (64, 48))]
        wq = [q.dequantize() for q in qs]
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * nw
        r = x + (F.silu(h @ wq[0].t()) * (h @ wq[1].t())) @ wq[2].t()
        y = ops.mlp(x, *(q.native_weight() for q in qs), nw, 1e-5, add=x)
        torch.testing.assert_close(y, r, rtol=1e-3, atol=1e-3 * float(r.abs().max()))


def _attention_reference(q, k_new, v_new, cos, sin, kc, vc, pos):  # noqa: ANN001, ANN202
    """Plain PyTorch: rotate, write at pos, attend over 0..pos per row (fp64)."""
    from tianying.rope import apply_rotation

    M, H, HD = q.shape
    KVH = k_new.shape[1]
    outs = []
    for m in range(M):
        c, s = cos[min(m, cos.shape[0] - 1)], sin[min(m, sin.shape[0] - 1)]
        c, s = c.double(), s.double()
        qm, km = apply_rotation(q[m].double(), c, s), apply_rotation(k_new[m].double(), c, s)
        kc[m, :, pos[m]] = km.to(kc.dtype)
        vc[m, :, pos[m]] = v_new[m].to(vc.dtype)
        keys, vals = kc[m, :, :pos[m] + 1].double(), vc[m, :, :pos[m] + 1].double()
        keys, vals = keys.repeat_interleave(H // KVH, 0), vals.repeat_interleave(H // KVH, 0)
        att = torch.softmax(qm[:, None] @ keys.transpose(1, 2) / HD**0.5, -1) @ vals
        outs.append(att.reshape(H * HD))
    return torch.stack(outs)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 2, 16), (3, 3, 12), (2, 1, 6)], ids=["gqa", "mha-odd-hd", "tiny"])
def test_attend_decode_equals_attention(cache_dtype: torch.dtype, heads: tuple) -> None:
    from tianying.rope import rope_cos_sin, rotation_tables

    H, KVH, HD = heads
    g = torch.Generator().manual_seed(HD)
    M, L = 3, 20
    pos = torch.tensor([4, 0, 17])
    qkv = torch.randn(M, (H + 2 * KVH) * HD, generator=g)
    kc = torch.randn(M, KVH, L, HD, generator=g).to(cache_dtype)
    vc = torch.randn(M, KVH, L, HD, generator=g).to(cache_dtype)
    cos, sin = rotation_tables(*rope_cos_sin(pos[:, None], HD, 10000.0, None, 64, seq_len=64, dtype=torch.float32))
    cos, sin = cos[:, 0, 0], sin[:, 0, 0]
    q = qkv[:, :H * HD].view(M, H, HD).clone()
    k_new = qkv[:, H * HD:(H + KVH) * HD].view(M, KVH, HD).clone()
    v_new = qkv[:, (H + KVH) * HD:].view(M, KVH, HD).clone()
    kr, vr = kc.clone(), vc.clone()
    ref = _attention_reference(q, k_new, v_new, cos, sin, kr, vr, pos)
    layers_k, layers_v = torch.stack([kc.clone(), kc]), torch.stack([vc.clone(), vc])  # layer 1 of 2
    qkv0 = qkv.clone()  # (its q and k are rotated in place)
    out = ops.attend_decode(qkv, (H, KVH, HD), (H * HD, (H + KVH) * HD), cos, sin, layers_k, layers_v, 1, pos)
    kc, vc = layers_k[1], layers_v[1]
    tol = 1e-5 if cache_dtype == torch.float32 else 1e-2  # bf16: the new key/value are rounded as they are stored
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(kc.float(), kr.float(), rtol=tol, atol=tol)  # the rotated keys were written
    torch.testing.assert_close(vc, vr, rtol=0, atol=0)
    # with the output projection and the residual: the same attention, then add + att · Oᵀ
    wo, res = torch.randn(10, H * HD, generator=g), torch.randn(M, 10, generator=g)
    layers_k, layers_v = torch.stack([kc.clone(), kc.clone()]), torch.stack([vc.clone(), vc.clone()])
    layers_k[1], layers_v[1] = kr.to(cache_dtype), vr  # as before this step's write (rewritten identically)
    y = ops.attend_decode(qkv0, (H, KVH, HD), (H * HD, (H + KVH) * HD), cos, sin, layers_k, layers_v, 1, pos,
                          o=ops.dense_weight(wo), add=res)
    torch.testing.assert_close(y.double(), res.double() + ref @ wo.double().t(), rtol=tol * 10, atol=tol * 10)


# ---------------------------------------------------------------------------------------------- model
def _model(n_kv_head: int = 2, bits: int | None = None, dtype: torch.dtype = torch.float32, seed: int = 0):
    cfg = Config(vocab_size=96, hidden_size=64, n_layer=2, n_head=4, n_kv_head=n_kv_head, intermediate_size=160,
                 max_position_embeddings=64)
    m = build_model(cfg, seed=seed, dtype=dtype).eval()
    if bits:
        quantize_model(m, bits=bits, group_size=None if bits == 8 else 32, lm_head=True)
    return m, cfg


@pytest.fixture
def count_steps(monkeypatch):  # noqa: ANN001, ANN201 - counts layers decoded on the ops (called or replayed)
    calls = []
    now, replay = ops._run_now, ops.Graph.run

    def spy_now(built):  # noqa: ANN001, ANN202
        if built[0].kind == ops.OP_ATTEND:
            calls.append(1)
        return now(built)

    def spy_replay(graph):  # noqa: ANN001, ANN202
        calls.extend(1 for op in graph._ops if op.kind == ops.OP_ATTEND)
        return replay(graph)

    monkeypatch.setattr(ops, "_run_now", spy_now)
    monkeypatch.setattr(ops.Graph, "run", spy_replay)
    return calls


def _decode(m, cfg, prompt: torch.Tensor, steps: int, native: bool, cache=None) -> torch.Tensor:  # noqa: ANN001
    m.native_ops = native
    try:
        if cache is None:
            cache = KVCache.for_model(m, prompt.shape[0], prompt.shape[1] + steps + 1)
        cache.reset()
        with torch.inference_mode():
            out = [m(prompt, cache=cache, last_only=True).float()]
            tok = out[-1][:, -1].argmax(-1, keepdim=True)
            for _ in range(steps):
                out.append(m(tok, cache=cache).float())
                tok = (tok * 7 + 3) % cfg.vocab_size  # fixed inputs, independent of the logits
        return torch.cat(out, dim=1)
    finally:
        m.native_ops = True


def _greedy(m, prompt: torch.Tensor, steps: int, native: bool) -> list:  # noqa: ANN001
    m.native_ops = native
    try:
        cache = KVCache.for_model(m, prompt.shape[0], prompt.shape[1] + steps + 1)
        with torch.inference_mode():
            tok = m(prompt, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            out = [tok]
            for _ in range(steps - 1):
                tok = m(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
                out.append(tok)
        return torch.cat(out, 1).tolist()
    finally:
        m.native_ops = True


WEIGHTS = [(None, torch.float32), (None, torch.bfloat16), (8, torch.float32), (4, torch.float32)]
WEIGHT_IDS = ["fp32", "bf16", "int8", "int4"]


@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("weights", WEIGHTS, ids=WEIGHT_IDS)
@pytest.mark.parametrize("batch", [1, 3])
def test_model_with_and_without_ops(n_kv_head: int, weights: tuple, batch: int, count_steps: list) -> None:
    bits, dtype = weights
    if bits and not QUANT_NATIVE:
        pytest.skip("another quantization backend is forced: quantized layers take PyTorch's path")
    m, cfg = _model(n_kv_head, bits, dtype)
    prompt = torch.randint(0, cfg.vocab_size, (batch, 5), generator=torch.Generator().manual_seed(batch))
    native = _decode(m, cfg, prompt, 6, native=True)
    assert len(count_steps) == 6 * cfg.n_layer  # every one-token step, every layer; not the prompt
    plain = _decode(m, cfg, prompt, 6, native=False)
    # bf16: the ops keep fp32 activations where PyTorch rounds each one to bf16
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(native, plain, rtol=tol, atol=tol)
    if dtype == torch.float32:
        assert _greedy(m, prompt, 8, True) == _greedy(m, prompt, 8, False)


@pytest.mark.parametrize("weights", WEIGHTS, ids=WEIGHT_IDS)
def test_rows_of_different_lengths(weights: tuple, count_steps: list) -> None:
    """A batched step over cache rows of different lengths (the engine's decode) writes and attends at each
    row's own length and rotary position; a view of later rows works too."""
    bits, dtype = weights
    m, cfg = _model(2, bits, dtype)
    lengths = (5, 2, 9, 3)
    prompts = [torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths]

    def run(native: bool) -> torch.Tensor:
        m.native_ops = native
        cache = KVCache.for_model(m, 4, 32)
        out = []
        with torch.inference_mode():
            for r, p in enumerate(prompts):
                m(p, cache=cache.view(r, r + 1))
            tok = torch.tensor([[1], [2], [3], [4]])
            for _ in range(4):
                out.append(m(tok, cache=cache).float())
                out.append(m(tok[1:3], cache=cache.view(1, 3)).float())  # rows 1..2 only
                tok = (tok * 7 + 3) % cfg.vocab_size
        m.native_ops = True
        assert cache.lengths == [5 + 4, 2 + 8, 9 + 8, 3 + 4]
        return torch.cat([o.flatten() for o in out])

    native = run(True)
    assert len(count_steps) == 8 * cfg.n_layer or bits and not QUANT_NATIVE
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(native, run(False), rtol=tol, atol=tol)


def test_steps_the_ops_do_not_serve_take_pytorch(count_steps: list) -> None:
    """LogN scaling, a sliding window, a prefill chunk and training take PyTorch's path; a layer with a
    projection the ops do not serve (a LoRA-like wrapper) runs in PyTorch while the others use the ops."""
    from tianying.model import set_config

    m, cfg = _model()
    ids = torch.randint(0, cfg.vocab_size, (2, 4))
    for change in (dict(logn_attention=True, logn_length=2), dict(attention_window=3)):
        set_config(m, cfg.replace(**change))
        cache = KVCache.for_model(m, 2, 16)
        with torch.inference_mode():
            m(ids, cache=cache)
            m(ids[:, :1], cache=cache)
        assert count_steps == []
    set_config(m, cfg)
    prompt = ids[:1]
    before = _decode(m, cfg, prompt, 3, native=False)

    class Wrapped(torch.nn.Module):  # not an nn.Linear: the ops cannot read it
        def __init__(self, inner: torch.nn.Linear) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    attn = m.model.layers[0].self_attn
    attn.q_proj = Wrapped(attn.q_proj)
    count_steps.clear()
    torch.testing.assert_close(_decode(m, cfg, prompt, 3, native=True), before, rtol=1e-4, atol=1e-4)
    assert len(count_steps) == 3  # layer 1 only
    os.environ["TIANYING_NATIVE_OPS"] = "0"
    try:
        count_steps.clear()
        _decode(m, cfg, prompt, 3, native=True)
        assert count_steps == []
    finally:
        del os.environ["TIANYING_NATIVE_OPS"]


def test_act_order_layers_use_the_ops(count_steps: list) -> None:
    """GPTQ act-order: each layer's columns are gathered as its activations are rounded."""
    if not QUANT_NATIVE:
        pytest.skip("another quantization backend is forced")
    from tianying.quantize.linear import set_submodule

    m, cfg = _model()
    spec = QuantSpec(4, 32, True)
    for block in m.model.layers:
        for name, lin in [(n, mod) for n, mod in block.named_modules() if isinstance(mod, torch.nn.Linear)]:
            perm = torch.randperm(lin.in_features)
            q, s, z = quantize_rtn(lin.weight.detach()[:, perm], spec)
            set_submodule(block, name, QuantLinear.from_int(q, s, z, spec, perm=perm))
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    native = _decode(m, cfg, prompt, 4, native=True)
    assert len(count_steps) == 4 * cfg.n_layer
    torch.testing.assert_close(native, _decode(m, cfg, prompt, 4, native=False), rtol=1e-4, atol=1e-4)


def test_weights_changed_under_the_model_are_read_as_they_are_now() -> None:
    """No operand outlives what it was made from: a deep copy, `.to(bf16).float()`, `.data` swapped, a
    reloaded state dict and a replaced quantized buffer all decode like a fresh model with those weights."""
    m, cfg = _model(2, 8)
    prompt = torch.randint(0, cfg.vocab_size, (1, 4))
    before = _decode(m, cfg, prompt, 3, native=True)
    torch.testing.assert_close(_decode(copy.deepcopy(m), cfg, prompt, 3, native=True), before, rtol=0, atol=0)
    m.to(torch.bfloat16).float()
    torch.testing.assert_close(_decode(m, cfg, prompt, 3, native=True), before, rtol=2e-2, atol=2e-2)
    other, _ = _model(2, 8, seed=1)
    expect = _decode(other, cfg, prompt, 3, native=False)
    m.load_state_dict(other.state_dict())
    torch.testing.assert_close(_decode(m, cfg, prompt, 3, native=True), expect, rtol=1e-4, atol=1e-4)
    d, _ = _model()
    lin = d.model.layers[0].mlp.up_proj
    _decode(d, cfg, prompt, 2, native=True)
    lin.weight.data = torch.randn_like(lin.weight)
    torch.testing.assert_close(_decode(d, cfg, prompt, 3, native=True), _decode(d, cfg, prompt, 3, native=False),
                               rtol=1e-4, atol=1e-4)


def _recorded(monkeypatch) -> list:  # noqa: ANN001 - counts decode graphs recorded
    from tianying import model as model_mod

    made, real = [], model_mod.DecodeGraph.__init__

    def spy(self, *a):  # noqa: ANN001, ANN002, ANN202
        made.append(1)
        return real(self, *a)

    monkeypatch.setattr(model_mod.DecodeGraph, "__init__", spy)
    return made


@pytest.mark.parametrize("weights", WEIGHTS, ids=WEIGHT_IDS)
def test_decode_graph_replays_the_layer_by_layer_step(weights: tuple, monkeypatch) -> None:  # noqa: ANN001
    """A decode step replayed from its recorded graph gives the same logits, bit for bit, as the same ops
    called layer by layer (a block with a forward hook decodes that way); one graph per batch shape."""
    if weights[0] and not QUANT_NATIVE:
        pytest.skip("another quantization backend is forced")
    made = _recorded(monkeypatch)
    m, cfg = _model(2, *weights)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    replayed = _decode(m, cfg, prompt, 5, native=True)
    assert len(made) == 1  # recorded at the first step, replayed at the other four
    handle = m.model.layers[0].register_forward_pre_hook(lambda mod, args: None)
    try:
        stepwise = _decode(m, cfg, prompt, 5, native=True)
    finally:
        handle.remove()
    assert len(made) == 1
    torch.testing.assert_close(replayed, stepwise, rtol=0, atol=0)
    _decode(m, cfg, prompt[:1], 2, native=True)
    assert len(made) == 2  # another batch shape, another graph


def test_decode_graph_follows_the_model(monkeypatch) -> None:  # noqa: ANN001
    """What a graph read stays what the model has now: weights updated in place (read in place: no new graph),
    a replaced projection (a LoRA-like wrapper: the layer-by-layer path), a forward hook that changes a
    block's input, and bf16 norms changed through `.data` (no version bump) all decode like PyTorch."""
    made = _recorded(monkeypatch)
    m, cfg = _model(2, None, torch.bfloat16)
    prompt = torch.randint(0, cfg.vocab_size, (1, 4))
    cache = KVCache.for_model(m, 1, 8)  # one cache throughout: its graph stays valid while the model does

    def agree(native: torch.Tensor) -> None:
        torch.testing.assert_close(native, _decode(m, cfg, prompt, 3, native=False), rtol=3e-2, atol=3e-2)

    agree(_decode(m, cfg, prompt, 3, native=True, cache=cache))
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight.mul_(-2)
        m.model.layers[0].post_attention_layernorm.weight.data.mul_(3)
    agree(_decode(m, cfg, prompt, 3, native=True, cache=cache))
    assert len(made) == 1
    attn = m.model.layers[1].self_attn

    class Wrapped(torch.nn.Module):
        def __init__(self, inner: torch.nn.Linear) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * self.inner(x)

    attn.o_proj = Wrapped(attn.o_proj)
    agree(_decode(m, cfg, prompt, 3, native=True, cache=cache))
    assert len(made) == 2  # tried once more, and not servable: the layer-by-layer path
    attn.o_proj = attn.o_proj.inner
    handle = m.model.layers[1].register_forward_pre_hook(lambda mod, args: (args[0] * 0.5, *args[1:]))
    try:
        agree(_decode(m, cfg, prompt, 3, native=True, cache=cache))
    finally:
        handle.remove()
    agree(_decode(m, cfg, prompt, 3, native=True, cache=cache))
    assert len(made) == 3


def test_engine_decodes_on_the_ops_like_pytorch(count_steps: list) -> None:
    from tianying.engine import Engine
    from tianying.generate import SamplingParams

    m, cfg = _model(2, 4)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (3, 11, 6)]
    params = SamplingParams(max_new_tokens=7)
    native = Engine(m, max_batch=2, prefill_chunk=4).generate_ids(prompts, params)
    assert len(count_steps) >= 7 * cfg.n_layer or not QUANT_NATIVE  # (a forced backend: PyTorch's path)
    m.native_ops = False
    plain = Engine(m, max_batch=2, prefill_chunk=4).generate_ids(prompts, params)
    m.native_ops = True
    assert native == plain


@pytest.fixture
def count_linear(monkeypatch):  # noqa: ANN001, ANN201 - rows of each ops.linear call
    rows = []
    real = ops.linear

    def spy(x, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        rows.append(x.shape[0])
        return real(x, *a, **k)

    monkeypatch.setattr(ops, "linear", spy)
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_projections_on_the_native_kernels(dtype: torch.dtype, monkeypatch, count_linear) -> None:  # noqa: ANN001
    """A forward of several tokens without autograd runs every projection and the head on the native kernels when
    they are chosen (TIANYING_DENSE_GEMM=1), with PyTorch's logits; =0 leaves them to PyTorch."""
    m, cfg = _model(dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        monkeypatch.setenv("TIANYING_DENSE_GEMM", "0")
        plain = m(ids).float()
        assert count_linear == []
        monkeypatch.setenv("TIANYING_DENSE_GEMM", "1")
        tiled = m(ids).float()
    # (the portable scalar build leaves products of several rows to PyTorch: the same logits, no call)
    assert count_linear == ([18] * (7 * cfg.n_layer + 1) if ops.simd_width() >= 8 else [])
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: each projection's output rounded, in another order
    torch.testing.assert_close(tiled, plain, rtol=tol, atol=tol)


def test_projections_with_hooks_or_autograd_stay_in_pytorch(monkeypatch, count_linear) -> None:  # noqa: ANN001
    monkeypatch.setenv("TIANYING_DENSE_GEMM", "1")
    m, cfg = _model()
    ids = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    seen = []
    h = m.model.layers[0].self_attn.q_proj.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    with torch.no_grad():
        m(ids)
    h.remove()
    assert seen == [(1, 6, 64)]
    assert len(count_linear) == (7 * cfg.n_layer if ops.simd_width() >= 8 else 0)  # all but the hooked one
    count_linear.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's bf16 products stay its own
        assert m(ids).dtype == torch.bfloat16
    assert count_linear == []
    m(ids).float().sum().backward()  # training: autograd needs PyTorch's ops
    assert count_linear == [] and m.model.layers[0].mlp.down_proj.weight.grad is not None


@pytest.mark.skipif(not QUANT_NATIVE, reason="another quantization backend is forced")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tiled", ["0", "1"])
@pytest.mark.parametrize("chunks", [1, 2])
def test_quantized_prefill_on_either_gemm(bits: int, tiled: str, chunks: int, monkeypatch, count_linear) -> None:  # noqa: ANN001
    """Above NATIVE_MAX_ROWS rows QuantLinear dequantizes row chunks (one, or two of 40 and 32 rows) and multiplies
    them on the ops or on PyTorch's GEMM: both within the analytic bound of the exact product with Ŵ."""
    from tianying.quantize import linear
    from tianying.quantize.linear import NATIVE_MAX_ROWS, product_bound

    if chunks == 2:
        monkeypatch.setattr(linear, "DEQUANT_CHUNK_ELEMENTS", 40 * 256)
    monkeypatch.setenv("TIANYING_DENSE_GEMM", tiled)
    monkeypatch.setenv("TIANYING_QUANT_BACKEND", "native")
    g = torch.Generator().manual_seed(bits)
    lin = torch.nn.Linear(256, 72, bias=False)
    spec = QuantSpec(bits, -1 if bits == 8 else 32, False)
    q = QuantLinear.from_linear(lin, spec)
    x = torch.randn(NATIVE_MAX_ROWS + 23, 256, generator=g)
    with torch.no_grad():
        y = q(x)
    w = q.dequantize()
    err = (y.double() - x.double() @ w.double().t()).abs()
    assert (err <= product_bound(x, w, "native", spec).double()).all()
    native_gemm = tiled == "1" and not ops.bf16_gemm() and ops.simd_width() >= 8
    assert count_linear == ([x.shape[0]] * chunks if native_gemm else [])



def test_a_graph_keeps_the_outputs_it_writes() -> None:
    """A replay writes every recorded output, read or not: the graph holds them (an output dropped by the caller
    would otherwise be written after its memory was reused)."""
    import gc
    import weakref

    wt = torch.randn(48, 32)
    x = torch.randn(3, 32)
    g = ops.Graph()
    out = weakref.ref(g.linear(x, ops.dense_weight(wt)))  # the caller keeps no reference to the output
    gc.collect()
    assert out() is not None
    g.run()
    torch.testing.assert_close(out(), x @ wt.t(), rtol=1e-5, atol=1e-5)
