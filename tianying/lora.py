"""LoRA by swapping the linear layer, with adapters in PEFT's file format.

`add_lora(model, LoRAConfig(...))` replaces each targeted `nn.Linear` (or `NF4Linear`, for Q-LoRA) by a
`LoRALinear` that keeps the original layer as `base_layer` and adds `lora_B(lora_A(dropout(x))) · alpha/r`.
The model class is untouched, so every model change reaches LoRA for free.

Files (`save_adapter` / `apply_adapter`) are exactly what `peft` writes for a transformers LlamaForCausalLM:
`adapter_config.json` (peft's LoraConfig fields) and `adapter_model.safetensors` with keys
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` ([r, in]) and `...lora_B.weight` ([out, r]).
Our module names are transformers' names, so no renaming happens in either direction. An optional third file,
`tianying_adapter.json`, records how the base was held in training (NF4 for Q-LoRA); peft ignores it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tianying.errors import TianyingError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
TIANYING_META = "tianying_adapter.json"
PEFT_PREFIX = "base_model.model."

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# FlagAI v1 (seed-spec §8.2: targets `wq`, `wv`) → the HF names our model uses
V1_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
            "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class AdapterError(TianyingError):
    """A LoRA adapter that cannot be created, read, or applied to this model."""


@dataclass
class LoRAConfig:
    """The subset of peft's LoraConfig that plain LoRA on linear layers needs."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) and "," in self.target_modules:
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        if not isinstance(self.target_modules, str):
            self.target_modules = [V1_NAMES.get(t, t) for t in self.target_modules]
            if not self.target_modules:
                raise AdapterError("lora_target_modules is empty")
        if int(self.r) < 1:
            raise AdapterError(f"lora_r must be ≥ 1, got {self.r}")
        if not 0 <= float(self.dropout) < 1:
            raise AdapterError(f"lora_dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]

    # ---------------------------------------------------------------- which modules, which rank
    def targets(self, name: str) -> bool:
        """peft's rule: a regex string must fullmatch the module name; a list entry must equal its last part(s)."""
        if self.target_modules == "all-linear":
            hit = not name.endswith("lm_head")
        elif isinstance(self.target_modules, str):
            hit = re.fullmatch(self.target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in self.target_modules)
        if hit and self.layers_to_transform is not None:
            m = re.search(r"\.layers\.(\d+)\.", name)
            hit = m is not None and int(m.group(1)) in self.layers_to_transform
        return hit

    def _pattern(self, pattern: dict, name: str):  # noqa: ANN202
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?{key}$", name):
                return value
        return None

    def rank_alpha(self, name: str) -> tuple[int, float]:
        r = self._pattern(self.rank_pattern, name) or self.r
        alpha = self._pattern(self.alpha_pattern, name) or self.alpha
        return int(r), float(alpha)

    # ---------------------------------------------------------------- peft's adapter_config.json
    def to_peft(self, base_model: str | None = None) -> dict:
        targets = self.target_modules if isinstance(self.target_modules, str) else sorted(set(self.target_modules))
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "revision": None, "inference_mode": True, "r": int(self.r), "lora_alpha": self.alpha,
            "lora_dropout": float(self.dropout), "target_modules": targets, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": self.use_rslora, "use_dora": False, "modules_to_save": None,
            "init_lora_weights": True, "layers_to_transform": self.layers_to_transform, "layers_pattern": None,
            "rank_pattern": dict(self.rank_pattern), "alpha_pattern": dict(self.alpha_pattern),
        }

    @classmethod
    def from_peft(cls, raw: dict, where: str = ADAPTER_CONFIG) -> LoRAConfig:
        if str(raw.get("peft_type", "LORA")).upper() != "LORA":
            raise AdapterError(f"{where}: peft_type {raw.get('peft_type')!r} is not LORA")
        unsupported = {
            "use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
            "modules_to_save": "modules_to_save (fully trained extra modules)",
            "layer_replication": "layer_replication", "lora_bias": "lora_bias",
            "trainable_token_indices": "trainable_token_indices",
        }
        for key, what in unsupported.items():
            if raw.get(key):
                raise AdapterError(f"{where}: {what} is not supported by tianying's LoRA")
        if raw.get("bias", "none") != "none":
            raise AdapterError(f"{where}: bias={raw['bias']!r} adapters are not supported (only 'none')")
        if raw.get("target_parameters"):
            raise AdapterError(f"{where}: target_parameters adapters are not supported")
        try:
            return cls(r=int(raw["r"]), alpha=float(raw.get("lora_alpha", 8)),
                       dropout=float(raw.get("lora_dropout", 0.0)),
                       target_modules=raw.get("target_modules") or list(DEFAULT_TARGETS),
                       use_rslora=bool(raw.get("use_rslora", False)), rank_pattern=raw.get("rank_pattern") or {},
                       alpha_pattern=raw.get("alpha_pattern") or {},
                       layers_to_transform=raw.get("layers_to_transform"))
        except KeyError as e:
            raise AdapterError(f"{where}: missing field {e.args[0]!r}") from None


class _LoRADropout(torch.autograd.Function):
    """scaling · (dropout(x) · Aᵀ) · Bᵀ in fp32, keeping only x, the 1-byte keep mask and the rank-r product.

    nn.Dropout followed by lora_A would keep the dropped input as a full fp32 copy for A's gradient: one per
    wrapped projection (q, k and v each their own), which made LoRA training keep ~40% more activations than
    full finetuning. Here dropout(x) is recomputed in backward from x (which autograd keeps anyway) and the mask.
    Autocast is off inside: the LoRA branch runs in the factors' precision (fp32) in forward and backward alike.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, a_w: torch.Tensor, b_w: torch.Tensor, keep: torch.Tensor,  # noqa: ANN001
                keep_scale: float, scaling: float) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            a = F.linear(x.to(a_w.dtype) * keep * keep_scale, a_w)
            out = F.linear(a, b_w) * scaling
        ctx.save_for_backward(x, keep, a, a_w, b_w)
        ctx.keep_scale, ctx.scaling = keep_scale, scaling
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        x, keep, a, a_w, b_w = ctx.saved_tensors
        g = grad.to(b_w.dtype) * ctx.scaling
        ga = F.linear(g, b_w.t())  # [..., r]
        gx = ga_w = gb_w = None
        if ctx.needs_input_grad[2]:
            gb_w = g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])
        if ctx.needs_input_grad[1]:
            xd = x.to(a_w.dtype) * keep * ctx.keep_scale
            ga_w = ga.reshape(-1, ga.shape[-1]).t() @ xd.reshape(-1, xd.shape[-1])
            del xd
        if ctx.needs_input_grad[0]:
            gx = (F.linear(ga, a_w.t()) * keep * ctx.keep_scale).to(x.dtype)
        return gx, ga_w, gb_w, None, None, None


class LoRALinear(nn.Module):
    """y = base_layer(x) + lora_B(lora_A(dropout(x))) · scaling, with B = 0 at init so y starts equal to base.

    The LoRA factors are kept in fp32 whatever the base dtype ("LoRA in full precision on top" of a bf16 or
    NF4 base), and cast back to the base output's dtype.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        w = getattr(base_layer, "weight", None)
        device = w.device if isinstance(w, torch.Tensor) else next(base_layer.buffers()).device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # see `adapters_disabled`
        self.reset_lora()

    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """peft's default init: A ~ kaiming-uniform(a=√5) (nn.Linear's init), B = 0."""
        bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform with a=√5 reduces to U(-1/√in, 1/√in)
        with torch.no_grad():
            self.lora_A.weight.uniform_(-bound, bound, generator=generator)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:  # the base alone: DPO's reference model, with no second copy of the weights
            return y
        drop = self.lora_dropout
        if isinstance(drop, nn.Dropout) and drop.p > 0 and self.training and torch.is_grad_enabled():
            keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - drop.p)
            delta = _LoRADropout.apply(x, self.lora_A.weight, self.lora_B.weight, keep, 1 / (1 - drop.p),
                                       self.scaling)
            return y + delta.to(y.dtype)
        a = self.lora_A(drop(x.to(self.lora_A.weight.dtype)))
        return y + (self.lora_B(a) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) · B·A, the [out, in] update a merge adds to W (fp32)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear with W + (alpha/r)·B·A (an NF4 base is dequantized to float first)."""
        w = base_weight(self.base_layer)
        dtype = dtype or (w.dtype if w.is_floating_point() else torch.float32)
        lin = nn.Linear(self.in_features, self.out_features, bias=False, device=w.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_((w.float() + self.delta_weight()).to(dtype))
        return lin

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


@contextmanager
def adapters_disabled(model: nn.Module):  # noqa: ANN201
    """Within the block every LoRA layer of `model` computes its base layer alone."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The float weight of a linear-like layer: nn.Linear's own, or a quantized layer's dequantized one."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach()
    if hasattr(layer, "dequantize"):
        return layer.dequantize(torch.float32)
    raise AdapterError(f"cannot read the weight of a {type(layer).__name__}")


def _is_linear_like(m: nn.Module) -> bool:
    from tianying.nf4 import NF4Linear

    if isinstance(m, (nn.Linear, NF4Linear)):
        return True
    try:
        from tianying.quantize import QuantLinear
    except ImportError:
        return False
    return isinstance(m, QuantLinear)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, cfg: LoRAConfig, freeze: bool = True, seed: int | None = None) -> list[str]:
    """Swap every targeted linear layer for a LoRALinear (in place); with `freeze`, only LoRA stays trainable.

    Returns the wrapped module names; raises AdapterError when nothing matches (a typo in target_modules).
    """
    if lora_layers(model):
        raise AdapterError("the model already has LoRA layers; merge or remove them first")
    names = [n for n, m in model.named_modules() if _is_linear_like(m) and cfg.targets(n)]
    if not names:
        raise AdapterError(f"lora_target_modules {cfg.target_modules!r} match no linear layer of the model "
                           f"(known: {', '.join(DEFAULT_TARGETS)}, lm_head)")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for name in names:
        r, alpha = cfg.rank_alpha(name)
        layer = LoRALinear(model.get_submodule(name), r, alpha, cfg.dropout, cfg.use_rslora)
        if gen is not None and layer.lora_A.weight.device.type == "cpu":
            layer.reset_lora(gen)
        _set_module(model, name, layer)
    return names


def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every LoRALinear by an nn.Linear holding W + (alpha/r)·B·A (in place; returns the model)."""
    for name, layer in lora_layers(model).items():
        _set_module(model, name, layer.merged(dtype))
    return model


def lora_state_dict(model_or_sd: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights under peft's key names (`base_model.model.<module>.lora_A.weight`).

    Takes the model, or its state dict (what the training loop hands its save callback).
    """
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    return {PEFT_PREFIX + k: v.detach() for k, v in sd.items() if _LORA_KEY.fullmatch(k)}


_LORA_KEY = re.compile(r".+\.lora_[AB]\.weight")


def save_adapter(model_or_sd: nn.Module | dict[str, torch.Tensor], cfg: LoRAConfig, out_dir: str | Path,
                 base_model: str | None = None, meta: dict | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (+ tianying_adapter.json when `meta`), atomically:
    an existing adapter in `out_dir` stays intact until the new one is complete.

    `base_model` (peft's `base_model_name_or_path`) is stored absolute when it names a local directory, so
    the adapter still points at its base after being moved; anything else (a hub id) as given. Nothing ever
    requires it to exist: `apply_adapter` takes the base model it is given.
    """
    from tianying.weights import atomic_dir, write_json, write_safetensors

    sd = {k: v.contiguous().cpu() for k, v in lora_state_dict(model_or_sd).items()}
    if not sd:
        raise AdapterError("the model has no LoRA layers to save")
    if base_model is not None and Path(base_model).is_dir():
        base_model = str(Path(base_model).resolve())
    out = Path(out_dir)
    with atomic_dir(out, marker=ADAPTER_CONFIG) as tmp:
        write_json(tmp / ADAPTER_CONFIG, cfg.to_peft(None if base_model is None else str(base_model)))
        write_safetensors(tmp / ADAPTER_WEIGHTS, sorted(sd.items()))
        if meta:
            write_json(tmp / TIANYING_META, meta)
    return out


def read_adapter(adapter_dir: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor], dict]:
    """(config, {module name: {"A": ..., "B": ...}} flattened as "name.lora_A"/"name.lora_B", tianying meta)."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise AdapterError(f"adapter directory {d} does not exist")
    cfg_file = d / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise AdapterError(f"{d} has no {ADAPTER_CONFIG} (is it a PEFT LoRA adapter?)")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file}: not valid JSON ({e})") from None
    cfg = LoRAConfig.from_peft(raw, str(cfg_file))
    from tianying.weights import inside, iter_tensors

    if (d / ADAPTER_WEIGHTS).is_file():
        sd = dict(iter_tensors(inside(d, ADAPTER_WEIGHTS)))
    elif (d / ADAPTER_WEIGHTS_BIN).is_file():  # older peft, and the seed's v1 adapters (weights only)
        sd = dict(iter_tensors(inside(d, ADAPTER_WEIGHTS_BIN)))
    else:
        raise AdapterError(f"{d} has neither {ADAPTER_WEIGHTS} nor {ADAPTER_WEIGHTS_BIN}")
    weights: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.default)?\.weight", key)
        if m is None:
            raise AdapterError(f"{d}: unexpected tensor {key!r} (only lora_A/lora_B weights are supported)")
        weights[f"{m.group(1)}.{m.group(2)}"] = t
    meta = {}
    if (d / TIANYING_META).is_file():
        meta = json.loads((d / TIANYING_META).read_text(encoding="utf-8"))
    return cfg, weights, meta


def apply_adapter(model: nn.Module, adapter_dir: str | Path, merge: bool = False,
                  base: str = "auto") -> nn.Module:
    """Load a PEFT LoRA adapter (ours or peft's) onto `model` in place; returns the model.

    Args:
        merge: fold the adapter into the weights (a plain model again, no per-token LoRA cost).
        base: "auto" → hold the base as the adapter was trained (NF4 for a Q-LoRA adapter, per
            tianying_adapter.json); "float" → keep the base as loaded; "nf4" → quantize it to NF4 first.
    """
    cfg, weights, meta = read_adapter(adapter_dir)
    want_nf4 = base == "nf4" or (base == "auto" and meta.get("base_quantization", {}).get("type") == "nf4")
    if want_nf4:
        from tianying.nf4 import quantize_model_nf4

        bq = meta.get("base_quantization", {})
        quantize_model_nf4(model, tuple(bq.get("modules") or ()) or _nf4_default(),
                           int(bq.get("blocksize", 64)))
    names = add_lora(model, cfg, freeze=False)
    by_module = {n: lora_layers(model)[n] for n in names}
    seen = set()
    for key, t in weights.items():
        name, _, which = key.rpartition(".")
        layer = by_module.get(name)
        if layer is None:
            raise AdapterError(f"{adapter_dir}: tensor for {name!r}, which is not a targeted linear layer of "
                               "this model (wrong base model?)")
        target = layer.lora_A.weight if which == "lora_A" else layer.lora_B.weight
        if tuple(t.shape) != tuple(target.shape):
            raise AdapterError(f"{adapter_dir}: {name}.{which} has shape {tuple(t.shape)}, the model needs "
                               f"{tuple(target.shape)} (r={layer.r}; wrong base model?)")
        with torch.no_grad():
            target.copy_(t.to(target.dtype))
        seen.add(key)
    missing = [f"{n}.{w}" for n in names for w in ("lora_A", "lora_B") if f"{n}.{w}" not in seen]
    if missing:
        raise AdapterError(f"{adapter_dir}: no weights for {missing[0]} (and {len(missing) - 1} more)")
    for layer in by_module.values():
        layer.lora_dropout = nn.Identity()  # inference: dropout off whatever mode the model is in
    if merge:
        merge_lora(model)
    return model


def _nf4_default() -> tuple[str, ...]:
    from tianying.nf4 import NF4_DEFAULT_MODULES

    return NF4_DEFAULT_MODULES


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def count(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def merge_checkpoint(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, base: str = "auto",
                     dtype: str | torch.dtype | None = None) -> Path:
    """Write base + adapter as one Hugging Face checkpoint: W + (alpha/r)·B·A for every adapted layer.

    With a Q-LoRA adapter (or base="nf4") the base projections are quantized to NF4 and dequantized first, so
    the merged model computes what the adapted model computed in training.
    """
    from tianying import checkpoint as ckpt
    from tianying.nf4 import dequantize_model_nf4

    model, cfg = ckpt.load_model(base_dir, device="cpu", dtype=torch.float32)
    apply_adapter(model, adapter_dir, merge=True, base=base)
    dequantize_model_nf4(model)  # NF4 layers without an adapter become float too
    out_dtype = ckpt.parse_dtype(dtype) or ckpt.parse_dtype(cfg.torch_dtype)
    if out_dtype is not None:
        cfg = cfg.replace(torch_dtype=ckpt.dtype_name(out_dtype))
    return ckpt.save_hf(model, cfg, out_dir, tokenizer_dir=base_dir, dtype=out_dtype)
