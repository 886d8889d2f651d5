"""The native decode step (tianying/quantize/decode.py) equals the ordinary PyTorch path."""

from __future__ import annotations

import os

import pytest
import torch

from tianying.config import Config
from tianying.model import KVCache, build_model
from tianying.quantize import native, quantize_model

pytestmark = [
    pytest.mark.skipif(not native.available(), reason="native kernels could not be built (no C++ compiler)"),
    pytest.mark.skipif(os.environ.get("TIANYING_QUANT_BACKEND", "auto") not in ("auto", "native"),
                       reason="TIANYING_QUANT_BACKEND forces another backend: the native kernels are not under test"),
]


def _model(n_kv_head: int, bits: int, seed: int = 0):
    cfg = Config(vocab_size=96, hidden_size=64, n_layer=2, n_head=4, n_kv_head=n_kv_head, intermediate_size=160,
                 max_position_embeddings=64)
    torch.manual_seed(seed)
    m = build_model(cfg).eval()
    quantize_model(m, bits=bits, group_size=None if bits == 8 else 32, lm_head=True)
    return m, cfg


def _counting(hook, calls: list):  # noqa: ANN001, ANN202 - counts the steps the native decoder really took
    def f(*a):  # noqa: ANN002, ANN202
        r = hook(*a)
        if r is not None:
            calls.append(1)
        return r

    return f


def _decode(m, cfg, prompt: torch.Tensor, steps: int, fast: bool) -> torch.Tensor:  # noqa: ANN001
    hook = m.fast_decode
    m.fast_decode = hook if fast else None
    try:
        cache = KVCache(cfg, prompt.shape[0], prompt.shape[1] + steps + 1, torch.float32, "cpu")
        out = [m(prompt, cache=cache, last_only=True)]
        tok = out[-1][:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            out.append(m(tok, cache=cache))
            tok = (tok * 7 + 3) % cfg.vocab_size  # fixed inputs, independent of the logits
        return torch.cat(out, dim=1)
    finally:
        m.fast_decode = hook


@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_native_decode_equals_the_pytorch_path(n_kv_head: int, bits: int, batch: int) -> None:
    m, cfg = _model(n_kv_head, bits)
    assert m.fast_decode is not None
    prompt = torch.randint(0, cfg.vocab_size, (batch, 5))
    calls = []
    hook = m.fast_decode
    m.fast_decode = _counting(hook, calls)
    fast = _decode(m, cfg, prompt, 6, fast=True)
    assert len(calls) == 6  # every one-token step, not the prompt
    m.fast_decode = hook
    slow = _decode(m, cfg, prompt, 6, fast=False)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_fast_decode_steps_aside_when_it_does_not_apply() -> None:
    from tianying.model import set_config

    m, cfg = _model(4, 8)
    ids = torch.randint(0, cfg.vocab_size, (2, 4))
    hook = m.fast_decode
    # LogN query scaling and a sliding window take the ordinary path
    for change in (dict(logn_attention=True, logn_length=2), dict(attention_window=3)):
        set_config(m, cfg.replace(**change))
        cache = KVCache(m.config, 2, 16, torch.float32, "cpu")
        m(ids, cache=cache)
        calls = []
        m.fast_decode = _counting(hook, calls)
        m(ids[:, :1], cache=cache)
        assert calls == []
        m.fast_decode = hook
    set_config(m, cfg)
    # a replaced projection (e.g. a LoRA wrapper) makes the hook decline
    m.model.layers[0].self_attn.q_proj = torch.nn.Linear(64, 64, bias=False)
    cache = KVCache(cfg, 1, 16, torch.float32, "cpu")
    m(ids[:1], cache=cache)
    assert hook(m.model.embed_tokens(ids[:1, :1]), *m.rope(None, 4, 1, torch.float32, "cpu"), cache.begin(1)) is None


def test_a_deep_copy_gets_its_own_decoder() -> None:
    import copy

    m, cfg = _model(2, 4)
    prompt = torch.randint(0, cfg.vocab_size, (1, 4))
    before = _decode(m, cfg, prompt, 3, fast=True)
    c = copy.deepcopy(m)
    assert c.fast_decode is not m.fast_decode and c.fast_decode.model is c
    torch.testing.assert_close(_decode(c, cfg, prompt, 3, fast=True), before, rtol=0, atol=0)


def test_act_order_layers_decode_natively() -> None:
    """GPTQ act-order: one column order per input (q/k/v share one, gate/up another), gathered in C."""
    from tianying.quantize import QuantLinear
    from tianying.quantize.linear import QuantSpec, quantize_rtn, set_submodule

    cfg = Config(vocab_size=96, hidden_size=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=160,
                 max_position_embeddings=64)
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    spec = QuantSpec(4, 32, True)
    for block in m.model.layers:
        perms = {64: torch.randperm(64), 160: torch.randperm(160)}
        for name, lin in [(n, mod) for n, mod in block.named_modules() if isinstance(mod, torch.nn.Linear)]:
            perm = perms[lin.in_features]
            q, s, z = quantize_rtn(lin.weight.detach()[:, perm], spec)
            set_submodule(block, name, QuantLinear.from_int(q, s, z, spec, perm=perm))
    from tianying.quantize.decode import attach

    assert attach(m)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    calls = []
    hook = m.fast_decode
    m.fast_decode = _counting(hook, calls)
    fast = _decode(m, cfg, prompt, 4, fast=True)
    assert len(calls) == 4
    m.fast_decode = hook
    torch.testing.assert_close(fast, _decode(m, cfg, prompt, 4, fast=False), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_rows_of_different_lengths_decode_natively(bits: int) -> None:
    """A batched step over cache rows of different lengths (the engine's decode) writes and attends at each
    row's own length and rotary position, natively as in PyTorch; a view of later rows works too."""
    m, cfg = _model(2, bits)
    lengths = (5, 2, 9, 3)
    prompts = [torch.randint(0, cfg.vocab_size, (1, n)) for n in lengths]

    def run(fast: bool) -> torch.Tensor:
        hook = m.fast_decode
        m.fast_decode = hook if fast else None
        calls = []
        if fast:
            m.fast_decode = _counting(hook, calls)
        try:
            cache = KVCache(cfg, 4, 32, torch.float32, "cpu")
            for r, p in enumerate(prompts):
                m(p, cache=cache.view(r, r + 1))
            tok = torch.tensor([[1], [2], [3], [4]])
            out = []
            for _ in range(4):
                out.append(m(tok, cache=cache))
                out.append(m(tok[1:3], cache=cache.view(1, 3)))  # rows 1..2 only
                tok = (tok * 7 + 3) % cfg.vocab_size
            assert cache.lengths == [5 + 4, 2 + 8, 9 + 8, 3 + 4]
            return torch.cat([o.flatten() for o in out])
        finally:
            m.fast_decode = hook
            assert not fast or len(calls) == 8

    torch.testing.assert_close(run(True), run(False), rtol=1e-4, atol=1e-4)


def test_engine_decodes_natively_and_equals_the_pytorch_path() -> None:
    from tianying.engine import Engine
    from tianying.generate import SamplingParams

    m, cfg = _model(2, 4)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (3, 11, 6)]
    params = SamplingParams(max_new_tokens=7)
    calls = []
    hook = m.fast_decode
    m.fast_decode = _counting(hook, calls)
    fast = Engine(m, max_batch=2, prefill_chunk=4).generate_ids(prompts, params)
    m.fast_decode = None
    slow = Engine(m, max_batch=2, prefill_chunk=4).generate_ids(prompts, params)
    m.fast_decode = hook
    assert fast == slow and len(calls) >= 7


def test_dtype_round_trip_rebuilds_the_decoder() -> None:
    """`.to(bf16)` then `.float()` gives the norms new storage: the decoder must not keep the old addresses."""
    m, cfg = _model(2, 8)
    prompt = torch.randint(0, cfg.vocab_size, (1, 4))
    before = _decode(m, cfg, prompt, 3, fast=True)
    m.to(torch.bfloat16).float()
    calls = []
    m.fast_decode = _counting(m.fast_decode, calls)
    torch.testing.assert_close(_decode(m, cfg, prompt, 3, fast=True), before, rtol=2e-2, atol=2e-2)
    assert len(calls) == 3
