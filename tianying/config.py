"""Model configuration: one dataclass and a table of named configs.

Every Aquila variant is a set of field values, never a subclass. `Config.from_hf` reads the three
config.json dialects found in the wild (transformers' `llama`, BAAI's `aquila`, FlagAI's native v1 fields)
and guards against the hub's known traps (seed-spec §1.2): v1 configs carry LLaMA's placeholder bos/eos
ids 1 and 2 (which are `!` and `"` in the Aquila vocabulary), and one AquilaChat2-34B-16K revision has two
`rope_scaling` keys, where a plain JSON parser silently keeps the disabling `null`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tianying.errors import TianyingError


class ConfigError(TianyingError, ValueError):
    """A config that cannot describe a model (unknown name, contradictory or duplicated fields)."""


AQUILA_BOS, AQUILA_EOS, AQUILA_PAD = 100006, 100007, 0


@dataclass
class Config:
    name: str = "custom"
    vocab_size: int = 100008
    hidden_size: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None  # None → n_head (multi-head attention)
    intermediate_size: int = 11008
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Hugging Face vocabulary: {"type"/"rope_type": "linear"|"dynamic"|..., "factor": f, ...} or None.
    rope_scaling: dict | None = None
    bos_token_id: int | None = AQUILA_BOS
    eos_token_id: int | None = AQUILA_EOS
    pad_token_id: int | None = AQUILA_PAD
    initializer_range: float = 0.02
    chat_template: str | None = None  # name in tianying.templates; stored with the checkpoint
    torch_dtype: str | None = None  # dtype the weights were saved in ("float16", "bfloat16", ...)
    # long-context switches (issue 8), off by default; not in Aquila's code, never set by a released checkpoint
    logn_attention: bool = False  # q × log(p)/log(L) for 1-based positions p > L (tianying.rope.logn_scale)
    logn_length: int | None = None  # L for LogN; None → max_position_embeddings (the training length)
    attention_window: int | None = None  # W: a query sees only the last W positions (itself included)
    attention_sinks: int = 0  # S: the first S positions stay visible to every query (with a window)
    # other LLaMA-family checkpoints (not Aquila layouts, which are untied with head_dim = hidden/heads)
    tie_word_embeddings: bool = False  # the LM head shares the embedding table (Llama 3.2 1B/3B, many small models)
    head_dim_override: int | None = None  # config.json's `head_dim` when it is not hidden_size / n_head
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, kept for round-trip

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for f in ("vocab_size", "hidden_size", "n_layer", "n_head", "n_kv_head", "intermediate_size",
                  "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{_HF_NAMES.get(f, f)} must be a positive integer, got {v!r}")
        for f in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < math.inf:
                raise ConfigError(f"{f} must be a positive number, got {v!r}")
        if self.head_dim_override is not None:
            if self.head_dim_override == self.hidden_size // self.n_head and not self.hidden_size % self.n_head:
                self.head_dim_override = None  # the default spelled out: one canonical form
            elif (not isinstance(self.head_dim_override, int) or isinstance(self.head_dim_override, bool)
                  or self.head_dim_override < 2 or self.head_dim_override % 2):
                raise ConfigError(f"head_dim must be a positive even integer, got {self.head_dim_override!r}")
        elif self.hidden_size % self.n_head:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.n_head}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} (hidden_size / num_attention_heads) must be even for RoPE")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"num_attention_heads {self.n_head} is not a multiple of num_key_value_heads "
                              f"{self.n_kv_head}")
        for f in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ConfigError(f"{f} must be a non-negative integer or null, got {v!r}")
        if self.rope_scaling is not None:
            self.rope_scaling = normalize_rope_scaling(self.rope_scaling)
        if self.attention_window is not None and self.attention_window < 1:
            raise ConfigError(f"attention_window must be ≥ 1 or null, got {self.attention_window}")
        if self.attention_sinks < 0 or (self.attention_sinks and self.attention_window is None):
            raise ConfigError(f"attention_sinks={self.attention_sinks} needs an attention_window and must be ≥ 0")
        if self.logn_length is not None and self.logn_length < 2:
            raise ConfigError(f"logn_length must be ≥ 2 (it is the base of a logarithm), got {self.logn_length}")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.n_head

    @property
    def n_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.n_kv_head * self.head_dim
        q = self.n_head * self.head_dim
        per_layer = 2 * d * q + 2 * d * kv + 3 * d * f + 2 * d
        return (1 if self.tie_word_embeddings else 2) * v * d + self.n_layer * per_layer + d

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ named configs
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        key = name.lower()
        if key not in CONFIGS:
            known = ", ".join(sorted(CONFIGS))
            raise ConfigError(f"unknown model config {name!r}; known: {known}")
        return cls(**{**CONFIGS[key], "name": key, **overrides})

    # ------------------------------------------------------------------ config.json
    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict) -> Config:
        """Read a transformers (`llama`/`aquila`) or FlagAI-native config.json (a dict, or a path, which goes
        through `tianying.weights.load_config`, the one reader of config files)."""
        if not isinstance(path_or_dict, dict):
            from tianying.weights import load_config  # the file reader sits above us; it calls back with a dict

            return load_config(path_or_dict)
        raw = dict(path_or_dict)
        rope_params = raw.pop("rope_parameters", None)  # transformers ≥ 5: theta and scaling in one object
        if isinstance(rope_params, dict):
            if "rope_theta" in rope_params:
                raw.setdefault("rope_theta", rope_params["rope_theta"])
            if raw.get("rope_scaling") is None and rope_params.get("rope_type", rope_params.get("type")) not in (
                    None, "default"):
                raw["rope_scaling"] = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if "dim" in raw and "hidden_size" not in raw:
            cfg = cls._from_flagai(raw)
            # fields `save_flagai` adds to a native config (FlagAI's v1 fields have none for RoPE)
            changes = {k: raw[k] for k in ("rope_theta", "rope_scaling") if raw.get(k) is not None}
            if changes:
                cfg = cfg.replace(rope_theta=_num(changes, "rope_theta", float, cfg.rope_theta),
                                  rope_scaling=changes.get("rope_scaling"))
            return cfg
        return cls._from_transformers(raw)

    @classmethod
    def _from_transformers(cls, raw: dict) -> Config:
        model_type = str(raw.get("model_type", "llama")).lower()
        if model_type not in ("llama", "aquila", "aquilachat"):
            raise ConfigError(f"model_type {model_type!r} is not a LLaMA/Aquila model")
        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # a different activation would compute silently wrong logits
            raise ConfigError(f"hidden_act {act!r} is not supported (LLaMA-family models use silu)")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise ConfigError(f"{flag}: true is not supported (LLaMA-family layers have no biases)")
        raw = dict(raw)
        n_head = _num(raw, "num_attention_heads", int)
        cfg = dict(
            vocab_size=_num(raw, "vocab_size", int),
            hidden_size=_num(raw, "hidden_size", int),
            n_layer=_num(raw, "num_hidden_layers", int),
            n_head=n_head,
            n_kv_head=_num(raw, "num_key_value_heads", int, n_head),
            intermediate_size=_num(raw, "intermediate_size", int),
            max_position_embeddings=_num(raw, "max_position_embeddings", int, 2048),
            rms_norm_eps=_num(raw, "rms_norm_eps", float, 1e-6),
            rope_theta=_num(raw, "rope_theta", float, 10000.0),
            rope_scaling=raw.get("rope_scaling"),
            bos_token_id=_token_id(raw, "bos_token_id"),
            eos_token_id=_token_id(raw, "eos_token_id"),
            pad_token_id=_token_id(raw, "pad_token_id"),
            initializer_range=_num(raw, "initializer_range", float, 0.02),
            chat_template=raw.get("tianying_chat_template"),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            tie_word_embeddings=_flag(raw, "tie_word_embeddings"),
            head_dim_override=_num(raw, "head_dim", int, None),
            **{k: raw[k] for k in _LONG_CONTEXT_KEYS if raw.get(k) is not None},
        )
        _restore_ntk(cfg, raw.pop("tianying_rope_scaling", None), raw)
        known = {
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
            "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "tianying_chat_template",
            "torch_dtype", "dtype", "model_type", "architectures", "tie_word_embeddings", "rope_parameters",
            "head_dim", "hidden_act", "attention_bias", "mlp_bias", *_LONG_CONTEXT_KEYS,
        }
        cfg["extra"] = {k: v for k, v in raw.items() if k not in known}
        return cls(**_fix_special_ids(cfg))

    @classmethod
    def _from_flagai(cls, raw: dict) -> Config:
        """FlagAI v1 native fields (seed-spec §1.4); FFN width follows its multiple_of rule."""
        d, n_head = _num(raw, "dim", int), _num(raw, "n_heads", int)
        multiple_of = _num(raw, "multiple_of", int, 256)
        if multiple_of < 1:
            raise ConfigError(f"multiple_of must be a positive integer, got {multiple_of!r}")
        cfg = dict(
            vocab_size=_num(raw, "vocab_size", int),
            hidden_size=d,
            n_layer=_num(raw, "n_layers", int),
            n_head=n_head,
            n_kv_head=_num(raw, "n_kv_heads", int, n_head),
            intermediate_size=_num(raw, "intermediate_size", int, None) or ffn_width(d, multiple_of),
            max_position_embeddings=_num(raw, "max_seq_len", int, 2048),
            rms_norm_eps=_num(raw, "norm_eps", float, 1e-6),
            initializer_range=_num(raw, "initializer_range", float, 0.02),
            bos_token_id=_token_id(raw, "bos_token_id"),
            eos_token_id=_token_id(raw, "eos_token_id"),
            pad_token_id=_token_id(raw, "pad_token_id", AQUILA_PAD),
            chat_template=raw.get("tianying_chat_template"),
        )
        return cls(**_fix_special_ids(cfg))

    def to_hf(self) -> dict:
        """A config.json that transformers' LlamaForCausalLM loads unchanged."""
        out = {
            **self.extra,
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,  # transformers edits it
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if self.head_dim_override:
            out["head_dim"] = self.head_dim_override
        for k in ("auto_map",):  # remote-code pointers would make transformers look for files we do not write
            out.pop(k, None)
        if self.rope_scaling and self.rope_scaling["type"] == "ntk":
            # transformers has no static-NTK kind, but static NTK is plain RoPE with a larger base: write that
            # base, so transformers computes the same logits, and keep the intent for Config.from_hf to restore
            from tianying.rope import ntk_base

            out["rope_theta"] = ntk_base(self.rope_theta, self.rope_scaling["factor"], self.head_dim)
            out["rope_scaling"] = None
            out["tianying_rope_scaling"] = {**self.rope_scaling, "rope_theta": self.rope_theta}
        for k in _LONG_CONTEXT_KEYS:  # written only when switched on: released configs stay byte-identical
            if getattr(self, k):
                out[k] = getattr(self, k)
        if self.torch_dtype:
            out["torch_dtype"] = self.torch_dtype
        if self.chat_template:
            out["tianying_chat_template"] = self.chat_template
        return out

    def to_flagai(self) -> dict:
        return {
            "dim": self.hidden_size,
            "n_heads": self.n_head,
            "n_kv_heads": self.n_kv_head,
            "n_layers": self.n_layer,
            "intermediate_size": self.intermediate_size,
            "multiple_of": 256,
            "norm_eps": self.rms_norm_eps,
            "vocab_size": self.vocab_size,
            "max_seq_len": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            **({"tianying_chat_template": self.chat_template} if self.chat_template else {}),
        }


_HF_NAMES = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads"}
_REQUIRED = object()


def _num(raw: dict, key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """raw[key] as an int/float, or one line naming the field: "256" (a string) is a mistake, not a number.
    A missing key, or null where a default exists, gives the default."""
    v = raw.get(key)
    if v is None:
        if default is _REQUIRED:
            raise ConfigError(f"config.json lacks required field {key!r}")
        return default
    ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        want = "an integer" if kind is int else "a number"
        raise ConfigError(f"field {key!r} must be {want}, got {v!r} ({type(v).__name__})")
    return kind(v)


def _token_id(raw: dict, key: str, default: int | None = None) -> int | None:
    """A special-token id; transformers allows a list (several EOS ids), of which the first is the primary."""
    v = raw.get(key, default)
    if isinstance(v, list):
        v = v[0] if v else None
    if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
        raise ConfigError(f"field {key!r} must be an integer token id or null, got {v!r}")
    return None if v is not None and v < 0 else v  # early LLaMA conversions wrote pad_token_id -1 for "none"


def _flag(raw: dict, key: str) -> bool:
    v = raw.get(key, False)
    if not isinstance(v, bool) and v is not None:
        raise ConfigError(f"field {key!r} must be true or false, got {v!r}")
    return bool(v)


_LONG_CONTEXT_KEYS = ("logn_attention", "logn_length", "attention_window", "attention_sinks")
# fields a training run may change on an existing checkpoint: they change what positions mean, not any shape
CONTEXT_FIELDS = ("rope_scaling", "rope_theta", "max_position_embeddings", *_LONG_CONTEXT_KEYS)


def with_context_settings(cfg: Config, changes: dict) -> Config:
    """`cfg` with long-context settings changed (e.g. PI: rope_scaling linear ×4 and a 4× longer
    max_position_embeddings); anything else in `changes` would change weight shapes and is refused."""
    bad = sorted(set(changes) - set(CONTEXT_FIELDS))
    if bad:
        allowed = ", ".join(CONTEXT_FIELDS)
        raise ConfigError(f"model_args {bad} cannot change on an existing checkpoint; allowed: {allowed}")
    return cfg.replace(**changes) if changes else cfg


def _restore_ntk(cfg: dict, saved: dict | None, raw: dict) -> None:
    """Undo `to_hf`'s static-NTK folding (rope_theta = b·f^(D/(D−2))) when rope_theta still says so.

    If another tool rewrote rope_theta or set its own rope_scaling, its values win and the note is dropped.
    """
    rs = cfg.get("rope_scaling")
    if not isinstance(saved, dict) or (rs is not None and rs.get("rope_type", rs.get("type")) not in (None, "default")):
        return
    from tianying.rope import ntk_base

    try:
        base, factor = float(saved["rope_theta"]), float(saved["factor"])
        head_dim = int(raw.get("head_dim") or cfg["hidden_size"] // cfg["n_head"])
    except (KeyError, TypeError, ValueError):
        return
    if math.isclose(ntk_base(base, factor, head_dim), cfg["rope_theta"], rel_tol=1e-9):
        cfg["rope_theta"] = base
        cfg["rope_scaling"] = {k: v for k, v in saved.items() if k != "rope_theta"}
    else:
        warnings.warn("config.json's tianying_rope_scaling does not match its rope_theta; ignoring it", stacklevel=3)


def ffn_width(dim: int, multiple_of: int = 256) -> int:
    """FlagAI v1 rule: int(2·4d/3) rounded up to a multiple of `multiple_of` (4096 → 11008)."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


def normalize_rope_scaling(rs: dict) -> dict | None:
    """Accept both HF spellings (`type` and `rope_type`); reject what we cannot compute."""
    if not isinstance(rs, dict):
        raise ConfigError(f"rope_scaling must be an object or null, got {rs!r}")
    rs = dict(rs)
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    from tianying.rope import SCALING_KINDS  # floor-1 sibling; import here to keep config importable alone

    if kind not in SCALING_KINDS:
        raise ConfigError(f"rope_scaling type {kind!r} is not supported (known: {', '.join(SCALING_KINDS)})")
    if "factor" not in rs or float(rs["factor"]) < 1.0:
        raise ConfigError(f"rope_scaling {rs!r} needs a factor ≥ 1")
    rs["type"] = rs["rope_type"] = kind
    rs["factor"] = float(rs["factor"])
    return rs


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict = {}
    for k, v in pairs:
        if k in seen and seen[k] != v:
            if k == "model_type":  # AquilaChat-7B has "AquilaChat" then "llama": harmless, both mean LLaMA
                warnings.warn(f"config.json has duplicate key {k!r} ({seen[k]!r}, {v!r}); using {v!r}",
                              stacklevel=2)
            else:
                raise ConfigError(
                    f"config.json has the key {k!r} twice with different values ({seen[k]!r} and {v!r}); "
                    "a JSON parser would silently keep the last one — fix the file"
                )
        seen[k] = v
    return seen


def _fix_special_ids(cfg: dict) -> dict:
    """v1 configs say bos=1, eos=2 (LLaMA defaults); in the 100,008 Aquila vocab those are `!` and `"`."""
    if cfg["vocab_size"] in (100008, 100000):
        if cfg.get("bos_token_id") in (1, None) or cfg.get("eos_token_id") in (2, None):
            if cfg.get("bos_token_id") == 1 or cfg.get("eos_token_id") == 2:
                warnings.warn(
                    "config.json has LLaMA's placeholder bos/eos ids (1, 2), which are '!' and '\"' in the "
                    f"Aquila vocabulary; using [CLS]={AQUILA_BOS} and </s>={AQUILA_EOS}", stacklevel=2
                )
            cfg["bos_token_id"], cfg["eos_token_id"] = AQUILA_BOS, AQUILA_EOS
    return cfg


_AQUILA_7B = dict(vocab_size=100008, hidden_size=4096, n_layer=32, n_head=32, n_kv_head=32,
                  intermediate_size=11008, max_position_embeddings=2048, rms_norm_eps=1e-5)
_AQUILA2_34B = dict(vocab_size=100008, hidden_size=6144, n_layer=60, n_head=48, n_kv_head=8,
                    intermediate_size=24576, max_position_embeddings=4096, rms_norm_eps=1e-5,
                    torch_dtype="bfloat16")

CONFIGS: dict[str, dict] = {
    # seed-spec §1.2 (HF config.json values); chat templates from §4.1's template_map
    "aquila-7b": {**_AQUILA_7B, "rms_norm_eps": 1e-6, "torch_dtype": "float16"},
    "aquilachat-7b": {**_AQUILA_7B, "torch_dtype": "float16", "chat_template": "aquila-chat"},
    "aquilacode-7b-nv": {**_AQUILA_7B, "torch_dtype": "float16", "chat_template": "aquila-chat"},
    "aquilacode-7b-ts": {**_AQUILA_7B, "torch_dtype": "float16", "chat_template": "aquila-chat"},
    "aquila-33b": dict(vocab_size=100008, hidden_size=6656, n_layer=60, n_head=52, n_kv_head=52,
                       intermediate_size=17920, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "aquila2-7b": {**_AQUILA_7B, "torch_dtype": "float16"},
    "aquilachat2-7b": {**_AQUILA_7B, "torch_dtype": "float16", "chat_template": "aquila-v1"},
    "aquilachat2-7b-16k": {**_AQUILA_7B, "torch_dtype": "float16", "max_position_embeddings": 16384,
                           "rope_scaling": {"type": "linear", "factor": 8.0}, "chat_template": "aquila"},
    "aquila2-34b": dict(_AQUILA2_34B),
    "aquilachat2-34b": {**_AQUILA2_34B, "chat_template": "aquila-legacy"},
    "aquilachat2-34b-16k": {**_AQUILA2_34B, "rope_scaling": {"type": "linear", "factor": 4.0},
                            "chat_template": "aquila"},
    "aquila2-70b-expr": dict(vocab_size=100008, hidden_size=8192, n_layer=80, n_head=64, n_kv_head=8,
                             intermediate_size=28672, max_position_embeddings=4096, rms_norm_eps=1e-5,
                             torch_dtype="bfloat16"),
    "aquilachat2-70b-expr": dict(vocab_size=100008, hidden_size=8192, n_layer=80, n_head=64, n_kv_head=8,
                                 intermediate_size=28672, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                 torch_dtype="bfloat16", chat_template="aquila-v2"),
    # small models for tests, demos and benchmarks (not released checkpoints)
    "demo": dict(vocab_size=16000, hidden_size=256, n_layer=4, n_head=4, n_kv_head=4, intermediate_size=688,
                 max_position_embeddings=1024, rms_norm_eps=1e-5, chat_template="aquila-v1",
                 bos_token_id=15998, eos_token_id=15999),  # the demo tokenizer: 15,992 BPE + 8 specials
    "tiny": dict(vocab_size=100008, hidden_size=256, n_layer=4, n_head=4, n_kv_head=4, intermediate_size=688,
                 max_position_embeddings=2048, rms_norm_eps=1e-5),
    "small": dict(vocab_size=100008, hidden_size=768, n_layer=12, n_head=12, n_kv_head=12,
                  intermediate_size=2048, max_position_embeddings=2048, rms_norm_eps=1e-5),
    "test-mha": dict(vocab_size=512, hidden_size=64, n_layer=2, n_head=4, n_kv_head=4, intermediate_size=176,
                     max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
    "test-gqa": dict(vocab_size=512, hidden_size=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=176,
                     max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
}
