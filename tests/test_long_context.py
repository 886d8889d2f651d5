"""Long context (issue 8): RoPE scaling kinds vs hand formulas and transformers, LogN, window attention."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tianying.checkpoint import load_model, save_hf
from tianying.config import Config
from tianying.engine import Engine
from tianying.generate import SamplingParams
from tianying.model import KVCache, build_model
from tianying.rope import inv_freq_and_scale, logn_scale, rope_cos_sin, rotation_tables

D, BASE = 16, 10000.0
TOL = 1e-4


def _hf_inv_freq(kind: str, seq_len: int | None, max_pos: int = 64, **extra) -> tuple[torch.Tensor, float]:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=4 * D, num_attention_heads=4, max_position_embeddings=max_pos,
                      rope_parameters={"rope_type": kind, "rope_theta": BASE, "factor": 4.0, **extra})
    return ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len=seq_len)


def _theta(base: float) -> torch.Tensor:
    return torch.tensor([base ** (-2 * i / D) for i in range(D // 2)], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- RoPE kinds
def test_inverse_frequencies_equal_hand_formulas():
    f, L0 = 4.0, 64
    inv, div, mult = inv_freq_and_scale(D, BASE, None, 10, L0)
    torch.testing.assert_close(inv, _theta(BASE), rtol=1e-6, atol=0)
    assert (div, mult) == (1.0, 1.0)
    inv, div, _ = inv_freq_and_scale(D, BASE, {"type": "linear", "factor": f}, 10, L0)
    assert div == f
    ntk = {"type": "ntk", "factor": f}
    inv, div, _ = inv_freq_and_scale(D, BASE, ntk, 10, L0)
    torch.testing.assert_close(inv, _theta(BASE * f ** (D / (D - 2))), rtol=1e-6, atol=0)
    assert div == 1.0 and float(inv[-1]) * f == pytest.approx(float(_theta(BASE)[-1]), rel=1e-6)  # slowest ÷ f
    assert float(inv[0]) == 1.0  # the fastest dimension is untouched
    dyn = {"type": "dynamic", "factor": f}
    torch.testing.assert_close(inv_freq_and_scale(D, BASE, dyn, L0, L0)[0], _theta(BASE))  # ≤ L₀: unscaled
    L = 3 * L0
    base = BASE * (f * L / L0 - (f - 1)) ** (D / (D - 2))
    torch.testing.assert_close(inv_freq_and_scale(D, BASE, dyn, L, L0)[0], _theta(base), rtol=1e-6, atol=0)


@pytest.mark.parametrize("seq_len", [16, 64, 65, 300])
def test_dynamic_matches_transformers_below_and_above_max_positions(seq_len):
    ours, _, _ = inv_freq_and_scale(D, BASE, {"type": "dynamic", "factor": 4.0}, seq_len, 64)
    theirs, _ = _hf_inv_freq("dynamic", seq_len)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("extra", [{}, {"original_max_position_embeddings": 32, "beta_fast": 16},
                                   {"mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False}])
def test_yarn_matches_transformers(extra):
    scaling = {"type": "yarn", "factor": 4.0, **extra}
    ours, div, mult = inv_freq_and_scale(D, BASE, scaling, 10, 64)
    theirs, attn = _hf_inv_freq("yarn", None, **extra)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert div == 1.0 and mult == pytest.approx(attn, rel=1e-12) and mult != 1.0
    cos, _ = rope_cos_sin(torch.tensor([0]), D, BASE, scaling, 64)
    assert float(cos[0, 0]) == pytest.approx(attn)  # cos(0)·attention factor: the factor reaches the tables


@pytest.mark.parametrize("scaling", [
    {"type": "dynamic", "factor": 2.0},
    {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8},
    {"type": "ntk", "factor": 2.0},
])
def test_scaled_logits_match_transformers_and_round_trip(tiny_hf_checkpoint, token_ids, scaling):
    # max_position_embeddings 8 < 16 tokens: dynamic scales in the prefill; the others scale throughout
    ref = tiny_hf_checkpoint("test-gqa", max_position_embeddings=8, rope_scaling=scaling)
    raw = json.loads((ref.path / "config.json").read_text())
    model, cfg = load_model(ref.path)
    assert cfg.rope_scaling["type"] == scaling["type"] and cfg.rope_theta == 10000.0
    if scaling["type"] == "ntk":  # transformers saw plain RoPE with the NTK base
        assert raw["rope_parameters"]["rope_type"] == "default"
        assert raw["rope_parameters"]["rope_theta"] == pytest.approx(10000 * 2 ** (16 / 14))
    with torch.no_grad():
        ours = model(token_ids)
    torch.testing.assert_close(ours, ref.logits(token_ids), atol=TOL, rtol=0)
    plain = tiny_hf_checkpoint("test-gqa", max_position_embeddings=8)
    assert (plain.logits(token_ids) - ours).abs().max() > 1e-2  # the scaling is visible at these lengths


def test_dynamic_cached_decode_matches_transformers(tiny_hf_checkpoint, token_ids):
    """Decoding past L₀ one token at a time: both recompute the base for the grown length for the new query and
    key, and both keep the keys already cached as they were rotated (transformers' DynamicCache does too)."""
    from transformers import DynamicCache

    ref = tiny_hf_checkpoint("test-mha", max_position_embeddings=8, rope_scaling={"type": "dynamic", "factor": 2.0})
    model, cfg = load_model(ref.path)
    ids = token_ids[:1]
    cache, hf_cache = KVCache(cfg, 1, 16, torch.float32, "cpu"), DynamicCache()
    with torch.no_grad():
        ours = [model(ids[:, :6], cache=cache)[:, -1]]
        out = ref.model(input_ids=ids[:, :6], past_key_values=hf_cache, use_cache=True)
        theirs = [out.logits[:, -1]]
        for t in range(6, 16):
            ours.append(model(ids[:, t:t + 1], cache=cache)[:, -1])
            out = ref.model(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            theirs.append(out.logits[:, -1])
        full = model(ids)[:, -1]
    torch.testing.assert_close(torch.stack(ours), torch.stack(theirs), atol=TOL, rtol=0)
    assert (full - ours[-1]).abs().max() > 1e-3  # stale cached keys: decode ≠ one-shot prefill, in both


# ---------------------------------------------------------------------------------------------- LogN
def test_logn_factor_exact():
    L = 8
    pos = torch.arange(20)
    got = logn_scale(pos, L)
    assert torch.equal(got[:L], torch.ones(L))  # 0-based positions 0…L−1 are 1-based p = 1…L
    for i in range(L, 20):
        assert got[i].item() == pytest.approx(math.log(i + 1) / math.log(L), rel=1e-7)
    assert got[L].item() > 1.0


def _model(name: str = "test-gqa", **kw):
    cfg = Config.from_name(name, **kw)
    return build_model(cfg, seed=0).eval(), cfg


def test_logn_in_prefill_and_decode():
    model, cfg = _model(max_position_embeddings=64, logn_attention=True, logn_length=6)
    seen: list[torch.Tensor] = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(lambda m, a: seen.append(a[6]))
    ids = torch.randint(0, 512, (1, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(cfg, 1, 14, torch.float32, "cpu")
        steps = [model(ids[:, :4], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(4, 14)]
    hook.remove()
    expect = torch.tensor([1.0] * 6 + [math.log(p) / math.log(6) for p in range(7, 15)])
    torch.testing.assert_close(seen[0].flatten(), expect, rtol=1e-7, atol=0)  # prefill
    torch.testing.assert_close(torch.cat([s.flatten() for s in seen[1:]]), expect, rtol=1e-7, atol=0)  # decode
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=TOL, rtol=0)
    model.config = cfg.replace(logn_attention=False)
    with torch.no_grad():
        off = model(ids)
    assert torch.equal(off[:, :6], full[:, :6]) and (off[:, 6:] - full[:, 6:]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- window
def _explicit_window_logits(model, ids: torch.Tensor, W: int, S: int) -> torch.Tensor:
    """Reference: the unwindowed model's layers under a mask written out element by element."""
    T = ids.shape[1]
    mask = torch.zeros(1, 1, T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(i + 1):
            mask[0, 0, i, j] = i - j < W or j < S
    x = model.model.embed_tokens(ids)
    cos, sin = rotation_tables(*model.rope(None, 0, T, x.dtype, ids.device))
    for layer in model.model.layers:
        x = layer(x, cos, sin, mask, False, None)
    return model.lm_head(model.model.norm(x))


@pytest.mark.parametrize("W,S", [(4, 0), (5, 2)])
def test_window_equals_explicit_mask(W, S):
    model, cfg = _model(attention_window=W, attention_sinks=S)
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, ref = model(ids), _explicit_window_logits(model, ids, W, S)
        model.config = cfg.replace(attention_window=None, attention_sinks=0)
        full = model(ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (got - full).abs().max() > 1e-2  # the window matters at this length
    assert torch.equal(got[:, :W], full[:, :W]) or (got[:, :W] - full[:, :W]).abs().max() < 1e-5


@pytest.mark.parametrize("W,S,chunk", [(4, 0, 3), (5, 2, 7), (5, 2, 1), (3, 1, 19)])
def test_ring_cache_chunked_prefill_and_decode(W, S, chunk):
    model, cfg = _model(attention_window=W, attention_sinks=S, logn_attention=True, logn_length=8)
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids)  # one-shot windowed forward
        cache = KVCache(cfg, 2, 19, torch.float32, "cpu")  # the config's window: a ring of W + S slots
        shape, got = cache.k.shape, []
        for a in range(0, 13, chunk):  # chunked prefill of 13 tokens, then one token at a time
            b = min(a + chunk, 13)
            got.append(model(ids[:, a:b], cache=cache))
            assert cache.k.shape == shape and cache.k.shape[3] == W + S
        for t in range(13, 19):
            got.append(model(ids[:, t:t + 1], cache=cache))
            assert cache.k.shape[3] == W + S and cache.memory_bytes() == 2 * cache.k.numel() * 4
    torch.testing.assert_close(torch.cat(got, 1), ref, atol=1e-5, rtol=0)
    held = sorted(cache.held_positions(cache.pos).tolist())
    assert held == list(range(S)) + list(range(19 - W, 19))


def test_chunked_prefill_equals_one_shot_full_attention():
    model, cfg = _model()
    ids = torch.randint(0, 512, (2, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        one = model(ids, cache=KVCache(cfg, 2, 23, torch.float32, "cpu"))[:, -1]
        for chunk in (1, 5, 8):
            cache = KVCache(cfg, 2, 23, torch.float32, "cpu")
            for a in range(0, 23, chunk):
                got = model(ids[:, a:a + chunk], cache=cache)[:, -1]
            torch.testing.assert_close(got, one, atol=1e-5, rtol=0)


def _greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("S", [0, 2])
def test_generate_with_window(S):
    model, cfg = _model(attention_window=6, attention_sinks=S)
    prompt = torch.randint(3, 512, (17,), generator=torch.Generator().manual_seed(4)).tolist()
    params = SamplingParams(max_new_tokens=12)
    engine = Engine(model, prefill_chunk=5)
    out = engine.generate_ids([prompt], params)[0]
    assert out == _greedy_reference(model, prompt, 12)
    assert engine.cache.k.shape[3] == 6 + S  # only the window (and sinks) is ever held


@pytest.mark.parametrize("S", [0, 2])
def test_generate_window_batched_rows_of_different_lengths(S):
    model, cfg = _model(attention_window=5, attention_sinks=S)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (11, 4, 7)]
    params = SamplingParams(max_new_tokens=8)
    batched = Engine(model, max_batch=3, prefill_chunk=3).generate_ids(prompts, params)
    assert batched == [_greedy_reference(model, p, 8) for p in prompts]


# ---------------------------------------------------------------------------------------------- config / save
def test_config_round_trip_and_released_configs_unchanged(tmp_path):
    from transformers import LlamaConfig

    cfg = Config.from_name("test-gqa", rope_scaling={"type": "ntk", "factor": 4}, logn_attention=True,
                           logn_length=128, attention_window=64, attention_sinks=4)
    hf = cfg.to_hf()
    assert hf["rope_scaling"] is None and hf["rope_theta"] == pytest.approx(1e4 * 4 ** (16 / 14))
    back = Config.from_hf(hf)
    for k in ("rope_scaling", "rope_theta", "logn_attention", "logn_length", "attention_window", "attention_sinks"):
        assert getattr(back, k) == getattr(cfg, k), k
    assert not {"tianying_rope_scaling", "logn_attention", "attention_window"} & set(back.extra)
    LlamaConfig(**hf)  # transformers accepts it
    assert not {"logn_attention", "attention_window", "tianying_rope_scaling"} & set(
        Config.from_name("aquilachat2-7b-16k").to_hf())
    model = build_model(cfg, seed=0)
    save_hf(model, cfg, tmp_path / "ck")
    _, cfg2 = load_model(tmp_path / "ck")
    assert (cfg2.rope_scaling, cfg2.logn_attention, cfg2.attention_window) == (cfg.rope_scaling, True, 64)


def test_finetune_extends_context_and_transformers_loads_it(tmp_path):
    """The seed's PI + SFT recipe at toy scale: a base trained at L = 16 finetuned at 48 with linear ×4."""
    from pathlib import Path

    from conftest import randomize_
    from transformers import LlamaForCausalLM

    from tianying.config import ConfigError
    from tianying.recipes.finetune import FinetuneConfig, run_finetune

    tok = Path(__file__).parent / "data" / "tokenizer"
    cfg = Config.from_name("test-mha", vocab_size=3008, hidden_size=32, intermediate_size=64, bos_token_id=3006,
                           eos_token_id=3007, pad_token_id=0, chat_template="aquila-v1", max_position_embeddings=16)
    model = build_model(cfg, seed=0)
    randomize_(model)
    save_hf(model, cfg, tmp_path / "base", tokenizer_dir=tok)
    conv = [{"from": "human", "value": "say it"}, {"from": "gpt", "value": "the red cat drinks tea under the moon"}]
    data = tmp_path / "sft.json"
    data.write_text(json.dumps([{"id": str(i), "conversations": conv, "instruction": ""} for i in range(4)]))
    kw = dict(checkpoint=str(tmp_path / "base"), data=str(data), out_dir=str(tmp_path / "ft"), method="full",
              seq_length=48, batch_size=2, max_steps=2, save_interval=2, tensorboard=False, progress=False,
              plot=False)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        run_finetune(FinetuneConfig(**kw), log=lambda *a: None)
    scaling = {"type": "linear", "factor": 4.0}
    run_finetune(FinetuneConfig(**kw, model_args={"rope_scaling": scaling, "max_position_embeddings": 64}),
                 log=lambda *a: None)
    final = tmp_path / "ft" / "final"
    ours, cfg2 = load_model(final)
    assert cfg2.rope_scaling["factor"] == 4.0 and cfg2.max_position_embeddings == 64
    ref = LlamaForCausalLM.from_pretrained(final).eval()
    assert ref.config.rope_parameters["rope_type"] == "linear" and ref.config.rope_parameters["factor"] == 4.0
    ids = torch.randint(0, 3000, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(input_ids=ids).logits, atol=TOL, rtol=0)
