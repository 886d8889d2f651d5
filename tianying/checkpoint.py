"""Checkpoints: read the Hugging Face and FlagAI layouts, write either one, convert between them.

Reading (any layout, detected from config.json and the files present):
- Hugging Face: `model.safetensors`, `model-0000k-of-0000N.safetensors` + `model.safetensors.index.json`,
  `pytorch_model.bin`, `pytorch_model-0000k-of-0000N.bin` + `pytorch_model.bin.index.json`; config.json in
  the `llama` or `aquila` dialect, including transformers ≥ 4.5x's `rope_parameters` spelling.
- FlagAI v1 native (seed-spec §2.1–2.2): `pytorch_model.bin` with `tok_embeddings` / `layers.{i}.attention.wq`
  ... names, optionally wrapped as `{"module": state_dict}`, optionally with a fused `Wqkv`; its q/k rows pair
  dimensions (2j, 2j+1) for RoPE, so they are permuted to the rotate-half layout the model uses.
- Other LLaMA-family checkpoints: `tie_word_embeddings` (the file has no `lm_head.weight`; the head shares the
  embedding table, and is written that way too), `head_dim` ≠ hidden/heads, any `rope_theta`.
Files are found, path-checked and read by tianying.weights (`.bin` only with `torch.load(weights_only=True)`:
a pickle from the hub must not run code).

Memory: the model is built on the meta device and every tensor is read memory-mapped (safetensors maps the
file; `torch.load(mmap=True)` maps the zip), cast per tensor, and assigned into the module. When the requested
dtype equals the file's, the parameters *are* the mapped file pages (copy-on-write), so nothing is constructed
twice. Measured (torch 2.13 CPU, a 48.0M-parameter model, growth of peak RSS (VmHWM) during `load_model`
after a warm-up load, all pages touched):
  fp32 model.safetensors   192 MB → fp32: +189 MB (1.01× the file)
  fp32 pytorch_model.bin   192 MB → fp32: +189 MB (1.01×)
  fp32 FlagAI native .bin  192 MB → fp32: +210 MB (1.12×: the permuted q/k rows are copies)
  fp16 model.safetensors    96 MB → fp32: +282 MB (the 192 MB fp32 weights + the mapped fp16 pages)
  naive build_model() + torch.load() + load_state_dict(), 192 MB: +377 MB (2.01×)
The first load in a process also costs a one-time ~60 MB (torch's meta-device machinery), excluded above.
Because loaded parameters may be views of the files, checkpoints are never rewritten in place: the writers
below replace a directory by rename, which leaves the mapped (now unlinked) files intact.

Writing is atomic (`weights.atomic_dir`): files go into a temporary sibling directory, are fsynced, and the
directory is swapped in by rename, so a crash leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from tianying.config import Config
from tianying.rope import half_to_interleaved, interleaved_to_half
from tianying.weights import (  # noqa: F401 - re-exported: callers import these from here
    CheckpointError,
    atomic_dir,
    check_finite,
    copy_file,
    dtype_name,
    first_line,
    fsync_dir,
    iter_tensors,
    load_config,
    parse_dtype,
    parse_size,
    read_json,
    tie_embeddings,
    weight_files,
    write_json,
    write_safetensors,
)

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer_config.json", "chat_template.jinja")
_fsync_dir = fsync_dir  # old private name (tianying.train.state imports it)


def detect_format(path: str | Path) -> str:
    """"hf" (transformers names, rotate-half q/k) or "flagai" (FlagAI v1 native names, interleaved q/k)."""
    path = Path(path)
    config = path / "config.json"
    if config.is_file():
        raw = read_json(config)
        if isinstance(raw, dict) and _is_native_config(raw):
            return "flagai"
    first = next(iter(iter_tensors(weight_files(path)[0])), None)
    return "flagai" if first is not None and _is_native_key(first[0]) else "hf"


def _is_native_config(raw: Mapping) -> bool:
    return "dim" in raw and "hidden_size" not in raw


def _is_native_key(name: str) -> bool:
    return name.startswith(("tok_embeddings.", "layers.", "output.", "norm."))


# ====================================================================== names and q/k permutation
_NATIVE_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_NATIVE_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
_HF_LAYER = {v: k for k, v in _NATIVE_LAYER.items()}
_HF_TOP = {v: k for k, v in _NATIVE_TOP.items()}


def _native_to_hf(name: str, t: torch.Tensor, cfg: Config) -> list[tuple[str, torch.Tensor]]:
    """One native tensor → HF (name, tensor) pairs, q/k rows permuted to rotate-half; [] for unknown names."""
    if name in _NATIVE_TOP:
        return [(_NATIVE_TOP[name], t)]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if not m:
        return [(name, t)]  # reported as unexpected by the shape check
    prefix, rest = f"model.layers.{m.group(1)}.", m.group(2)
    if rest == "attention.Wqkv.weight":  # flash_atten_aquila_style: fused [q; k; v], q/k still interleaved
        q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        if t.shape[0] != q_rows + 2 * kv_rows:
            raise CheckpointError(f"{name}: expected {q_rows + 2 * kv_rows} rows (q, k, v), found {t.shape[0]}")
        q, k, v = t.split([q_rows, kv_rows, kv_rows])
        return [(prefix + "self_attn.q_proj.weight", _permute(q, cfg.n_head, name)),
                (prefix + "self_attn.k_proj.weight", _permute(k, cfg.n_kv_head, name)),
                (prefix + "self_attn.v_proj.weight", v)]
    if rest not in _NATIVE_LAYER:
        return [(name, t)]
    if rest == "attention.wq.weight":
        t = _permute(t, cfg.n_head, name)
    elif rest == "attention.wk.weight":
        t = _permute(t, cfg.n_kv_head, name)
    return [(prefix + _NATIVE_LAYER[rest], t)]


def _permute(t: torch.Tensor, n_heads: int, name: str, inverse: bool = False) -> torch.Tensor:
    if t.ndim != 2 or t.shape[0] % n_heads or (t.shape[0] // n_heads) % 2:
        raise CheckpointError(f"{name}: shape {tuple(t.shape)} cannot hold {n_heads} rotary heads")
    return (half_to_interleaved if inverse else interleaved_to_half)(t, n_heads)


def _hf_to_native(name: str, t: torch.Tensor, cfg: Config) -> tuple[str, torch.Tensor]:
    if name in _HF_TOP:
        return _HF_TOP[name], t
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m or m.group(2) not in _HF_LAYER:
        raise CheckpointError(f"{name}: no FlagAI native name for this tensor")
    rest = m.group(2)
    if rest == "self_attn.q_proj.weight":
        t = _permute(t, cfg.n_head, name, inverse=True)
    elif rest == "self_attn.k_proj.weight":
        t = _permute(t, cfg.n_kv_head, name, inverse=True)
    return f"layers.{m.group(1)}.{_HF_LAYER[rest]}", t


def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """HF parameter name → shape for a config, in `Transformer.state_dict()` order.

    Spelled out rather than read from a meta-device model: building one costs seconds on first use (torch
    imports its compiler stack for `normal_` on meta), which `convert` and the writers do not need to pay.
    tests/test_checkpoint.py checks that this agrees with the model.
    """
    d, f, v, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (cfg.n_head * hd, d),
            p + "self_attn.k_proj.weight": (cfg.n_kv_head * hd, d),
            p + "self_attn.v_proj.weight": (cfg.n_kv_head * hd, d),
            p + "self_attn.o_proj.weight": (d, cfg.n_head * hd),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        })
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:  # a tied head is the embedding table: files (as transformers') omit it
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _check(names_shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
           where: Mapping[str, str]) -> None:
    """One clear line for the first problem: unexpected key, wrong shape, or missing key."""
    for name, shape in names_shapes.items():
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {name} in {where.get(name, '?')} (not an Aquila/LLaMA "
                                  "parameter for this config)")
        if tuple(shape) != expected[name]:
            raise CheckpointError(f"{name} in {where.get(name, '?')}: expected shape {expected[name]} from "
                                  f"config.json, found {tuple(shape)}")
    missing = [k for k in expected if k not in names_shapes]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint lacks {missing[0]}{more}")


# ====================================================================== reading
def load_state_dict(path: str | Path, dtype: str | torch.dtype | None = None, cfg: Config | None = None,
                    device: str | torch.device = "cpu",
                    shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint under HF names, q/k in rotate-half layout, checked against its config.

    Tensors are views of the memory-mapped files unless a dtype/device change (or the native q/k permutation)
    forces a copy, made one tensor at a time. `shapes` (name → shape) defaults to `expected_shapes(cfg)`.
    """
    path = Path(path)
    cfg = cfg or load_config(path)
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    out: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for file in weight_files(path):
        for name, t in iter_tensors(file):
            if name.endswith("rotary_emb.inv_freq"):  # written by old converters; recomputed from the config
                continue
            if cfg.tie_word_embeddings and name == "lm_head.weight":  # a copy of the embeddings; transformers
                continue  # ignores it too (it ties the head to embed_tokens)
            pairs = _native_to_hf(name, t, cfg) if _is_native_key(name) else [(name, t)]
            for hf_name, hf_t in pairs:
                if hf_name in out:
                    raise CheckpointError(f"{hf_name} appears twice ({where[hf_name]} and {file.name})")
                want = _target_dtype(hf_t, dtype)
                if hf_t.dtype != want or device.type != "cpu":
                    hf_t = hf_t.to(device=device, dtype=want)
                out[hf_name], where[hf_name] = hf_t, file.name
    _check({k: tuple(v.shape) for k, v in out.items()}, shapes or expected_shapes(cfg), where)
    return out


def default_dtype(sd: Mapping[str, torch.Tensor], device: str | torch.device) -> torch.dtype:
    """fp32 on CPU (half-precision matmuls are slow there); elsewhere the dtype holding most of the weights."""
    if torch.device(device).type == "cpu":
        return torch.float32
    counts: dict[torch.dtype, int] = {}
    for t in sd.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
               check_weights: bool = False) -> tuple[nn.Module, Config]:
    """(Transformer in eval mode, Config) from any supported checkpoint directory.

    dtype None → float32 on CPU, the checkpoint's own dtype elsewhere (see `default_dtype`).
    check_weights: refuse (one line naming them) tensors that hold NaN or Inf.
    """
    from tianying.model import build_model

    cfg = load_config(path)
    device = torch.device(device)
    model = build_model(cfg, init=False)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    sd = load_state_dict(path, cfg=cfg, shapes=shapes)  # memory-mapped views, nothing copied yet
    want = parse_dtype(dtype) or default_dtype(sd, device)
    for name, t in sd.items():  # one tensor at a time, so at most one extra tensor is alive
        if t.is_floating_point() and t.dtype != want or t.device != device:
            sd[name] = t.to(device=device, dtype=want if t.is_floating_point() else t.dtype)
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: {first_line(e)}") from None
    tie_embeddings(model)  # assign=True gave the head its own Parameter; training must update one table
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left:
        raise CheckpointError(f"{path}: {left[0]} was not loaded")
    if check_weights:
        check_finite(model, path)
    return model.eval(), cfg


# ====================================================================== writing
def _as_state_dict(model_or_sd: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_sd, nn.Module):
        return dict(model_or_sd.state_dict())
    return dict(model_or_sd)


def _target_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def _copy_tokenizer(tokenizer_dir: str | Path | None, out: Path, cfg: Config | None = None) -> None:
    if tokenizer_dir is None:
        return
    src = Path(tokenizer_dir)
    if not src.is_dir():
        raise CheckpointError(f"tokenizer directory {src} does not exist")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            copy_file(src / name, out / name)
    from tianying.templates import checkpoint_template, write_chat_template

    # the template as Jinja too, so transformers / vLLM / llama.cpp render the chats tianying renders
    write_chat_template(out, checkpoint_template(src, cfg))


def _prepare(model_or_sd: nn.Module | Mapping[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    sd = {k: v for k, v in _as_state_dict(model_or_sd).items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:  # written as transformers writes a tied model: the embedding table only
        sd.pop("lm_head.weight", None)
    _check({k: tuple(v.shape) for k, v in sd.items()}, expected_shapes(cfg), {k: "the state dict" for k in sd})
    return sd


def _saved_dtype(sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> str | None:
    kinds = {_target_dtype(t, dtype) for t in sd.values() if t.is_floating_point()}
    return dtype_name(kinds.pop()) if len(kinds) == 1 else None


def save_hf(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], cfg: Config, out_dir: str | Path,
            tokenizer_dir: str | Path | None = None, max_shard_size: int | str = "2GB",
            dtype: str | torch.dtype | None = None) -> Path:
    """Write a Hugging Face checkpoint directory that transformers' LlamaForCausalLM loads unchanged.

    safetensors (sharded with an index above `max_shard_size`), config.json (with the chat template name as
    `tianying_chat_template`), generation_config.json, and the tokenizer files found in `tokenizer_dir`.
    """
    dtype = parse_dtype(dtype)
    limit = parse_size(max_shard_size)
    sd = _prepare(model_or_state_dict, cfg)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = total = 0
    for name, t in sd.items():
        n = t.numel() * torch.empty(0, dtype=_target_dtype(t, dtype)).element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += n
        total += n
    hf = cfg.to_hf()
    hf.pop("rope_parameters", None)  # rope_theta/rope_scaling are authoritative; a stale copy would conflict
    saved = _saved_dtype(sd, dtype)
    if saved:
        hf["torch_dtype"] = saved
    gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if getattr(cfg, k) is not None}
    with atomic_dir(out_dir) as tmp:
        if len(shards) == 1:
            write_safetensors(tmp / "model.safetensors", shards[0], dtype)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / fname, shard, dtype)
                weight_map.update({name: fname for name, _ in shard})
            write_json(tmp / "model.safetensors.index.json",
                        {"metadata": {"total_size": total}, "weight_map": weight_map})
        write_json(tmp / "config.json", hf)
        write_json(tmp / "generation_config.json", gen)
        _copy_tokenizer(tokenizer_dir, tmp, cfg)
    return Path(out_dir)


def save_flagai(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], cfg: Config, out_dir: str | Path,
                tokenizer_dir: str | Path | None = None, dtype: str | torch.dtype | None = None) -> Path:
    """Write FlagAI's v1 native layout: pytorch_model.bin (native names, interleaved q/k) + native config.json.

    The v1 format has no rope_theta / rope_scaling; when they differ from the v1 defaults they are stored as
    extra config.json fields (read back by `load_config`, ignored by FlagAI itself — hence the warning).
    """
    if cfg.head_dim_override:
        raise CheckpointError(f"FlagAI's v1 layout cannot store head_dim {cfg.head_dim} != dim / n_heads; "
                              "write a Hugging Face checkpoint instead")
    dtype = parse_dtype(dtype)
    sd = _prepare(model_or_state_dict, cfg)
    if cfg.tie_word_embeddings:  # FlagAI has no tied head: it gets its own copy of the table
        sd["lm_head.weight"] = _as_state_dict(model_or_state_dict).get("lm_head.weight",
                                                                       sd["model.embed_tokens.weight"])
    native: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        nname, nt = _hf_to_native(name, t.detach(), cfg)
        nt = nt.to(device="cpu", dtype=_target_dtype(nt, dtype))
        if nt.untyped_storage().nbytes() != nt.numel() * nt.element_size() or not nt.is_contiguous():
            nt = nt.clone(memory_format=torch.contiguous_format)  # torch.save would write the whole storage
        native[nname] = nt
    conf = cfg.to_flagai()
    if cfg.rope_theta != 10000.0 or cfg.rope_scaling:
        warnings.warn("the FlagAI v1 layout has no rope_theta/rope_scaling; they are stored as extra config.json "
                      "fields that FlagAI ignores", stacklevel=2)
        conf["rope_theta"] = cfg.rope_theta
        conf["rope_scaling"] = cfg.rope_scaling
    with atomic_dir(out_dir) as tmp:
        with open(tmp / "pytorch_model.bin", "wb") as f:
            torch.save(native, f)
            f.flush()
            os.fsync(f.fileno())
        write_json(tmp / "config.json", conf)
        _copy_tokenizer(tokenizer_dir, tmp, cfg)
    return Path(out_dir)


def convert(src: str | Path, dst: str | Path, to: str = "hf", dtype: str | torch.dtype | None = None,
            max_shard_size: int | str = "2GB") -> Path:
    """Rewrite checkpoint `src` (any layout) as `dst` in the `to` layout, tokenizer files included."""
    if to not in ("hf", "flagai"):
        raise CheckpointError(f"unknown target layout {to!r} (use hf or flagai)")
    cfg = load_config(src)
    sd = load_state_dict(src, cfg=cfg)  # memory-mapped; cast per tensor while writing
    if to == "hf":
        return save_hf(sd, cfg, dst, tokenizer_dir=src, max_shard_size=max_shard_size, dtype=dtype)
    return save_flagai(sd, cfg, dst, tokenizer_dir=src, dtype=dtype)
