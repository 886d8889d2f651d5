"""Shared fixtures: tiny random reference checkpoints written by transformers (no download).

`tiny_hf_checkpoint(cfg_name, fmt=..., max_shard_size=..., dialect=..., **config_overrides)` builds a
transformers `LlamaForCausalLM` from `Config.to_hf()`, gives it random weights of unit-scale activations (the
default 0.02 init makes logits so small that a wrong RoPE layout would hide under a 1e-4 tolerance) and writes
it in one of the layouts found on the hub. The result carries the reference model for logit comparisons.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tianying.config import Config


@dataclass
class HFCheckpoint:
    path: Path
    cfg: Config
    model: torch.nn.Module  # transformers LlamaForCausalLM, fp32, eval mode

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Unit-scale random weights: matrices ~ N(0, 1/fan_in), norm weights ~ 1 ± 0.2, embeddings ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


def build_reference(cfg: Config, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**cfg.to_hf()))
    randomize_(model, seed)
    return model.float().eval()


def _save_bin(model: torch.nn.Module, path: Path, max_shard_size: int | None) -> None:
    """transformers 5 no longer writes .bin; write the legacy layout (with old converters' inv_freq) by hand."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for i in range(model.config.num_hidden_layers):
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (
            torch.arange(0, head_dim, 2).float() / head_dim)
    if not max_shard_size:
        torch.save(sd, path / "pytorch_model.bin")
        return
    shards: list[dict] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, path / name)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
             "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def to_aquila_dialect(path: Path) -> None:
    """Rewrite config.json as BAAI ships Aquila2 (model_type aquila, remote-code auto_map, legacy rope keys)."""
    raw = json.loads((path / "config.json").read_text())
    rope = raw.pop("rope_parameters", None) or {}
    raw["rope_theta"] = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", "default")
    raw["rope_scaling"] = None if kind == "default" else {"type": kind, "factor": rope["factor"]}
    raw["model_type"] = "aquila"
    raw["architectures"] = ["AquilaForCausalLM"]
    raw["auto_map"] = {"AutoConfig": "configuration_aquila.AquilaConfig",
                       "AutoModelForCausalLM": "modeling_aquila.AquilaForCausalLM"}
    raw["transformers_version"] = "4.31.0"
    raw["torch_dtype"] = raw.pop("dtype", "float32")
    (path / "config.json").write_text(json.dumps(raw, indent=2))


def make_hf_checkpoint(path: Path, cfg: str | Config = "test-mha", *, fmt: str = "safetensors",
                       max_shard_size: int | None = None, dialect: str = "llama", seed: int = 0,
                       **overrides) -> HFCheckpoint:
    """Write a random reference model to `path` as fmt "safetensors" or "bin", sharded when max_shard_size."""
    cfg = Config.from_name(cfg, **overrides) if isinstance(cfg, str) else cfg.replace(**overrides)
    model = build_reference(cfg, seed)
    path.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(path, max_shard_size=max_shard_size or "50GB")
    elif fmt == "bin":
        model.config.save_pretrained(path)
        model.generation_config.save_pretrained(path)
        _save_bin(model, path, max_shard_size)
    else:
        raise ValueError(f"unknown fmt {fmt!r}")
    if dialect == "aquila":
        to_aquila_dialect(path)
    return HFCheckpoint(path, cfg, model)


@pytest.fixture
def tiny_hf_checkpoint(tmp_path):
    """Factory: tiny_hf_checkpoint("test-gqa", fmt="bin", max_shard_size=20_000) → HFCheckpoint in tmp_path."""
    counter = iter(range(1_000_000))

    def make(cfg: str | Config = "test-mha", **kw) -> HFCheckpoint:
        return make_hf_checkpoint(tmp_path / f"hf-{next(counter)}", cfg, **kw)

    return make


@pytest.fixture
def token_ids():
    """A [2, 16] batch of token ids valid for the test configs (vocab 512)."""
    return torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than two on a busy machine (training tests use it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
