"""GPTQ-format checkpoints (AutoGPTQ / transformers / GPTQModel layout), read and written.

Per quantized linear `{name}` with in_features K, out_features N, `pack = 32 / bits` values per int32:

    {name}.qweight  int32 [K/pack, N]   q[k, n] at bits (k % pack)·bits of row k // pack  (packed along K)
    {name}.qzeros   int32 [G, N/pack]   stored zero of (g, n) at bits (n % pack)·bits of column n // pack
    {name}.scales   fp16  [G, N]
    {name}.g_idx    int32 [K]           group of input column k (k // group_size unless act-order)
    {name}.bias     [N]                 only if the layer has one

and ŵ[n, k] = scales[g, n] · (q[k, n] − zero[g, n]) with g = g_idx[k]. config.json carries
`quantization_config = {quant_method: "gptq", bits, group_size, desc_act, sym, checkpoint_format, ...}`
(AutoGPTQ also reads a copy in quantize_config.json, which we write too).

The zero-point convention. AutoGPTQ's packer subtracts one before packing (`zeros -= 1`) and every v1 reader
adds it back after unpacking (`(qzeros >> shift) & maxq) + 1`): the "v1" format (`checkpoint_format:
"gptq"`, the default when the key is absent, and what the seed's Int4 models use). Symmetric 4-bit zeros are
8, stored as 7 (qzeros words 0x77777777). A zero of 0, which asymmetric quantization produces for groups
with no negative weights, would be stored as −1 → maxq and read back as maxq + 1: v1 cannot represent it.
GPTQModel's `checkpoint_format: "gptq_v2"` stores zeros as they are. We read both (v1: masked, then + 1,
as the readers do); we write v1 whenever every zero is ≥ 1 (always true for sym=True) and v2 otherwise, with
a warning that v1-only tools (AutoGPTQ, transformers' exllama kernels) will misread those groups.

Act-order (`desc_act`): g_idx is not monotone; group i holds the input columns perm[i·g:(i+1)·g] of GPTQ's
column order. We keep `perm = argsort(g_idx)` (stable) on the layer and the weights in that order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from tianying.config import Config
from tianying.quantize.linear import QuantizeError, QuantLinear, QuantSpec, quantized_layers, set_submodule

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# ---------------------------------------------------------------------------------------------- bit packing
def pack_int32(q: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integers < 2^bits along `dim` (32/bits per int32, first value in the lowest bits)."""
    pack = 32 // bits
    q = q.to(torch.int64).movedim(dim, -1)
    q = q.reshape(*q.shape[:-1], q.shape[-1] // pack, pack)
    shifts = torch.arange(pack, dtype=torch.int64) * bits
    words = (q << shifts).sum(dim=-1)  # < 2^32, exact in int64
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement view
    return words.movedim(-1, dim).contiguous()


def unpack_int32(w: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 → int16 values in [0, 2^bits) (unpacked along `dim`).

    One shift at a time in int32 (an arithmetic shift is fine: the mask keeps only the field's bits), so
    that reading a 100k-row LM head does not build 8-byte intermediates of the whole matrix.
    """
    pack = 32 // bits
    w = w.to(torch.int32).movedim(dim, -1)
    vals = torch.empty(*w.shape, pack, dtype=torch.int16)
    for i in range(pack):
        vals[..., i] = (w >> (i * bits)) & ((1 << bits) - 1)
    return vals.reshape(*w.shape[:-1], -1).movedim(-1, dim).contiguous()


# ---------------------------------------------------------------------------------------------- layer ↔ tensors
def layer_to_gptq(m: QuantLinear, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one layer (original column order, g_idx for act-order)."""
    bits, K = m.spec.bits, m.in_features
    g = m.spec.group_width(K)
    q = m.int_weight()  # [N, K] in stored order
    g_idx = torch.arange(K, dtype=torch.int32) // g
    if m.perm is not None:
        perm = m.perm.cpu()
        q_orig = torch.empty_like(q)
        q_orig[:, perm] = q
        q = q_orig
        g_idx = torch.empty_like(g_idx)
        g_idx[perm] = torch.arange(K, dtype=torch.int32) // g
    zeros = m.zeros.cpu().to(torch.int64)
    if checkpoint_format == "gptq":
        if (zeros < 1).any() or (zeros > (1 << bits)).any():
            raise QuantizeError("zero points of 0 cannot be stored in GPTQ v1 format; use gptq_v2")
        zeros = zeros - 1
    out = {
        "qweight": pack_int32(q.cpu().t(), bits, dim=0),
        "qzeros": pack_int32(zeros & ((1 << bits) - 1), bits, dim=1),
        "scales": m.scales.cpu().to(torch.float16).contiguous(),
        "g_idx": g_idx,
    }
    if m.bias is not None:
        out["bias"] = m.bias.detach().cpu().to(torch.float16).contiguous()
    return out


def layer_from_gptq(t: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool,
                    checkpoint_format: str = "gptq", dtype: torch.dtype = torch.float32,
                    name: str = "layer") -> QuantLinear:
    """Rebuild a QuantLinear from `qweight/qzeros/scales[/g_idx][/bias]`."""
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    pack = 32 // bits
    K, N = qweight.shape[0] * pack, qweight.shape[1]
    G = scales.shape[0]
    if scales.shape[1] != N or qzeros.shape != (G, N // pack) or K % G:
        raise QuantizeError(f"{name}: inconsistent GPTQ shapes qweight {tuple(qweight.shape)}, "
                            f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)} for {bits} bits")
    g = K // G
    if group_size not in (-1, g) and not (group_size == K and G == 1):
        raise QuantizeError(f"{name}: config says group_size {group_size} but the tensors hold {G} groups of {g}")
    q = unpack_int32(qweight, bits, dim=0).t()  # [N, K] original column order
    zeros = unpack_int32(qzeros, bits, dim=1)
    if checkpoint_format in ("gptq", "gptq_v1"):
        zeros = zeros + 1
    elif checkpoint_format != "gptq_v2":
        raise QuantizeError(f"{name}: unknown GPTQ checkpoint_format {checkpoint_format!r}")
    g_idx = t.get("g_idx")
    perm = None
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64)
        if g_idx.shape != (K,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= G:
            raise QuantizeError(f"{name}: g_idx must be [{K}] with values in [0, {G})")
        if not torch.equal(g_idx, torch.arange(K) // g):
            if not (torch.bincount(g_idx, minlength=G) == g).all():
                raise QuantizeError(f"{name}: g_idx assigns unequal numbers of columns to groups")
            perm = torch.argsort(g_idx, stable=True)
            q = q[:, perm]
    spec = QuantSpec(bits, group_size if group_size in (-1, g) else g, sym)
    return QuantLinear.from_int(q.to(torch.uint8), scales, zeros, spec, perm=perm,
                                bias=t.get("bias"), dtype=dtype)


# ---------------------------------------------------------------------------------------------- config
def read_quantization_config(path: str | Path) -> dict | None:
    """`quantization_config` from config.json, else AutoGPTQ's quantize_config.json, else None."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        qc = json.loads(cfg_file.read_text(encoding="utf-8")).get("quantization_config")
        if qc:
            return dict(qc)
    alt = path / "quantize_config.json"
    if alt.is_file():
        qc = json.loads(alt.read_text(encoding="utf-8"))
        qc.setdefault("quant_method", "gptq")
        return qc
    return None


def is_quantized_checkpoint(path: str | Path) -> bool:
    return read_quantization_config(path) is not None


def _check_qc(qc: dict) -> tuple[int, int, bool, str]:
    method = str(qc.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise QuantizeError(f"quant_method {method!r} is not supported (GPTQ-format checkpoints only)")
    bits = int(qc.get("bits", 4))
    if bits not in (4, 8):
        raise QuantizeError(f"GPTQ bits={bits} is not supported; use 8 or 4")
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    return bits, int(qc.get("group_size", -1)), bool(qc.get("sym", True)), fmt


# ---------------------------------------------------------------------------------------------- files
def _weight_files(path: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            wm = json.loads((path / index).read_text(encoding="utf-8"))["weight_map"]
            return [path / f for f in sorted(set(wm.values()))]
    files = sorted(p for p in path.glob("*.safetensors"))
    if not files:
        files = sorted(p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if not files:
        raise QuantizeError(f"no weight files (*.safetensors, *.bin) in {path}")
    return files


def _iter_tensors(files: list[Path]):  # noqa: ANN202 - generator of (name, tensor)
    from safetensors import safe_open

    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    yield k, sf.get_tensor(k)
        else:
            yield from torch.load(f, map_location="cpu", weights_only=True).items()


def load_quantized(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                   ) -> tuple[nn.Module, Config]:
    """A GPTQ-format checkpoint as a Transformer whose quantized linears are `QuantLinear`s.

    `dtype` is the activation/non-quantized weight dtype; None → bfloat16 on CPU (the dtype its int8/int4
    kernels are fast in) and float16 elsewhere (what GPTQ checkpoints store).
    """
    from tianying.model import build_model

    path = Path(path)
    qc = read_quantization_config(path)
    if qc is None:
        raise QuantizeError(f"{path} is not a quantized checkpoint (no quantization_config in config.json)")
    bits, group_size, sym, fmt = _check_qc(qc)
    cfg = Config.from_hf(path)
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cpu" else torch.float16
    model = build_model(cfg, init=False)
    expected = {n for n, _ in model.named_parameters()}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    filled: set[str] = set()
    for key, t in _iter_tensors(_weight_files(path)):
        prefix, _, leaf = key.rpartition(".")
        if leaf in ("qweight", "qzeros", "scales", "g_idx") or (leaf == "bias" and prefix in pending):
            pending.setdefault(prefix, {})[leaf] = t
            continue
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key not in expected:
            if leaf == "bias" and f"{prefix}.weight" in expected:  # bias of a quantized layer read before qweight
                pending.setdefault(prefix, {})[leaf] = t
                continue
            raise QuantizeError(f"unexpected tensor {key!r} in {path}")
        mod = model.get_submodule(prefix)
        setattr(mod, leaf, nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
        filled.add(key)
    for prefix, t in pending.items():
        if "qweight" not in t:
            raise QuantizeError(f"{prefix}: bias without qweight")
        layer = layer_from_gptq(t, bits, group_size, sym, fmt, dtype=dtype, name=prefix)
        set_submodule(model, prefix, layer.to(device))
        filled.add(f"{prefix}.weight")
    missing = sorted(expected - filled)
    if missing:
        raise QuantizeError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return model.eval(), cfg


def quantization_config(model: nn.Module, method: str = "rtn", damp_percent: float = 0.01,
                        checkpoint_format: str | None = None) -> dict:
    """The `quantization_config` describing `model`'s QuantLinears (one global spec, as GPTQ requires)."""
    layers = quantized_layers(model)
    if not layers:
        raise QuantizeError("the model has no quantized layers")
    specs = {m.spec for m in layers.values()}
    if len(specs) != 1:
        raise QuantizeError(f"GPTQ format needs one setting for all layers, got {sorted(map(str, specs))}")
    spec = specs.pop()
    if checkpoint_format is None:
        lowest = min(int(m.zeros.min()) for m in layers.values())
        checkpoint_format = "gptq" if lowest >= 1 else "gptq_v2"
    return {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": any(m.perm is not None for m in layers.values()),
        "sym": spec.sym,
        "damp_percent": damp_percent,
        "true_sequential": True,
        "static_groups": False,
        "lm_head": any(n.endswith("lm_head") for n in layers),
        "checkpoint_format": checkpoint_format,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "tianying_method": method,
    }


def save_quantized(model: nn.Module, cfg: Config, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                   method: str = "rtn", damp_percent: float = 0.01) -> Path:
    """Write `model` as a GPTQ-format HF directory, atomically (a temp dir renamed into place)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    qc = quantization_config(model, method=method, damp_percent=damp_percent)
    if qc["checkpoint_format"] == "gptq_v2":
        warnings.warn("some zero points are 0 (asymmetric quantization), which GPTQ v1 cannot store; writing "
                      "checkpoint_format gptq_v2 (GPTQModel reads it; AutoGPTQ and exllama kernels expect v1)",
                      stacklevel=2)
    layers = quantized_layers(model)
    state: dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        for leaf, t in layer_to_gptq(m, qc["checkpoint_format"]).items():
            state[f"{name}.{leaf}"] = t
    for name, p in model.named_parameters():
        if name.rpartition(".")[0] not in layers:
            state[name] = p.detach().cpu().contiguous()
    dtypes = {p.dtype for n, p in model.named_parameters()}
    hf = cfg.to_hf()
    if len(dtypes) == 1:
        hf["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    hf["quantization_config"] = qc
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        aq = {k: v for k, v in qc.items() if k not in ("quant_method", "tianying_method")}
        (tmp / "quantize_config.json").write_text(json.dumps(aq, indent=2) + "\n", encoding="utf-8")
        if tokenizer_dir is not None:
            copy_side_files(Path(tokenizer_dir), tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy tokenizer/generation files (everything but weights and the model/quantize configs)."""
    for f in src.iterdir():
        if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and f.name not in (
                "config.json", "quantize_config.json") and not f.name.endswith(".index.json"):
            shutil.copy2(f, dst / f.name)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
