"""LoRA (swap-the-linear, PEFT files both ways, merge) and NF4 (hand values, error bound, autograd)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tianying.config import Config
from tianying.lora import AdapterError, LoRAConfig, LoRALinear, add_lora, apply_adapter, lora_layers, merge_lora
from tianying.lora import save_adapter as save_lora
from tianying.nf4 import (
    NF4_CODE,
    NF4Linear,
    dequantize_model_nf4,
    error_bound,
    quantize_model_nf4,
    quantize_nf4,
)


def _ours(ckpt):
    from tianying.checkpoint import load_model

    model, _ = load_model(ckpt.path, dtype=torch.float32)
    return model.eval()


def _randomize_lora(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.3)


def test_lora_at_init_equals_base_and_only_lora_trains(tiny_hf_checkpoint, token_ids):
    model = _ours(tiny_hf_checkpoint("test-gqa"))
    with torch.no_grad():
        base = model(token_ids)
    names = add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    assert len(names) == 2 * 7 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert "lm_head" not in names and isinstance(model.lm_head, nn.Linear)
    with torch.no_grad():
        assert torch.equal(model(token_ids), base)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    _randomize_lora(model)
    with torch.no_grad():
        assert not torch.allclose(model(token_ids), base, atol=1e-3)


def test_our_adapter_loads_in_peft_with_the_same_logits(tiny_hf_checkpoint, token_ids, tmp_path):
    import peft  # the reference (dev dependency): missing it must fail, not skip
    from conftest import build_reference

    ckpt = tiny_hf_checkpoint("test-gqa")
    model = _ours(ckpt)
    cfg = LoRAConfig(r=4, alpha=12, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    add_lora(model, cfg)
    _randomize_lora(model)
    save_lora(model, cfg, tmp_path / "adapter", base_model=str(ckpt.path))
    keys = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert keys["peft_type"] == "LORA" and keys["r"] == 4 and keys["lora_alpha"] == 12
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in names and len(names) == 2 * 3 * 2
    ref = peft.PeftModel.from_pretrained(build_reference(ckpt.cfg), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = ref(input_ids=token_ids).logits
        ours = model(token_ids)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(theirs, ckpt.logits(token_ids), atol=1e-3)  # the adapter does something


def test_peft_written_adapter_loads_in_ours(tiny_hf_checkpoint, token_ids, tmp_path):
    import peft  # the reference (dev dependency): missing it must fail, not skip
    from conftest import build_reference

    ckpt = tiny_hf_checkpoint("test-mha")
    torch.manual_seed(0)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.1,
                           init_lora_weights=False, rank_pattern={"up_proj": 2}, alpha_pattern={"v_proj": 3},
                           task_type="CAUSAL_LM")
    pm = peft.get_peft_model(build_reference(ckpt.cfg), lcfg).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        theirs = pm(input_ids=token_ids).logits
    model = apply_adapter(_ours(ckpt), tmp_path / "peft")
    assert model.model.layers[0].mlp.up_proj.r == 2 and model.model.layers[0].self_attn.v_proj.scaling == 3 / 4
    with torch.no_grad():
        torch.testing.assert_close(model(token_ids), theirs, atol=2e-5, rtol=1e-5)
        merged = apply_adapter(_ours(ckpt), tmp_path / "peft", merge=True)
        assert not lora_layers(merged)
        torch.testing.assert_close(merged(token_ids), theirs, atol=2e-5, rtol=1e-5)


def test_merged_equals_adapted_and_is_w_plus_scaled_ba(tiny_hf_checkpoint, token_ids):
    model = _ours(tiny_hf_checkpoint("test-gqa"))
    w0 = model.model.layers[1].self_attn.k_proj.weight.detach().clone()
    add_lora(model, LoRAConfig(r=3, alpha=7, dropout=0.0))
    _randomize_lora(model)
    layer = model.model.layers[1].self_attn.k_proj
    a, b = layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone()
    with torch.no_grad():
        adapted = model(token_ids)
    merge_lora(model)
    assert isinstance(model.model.layers[1].self_attn.k_proj, nn.Linear) and not lora_layers(model)
    torch.testing.assert_close(model.model.layers[1].self_attn.k_proj.weight, w0 + (7 / 3) * b @ a)
    with torch.no_grad():
        torch.testing.assert_close(model(token_ids), adapted, atol=1e-4, rtol=1e-4)


def test_merge_lora_cli_writes_w_plus_ba_and_dequantizes_an_nf4_base(tiny_hf_checkpoint, tmp_path, capsys):
    from tianying.checkpoint import load_state_dict
    from tianying.cli import main
    from tianying.nf4 import dequantize_nf4

    ckpt = tiny_hf_checkpoint("test-gqa")
    base_sd = load_state_dict(ckpt.path)
    model = _ours(ckpt)
    quantize_model_nf4(model)
    cfg = LoRAConfig(r=2, alpha=4, dropout=0.0, target_modules=["o_proj"])
    add_lora(model, cfg)
    _randomize_lora(model)
    meta = {"method": "qlora", "base_quantization": {"type": "nf4", "blocksize": 64, "modules": ["o_proj", "up_proj"]}}
    save_lora(model, cfg, tmp_path / "a", meta=meta)
    layer = model.model.layers[0].self_attn.o_proj
    delta = (4 / 2) * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()

    assert main(["merge-lora", str(ckpt.path), str(tmp_path / "a"), str(tmp_path / "m")]) == 0
    out = load_state_dict(tmp_path / "m")
    w = base_sd["model.layers.0.self_attn.o_proj.weight"]
    torch.testing.assert_close(out["model.layers.0.self_attn.o_proj.weight"],
                               dequantize_nf4(quantize_nf4(w)) + delta)
    up = base_sd["model.layers.1.mlp.up_proj.weight"]  # NF4 in training, no adapter: dequantized only
    torch.testing.assert_close(out["model.layers.1.mlp.up_proj.weight"], dequantize_nf4(quantize_nf4(up)))
    assert torch.equal(out["model.layers.1.mlp.gate_proj.weight"], base_sd["model.layers.1.mlp.gate_proj.weight"])

    assert main(["merge-lora", str(ckpt.path), str(tmp_path / "a"), str(tmp_path / "f"), "--base", "float"]) == 0
    out = load_state_dict(tmp_path / "f")
    torch.testing.assert_close(out["model.layers.0.self_attn.o_proj.weight"], w + delta)
    assert "merged checkpoint" in capsys.readouterr().out


def test_llm_load_applies_an_adapter(token_ids, tmp_path):
    from tianying.api import LLM
    from tianying.checkpoint import save_hf
    from tianying.model import build_model

    base = Config.from_name("test-mha", vocab_size=3008, bos_token_id=3006, eos_token_id=3007, pad_token_id=0)
    m = build_model(base, seed=1).eval()
    save_hf(m, base, tmp_path / "base", tokenizer_dir="tests/data/tokenizer")
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0)
    add_lora(m, cfg)
    _randomize_lora(m)
    save_lora(m, cfg, tmp_path / "adapter")
    llm = LLM.load(tmp_path / "base", lora=tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(llm.model(token_ids), m(token_ids), atol=1e-5, rtol=1e-5)
    assert isinstance(llm.generate("hello", max_new_tokens=3), str)


def test_adapter_errors_name_the_problem(tiny_hf_checkpoint, tmp_path):
    model = _ours(tiny_hf_checkpoint("test-gqa"))
    with pytest.raises(AdapterError, match="match no linear layer"):
        add_lora(model, LoRAConfig(target_modules=["q_prj"]))
    cfg = LoRAConfig(r=2, alpha=4, dropout=0.0, target_modules=["wq", "wv"])  # v1 names map to HF names
    assert cfg.target_modules == ["q_proj", "v_proj"]
    add_lora(model, cfg)
    save_lora(model, cfg, tmp_path / "a")
    other = _ours(tiny_hf_checkpoint("test-mha"))  # k/v projections of another width
    with pytest.raises(AdapterError, match=r"v_proj\.lora_B has shape .* wrong base model"):
        apply_adapter(other, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    raw["use_dora"] = True
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(AdapterError, match="DoRA is not supported"):
        apply_adapter(_ours(tiny_hf_checkpoint("test-gqa")), tmp_path / "a")
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        apply_adapter(model, tmp_path)


# ------------------------------------------------------------------------------------------------ NF4
def test_nf4_code_is_the_papers_table():
    code = torch.tensor(NF4_CODE)
    assert len(code) == 16 and code[0] == -1 and code[7] == 0 and code[15] == 1
    assert torch.all(code[1:] > code[:-1])
    assert code[8].item() == pytest.approx(0.07958029955625534) and code[1].item() == pytest.approx(-0.6961928)


def test_nf4_quantize_dequantize_matches_hand_computed_values():
    w = torch.zeros(64)
    w[:6] = torch.tensor([0.1, 0.5, -0.6, 2.0, -1.0, 0.0])
    t = quantize_nf4(w)
    # absmax 2 → x = 0.05, 0.25, -0.3, 1, -0.5, 0; nearest codes (by hand): idx 8, 10, 4, 15, 2, 7
    assert t.packed[:3].tolist() == [(8 << 4) | 10, (4 << 4) | 15, (2 << 4) | 7]
    # one block: the double-quantized constant is exact (its mean is itself)
    want = torch.tensor([0.07958029955625534, 0.24611230194568634, -0.28444138169288635, 1.0,
                         -0.5250730514526367, 0.0]) * 2.0
    torch.testing.assert_close(t.dequantize()[:6], want)
    # two blocks, constants 1 and 3: mean 2, deviations ∓1 → int8 ∓127 with scale 1/127, exact again
    w2 = torch.cat([torch.full((64,), 1.0), torch.full((64,), -3.0)])
    t2 = quantize_nf4(w2)
    assert t2.absmax_q.tolist() == [-127, 127] and t2.absmax_offset.item() == 2.0
    torch.testing.assert_close(t2.dequantize(), w2)


def test_nf4_error_within_bound_and_size():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(384, 256, generator=gen) * torch.linspace(0.01, 2, 256)  # blocks of very different scales
    t = quantize_nf4(w)
    err = (t.dequantize() - w).abs()
    bound = error_bound(w, t)
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-7)
    c = w.reshape(-1, 64).abs().amax(1)
    dc = (t.absmax() - c).abs()
    s2 = (c - c.mean()).reshape(-1, 256).abs().amax(1) / 127
    assert torch.all(dc <= s2.repeat_interleave(256) / 2 * (1 + 1e-5) + 1e-7)  # double-quant: half a step
    assert err.max() <= 0.1519 * c.max() + dc.max() + 1e-6  # half the widest NF4 gap (-1 … -0.696)
    assert t.nbytes() * 8 / w.numel() == pytest.approx(4.127, abs=0.01)
    rel = (err.pow(2).sum() / w.pow(2).sum()).sqrt()
    assert rel < 0.12  # NF4 on gaussian-ish data: ~10% relative RMS error


def test_nf4_linear_forward_backward_use_the_dequantized_weight():
    lin = nn.Linear(128, 64, bias=False)
    q = NF4Linear.from_linear(lin)
    w = q.dequantize()
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, x @ w.T)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ w.T).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert not any(p.requires_grad for p in q.parameters())
    m = nn.Sequential()
    m.add_module("q_proj", lin)
    assert quantize_model_nf4(m) == ["q_proj"] and isinstance(m.q_proj, NF4Linear)
    assert dequantize_model_nf4(m) == ["q_proj"]
    torch.testing.assert_close(m.q_proj.weight, w)


def test_lora_dropout_path_matches_reference_and_keeps_no_fp32_copy():
    """The training path (dropout mask saved as bool, dropped input recomputed in backward) gives the same output
    and gradients as nn.Dropout → lora_A → lora_B with that mask, and saves no extra full-size fp32 tensor."""
    from tianying.lora import _LoRADropout

    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    a_w = torch.randn(4, 16, requires_grad=True)
    b_w = torch.randn(8, 4, requires_grad=True)
    keep = torch.rand(3, 5, 16) > 0.3
    out = _LoRADropout.apply(x, a_w, b_w, keep, 1 / 0.7, 2.0)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, a_w, b_w), g)
    ref_out = ((x * keep / 0.7) @ a_w.t() @ b_w.t()) * 2.0
    ref = torch.autograd.grad(ref_out, (x, a_w, b_w), g)
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)

    layer = LoRALinear(nn.Linear(16, 8, bias=False).requires_grad_(False), r=4, alpha=8, dropout=0.1).train()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum()
    fp32_full = [t for t in saved if t.dtype == torch.float32 and t.shape == x.shape and t is not x]
    assert not fp32_full, "the dropped input is kept for backward (LoRA would keep more activations than full)"
