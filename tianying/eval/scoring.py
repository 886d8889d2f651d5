"""Log-likelihood scoring on a `tianying.model.Transformer`: the numeric core of every task kind.

Multiple choice costs about one forward pass per item:
- single-token continuations (the answer letters of C-Eval/CMMLU/MMLU) need only the next-token distribution
  after the prompt, so a batch of prompts is run once, left-padded, with `last_only=True`;
- multi-token continuations (poem couplets) run the shared prompt once into a KV cache, copy that cache to
  one row per choice, and run all choices together on top of it (the prompt is never recomputed).
Context and continuation are tokenized separately (as Aquila's own eval scripts take the letter's token id),
so the prompt's tokens are the same for every choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tianying.model import KVCache, Transformer


def _dtype_device(model: Transformer) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters())
    return getattr(model, "compute_dtype", p.dtype), p.device


@torch.no_grad()
def next_token_logprobs(model: Transformer, contexts: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
    """log p(next token | context) for each context: [B, V] float32 (one left-padded forward)."""
    _, device = _dtype_device(model)
    T = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(contexts), T), dtype=torch.bool)
    for i, c in enumerate(contexts):
        if not c:
            raise ValueError("empty context: nothing to condition the next token on")
        ids[i, T - len(c):] = torch.tensor(list(c))
        mask[i, T - len(c):] = True
    ids, mask = ids.to(device), mask.to(device)
    ragged = not bool(mask.all())
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0) if ragged else None
    logits = model(ids, positions=positions, pad_mask=mask if ragged else None, last_only=True)
    return logits[:, -1].float().log_softmax(-1)


@torch.no_grad()
def score_continuations(model: Transformer, context: Sequence[int], continuations: Sequence[Sequence[int]],
                        greedy: list[bool] | None = None) -> list[float]:
    """Summed log-likelihood of each continuation after `context`, sharing the context's KV cache.

    If `greedy` is a list, it receives, per continuation, whether every token was the argmax (lm-eval's
    `is_greedy`).
    """
    if any(len(c) == 0 for c in continuations):
        raise ValueError("empty continuation")
    _, device = _dtype_device(model)
    L, C = len(context), len(continuations)
    Tc = max(len(c) for c in continuations)
    cache = KVCache.for_model(model, C, L + Tc - 1)  # row 0 takes the context, the others copy it
    first = model(torch.tensor([list(context)], device=device), cache=cache.view(0, 1), last_only=True)[0, -1]
    first = first.float().log_softmax(-1)
    scores = [float(first[c[0]]) for c in continuations]
    top = int(first.argmax())
    flags = [c[0] == top for c in continuations]
    if greedy is not None:
        greedy[:] = flags
    if Tc == 1:
        return scores
    for r in range(1, C):
        cache.copy_row(0, r)
    # right-padded continuations: a pad only ever follows the tokens that are scored, so no mask is needed
    ids = torch.zeros((C, Tc - 1), dtype=torch.long)
    for i, c in enumerate(continuations):
        ids[i, : len(c) - 1] = torch.tensor(list(c[:-1]))
    ids = ids.to(device)
    logp = model(ids, cache=cache).float().log_softmax(-1)  # [C, Tc-1, V]
    for i, c in enumerate(continuations):
        if len(c) > 1:
            tgt = torch.tensor(list(c[1:]), device=device)
            scores[i] += float(logp[i, torch.arange(len(c) - 1, device=device), tgt].sum())
            flags[i] = flags[i] and bool((logp[i, : len(c) - 1].argmax(-1) == tgt).all())
    if greedy is not None:
        greedy[:] = flags
    return scores


@torch.no_grad()
def naive_loglikelihood(model: Transformer, context: Sequence[int], continuation: Sequence[int]) -> float:
    """Reference: one full forward of context + continuation, no cache, no batching (used by the tests)."""
    _, device = _dtype_device(model)
    ids = torch.tensor([list(context) + list(continuation)], device=device)
    logp = model(ids).float().log_softmax(-1)[0]
    L = len(context)
    return float(sum(logp[L - 1 + j, t] for j, t in enumerate(continuation)))


def score_requests(model: Transformer, requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                   batch_size: int = 8, pad_id: int = 0, progress=None) -> list[list[float]]:
    """Scores for a list of (context, continuations) items, batching items whose choices are single tokens."""
    out: list[list[float] | None] = [None] * len(requests)
    single = [i for i, (_, conts) in enumerate(requests) if all(len(c) == 1 for c in conts)]
    # group similar lengths so left padding wastes little
    single.sort(key=lambda i: len(requests[i][0]))
    for s in range(0, len(single), batch_size):
        chunk = single[s:s + batch_size]
        lp = next_token_logprobs(model, [requests[i][0] for i in chunk], pad_id)
        for row, i in enumerate(chunk):
            out[i] = [float(lp[row, c[0]]) for c in requests[i][1]]
        if progress is not None:
            progress(len(chunk))
    for i, (ctx, conts) in enumerate(requests):
        if out[i] is None:
            out[i] = score_continuations(model, ctx, conts)
            if progress is not None:
                progress(1)
    return out  # type: ignore[return-value]


@torch.no_grad()
def rolling_nll(model: Transformer, ids: Sequence[int], prefix_id: int, window: int, stride: int | None = None,
                batch_size: int = 8) -> tuple[float, int]:
    """(total negative log-likelihood in nats, tokens scored) of a whole document.

    Every token of `ids` is predicted once: the document is prefixed with `prefix_id` and cut into chunks of
    `stride` (default `window`) predicted tokens, each seen with up to `window` tokens of input. Windows of
    equal input length run together, `batch_size` at a time.
    """
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride ({stride}) <= window ({window})")
    _, device = _dtype_device(model)
    toks = [prefix_id, *ids]
    n = len(toks)
    spans = []  # (lo, a, b): input toks[lo:b-1] predicts toks[a:b]
    for a in range(1, n, stride):
        b = min(a + stride, n)
        spans.append((max(0, b - 1 - window), a, b))
    by_len: dict[int, list[tuple[int, int, int]]] = {}
    for sp in spans:
        by_len.setdefault(sp[2] - 1 - sp[0], []).append(sp)
    total = 0.0
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            inp = torch.tensor([toks[lo:b - 1] for lo, _, b in chunk], device=device)
            logp = model(inp).float().log_softmax(-1)  # row j predicts toks[lo + j + 1]
            for r, (lo, a, b) in enumerate(chunk):
                rows = torch.arange(a - 1 - lo, b - 1 - lo, device=device)
                tgt = torch.tensor(toks[a:b], device=device)
                total -= float(logp[r, rows, tgt].sum())
    return total, n - 1


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    return nll_nats / (math.log(2) * max(n_bytes, 1))
