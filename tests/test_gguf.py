"""GGUF import and export (tianying.gguf_io), checked against the `gguf` package, transformers and llama.cpp.

References: transformers' `from_pretrained(..., gguf_file=...)` (its own GGUF reader: it dequantizes with
`gguf` and undoes GGML's q/k order itself), GGUF files written here with `gguf.GGUFWriter` and
`gguf.quants.quantize` directly (not through our exporter), `gguf.quants.dequantize` for the values, and
llama.cpp's llama-simple for greedy decoding (where built: /work/llama.cpp or $LLAMA_CPP_DIR).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tianying import gguf_io
from tianying.checkpoint import save_hf
from tianying.cli import main as cli
from tianying.config import Config
from tianying.model import build_model
from tianying.quantize.linear import QuantLinear
from tianying.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOK = ROOT / "tests" / "data" / "tokenizer"  # 3,008 ids: 0 <|endoftext|>, 3000..3007 Aquila specials
TEXT = "北京是中国的首都。 The capital of China is Beijing! def f(x):\n    return x  [CLS]</s>"
IDS = torch.tensor([[3006, 5, 100, 2000, 7, 9, 2999, 44], [1, 2, 3, 4, 5, 6, 7, 8]])


def tiny_config(**kw) -> Config:
    # vocab 3072 > the tokenizer's 3008: the exporter pads with UNUSED rows; widths are multiples of 32
    base = dict(vocab_size=3072, hidden_size=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=128,
                max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=3006,
                eos_token_id=3007, pad_token_id=0, chat_template="aquila-v1")
    return Config(**{**base, **kw})


def random_model(cfg: Config, seed: int = 0) -> torch.nn.Module:
    """Unit-scale weights (as conftest.randomize_), so that a wrong q/k order could not hide under 1e-4."""
    m = build_model(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / (1 if "embed" in name else math.sqrt(p.shape[1])))
    return m.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def hf_from_gguf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture
def reference_backend(monkeypatch):
    """Quantized layers through `dequantize → F.linear` (the fast int4 kernel rounds activations)."""
    monkeypatch.setenv("TIANYING_QUANT_BACKEND", "reference")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, torch.nn.Module, Config]:
    cfg = tiny_config()
    m = random_model(cfg)
    path = tmp_path_factory.mktemp("gguf") / "ckpt"
    save_hf(m, cfg, path, tokenizer_dir=TOK, dtype=torch.float32)
    return path, m, cfg


# ---------------------------------------------------------------------- a reference writer (not ours)
def ggml_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows → GGML's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_reference_gguf(path: Path, model: torch.nn.Module, cfg: Config, qtype, tied: bool = False,
                         override: dict | None = None, pre: str = "gpt-2") -> Path:
    """A GGUF as llama.cpp's converter lays it out, written with gguf.GGUFWriter and gguf.quants.quantize
    (`override`: GGUF tensor name → type for those tensors)."""
    tok = Tokenizer.from_dir(TOK)
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = tok.get_vocab()
    tokens = [f"[PAD{i}]" for i in range(cfg.vocab_size)]
    types = [gguf.TokenType.UNUSED] * cfg.vocab_size
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = gguf.TokenType.CONTROL if i in tok.special_tokens.values() else gguf.TokenType.NORMAL
    merges = [ln for ln in (TOK / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if ln]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    sd = model.state_dict()
    names = dict(NAMES)
    for i in range(cfg.n_layer):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in LAYER.items()})
    if tied:
        names.pop("lm_head.weight")
    for name, gname in names.items():
        t = sd[name].float().numpy()
        if "q_proj" in name:
            t = ggml_rows(t, cfg.n_head)
        elif "k_proj" in name:
            t = ggml_rows(t, cfg.n_kv_head)
        if t.ndim == 1:
            w.add_tensor(gname, t)
        else:
            kind = (override or {}).get(gname, qtype)
            w.add_tensor(gname, gguf.quants.quantize(t, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------- export → transformers
@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_exported_gguf_loads_in_transformers(ckpt, tmp_path, quant, reference_backend):
    path, model, cfg = ckpt
    out = gguf_io.export_gguf(path, tmp_path / f"m-{quant}.gguf", quant=quant)
    ref = hf_from_gguf(out)
    assert ref.config.num_key_value_heads == cfg.n_kv_head and not ref.config.tie_word_embeddings
    ours = gguf_io.load_gguf(out)[0]
    if quant == "f32":  # the GGUF holds our weights exactly: transformers computes our logits
        assert (logits(ref, IDS) - logits(model, IDS)).abs().max() <= 1e-4
    else:  # q8_0: transformers dequantizes with gguf; we run int8 QuantLinears from the same blocks
        assert isinstance(ours.model.layers[0].self_attn.q_proj, QuantLinear)
        assert isinstance(ours.lm_head, QuantLinear)
        assert (logits(ref, IDS) - logits(ours, IDS)).abs().max() <= 1e-4
        assert (logits(ref, IDS) - logits(model, IDS)).abs().max() > 1e-3  # it really is quantized
    types = dict(gguf_io.iter_types(out))
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_down.weight"] == ("F32" if quant == "f32" else "Q8_0")


def test_exported_metadata_and_tokenizer(ckpt, tmp_path):
    path, _, cfg = ckpt
    out = gguf_io.export_gguf(path, tmp_path / "m.gguf", quant="f16")
    r = gguf.GGUFReader(out)
    field = {k: r.fields[k].contents() for k in r.fields if not k.startswith("GGUF.")}
    assert field["general.architecture"] == "llama"
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "gpt-2"
    assert field["tokenizer.ggml.bos_token_id"] == 3006 and field["tokenizer.ggml.eos_token_id"] == 3007
    tokens, types = field["tokenizer.ggml.tokens"], field["tokenizer.ggml.token_type"]
    assert len(tokens) == cfg.vocab_size == 3072
    assert tokens[3006] == "[CLS]" and types[3006] == gguf.TokenType.CONTROL and types[0] == gguf.TokenType.CONTROL
    assert types[300] == gguf.TokenType.NORMAL
    assert tokens[3008] == "[PAD3008]" and set(types[3008:]) == {gguf.TokenType.UNUSED}
    assert field["llama.attention.head_count_kv"] == 2 and field["llama.vocab_size"] == 3072
    assert field["tianying.chat_template"] == "aquila-v1"
    assert not field["tokenizer.ggml.add_bos_token"]
    # the round trip: the same tokenizer, config and weights come back
    g = gguf_io.read_gguf(out)
    orig = Tokenizer.from_dir(path)
    assert g.tokenizer.encode(TEXT) == orig.encode(TEXT)
    assert g.tokenizer.decode(orig.encode(TEXT)) == TEXT
    assert g.tokenizer.vocab_size == 3008 and g.tokenizer.bos_id == 3006 and g.tokenizer.eos_id == 3007
    assert g.cfg.to_hf() == cfg.to_hf()
    from transformers import AutoTokenizer  # transformers' own GGUF tokenizer reader agrees

    hf_tok = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    assert hf_tok(TEXT, add_special_tokens=False)["input_ids"] == orig.encode(TEXT)
    assert (hf_tok.bos_token, hf_tok.eos_token) == ("[CLS]", "</s>")


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 8.0},
                                     {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                                     {"type": "ntk", "factor": 2.0}])
def test_rope_settings_round_trip(tmp_path, scaling, reference_backend):
    from tianying.rope import ntk_base

    cfg = tiny_config(rope_theta=1_000_000.0, rope_scaling=scaling, max_position_embeddings=512, rms_norm_eps=1e-6)
    model = random_model(cfg, seed=7)
    g = gguf_io.read_gguf(gguf_io.write_gguf(model, cfg, tmp_path / "m.gguf", TOK))
    if scaling and scaling["type"] == "ntk":  # written as the RoPE base it amounts to: the same angles
        assert g.cfg.rope_scaling is None and math.isclose(g.cfg.rope_theta, ntk_base(1e6, 2.0, cfg.head_dim),
                                                           rel_tol=1e-6)
    else:
        assert g.cfg.to_hf() == cfg.to_hf()
    ids = torch.arange(300).reshape(1, -1) % 3000  # past 64 positions: the scaling matters
    assert (logits(gguf_io.load_gguf(g.path)[0], ids) - logits(model, ids)).abs().max() <= 1e-4


def test_chat_template_from_tokenizer_config(ckpt, tmp_path):
    """A checkpoint's own Jinja chat_template goes into the GGUF and comes back out of it."""
    import shutil

    path, model, cfg = ckpt
    src = tmp_path / "ck"
    shutil.copytree(path, src)
    conf = json.loads((src / "tokenizer_config.json").read_text())
    conf["chat_template"] = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps(conf))
    raw = json.loads((src / "config.json").read_text())
    raw.pop("tianying_chat_template", None)
    (src / "config.json").write_text(json.dumps(raw))
    out = gguf_io.export_gguf(src, tmp_path / "m.gguf")
    g = gguf_io.read_gguf(out)
    assert g.chat_template == conf["chat_template"] and g.cfg.chat_template is None
    dst, _ = gguf_io.convert_gguf(out, tmp_path / "back")
    assert json.loads((dst / "tokenizer_config.json").read_text())["chat_template"] == conf["chat_template"]


def test_named_template_exports_its_jinja(ckpt, tmp_path, monkeypatch):
    """The checkpoint's tianying template name → `tianying.templates.jinja_source(name)` in the GGUF."""
    from tianying import templates

    path, _, _ = ckpt
    monkeypatch.setattr(templates, "jinja_source", lambda name: f"{{# {name} #}}{{{{ messages[0]['content'] }}}}",
                        raising=False)
    g = gguf_io.read_gguf(gguf_io.export_gguf(path, tmp_path / "m.gguf"))
    assert g.chat_template == "{# aquila-v1 #}{{ messages[0]['content'] }}" and g.cfg.chat_template == "aquila-v1"


def test_llama3_style_pre_tokenizer_round_trip(ckpt, tmp_path):
    """A Split-regex pre-tokenizer (Llama 3's) is exported under llama.cpp's name and imported back as such."""
    import shutil

    from tokenizers import Regex, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    path, _, _ = ckpt
    src = tmp_path / "ck"
    shutil.copytree(path, src)
    backend = Backend.from_file(str(src / "tokenizer.json"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(gguf_io._SPLIT_PRE["llama-bpe"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.save(str(src / "tokenizer.json"))
    text = TEXT + " 12345678 don't"
    assert backend.encode(text).ids != Backend.from_file(str(path / "tokenizer.json")).encode(text).ids
    g = gguf_io.read_gguf(gguf_io.export_gguf(src, tmp_path / "m.gguf"))
    assert g.pre == "llama-bpe"
    assert g.tokenizer.encode(text) == backend.encode(text, add_special_tokens=False).ids


def test_smollm_pre_tokenizer_splits_digits(tmp_path):
    """llama.cpp's `smollm` pre-tokenizer (SmolLM2's GGUFs) = every digit alone, then GPT-2's regex: the same ids
    as HF's own form of it (Digits(individual_digits) + ByteLevel), and unlike plain `gpt-2` on numbers."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    cfg = tiny_config()
    path = write_reference_gguf(tmp_path / "s.gguf", random_model(cfg), cfg, gguf.GGMLQuantizationType.F32,
                                pre="smollm")
    g = gguf_io.read_gguf(path)
    ref = Backend.from_file(str(TOK / "tokenizer.json"))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    text = TEXT + " In 2024, 12345678 apples cost ¥1,000.50; don't."
    assert g.tokenizer.encode(text) == ref.encode(text, add_special_tokens=False).ids
    plain = Backend.from_file(str(TOK / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert g.tokenizer.encode(text) != plain
    assert g.tokenizer.decode(g.tokenizer.encode(text)) == text


# ---------------------------------------------------------------------- gguf's own writer → import
@pytest.mark.parametrize("qname", ["Q8_0", "Q4_0", "Q4_1", "F16", "Q5_0"])
def test_import_reference_gguf(tmp_path, qname, reference_backend):
    cfg = tiny_config()
    model = random_model(cfg, seed=1)
    qtype = getattr(gguf.GGMLQuantizationType, qname)
    path = write_reference_gguf(tmp_path / "ref.gguf", model, cfg, qtype)
    g = gguf_io.read_gguf(path)
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "lm_head.weight"):
        rt = by_name[gguf_io.gguf_name(name)]
        want = gguf.quants.dequantize(rt.data, rt.tensor_type).astype(np.float32)
        heads = cfg.n_head if "q_proj" in name else cfg.n_kv_head if "k_proj" in name else None
        if heads:  # undo the GGML order: the inverse of ggml_rows
            want = want.reshape(heads, want.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(want.shape)
        w = g.weight(name)
        got = w.dequantize() if isinstance(w, gguf_io.QuantWeight) else w.float()
        assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(want))), name  # bit for bit
        if qname in ("Q8_0", "Q4_0"):
            assert isinstance(w, gguf_io.QuantWeight) and w.bits == (8 if qname == "Q8_0" else 4)
            assert w.group_size == 32 and torch.equal(w.scales.view(torch.int16)[0, :2].view(torch.float16),
                                                      w.scales[0, :2])
    ours = gguf_io.load_gguf(path)[0]
    q = ours.model.layers[0].mlp.up_proj
    assert isinstance(q, QuantLinear) == (qname in ("Q8_0", "Q4_0"))
    if qname == "Q4_0":
        assert q.spec.bits == 4 and q.spec.group_size == 32
    ref = hf_from_gguf(path)
    assert (logits(ref, IDS) - logits(ours, IDS)).abs().max() <= 1e-4
    _, what = gguf_io.convert_gguf(path, tmp_path / "ckpt")  # quantized where exact, else a float checkpoint
    assert ("GPTQ" in what) == (qname in ("Q8_0", "Q4_0")), what


def test_q4_1_on_the_integer_grid_stays_int4(tmp_path, reference_backend):
    """Q4_1 (w = d·q + m) fits the integer-zero format exactly when m = −z·d; then it stays an int4 layer."""
    cfg = tiny_config()
    model = random_model(cfg, seed=4)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                k = torch.randint(0, 16, p.shape, generator=gen).float()
                k.view(-1, 32)[:, 0], k.view(-1, 32)[:, 1] = 0, 15  # every block spans the whole grid
                p.copy_(2.0 ** -4 * (k - 3))  # d = 1/16, m = −3/16: exact in fp16
    path = write_reference_gguf(tmp_path / "q41.gguf", model, cfg, gguf.GGMLQuantizationType.Q4_1)
    w = gguf_io.read_gguf(path).weight("model.layers.0.mlp.up_proj.weight")
    assert isinstance(w, gguf_io.QuantWeight) and not w.sym and bool((w.zeros == 3).all())
    assert torch.equal(w.dequantize(), model.model.layers[0].mlp.up_proj.weight)
    ours = gguf_io.load_gguf(path)[0]
    assert isinstance(ours.model.layers[1].self_attn.o_proj, QuantLinear)
    assert (logits(hf_from_gguf(path), IDS) - logits(ours, IDS)).abs().max() <= 1e-4


def test_mixed_types_convert_to_one_gptq_setting(tmp_path, reference_backend):
    """llama-quantize-style mixes: the GPTQ checkpoint keeps the most common setting, the rest exactly as float."""
    from tianying.api import LLM

    cfg = tiny_config()
    Q = gguf.GGMLQuantizationType
    path = write_reference_gguf(tmp_path / "mix.gguf", random_model(cfg, seed=6), cfg, Q.Q4_0,
                                override={"blk.1.ffn_down.weight": Q.Q8_0, "output.weight": Q.Q5_0})
    direct = LLM.load(path)
    assert direct.model.model.layers[1].mlp.down_proj.spec.bits == 8
    with pytest.warns(UserWarning, match="1 layers .* are 8-bit while most are 4-bit"):
        _, what = gguf_io.convert_gguf(path, tmp_path / "ckpt")
    assert what.startswith("int4 group 32")
    back = LLM.load(tmp_path / "ckpt")
    assert isinstance(back.model.model.layers[1].mlp.down_proj, torch.nn.Linear)
    assert (logits(direct.model, IDS) - logits(back.model, IDS)).abs().max() <= 1e-4


def test_q4_0_fast_kernels_agree(tmp_path):
    """Q4_0's scales are often negative (d = max/−8); the int4 kernels must take them as they are."""
    cfg = tiny_config()
    path = write_reference_gguf(tmp_path / "q4.gguf", random_model(cfg, seed=2), cfg, gguf.GGMLQuantizationType.Q4_0)
    ours = gguf_io.load_gguf(path)[0]
    layer = ours.model.layers[0].mlp.gate_proj
    assert (layer.scales < 0).any()
    x = torch.randn(3, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    w = layer.dequantize()
    # within the backend's analytic bound (a sign taken wrongly would be off by the product itself); runs on every
    # backend in `make test` (TIANYING_QUANT_BACKEND=aten rounds activations to bf16)
    from tianying.quantize.linear import product_bound

    bound = product_bound(x, w, layer.path_for(torch.float32), layer.spec)
    assert ((layer(x) - x @ w.t()).abs() <= bound).all()


def test_tied_embeddings(tmp_path, reference_backend):
    cfg = tiny_config()
    model = random_model(cfg, seed=3)
    path = write_reference_gguf(tmp_path / "tied.gguf", model, cfg, gguf.GGMLQuantizationType.F32, tied=True)
    ours, _, _ = gguf_io.load_gguf(path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ref = hf_from_gguf(path)
    assert ref.config.tie_word_embeddings
    assert (logits(ref, IDS) - logits(ours, IDS)).abs().max() <= 1e-4
    out = gguf_io.write_gguf(ours, gguf_io.read_gguf(path).cfg, tmp_path / "again.gguf", TOK)
    assert "output.weight" not in dict(gguf_io.iter_types(out))  # still tied: written once


# ---------------------------------------------------------------------- convert CLI and LLM.load
@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_convert_round_trip(ckpt, tmp_path, quant, capsys, reference_backend):
    from tianying.api import LLM

    path, _, _ = ckpt
    out = tmp_path / f"m-{quant}.gguf"
    assert cli(["convert", str(path), str(out), "--quant", quant]) == 0
    direct = LLM.load(out)
    assert cli(["convert", str(out), str(tmp_path / "imported")]) == 0
    assert "GPTQ" in capsys.readouterr().out
    qc = json.loads((tmp_path / "imported" / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == (8 if quant == "q8_0" else 4) and qc["group_size"] == 32
    back = LLM.load(tmp_path / "imported")
    assert torch.equal(logits(direct.model, IDS), logits(back.model, IDS))  # the same integers, same scales
    assert back.tokenizer.encode(TEXT) == direct.tokenizer.encode(TEXT) == Tokenizer.from_dir(path).encode(TEXT)
    assert direct.template.name == back.template.name == "aquila-v1"
    from tokenizers import Tokenizer as Backend
    from transformers import AutoTokenizer

    want = Tokenizer.from_dir(path).encode(TEXT)
    assert Backend.from_file(str(tmp_path / "imported" / "tokenizer.json")).encode(TEXT).ids == want
    assert AutoTokenizer.from_pretrained(tmp_path / "imported")(TEXT)["input_ids"] == want
    # and back to GGUF: requantizing exactly dequantized blocks finds the same d and q, so no byte changes
    again = gguf_io.export_gguf(tmp_path / "imported", tmp_path / "again.gguf", quant=quant)
    a, b = ({t.name: t for t in gguf.GGUFReader(f).tensors} for f in (out, again))
    assert set(a) == set(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type and np.array_equal(a[name].data, b[name].data), name
    # --dtype: a float checkpoint of the dequantized weights, which transformers loads
    assert cli(["convert", str(out), str(tmp_path / "float"), "--dtype", "fp32"]) == 0
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tmp_path / "float").eval()
    assert (logits(hf, IDS) - logits(direct.model, IDS)).abs().max() <= 1e-4


def test_bad_inputs_give_one_line(tmp_path, ckpt, capsys):
    path, model, cfg = ckpt
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("hello")
    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(other, "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    spm = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(spm, "llama")
    w.add_tokenizer_model("llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    odd = tmp_path / "odd.gguf"
    write_reference_gguf(odd, model, cfg, gguf.GGMLQuantizationType.F32)
    r = gguf.GGUFReader(odd, "r+")
    r.tensors[0].field.parts[4][0] = int(gguf.GGMLQuantizationType.I32)  # an integer "weight" type
    r.data.flush()
    cases = [
        (["convert", str(not_gguf), str(tmp_path / "o1")], "not a GGUF file"),
        (["convert", str(other), str(tmp_path / "o2")], "architecture 'gpt2' is not supported"),
        (["convert", str(odd), str(tmp_path / "o3"), "--dtype", "fp32"], "tensor type I32 is not supported"),
        (["convert", str(spm), str(tmp_path / "o4")], "tokenizer model 'llama' is not supported"),
        (["convert", str(path), str(tmp_path / "x.gguf"), "--quant", "q8_0", "--to", "flagai"], "--quant"),
        (["convert", str(tmp_path / "missing"), str(tmp_path / "x.gguf")], "does not exist"),
    ]
    for argv, msg in cases:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1 and "Traceback" not in err, err
    from tianying.api import LLM
    from tianying.errors import TianyingError

    with pytest.raises(TianyingError, match="not a GGUF"):
        LLM.load(not_gguf)


def test_export_is_atomic(ckpt, tmp_path, monkeypatch):
    """A failure while writing leaves the previous file as it was and no temporary file behind."""
    path, _, _ = ckpt
    out = gguf_io.export_gguf(path, tmp_path / "m.gguf", quant="f16")
    before = out.read_bytes()
    calls = []

    def failing(t, kind, g):
        calls.append(kind)
        if len(calls) > 3:
            raise OSError("disk full")
        return real(t, kind, g)

    real = gguf_io._encode
    monkeypatch.setattr(gguf_io, "_encode", failing)
    with pytest.raises(OSError, match="disk full"):
        gguf_io.export_gguf(path, out, quant="q8_0")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# ---------------------------------------------------------------------- llama.cpp
def llama_cpp_bin(name: str) -> Path:
    root = Path(os.environ.get("LLAMA_CPP_DIR", "/work/llama.cpp"))
    exe = root / "build" / "bin" / name
    if not exe.is_file():
        pytest.skip(f"llama.cpp is not built ({exe} missing; see benchmarks/llama_cpp.py or set LLAMA_CPP_DIR)")
    return exe


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory) -> Path:
    """The bundled (trained) demo model, exported by us as f32 (only where llama.cpp will read it)."""
    llama_cpp_bin("llama-simple")
    return gguf_io.export_gguf(ROOT / "models" / "demo", tmp_path_factory.mktemp("demo") / "demo.gguf")


@pytest.mark.parametrize("quant,prompt", [("f32", "北京是"), ("f32", "def main():\n    "), ("q8_0", "北京是"),
                                          ("q4_0", "The capital of")])
def test_llama_cpp_greedy_matches(demo_gguf, tmp_path, quant, prompt):
    """The demo model, exported by us, decodes greedily in llama.cpp to our tokens: f32 (the same weights), and
    q8_0 / q4_0 read by us as int8 / int4 layers (llama.cpp also rounds activations to 8 bits there, so this
    holds because the demo model's greedy margins are wide: checked for 32 tokens, asserted for 16)."""
    from tianying.api import LLM

    exe = llama_cpp_bin("llama-simple")
    out = demo_gguf if quant == "f32" else gguf_io.export_gguf(ROOT / "models" / "demo", tmp_path / "q.gguf", quant)
    n = 24 if quant == "f32" else 16
    r = subprocess.run([str(exe), "-m", str(out), "-n", str(n), prompt], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-500:]
    for llm in ([LLM.load(ROOT / "models" / "demo")] if quant == "f32" else []) + [LLM.load(out)]:
        tok = llm.tokenizer
        # llama.cpp ends generation at any end-of-generation token: EOS and the CONTROL <|endoftext|>
        params = llm.sampling_params(max_new_tokens=n, stop_token_ids=[tok.eos_id, tok.token_to_id("<|endoftext|>")])
        ids = llm.generate_ids([tok.encode(prompt)], params)[0]
        ours = prompt.encode() + b"".join(tok.token_bytes(i) for i in ids) + b"\n"  # llama-simple ends a line
        assert len(ids) >= 8 and r.stdout == ours, (r.stdout, ours)


def test_llama_quantize_file_imports(demo_gguf, tmp_path, reference_backend):
    """A GGUF quantized by llama.cpp itself (llama-quantize's Q4_0 mix: Q6_K LM head, F16 where 32 does not
    divide the width) imports: Q4_0 as int4 layers, the rest dequantized by gguf; transformers agrees."""
    exe = llama_cpp_bin("llama-quantize")
    f32 = demo_gguf
    q4 = tmp_path / "demo-q4_0.gguf"
    r = subprocess.run([str(exe), str(f32), str(q4), "Q4_0", "2"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-500:]
    types = dict(gguf_io.iter_types(q4))
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == "Q4_0"
    ours, cfg, tok = gguf_io.load_gguf(q4)
    assert isinstance(ours.model.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(ours.lm_head, torch.nn.Linear) and tok.vocab_size == cfg.vocab_size == 16000
    ids = torch.tensor([tok.encode(TEXT)])
    assert (logits(hf_from_gguf(q4), ids) - logits(ours, ids)).abs().max() <= 1e-4


CONVERTER = '''import runpy, sys
root = sys.argv.pop(1)
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base as base
# the two patches the issue names: Aquila's GPT-2 regex is not in the converter's hash table, and a
# GPT-2-style checkpoint has no tokenizer.model for the SentencePiece path tried first
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
def no_spm(self, *a, **k):
    raise FileNotFoundError("no tokenizer.model")
base.TextModel._set_vocab_sentencepiece = no_spm
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_same_bytes_as_llama_cpp_converter(ckpt, tmp_path):
    """llama.cpp's convert_hf_to_gguf.py (patched for the tokenizer only) writes the same tensors, bit for bit,
    and the same vocabulary as our exporter; and its file imports with our tokenizer."""
    import sys

    root = Path(os.environ.get("LLAMA_CPP_DIR", "/work/llama.cpp"))
    if not (root / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"no llama.cpp checkout at {root} (set LLAMA_CPP_DIR)")
    path, _, cfg = ckpt
    script = tmp_path / "convert.py"
    script.write_text(CONVERTER)
    theirs = tmp_path / "theirs.gguf"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(script), str(root), str(path), "--outfile", str(theirs),
                        "--outtype", "q8_0"], capture_output=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-800:]
    ours = gguf_io.export_gguf(path, tmp_path / "ours.gguf", quant="q8_0")
    a, b = gguf.GGUFReader(theirs), gguf.GGUFReader(ours)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name].tensor_type == tb[name].tensor_type and np.array_equal(ta[name].data, tb[name].data), name
    keys = {k for k in a.fields if not k.startswith("GGUF.")} - {"general.name", "general.size_label"}
    assert keys == {k for k in b.fields if not k.startswith(("GGUF.", "tianying."))} - {"general.name"}
    for key in keys:  # every key the converter writes, ours the same (the model's name aside)
        assert a.fields[key].contents() == b.fields[key].contents(), key
    g = gguf_io.read_gguf(theirs)
    assert g.tokenizer.encode(TEXT) == Tokenizer.from_dir(path).encode(TEXT)
    assert g.cfg.to_hf() == cfg.replace(chat_template=None).to_hf()


def test_llama_cpp_padded_aquila_vocab(tmp_path):
    """A 100,008-row model (Aquila's vocabulary size) with a smaller tokenizer and tied embeddings: llama.cpp
    loads the UNUSED "[PADi]" rows and decodes greedily to our tokens."""
    from tianying.api import LLM

    exe = llama_cpp_bin("llama-simple")
    cfg = tiny_config(vocab_size=100008, hidden_size=32, n_head=2, n_kv_head=1, intermediate_size=64,
                      bos_token_id=15998, eos_token_id=15999)
    model = random_model(cfg, seed=5)
    with torch.no_grad():
        model.model.embed_tokens.weight[16000:] = 0  # padding rows: logit 0, below the real tokens' maximum
    model.lm_head.weight = model.model.embed_tokens.weight
    demo_tok = ROOT / "tianying" / "assets" / "demo-tokenizer"
    out = gguf_io.write_gguf(model, cfg, tmp_path / "padded.gguf", demo_tok)
    field = gguf.GGUFReader(out).fields
    assert len(field["tokenizer.ggml.tokens"].contents()) == 100008
    assert "output.weight" not in dict(gguf_io.iter_types(out))
    prompt, n = "北京是中国的首都", 16
    r = subprocess.run([str(exe), "-m", str(out), "-n", str(n), prompt], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-500:]
    llm = LLM.load(out)
    tok = llm.tokenizer
    params = llm.sampling_params(max_new_tokens=n, stop_token_ids=[tok.eos_id, tok.token_to_id("<|endoftext|>")])
    ids = llm.generate_ids([tok.encode(prompt)], params)[0]
    assert len(ids) >= 4 and r.stdout == prompt.encode() + b"".join(tok.token_bytes(i) for i in ids) + b"\n"
