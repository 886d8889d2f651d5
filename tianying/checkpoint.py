"""Checkpoints: read the Hugging Face and FlagAI layouts, write either one, convert between them.

Reading (any layout, detected from config.json and the files present):
- Hugging Face: `model.safetensors`, `model-0000k-of-0000N.safetensors` + `model.safetensors.index.json`,
  `pytorch_model.bin`, `pytorch_model-0000k-of-0000N.bin` + `pytorch_model.bin.index.json`; config.json in
  the `llama` or `aquila` dialect, including transformers ≥ 4.5x's `rope_parameters` spelling.
- FlagAI v1 native (seed-spec §2.1–2.2): `pytorch_model.bin` with `tok_embeddings` / `layers.{i}.attention.wq`
  ... names, optionally wrapped as `{"module": state_dict}`, optionally with a fused `Wqkv`; its q/k rows pair
  dimensions (2j, 2j+1) for RoPE, so they are permuted to the rotate-half layout the model uses.
`.bin` files are only ever opened with `torch.load(weights_only=True)`: a pickle from the hub must not run code.

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

Writing is atomic: files go into a temporary sibling directory, are fsynced, and the directory is renamed
over the target, so a crash leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tianying.config import Config, ConfigError, _reject_duplicates
from tianying.errors import TianyingError
from tianying.rope import half_to_interleaved, interleaved_to_half


class CheckpointError(TianyingError):
    """A checkpoint that cannot be read or written (missing, corrupt, or not matching its config)."""


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer_config.json")

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """"fp32"/"float32"/"bf16"/"bfloat16"/"fp16"/"float16" or a torch dtype → torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (use fp32, bf16 or fp16)")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_size(size: int | str) -> int:
    """Bytes from an int or "500MB" / "2GB" / "1.5GiB" (KB/MB/GB decimal as Hugging Face, KiB/MiB/GiB binary)."""
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise CheckpointError(f"cannot read size {size!r} (use e.g. 500MB, 2GB or a number of bytes)")
        unit = (m.group(2) or "B").upper()
        power = " KMGT".index(unit[0]) if unit != "B" else 0
        n = int(float(m.group(1)) * ((1024 if "I" in unit else 1000) ** power))
    if n <= 0:
        raise CheckpointError(f"size must be positive, got {size!r}")
    return n


# ====================================================================== config
def load_config(path: str | Path) -> Config:
    """Config of a checkpoint directory (or of a config.json path), any dialect.

    Besides `Config.from_hf`, this reads transformers ≥ 4.5x's `rope_parameters` (which holds rope_theta and
    the scaling) and the rope fields `save_flagai` adds to a native config, so neither is silently dropped.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    if not file.is_file():
        where = Path(path)
        if not where.exists():
            raise CheckpointError(f"checkpoint directory {where} does not exist")
        raise CheckpointError(f"no config.json in {where}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"), object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    raw = dict(raw)
    rope_params = raw.pop("rope_parameters", None)
    if isinstance(rope_params, dict):
        rope_params = dict(rope_params)
        if "rope_theta" in rope_params:
            raw.setdefault("rope_theta", rope_params.pop("rope_theta"))
        if raw.get("rope_scaling") is None:
            raw["rope_scaling"] = rope_params
    try:
        cfg = Config.from_hf(raw)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    if _is_native_config(raw):  # Config._from_flagai knows only the v1 fields
        changes = {}
        if raw.get("rope_theta") is not None:
            changes["rope_theta"] = float(raw["rope_theta"])
        if raw.get("rope_scaling") is not None:
            changes["rope_scaling"] = raw["rope_scaling"]
        if changes:
            cfg = Config(**{**_config_fields(cfg), **changes})
    return cfg


def _config_fields(cfg: Config) -> dict:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


def _is_native_config(raw: Mapping) -> bool:
    return "dim" in raw and "hidden_size" not in raw


# ====================================================================== files and formats
def _read_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({type(e).__name__}: {e})") from None
    paths = [index.parent / f for f in files]
    for p in paths:
        if not p.is_file():
            raise CheckpointError(f"shard {p.name} named in {index.name} is missing from {index.parent}")
    return paths


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory, in the order they are read."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist" if not path.exists()
                              else f"{path} is not a checkpoint directory")
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (path / index).is_file():
            return _read_index(path / index)
        if (path / single).is_file():
            return [path / single]
    raise CheckpointError(f"no weights in {path} (looked for model.safetensors, pytorch_model.bin and their "
                          "sharded index files)")


def detect_format(path: str | Path) -> str:
    """"hf" (transformers names, rotate-half q/k) or "flagai" (FlagAI v1 native names, interleaved q/k)."""
    path = Path(path)
    config = path / "config.json"
    if config.is_file():
        try:
            raw = json.loads(config.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config}: not valid JSON ({e})") from None
        if isinstance(raw, dict) and _is_native_config(raw):
            return "flagai"
    first = next(iter(_read_file(weight_files(path)[0])), None)
    return "flagai" if first is not None and _is_native_key(first[0]) else "hf"


def _is_native_key(name: str) -> bool:
    return name.startswith(("tok_embeddings.", "layers.", "output.", "norm."))


def _torch_load(file: Path) -> dict:
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise CheckpointError(f"{file}: cannot read ({_first_line(e)})") from None
        # pre-1.6 (non-zip) serialization cannot be mapped; still weights-only, just read into memory
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e2:
            raise CheckpointError(f"{file}: cannot read ({_first_line(e2)})") from None
    except Exception as e:  # UnpicklingError (not weights-only), EOFError, zip errors, ...
        raise CheckpointError(f"{file}: cannot read ({_first_line(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("module"), dict):  # FlagAI training checkpoint wrapper
        obj = obj["module"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a state dict, found {type(obj).__name__}")
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _read_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file; tensors are views of the memory-mapped file."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
            names = list(handle.keys())
        except Exception as e:  # SafetensorError: bad header, truncated data, ...
            raise CheckpointError(f"{file}: not a readable safetensors file ({_first_line(e)})") from None
        for name in names:
            try:
                yield name, handle.get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read tensor {name} ({_first_line(e)})") from None
    else:
        for name, value in _torch_load(file).items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{file}: entry {name!r} is a {type(value).__name__}, not a tensor")
            yield name, value


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
    shapes.update({"model.norm.weight": (d,), "lm_head.weight": (v, d)})
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
        for name, t in _read_file(file):
            if name.endswith("rotary_emb.inv_freq"):  # written by old converters; recomputed from the config
                continue
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


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None) -> tuple[nn.Module, Config]:
    """(Transformer in eval mode, Config) from any supported checkpoint directory.

    dtype None → float32 on CPU, the checkpoint's own dtype elsewhere (see `default_dtype`).
    """
    from tianying.model import build_model

    cfg = load_config(path)
    device = torch.device(device)
    model = build_model(cfg, init=False)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = load_state_dict(path, cfg=cfg, shapes=shapes)  # memory-mapped views, nothing copied yet
    want = parse_dtype(dtype) or default_dtype(sd, device)
    for name, t in sd.items():  # one tensor at a time, so at most one extra tensor is alive
        if t.is_floating_point() and t.dtype != want or t.device != device:
            sd[name] = t.to(device=device, dtype=want if t.is_floating_point() else t.dtype)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: {_first_line(e)}") from None
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left:
        raise CheckpointError(f"{path}: {left[0]} was not loaded")
    return model.eval(), cfg


# ====================================================================== writing
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def _as_state_dict(model_or_sd: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_sd, nn.Module):
        return dict(model_or_sd.state_dict())
    return dict(model_or_sd)


def _target_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def _write_safetensors(file: Path, tensors: list[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> None:
    """Stream tensors into a safetensors file one at a time (no whole-shard copy in memory)."""
    # larger elements first keeps every tensor aligned to its element size (header is padded to 8)
    tensors = sorted(tensors, key=lambda nt: -torch.empty(0, dtype=_target_dtype(nt[1], dtype)).element_size())
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        td = _target_dtype(t, dtype)
        if td not in _ST_DTYPES:
            raise CheckpointError(f"{name}: dtype {td} cannot be stored in safetensors")
        size = t.numel() * torch.empty(0, dtype=td).element_size()
        header[name] = {"dtype": _ST_DTYPES[td], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in tensors:
            f.write(_raw_bytes(t, _target_dtype(t, dtype)))
        f.flush()
        os.fsync(f.fileno())


def _raw_bytes(t: torch.Tensor, dtype: torch.dtype) -> memoryview:
    t = t.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _write_text(file: Path, text: str) -> None:
    with open(file, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_json(file: Path, obj: Any) -> None:
    _write_text(file, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling directory that replaces `out_dir` only if the block completes."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise CheckpointError(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
            raise CheckpointError(f"{out_dir} is a non-empty directory without config.json; refusing to replace "
                                  "it (choose a new or checkpoint directory)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        _fsync_dir(tmp)
        if out_dir.exists():
            # a crash between these two renames leaves the old checkpoint complete under `old`
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "ckpt")
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_tokenizer(tokenizer_dir: str | Path | None, out: Path, cfg: Config | None = None) -> None:
    if tokenizer_dir is None:
        return
    src = Path(tokenizer_dir)
    if not src.is_dir():
        raise CheckpointError(f"tokenizer directory {src} does not exist")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            with open(out / name, "rb+") as f:
                os.fsync(f.fileno())
    from tianying.templates import checkpoint_template, write_chat_template

    # the template as Jinja too, so transformers / vLLM / llama.cpp render the chats tianying renders
    write_chat_template(out, checkpoint_template(src, cfg))


def _prepare(model_or_sd: nn.Module | Mapping[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    sd = {k: v for k, v in _as_state_dict(model_or_sd).items() if not k.endswith("rotary_emb.inv_freq")}
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
    with _atomic_dir(out_dir) as tmp:
        if len(shards) == 1:
            _write_safetensors(tmp / "model.safetensors", shards[0], dtype)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(tmp / fname, shard, dtype)
                weight_map.update({name: fname for name, _ in shard})
            _write_json(tmp / "model.safetensors.index.json",
                        {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(tmp / "config.json", hf)
        _write_json(tmp / "generation_config.json", gen)
        _copy_tokenizer(tokenizer_dir, tmp, cfg)
    return Path(out_dir)


def save_flagai(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], cfg: Config, out_dir: str | Path,
                tokenizer_dir: str | Path | None = None, dtype: str | torch.dtype | None = None) -> Path:
    """Write FlagAI's v1 native layout: pytorch_model.bin (native names, interleaved q/k) + native config.json.

    The v1 format has no rope_theta / rope_scaling; when they differ from the v1 defaults they are stored as
    extra config.json fields (read back by `load_config`, ignored by FlagAI itself — hence the warning).
    """
    dtype = parse_dtype(dtype)
    sd = _prepare(model_or_state_dict, cfg)
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
    with _atomic_dir(out_dir) as tmp:
        with open(tmp / "pytorch_model.bin", "wb") as f:
            torch.save(native, f)
            f.flush()
            os.fsync(f.fileno())
        _write_json(tmp / "config.json", conf)
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
