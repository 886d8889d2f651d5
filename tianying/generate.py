"""Sampling: the per-request parameters, logits processing, and text-level stop strings.

The decode loop itself is `tianying.engine` (one scheduler and one KV cache for every generation path);
these functions are its per-row sampler, tested with fixed logits.

Two processing orders are offered:
- standard (transformers' order): repetition penalty → temperature → top-k → top-p;
- `legacy=True`, the seed's Aquila2 `predict()` (seed-spec §4.2): top-p → top-k → temperature, so the nucleus
  is chosen on un-tempered logits, temperature 0 means top-1 sampling, and `</s>` may not be the first token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    stop: tuple[str, ...] = field(default=())  # text-level; handled by the engine (see StopMatcher)
    # OpenAI's penalties on tokens already generated: logit −= frequency·count + presence·[count > 0]
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # added to the logits before sampling
    logprobs: int | None = None  # None: off; k ≥ 0: the sampled token's log-probability and the top k
    prompt_logprobs: bool = False  # also score every prompt token (OpenAI's `echo` with logprobs)
    n: int = 1  # independent completions of one prompt (they share its KV cache)
    # constrained decoding: ("json_schema", schema JSON) | ("json_object", None) | ("regex", pattern) |
    # ("lark", grammar); only tokens that keep the output inside the language can be sampled (tianying.engine)
    grammar: tuple[str, str | None] | None = None

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
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise GenerationError(f"{name} must be in [-2, 2], got {v}")
        for t, b in dict(self.logit_bias).items():
            if not (isinstance(t, int) and t >= 0):
                raise GenerationError(f"logit_bias keys must be token ids ≥ 0, got {t!r}")
            if not -100.0 <= b <= 100.0:
                raise GenerationError(f"logit_bias values must be in [-100, 100], got {b} for token {t}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise GenerationError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.n < 1:
            raise GenerationError(f"n must be ≥ 1, got {self.n}")
        if self.grammar is not None and self.grammar[0] not in ("json_schema", "json_object", "regex", "lark"):
            raise GenerationError(f"grammar kind must be json_schema, json_object, regex or lark, got "
                                  f"{self.grammar[0]!r}")
        if self.seed is not None and not -(2**63) <= int(self.seed) < 2**64:
            raise GenerationError(f"seed must fit in 64 bits, got {self.seed}")
        if self.legacy and self.temperature == 0:  # the seed's predict(): greedy as top-1 sampling
            self.top_k, self.temperature = 1, 1.0
        if self.legacy:
            self.min_new_tokens = max(self.min_new_tokens, 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: no processor changes which token wins."""
        return (self.temperature == 0 and self.repetition_penalty == 1.0 and self.min_new_tokens == 0
                and not self.presence_penalty and not self.frequency_penalty and not self.logit_bias
                and not self.legacy and self.grammar is None)


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
