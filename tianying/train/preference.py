"""Preference training: DPO and friends on (prompt, chosen, rejected) pairs, through the shared loop.

A pair is two SFT encodings of the same prompt, one ending in the chosen reply and one in the rejected one,
rendered by the chat template exactly as SFT renders them; only the final reply (and the separator that ends
it) carries labels. A batch of B pairs is one forward of 2B rows, chosen rows first (TRL's layout).

With π the policy, π_ref the reference (the frozen starting checkpoint) and log-probs summed over reply tokens:
- sigmoid (DPO, Rafailov et al. 2023): d = [log π(c) − log π_ref(c)] − [log π(r) − log π_ref(r)],
  loss = −(1−ε)·log σ(β·d) − ε·log σ(−β·d), ε the label smoothing (conservative DPO; 0 is plain DPO).
- ipo (Azar et al. 2023): the same log-ratios averaged per reply token (TRL's normalisation, confirmed by the
  IPO authors), loss = (d − 1/(2β))².
- simpo (Meng et al. 2024), reference-free: d = log π(c)/|c| − log π(r)/|r| − γ/β, loss as sigmoid with ε.
Rewards are β·(log π − log π_ref) (SimPO: β·mean log π); the reward margin is chosen − rejected and the
reward accuracy the fraction of pairs with a positive margin.

The reference costs no second copy of the weights for LoRA (the same model with its adapters switched off,
`tianying.lora.adapters_disabled`); a full finetune keeps one frozen copy unless the reference log-probs are
precomputed once before training (`precompute_reference`), after which no reference forward runs at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tianying.data.sft import (
    IGNORE,
    SFTDataError,
    SFTStats,
    bad_record,
    encode_conversation,
    map_columns,
    read_records,
    record_preference,
)

LOSSES = ("sigmoid", "ipo", "simpo")
METRICS = ("reward_margin", "reward_acc", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp")


@dataclass
class PreferencePair:
    id: str
    chosen_ids: list[int]
    chosen_labels: list[int]  # not yet shifted, as SFTExample.labels
    rejected_ids: list[int]
    rejected_labels: list[int]
    ref: tuple[float, float] | None = None  # precomputed reference log-probs (chosen, rejected)

    def __len__(self) -> int:
        return max(len(self.chosen_ids), len(self.rejected_ids))


# ============================================================================================= data
def load_preference(paths: str | Path | Sequence[str | Path], tokenizer, template, seq_length: int,
                    skip_bad: bool = False, columns: dict[str, str] | None = None, split: str | None = None,
                    limit: int | None = None) -> tuple[list[PreferencePair], SFTStats]:
    """Read and encode preference records (forms: `tianying.data.sft.record_preference`); each malformed
    record is one SFTDataError naming file and record (or is counted and skipped with `skip_bad`)."""
    from tianying.templates import TemplateError

    if isinstance(paths, (str, Path)):
        paths = [paths]
    stats, out = SFTStats(), []
    for path in paths:
        for rid, rec in read_records(path, skip_bad, stats, split):
            try:
                prompt, chosen, rejected = record_preference(map_columns(rec, columns))
                c = encode_conversation(prompt + [chosen], tokenizer, template, seq_length + 1, last_reply_only=True)
                r = encode_conversation(prompt + [rejected], tokenizer, template, seq_length + 1,
                                        last_reply_only=True)
            except (ValueError, TemplateError) as e:
                bad_record(stats, f"{path}: record {rid}: {e}", skip_bad)
                continue
            # a pair needs a trained token on both sides (the prompt alone may fill seq_length)
            if not any(x != IGNORE for x in c[1][1:]) or not any(x != IGNORE for x in r[1][1:]):
                stats.skipped_empty += 1
                continue
            stats.records += 1
            stats.truncated += c[2] or r[2]
            stats.tokens += len(c[0]) + len(r[0])
            stats.trained_tokens += sum(x != IGNORE for x in c[1]) + sum(x != IGNORE for x in r[1])
            out.append(PreferencePair(rid, c[0], c[1], r[0], r[1]))
            if limit is not None and len(out) >= limit:
                return out, stats
    if not out:
        raise SFTDataError(f"no usable preference pairs in {', '.join(map(str, paths))} ({stats.summary()})")
    return out, stats


def collate_preference(pairs: Sequence[PreferencePair], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """B pairs → {"input_ids" [2B, T], "labels" [2B, T] aligned to positions, chosen rows first; and
    "ref_logps" [2B] when every pair carries precomputed reference log-probs}. Right-padded (no mask needed)."""
    rows = [(p.chosen_ids, p.chosen_labels) for p in pairs] + [(p.rejected_ids, p.rejected_labels) for p in pairs]
    n = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    for b, (x, y) in enumerate(rows):
        ids[b, :len(x)] = torch.tensor(x)
        labels[b, :len(y)] = torch.tensor(y)
    out = {"input_ids": ids[:, :-1].contiguous(), "labels": labels[:, 1:].contiguous()}
    if all(p.ref is not None for p in pairs):
        out["ref_logps"] = torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs], dtype=torch.float32)
    return out


# ============================================================================================= math
def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p(label), number of labels) per row, fp32; `labels` aligned to positions, -100 ignored."""
    per_tok = -F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                               reduction="none").view(labels.shape)
    return per_tok.sum(-1), (labels != IGNORE).sum(-1)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                    n_chosen: torch.Tensor, n_rejected: torch.Tensor, loss_type: str = "sigmoid",
                    beta: float = 0.1, label_smoothing: float = 0.0, simpo_gamma: float = 0.5
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (losses, chosen rewards, rejected rewards) from summed reply log-probs [B] (see the module
    docstring for the formulas); n_* are the reply token counts. Reference log-probs are unused by simpo."""
    if loss_type == "simpo":
        avg_c, avg_r = policy_chosen / n_chosen.clamp(min=1), policy_rejected / n_rejected.clamp(min=1)
        d = avg_c - avg_r - simpo_gamma / beta
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
        return losses, beta * avg_c.detach(), beta * avg_r.detach()
    lc, lr = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        d = lc - lr
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    elif loss_type == "ipo":
        d = lc / n_chosen.clamp(min=1) - lr / n_rejected.clamp(min=1)
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss {loss_type!r}: expected one of {', '.join(LOSSES)}")
    return losses, beta * lc.detach(), beta * lr.detach()


# ============================================================================================= objective
class PreferenceObjective:
    """The loop's objective for pairs (see `tianying.train.loop.TokenLoss` for the protocol).

    `reference(input_ids)` → the reference logits (called under no_grad), for batches without precomputed
    "ref_logps"; None for simpo or when every batch carries them.
    """

    metrics = METRICS
    loss_label = "preference loss (mean per pair)"

    def __init__(self, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, reference: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if loss_type not in LOSSES:
            raise ValueError(f"loss {loss_type!r}: expected one of {', '.join(LOSSES)}")
        self.loss_type, self.beta, self.label_smoothing = loss_type, beta, label_smoothing
        self.simpo_gamma = simpo_gamma
        self.reference = reference

    def units(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def tokens(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def reference_logps(self, batch: dict, autocast: Callable = contextlib.nullcontext) -> torch.Tensor | None:
        if self.loss_type == "simpo":
            return None
        if "ref_logps" in batch:
            return batch["ref_logps"].float()
        if self.reference is None:
            raise ValueError("no reference model and no precomputed reference log-probs")
        with torch.no_grad(), autocast():
            logits = self.reference(batch["input_ids"])
        return sequence_logps(logits, batch["labels"])[0]

    def __call__(self, model: nn.Module, batch: dict, autocast: Callable = contextlib.nullcontext) -> tuple:
        B = self.units(batch)
        with autocast():
            logits = model(batch["input_ids"])
        logps, n = sequence_logps(logits, batch["labels"])
        ref = self.reference_logps(batch, autocast)
        rc, rr = (ref[:B], ref[B:]) if ref is not None else (None, None)
        losses, cr, rj = preference_loss(logps[:B], logps[B:], rc, rr, n[:B], n[B:], self.loss_type, self.beta,
                                         self.label_smoothing, self.simpo_gamma)
        margin = cr - rj
        lp = logps.detach()
        mets = {"reward_margin": float(margin.sum()), "reward_acc": float((margin > 0).float().sum()),
                "chosen_reward": float(cr.sum()), "rejected_reward": float(rj.sum()),
                "chosen_logp": float(lp[:B].sum()), "rejected_logp": float(lp[B:].sum())}
        return losses.sum(), mets


@torch.no_grad()
def precompute_reference(pairs: Sequence[PreferencePair], reference: Callable[[torch.Tensor], torch.Tensor],
                         batch_size: int, pad_id: int, device: torch.device,
                         autocast: Callable = contextlib.nullcontext) -> None:
    """Fill every pair's `ref` with the reference's summed reply log-probs, in a fixed order and batching
    (a resumed run recomputes exactly the same values)."""
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = collate_preference([PreferencePair(p.id, p.chosen_ids, p.chosen_labels, p.rejected_ids,
                                                   p.rejected_labels) for p in chunk], pad_id)
        with autocast():
            logits = reference(batch["input_ids"].to(device))
        logps = sequence_logps(logits, batch["labels"].to(device))[0].cpu()
        for k, p in enumerate(chunk):
            p.ref = (float(logps[k]), float(logps[len(chunk) + k]))


def frozen_reference(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A frozen copy of `model` as it is now (a full finetune's starting checkpoint), in eval mode."""
    import copy

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return lambda ids: ref(ids)


def plot_margins(csv_path: str | Path, png_path: str | Path) -> Path | None:
    """Reward margin and reward accuracy against step (like the loss curve); None without matplotlib."""
    from tianying.train.log import read_metrics

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in read_metrics(csv_path) if r.get("reward_margin") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["reward_margin"] for r in rows], label="reward margin (chosen − rejected)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward margin")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["reward_acc"] for r in rows], "g--", label="reward accuracy")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("reward accuracy")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right")
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
