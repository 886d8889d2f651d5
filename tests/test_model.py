"""The model against transformers' LlamaForCausalLM on the same random weights."""

import pytest
import torch
import transformers  # the reference; a dev dependency, so a missing one fails loudly

from tianying.config import Config
from tianying.model import KVCache, build_model, causal_lm_loss
from tianying.rope import half_to_interleaved, interleaved_to_half


def twin(cfg, seed=0):
    model = build_model(cfg, seed=seed).eval()
    hcfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items()
                                       if k not in ("architectures", "model_type")})
    hf = transformers.LlamaForCausalLM(hcfg).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("inv_freq" in k for k in missing)
    return model, hf


@pytest.mark.parametrize("name", ["test-mha", "test-gqa"])
@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 4.0}, {"type": "dynamic", "factor": 2.0}])
def test_logits_match_transformers(name, scaling):
    # a larger init makes logits depend strongly on positions, so a RoPE mistake cannot hide under 1e-4
    cfg = Config.from_name(name).replace(rope_scaling=scaling, max_position_embeddings=32, initializer_range=0.1)
    model, hf = twin(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 70), generator=torch.Generator().manual_seed(0))  # > 2× max_pos
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4


def test_kv_cache_decode_equals_full_forward():
    cfg = Config.from_name("test-gqa")
    model, _ = twin(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 20))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(cfg, 3, 32, torch.float32, "cpu")
        parts = [model(x[:, :7], cache=cache), model(x[:, 7:8], cache=cache), model(x[:, 8:], cache=cache)]
    assert cache.pos == 20
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


def test_padding_mask_isolates_rows():
    cfg = Config.from_name("test-mha")
    model, _ = twin(cfg)
    x = torch.randint(3, cfg.vocab_size, (1, 6))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), x], 1)
    mask = torch.tensor([[False] * 4 + [True] * 6])
    pos = torch.tensor([[0, 0, 0, 0, 0, 1, 2, 3, 4, 5]])
    with torch.no_grad():
        a = model(x)
        b = model(padded, positions=pos, pad_mask=mask)[:, 4:]
    assert (a - b).abs().max().item() < 1e-5


def test_loss_matches_transformers():
    cfg = Config.from_name("test-mha")
    model, hf = twin(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    labels = x.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        ours = causal_lm_loss(model(x), labels)
        ref = hf(x, labels=labels).loss
    assert abs(ours.item() - ref.item()) < 1e-5


def test_qk_permutation_round_trip_and_meaning():
    w = torch.randn(2 * 8, 5)  # 2 heads, head_dim 8
    assert torch.equal(half_to_interleaved(interleaved_to_half(w, 2), 2), w)
    # native row h·hd + 2j + c  ->  HF row h·hd + c·hd/2 + j
    hf = interleaved_to_half(w, 2)
    assert torch.equal(hf[8 + 1 * 4 + 3], w[8 + 2 * 3 + 1])


def test_bf16_runs_and_is_close():
    cfg = Config.from_name("test-mha")
    model, _ = twin(cfg)
    x = torch.randint(0, cfg.vocab_size, (1, 10))
    with torch.no_grad():
        ref = model(x)
        out = model.to(torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 0.05
