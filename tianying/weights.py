"""Weight files: the one place that finds, validates, reads and writes them.

Every loader goes through here — float checkpoints (tianying.checkpoint), GPTQ/AWQ (tianying.quantize.format),
memory-limited streaming (tianying.quantize.offload), adapters (tianying.lora) — so that there is one answer to
each of these questions:
- Which files? `weight_files(dir)`: the shard index if there is one, else the standard single file, else the
  `*.safetensors` (then `*.bin`/`*.pt`/`*.pth`, then `*.gguf`) files present.
- Is a path safe? `inside(root, name)`: every file named by an index, found by a glob or reached through a
  symlink must resolve inside the checkpoint directory; `"../../outside.safetensors"`, an absolute path or a
  symlink out is refused with one line. The one exception is the Hugging Face hub cache, whose snapshot
  files are symlinks to `../../blobs/<hash>` of the same repository.
- How is a tensor read? `iter_tensors(file)`: memory-mapped views (safetensors maps the file;
  `torch.load(weights_only=True, mmap=True)` maps the zip; a pickle from the hub must not run code), or
  `open_tensors(file).get(name)` / `.get_as(...)`: fresh tensors read with `os.preadv`, for loaders that must
  not keep mapped pages resident. `.gguf` files go to `tianying.gguf_io.iter_tensors`, imported on demand.
- Which dtype? `parse_dtype`, `dtype_name`, `ST_DTYPES`/`ST_CODES`: one table.
- Which config? `load_config(dir)`: the only reader of config.json (+ generation_config.json's BOS/EOS);
  invalid JSON, wrong types and impossible values are one line naming the file and the field.
- How is a directory written? `atomic_dir(out)`: into a temporary sibling, every file fsynced, then swapped
  in by one rename; the old directory stays complete until the new one is.
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tianying.config import Config, ConfigError, _reject_duplicates
from tianying.errors import TianyingError


class CheckpointError(TianyingError):
    """A checkpoint that cannot be read or written (missing, corrupt, unsafe, or not matching its config)."""


# ====================================================================== dtypes (the one table)
_USER_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
                "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}  # safetensors dtype code → torch dtype
ST_CODES = {v: k for k, v in ST_DTYPES.items()}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """"fp32"/"float32"/"bf16"/"bfloat16"/"fp16"/"float16" or a torch dtype → torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _USER_DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (use fp32, bf16 or fp16)")
    return _USER_DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 → "bfloat16" (config.json's `torch_dtype` spelling)."""
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


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# ====================================================================== JSON and the config reader
def read_json(file: str | Path, error: type[TianyingError] = CheckpointError, reject_duplicates: bool = False) -> Any:
    """A JSON file, or one line naming the file and where the JSON breaks."""
    file = Path(file)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise error(f"{file}: cannot read ({e.strerror})") from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates if reject_duplicates else None)
    except json.JSONDecodeError as e:
        raise error(f"{file}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def load_config(path: str | Path) -> Config:
    """The Config of a checkpoint directory (or of a config.json path), any dialect.

    generation_config.json, when present, supplies BOS/EOS (it is what transformers generates with); an EOS
    list keeps its first id. Every error is one line naming the file (and the field, for bad values).
    """
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    if not file.is_file():
        where = Path(path)
        if not where.exists():
            raise CheckpointError(f"checkpoint directory {where} does not exist")
        raise CheckpointError(f"no config.json in {where}")
    raw = read_json(file, ConfigError, reject_duplicates=True)
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a JSON object, found {type(raw).__name__}")
    gen_file = file.with_name("generation_config.json")
    if gen_file.is_file():
        gen = read_json(gen_file, ConfigError)
        if isinstance(gen, dict):
            raw = dict(raw)
            for key in ("bos_token_id", "eos_token_id"):
                if gen.get(key) is not None:
                    raw[key] = gen[key]
    try:
        return Config.from_hf(raw)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def read_quantization_config(path: str | Path) -> dict | None:
    """`quantization_config` from config.json, else AutoGPTQ's quantize_config.json or AutoAWQ's
    quant_config.json, else None."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        raw = read_json(cfg_file, ConfigError, reject_duplicates=True)
        qc = raw.get("quantization_config") if isinstance(raw, dict) else None
        if qc:
            if not isinstance(qc, dict):
                raise ConfigError(f"{cfg_file}: quantization_config must be an object")
            return dict(qc)
    for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        alt = path / name
        if alt.is_file():
            qc = read_json(alt, ConfigError)
            if not isinstance(qc, dict):
                raise ConfigError(f"{alt}: expected a JSON object")
            qc.setdefault("quant_method", method)
            return qc
    return None


# ====================================================================== files and paths
SINGLE_FILES = (("model.safetensors.index.json", "model.safetensors"),
                ("pytorch_model.bin.index.json", "pytorch_model.bin"))
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# files with weight suffixes that are not model weights (trainer state, adapters)
_NOT_WEIGHTS = re.compile(r"(training_args|optimizer.*|scheduler|rng_state.*|adapter_model|trainer_state)\.\w+")


def _allowed_roots(root: Path) -> list[Path]:
    roots = [root]
    if root.parent.name == "snapshots":  # hub cache: snapshots/<rev>/f → ../../blobs/<sha>, same repository
        roots.append(root.parent.parent / "blobs")
    return roots


def inside(root: str | Path, name: str | Path, what: str = "") -> Path:
    """`root/name`, refused (one line) unless it is a relative path that resolves inside `root`."""
    root = Path(root)
    where = f" named in {what}" if what else ""
    if not isinstance(name, (str, Path)) or not str(name):
        raise CheckpointError(f"{root}: weight file name{where} must be a non-empty string, got {name!r}")
    rel = Path(name)
    if rel.is_absolute() or rel.drive or ".." in rel.parts:
        raise CheckpointError(f"{root}: refusing weight file {str(name)!r}{where}: it is not a plain name inside "
                              "the checkpoint directory")
    p = root / rel
    real = p.resolve()
    if not any(real.is_relative_to(r.resolve()) for r in _allowed_roots(root)):
        raise CheckpointError(f"{root}: refusing weight file {str(name)!r}{where}: it is a link to {real}, "
                              "outside the checkpoint directory")
    return p


def read_index(index: Path) -> list[Path]:
    """The shard files of a `*.index.json`, each checked to lie inside the directory and to exist."""
    raw = read_json(index)
    wm = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index}: not a valid shard index (no weight_map object)")
    files = []
    for name in dict.fromkeys(wm.values()):  # first-seen order, deduplicated
        if not isinstance(name, str):
            raise CheckpointError(f"{index}: shard names must be strings, got {name!r}")
        files.append(inside(index.parent, name, index.name))
    for p in sorted(files):
        if not p.is_file():
            raise CheckpointError(f"shard {p.name} named in {index.name} is missing from {index.parent}")
    return sorted(files)


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory, in the order they are read."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist" if not path.exists()
                              else f"{path} is not a checkpoint directory")
    for index, single in SINGLE_FILES:
        if (path / index).is_file():
            return read_index(path / index)
        if (path / single).is_file():
            return [inside(path, single)]
    # other tools' names: AutoGPTQ's gptq_model-4bit-128g.safetensors, consolidated.00.pth, model.gguf, ...
    for suffixes in ((".safetensors",), (".bin", ".pt", ".pth"), (".gguf",)):
        found = sorted(p.name for p in path.iterdir() if p.suffix in suffixes and not _NOT_WEIGHTS.fullmatch(p.name)
                       and p.is_file())
        if found:
            return [inside(path, f) for f in found]
    raise CheckpointError(f"no weights in {path} (looked for model.safetensors, pytorch_model.bin, their sharded "
                          "index files and other *.safetensors / *.bin / *.gguf files)")


# ====================================================================== reading
def torch_load(file: Path, mmap: bool = True) -> dict:
    """A `.bin`/`.pt` state dict, weights only (never runs pickled code), memory-mapped when the file allows."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if not mmap or "mmap" not in str(e):
            raise CheckpointError(f"{file}: cannot read ({first_line(e)})") from None
        # pre-1.6 (non-zip) serialization cannot be mapped; still weights-only, just read into memory
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e2:
            raise CheckpointError(f"{file}: cannot read ({first_line(e2)})") from None
    except Exception as e:  # UnpicklingError (not weights-only), EOFError, zip errors, ...
        raise CheckpointError(f"{file}: cannot read ({first_line(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("module"), dict):  # FlagAI training checkpoint wrapper
        obj = obj["module"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a state dict, found {type(obj).__name__}")
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{file}: entry {name!r} is a {type(value).__name__}, not a tensor")
    return obj


def iter_tensors(file: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file; tensors are views of the memory-mapped file.

    A `.gguf` file is read by `tianying.gguf_io.iter_tensors(file)` (HF names, rotate-half q/k), imported here
    only when one is met so that nothing else pays for the `gguf` package.
    """
    file = Path(file)
    if file.suffix == ".gguf":
        import tianying.gguf_io as gguf_io

        yield from gguf_io.iter_tensors(file)
        return
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
            names = list(handle.keys())
        except Exception as e:  # SafetensorError: bad header, truncated data, ...
            raise CheckpointError(f"{file}: not a readable safetensors file ({first_line(e)})") from None
        for name in names:
            try:
                yield name, handle.get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read tensor {name} ({first_line(e)})") from None
    else:
        yield from torch_load(file).items()


def safetensors_header(file: Path) -> dict[str, tuple[int, int, str, tuple[int, ...]]]:
    """name → (absolute byte offset, byte length, dtype code, shape) from a safetensors header, checked to lie
    inside the file. The format: an 8-byte little-endian header length, the JSON header, then the data."""
    try:
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        size = file.stat().st_size
    except (OSError, struct.error, ValueError, UnicodeDecodeError, MemoryError, OverflowError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    out = {}
    try:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            out[name] = (8 + n + b, e - b, info["dtype"], tuple(info["shape"]))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors header ({type(e).__name__}: {e})") from None
    for name, (b, nbytes, _, _) in out.items():
        if nbytes < 0 or b + nbytes > size:
            raise CheckpointError(f"{file}: tensor {name!r} lies outside the file (truncated?)")
    return out


def read_exact(fd: int, offset: int, buf: torch.Tensor, file: Path | str = "") -> None:
    """Fill the CPU tensor `buf` with bytes [offset, offset + buf.nbytes) of `fd` (the GIL is released while
    the kernel copies, so a prefetch thread overlaps with compute)."""
    mv = memoryview(buf.numpy()).cast("B")
    done = 0
    while done < len(mv):
        k = os.preadv(fd, [mv[done:]], offset + done)
        if k <= 0:
            raise CheckpointError(f"{file}: short read at byte {offset + done}")
        done += k


_CHUNK_BYTES = 4 << 20  # conversions (dtype, device) go through a buffer of this size


class SafetensorsFile:
    """Tensors of one safetensors file, read on demand with `os.preadv` into memory of our own.

    Not `safe_open(...).get_tensor`: that hands out views of a mapping of the file, whose pages count in the
    resident set once touched and stay there while the file is open, so converting the fp32 embeddings of a
    100k vocabulary to bf16 cost the mapped fp32 pages *and* the bf16 copy. Reads go through the page cache,
    which is the kernel's to reclaim.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries = safetensors_header(path)
        self._fd: int | None = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def nbytes(self, name: str) -> int:
        return self.entries[name][1]

    def dtype_of(self, name: str) -> torch.dtype | None:
        return ST_DTYPES.get(self.entries[name][2])

    def _read(self, offset: int, buf: torch.Tensor) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        read_exact(self._fd, offset, buf, self.path)

    def get(self, name: str) -> torch.Tensor:
        """A fresh CPU tensor in the file's dtype."""
        offset, nbytes, dt, shape = self.entries[name]
        if dt not in ST_DTYPES:  # a dtype we do not parse ourselves (fp8, unsigned...): let safetensors read it
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as sf:
                return sf.get_tensor(name).clone()
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self._read(offset, buf)
        return buf.view(ST_DTYPES[dt]).view(shape)

    def get_as(self, name: str, dtype: torch.dtype, device: torch.device, scratch: list) -> torch.Tensor:
        """The tensor converted to `dtype` on `device`, without ever holding it whole in the file's dtype:
        read straight into the result when nothing changes, else through a reused `_CHUNK_BYTES` buffer."""
        offset, nbytes, dt, shape = self.entries[name]
        src = ST_DTYPES.get(dt)
        if src is None:
            return self.get(name).to(device=device, dtype=dtype)
        out = torch.empty(shape, dtype=dtype, device=device)
        if src == dtype and device.type == "cpu":
            self._read(offset, out.view(-1).view(torch.uint8))
            return out
        if not scratch:
            scratch.append(torch.empty(_CHUNK_BYTES, dtype=torch.uint8))
        buf, per = scratch[0], _CHUNK_BYTES // src.itemsize
        flat, numel = out.view(-1), nbytes // src.itemsize
        for e0 in range(0, numel, per):
            e1 = min(numel, e0 + per)
            chunk = buf[:(e1 - e0) * src.itemsize]
            self._read(offset + e0 * src.itemsize, chunk)
            flat[e0:e1].copy_(chunk.view(src))
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class TorchFile:
    """Tensors of one `.bin`/`.pt` state dict, memory-mapped (`torch.load(mmap=True)`): nothing is read until a
    tensor is used. Results never alias the mapping, and the mapped pages a tensor was copied from are dropped
    from the resident set right after the copy (see `_drop_pages`), else they would add up to the whole file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sd: dict | None = None
        self._mapped = False

    def _load(self) -> dict:
        if self._sd is None:
            try:
                self._sd, self._mapped = torch_load(self.path, mmap=True), True
            except CheckpointError:
                # legacy (pre-zip) serialization cannot be mapped: read it whole, still weights-only
                self._sd, self._mapped = torch_load(self.path, mmap=False), False
        return self._sd

    def keys(self) -> list[str]:
        return list(self._load())

    def nbytes(self, name: str) -> int:
        t = self._load()[name]
        return t.numel() * t.element_size()

    def dtype_of(self, name: str) -> torch.dtype | None:
        return self._load()[name].dtype

    def _done(self, t: torch.Tensor) -> None:
        if self._mapped:  # never on memory of our own: that would be zeroed
            _drop_pages(t.data_ptr(), t.numel() * t.element_size())

    def get(self, name: str) -> torch.Tensor:
        t = self._load()[name]
        out = t.clone()
        self._done(t)
        return out

    def get_as(self, name: str, dtype: torch.dtype, device: torch.device, scratch: list) -> torch.Tensor:
        t = self._load()[name]
        if not t.is_contiguous():
            out = t.to(device=device, dtype=dtype, copy=True)
            self._done(t)
            return out
        out = torch.empty(t.shape, dtype=dtype, device=device)
        src, dst, per = t.view(-1), out.view(-1), max(1, _CHUNK_BYTES // t.element_size())
        for e0 in range(0, src.numel(), per):
            dst[e0:e0 + per].copy_(src[e0:e0 + per])
            self._done(src[e0:e0 + per])
        return out

    def close(self) -> None:
        self._sd = None


def open_tensors(file: Path) -> SafetensorsFile | TorchFile:
    """A lazy reader of one weight file: `.keys()`, `.get(name)`, `.get_as(name, dtype, device, scratch)`."""
    if file.suffix == ".gguf":
        raise CheckpointError(f"{file}: GGUF files load through `tianying convert` or LLM.load, not this reader")
    return SafetensorsFile(file) if file.suffix == ".safetensors" else TorchFile(file)


def _drop_pages(ptr: int, nbytes: int) -> None:
    """madvise(MADV_DONTNEED) the whole pages inside [ptr, ptr + nbytes) of a read-only file mapping: they leave
    the resident set, and would be read from the file again if touched. Linux only; elsewhere nothing."""
    fn = _libc_fn("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
    page = mmap.PAGESIZE
    lo, hi = -(-ptr // page) * page, (ptr + nbytes) // page * page
    if fn is not None and hi > lo:
        fn(lo, hi - lo, 4)  # MADV_DONTNEED


@functools.cache
def _libc_fn(name: str, argtypes: tuple):  # noqa: ANN202 - a ctypes function or None
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


def nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of floating-point tensors holding a NaN or an infinity (checked in chunks: no full-size copies)."""
    bad = []
    for name, t in named:
        if not t.is_floating_point() or t.is_meta:
            continue
        flat = t.detach().reshape(-1)
        for s in range(0, flat.numel(), 1 << 22):
            if not torch.isfinite(flat[s:s + (1 << 22)]).all():
                bad.append(name)
                break
    return bad


def check_finite(model: torch.nn.Module, where: str | Path = "the checkpoint") -> None:
    """`check_weights=True`: one line naming the tensors that hold NaN/Inf (the first few, and how many)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    for n, m in model.named_modules():  # quantized layers keep their float parts as buffers already; scales too
        if hasattr(m, "scales") and isinstance(m.scales, torch.Tensor):
            named.append((f"{n}.scales" if n else "scales", m.scales))
    bad = list(dict.fromkeys(nonfinite(named)))
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"{where}: NaN or Inf in {', '.join(bad[:3])}{more}")


def check_files(path: str | Path) -> None:
    """`check_finite` on the tensors of a checkpoint's files (for models whose weights are not all resident)."""
    bad: list[str] = []
    for file in weight_files(path):
        bad += nonfinite(iter_tensors(file))
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"{path}: NaN or Inf in {', '.join(bad[:3])}{more}")


def tie_embeddings(model: torch.nn.Module) -> None:
    """For `tie_word_embeddings` configs, make the LM head share the embedding table again: a loader that
    assigns tensors parameter by parameter (load_state_dict(assign=True), streaming) leaves them separate."""
    cfg = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    if cfg is not None and cfg.tie_word_embeddings and type(head) is torch.nn.Linear:
        head.weight = model.model.embed_tokens.weight


# ====================================================================== writing
def write_safetensors(file: Path, tensors: list[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Stream tensors into a safetensors file one at a time (no whole-shard copy in memory), then fsync.

    `dtype` casts the floating-point tensors; others keep theirs.
    """
    def target(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    # larger elements first keeps every tensor aligned to its element size (header is padded to 8)
    tensors = sorted(tensors, key=lambda nt: -target(nt[1]).itemsize)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, t in tensors:
        td = target(t)
        if td not in ST_CODES:
            raise CheckpointError(f"{name}: dtype {td} cannot be stored in safetensors")
        size = t.numel() * td.itemsize
        header[name] = {"dtype": ST_CODES[td], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in tensors:
            t = t.detach().to(device="cpu", dtype=target(t)).contiguous().reshape(-1)
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def write_text(file: Path, text: str) -> None:
    with open(file, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(file: Path, obj: Any) -> None:
    write_text(file, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
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


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = _libc_fn("renameat2", (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint))
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextmanager
def atomic_dir(out_dir: str | Path, marker: str | None = "config.json") -> Iterator[Path]:
    """Yields a temporary sibling directory that replaces `out_dir` only if the block completes.

    Everything the block writes should be fsynced (the writers above are); the directory itself is fsynced
    here. Replacing swaps the two directories in one step where the kernel can (renameat2), else renames the
    old one aside first: either way the old version is complete until the new one is in place, and a crash
    leaves one or the other. A non-empty existing directory without `marker` is refused (a typo must not
    replace someone's home directory). Loaded parameters may be views of the old files: they stay valid,
    since those files are unlinked, not rewritten.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise CheckpointError(f"{out_dir} exists and is not a directory")
        if marker and any(out_dir.iterdir()) and not (out_dir / marker).is_file():
            raise CheckpointError(f"{out_dir} is a non-empty directory without {marker}; refusing to replace "
                                  "it (choose a new or checkpoint directory)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        fsync_dir(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, out_dir: Path) -> None:
    """Put the complete directory `new` (files already fsynced) at `out_dir`, replacing any old version only
    once `new` is in place: one atomic swap where the kernel can (renameat2), else the old one is renamed
    aside first, so a crash between the two renames leaves it complete under `.NAME.old-*`."""
    new, out_dir = Path(new), Path(out_dir)
    if not out_dir.exists():
        os.rename(new, out_dir)
    elif _exchange(new, out_dir):
        shutil.rmtree(new, ignore_errors=True)  # now the old version
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / "ckpt")
        os.rename(new, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out_dir.parent)

