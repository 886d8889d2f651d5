"""tianying.weights and what it lets users bring: safe paths, atomic writes, one config reader with one-line
errors, any LLaMA-family HF checkpoint (vs transformers), AWQ (vs an independent dequantizer), PEFT adapters
with a relative base, FlagAI's special_tokens_map form, NaN/Inf checks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tianying.checkpoint import load_model, save_hf
from tianying.config import Config, ConfigError
from tianying.errors import TianyingError
from tianying.model import build_model
from tianying.weights import CheckpointError, atomic_dir, iter_tensors, load_config, weight_files

BILINGUAL = "Hello world, 你好世界! The quick brown fox 北京欢迎你 jumps 123."


def _tiny(tmp_path: Path, name: str = "ckpt", **save) -> tuple[Path, torch.nn.Module, Config]:
    cfg = Config.from_name("test-gqa")
    model = build_model(cfg, seed=0)
    return save_hf(model, cfg, tmp_path / name, **save), model, cfg


def _sharded(tmp_path: Path) -> Path:
    return _tiny(tmp_path, "sharded", max_shard_size="40KB")[0]


# ---------------------------------------------------------------------------------------------- paths
@pytest.mark.parametrize("bad", ["../../outside.safetensors", "ABSOLUTE", "sub/../../x.safetensors"])
def test_shard_index_escaping_the_directory_is_refused(tmp_path, bad):
    ckpt = _sharded(tmp_path)
    index = ckpt / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    first = next(iter(raw["weight_map"]))
    shard = ckpt / raw["weight_map"][first]
    outside = tmp_path.parent / "outside.safetensors"  # exists, so "missing" cannot be why it is refused
    outside.write_bytes(shard.read_bytes())
    raw["weight_map"][first] = str(outside) if bad == "ABSOLUTE" else bad
    index.write_text(json.dumps(raw))
    for load in (lambda: load_model(ckpt), lambda: weight_files(ckpt)):
        with pytest.raises(CheckpointError, match="refusing weight file") as e:
            load()
        assert "\n" not in str(e.value)
    from tianying.quantize.offload import load_with_memory_limit

    with pytest.raises(CheckpointError, match="refusing weight file"):
        load_with_memory_limit(ckpt, "1GiB", verbose=False)


def test_symlink_out_of_the_directory_is_refused_but_hub_cache_blobs_are_not(tmp_path):
    ckpt, model, cfg = _tiny(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (ckpt / "model.safetensors").rename(elsewhere / "model.safetensors")
    (ckpt / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    with pytest.raises(CheckpointError, match="link to .* outside the checkpoint directory"):
        load_model(ckpt)

    # the Hugging Face hub cache: snapshots/<rev>/file → ../../blobs/<sha> is the same repository
    repo = tmp_path / "models--x--y"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in ckpt.iterdir():
        target = blobs / f"sha-{f.name}"
        target.write_bytes(f.resolve().read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(target, snap))
    loaded, _ = load_model(snap)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_gguf_files_are_read_through_gguf_io(tmp_path):
    """`.gguf` files are found and read by the one reader like any weight file: HF names, the same tensors."""
    from tianying.gguf_io import write_gguf
    from tianying.tokenizer import Tokenizer

    tok_dir = Path(__file__).parent / "data" / "tokenizer"
    cfg = Config.from_name("test-gqa").replace(vocab_size=Tokenizer.from_dir(tok_dir).vocab_size)
    model = build_model(cfg, seed=0)
    f = tmp_path / "model.gguf"
    write_gguf(model, cfg, f, tok_dir)
    assert weight_files(tmp_path) == [f]
    got = dict(iter_tensors(f))
    want = model.state_dict()
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name].float(), t.float()), name


# ---------------------------------------------------------------------------------------------- atomic writes
def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_dir_keeps_the_old_version_until_the_new_is_complete(tmp_path, monkeypatch, exchange):
    import tianying.weights as w

    if not exchange:  # platforms without renameat2: rename the old version aside, then the new one in
        monkeypatch.setattr(w, "_exchange", lambda a, b: False)
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("old")
        (tmp / "a.bin").write_text("old-a")
    before = _snapshot(out)

    with pytest.raises(RuntimeError, match="midway"):
        with atomic_dir(out) as tmp:
            (tmp / "config.json").write_text("new")
            assert _snapshot(out) == before  # nothing of the new version is visible while it is written
            raise RuntimeError("crash midway")
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind

    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("new")
    assert _snapshot(out) == {"config.json": b"new"}  # replaced whole: the old a.bin is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_adapter_save_keeps_the_old_adapter(tmp_path, monkeypatch):
    """lora.save_adapter used to delete the old directory before renaming the new one into place."""
    import tianying.weights as w
    from tianying.lora import LoRAConfig, add_lora, save_adapter

    cfg = Config.from_name("test-mha")
    model = build_model(cfg, seed=0)
    lcfg = LoRAConfig(r=2, alpha=4)
    add_lora(model, lcfg, seed=0)
    out = save_adapter(model, lcfg, tmp_path / "adapter")
    before = _snapshot(out)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(w, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, lcfg, out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# ---------------------------------------------------------------------------------------------- config reader
def _config_dir(tmp_path: Path, text: str) -> Path:
    d = tmp_path / "c"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(text)
    return d


def test_invalid_config_json_is_one_line_with_the_position(tmp_path):
    good = json.dumps(Config.from_name("test-mha").to_hf(), indent=2)
    broken = good.replace('"hidden_size": 64,', '"hidden_size": 64')  # a missing comma on line L
    line = next(i for i, s in enumerate(broken.splitlines(), 1) if '"hidden_size": 64' in s) + 1
    d = _config_dir(tmp_path, broken)
    with pytest.raises(ConfigError) as e:
        load_config(d)
    msg = str(e.value)
    assert "\n" not in msg and str(d / "config.json") in msg and f"line {line} column" in msg


@pytest.mark.parametrize("change, field", [
    ({"hidden_size": "256"}, "'hidden_size' must be an integer"),
    ({"num_hidden_layers": -2}, "num_hidden_layers must be a positive integer"),
    ({"num_attention_heads": 3}, "hidden_size 64 is not divisible by num_attention_heads 3"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number"),
    ({"rope_theta": "1e4"}, "'rope_theta' must be a number"),
    ({"tie_word_embeddings": "yes"}, "'tie_word_embeddings' must be true or false"),
    ({"eos_token_id": "2"}, "'eos_token_id' must be an integer token id"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
])
def test_config_type_and_range_errors_name_the_field(tmp_path, change, field):
    d = _config_dir(tmp_path, json.dumps({**Config.from_name("test-mha").to_hf(), **change}))
    with pytest.raises(ConfigError) as e:
        load_config(d)
    assert field in str(e.value) and str(d / "config.json") in str(e.value) and "\n" not in str(e.value)


def test_cli_prints_config_errors_as_one_line(tmp_path, capsys):
    from tianying.cli import main

    d = _config_dir(tmp_path, json.dumps({**Config.from_name("test-mha").to_hf(), "hidden_size": "256"}))
    assert main(["generate", str(d), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'hidden_size' must be an integer" in err


def test_one_config_reader(tmp_path):
    """Config.from_hf(path) and load_config agree (they used to differ on rope_parameters and native fields);
    generation_config.json's BOS/EOS win over config.json's, as in transformers' generate."""
    raw = {**Config.from_name("test-mha").to_hf(), "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    raw.pop("rope_theta")
    d = _config_dir(tmp_path, json.dumps(raw))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 7, "eos_token_id": [9, 11]}))
    a, b = load_config(d), Config.from_hf(d)
    assert a == b
    assert (a.rope_theta, a.rope_scaling, a.bos_token_id, a.eos_token_id) == (5e5, None, 7, 9)
    assert Config.from_hf({**raw, "pad_token_id": -1}).pad_token_id is None  # early LLaMA conversions: "none"


# ---------------------------------------------------------------------------------------------- check_weights
def test_check_weights_names_nan_and_inf_tensors(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from tianying.api import LLM
    from tianying.cli import main

    ckpt, _, _ = _tiny(tmp_path)
    sd = load_file(ckpt / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 4] = math.nan
    sd["model.norm.weight"][0] = math.inf
    save_file(sd, ckpt / "model.safetensors")
    load_model(ckpt)  # not checked unless asked
    with pytest.raises(CheckpointError, match=r"NaN or Inf in model\.layers\.1\.mlp\.up_proj\.weight, "
                                              r"model\.norm\.weight$"):
        load_model(ckpt, check_weights=True)
    with pytest.raises(CheckpointError, match="up_proj"):
        LLM.load(ckpt, memory_limit="1GiB", check_weights=True)  # streamed: checked in the files
    capsys.readouterr()
    rc = main(["generate", str(ckpt), "--prompt", "hi", "--check-weights", "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "model.norm.weight" in err


# ---------------------------------------------------------------------------------------------- any LLaMA
def _hf_tokenizer(path: Path):
    """A tokenizer.json-only tokenizer as transformers saves it: a `tokenizers` byte-level BPE trained here,
    its special tokens inside the base vocabulary at ids 0..3 (not Aquila's 8 appended ones)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [BILINGUAL, "北京是中国的首都。", "machine learning and 深度学习", "hello hello world 世界"] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 pad_token="<pad>")
    hf.save_pretrained(path)
    assert not (path / "vocab.json").exists() and (path / "tokenizer.json").exists()
    return hf


def _hf_llama(path: Path, vocab: int):
    from conftest import randomize_
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,  # 4·32 ≠ 64
                     tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=128,
                     bos_token_id=1, eos_token_id=2, pad_token_id=3, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(hc)
    randomize_(model)
    model = model.float().eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(path)
    return model


def test_any_llama_checkpoint_matches_transformers(tmp_path):
    """Tied embeddings, head_dim ≠ hidden/heads, rope_theta 5e5, a tokenizer.json-only tokenizer with its own
    specials at ids 0..3: tianying's logits ≤ 1e-4 from transformers', identical token ids; and what tianying
    writes back transformers loads to the same logits."""
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tianying.api import LLM

    d = tmp_path / "llama"
    hf_tok = _hf_tokenizer(d)
    ref = _hf_llama(d, len(hf_tok))
    with safe_open(d / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # transformers writes a tied model without the head

    llm = LLM.load(d)
    assert (llm.config.head_dim, llm.config.rope_theta, llm.config.tie_word_embeddings) == (32, 500000.0, True)
    assert llm.model.lm_head.weight is llm.model.model.embed_tokens.weight
    assert llm.tokenizer.vocab_size == len(hf_tok)
    assert (llm.tokenizer.bos_id, llm.tokenizer.eos_id, llm.tokenizer.pad_id, llm.tokenizer.unk_id) == (1, 2, 3, 0)
    assert (llm.config.bos_token_id, llm.config.eos_token_id) == (1, 2)
    ids = llm.tokenizer.encode(BILINGUAL)
    assert ids == hf_tok.encode(BILINGUAL, add_special_tokens=False)
    assert llm.tokenizer.decode(ids) == BILINGUAL
    assert llm.tokenizer.encode("<s>你好</s>") == hf_tok.encode("<s>你好</s>", add_special_tokens=False)

    x = torch.tensor([ids])
    with torch.no_grad():
        want = ref(input_ids=x).logits
        for model in (llm.model, load_model(d)[0]):
            assert (model(x) - want).abs().max().item() <= 1e-4

    # greedy generation end to end (engine, KV cache, stop on EOS) gives transformers' tokens
    prompt = "北京 hello"
    p_ids = llm.tokenizer.encode(prompt)
    with torch.no_grad():
        ref_out = ref.generate(torch.tensor([p_ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                               pad_token_id=3)[0, len(p_ids):].tolist()
    ours = llm.generate_ids([p_ids], llm.sampling_params(max_new_tokens=8, stop_token_ids=[]))[0]
    assert ours == ref_out

    # and back: what we write is a tied checkpoint transformers reads the same way
    out = save_hf(llm.model, llm.config, tmp_path / "ours", tokenizer_dir=d)
    raw = json.loads((out / "config.json").read_text())
    assert raw["tie_word_embeddings"] is True and raw["head_dim"] == 32
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    again = LlamaForCausalLM.from_pretrained(out).float().eval()
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert (again(input_ids=x).logits - want).abs().max().item() <= 1e-4
    assert AutoTokenizer.from_pretrained(out).encode(BILINGUAL, add_special_tokens=False) == ids


def test_tied_model_trains_one_table(tmp_path):
    cfg = Config.from_name("test-mha", tie_word_embeddings=True)
    model = build_model(cfg, seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ckpt = save_hf(model, cfg, tmp_path / "tied")
    loaded, lcfg = load_model(ckpt)
    assert lcfg.tie_word_embeddings and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert sum(p.numel() for p in loaded.parameters()) == cfg.n_params


def test_tied_checkpoints_through_every_loader_and_writer(tmp_path):
    """FlagAI (no tied layout: the head gets a copy), GPTQ (head not quantized: still tied) and the memory-limited
    streamer all keep a tied model's logits."""
    from tianying.checkpoint import convert
    from tianying.quantize import quantize_model
    from tianying.quantize.format import load_quantized, save_quantized
    from tianying.quantize.offload import load_with_memory_limit

    cfg = Config.from_name("test-mha", tie_word_embeddings=True, n_layer=4)
    model = build_model(cfg, seed=0).eval()
    hf = save_hf(model, cfg, tmp_path / "hf")
    x = torch.arange(11)[None]
    with torch.no_grad():
        want = model(x)
        flagai = convert(hf, tmp_path / "flagai", to="flagai")
        loaded, fcfg = load_model(flagai)
        assert not fcfg.tie_word_embeddings and torch.equal(loaded(x), want)
        with pytest.warns(UserWarning, match="stream from disk"):  # 128 KiB table + 4 × 196 KiB layers
            streamed = load_with_memory_limit(hf, 690_000, verbose=False)[0]
        assert streamed.memory_plan.streamed and torch.equal(streamed(x), want)
        assert streamed.lm_head.weight is streamed.model.embed_tokens.weight

        quantize_model(model, bits=8)
        want_q = model(x)
        q = load_quantized(save_quantized(model, cfg, tmp_path / "gptq"))[0]
        assert q.lm_head.weight is q.model.embed_tokens.weight
        assert torch.equal(q(x), want_q)


def test_sentencepiece_style_tokenizer_json(tmp_path):
    """LLaMA-2 / Mistral-style tokenizer.json (▁ word marks, <0xHH> byte fallback, Strip decoder) as transformers
    saves it: the same ids, decode, and a stream decoder whose pieces add up to decode."""
    from tokenizers import AddedToken, decoders, models, normalizers, trainers
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    from tianying.tokenizer import Tokenizer

    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base = Backend(models.BPE())
    base.normalizer = norm
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    base.train_from_iterator(["hello world, the world says hello"] * 30, trainer=trainer)
    spec = json.loads(base.to_str())["model"]
    vocab = dict(spec["vocab"])
    for b in range(256):  # Chinese is not in the trained alphabet: it falls back to these byte tokens
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.normalizer = norm
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(tmp_path)

    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, None, len(hf))
    for text in (BILINGUAL, "hello 北京 world, 你好!", "<s>hello</s> 世界"):
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == hf.decode(ids)
        stream = tok.stream_decoder()
        assert "".join(stream.add(i) for i in ids) + stream.flush() == tok.decode(ids)


def test_aquila_repairs_only_for_aquila_files(tmp_path):
    """A base-vocab-only Aquila tokenizer still gets the 8 specials appended (with a warning); a non-Aquila one
    whose specials sit at 0..3 does not."""
    from tianying.tokenizer import AQUILA_SPECIALS, Tokenizer

    d = tmp_path / "tok"
    _hf_tokenizer(d)
    with_specials = Tokenizer.from_dir(d)
    assert with_specials.vocab_size == with_specials.base_vocab_size  # nothing appended
    assert not set(AQUILA_SPECIALS[:-1]) & set(with_specials.get_vocab())  # ("</s>" is also LLaMA's EOS)
    assert with_specials.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}

    demo = Path(__file__).parents[1] / "tianying" / "assets" / "demo-tokenizer"
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (bare / name).write_bytes((demo / name).read_bytes())
    with pytest.warns(UserWarning, match="appending the 8 standard Aquila special tokens"):
        aquila = Tokenizer.from_dir(bare)
    assert aquila.vocab_size == aquila.base_vocab_size + 8
    assert (aquila.bos_id, aquila.eos_id) == (aquila.base_vocab_size + 6, aquila.base_vocab_size + 7)


# ---------------------------------------------------------------------------------------------- AWQ
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _awq_pack(q: torch.Tensor) -> torch.Tensor:
    """Reference packer, written from AutoAWQ's GEMM pack(): for each word (row r, column block c),
    word |= q[r, 8c + AWQ_ORDER[i]] << 4i — with Python integers, independent of tianying's unpacker."""
    R, C = q.shape
    out = torch.empty(R, C // 8, dtype=torch.int32)
    for r in range(R):
        for c in range(C // 8):
            word = 0
            for i in range(8):
                word |= int(q[r, 8 * c + AWQ_ORDER[i]]) << (4 * i)
            out[r, c] = word - (1 << 32) if word >= 1 << 31 else word
    return out


def test_awq_checkpoint_loads_as_int4(tmp_path):
    """AutoAWQ GEMM tensors, hand-packed: the loaded QuantLinears dequantize to exactly (q − z)·s, and the model
    computes what a float model with those weights computes."""
    from safetensors.torch import save_file

    from tianying.api import LLM
    from tianying.quantize import QuantLinear, quantized_layers

    # hidden 64, ffn 176: K = 64 or 176, group 16 divides both; the vocabulary of tests/data/tokenizer
    cfg = Config.from_name("test-mha", vocab_size=3008)
    g = 16
    ref = build_model(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    state = {k: v for k, v in ref.state_dict().items()}
    linears = [n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for name in linears:
        N, K = state[f"{name}.weight"].shape
        q = torch.randint(0, 16, (K, N), generator=gen)
        z = torch.randint(0, 16, (K // g, N), generator=gen)
        s = (torch.rand(K // g, N, generator=gen) * 0.02 + 0.005).half()
        w = torch.empty(N, K)  # w[n, k] = (q[k, n] − z[k // g, n]) · s[k // g, n]
        for k in range(K):
            w[:, k] = (q[k] - z[k // g]).float() * s[k // g].float()
        del state[f"{name}.weight"]
        state.update({f"{name}.qweight": _awq_pack(q), f"{name}.qzeros": _awq_pack(z), f"{name}.scales": s})
        ref.get_submodule(name).weight.data.copy_(w)
    d = tmp_path / "awq"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, d / "model.safetensors")
    hf = cfg.to_hf()
    hf["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": g, "version": "gemm",
                                 "zero_point": True}
    (d / "config.json").write_text(json.dumps(hf))
    for f in (Path(__file__).parent / "data" / "tokenizer").iterdir():
        (d / f.name).write_bytes(f.read_bytes())

    from tianying.quantize.format import load_quantized

    model, _ = load_quantized(d)
    layers = quantized_layers(model)
    assert sorted(layers) == sorted(linears)
    for name, m in layers.items():
        assert isinstance(m, QuantLinear) and m.spec.bits == 4 and m.spec.group_size == g
        assert torch.equal(m.dequantize(), ref.get_submodule(name).weight.detach())
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=gen)
    with torch.no_grad():
        want = ref(ids)
        assert (model(ids) - want).abs().max().item() <= 1e-4
        assert (LLM.load(d).model(ids) - want).abs().max().item() <= 1e-4

    hf["quantization_config"]["version"] = "gemv"
    (d / "config.json").write_text(json.dumps(hf))
    with pytest.raises(TianyingError, match="4-bit GEMM only"):
        load_quantized(d)


# ---------------------------------------------------------------------------------------------- PEFT, FlagAI
def test_peft_adapter_with_a_relative_base_path(tmp_path, monkeypatch):
    from tianying.lora import LoRAConfig, add_lora, apply_adapter, save_adapter

    monkeypatch.chdir(tmp_path)
    cfg = Config.from_name("test-mha")
    model = build_model(cfg, seed=0)
    lcfg = LoRAConfig(r=2, alpha=4)
    add_lora(model, lcfg, seed=1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(generator=torch.Generator().manual_seed(2))
    Path("models/base").mkdir(parents=True)
    a = save_adapter(model, lcfg, "adapters/a", base_model="models/base")  # exists: stored absolute
    assert json.loads((a / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((tmp_path / "models" / "base").resolve())
    b = save_adapter(model, lcfg, "adapters/b", base_model="../gone/base")  # not here: as given, not required
    assert json.loads((b / "adapter_config.json").read_text())["base_model_name_or_path"] == "../gone/base"
    x = torch.arange(9)[None]
    with torch.no_grad():
        want = model.eval()(x)
        fresh = build_model(cfg, seed=0)
        apply_adapter(fresh, b)
        assert torch.equal(fresh.eval()(x), want)


def test_special_tokens_map_in_the_form_flagai_reads(tmp_path):
    """FlagAI 1.8.4 reads special_tokens_map.json entries as {"content": ...}; we write that, read both."""
    from tianying.tokenizer import Tokenizer

    demo = Path(__file__).parents[1] / "tianying" / "assets" / "demo-tokenizer"
    tok = Tokenizer.from_dir(demo)
    tok.save(tmp_path / "t")
    smap = json.loads((tmp_path / "t" / "special_tokens_map.json").read_text())
    assert {k: v["content"] for k, v in smap.items()} == {"bos_token": "[CLS]", "eos_token": "</s>",
                                                          "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    assert all(v.keys() == {"content", "lstrip", "normalized", "rstrip", "single_word"} for v in smap.values())
    plain = tmp_path / "plain"
    tok.save(plain)
    (plain / "special_tokens_map.json").write_text(json.dumps({k: v["content"] for k, v in smap.items()}))
    for d in (tmp_path / "t", plain):
        again = Tokenizer.from_dir(d)
        assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
