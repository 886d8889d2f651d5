"""A memory budget: run a model whose weights exceed `memory_limit` by streaming its layers from disk.

BMInf's scheme (seed-spec §5), on the CPU: with S the bytes of one transformer layer and R the bytes of
everything outside the layers (embeddings, final norm, LM head — always resident),

    n_fit = ⌊(limit · (1 − reserve) − R) / S⌋,   n_fit ≥ L → all resident;  n_fit < 2 → error;
    otherwise n_fit − 2 layers stay resident (spread over the depth) and the rest stream through 2 buffers.

Streamed layers own no memory: their parameters are views of one of the two slot buffers, which are
refilled with `os.preadv` from the checkpoint's safetensors file just before the layer runs, while the
previous layer computes (a background thread prefetches the next streamed layer into the other slot).
We read with preadv rather than mmap on purpose: pages of a mapping count in the process' resident set
once touched and stay there until the kernel feels pressure, so a budget on mapped weights could not be
held; file reads go through the page cache, which is not ours and which the kernel reclaims freely (and
which makes repeated reads of a hot file a memcpy). `reserve` (8%) is left for activations and the KV cache.

When the target dtype differs from the file's, or weights are quantized on load, each layer is converted
once at load time and written to a temporary cache file, from which it then streams.
Outputs equal the unlimited model's bit for bit: same modules, same weights, same kernels.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tianying.config import Config
from tianying.quantize.linear import QuantizeError, QuantLinear
from tianying.weights import (
    ST_DTYPES,
    load_config,
    parse_dtype,
    parse_size,
    read_exact,
    safetensors_header,
    tie_embeddings,
    weight_files,
)

RESERVE = 0.08  # share of the limit kept for activations, the KV cache and the allocator's slack
ASSUMED_READ_GBPS = 2.0  # streaming rate from a warm page cache / NVMe, for the slowdown estimate
ASSUMED_MEM_GBPS = 20.0  # resident weight read rate of a decode step, for the slowdown estimate

def parse_memory(limit: int | str) -> int:
    """Bytes from an int or "2GiB" / "500MB" (binary with i, decimal without, as in weights.parse_size)."""
    return parse_size(limit)


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class Loc:
    """Where one tensor's bytes live: a file, a byte range, and how to view them."""

    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def safetensors_index(files: list[Path]) -> dict[str, Loc]:
    """Tensor locations from the safetensors headers of `files`."""
    out: dict[str, Loc] = {}
    for f in files:
        for name, (offset, nbytes, code, shape) in safetensors_header(f).items():
            if code not in ST_DTYPES:
                raise QuantizeError(f"{f}: tensor {name!r} has dtype {code}, which memory_limit cannot stream")
            out[name] = Loc(f, offset, nbytes, ST_DTYPES[code], shape)
    return out


def read_into(fd: int, loc: Loc, buf: torch.Tensor) -> None:
    """Fill uint8 tensor `buf` [loc.nbytes] from the file (the GIL is released while the kernel copies)."""
    read_exact(fd, loc.offset, buf[:loc.nbytes], loc.file)


def read_tensor(fd: int, loc: Loc) -> torch.Tensor:
    buf = torch.empty(loc.nbytes, dtype=torch.uint8)
    read_into(fd, loc, buf)
    return buf.view(loc.dtype).view(loc.shape)


@dataclass
class MemoryPlan:
    limit: int
    other_bytes: int
    layer_bytes: int
    n_layer: int
    resident: list[int]
    streamed: list[int]
    source: str = ""

    def describe(self) -> str:
        lines = [f"memory plan (limit {_fmt(self.limit)}): resident {_fmt(self.other_bytes)} embeddings/norm/head "
                 f"+ {len(self.resident)} of {self.n_layer} layers × {_fmt(self.layer_bytes)}"]
        if self.streamed:
            lines.append(f"  streaming {len(self.streamed)} layers through 2 buffers ({_fmt(2 * self.layer_bytes)}) "
                         f"from {self.source}; resident layers: {self.resident or 'none'}")
        lines.append(f"  weights resident: {_fmt(self.resident_bytes)}; weights in total: {_fmt(self.total_bytes)}")
        return "\n".join(lines)

    @property
    def resident_bytes(self) -> int:
        return self.other_bytes + (len(self.resident) + min(2, len(self.streamed))) * self.layer_bytes

    @property
    def total_bytes(self) -> int:
        return self.other_bytes + self.n_layer * self.layer_bytes

    def slowdown(self) -> float:
        """Decode-step time ratio: max(resident compute, stream read) + … vs reading every weight from RAM."""
        base = self.total_bytes / (ASSUMED_MEM_GBPS * 1e9)
        streamed = len(self.streamed) * self.layer_bytes / (ASSUMED_READ_GBPS * 1e9)
        return max(base, streamed) / base if base else 1.0


def make_plan(limit: int, other_bytes: int, layer_bytes: int, n_layer: int) -> MemoryPlan:
    budget = limit * (1 - RESERVE) - other_bytes
    n_fit = int(budget // layer_bytes) if layer_bytes else n_layer
    if n_fit >= n_layer:
        return MemoryPlan(limit, other_bytes, layer_bytes, n_layer, list(range(n_layer)), [])
    if n_fit < 2:
        need = (other_bytes + 2 * layer_bytes) / (1 - RESERVE)
        raise QuantizeError(f"memory_limit {_fmt(limit)} is too small: embeddings/head take {_fmt(other_bytes)} and "
                            f"streaming needs 2 layer buffers of {_fmt(layer_bytes)}; use at least {_fmt(need)}")
    n_fixed = n_fit - 2
    fixed = sorted({round((i + 0.5) * n_layer / n_fixed - 0.5) for i in range(n_fixed)}) if n_fixed else []
    return MemoryPlan(limit, other_bytes, layer_bytes, n_layer, fixed, [i for i in range(n_layer) if i not in fixed])


class LayerStreamer:
    """Keeps streamed layers' tensors as views of two slot buffers and fills a slot before its layer runs."""

    def __init__(self, blocks: nn.ModuleList, template: dict[str, Loc]) -> None:
        self.blocks, self.template = blocks, template
        self.streamed: list[int] = []
        self.locs: dict[int, dict[str, Loc]] = {}
        self.slots = [{n: torch.empty(loc.nbytes, dtype=torch.uint8) for n, loc in template.items()}
                      for _ in range(2)]
        self.slot_of: dict[int, int] = {}
        self.owner: list[int | None] = [None, None]
        self.pending: list[tuple[int, Future] | None] = [None, None]
        self.fds: dict[Path, int] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="tianying-stream")
        self.lock = threading.Lock()
        self.reads = 0

    def attach(self, layer: int, locs: dict[str, Loc]) -> None:
        """Make `layer` streamed: its tensors become views of its slot, filled from `locs` when it runs."""
        if {n: (loc.nbytes, loc.dtype, loc.shape) for n, loc in locs.items()} != {
                n: (loc.nbytes, loc.dtype, loc.shape) for n, loc in self.template.items()}:
            raise QuantizeError(f"layer {layer} differs in shape or dtype from layer 0; cannot share buffers")
        self.slot_of[layer] = len(self.streamed) % 2
        self.streamed.append(layer)
        self.locs[layer] = locs
        slot = self.slots[self.slot_of[layer]]
        _assign(self.blocks[layer], {n: slot[n].view(loc.dtype).view(loc.shape) for n, loc in locs.items()})
        self.blocks[layer].register_forward_pre_hook(lambda mod, args, i=layer: self.ensure(i))

    def _fd(self, f: Path) -> int:
        with self.lock:
            if f not in self.fds:
                self.fds[f] = os.open(f, os.O_RDONLY)
            return self.fds[f]

    def _load(self, layer: int) -> None:
        slot = self.slots[self.slot_of[layer]]
        for n, loc in self.locs[layer].items():
            read_into(self._fd(loc.file), loc, slot[n])
        self.reads += 1

    def ensure(self, layer: int) -> None:
        s = self.slot_of[layer]
        p = self.pending[s]
        if p is not None:
            p[1].result()
            self.pending[s] = None
            self.owner[s] = p[0]
        if self.owner[s] != layer:
            self._load(layer)
            self.owner[s] = layer
        k = self.streamed.index(layer)
        nxt = self.streamed[(k + 1) % len(self.streamed)]
        t = self.slot_of[nxt]
        if t != s and self.owner[t] != nxt and self.pending[t] is None:
            self.owner[t] = None
            self.pending[t] = (nxt, self.pool.submit(self._load, nxt))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Point the parameters/buffers named in `tensors` (relative names) at those tensors, without copying."""
    for name, t in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        mod = module.get_submodule(prefix) if prefix else module
        if leaf in mod._parameters:
            mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[leaf] = t


def load_with_memory_limit(path: str | Path, memory_limit: int | str, device: str | torch.device = "cpu",
                           dtype: str | torch.dtype | None = None, quantize: str | None = None,
                           verbose: bool = True) -> tuple[nn.Module, Config]:
    """A model whose resident weights stay within `memory_limit`, layers streaming from disk as needed.

    Args:
        path: a Hugging Face checkpoint directory with safetensors weights (`tianying convert` writes one).
        dtype: activation/weight dtype (None → float32, as `load_model` on CPU).
        quantize: "int8" / "int4" / ... to quantize the linears of every layer on load (then S shrinks).
    """
    from tianying.model import build_model
    from tianying.quantize import apply_quantization

    if torch.device(device).type != "cpu":
        raise QuantizeError("memory_limit streams disk → CPU; CPU → GPU streaming is not implemented yet")
    limit = parse_memory(memory_limit)
    path = Path(path)
    from tianying.quantize.format import is_quantized_checkpoint

    if is_quantized_checkpoint(path):
        raise QuantizeError(f"{path} is a quantized (GPTQ/AWQ) checkpoint; memory_limit streams float checkpoints "
                            "only (for now): pass the float checkpoint with quantize='int8'/'int4' instead")
    cfg = load_config(path)
    files = weight_files(path)
    if any(f.suffix != ".safetensors" for f in files):
        raise QuantizeError(f"{path}: memory_limit needs safetensors weights; run `tianying convert` first")
    index = safetensors_index(files)
    want = parse_dtype(dtype) or torch.float32
    model = build_model(cfg, init=False)
    blocks = model.model.layers
    n_layer = len(blocks)

    def layer_locs(i: int) -> dict[str, Loc]:
        names = [n for n, _ in blocks[i].named_parameters()]
        missing = [n for n in names if f"model.layers.{i}.{n}" not in index]
        if missing:
            raise QuantizeError(f"{path}: layer {i} lacks {missing[0]} (not a plain HF checkpoint?)")
        return {n: index[f"model.layers.{i}.{n}"] for n in names}

    convert = quantize is not None or any(loc.dtype != want for loc in layer_locs(0).values())
    fds: dict[Path, int] = {}

    def fd(f: Path) -> int:
        if f not in fds:
            fds[f] = os.open(f, os.O_RDONLY)
        return fds[f]

    def materialize(i: int) -> dict[str, torch.Tensor]:
        """Layer i in its final form (dtype, quantized), as fresh tensors."""
        ts = {n: read_tensor(fd(loc.file), loc) for n, loc in layer_locs(i).items()}
        if not convert:
            return ts
        ts = {n: t.to(want) for n, t in ts.items()}
        if quantize is None:
            return ts
        block = blocks[i]
        _assign(block, ts)
        apply_quantization(block, quantize)
        return {n: t for n, t in block.state_dict().items()}

    # the layer's final size, from layer 0 (every layer has the same shapes)
    layer0 = materialize(0)
    layer_bytes = sum(t.numel() * t.element_size() for t in layer0.values())
    other = [n for n, _ in model.named_parameters() if not n.startswith("model.layers.")]
    other_bytes = sum(index[n].nbytes // index[n].dtype.itemsize * want.itemsize for n in other)
    plan = make_plan(limit, other_bytes, layer_bytes, n_layer)
    plan.source = "a converted cache file" if convert else ", ".join(f.name for f in files)
    if verbose:
        print(plan.describe(), file=sys.stderr)
    if plan.streamed:
        s = plan.slowdown()
        warnings.warn(f"memory_limit: {len(plan.streamed)} of {n_layer} layers stream from disk on every forward "
                      f"({_fmt(len(plan.streamed) * layer_bytes)} per step); expect decoding ≈{s:.0f}× slower "
                      f"than with all weights resident (assuming ~{ASSUMED_READ_GBPS:g} GB/s reads)", stacklevel=2)

    for n in other:  # resident, in their own memory (read, not mapped)
        loc = index[n]
        _assign(model, {n: read_tensor(fd(loc.file), loc).to(want)})
    tie_embeddings(model)
    cache = None
    streamer = None
    if plan.streamed:  # slot buffers shaped like layer 0 in its final form
        template = {n: Loc(Path(), 0, t.numel() * t.element_size(), t.dtype, tuple(t.shape)) for n, t in layer0.items()}
        streamer = LayerStreamer(blocks, template)
    for i in range(n_layer):
        ts = layer0 if i == 0 else None
        if i in plan.resident:
            ts = ts if ts is not None else materialize(i)
            if quantize is None:
                _assign(blocks[i], ts)  # (a quantized block already holds its tensors)
            continue
        if not convert:
            streamer.attach(i, layer_locs(i))
            continue
        if cache is None:
            cache = tempfile.NamedTemporaryFile(prefix="tianying-offload-", suffix=".bin",
                                                dir=os.environ.get("TIANYING_CACHE_DIR"))
        ts = ts if ts is not None else materialize(i)
        locs: dict[str, Loc] = {}
        for n, t in ts.items():
            t = t.contiguous()
            off = cache.tell()
            cache.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
            locs[n] = Loc(Path(cache.name), off, t.numel() * t.element_size(), t.dtype, tuple(t.shape))
        del ts
        streamer.attach(i, locs)  # the layer's own tensors are released here
    del layer0
    if cache is not None:
        cache.flush()
    for f in fds.values():
        os.close(f)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.cache_ops = False  # kernel operands would be per-layer resident copies
    if streamer is not None:
        streamer.cache_file = cache  # keeps the temporary file alive as long as the model
        model._layer_streamer = streamer
    model.memory_plan = plan
    return model.eval(), cfg


load_offloaded = load_with_memory_limit
