"""Continuous batching: one worker thread decodes every active request together over a pool of KV-cache slots.

Why not one `generate_tokens` call per request: the model and its cache are shared state, so concurrent
requests must either queue behind one another (throughput of a single stream) or be decoded as one batch.
Here a fixed pool of `max_concurrency` slots holds one cache row per request, and each step of the worker

1. drops requests whose client went away (their slot is free at once),
2. prefills newly admitted requests (left-padded together) into free rows, and
3. decodes one token for every active row in a single forward pass.

The pool speaks the model's KV-cache protocol (`pos`, `max_len`, `valid`, `update`): every row writes the
same cache column per forward, but carries its own rotary positions and a `valid` mask, so a row attends
only to its own tokens and computes what it would alone (attention over keys is order-free, so where the
columns sit does not matter, only which are valid). Active rows are kept contiguous at the front, so each
forward runs on a slice of the pool (a view, no copy); when the shared column counter reaches the end of
the pool, each row's valid columns are packed to the right and the counter drops back (`_compact`).

Text (incremental UTF-8 decoding, stop strings) is handled per request in the worker too, so a stop string
frees the slot on the very step it appears.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tianying.generate import SamplingParams, StopMatcher, left_pad, process_logits, sample


@dataclass
class Event:
    """What the worker tells a request: new text, and at the end a finish reason and token counts."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Request:
    """One generation: prompt ids, sampling parameters, and a callback that receives `Event`s.

    `emit` is called from the worker thread; it must be cheap and thread-safe (e.g. `call_soon_threadsafe`).
    """

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Free the slot at the worker's next step (safe from any thread)."""
        self.cancelled = True


class _Row:
    """Per-request decoding state of an active slot."""

    def __init__(self, req: Request, tokenizer, device: torch.device) -> None:
        self.req = req
        self.length = len(req.prompt_ids)  # tokens in the cache = rotary position of `pending`
        self.pending = 0  # last sampled token, fed at the next decode step
        self.generated = 0
        self.decoder = tokenizer.stream_decoder()
        self.matcher = StopMatcher(req.params.stop)
        p = req.params
        self.greedy = p.temperature == 0 and p.repetition_penalty == 1.0 and p.min_new_tokens == 0
        self.generator = None
        if p.seed is not None and not p.greedy:
            self.generator = torch.Generator(device=device).manual_seed(int(p.seed))
        self.seen = None
        if p.repetition_penalty != 1.0:
            self.seen = torch.tensor([req.prompt_ids], dtype=torch.long, device=device)


class _SlotPool:
    """Preallocated keys/values for every slot: [n_layer, slots, n_kv_head, max_len, head_dim]."""

    def __init__(self, cfg, slots: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (cfg.n_layer, slots, cfg.n_kv_head, max_len, cfg.head_dim)
        # zeros, not empty (unlike KVCache): a row reads columns other rows' prefills wrote around it, masked
        # out but still multiplied, and uninitialised memory may hold NaN, which a mask does not remove
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(slots, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.pos = 0  # next cache column (shared by all rows)
        self.compactions = 0

    def view(self, lo: int, hi: int) -> _PoolView:
        return _PoolView(self, lo, hi)

    def move_row(self, src: int, dst: int) -> None:
        n = self.pos
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.valid[dst] = self.valid[src]

    def compact(self, rows: int) -> None:
        """Pack each active row's valid columns to the right of column `max(count)`; resets `pos` to it."""
        if rows == 0:
            self.valid.zero_()
            self.pos = 0
            return
        self.compactions += 1
        counts = self.valid[:rows, :self.pos].sum(-1)
        end = int(counts.max())
        for r in range(rows):
            cols = self.valid[r, :self.pos].nonzero().flatten()
            c = cols.numel()
            self.k[:, r, :, end - c:end] = self.k[:, r, :, cols].clone()
            self.v[:, r, :, end - c:end] = self.v[:, r, :, cols].clone()
            self.valid[r] = False
            self.valid[r, end - c:end] = True
        self.valid[rows:] = False
        self.pos = end


class _PoolView:
    """Rows [lo, hi) of the pool, with the interface `Transformer.forward` expects of a `KVCache`."""

    def __init__(self, pool: _SlotPool, lo: int, hi: int) -> None:
        self.pool = pool
        self.k, self.v = pool.k[:, lo:hi], pool.v[:, lo:hi]
        self.valid = pool.valid[lo:hi]  # a view: the model's writes land in the pool
        self.max_len = pool.max_len

    @property
    def pos(self) -> int:
        return self.pool.pos

    @pos.setter
    def pos(self, value: int) -> None:
        self.pool.pos = value

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Batcher:
    """Runs requests from any thread on one model, `max_concurrency` at a time, decoded as one batch.

    Args:
        model: a `Transformer` (anything with its forward/cache protocol and `.config`).
        tokenizer: gives `stream_decoder()` and `vocab_size` (ids past it are never sampled).
        max_concurrency: KV-cache slots; further requests wait in FIFO order.
        max_len: cache columns per slot; default the context length + 25% so that a row near the end of the
            context does not force a compaction every step. A request needs prompt + max_new_tokens ≤ max_len.
        stop_token_ids: ids that end a request (EOS), besides each request's own `params.stop_token_ids`.
    """

    def __init__(self, model, tokenizer, *, max_concurrency: int = 8, max_len: int | None = None,
                 pad_id: int = 0, max_waiting: int = 1024) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be ≥ 1, got {max_concurrency}")
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = model.config
        self.context = int(self.cfg.max_position_embeddings)
        self.max_len = int(max_len or self.context + max(16, self.context // 4))
        self.slots = max_concurrency
        self.pad_id = pad_id
        self.max_waiting = max_waiting
        self.device = next(model.parameters()).device
        dtype = getattr(model, "compute_dtype", None) or next(model.parameters()).dtype
        self.dtype = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.float32
        self.vocab_limit = min(int(self.cfg.vocab_size), int(tokenizer.vocab_size))
        self._pool: _SlotPool | None = None  # allocated by the worker on first use
        self._rows: list[_Row] = []
        self._waiting: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # decode forwards
        self.finished = 0  # requests that ran to a stop or their length
        self.cancelled = 0  # requests dropped because their client left

    # ------------------------------------------------------------------ public, any thread
    def start(self) -> None:
        if self._thread is None:
            self._closed = False
            self._thread = threading.Thread(target=self._run, name="tianying-batcher", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, req: Request) -> Request:
        """Queue a request; raises ValueError if it can never fit or the queue is full (the caller's 4xx/503)."""
        n = len(req.prompt_ids)
        if n == 0:
            raise ValueError("the prompt has no tokens")
        if req.params.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be ≥ 1")
        if n + req.params.max_new_tokens > min(self.max_len, self.context):
            raise ValueError(f"prompt ({n}) + max_new_tokens ({req.params.max_new_tokens}) exceeds the "
                             f"context of {min(self.max_len, self.context)} tokens")
        with self._cv:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._waiting) >= self.max_waiting:
                raise OverflowError(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(req)
            self._cv.notify_all()
        return req

    def stats(self) -> dict:
        with self._cv:
            return {"active": len(self._rows), "waiting": len(self._waiting), "slots": self.slots,
                    "steps": self.steps, "finished": self.finished, "cancelled": self.cancelled,
                    "compactions": self._pool.compactions if self._pool else 0}

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._closed and not self._rows and not self._waiting:
                        self._cv.wait()
                    if self._closed:
                        break
                    admitted = self._take_admissible()
                try:
                    self._drop_cancelled()
                    if admitted:
                        self._prefill(admitted)
                    if self._rows:
                        self._decode()
                except Exception as e:  # a failed forward must not kill the server: fail the batch, go on
                    self._fail_all(f"{type(e).__name__}: {e}")
        for row in self._rows:
            self._emit(row.req, Event(finish_reason="cancelled", error="server shutting down"))
        with self._cv:
            for req in self._waiting:
                self._emit(req, Event(finish_reason="cancelled", error="server shutting down"))
            self._waiting.clear()
        self._rows.clear()

    def _emit(self, req: Request, ev: Event) -> None:
        try:
            req.emit(ev)
        except Exception:  # the receiving side is gone (e.g. its event loop closed)
            req.cancelled = True

    def _ensure_pool(self) -> _SlotPool:
        if self._pool is None:
            self._pool = _SlotPool(self.cfg, self.slots, self.max_len, self.dtype, self.device)
        return self._pool

    def _take_admissible(self) -> list[Request]:
        """FIFO requests for the free slots whose prefill fits in the cache (called with the lock held)."""
        while self._waiting and self._waiting[0].cancelled:
            self._waiting.popleft()
            self.cancelled += 1
        free = self.slots - len(self._rows)
        if free <= 0 or not self._waiting:
            return []
        pool = self._ensure_pool()
        if not self._rows:
            pool.compact(0)
        taken: list[Request] = []
        width = 0
        while self._waiting and len(taken) < free:
            req = self._waiting[0]
            if req.cancelled:
                self._waiting.popleft()
                self.cancelled += 1
                continue
            w = max(width, len(req.prompt_ids))
            if pool.pos + w > pool.max_len:
                pool.compact(len(self._rows))
                if pool.pos + w > pool.max_len:
                    break  # the head waits for rows to finish (later requests do not overtake it)
            taken.append(self._waiting.popleft())
            width = w
        return taken

    def _drop_cancelled(self) -> None:
        gone = [i for i, r in enumerate(self._rows) if r.req.cancelled]
        self.cancelled += len(gone)
        if gone:
            self._remove(gone)

    def _remove(self, indices: list[int]) -> None:
        """Free rows; the last active row moves into each hole so active rows stay a contiguous prefix."""
        pool = self._pool
        with self._cv:
            for i in sorted(indices, reverse=True):
                last = len(self._rows) - 1
                if i != last:
                    pool.move_row(last, i)
                    self._rows[i] = self._rows[last]
                self._rows.pop()
            if not self._rows:
                pool.compact(0)

    def _prefill(self, reqs: list[Request]) -> None:
        pool = self._pool
        lo = len(self._rows)
        hi = lo + len(reqs)
        ids, mask = left_pad([r.prompt_ids for r in reqs], self.pad_id)
        T = ids.shape[1]
        pool.valid[:lo, pool.pos:pool.pos + T] = False  # rows outside this forward get nothing there
        pool.valid[lo:hi] = False
        if mask is None:
            positions = torch.arange(T).expand(len(reqs), T)
        else:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            mask = mask.to(self.device)
        rows = [_Row(r, self.tokenizer, self.device) for r in reqs]
        with self._cv:
            self._rows.extend(rows)
        logits = self.model(ids.to(self.device), cache=pool.view(lo, hi), positions=positions.to(self.device),
                            pad_mask=mask, last_only=True)[:, -1]
        self._sample_and_emit(logits, lo, hi)

    def _decode(self) -> None:
        pool = self._pool
        n = len(self._rows)
        if pool.pos + 1 > pool.max_len:
            pool.compact(n)
        ids = torch.tensor([[r.pending] for r in self._rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[r.length] for r in self._rows], dtype=torch.long, device=self.device)
        logits = self.model(ids, cache=pool.view(0, n), positions=positions, last_only=True)[:, -1]
        for r in self._rows:
            r.length += 1
        self.steps += 1
        self._sample_and_emit(logits, 0, n)

    def _sample_and_emit(self, logits: torch.Tensor, lo: int, hi: int) -> None:
        """logits [hi-lo, V] for rows lo..hi-1 → one token each; emits text; frees finished rows."""
        logits = logits.float()
        if logits.shape[-1] > self.vocab_limit:  # never sample an id the tokenizer cannot decode
            logits[:, self.vocab_limit:] = float("-inf")
        rows = self._rows[lo:hi]
        tokens = [0] * len(rows)
        greedy = [i for i, r in enumerate(rows) if r.greedy]
        if greedy:
            picked = logits[greedy].argmax(-1).tolist()
            for i, t in zip(greedy, picked):
                tokens[i] = t
        for i, r in enumerate(rows):
            if r.greedy:
                continue
            p = r.req.params
            processed = process_logits(logits[i:i + 1], p, r.seen, r.generated)
            t = sample(processed, p, r.generator)
            tokens[i] = int(t[0])
            if r.seen is not None:
                r.seen = torch.cat([r.seen, t.view(1, 1).to(r.seen.device)], dim=1)
        done = []
        for i, (r, t) in enumerate(zip(rows, tokens)):
            if self._accept(r, t):
                done.append(lo + i)
        if done:
            self._remove(done)

    def _accept(self, r: _Row, t: int) -> bool:
        """Turns token `t` into text for the client; True when the request is finished."""
        p = r.req.params
        r.generated += 1
        r.pending = t
        if r.req.cancelled:
            self.cancelled += 1
            return True
        if t in p.stop_token_ids:
            return self._finish(r, r.matcher.feed(r.decoder.flush()) + r.matcher.flush(), "stop")
        text = r.matcher.feed(r.decoder.add(t))
        if r.matcher.stopped:
            return self._finish(r, text, "stop")
        if r.generated >= p.max_new_tokens:
            return self._finish(r, text + r.matcher.feed(r.decoder.flush()) + r.matcher.flush(), "length")
        if text:
            self._emit(r.req, Event(text, None, len(r.req.prompt_ids), r.generated))
        return False

    def _finish(self, r: _Row, text: str, reason: str) -> bool:
        self.finished += 1
        self._emit(r.req, Event(text, reason, len(r.req.prompt_ids), r.generated))
        return True

    def _fail_all(self, message: str) -> None:
        for r in self._rows:
            self._emit(r.req, Event(finish_reason="error", error=message, prompt_tokens=len(r.req.prompt_ids),
                                    completion_tokens=r.generated))
        with self._cv:
            self._rows.clear()
        self._pool = None  # rebuilt clean on the next request
