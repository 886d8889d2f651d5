"""GPTQ-format checkpoints (AutoGPTQ / transformers / GPTQModel layout), read and written; AutoAWQ (GEMM)
checkpoints read (see `layer_from_awq`). Files are found and read through tianying.weights.

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

import warnings
from pathlib import Path

import torch
from torch import nn

from tianying.config import Config
from tianying.quantize.linear import QuantizeError, QuantLinear, QuantSpec, quantized_layers, set_submodule
from tianying.weights import (  # noqa: F401 - read_quantization_config is re-exported
    WEIGHT_SUFFIXES,
    atomic_dir,
    copy_file,
    load_config,
    open_tensors,
    read_quantization_config,
    tie_embeddings,
    weight_files,
    write_json,
    write_safetensors,
)


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


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ `qweight` int32 [K/pack, N] → q uint8 [N, K], equal to `unpack_int32(qweight, bits, dim=0).t()`
    in the contiguous layout `QuantLinear.from_int` takes."""
    return _unpack_words(qweight.to(torch.int32).t().contiguous(), bits)


def _unpack_words(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Contiguous int32 [N, K/pack] words → uint8 [N, K]: each field is shifted and masked in one reused int32
    buffer and written straight into the result, so the temporaries are that buffer (the packed size: 0.5 bytes
    a weight for int4) and the result (1 byte a weight), not int16 copies of the whole matrix."""
    pack = 32 // bits
    N, Kp = w.shape
    out = torch.empty(N, Kp, pack, dtype=torch.uint8)
    tmp = torch.empty_like(w)
    for i in range(pack):
        torch.bitwise_right_shift(w, i * bits, out=tmp)
        out[..., i] = tmp.bitwise_and_((1 << bits) - 1)
    return out.view(N, Kp * pack)


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
    return _layer_from_gptq(dict(t), bits, group_size, sym, checkpoint_format, dtype, name)


def _layer_from_gptq(t: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool, checkpoint_format: str,
                     dtype: torch.dtype, name: str) -> QuantLinear:
    """`layer_from_gptq` that owns `t`: qweight leaves it once unpacked, so that when the caller holds no other
    reference the packed words are freed before the layer is packed for its kernel."""
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
    if checkpoint_format not in ("gptq", "gptq_v1", "gptq_v2"):
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
    del qweight
    q = _unpack_words(t.pop("qweight").to(torch.int32).t().contiguous(), bits)  # uint8 [N, K], original order
    zeros = unpack_int32(qzeros, bits, dim=1)
    if checkpoint_format in ("gptq", "gptq_v1"):
        zeros = zeros + 1
    if perm is not None:
        q = q[:, perm]
    spec = QuantSpec(bits, group_size if group_size in (-1, g) else g, sym)
    return QuantLinear.from_int(q, scales, zeros, spec, perm=perm, bias=t.get("bias"), dtype=dtype)


# ---------------------------------------------------------------------------------------------- AWQ
# AutoAWQ's GEMM layout, per linear with in_features K, out_features N, group size g (4 bits only):
#   qweight int32 [K, N/8], qzeros int32 [K/g, N/8]: packed along the *output* dim, nibble i (bits 4i..4i+3)
#   of word c holding column 8c + AWQ_ORDER[i];  scales fp16 [K/g, N];  ŵ[n, k] = s[g, n]·(q[k, n] − z[g, n])
# with zeros stored as they are (no GPTQ-v1 "−1"). The interleaved order suits its CUDA dequantizer.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """AWQ-packed int32 [R, C/8] → uint8 [R, C] in column order."""
    R = words.shape[0]
    nibbles = _unpack_words(words.to(torch.int32).contiguous(), 4).view(R, -1, 8)  # [.., c, i] = nibble i
    out = torch.empty_like(nibbles)
    out[:, :, list(AWQ_ORDER)] = nibbles  # column 8c + AWQ_ORDER[i] ← nibble i
    return out.view(R, -1)


def layer_from_awq(t: dict[str, torch.Tensor], group_size: int, dtype: torch.dtype = torch.float32,
                   name: str = "layer") -> QuantLinear:
    """A 4-bit asymmetric QuantLinear from AutoAWQ GEMM `qweight/qzeros/scales[/bias]` (exact: same integers,
    same fp16 scales)."""
    qweight, qzeros, scales = t["qweight"], t.get("qzeros"), t["scales"]
    if qzeros is None:
        raise QuantizeError(f"{name}: AWQ layer without qzeros (zero_point: false) is not supported")
    K, N = qweight.shape[0], qweight.shape[1] * 8
    G = scales.shape[0]
    if scales.shape[1] != N or qzeros.shape != (G, N // 8) or not G or K % G:
        raise QuantizeError(f"{name}: inconsistent AWQ shapes qweight {tuple(qweight.shape)}, "
                            f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}")
    g = K // G
    if group_size not in (-1, g):
        raise QuantizeError(f"{name}: config says group_size {group_size} but the tensors hold {G} groups of {g}")
    q = unpack_awq(qweight).t().contiguous()  # [N, K]
    zeros = unpack_awq(qzeros)  # [G, N]
    spec = QuantSpec(4, g if G > 1 else -1, sym=False)
    return QuantLinear.from_int(q, scales, zeros, spec, bias=t.get("bias"), dtype=dtype)


# ---------------------------------------------------------------------------------------------- config
def is_quantized_checkpoint(path: str | Path) -> bool:
    return read_quantization_config(path) is not None


def _check_qc(qc: dict) -> tuple[str, int, int, bool, str]:
    """(method, bits, group_size, sym, checkpoint_format) of a quantization_config we can load."""
    method = str(qc.get("quant_method", "gptq")).lower()
    if method == "awq":
        bits = int(qc.get("bits", qc.get("w_bit", 4)))  # transformers' spelling, then AutoAWQ's quant_config.json
        version = str(qc.get("version", "gemm")).lower()
        if bits != 4 or version != "gemm":
            raise QuantizeError(f"AWQ bits={bits} version={version!r} is not supported (4-bit GEMM only)")
        if not qc.get("zero_point", True):
            raise QuantizeError("AWQ zero_point: false is not supported")
        return method, 4, int(qc.get("group_size", qc.get("q_group_size", 128))), False, "awq"
    if method != "gptq":
        raise QuantizeError(f"quant_method {method!r} is not supported (GPTQ and AWQ checkpoints only)")
    bits = int(qc.get("bits", 4))
    if bits not in (4, 8):
        raise QuantizeError(f"GPTQ bits={bits} is not supported; use 8 or 4")
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    return method, bits, int(qc.get("group_size", -1)), bool(qc.get("sym", True)), fmt


_QUANT_LEAVES = ("qweight", "qzeros", "scales", "g_idx")


def load_quantized(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                   ) -> tuple[nn.Module, Config]:
    """A GPTQ- or AWQ-format checkpoint as a Transformer whose quantized linears are `QuantLinear`s.

    `dtype` is the activation/non-quantized weight dtype; None → float32 on CPU (what the native int8/int4
    kernels take; the embedding table keeps the file's 16-bit dtype, its rows are upcast after lookup, so
    the 100k-row table of Aquila costs half) and float16 elsewhere (what GPTQ checkpoints store).

    Memory: the keys are grouped by module first (safetensors headers; `.bin` files are mapped, not read),
    then each quantized layer's tensors are read, turned into its `QuantLinear` and dropped before the next
    (largest first), then every other tensor is read and converted on its own, in chunks; nothing in the model
    is a view of a file. So the peak is about the final model plus one layer's temporaries. Measured (torch
    2.13 CPU, growth of VmHWM during the load into bf16, after a warm-up load): the "small" config with random
    weights, int4 g128 with the LM head (a 374 MiB file: fp32 embeddings; a 228 MiB model), +902 MiB before
    (every layer's tensors were kept until the end, and the layers' fp16 scales were views of the mapped file,
    which kept all of its pages resident), +260 to +267 MiB now (the LM head's temporaries on top of little);
    `.bin` about the same (its mapped pages are dropped as they are copied, see `_TorchFile`).
    """
    from tianying.model import build_model

    path = Path(path)
    qc = read_quantization_config(path)
    if qc is None:
        raise QuantizeError(f"{path} is not a quantized checkpoint (no quantization_config in config.json)")
    method, bits, group_size, sym, fmt = _check_qc(qc)
    cfg = load_config(path)
    narrow_embeddings = dtype is None and torch.device(device).type == "cpu"
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.float16
    model = build_model(cfg, init=False)
    expected = {n: p for n, p in model.named_parameters()}

    # 1. where every tensor is, and what it is for (nothing read yet)
    files = [open_tensors(f) for f in weight_files(path)]
    where: dict[str, int] = {}
    for i, src in enumerate(files):
        for key in src.keys():
            where[key] = i
    quant: dict[str, dict[str, str]] = {}  # prefix → leaf → key
    for key in where:
        prefix, _, leaf = key.rpartition(".")
        if leaf in _QUANT_LEAVES:
            quant.setdefault(prefix, {})[leaf] = key
    plain: list[str] = []
    for key in where:
        prefix, _, leaf = key.rpartition(".")
        if leaf in _QUANT_LEAVES or (leaf == "bias" and prefix in quant):
            continue
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key not in expected:
            if leaf == "bias" and f"{prefix}.weight" in expected:  # a quantized layer's bias (without qweight?)
                quant.setdefault(prefix, {})[leaf] = key
                continue
            raise QuantizeError(f"unexpected tensor {key!r} in {path}")
        plain.append(key)
    for prefix, leaves in quant.items():
        if "qweight" not in leaves:
            raise QuantizeError(f"{prefix}: bias without qweight")
        if f"{prefix}.weight" not in expected:
            raise QuantizeError(f"unexpected tensor {leaves['qweight']!r} in {path}")
        bias = f"{prefix}.bias"
        if bias in where:
            leaves["bias"] = bias
    filled = set(plain) | {f"{p}.{leaf}" for p, leaves in quant.items() for leaf in ("weight", "bias")
                           if leaf == "weight" or leaf in leaves}
    missing = sorted(set(expected) - filled)
    if missing:
        raise QuantizeError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    # 2. one module at a time: the quantized layers first, largest first, while little else is resident (a
    # layer's temporaries are several times its final size, ~3 bytes a weight for int4, so the 100k-row LM head
    # goes first), then every other tensor on its own
    jobs = sorted(quant.items(), key=lambda j: -files[where[j[1]["qweight"]]].nbytes(j[1]["qweight"]))
    dev = torch.device(device)
    scratch: list[torch.Tensor] = []
    try:
        for prefix, leaves in jobs:
            t = {leaf: files[where[k]].get(k) for leaf, k in leaves.items()}
            if method == "awq":
                layer = layer_from_awq(t, group_size, dtype, prefix)
            else:
                layer = _layer_from_gptq(t, bits, group_size, sym, fmt, dtype, prefix)
            del t
            set_submodule(model, prefix, layer.to(dev))
            del layer
        for key in plain:
            prefix, _, leaf = key.rpartition(".")
            if prefix in quant:  # a float weight next to its layer's qweight: not used
                continue
            want = dtype
            if narrow_embeddings and key == "model.embed_tokens.weight":
                stored = files[where[key]].dtype_of(key)
                want = stored if stored in (torch.float16, torch.bfloat16) else dtype
            t = files[where[key]].get_as(key, want, dev, scratch)
            if t.shape != expected[key].shape:
                raise QuantizeError(f"{key}: shape {tuple(t.shape)} in {path}, the config says "
                                    f"{tuple(expected[key].shape)}")
            setattr(model.get_submodule(prefix), leaf, nn.Parameter(t, requires_grad=False))
            del t
    finally:
        scratch.clear()
        for f in files:
            f.close()
    tie_embeddings(model)
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
    if "lm_head" in layers:  # a quantized head no longer shares the embedding table
        hf["tie_word_embeddings"] = False
    hf["quantization_config"] = qc
    aq = {k: v for k, v in qc.items() if k not in ("quant_method", "tianying_method")}
    with atomic_dir(out_dir) as tmp:
        write_safetensors(tmp / "model.safetensors", list(state.items()))
        write_json(tmp / "config.json", hf)
        write_json(tmp / "quantize_config.json", aq)
        if tokenizer_dir is not None:
            from tianying.templates import checkpoint_template, write_chat_template

            copy_side_files(Path(tokenizer_dir), tmp)
            write_chat_template(tmp, checkpoint_template(tokenizer_dir, cfg))
    return out_dir


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy tokenizer/generation files (everything but weights and the model/quantize configs)."""
    for f in src.iterdir():
        if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and f.name not in (
                "config.json", "quantize_config.json", "quant_config.json") and not f.name.endswith(".index.json"):
            copy_file(f, dst / f.name)
