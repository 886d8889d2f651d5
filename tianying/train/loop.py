"""The one training loop, shared by pretraining and finetuning.

A recipe hands `train()` a model, a `StepBatches` (the rank-local micro-batches of every optimizer step),
the names of the parameters to train, and a `TrainConfig`; it gets back the trained model. What differs
between pretraining and SFT/LoRA is only the dataset, the collate function, the trainable set and how the
model is written (`save_model` / `load_model` callbacks).

Batches are `(input_ids [B, T], labels [B, T])` with labels ALREADY ALIGNED to positions: `labels[b, t]` is
the target for the logits at position t (the next token), -100 where nothing is learned. (That is
`causal_lm_loss`'s convention shifted by one; it saves the slice-and-copy of the full logits.) A third tensor,
`doc_ids [B, T]`, isolates the samples of packed rows (see `Transformer.forward`). What a batch means is the
`objective`'s business: the default `TokenLoss` is next-token cross-entropy; preference training
(tianying.train.preference) passes its own, which sees pairs and reports reward metrics.

Choices worth knowing:
- The loss of a step is the mean over all target tokens of the *global* batch (every micro-batch on every
  rank), so 1 process × batch 8 and 2 processes × batch 4 train identically, also with padding.
- Batches are addressed by (step, micro-step), not drawn from an iterator: the data position of a resumed
  run is just the step, and a resumed run replays exactly what an uninterrupted one would have seen.
- LR: linear warmup over W = warm_up_iters or int(warm_up · N) optimizer steps, then cosine decay to
  `min_lr` (default 0.1 · lr, the seed's Cosine10PP) at step N. The schedule counts optimizer steps; the
  seed's BMTrain trainer counted micro-steps.
- fp16 uses dynamic loss scaling (halve on overflow and skip the step; double after `loss_scale_window`
  clean steps, as BMTrain's OptimManager); bf16 needs none. Both use autocast over fp32 master weights.

Work is never lost (train/state.py has the details): a fresh run refuses a used out_dir unless `overwrite`;
retention deletes only the current run's checkpoints; a failed save is one line and leaves the previous
checkpoint whole; the first SIGINT/SIGTERM finishes the step, saves a checkpoint and stops with
`TrainingInterrupted` (a second one stops at once).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tianying.config import ConfigError
from tianying.errors import TianyingError
from tianying.model import Transformer
from tianying.train import distributed as D
from tianying.train import state as S
from tianying.train.log import MetricsLogger, plot_loss
from tianying.train.loss import linear_cross_entropy


# =============================================================================================== config
@dataclass
class TrainConfig:
    """Loop settings; names follow the seed's FlagAI yaml (seed-spec §7.1–7.2)."""

    batch_size: int = 8  # per-process micro-batch
    gradient_accumulation_steps: int = 1
    epochs: int = 1  # passes over the training set, used when max_steps is not set
    max_steps: int | None = None
    lr: float = 3.0e-4  # peak
    min_lr: float | None = None  # cosine floor; default 0.1 × lr
    warm_up: float = 0.01  # warm-up fraction of all steps (used when warm_up_iters is 0)
    warm_up_iters: int = 0
    weight_decay: float = 0.1  # on matrices only, never norms
    eps: float = 1.0e-8
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 1.0  # max global grad norm; 0 disables clipping
    save_interval: int = 1000
    log_interval: int = 10
    eval_interval: int = 1000
    eval_iters: int = 20  # validation batches per evaluation
    seed: int = 1234
    precision: str = "fp32"  # fp32 | bf16 | fp16 (dynamic loss scaling)
    loss_scale: float = 65536.0  # initial fp16 loss scale
    loss_scale_window: int = 1000
    activation_checkpointing: bool = False
    keep_last_k: int = 3  # complete checkpoints kept (0 keeps all)
    out_dir: str = "runs/train"
    distributed: str = "ddp"  # ddp | fsdp, when launched by torchrun with more than one process
    cpu_offload: bool = False  # FSDP: keep parameter/optimizer shards in host memory
    device: str | None = None  # default cuda when available, else cpu
    compile: bool = False  # torch.compile the model (needs a C++ compiler on CPU)
    tensorboard: bool = True  # when the tensorboard package is installed
    plot: bool = True  # loss-curve PNG at the end (needs matplotlib)
    progress: bool = True  # tqdm bar
    peak_flops: float | None = None  # per device, for MFU; default: known GPU table, or measured on CPU

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision {self.precision!r}: expected fp32, bf16 or fp16")
        if self.distributed not in ("ddp", "fsdp"):
            raise ConfigError(f"distributed {self.distributed!r}: expected ddp or fsdp")
        self.betas = tuple(float(b) for b in self.betas)
        for k in ("batch_size", "gradient_accumulation_steps", "log_interval", "save_interval", "eval_interval"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be ≥ 1, got {getattr(self, k)}")


def load_config(cls: type, path: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    """A `cls` (TrainConfig or a recipe's subclass) from YAML plus `key=value` overrides.

    Unknown keys are rejected with the list of valid ones: a typo like `lr_decay` must not silently train
    with the default. Values are coerced to the field's type (YAML reads `3e-4` as a string).
    """
    import yaml

    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value")
        raw[key.strip()] = yaml.safe_load(value) if value.strip() else None
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    unknown = sorted(k for k in raw if k not in hints)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}")
    kw = {k: _coerce(k, v, hints[k]) for k, v in raw.items()}
    return cls(**kw)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    if value is None:
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = typing.get_origin(hint)
    if base in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        hint = args[0] if len(args) == 1 else hint
        base = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise ValueError
            return value
        if hint is int:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
        if base is tuple:
            if isinstance(value, str):
                value = [v for v in value.strip("[]()").split(",") if v.strip()]
            return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r}: cannot use {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value


def config_dict(cfg: Any) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


# =============================================================================================== data
def collate_packed(samples: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed pretraining samples of seq_length+1 tokens → (tokens[:-1], tokens[1:])."""
    x = torch.from_numpy(np.stack([np.asarray(s, dtype=np.int64) for s in samples]))
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


@dataclass
class StepBatches:
    """Random access to this rank's micro-batches: `get(step, micro)`.

    Optimizer step s uses the global batch of G = batch_size × grad_accum × world samples at positions
    [s·G, (s+1)·G) of the epoch's order (drop_last); rank r's micro-step m takes rows
    (m·world + r)·batch_size …. The epoch order is a seeded permutation (or identity), so the batches of a
    step depend only on the step, never on what ran before.
    """

    dataset: Any  # len() and [i]
    batch_size: int
    grad_accum: int = 1
    rank: int = 0
    world_size: int = 1
    collate: Callable[[list], tuple[torch.Tensor, torch.Tensor]] = collate_packed
    shuffle: bool = False
    seed: int = 0
    _perm: tuple[int, np.ndarray] | None = field(default=None, repr=False)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch

    def _order(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, rng.permutation(len(self.dataset)))
        return self._perm[1]

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        spe = self.steps_per_epoch
        if spe < 1:
            raise ValueError(f"{len(self.dataset)} samples are fewer than one global batch of {self.global_batch}")
        epoch, s = divmod(step, spe)
        base = s * self.global_batch + (micro * self.world_size + self.rank) * self.batch_size
        order = self._order(epoch)
        idx = range(base, base + self.batch_size)
        return self.collate([self.dataset[int(order[i]) if order is not None else i] for i in idx])


# =============================================================================================== schedule
def lr_at(step: int, total: int, peak: float, warmup: int, min_lr: float) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to `peak`, then cosine to `min_lr` at `total`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LossScaler:
    """Dynamic fp16 loss scale: ×0.5 and skip on inf/nan gradients, ×2 after `window` clean steps."""

    def __init__(self, scale: float = 65536.0, window: int = 1000, enabled: bool = True) -> None:
        self.scale, self.window, self.enabled, self.good = float(scale), int(window), enabled, 0

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.scale, self.good = max(self.scale / 2, 1.0), 0
        else:
            self.good += 1
            if self.good >= self.window:
                self.scale, self.good = self.scale * 2, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good": self.good}

    def load_state_dict(self, d: dict) -> None:
        self.scale, self.good = float(d["scale"]), int(d["good"])


# =============================================================================================== MFU
_GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A800": 312e12, "L40": 181e12, "4090": 165e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of one device from a table of GPUs (bf16 tensor cores); None where no peak is known.

    No CPU entry: a measured matmul is not a peak (a training step's large matmuls beat a short 512³ probe, so
    "MFU" came out above 100%), and vendors publish no per-dtype CPU peak we could look up. Set `peak_flops` in
    the config to get an MFU column on such a device."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k, v in _GPU_PEAK.items():
            if k in name:
                return v if dtype != torch.float32 else v / 2  # TF32 is half the bf16 rate
    return None


def flops_per_token(n_params_no_embed: int, n_layer: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) + 12·L·d·T for attention (PaLM)."""
    return 6 * n_params_no_embed + 12 * n_layer * hidden * seq_len


# =============================================================================================== loop
@dataclass
class TrainResult:
    model: nn.Module
    step: int
    last_loss: float | None
    val_loss: float | None
    out_dir: Path


class TrainingInterrupted(TianyingError):
    """SIGINT/SIGTERM stopped training after a step; a checkpoint of that step was saved."""


class _StopOnSignal:
    """The first SIGINT/SIGTERM asks the loop to stop after the current step; a second one stops at once.

    Installed only in the main thread (Python delivers signals there); the previous handlers come back on exit.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              "(once more to quit at once)", file=sys.stderr, flush=True)


def check_enough_rows(n_rows: int, batch_size: int, grad_accum: int, world_size: int, what: str = "rows") -> None:
    """One line before training when the data cannot fill a single global batch."""
    g = batch_size * grad_accum * world_size
    if n_rows < g:
        raise ConfigError(f"the training data has {n_rows} {what}, fewer than one global batch of {g} "
                          f"(batch_size {batch_size} × gradient_accumulation_steps {grad_accum} × {world_size} "
                          "process(es)): lower batch_size or add data")


def _token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


class TokenLoss:
    """The loop's default objective: summed next-token cross-entropy over the labelled tokens.

    An objective gives, for a micro-batch, `units` (what the step's loss is averaged over: here target tokens;
    a preference objective counts pairs), `tokens` (for tokens/s) and `__call__(model, batch, autocast)` →
    (summed loss with grad, {metric: sum over units}); `metrics` names the metrics it reports.
    """

    metrics: tuple[str, ...] = ()

    def units(self, batch: Sequence[torch.Tensor]) -> int:
        return int((batch[1] != -100).sum())

    tokens = units

    def __call__(self, model: nn.Module, batch: Sequence[torch.Tensor], autocast: Callable) -> tuple:
        kw = {"doc_ids": batch[2]} if len(batch) > 2 else {}
        head = _fusable_head(model)
        with autocast():
            if head is None:
                return _token_ce_sum(model(batch[0], **kw), batch[1]), {}
            # the head inside the loss, in chunks of rows (tianying.train.loss): the same sum, without the
            # full [B, T, V] logits and their gradient
            return linear_cross_entropy(model(batch[0], hidden_only=True, **kw), head.weight, batch[1]), {}


def _fusable_head(model: nn.Module) -> nn.Linear | None:
    """The plain LM head of a tianying Transformer run as is or torch.compile'd; None for anything else: a DDP
    wrapper or an FSDP-sharded model (each must see the head used inside its forward, to reduce its gradient), a
    swapped head (LoRA, quantized)."""
    m = getattr(model, "_orig_mod", model)
    if not isinstance(m, Transformer) or type(m.lm_head) is not nn.Linear or m.lm_head.bias is not None:
        return None
    return None if D.is_sharded(m.lm_head) else m.lm_head


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch


def train(model: nn.Module, batches: StepBatches, cfg: TrainConfig, *,
          trainable: Iterable[str] | None = None,
          valid: StepBatches | None = None,
          save_model: Callable[[dict[str, torch.Tensor], Path], None] | None = None,
          load_model: Callable[[Path], dict[str, torch.Tensor]] | None = None,
          resume: bool = False,
          overwrite: bool = False,
          info: D.DistInfo | None = None,
          flops_per_tok: float | None = None,
          final_dir: str | Path | None = None,
          objective: Any = None) -> TrainResult:
    """Train `model` (fp32, on `info.device`) on `batches` under `cfg`; checkpoints and logs go to cfg.out_dir.

    Args:
        trainable: names of the parameters to train (default all); the rest are frozen.
        valid: validation micro-batches (batch_size rows per rank, grad_accum 1), evaluated every
            eval_interval steps and at the end.
        save_model: writes the model's (full, unsharded) state dict as a directory that must not exist yet;
            default: `model.safetensors` of the trainable parameters.
        load_model: reads that directory back into a state dict (for --resume).
        resume: continue from the newest complete checkpoint of the run in cfg.out_dir (fresh start if none).
        overwrite: start a fresh run even though cfg.out_dir is not empty (its old checkpoints are kept).
        flops_per_tok: training FLOPs per token for MFU (see `flops_per_token`).
        final_dir: where the final model goes (default out_dir/final).
        objective: what a batch's loss is (default `TokenLoss`, next-token cross-entropy; see there).
    Raises OutDirInUse (a fresh run into a used out_dir), ConfigError (data smaller than one batch),
    CheckpointSaveError (a save failed), TrainingInterrupted (SIGINT/SIGTERM; a checkpoint was saved).
    """
    info = info or D.DistInfo(device=torch.device(cfg.device or "cpu"))
    objective = objective or TokenLoss()
    out_dir = Path(cfg.out_dir)
    save_model = save_model or _default_save
    load_model = load_model or _default_load
    raw = model
    names = set(trainable) if trainable is not None else None
    all_names = {n for n, _ in raw.named_parameters()}
    if names is not None and names - all_names:
        raise ConfigError(f"trainable parameters not in the model: {sorted(names - all_names)[:5]}")
    for n, p in raw.named_parameters():
        p.requires_grad_(names is None or n in names)
    if cfg.activation_checkpointing:
        raw.gradient_checkpointing = True

    # ---------------------------------------------------------------- out_dir and data, before any work
    refused = None
    if info.is_main:
        try:
            S.check_out_dir(out_dir, resume, overwrite)
        except S.OutDirInUse as e:
            refused = e
    flag = torch.tensor([1.0 if refused else 0.0], dtype=torch.float64)
    D.all_reduce_sum(flag, info)  # every rank stops, not only the one that looked
    if refused is not None:
        raise refused
    if float(flag) > 0:
        raise S.OutDirInUse(f"out_dir {out_dir} is not empty (see rank 0)")
    check_enough_rows(len(batches.dataset), batches.batch_size, batches.grad_accum, batches.world_size)

    # ---------------------------------------------------------------- resume: weights before wrapping
    start_step, tstate, rng = 0, None, None
    run_id, ckpt = S.start_run(out_dir, resume)
    if resume:
        S.clean_partial(out_dir) if info.is_main else None
    if ckpt is not None:
        start_step, ckpt_path = ckpt
        tstate, rng = S.load_trainer_state(ckpt_path, info)
        sd = load_model(ckpt_path)
        missing, unexpected = raw.load_state_dict(sd, strict=False)
        if unexpected:
            raise S.CheckpointError(f"{ckpt_path}: weights not in the model: {unexpected[:5]}")
        if names is None and missing:
            raise S.CheckpointError(f"{ckpt_path}: weights missing: {missing[:5]}")

    run_model = D.wrap(raw, info, cfg.distributed, cfg.cpu_offload)
    sharded = D.is_sharded(raw)
    if cfg.compile:
        run_model = torch.compile(run_model)
    params = [(n, p) for n, p in raw.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = info.device.type in ("cpu", "cuda") and not sharded
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
    scaler = LossScaler(cfg.loss_scale, cfg.loss_scale_window, enabled=cfg.precision == "fp16")

    spe = batches.steps_per_epoch
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * spe
    if total < 1:
        raise ConfigError(f"nothing to train: {len(batches.dataset)} samples give {spe} steps per epoch at a "
                          f"global batch of {batches.global_batch}")
    warmup = cfg.warm_up_iters or int(cfg.warm_up * total)
    min_lr = cfg.min_lr if cfg.min_lr is not None else 0.1 * cfg.lr

    if tstate is not None:
        _load_optimizer(raw, opt, tstate["optimizer"], sharded)
        scaler.load_state_dict(tstate.get("loss_scaler", {"scale": cfg.loss_scale, "good": 0}))
        if tstate.get("total_steps") not in (None, total):
            import warnings

            warnings.warn(f"resuming a run planned for {tstate['total_steps']} steps with {total}; "
                          "the LR schedule changes", stacklevel=2)
    torch.manual_seed(cfg.seed + info.rank)
    if rng is not None:
        S.restore_rng(rng)

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    autocast = (lambda: torch.autocast(info.device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    peak = cfg.peak_flops or peak_flops(info.device, amp_dtype or torch.float32)
    logger = MetricsLogger(out_dir, enabled=info.is_main, tensorboard=cfg.tensorboard,
                           resume_step=start_step if ckpt is not None else None)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        S.write_run_file(out_dir, run_id)
    bar = None
    if cfg.progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    if valid is not None and valid.steps_per_epoch < 1 and info.is_main:
        import warnings

        warnings.warn(f"the validation set has {len(valid.dataset)} rows, fewer than one batch of "
                      f"{valid.global_batch}: no validation loss will be computed (lower batch_size, or give more "
                      "validation data)", stacklevel=2)

    def evaluate() -> float | None:
        if valid is None or valid.steps_per_epoch < 1:
            return None
        run_model.eval()
        tot = torch.zeros(2, dtype=torch.float64, device=info.device)
        with torch.no_grad():
            for i in range(min(cfg.eval_iters, valid.steps_per_epoch)):
                batch = _to_device(valid.get(i, 0), info.device)
                ce, _ = objective(run_model, batch, autocast)
                tot[0] += ce.double()
                tot[1] += objective.units(batch)
        run_model.train()
        D.all_reduce_sum(tot, info)
        return float(tot[0] / tot[1].clamp(min=1))

    def checkpoint(step: int) -> None:
        full = _full_state(raw, sharded)
        osd = _optimizer_state(raw, opt, sharded)
        tst = {"optimizer": osd, "loss_scaler": scaler.state_dict(), "total_steps": total,
               "warmup_steps": warmup, "data": {"step": step, "global_batch": batches.global_batch},
               "config": {k: v for k, v in config_dict(cfg).items() if isinstance(v, (int, float, str, bool))}}
        S.save_checkpoint(out_dir, step, info, write_model=(lambda d: save_model(full, d)) if info.is_main else None,
                          trainer_state=tst if info.is_main else None, keep_last_k=cfg.keep_last_k or None,
                          run_id=run_id)
        saved[0] = step

    saved = [start_step if ckpt is not None else -1]  # the step of the newest checkpoint on disk

    stop = _StopOnSignal().__enter__()
    try:
        run_model.train()
        names_m = tuple(objective.metrics)
        acc = {"loss": 0.0, "n": 0, "tokens": 0, "time": 0.0, "gnorm": 0.0, "units": 0.0, "m": [0.0] * len(names_m)}
        last_loss = val_loss = None
        t_start = time.perf_counter()
        tokens_seen = 0
        step = start_step
        for step in range(start_step, total):
            t0 = time.perf_counter()
            lr = lr_at(step, total, cfg.lr, warmup, min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            micro = [batches.get(step, m) for m in range(batches.grad_accum)]
            counts = torch.tensor([sum(objective.units(b) for b in micro), sum(objective.tokens(b) for b in micro)],
                                  dtype=torch.float64)
            D.all_reduce_sum(counts, info)
            n_tok = counts[0]  # loss units: target tokens (or pairs, for a preference objective)
            denom = max(float(n_tok), 1.0) / info.world_size  # DDP/FSDP average gradients over ranks
            loss_sum = torch.zeros(1 + len(names_m), dtype=torch.float64)  # loss, then the objective's metrics
            for m, batch in enumerate(micro):
                batch = _to_device(batch, info.device)
                sync = m == len(micro) - 1
                ctx = run_model.no_sync() if hasattr(run_model, "no_sync") and not sync else contextlib.nullcontext()
                if sharded:
                    raw.set_requires_gradient_sync(sync)
                with ctx:
                    ce, mets = objective(run_model, batch, autocast)
                    (ce * (scaler.scale / denom if scaler.enabled else 1.0 / denom)).backward()
                loss_sum[0] += ce.detach().double().cpu()
                for k, name in enumerate(names_m):
                    loss_sum[1 + k] += float(mets[name])
            if scaler.enabled:
                for _, p in params:
                    if p.grad is not None:
                        p.grad.mul_(1.0 / scaler.scale)
            gnorm = _clip(params, cfg.clip_grad)
            finite = math.isfinite(gnorm)
            if finite or not scaler.enabled:
                opt.step()
            scaler.update(finite)
            opt.zero_grad(set_to_none=True)
            D.all_reduce_sum(loss_sum, info)
            loss = float(loss_sum[0]) / max(float(n_tok), 1.0)
            dt = time.perf_counter() - t0
            tokens_seen += int(counts[1])
            acc["loss"] += loss
            acc["gnorm"] += gnorm if finite else 0.0
            acc["n"] += 1
            acc["tokens"] += int(counts[1])
            acc["time"] += dt
            acc["units"] += float(n_tok)
            acc["m"] = [a + float(v) for a, v in zip(acc["m"], loss_sum[1:])]
            done = step + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)
            if done % cfg.log_interval == 0 or done == total:
                tps = acc["tokens"] / max(acc["time"], 1e-9)
                mfu = tps * flops_per_tok / (peak * info.world_size) if flops_per_tok and peak else None
                last_loss = acc["loss"] / acc["n"]
                logger.log({"step": done, "loss": last_loss, "lr": lr, "grad_norm": acc["gnorm"] / acc["n"],
                            "tokens_per_sec": tps, "mfu": mfu, "tokens": tokens_seen,
                            "elapsed_s": time.perf_counter() - t_start,
                            "loss_scale": scaler.scale if scaler.enabled else None,
                            **{k: v / max(acc["units"], 1.0) for k, v in zip(names_m, acc["m"])}})
                acc = {"loss": 0.0, "n": 0, "tokens": 0, "time": 0.0, "gnorm": 0.0, "units": 0.0,
                       "m": [0.0] * len(names_m)}
            if valid is not None and (done % cfg.eval_interval == 0 or done == total):
                val_loss = evaluate()
                if val_loss is not None:
                    ppl = math.exp(min(val_loss, 50.0)) if isinstance(objective, TokenLoss) else None
                    logger.log({"step": done, "val_loss": val_loss, "val_ppl": ppl})
                    if bar is not None:
                        bar.write(f"step {done}: validation loss {val_loss:.4f}"
                                  + (f", perplexity {ppl:.2f}" if ppl is not None else ""))
            if done % cfg.save_interval == 0 and done != total:
                checkpoint(done)
            if _stop_requested(stop, info):
                if saved[0] != done:
                    checkpoint(done)
                where = S.step_dir(out_dir, done)
                raise TrainingInterrupted(f"stopped by {signal.Signals(stop.signum or signal.SIGINT).name} after "
                                          f"step {done} of {total}; checkpoint {where} saved; --resume continues")
        if bar is not None:
            bar.close()
            bar = None
        done = max(total, start_step)
        if done > start_step or ckpt is None:
            checkpoint(done)
        full = _full_state(raw, sharded)
        final = Path(final_dir) if final_dir is not None else out_dir / "final"
        if info.is_main:
            S.save_final(final, lambda d: save_model(full, d))
        D.barrier(info)
    finally:
        stop.__exit__()
        if bar is not None:
            bar.close()
        logger.close()
    if info.is_main and cfg.plot and logger.path.is_file():
        plot_loss(logger.path, out_dir / "loss.png", getattr(objective, "loss_label", "loss (nats/token)"))
    return TrainResult(raw, done, last_loss, val_loss, out_dir)


def _stop_requested(stop: _StopOnSignal, info: D.DistInfo) -> bool:
    """Whether any rank got SIGINT/SIGTERM (all ranks must stop at the same step to save together)."""
    if info.world_size == 1:
        return stop.signum is not None
    flag = torch.tensor([0.0 if stop.signum is None else 1.0], dtype=torch.float64)
    D.all_reduce_sum(flag, info)
    return float(flag) > 0


def _clip(params: list[tuple[str, nn.Parameter]], max_norm: float) -> float:
    ps = [p for _, p in params if p.grad is not None]
    if not ps:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(ps, max_norm if max_norm and max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _full_state(raw: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The full model state dict on CPU (gathered from shards under FSDP; collective there)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k: v.detach().cpu() for k, v in raw.state_dict().items()}
    return sd


def _optimizer_state(raw: nn.Module, opt: torch.optim.Optimizer, sharded: bool) -> dict:
    """Optimizer state keyed by parameter name (not position), full (unsharded), on CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(raw, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_optimizer(raw: nn.Module, opt: torch.optim.Optimizer, osd: dict, sharded: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    try:
        set_optimizer_state_dict(raw, opt, osd, options=StateDictOptions(full_state_dict=True))
    except (KeyError, RuntimeError, ValueError) as e:
        raise S.CheckpointError(f"optimizer state does not match the model ({type(e).__name__}: {e})") from None


def _default_save(sd: dict[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))


def _default_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))
