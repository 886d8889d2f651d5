"""GGUF in and out: llama.cpp's file format for llama-architecture models, read through the `gguf` package.

Import (`read_gguf`, `load_gguf`, `convert_gguf`): a GGUF whose `general.architecture` is "llama" (Aquila
GGUFs made by llama.cpp's convert_hf_to_gguf.py are: Aquila is "llama" there) becomes a tianying model, a
tokenizer and a Config.
- config: `llama.*` keys (context length, widths, heads, rope base/dimension/scaling, RMS eps, vocab size);
  no `output.weight` means tied embeddings: the LM head is the embedding table.
- tensors: F32/F16/BF16 as they are. Q8_0 and Q4_0 map exactly onto tianying's canonical quantized layout
  (tianying/quantize/linear.py: ŵ = s·(q − z), per-group fp16 scales, integer zeros):
    Q8_0  block of 32: fp16 d, int8 x      w = d·x       → int8, group 32, s = d, q = x + 128, z = 128
    Q4_0  block of 32: fp16 d, 16 bytes    w = d·(q − 8) → int4, group 32, s = d, z = 8 (d may be negative)
          (element j of a block is the low nibble of byte j, element j + 16 the high nibble)
    Q4_1  fp16 d, fp16 m, 16 bytes         w = d·q + m   → int4 with z = −m/d only where that is an integer
          for every block of the matrix (it rarely is: the zero is not on the integer grid); otherwise the
          matrix is dequantized, exactly, to fp32
  Both sides compute the product in fp32 from the same fp16 d, so the dequantized values are bit-identical to
  `gguf.quants.dequantize` (tests/test_gguf.py checks it). Every other type is dequantized by `gguf`. The
  embedding table is always a float tensor (an `nn.Embedding`).
- q/k rows: GGML pairs rotary dimensions (2j, 2j+1) like Meta's original checkpoints; they are permuted back
  to the rotate-half layout (`rope.interleaved_to_half`). Quantized rows move whole, so this is lossless.
- tokenizer: gpt2-style byte-level BPE (`tokenizer.ggml.model` "gpt2": tokens, merges, token types, special
  ids, `tokenizer.ggml.pre`) → a `tokenizers` BPE that encodes like the original; trailing UNUSED tokens
  (the "[PADi]" rows convert_hf_to_gguf.py pads the vocabulary with) are not part of it; CONTROL and
  USER_DEFINED tokens become added tokens (special / not). `tokenizer.chat_template` (Jinja) is kept.

Export (`write_gguf`, `export_gguf`): a file llama.cpp loads unpatched: arch "llama", q/k permuted to GGML's
order, tokenizer model "gpt2" with pre-tokenizer "gpt-2" (llama.cpp's name for GPT-2's regex, which Aquila
uses), the whole vocabulary with added tokens typed CONTROL (special) or USER_DEFINED, padded with UNUSED
"[PADi]" tokens up to the model's vocab size as convert_hf_to_gguf.py does, BOS/EOS/PAD ids, the chat template
as Jinja, and tied embeddings written as a single `token_embd.weight`. `--quant`: f32, f16, bf16, q8_0, q4_0
(1-D tensors stay F32; a matrix whose input width is not a multiple of 32 falls back to F16, as
convert_hf_to_gguf.py does; q4_0 quantizes every matrix, LM head and embeddings included, like
`llama-quantize --pure`). Quantization is `gguf.quants.quantize`, bit-exact with ggml's reference C code.
The file is written to a temporary sibling, fsynced and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tianying.config import Config, ConfigError
from tianying.errors import TianyingError
from tianying.rope import half_to_interleaved, interleaved_to_half


class GGUFError(TianyingError):
    """A GGUF file that tianying cannot read or write (not a GGUF, unsupported architecture/tensor type...)."""


GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
GGUF_MAGIC = b"GGUF"
BLOCK = 32  # elements per Q8_0 / Q4_0 / Q4_1 block

# llama.cpp's tokenizer.ggml.pre names for the regexes we can reproduce in `tokenizers`. GPT-2's is the
# ByteLevel pre-tokenizer's own regex; the others are a Split in front of a regex-free ByteLevel.
_GPT2_PRE = ("gpt-2", "phi-2", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "mpt", "olmo", "jais")
_SPLIT_PRE = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
             r"\s+(?!\S)|\s+",
}
_SPLIT_PRE.update({"llama3": _SPLIT_PRE["llama-bpe"], "llama-v3": _SPLIT_PRE["llama-bpe"]})
# GPT-2's regex after splitting off every digit (llama.cpp: LLAMA_VOCAB_PRE_TYPE_SMOLLM and its kin)
_DIGIT_PRE = ("smollm", "starcoder", "refact")

_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}
_TOP_R = {v: k for k, v in _TOP.items()}
_LAYER_R = {v: k for k, v in _LAYER.items()}


def _gguf():  # noqa: ANN202 - the gguf module
    try:
        import gguf
    except ImportError as e:  # a dependency; still one line if it is missing
        raise GGUFError(f"the gguf package is needed for GGUF files ({e}); pip install gguf") from None
    return gguf


def is_gguf(path: str | Path) -> bool:
    """Whether `path` is a file starting with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def gguf_name(hf_name: str) -> str | None:
    """HF parameter name → GGUF tensor name (None if it has none)."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    return None


def hf_name(gguf_tensor: str) -> str | None:
    if gguf_tensor in _TOP_R:
        return _TOP_R[gguf_tensor]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_tensor)
    if m and m.group(2) in _LAYER_R:
        return f"model.layers.{m.group(1)}.{_LAYER_R[m.group(2)]}.weight"
    return None


def _rotary_heads(name: str, cfg: Config) -> int | None:
    """Heads of a q/k projection (whose rows GGML interleaves), else None."""
    if name.endswith("self_attn.q_proj.weight"):
        return cfg.n_head
    if name.endswith("self_attn.k_proj.weight"):
        return cfg.n_kv_head
    return None


# ====================================================================== reading
@dataclass
class QuantWeight:
    """A GGUF matrix in tianying's canonical integer form: q uint8 [N, K], scales fp16 / zeros int16 [G, N]."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int = BLOCK
    sym: bool = True

    def dequantize(self) -> torch.Tensor:
        from tianying.quantize.linear import dequantize

        return dequantize(self.q, self.scales, self.zeros)

    def layer(self, dtype: torch.dtype = torch.float32):  # noqa: ANN201 - QuantLinear
        from tianying.quantize.linear import QuantLinear, QuantSpec

        return QuantLinear.from_int(self.q, self.scales, self.zeros, QuantSpec(self.bits, self.group_size, self.sym),
                                    dtype=dtype)


@dataclass
class GGUFModel:
    """What a GGUF file holds, tensors read on demand (`weight(name)`): see `read_gguf`."""

    path: Path
    cfg: Config
    tokenizer: Any  # tianying.tokenizer.Tokenizer
    chat_template: str | None  # the file's Jinja chat template
    add_bos: bool | None  # tokenizer.ggml.add_bos_token
    tied: bool  # no output.weight: the LM head is the embedding table
    pre: str = "gpt-2"  # tokenizer.ggml.pre
    types: dict[str, str] = field(default_factory=dict)  # HF name → GGML type name
    _tensors: dict = field(default_factory=dict, repr=False)  # HF name → gguf ReaderTensor

    def names(self) -> list[str]:
        return list(self._tensors)

    def weight(self, name: str, keep_quantized: bool = True) -> torch.Tensor | QuantWeight:
        """The HF-named tensor: float (a fresh copy, q/k in rotate-half order), or a `QuantWeight` for
        Q8_0/Q4_0 (and exactly representable Q4_1) matrices when `keep_quantized`."""
        rt = self._tensors[name]
        heads = _rotary_heads(name, self.cfg)
        w = _decode(rt, keep_quantized and name != "model.embed_tokens.weight")
        if heads is not None:
            if isinstance(w, QuantWeight):
                w.q = interleaved_to_half(w.q, heads)
                w.scales = interleaved_to_half(w.scales.t().contiguous(), heads).t().contiguous()
                w.zeros = interleaved_to_half(w.zeros.t().contiguous(), heads).t().contiguous()
            else:
                w = interleaved_to_half(w, heads)
        return w


def _field(reader, key: str, default: Any = None) -> Any:  # noqa: ANN001 - GGUFReader
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:  # a malformed field
        raise GGUFError(f"cannot read GGUF metadata {key} ({type(e).__name__}: {e})") from None


def _one(value: Any, key: str) -> Any:
    """Per-layer arrays (some architectures vary heads by layer) must be uniform here."""
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise GGUFError(f"{key} varies across layers ({value[:4]}...), which a LLaMA model cannot express")
        return value[0]
    return value


def _open(path: Path):  # noqa: ANN202 - GGUFReader
    if not path.exists():
        raise GGUFError(f"{path} does not exist")
    if not path.is_file():
        raise GGUFError(f"{path} is not a GGUF file (it is a directory)")
    if not is_gguf(path):
        raise GGUFError(f"{path} is not a GGUF file (no GGUF magic)")
    gguf = _gguf()
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # truncated header, bad counts, duplicated tensors...
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def read_gguf(path: str | Path) -> GGUFModel:
    """Config, tokenizer and chat template of a llama-architecture GGUF; tensors stay in the mapped file."""
    path = Path(path)
    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (only 'llama', which includes Aquila)")
    tensors: dict[str, Any] = {}
    for rt in reader.tensors:
        name = hf_name(rt.name)
        if name is None:
            raise GGUFError(f"{path}: tensor {rt.name!r} has no place in a LLaMA model (unsupported variant)")
        tensors[name] = rt
    if "model.embed_tokens.weight" not in tensors:
        raise GGUFError(f"{path}: no token_embd.weight")
    emb_rows = int(tensors["model.embed_tokens.weight"].shape[1])
    tokenizer, meta = _read_tokenizer(reader, path)
    tied = "lm_head.weight" not in tensors
    cfg = _read_config(reader, path, emb_rows, tied)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise GGUFError(f"{path}: {tokenizer.vocab_size} tokens but only {cfg.vocab_size} embedding rows")
    from tianying.checkpoint import expected_shapes

    want = expected_shapes(cfg)
    for name, rt in tensors.items():
        if name not in want:
            raise GGUFError(f"{path}: tensor {rt.name} is beyond llama.block_count = {cfg.n_layer}")
        shape = tuple(int(d) for d in reversed(rt.shape.tolist()))
        if len(want[name]) == 1:
            shape = (int(np.prod(shape)),)
        if shape != want[name]:
            raise GGUFError(f"{path}: {rt.name} has shape {shape}, the metadata says {want[name]}")
    missing = [gguf_name(n) for n in want if n not in tensors and n != "lm_head.weight"]
    if missing:
        raise GGUFError(f"{path}: lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = meta["bos"], meta["eos"], meta["pad"]
    types = {n: rt.tensor_type.name for n, rt in tensors.items()}
    return GGUFModel(path, cfg, tokenizer, meta["chat_template"], meta["add_bos"], tied, meta["pre"], types, tensors)


def _read_config(reader, path: Path, emb_rows: int, tied: bool) -> Config:  # noqa: ANN001
    def need(key: str) -> Any:
        v = _field(reader, f"llama.{key}")
        if v is None:
            raise GGUFError(f"{path}: metadata lacks llama.{key}")
        return _one(v, f"llama.{key}")

    hidden, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    n_kv = int(_one(_field(reader, "llama.attention.head_count_kv", n_head), "llama.attention.head_count_kv"))
    fields = Config.__dataclass_fields__  # head_dim / tie_word_embeddings, where the Config has them as fields
    head_dim = hidden // n_head if n_head else 0
    key_length = _field(reader, "llama.attention.key_length")
    extra: dict[str, Any] = {}
    if key_length is not None and "head_dim" in fields:
        head_dim = extra["head_dim"] = int(_one(key_length, "llama.attention.key_length"))
    if "tie_word_embeddings" in fields:
        extra["tie_word_embeddings"] = tied
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        v = _field(reader, f"llama.{key}")
        if v is not None and int(_one(v, key)) != head_dim:
            # the model rotates whole heads of hidden/heads (or head_dim) dimensions: partial rotary does not fit
            raise GGUFError(f"{path}: llama.{key} = {int(_one(v, key))} differs from the head size {head_dim} "
                            "(not supported)")
    vocab = _field(reader, "llama.vocab_size")
    vocab = int(vocab) if vocab is not None else emb_rows
    rope_scaling = None
    kind = _field(reader, "llama.rope.scaling.type")
    factor = _field(reader, "llama.rope.scaling.factor")
    if factor is None and _field(reader, "llama.rope.scale_linear") is not None:  # the old spelling
        kind, factor = "linear", _field(reader, "llama.rope.scale_linear")
    if kind not in (None, "none") and factor is not None and float(factor) != 1.0:
        if kind not in ("linear", "yarn"):
            raise GGUFError(f"{path}: rope scaling {kind!r} is not supported (linear, yarn)")
        rope_scaling = {"type": kind, "factor": float(factor)}
        orig = _field(reader, "llama.rope.scaling.original_context_length")
        if kind == "yarn" and orig is not None:
            rope_scaling["original_max_position_embeddings"] = int(orig)
    try:
        return Config(
            name=str(_field(reader, "tianying.config_name", "custom")),
            vocab_size=vocab,
            hidden_size=hidden,
            n_layer=int(need("block_count")),
            n_head=n_head,
            n_kv_head=n_kv,
            intermediate_size=int(need("feed_forward_length")),
            max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
            rms_norm_eps=_f32(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_f32(_field(reader, "llama.rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            chat_template=_field(reader, "tianying.chat_template"),
            **extra,
        )
    except ConfigError as e:
        raise GGUFError(f"{path}: {e}") from None


def _f32(x: float) -> float:
    """GGUF stores these as float32: 1e-5 comes back as 9.99999974738e-06; the shortest decimal that rounds
    to the same float32 is what the writer meant."""
    x32 = np.float32(x)
    for digits in range(6, 10):
        y = float(f"{float(x32):.{digits}g}")
        if np.float32(y) == x32:
            return y
    return float(x32)


def _read_tokenizer(reader, path: Path) -> tuple[Any, dict]:  # noqa: ANN001
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from tianying.tokenizer import BYTE_DECODER, Tokenizer

    gguf = _gguf()
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"{path}: tokenizer model {model!r} is not supported (only gpt2-style byte-level BPE)")
    pre = _field(reader, "tokenizer.ggml.pre", "gpt-2")
    if pre not in _GPT2_PRE and pre not in _SPLIT_PRE and pre not in _DIGIT_PRE:
        raise GGUFError(f"{path}: pre-tokenizer {pre!r} is not supported "
                        f"(known: {', '.join([*_GPT2_PRE, *_SPLIT_PRE, *_DIGIT_PRE])})")
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    if not tokens:
        raise GGUFError(f"{path}: no tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * len(tokens)
    merges = _field(reader, "tokenizer.ggml.merges") or []
    control, user, unused = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED), int(gguf.TokenType.UNUSED)
    added_kinds = (control, user)
    end = len(tokens)
    while end > 0 and types[end - 1] == unused:  # vocabulary padding: not tokens anyone can produce
        end -= 1
    base = end
    while base > 0 and types[base - 1] in added_kinds:
        base -= 1
    vocab: dict[str, int] = {}
    for i in range(base):
        t = tokens[i]
        if t in vocab:
            raise GGUFError(f"{path}: token {t!r} appears twice (ids {vocab[t]} and {i})")
        if types[i] not in added_kinds and any(c not in BYTE_DECODER for c in t):
            raise GGUFError(f"{path}: token {i} {t!r} is not a byte-level BPE token")
        vocab[t] = i
    try:
        bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    except Exception as e:
        raise GGUFError(f"{path}: tokens and merges do not fit together ({' '.join(str(e).split())})") from None
    backend = Backend(bpe)
    if pre in _SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    specials: dict[str, int] = {}
    for i in range(end):
        if types[i] in added_kinds:  # CONTROL: special (skipped by decode(skip_special_tokens)); USER_DEFINED: not
            token = AddedToken(tokens[i], special=types[i] == control, normalized=False)
            (backend.add_special_tokens if types[i] == control else backend.add_tokens)([token])
            if backend.token_to_id(tokens[i]) != i:
                raise GGUFError(f"{path}: added token {tokens[i]!r} (id {i}) is also at id "
                                f"{backend.token_to_id(tokens[i])}")
            specials[tokens[i]] = i

    def tid(key: str) -> int | None:
        v = _field(reader, f"tokenizer.ggml.{key}")
        if v is None:
            return None
        v = int(v)
        if not 0 <= v < end:
            raise GGUFError(f"{path}: tokenizer.ggml.{key} = {v} is outside the vocabulary")
        return v

    bos, eos = tid("bos_token_id"), tid("eos_token_id")
    unk, pad = tid("unknown_token_id"), tid("padding_token_id")
    eos = eos if eos is not None else bos
    if eos is None:
        raise GGUFError(f"{path}: no tokenizer.ggml.eos_token_id or bos_token_id")
    bos = bos if bos is not None else eos
    unk = unk if unk is not None else (pad if pad is not None else eos)
    pad_role = pad if pad is not None else unk
    roles = {"bos": tokens[bos], "eos": tokens[eos], "unk": tokens[unk], "pad": tokens[pad_role]}
    tok = Tokenizer(backend, specials, roles, base)
    chat = _field(reader, "tokenizer.chat_template")
    tok.chat_template = chat  # the file's Jinja template (read by the chat-template code, when present)
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    return tok, {"bos": bos, "eos": eos, "pad": pad, "chat_template": chat, "pre": pre,
                 "add_bos": None if add_bos is None else bool(add_bos)}


def _blocks(rt, type_size: int) -> tuple[torch.Tensor, int, int]:  # noqa: ANN001
    """The raw bytes of a block-quantized matrix as [N, K/32, type_size], with N and K."""
    K = int(rt.shape[0])
    N = int(np.prod(rt.shape[1:]))
    if K % BLOCK:
        raise GGUFError(f"{rt.name}: width {K} is not a multiple of {BLOCK}")
    raw = torch.from_numpy(np.array(rt.data, dtype=np.uint8, copy=True)).reshape(N, K // BLOCK, type_size)
    return raw, N, K


def _f16(raw: torch.Tensor, N: int) -> torch.Tensor:
    """Little-endian fp16 from [N, G, 2] bytes → [N, G]."""
    return raw.contiguous().view(torch.float16).reshape(N, -1)


def _decode(rt, keep_quantized: bool) -> torch.Tensor | QuantWeight:  # noqa: ANN001 - a gguf ReaderTensor
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    kind = rt.tensor_type
    shape = tuple(int(d) for d in reversed(rt.shape.tolist()))
    if kind in (T.F32, T.F16):
        return torch.from_numpy(np.array(rt.data, copy=True)).reshape(shape)
    if kind == T.BF16:
        return torch.from_numpy(np.array(rt.data, dtype=np.uint8, copy=True)).view(torch.bfloat16).reshape(shape)
    # QuantLinear packs 32/bits rows together (QuantSpec.check): a head of, say, 32,001 rows is dequantized instead
    keep_quantized = keep_quantized and int(np.prod(rt.shape[1:])) % 8 == 0
    if keep_quantized and kind == T.Q8_0:
        raw, N, K = _blocks(rt, 34)
        d = _f16(raw[..., :2], N)
        x = raw[..., 2:].contiguous().view(torch.int8).reshape(N, K)
        q = (x.to(torch.int16) + 128).to(torch.uint8)
        return QuantWeight(q, d.t().contiguous(), torch.full((K // BLOCK, N), 128, dtype=torch.int16), 8)
    if keep_quantized and kind in (T.Q4_0, T.Q4_1):
        size, off = (18, 2) if kind == T.Q4_0 else (20, 4)
        raw, N, K = _blocks(rt, size)
        d = _f16(raw[..., :2], N)
        qs = raw[..., off:]
        q = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(N, K)  # element j: low nibble of byte j; j+16: high
        if kind == T.Q4_0:
            return QuantWeight(q, d.t().contiguous(), torch.full((K // BLOCK, N), 8, dtype=torch.int16), 4)
        m = _f16(raw[..., 2:4], N).float()
        df = d.float()
        z = torch.where(df != 0, torch.round(-m / torch.where(df != 0, df, 1.0)), torch.zeros_like(m))
        exact = torch.where(df != 0, (-z * df) == m, m == 0)
        if bool(exact.all()) and z.abs().max() < 2**15:
            return QuantWeight(q, d.t().contiguous(), z.to(torch.int16).t().contiguous(), 4, sym=False)
        # w = d·q + m with m off the d-grid: our format (integer zeros) cannot hold it; dequantize exactly
    try:
        w = gguf.quants.dequantize(np.asarray(rt.data), kind)
    except NotImplementedError:
        raise GGUFError(f"{rt.name}: tensor type {kind.name} is not supported (gguf cannot dequantize it)") from None
    except Exception as e:
        raise GGUFError(f"{rt.name}: cannot read tensor type {kind.name} ({e})") from None
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(shape)


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float tensor) of every tensor in a GGUF file, q/k rows in rotate-half order (what the weights
    module's readers yield for safetensors and .bin files)."""
    g = read_gguf(path)
    for name in g.names():
        yield name, g.weight(name, keep_quantized=False)


def load_gguf(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
              dequantize: bool = False) -> tuple[nn.Module, Config, Any]:
    """(model in eval mode, Config, Tokenizer) straight from a GGUF file, nothing written to disk.

    Q8_0/Q4_0 (and exactly representable Q4_1) matrices become `QuantLinear`s (int8/int4, group 32) unless
    `dequantize`; every other tensor is a float parameter. dtype None → fp32 on CPU, else the file's float
    dtype (fp16 for quantized files).
    """
    from tianying.checkpoint import parse_dtype
    from tianying.model import build_model
    from tianying.quantize.linear import set_submodule

    g = read_gguf(path)
    device = torch.device(device)
    want = parse_dtype(dtype)
    if want is None:
        floats = [t for n, t in g.types.items() if t in ("F16", "BF16", "F32") and n.endswith("proj.weight")]
        want = torch.float32 if device.type == "cpu" else (
            {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[max(set(floats), key=floats.count)]
            if floats else torch.float16)
    model = build_model(g.cfg, init=False)
    sd: dict[str, torch.Tensor] = {}
    for name in g.names():
        w = g.weight(name, keep_quantized=not dequantize)
        prefix = name.rpartition(".")[0]
        if isinstance(w, QuantWeight):
            set_submodule(model, prefix, w.layer(dtype=want).to(device))
        else:
            sd[name] = w.to(device=device, dtype=want)
        del w
    if g.tied:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left or unexpected:
        raise GGUFError(f"{path}: {(left or unexpected)[0]} was not loaded")
    if g.tied:  # one Parameter, as tied embeddings are (assign made two views of one tensor)
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval(), g.cfg, g.tokenizer


def convert_gguf(src: str | Path, dst: str | Path, dtype: str | torch.dtype | None = None) -> tuple[Path, str]:
    """Write GGUF `src` as a checkpoint directory `dst`; returns (dst, what was written).

    Default: Q8_0/Q4_0 layers stay quantized (a GPTQ-format int8/int4 group-32 checkpoint, which tianying and
    GPTQ tools read); other tensors keep their GGUF float dtype (dequantized ones are fp32). `dtype` casts and
    dequantizes everything into a float checkpoint instead.
    """
    from tianying.checkpoint import parse_dtype, save_hf
    from tianying.quantize.linear import quantized_layers

    dst = Path(dst)
    if dst.suffix.lower() == ".gguf":
        raise GGUFError(f"{dst}: the output of a GGUF import is a checkpoint directory, not a .gguf file")
    g = read_gguf(src)
    with tempfile.TemporaryDirectory(prefix=".tianying-gguf-tok-", dir=dst.absolute().parent
                                     if dst.absolute().parent.exists() else None) as tok_dir:
        write_tokenizer_files(g, tok_dir)
        if dtype is None:  # keep what maps exactly onto int8/int4 layers, if anything does
            model = load_gguf(src, dtype=torch.float32)[0]
            if quantized_layers(model):
                return dst, _save_quantized(model, g, dst, tok_dir)
            del model
        want = parse_dtype(dtype)
        sd = {}
        for name in g.names():
            w = g.weight(name, keep_quantized=False)
            sd[name] = w if want is None else w.to(want)
        if g.tied:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        save_hf(sd, g.cfg, dst, tokenizer_dir=tok_dir, dtype=want)
        return dst, f"float ({dtype})" if dtype else "float (the file's dtypes)"


def _save_quantized(model: nn.Module, g: GGUFModel, dst: Path, tok_dir: str) -> str:
    """`model`'s QuantLinears as a GPTQ-format checkpoint (one setting: the most common one)."""
    from tianying.quantize.format import save_quantized
    from tianying.quantize.linear import QuantLinear, quantized_layers, set_submodule

    layers = quantized_layers(model)
    specs: dict = {}
    for n, m in layers.items():
        specs.setdefault(m.spec, []).append(n)
    keep = max(specs, key=lambda s: len(specs[s]))
    for spec, names in specs.items():  # the GPTQ format holds one setting; others go back to float, exactly
        if spec == keep:
            continue
        warnings.warn(f"{len(names)} layers ({names[0]}, ...) are {spec.bits}-bit while most are {keep.bits}-bit; "
                      "the GPTQ format holds one setting, so they are stored dequantized (fp32)", stacklevel=3)
        for n in names:
            lin = nn.Linear(layers[n].in_features, layers[n].out_features, bias=False)
            lin.weight = nn.Parameter(layers[n].dequantize(), requires_grad=False)
            set_submodule(model, n, lin)
    if g.tied:  # the GPTQ writer saves parameters by name; a tied head is saved as its own copy
        model.lm_head = nn.Linear(g.cfg.hidden_size, g.cfg.vocab_size, bias=False)
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone(), requires_grad=False)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.prepare()
    save_quantized(model, g.cfg, dst, tokenizer_dir=tok_dir, method="gguf")
    return f"int{keep.bits} group {keep.group_size} (GPTQ format)"


def write_tokenizer_files(g: GGUFModel, directory: str | Path) -> None:
    """The tokenizer of GGUF `g` as HF files (tokenizer.json, vocab.json, merges.txt, tokenizer_config.json
    with the chat template, special_tokens_map.json, added_tokens.json)."""
    d = Path(directory)
    g.tokenizer.save(d)
    conf = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    user = {str(i) for t, i in g.tokenizer.special_tokens.items() if not _is_special(g.tokenizer, i)}
    for i, entry in conf.get("added_tokens_decoder", {}).items():
        if i in user:
            entry["special"] = False
    if g.pre not in _GPT2_PRE:  # GPT2Tokenizer (vocab.json + merges.txt) would apply GPT-2's regex
        conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    if g.add_bos is not None:
        conf["add_bos_token"] = g.add_bos
    if g.chat_template:
        conf["chat_template"] = g.chat_template
    (d / "tokenizer_config.json").write_text(json.dumps(conf, ensure_ascii=False, indent=2), encoding="utf-8")


def _is_special(tok, i: int) -> bool:  # noqa: ANN001
    t = tok._tok.get_added_tokens_decoder().get(i)
    return True if t is None else bool(t.special)


# ====================================================================== writing
def _chat_template_source(cfg: Config, tokenizer_dir: Path | None) -> str | None:
    """Jinja for GGUF metadata: the named tianying template's, else tokenizer_config.json's, else None."""
    if cfg.chat_template:
        from tianying import templates

        jinja_source = getattr(templates, "jinja_source", None)  # from the chat-template work, when merged
        if jinja_source is not None:
            try:
                return jinja_source(cfg.chat_template)
            except TianyingError:
                pass
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer_config.json").is_file():
        try:
            conf = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None
        tpl = conf.get("chat_template") if isinstance(conf, dict) else None
        if isinstance(tpl, str):
            return tpl
    if tokenizer_dir is not None and (tokenizer_dir / "chat_template.jinja").is_file():
        return (tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return None


def _pre_tokenizer_name(tok) -> str:  # noqa: ANN001 - tianying Tokenizer
    pt = json.loads(tok._tok.to_str()).get("pre_tokenizer") or {}
    if pt.get("type") == "ByteLevel" and pt.get("use_regex", True):
        return "gpt-2"
    if pt.get("type") == "Sequence":
        parts = pt.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
                and not parts[1].get("use_regex", True)):
            regex = (parts[0].get("pattern") or {}).get("Regex")
            for name, r in _SPLIT_PRE.items():
                if regex == r:
                    return name
    raise GGUFError(f"the tokenizer's pre-tokenizer ({pt.get('type')}) has no llama.cpp name; only GPT-2-style "
                    "byte-level BPE tokenizers can be exported")


def _add_tokenizer(writer, gguf, tok, vocab_size: int) -> None:  # noqa: ANN001
    raw = json.loads(tok._tok.to_str())
    if (raw.get("model") or {}).get("type") != "BPE":
        raise GGUFError("only byte-level BPE tokenizers can be exported to GGUF")
    vocab = tok.get_vocab()
    top = max(vocab.values())
    if top >= vocab_size:
        raise GGUFError(f"the tokenizer has ids up to {top}, beyond the model's vocab_size {vocab_size}")
    added = tok._tok.get_added_tokens_decoder()
    # padding rows as convert_hf_to_gguf.py writes them: "[PADi]", UNUSED, never produced by the tokenizer
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for t, i in vocab.items():
        tokens[i] = t
        if i in added:
            types[i] = int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types[i] = int(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tok))
    writer.add_add_space_prefix(False)  # byte-level BPE: a leading space is part of the token
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_unk_token_id(tok.unk_id)
    writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(False)  # tianying's encode() adds BOS only when asked (the HF Aquila2 behaviour)
    writer.add_add_eos_token(False)


def _plan(name: str, t: torch.Tensor, quant: str, gguf) -> tuple[Any, tuple[int, ...]]:  # noqa: ANN001
    """(GGML type, numpy shape) for one tensor under `quant`."""
    T = gguf.GGMLQuantizationType
    if t.ndim == 1 or quant == "f32":
        return T.F32, tuple(t.shape)
    if quant in ("q8_0", "q4_0") and t.shape[-1] % BLOCK:
        return T.F16, tuple(t.shape)  # as convert_hf_to_gguf.py: a width blocks cannot tile stays 16-bit
    return {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant], tuple(t.shape)


def _encode(t: torch.Tensor, kind, gguf) -> np.ndarray:  # noqa: ANN001
    T = gguf.GGMLQuantizationType
    t = t.detach().to("cpu")
    if kind == T.F32:
        return t.float().contiguous().numpy()
    if kind == T.F16:
        return t.half().contiguous().numpy()
    if kind == T.BF16:  # torch rounds to nearest even, as gguf/ggml do
        return t.bfloat16().contiguous().view(torch.uint8).numpy()
    return gguf.quants.quantize(t.float().contiguous().numpy(), kind)


def write_gguf(tensors: Mapping[str, torch.Tensor] | nn.Module, cfg: Config, out: str | Path,
               tokenizer_dir: str | Path, quant: str = "f32", tied: bool | None = None,
               chat_template: str | None = None) -> Path:
    """Write HF-named float tensors (or a model) and `tokenizer_dir`'s tokenizer as a llama-architecture GGUF.

    tied None → tied when the LM head equals the embedding table (then only token_embd.weight is written).
    chat_template: Jinja; default the template named by `cfg.chat_template`, else tokenizer_config.json's.
    Tensors are encoded and written one at a time, so memory stays at one tensor beyond the source.
    """
    from tianying.tokenizer import Tokenizer

    gguf = _gguf()
    quant = quant.lower()
    if quant not in GGUF_QUANTS:
        raise GGUFError(f"unknown GGUF quantization {quant!r} (use {', '.join(GGUF_QUANTS)})")
    if isinstance(tensors, nn.Module):
        tensors = _float_state(tensors)
    tokenizer_dir = Path(tokenizer_dir)
    tok = Tokenizer.from_dir(tokenizer_dir)
    names = {}
    for name in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        g = gguf_name(name)
        if g is None:
            raise GGUFError(f"tensor {name} has no GGUF name (not a LLaMA parameter)")
        names[name] = g
    from tianying.checkpoint import expected_shapes

    want = expected_shapes(cfg)
    for name, shape in want.items():
        if name not in tensors:
            raise GGUFError(f"the model lacks {name}")
        if tuple(tensors[name].shape) != shape:
            raise GGUFError(f"{name}: shape {tuple(tensors[name].shape)}, the config says {shape}")
    if tied is None:
        a, b = tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]
        tied = a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                          and a.dtype == b.dtype and torch.equal(a, b))
    if tied:
        names.pop("lm_head.weight", None)
    order = list(want)
    order = [n for n in order if n in names]

    out = Path(out)
    if out.is_dir():
        raise GGUFError(f"{out} is a directory; give a .gguf file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_type("model")
        w.add_name(cfg.name if cfg.name not in (None, "custom") else out.stem)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                         "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])
        if quant in ("q8_0", "q4_0"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_config(w, gguf, cfg)
        _add_tokenizer(w, gguf, tok, cfg.vocab_size)
        tpl = chat_template if chat_template is not None else _chat_template_source(cfg, tokenizer_dir)
        if tpl:
            w.add_chat_template(tpl)
        if cfg.chat_template:
            w.add_string("tianying.chat_template", cfg.chat_template)
        if cfg.name not in (None, "custom"):
            w.add_string("tianying.config_name", cfg.name)
        plans = {}
        for name in order:
            kind, shape = _plan(name, tensors[name], quant, gguf)
            block, size = gguf.GGML_QUANT_SIZES[kind]
            nbytes = int(np.prod(shape)) * size // block
            plans[name] = kind
            w.add_tensor_info(names[name], shape, np.float32, nbytes, raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name in order:
            t = tensors[name]
            heads = _rotary_heads(name, cfg)
            if heads is not None:
                t = half_to_interleaved(t.detach(), heads)
            w.write_tensor_data(_encode(t, plans[name], gguf))
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _add_config(w, gguf, cfg: Config) -> None:  # noqa: ANN001
    theta = cfg.rope_theta
    rs = cfg.rope_scaling or {}
    kind = rs.get("type")
    if kind == "ntk":  # static NTK is plain RoPE with a larger base (tianying.rope): exactly expressible
        from tianying.rope import ntk_base

        theta, kind = ntk_base(cfg.rope_theta, rs["factor"], cfg.head_dim), None
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_key_length(cfg.head_dim)  # as convert_hf_to_gguf.py writes them
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rs.get("original_max_position_embeddings")
                                            or cfg.max_position_embeddings))
    elif kind == "dynamic":
        warnings.warn("llama.cpp has no dynamic NTK RoPE; the GGUF runs unscaled RoPE (the same within "
                      "max_position_embeddings)", stacklevel=3)
    if cfg.logn_attention or cfg.attention_window is not None:
        warnings.warn("LogN / windowed attention are not expressible in GGUF; llama.cpp runs plain causal "
                      "attention", stacklevel=3)


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF-named float weights of a model; quantized layers are dequantized (one at a time, when written)."""
    from tianying.quantize.linear import QuantLinear

    out: dict[str, torch.Tensor] = {}
    for mname, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[f"{mname}.weight"] = _LazyDequant(m)
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied head is listed under both names
        if name not in out:
            out[name] = p
    return out


class _LazyDequant:
    """Stands in for a QuantLinear's float weight until it is written (shape, dtype, then the values)."""

    def __init__(self, m) -> None:  # noqa: ANN001
        self.m = m
        self.shape = torch.Size((m.out_features, m.in_features))
        self.ndim = 2
        self.dtype = torch.float32

    def detach(self) -> torch.Tensor:
        return self.m.dequantize()


def export_gguf(src: str | Path, out: str | Path, quant: str = "f32") -> Path:
    """`tianying convert CKPT out.gguf --to gguf`: any checkpoint directory tianying reads → a GGUF file."""
    from tianying.checkpoint import load_config, load_state_dict

    src = Path(src)
    if not src.is_dir():
        raise GGUFError(f"{src}: not a checkpoint directory" if src.exists() else f"{src} does not exist")
    if quant.lower() not in GGUF_QUANTS:
        raise GGUFError(f"unknown GGUF quantization {quant!r} (use {', '.join(GGUF_QUANTS)})")
    from tianying.quantize.format import is_quantized_checkpoint

    if is_quantized_checkpoint(src):
        from tianying.quantize import load

        model, cfg = load(src, dtype=torch.float32)
        tensors: Mapping[str, Any] = _float_state(model)
    else:
        cfg = load_config(src)
        tensors = load_state_dict(src, cfg=cfg)  # memory-mapped, in the file's dtype
    return write_gguf(tensors, cfg, out, tokenizer_dir=src, quant=quant)


def iter_types(path: str | Path) -> Iterator[tuple[str, str]]:
    """(GGUF tensor name, GGML type name) of every tensor in a file."""
    for rt in _open(Path(path)).tensors:
        yield rt.name, rt.tensor_type.name
