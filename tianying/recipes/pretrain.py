"""Pretraining recipe: packed samples from indexed datasets → the shared training loop.

`model` may be a named config (fresh weights, seeded), a config.json path (fresh weights), or a checkpoint
directory (continued pretraining from its weights). A fresh model takes the tokenizer's BOS/EOS/PAD ids so
that the checkpoint it writes generates and stops with the tokenizer it is saved with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tianying.config import Config, ConfigError, with_context_settings
from tianying.train import state as S
from tianying.train.loop import (
    StepBatches,
    TrainConfig,
    TrainResult,
    check_enough_rows,
    collate_packed,
    flops_per_token,
    train,
)


@dataclass
class PretrainConfig(TrainConfig):
    model: str = "demo"  # named config, config.json, or checkpoint directory to continue from
    # Config field overrides: any for a fresh model (e.g. n_layer); for a checkpoint being continued only the
    # long-context ones (config.CONTEXT_FIELDS: rope_scaling, max_position_embeddings, logn_attention, ...)
    model_args: dict = field(default_factory=dict)
    tokenizer: str | None = None  # directory; copied into every checkpoint
    data: Any = None  # index prefix, "0.7 A 0.3 B", or [[0.7, A], [0.3, B]]
    valid_data: Any = None  # held-out prefixes; default: the `split` tail of each training prefix
    split: str = "98,2"  # train,valid shares by document when valid_data is not given
    seq_length: int = 1024
    isolate_docs: bool = False  # attention stays within each document of a packed sample (tianying.data.pack)
    out_dir: str = "runs/pretrain"


def resolve_model(spec: str, model_args: dict, tokenizer, seed: int,
                  device: torch.device) -> tuple[torch.nn.Module, Config]:
    """(fp32 model, config) for a named config, a config.json, or a checkpoint directory."""
    from tianying import checkpoint as ckpt
    from tianying.model import build_model, set_config

    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file() and _has_weights(path):
        model, cfg = ckpt.load_model(path, device=device, dtype=torch.float32)
        cfg = with_context_settings(cfg, model_args)
        set_config(model, cfg)
        model.train()
        return model, cfg
    if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        cfg = Config.from_hf(path)
    elif path.exists():
        raise ConfigError(f"model {spec!r} is neither a config.json nor a checkpoint directory")
    else:
        cfg = Config.from_name(spec)
    if tokenizer is not None:
        cfg = cfg.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    try:
        cfg = cfg.replace(**model_args)
    except TypeError as e:
        raise ConfigError(f"model_args: {e}") from None
    return build_model(cfg, device=device, dtype=torch.float32, seed=seed), cfg


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("*.pth"))


def run_pretrain(cfg: PretrainConfig, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Build data and model from `cfg` and train; works alone or under torchrun (DDP/FSDP).

    A fresh run needs an empty (or missing) out_dir unless `overwrite`; `resume` continues the run in it.
    """
    from tianying import checkpoint as ckpt
    from tianying.data.indexed import DataError
    from tianying.data.pack import build_pretrain_datasets
    from tianying.train import distributed as D

    info = D.setup(cfg.device)
    try:
        if info.world_size == 1:  # fail before loading anything (train() checks again, on every rank)
            S.check_out_dir(cfg.out_dir, resume, overwrite)
        tok = None
        if cfg.tokenizer:
            from tianying.tokenizer import Tokenizer

            tok = Tokenizer.from_dir(cfg.tokenizer)
        model, mcfg = resolve_model(cfg.model, cfg.model_args, tok, cfg.seed, info.device)
        if tok is not None and tok.vocab_size > mcfg.vocab_size:
            raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but the model only {mcfg.vocab_size}; "
                              f"set model_args: {{vocab_size: {tok.vocab_size}}}")
        if cfg.seq_length > mcfg.max_position_embeddings:
            raise ConfigError(f"seq_length {cfg.seq_length} exceeds the model's max_position_embeddings "
                              f"{mcfg.max_position_embeddings}")
        G = cfg.batch_size * cfg.gradient_accumulation_steps * info.world_size
        want = cfg.max_steps * G if cfg.max_steps is not None else None
        train_ds, valid_ds = build_pretrain_datasets(cfg.data, cfg.valid_data, cfg.seq_length, cfg.seed, cfg.split,
                                                     want)
        if want is None and cfg.epochs > 1:  # later epochs see the documents in new orders (Megatron style)
            train_ds, valid_ds = build_pretrain_datasets(cfg.data, cfg.valid_data, cfg.seq_length, cfg.seed,
                                                         cfg.split, cfg.epochs * len(train_ds))
            cfg = dataclasses.replace(cfg, max_steps=len(train_ds) // G)  # the dataset already holds every epoch
        check_enough_rows(len(train_ds), cfg.batch_size, cfg.gradient_accumulation_steps, info.world_size,
                          f"training samples of seq_length + 1 = {cfg.seq_length + 1} tokens")
        _check_vocab(cfg.data, cfg.valid_data, mcfg.vocab_size, DataError)
        collate = collate_packed
        if cfg.isolate_docs:
            from tianying.data.pack import collate_packed_docs

            collate = collate_packed_docs(mcfg.eos_token_id)
        batches = StepBatches(train_ds, cfg.batch_size, cfg.gradient_accumulation_steps, info.rank,
                              info.world_size, collate)
        valid = (StepBatches(valid_ds, cfg.batch_size, 1, info.rank, info.world_size, collate)
                 if valid_ds is not None else None)
        n_no_embed = mcfg.n_params - mcfg.vocab_size * mcfg.hidden_size
        fpt = flops_per_token(n_no_embed, mcfg.n_layer, mcfg.hidden_size, cfg.seq_length)
        return train(model, batches, cfg, valid=valid, resume=resume, overwrite=overwrite, info=info,
                     flops_per_tok=fpt,
                     save_model=lambda sd, d: ckpt.save_hf(sd, mcfg, d, tokenizer_dir=cfg.tokenizer),
                     load_model=lambda d: ckpt.load_state_dict(d, dtype=torch.float32, cfg=mcfg))
    finally:
        D.teardown()


def _check_vocab(data, valid_data, vocab_size: int, err: type) -> None:
    from tianying.data.indexed import IndexedDataset
    from tianying.data.pack import parse_data_spec

    for _, prefix in parse_data_spec(data) + parse_data_spec(valid_data):
        top = IndexedDataset(prefix).max_token()
        if top >= vocab_size:
            raise err(f"{prefix}: token id {top} is outside the model's vocabulary of {vocab_size} "
                      "(indexed with a different tokenizer?)")
