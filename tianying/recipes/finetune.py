"""Finetuning recipe: conversations → the shared training loop, training all weights, LoRA, or LoRA on NF4.

Methods (seed-spec §8.3):
- full: every parameter, fp32 master weights; the result `out_dir/final` is a Hugging Face checkpoint.
- lora: LoRA layers swapped into the attention/MLP projections; only they train. The frozen base is held in
  the compute dtype (bf16 with precision=bf16, else fp32). The result is a PEFT adapter directory.
- qlora: as lora, with the frozen projections stored as NF4 (4.13 bits/weight) and dequantized on the fly.
- dpo: preference training (tianying.train.preference) on (prompt, chosen, rejected) records, with the policy
  trained as `policy` says (full, lora or qlora). The reference is the starting checkpoint: for lora/qlora the
  same model with its adapters switched off, for full a frozen copy, or neither with `precompute_ref`, which
  scores every pair with the reference once before training. Same loop, checkpoints and resume as SFT; the
  reward margin/accuracy and chosen/rejected log-probs go to metrics.csv and `out_dir/margins.png`.

Checkpoints are the loop's (`out_dir/checkpoints/step-N`, resumable with --resume); for lora/qlora each one is
itself a PEFT adapter directory. Before training the recipe prints a memory estimate (weights, gradients,
optimizer, activations); after it, the measured peak (GPU: max allocated; CPU: peak resident set during
training, minus the resident set before the model was loaded).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tianying.config import Config, ConfigError, with_context_settings
from tianying.train import state as S
from tianying.train.loop import StepBatches, TrainConfig, TrainResult, check_enough_rows, flops_per_token, train

METHODS = ("full", "lora", "qlora", "dpo")
POLICIES = ("full", "lora", "qlora")


@dataclass
class FinetuneConfig(TrainConfig):
    method: str = "lora"  # full | lora | qlora | dpo
    checkpoint: str | None = None  # the base model directory (Hugging Face or FlagAI layout, with tokenizer)
    data: Any = None  # SFT or preference file(s)/directories (the forms: tianying.data.sft, record_preference)
    valid_data: Any = None
    template: str | None = None  # chat template; default: the checkpoint's
    seq_length: int = 1024
    pack: bool = False  # several conversations per row (see tianying.data.sft)
    pack_isolate: bool = True  # packed conversations attend only to themselves, positions restart per sample
    columns: Any = None  # dataset column → ours, e.g. {prompt: question, chosen: good} or "prompt=question,..."
    split: str | None = None  # the split of a `datasets` DatasetDict directory (default train)
    # preference training (method: dpo)
    policy: str = "lora"  # how the policy trains: full | lora | qlora
    dpo_loss: str = "sigmoid"  # sigmoid (DPO) | ipo | simpo (reference-free)
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO's ε (sigmoid, simpo)
    simpo_gamma: float = 0.5  # SimPO's target margin γ (the loss uses γ/β)
    precompute_ref: bool = False  # score every pair with the reference once, before training
    skip_bad: bool = False  # skip (and count) malformed records instead of stopping
    shuffle: bool = True
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    lora_target_modules: Any = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                              "gate_proj", "up_proj", "down_proj"])
    nf4_blocksize: int = 64
    # CPU: glibc serves allocations from this size up with their own mmap, returned to the OS when freed
    # (see `_return_freed_memory`); 0 leaves glibc's adaptive default
    malloc_mmap_threshold: int = 1 << 20
    # long-context settings for the model being trained (config.CONTEXT_FIELDS), e.g. the seed's PI + SFT:
    # {rope_scaling: {type: linear, factor: 4}, max_position_embeddings: 8192} with seq_length 8192
    model_args: dict = field(default_factory=dict)
    lr: float = 2.0e-4
    warm_up: float = 0.1
    epochs: int = 3
    save_interval: int = 500
    out_dir: str = "runs/finetune"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy {self.policy!r}: expected one of {', '.join(POLICIES)}")
        from tianying.train.preference import LOSSES

        if self.dpo_loss not in LOSSES:
            raise ConfigError(f"dpo_loss {self.dpo_loss!r}: expected one of {', '.join(LOSSES)}")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"beta must be > 0 and label_smoothing in [0, 0.5), got {self.beta}, "
                              f"{self.label_smoothing}")
        if self.method == "dpo" and self.pack:
            raise ConfigError("pack is for SFT rows; preference pairs are batched as they are (set pack: false)")

    @property
    def weights(self) -> str:
        """How the weights train: the method, or for dpo its policy (full | lora | qlora)."""
        return self.policy if self.method == "dpo" else self.method

    def lora_config(self):  # noqa: ANN201 - LoRAConfig, imported lazily
        from tianying.lora import LoRAConfig

        return LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          target_modules=self.lora_target_modules)


# ============================================================================================= memory
@dataclass
class MemoryEstimate:
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def format(self) -> str:
        g = 1 / 2**20
        return (f"memory estimate: weights {self.weights * g:.1f} MiB + gradients {self.grads * g:.1f} MiB + "
                f"optimizer {self.optimizer * g:.1f} MiB + activations {self.activations * g:.1f} MiB "
                f"= {self.total * g:.1f} MiB (a lower bound: allocator overhead, temporaries and the data "
                f"are not counted; the measured peak is printed after training)")


def estimate_memory(mcfg: Config, method: str, batch_size: int, seq_length: int, precision: str = "fp32",
                    activation_checkpointing: bool = False, lora_params: int = 0, lora_dropout: float = 0.0,
                    nf4_bits: float = 4.127) -> MemoryEstimate:
    """Bytes for one micro-batch of training, from the shapes alone (see the model for the saved tensors).

    Weights: fp32 master copy (full); the frozen base in the compute dtype plus fp32 LoRA (lora); NF4
    projections plus full-precision embedding/head/norms (qlora). Gradients fp32 for what trains; AdamW keeps
    two fp32 moments. Activations, per token per layer, count the tensors autograd keeps: the norm inputs and
    outputs and residual (≈6·d), q/k/v with RoPE (≈2·d + 4·kv), the SwiGLU intermediates (4·f); attention
    probabilities are never stored (SFT batches are right-padded, so attention runs SDPA's fused causal kernel
    on CPU and GPU alike; isolated packed rows pass a boolean block-diagonal mask, which the fused kernels take
    too, and the recipe adds its B·T² bytes). LoRA dropout adds a 1-byte mask per wrapped input. With
    activation checkpointing only each layer's input (d) is kept, plus one layer recomputed at a time. The LM
    head adds the logits, their fp32 copy and gradient (3·V per token).
    """
    d, f, V, L = mcfg.hidden_size, mcfg.intermediate_size, mcfg.vocab_size, mcfg.n_layer
    kv = mcfg.n_kv_head * mcfg.head_dim
    N = mcfg.n_params
    proj = L * (2 * d * d + 2 * d * kv + 3 * d * f)
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    base_bytes = 4 if method == "full" or precision == "fp32" else act_bytes
    if method == "full":
        weights, trainable = 4.0 * N, N
    elif method == "lora":
        weights, trainable = base_bytes * N + 4.0 * lora_params, lora_params
    else:
        weights, trainable = nf4_bits / 8 * proj + base_bytes * (N - proj) + 4.0 * lora_params, lora_params
    T = seq_length
    tokens = batch_size * T
    per_layer = (6 * d + 2 * d + 4 * kv + 4 * f) * act_bytes
    if method != "full" and lora_dropout > 0:
        per_layer += 6 * d + f  # one bool keep-mask per wrapped projection's input (tianying.lora._LoRADropout)
    if activation_checkpointing:
        act = tokens * (L * d * act_bytes + per_layer)
    else:
        act = tokens * L * per_layer
    act += tokens * V * (act_bytes + 4 + 4)
    return MemoryEstimate(weights, 4.0 * trainable, 8.0 * trainable, float(act))


class PeakMemory:
    """Peak memory of a phase: CUDA max allocated, or on CPU the resident-set high-water mark (VmHWM, reset
    through /proc/self/clear_refs) minus the resident set at `baseline()` time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = _rss()

    def baseline(self) -> None:
        self.base = _rss() if self.device.type != "cuda" else 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
            except OSError:
                pass

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(0, _hwm() - self.base)


def _status(key: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    return _status("VmRSS")


def _hwm() -> int:
    return _status("VmHWM")


def _return_freed_memory(threshold: int) -> bool:
    from tianying.memory import return_freed_memory

    return return_freed_memory(threshold)


# ============================================================================================= recipe
def _template(cfg: FinetuneConfig, mcfg: Config, path: Path):  # noqa: ANN202
    from tianying.templates import checkpoint_template

    return checkpoint_template(path, mcfg, cfg.template)  # `template:` (a name or a Jinja file) wins


def _data_list(data: Any) -> list[str]:
    if data is None:
        return []
    if isinstance(data, (str, Path)):
        return [str(p) for p in str(data).split(",") if p]
    return [str(p) for p in data]


@dataclass
class FinetuneResult:
    train: TrainResult
    final_dir: Path
    estimate: MemoryEstimate
    peak_bytes: int
    seconds_per_step: float | None
    trainable_params: int


def run_finetune(cfg: FinetuneConfig, resume: bool = False, log=print,  # noqa: ANN001
                 overwrite: bool = False) -> FinetuneResult:
    """Load the base checkpoint and the conversations, then train with the shared loop.

    A fresh run needs an empty (or missing) out_dir unless `overwrite`; `resume` continues the run in it.
    """
    from tianying import checkpoint as ckpt
    from tianying.data.sft import collate_sft, load_sft, pack_examples, parse_columns
    from tianying.tokenizer import Tokenizer
    from tianying.train import distributed as D
    from tianying.train import preference as P

    if not cfg.checkpoint:
        raise ConfigError("no base checkpoint: give --checkpoint DIR (or `checkpoint:` in the config)")
    data = _data_list(cfg.data)
    if not data:
        raise ConfigError("no training data: give --data FILE (or `data:` in the config)")
    info = D.setup(cfg.device)
    if info.world_size == 1:  # fail before loading anything (train() checks again, on every rank)
        try:
            S.check_out_dir(cfg.out_dir, resume, overwrite)
        except BaseException:
            D.teardown()
            raise
    if info.device.type == "cpu" and cfg.malloc_mmap_threshold > 0:
        _return_freed_memory(cfg.malloc_mmap_threshold)
    mem = PeakMemory(info.device)
    try:
        path = Path(cfg.checkpoint)
        if not path.is_dir():
            raise ConfigError(f"checkpoint {path} is not a directory")
        mcfg = with_context_settings(ckpt.load_config(path), cfg.model_args)
        tok = Tokenizer.from_dir(path)
        if cfg.seq_length > mcfg.max_position_embeddings:
            raise ConfigError(f"seq_length {cfg.seq_length} exceeds the model's max_position_embeddings "
                              f"{mcfg.max_position_embeddings}")
        template = _template(cfg, mcfg, path)
        dpo = cfg.method == "dpo"
        load = P.load_preference if dpo else load_sft
        columns = parse_columns(cfg.columns)
        examples, stats = load(data, tok, template, cfg.seq_length, skip_bad=cfg.skip_bad, columns=columns,
                               split=cfg.split)
        log(f"data: {stats.summary().replace('conversations', 'preference pairs' if dpo else 'conversations')} "
            f"[template {template}]")
        for e in stats.errors[:5]:
            log(f"  skipped: {e}")
        valid_examples = None
        if cfg.valid_data:
            valid_examples, vstats = load(_data_list(cfg.valid_data), tok, template, cfg.seq_length,
                                          skip_bad=cfg.skip_bad, columns=columns, split=cfg.split)
        if cfg.pack:
            order = list(range(len(examples)))
            random.Random(cfg.seed).shuffle(order)  # mix lengths before packing; rows are reshuffled per epoch
            n_before = len(examples)
            examples = pack_examples([examples[i] for i in order], cfg.seq_length + 1)
            log(f"packing: {n_before} conversations → {len(examples)} rows of ≤ {cfg.seq_length + 1} tokens")
            if valid_examples:
                valid_examples = pack_examples(valid_examples, cfg.seq_length + 1)
        check_enough_rows(len(examples), cfg.batch_size, cfg.gradient_accumulation_steps, info.world_size,
                          "packed rows" if cfg.pack else "preference pairs" if dpo else "conversations")
        pad = tok.pad_id if tok.pad_id is not None else 0
        if dpo:
            collate = lambda rows: P.collate_preference(rows, pad)  # noqa: E731
        else:
            isolate = cfg.pack and cfg.pack_isolate
            collate = lambda rows: collate_sft(rows, pad, doc_ids=isolate)  # noqa: E731
        batches = StepBatches(examples, cfg.batch_size, cfg.gradient_accumulation_steps, info.rank,
                              info.world_size, collate, shuffle=cfg.shuffle, seed=cfg.seed)
        valid = (StepBatches(valid_examples, cfg.batch_size, 1, info.rank, info.world_size, collate)
                 if valid_examples else None)

        mem.baseline()
        model, mcfg, trainable, save_model, load_model = _prepare_model(cfg, path, info.device, template)
        n_train = sum(p.numel() for n, p in model.named_parameters() if trainable is None or n in trainable)
        # a DPO step runs 2 rows per pair (chosen, rejected); a full policy's reference is a second copy
        est = estimate_memory(mcfg, cfg.weights, cfg.batch_size * (2 if dpo else 1), cfg.seq_length,
                              cfg.precision, cfg.activation_checkpointing, 0 if cfg.weights == "full" else n_train,
                              cfg.lora_dropout)
        if not dpo and cfg.pack and cfg.pack_isolate:
            est.activations += cfg.batch_size * cfg.seq_length**2  # the block-diagonal mask, 1 byte per entry
        objective = None
        if dpo:
            objective = _preference_objective(cfg, model, examples, valid_examples, pad, info.device, log)
            if cfg.weights == "full" and objective.reference is not None:
                est.weights += 4.0 * mcfg.n_params
        log(f"{cfg.method}{f' ({cfg.weights} policy)' if dpo else ''}: {n_train:,} trainable parameters of "
            f"{mcfg.n_params:,}")
        log(est.format())
        n_no_embed = mcfg.n_params - mcfg.vocab_size * mcfg.hidden_size
        fpt = flops_per_token(n_no_embed, mcfg.n_layer, mcfg.hidden_size, cfg.seq_length)
        mem.start()
        t0 = time.perf_counter()
        res = train(model, batches, cfg, trainable=trainable, valid=valid, save_model=save_model,
                    load_model=load_model, resume=resume, overwrite=overwrite, info=info, flops_per_tok=fpt,
                    objective=objective)
        if dpo and info.is_main and cfg.plot and (Path(cfg.out_dir) / "metrics.csv").is_file():
            P.plot_margins(Path(cfg.out_dir) / "metrics.csv", Path(cfg.out_dir) / "margins.png")
        elapsed = time.perf_counter() - t0
        peak = mem.peak()
        log(f"measured peak memory during training: {peak / 2**20:.1f} MiB "
            f"({'GPU allocated' if info.device.type == 'cuda' else 'CPU resident, above the pre-load baseline'})")
        sps = _seconds_per_step(Path(cfg.out_dir) / "metrics.csv")
        return FinetuneResult(res, Path(cfg.out_dir) / "final", est, peak,
                              sps if sps is not None else elapsed / max(1, res.step), n_train)
    finally:
        D.teardown()


def _preference_objective(cfg: FinetuneConfig, model: torch.nn.Module, pairs: list, valid_pairs: list | None,
                          pad: int, device: torch.device, log):  # noqa: ANN001, ANN202
    """The DPO objective with its reference: the base with adapters off (lora/qlora), a frozen copy (full), or
    log-probs precomputed here, while the model still holds the starting weights (a resumed run loads its
    checkpoint only later, inside `train`, so it recomputes the same values)."""
    from tianying.train import preference as P

    ref = None
    if cfg.dpo_loss != "simpo":
        if cfg.weights != "full":
            from tianying.lora import adapters_disabled

            def ref(ids: torch.Tensor) -> torch.Tensor:
                with adapters_disabled(model):
                    return model(ids)
        elif cfg.precompute_ref:
            ref = model
        else:
            ref = P.frozen_reference(model)
        if cfg.precompute_ref:
            t0 = time.perf_counter()
            amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
            autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
            was = model.training
            model.eval()
            for group in (pairs, valid_pairs or []):
                P.precompute_reference(group, ref, cfg.batch_size, pad, device, autocast)
            model.train(was)
            log(f"reference log-probs of {len(pairs) + len(valid_pairs or [])} pairs precomputed in "
                f"{time.perf_counter() - t0:.1f} s")
            ref = None
    return P.PreferenceObjective(cfg.dpo_loss, cfg.beta, cfg.label_smoothing, cfg.simpo_gamma, ref)


def _prepare_model(cfg: FinetuneConfig, path: Path, device: torch.device, template):  # noqa: ANN001, ANN202
    """(model, config, trainable names or None, save callback, load callback) for the method."""
    from tianying import checkpoint as ckpt
    from tianying.model import set_config
    from tianying.templates import ChatTemplate, write_chat_template

    if cfg.weights == "full":
        model, mcfg = ckpt.load_model(path, device=device, dtype=torch.float32)
        mcfg = with_context_settings(mcfg, cfg.model_args)
        # the checkpoint keeps the template it was trained with: a name in config.json, a Jinja one as itself
        mcfg.chat_template = template.name if isinstance(template, ChatTemplate) else None
        set_config(model, mcfg)
        model.train()

        def save_full(sd: dict, d: Path) -> None:
            ckpt.save_hf(sd, mcfg, d, tokenizer_dir=path)
            write_chat_template(d, template)

        return (model, mcfg, None, save_full, lambda d: ckpt.load_state_dict(d, dtype=torch.float32, cfg=mcfg))

    from tianying.lora import add_lora, read_adapter, save_adapter

    base_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    model, mcfg = ckpt.load_model(path, device=device, dtype=base_dtype)
    mcfg = with_context_settings(mcfg, cfg.model_args)
    set_config(model, mcfg)
    meta = {"method": cfg.weights, "template": str(template), "base_checkpoint": str(path)}
    if cfg.method == "dpo":
        meta["trained_with"] = {"objective": "dpo", "loss": cfg.dpo_loss, "beta": cfg.beta}
    if cfg.model_args:  # the adapter alone cannot carry them: merge-lora / loading must re-apply these
        meta["model_args"] = cfg.model_args
    if cfg.weights == "qlora":
        from tianying.nf4 import NF4_DEFAULT_MODULES, quantize_model_nf4

        quantize_model_nf4(model, NF4_DEFAULT_MODULES, cfg.nf4_blocksize)
        _own_memory(model)
        meta["base_quantization"] = {"type": "nf4", "blocksize": cfg.nf4_blocksize, "double_quant": True,
                                     "modules": list(NF4_DEFAULT_MODULES)}
    lcfg = cfg.lora_config()
    add_lora(model, lcfg, seed=cfg.seed)
    model.train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    def save(sd: dict, d: Path) -> None:
        save_adapter(sd, lcfg, d, base_model=str(path), meta=meta)
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # what peft users expect nearby
            if (path / name).is_file() and not (Path(d) / name).exists():
                Path(d, name).write_bytes((path / name).read_bytes())
        write_chat_template(d, template)  # the template the adapter was trained with

    def load(d: Path) -> dict:
        _, weights, _ = read_adapter(d)
        return {f"{k}.weight": v for k, v in weights.items()}

    return model, mcfg, trainable, save, load


def _own_memory(model: torch.nn.Module) -> None:
    """Copy the parameters left in full precision out of the memory-mapped checkpoint, so the mapping closes.

    `load_model` hands out views of the mapped file; quantizing reads every projection, and those file pages stay
    resident (and counted) for as long as any tensor still maps the file: on the benchmark model the fp32
    projections the NF4 copies replaced, 70% of the file. Tied weights stay tied.
    """
    copies: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.device.type != "cpu":
                continue
            if id(p) not in copies:
                copies[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            module._parameters[name] = copies[id(p)]


def _seconds_per_step(metrics: Path) -> float | None:
    """Mean step time from the loop's metrics.csv, leaving out the first logged interval (warm-up)."""
    import csv

    if not metrics.is_file():
        return None
    with open(metrics, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("elapsed_s") and r.get("step")]
    if len(rows) < 2:
        return None
    a, b = rows[0], rows[-1]
    steps = int(b["step"]) - int(a["step"])
    return (float(b["elapsed_s"]) - float(a["elapsed_s"])) / steps if steps > 0 else None


def _last_preference_metrics(metrics: Path) -> dict | None:
    """The first and last logged reward metrics of a DPO run (the README's "measured effect")."""
    from tianying.train.log import read_metrics
    from tianying.train.preference import METRICS

    if not metrics.is_file():
        return None
    rows = [r for r in read_metrics(metrics) if r.get("reward_margin") is not None]
    if not rows:
        return None
    keys = ("step",) + METRICS
    return {"first": {k: rows[0][k] for k in keys}, "last": {k: rows[-1][k] for k in keys}}


def write_summary(res: FinetuneResult, cfg: FinetuneConfig) -> None:
    """out_dir/finetune_summary.json: what the benchmark and the README table read."""
    out = Path(cfg.out_dir) / "finetune_summary.json"
    if int(os.environ.get("RANK", "0")) != 0:
        return
    out.write_text(json.dumps({
        "method": cfg.method, "policy": cfg.weights, "steps": res.train.step, "last_loss": res.train.last_loss,
        "preference": _last_preference_metrics(Path(cfg.out_dir) / "metrics.csv") if cfg.method == "dpo" else None,
        "val_loss": res.train.val_loss, "trainable_params": res.trainable_params,
        "estimate_bytes": {"weights": res.estimate.weights, "grads": res.estimate.grads,
                           "optimizer": res.estimate.optimizer, "activations": res.estimate.activations,
                           "total": res.estimate.total},
        "peak_bytes": res.peak_bytes, "seconds_per_step": res.seconds_per_step, "final": str(res.final_dir),
    }, indent=2) + "\n", encoding="utf-8")
