"""Token generation: logits processing, sampling, and the KV-cache decode loop.

The engine knows nothing about text; it turns prompt ids into new ids, so it is tested with mock models of
fixed logits. Text concerns (stop strings, streaming detokenization) live in `StopMatcher` and `tianying.api`.

Two processing orders are offered:
- standard (transformers' order): repetition penalty → temperature → top-k → top-p;
- `legacy=True`, the seed's Aquila2 `predict()` (seed-spec §4.2): top-p → top-k → temperature, so the nucleus
  is chosen on un-tempered logits, temperature 0 means top-1 sampling, and `</s>` may not be the first token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from tianying.errors import TianyingError


class GenerationError(TianyingError):
    pass


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 → greedy (argmax)
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    legacy: bool = False
    min_new_tokens: int = 0  # stop ids are banned before this many tokens
    stop: tuple[str, ...] = field(default=())  # text-level; handled by the caller (see StopMatcher)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be ≥ 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise GenerationError(f"top_k must be ≥ 0, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.legacy and self.temperature == 0:  # the seed's predict(): greedy as top-1 sampling
            self.top_k, self.temperature = 1, 1.0
        if self.legacy:
            self.min_new_tokens = max(self.min_new_tokens, 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


# ---------------------------------------------------------------------------------------------- processors
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token in `seen` [B, L]: positive logits ÷ p, negative × p."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    score = torch.gather(logits, 1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def apply_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    if not k or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches p (always at least one)."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # exclusive cumulative mass
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                   n_generated: int = 0) -> torch.Tensor:
    """logits [B, V] fp32 → processed logits (temperature applied unless greedy)."""
    if params.stop_token_ids and n_generated < params.min_new_tokens:
        logits = logits.clone()
        logits[:, list(params.stop_token_ids)] = float("-inf")
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.legacy:
        logits = apply_top_k(apply_top_p(logits, params.top_p), params.top_k)
        return logits / params.temperature
    if params.temperature == 0:
        return logits
    logits = logits / params.temperature
    return apply_top_p(apply_top_k(logits, params.top_k), params.top_p)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Processed logits [B, V] → token ids [B]."""
    if params.temperature == 0 or params.top_k == 1:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------- decode loop
def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, T] ids and a [B, T] bool mask (None when no row needs padding)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, T - len(p):] = True
    return ids, (None if bool(mask.all()) else mask)


def prefill(model, ids: torch.Tensor, cache, positions: torch.Tensor | None = None,
            pad_mask: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Runs the prompt [B, T] into `cache` in chunks of `chunk` tokens; returns the last position's logits [B, V].

    With a window cache a chunk attends to at most S + W + chunk keys, so peak memory is flat in T.
    """
    T = ids.shape[1]
    chunk = chunk or T
    logits = None
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        logits = model(ids[:, a:b], cache=cache, positions=None if positions is None else positions[:, a:b],
                       pad_mask=None if pad_mask is None else pad_mask[:, a:b], last_only=True)
    return logits[:, -1]


def make_cache(model, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
    """A KVCache for max_len positions, or a fixed-size WindowKVCache when the config sets attention_window."""
    from tianying.model import KVCache, WindowKVCache

    cfg = model.config
    if getattr(cfg, "attention_window", None):
        return WindowKVCache(cfg, batch_size, cfg.attention_window, cfg.attention_sinks, dtype, device)
    return KVCache(cfg, batch_size, max_len, dtype, device)


@torch.inference_mode()
def generate_tokens(model, prompts: Sequence[Sequence[int]], params: SamplingParams, pad_id: int = 0,
                    device: torch.device | str | None = None,
                    prefill_chunk: int | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token of every row, [B] on CPU, until all rows hit a stop id or max_new_tokens.

    Rows that finished keep receiving `pad_id` (as transformers does) so the batch stays rectangular; the
    caller reads per-row completion from the stop ids. Left padding + per-row positions make a batched
    row compute exactly what it would alone. A config with `attention_window` decodes with a ring-buffer cache
    and prefills in chunks of `prefill_chunk` (default max(W, 256)) tokens; without a window the prompt goes
    in one forward unless `prefill_chunk` is given.
    """

    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    if params.max_new_tokens == 0:
        return
    device = device or next(model.parameters()).device
    cfg = model.config
    ids, pad_mask = left_pad(prompts, pad_id)
    B, T = ids.shape
    ids = ids.to(device)
    dtype = getattr(model, "compute_dtype", None) or next(model.parameters()).dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.float32
    cache = make_cache(model, B, T + params.max_new_tokens, dtype, device)
    window = getattr(cfg, "attention_window", None)
    if window and pad_mask is not None and cfg.attention_sinks:
        raise GenerationError("attention sinks are the first cache columns, which left padding fills with pads: "
                              "generate rows of different lengths one at a time")
    if window and prefill_chunk is None:
        prefill_chunk = max(window, 256)

    positions = None
    if pad_mask is not None:
        pad_mask = pad_mask.to(device)
        positions = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)
        next_pos = positions[:, -1:] + 1
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(params.seed))
    track_seen = params.repetition_penalty != 1.0
    seen = ids if track_seen else None  # padding ids in `seen` only matter if the model would emit them
    stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    some_finished = False  # a Python flag, so an ordinary step spends no tensor ops on bookkeeping

    if prefill_chunk and prefill_chunk < T:
        logits = prefill(model, ids, cache, positions, pad_mask, prefill_chunk)
    else:
        logits = model(ids, cache=cache, positions=positions, pad_mask=pad_mask, last_only=True)[:, -1]
    for step in range(params.max_new_tokens):
        processed = process_logits(logits.float(), params, seen, step)
        nxt = sample(processed, params, generator)
        if some_finished:
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_id))
        yield nxt.cpu()
        if stop_ids.numel():
            unfinished &= ~torch.isin(nxt, stop_ids)
            some_finished = not bool(unfinished.all())
            if some_finished and not bool(unfinished.any()):
                return
        if step + 1 == params.max_new_tokens:
            return
        if track_seen:
            seen = torch.cat([seen, nxt[:, None]], dim=1)
        if positions is None:
            logits = model(nxt[:, None], cache=cache, last_only=True)[:, -1]
        else:
            logits = model(nxt[:, None], cache=cache, positions=next_pos, last_only=True)[:, -1]
            next_pos = next_pos + 1


# ---------------------------------------------------------------------------------------------- stop strings
class StopMatcher:
    """Streams text while holding back anything that might be the start of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Adds a piece; returns the text that is now safe to emit (and sets `stopped` on a match)."""
        if self.stopped:
            return ""
        self.text += piece
        search_from = max(0, self.emitted - max((len(s) for s in self.stops), default=0))
        cut = None
        for s in self.stops:
            i = self.text.find(s, search_from)
            if i != -1 and (cut is None or i < cut):
                cut = i
        if cut is not None:
            self.stopped = True
            out = self.text[self.emitted:cut] if cut > self.emitted else ""
            self.text = self.text[:cut]
            self.emitted = len(self.text)
            return out
        hold = 0
        for s in self.stops:  # longest suffix of text that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        safe = len(self.text) - hold
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out

    def flush(self) -> str:
        out = self.text[self.emitted:] if not self.stopped else ""
        self.emitted = len(self.text)
        return out
