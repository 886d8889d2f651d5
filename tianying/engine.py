"""The inference engine: every generation path (LLM.generate/chat/stream, `tianying serve`, `tianying eval`)
runs here, on one scheduler and one KV cache.

    queue ──► scheduler ──► model step ──► sampler ──► detokenizer ──► events
    (FIFO,     (admit into   (one prefill    (per request:  (UTF-8-safe
     cancel)    free cache    chunk + one     penalties,     pieces, stop
                rows, reuse   decode step     bias, seed,    strings)
                cached        for every       logprobs)
                prefixes)     running row)

- **One cache.** A `KVCache` with `max_batch` rows, each with its own length; a request's choices each own a
  row. Rows are given out lowest-first, and a decode step runs rows [0, highest busy row] as one batch (idle
  rows ride along inert: they write a slot that nothing reads and their lengths do not move).
- **Chunked prefill.** Each step prefills at most `prefill_chunk` prompt tokens (of the oldest request still
  prefilling) and then decodes one token for every running row, so a long prompt never stalls streams.
- **Prefix cache.** Keys/values of full 16-token blocks of finished and prefilled sequences are kept (copies,
  LRU, bounded in bytes), keyed by the hash chain of their tokens. A new prompt that starts with cached blocks
  copies them into its row instead of recomputing them (the system prompt, earlier turns, few-shot prompts).
- **Isolation.** Sampling, NaN logits and per-request errors fail that request alone; a cancelled request
  (client gone) frees its rows at the next step.

The model is given positions and a cache view (`KVCache.view(lo, hi)`); it never sees this module.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from tianying.generate import GenerationError, SamplingParams, StopMatcher, process_logits, sample
from tianying.model import KVCache

BLOCK = 16  # tokens per prefix-cache block


@dataclass
class TokenLogprob:
    """A token and its log-probability under the model, with the `top` alternatives [(id, logprob)]."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """What the engine tells a request: new text of choice `index`, and at its end a finish reason."""

    index: int = 0
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per entry of `tokens` (when asked)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None  # with params.prompt_logprobs, on the first event
    error: str | None = None
    status: int = 500  # for errors: 400 when the request itself was at fault


@dataclass(eq=False)
class Request:
    """One generation: prompt ids, sampling parameters, and a callback that receives `Event`s.

    `emit` is called from the engine's thread; it must be cheap and thread-safe (e.g. `call_soon_threadsafe`).
    """

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None] | None = None
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    open: int = 0  # choices not finished yet

    def cancel(self) -> None:
        """Free the request's rows at the engine's next step (safe from any thread)."""
        self.cancelled = True


class _Seq:
    """One choice of a request: its cache row, tokens, sampler and detokenizer state."""

    def __init__(self, req: Request, index: int, row: int, engine: Engine) -> None:
        self.req, self.index, self.row = req, index, row
        self.tokens = list(req.prompt_ids)  # prompt + generated; the cache holds tokens[:length]
        self.prefilled = 0  # prompt tokens in the cache
        self.generated = 0
        self.cached = 0  # prompt tokens taken from the prefix cache
        self.others: list[_Seq] = []  # the request's other choices, which copy this row once the prompt is in
        self.prompt_lp: list[TokenLogprob] | None = None  # with params.prompt_logprobs
        p = req.params
        self.decoder = engine.tokenizer.stream_decoder() if engine.tokenizer is not None else None
        self.matcher = StopMatcher(p.stop)
        self.generator = None
        if p.seed is not None and not p.greedy:
            self.generator = torch.Generator(device=engine.device).manual_seed((int(p.seed) + index) % 2**64)
        self.counts = None  # generated-token counts for presence/frequency penalties
        if p.presence_penalty or p.frequency_penalty:
            self.counts = torch.zeros(engine.vocab, dtype=torch.float32, device=engine.device)
        self.matcher_g = engine.grammar_matcher(p.grammar) if p.grammar is not None else None
        self.bias = None
        if p.logit_bias:
            self.bias = torch.zeros(engine.vocab, dtype=torch.float32, device=engine.device)
            for t, b in p.logit_bias.items():
                if t >= engine.vocab:
                    raise GenerationError(f"logit_bias token {t} is outside the vocabulary of {engine.vocab}")
                self.bias[t] = b

    @property
    def running(self) -> bool:
        return self.prefilled == len(self.req.prompt_ids)


class PrefixCache:
    """Keys/values of 16-token blocks by the hash of (parent block, tokens), LRU within `max_bytes`.

    A chain is touched deepest-first, so eviction (oldest first) drops a chain's tail before its head and
    a cached block's parent is always cached too.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.blocks: collections.OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = collections.OrderedDict()
        self.bytes = 0
        self.hits = 0  # tokens served from the cache

    @staticmethod
    def keys(tokens: Sequence[int], n_blocks: int) -> list[bytes]:
        out, h = [], b""
        for i in range(n_blocks):
            h = hashlib.blake2b(h + repr(tuple(tokens[i * BLOCK:(i + 1) * BLOCK])).encode(), digest_size=16).digest()
            out.append(h)
        return out

    def lookup(self, tokens: Sequence[int], limit: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cached blocks that start `tokens`, covering at most `limit` tokens."""
        found = []
        keys = self.keys(tokens, limit // BLOCK)
        for k in keys:
            b = self.blocks.get(k)
            if b is None:
                break
            found.append(b)
        for k in reversed(keys[:len(found)]):
            self.blocks.move_to_end(k)
        return found

    def insert(self, tokens: Sequence[int], cache: KVCache, row: int) -> None:
        """Stores the full blocks of row `row` (which holds `tokens[:cache.lengths[row]]`)."""
        if self.max_bytes <= 0:
            return
        n = min(cache.lengths[row], len(tokens)) // BLOCK
        keys = self.keys(tokens, n)
        for i, k in enumerate(keys):
            if k in self.blocks:
                continue
            sl = slice(i * BLOCK, (i + 1) * BLOCK)
            kb, vb = cache.k[:, row, :, sl].clone(), cache.v[:, row, :, sl].clone()
            self.blocks[k] = (kb, vb)
            self.bytes += 2 * kb.numel() * kb.element_size()
        for k in reversed(keys):
            self.blocks.move_to_end(k)
        while self.bytes > self.max_bytes and self.blocks:
            _, (kb, vb) = self.blocks.popitem(last=False)
            self.bytes -= 2 * kb.numel() * kb.element_size()


class Engine:
    """Runs generation requests on one model: `submit` from any thread, then either `start()` a worker thread
    (the server) or drive it with `run(requests)` in the caller's thread (LLM.generate, eval).

    Args:
        model: a `tianying.model.Transformer`.
        tokenizer: gives `stream_decoder()` and `vocab_size`; None for id-only use (no text, no stop strings).
        max_batch: cache rows (sequences decoded together); further requests wait in FIFO order.
        max_len: positions per row (default the model's context length).
        prefill_chunk: prompt tokens per step (a longer prompt is prefilled over several steps).
        prefix_cache_bytes: memory for cached prefix blocks (0 disables prefix caching).
    """

    def __init__(self, model, tokenizer=None, *, max_batch: int = 8, max_len: int | None = None,
                 prefill_chunk: int = 512, prefix_cache_bytes: int = 256 << 20, max_waiting: int = 1024) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = model.config
        self.max_len = int(max_len or self.cfg.max_position_embeddings)
        self.max_batch = max_batch
        self.prefill_chunk = max(1, int(prefill_chunk))
        self.max_waiting = max_waiting
        p = next(model.parameters())
        self.device = p.device
        self.vocab = int(self.cfg.vocab_size)
        self.vocab_limit = min(self.vocab, int(tokenizer.vocab_size)) if tokenizer is not None else self.vocab
        # a window cache holds a ring, not a prefix: its blocks cannot be reused
        self.prefix = PrefixCache(0 if self.cfg.attention_window else prefix_cache_bytes)
        self._cache: KVCache | None = None
        self._lltok = None  # llguidance's view of the tokenizer, for constrained decoding
        self._bitmask = None
        self._rows: list[_Seq | None] = [None] * max_batch
        self._waiting: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._step_lock = threading.Lock()  # callers stepping from several threads take turns
        self._looping = False  # a serve_forever loop steps (requests wait for it instead of stepping)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # decode forwards
        self.finished = 0
        self.cancelled = 0

    # ------------------------------------------------------------------ public, any thread
    @property
    def cache(self) -> KVCache:
        if self._cache is None:
            self._cache = KVCache.for_model(self.model, self.max_batch, self.max_len)
        return self._cache

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises GenerationError for a request that can never run."""
        n = len(prompt_ids)
        if n == 0:
            raise GenerationError("the prompt has no tokens")
        if params.n > self.max_batch:
            raise GenerationError(f"n must be at most {self.max_batch} (the engine's cache rows), got {params.n}")
        if params.max_new_tokens == 0 and not params.prompt_logprobs:
            return
        limit = self.max_len if not self.cfg.attention_window else 2**62
        if n + params.max_new_tokens > limit:
            raise GenerationError(f"prompt ({n}) + max_new_tokens ({params.max_new_tokens}) exceeds the context "
                                  f"of {limit} tokens")
        bad = [t for t in prompt_ids if not 0 <= int(t) < self.vocab]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary of {self.vocab}")

    def submit(self, req: Request) -> Request:
        """Queue a request; raises GenerationError if it can never run, OverflowError if the queue is full."""
        self.check(req.prompt_ids, req.params)
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._waiting) >= self.max_waiting:
                raise OverflowError(f"{len(self._waiting)} requests are already waiting")
            req.open = req.params.n
            self._waiting.append(req)
            self._cv.notify_all()
        return req

    def stats(self) -> dict:
        with self._cv:
            return {"running": sum(s is not None for s in self._rows), "waiting": len(self._waiting),
                    "rows": self.max_batch, "steps": self.steps, "finished": self.finished,
                    "cancelled": self.cancelled, "cached_blocks": len(self.prefix.blocks),
                    "cached_tokens_served": self.prefix.hits}

    def start(self) -> None:
        """Run a worker thread that steps whenever there is work (the server's mode)."""
        if self._thread is None:
            self._closed = False
            self._thread = threading.Thread(target=self.serve_forever, name="tianying-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run(self, requests: Sequence[Request]) -> Iterator[tuple[Request, Event]]:
        """Submits `requests` and yields their events until all are finished, stepping in this thread (or
        waiting for the worker thread when one runs)."""
        box: collections.deque = collections.deque()
        ready = threading.Event()
        for r in requests:
            def emit(ev: Event, r: Request = r, user=r.emit) -> None:
                box.append((r, ev))
                ready.set()
                if user is not None:
                    user(ev)
            r.emit = emit
        try:
            for r in requests:
                self.submit(r)
        except BaseException:
            for r in requests:
                r.cancel()
            raise
        open_ = sum(r.params.n for r in requests)
        try:
            while open_:
                if not self._looping:
                    with self._step_lock, torch.inference_mode():
                        self.step()
                else:
                    ready.wait(0.5)
                    ready.clear()
                while box:
                    r, ev = box.popleft()
                    if ev.finish_reason is not None:
                        open_ -= 1
                    yield r, ev
        finally:
            for r in requests:
                r.cancel()
            if not self._looping and any(s is not None for s in self._rows):
                with self._step_lock, torch.inference_mode():
                    self.step()  # frees the rows of requests abandoned mid-way

    def generate_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """New token ids per prompt and choice (stop ids excluded), [prompt][choice] flattened when n = 1."""
        reqs = [Request(list(map(int, p)), params) for p in prompts]
        out = {r.id: [[] for _ in range(params.n)] for r in reqs}
        for r, ev in self.run(reqs):
            if ev.error:
                raise GenerationError(ev.error)
            out[r.id][ev.index] += ev.tokens
        res = [out[r.id] for r in reqs]
        return [c[0] for c in res] if params.n == 1 else res

    # ------------------------------------------------------------------ constrained decoding
    def grammar_matcher(self, grammar: tuple[str, str | None]):  # noqa: ANN201 - an llguidance.LLMatcher
        """A fresh matcher for one sequence (llguidance: token masks from JSON schemas, regexes, Lark)."""
        try:
            import llguidance
        except ImportError:
            raise GenerationError("constrained decoding needs llguidance (pip install llguidance)") from None
        if self.tokenizer is None:
            raise GenerationError("constrained decoding needs the model's tokenizer")
        if self._lltok is None:  # ~0.1 s for a 100k vocabulary: once per engine
            eos = [t for t in (self.tokenizer.eos_id,) if t is not None]
            self._lltok = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab,
                                                 eos_token=eos[0] if eos else None)
        kind, src = grammar
        M = llguidance.LLMatcher
        compact = {"whitespace_flexible": False}  # no runs of whitespace between JSON tokens
        if kind == "json_object":
            g = M.grammar_from_json_schema('{"type": "object"}', defaults=compact)
        elif kind == "json_schema":
            g = M.grammar_from_json_schema(src, defaults=compact)
        elif kind == "regex":
            g = M.grammar_from_regex(src)
        else:
            g = M.grammar_from_lark(src)
        failed, messages = M.validate_grammar_with_warnings(g, self._lltok)
        if failed:
            first = (messages or ["rejected"])[0].strip().splitlines()[0]
            raise GenerationError(f"invalid {kind.replace('_', ' ')}: {first}")
        return M(self._lltok, g)

    def _constrain(self, s: _Seq, row: torch.Tensor) -> torch.Tensor:
        """Logits of the tokens the grammar does not allow next become −inf (this row only)."""
        import llguidance.torch as lgt

        if self._bitmask is None:
            self._bitmask = lgt.allocate_token_bitmask(1, self._lltok.vocab_size)
        lgt.fill_next_token_bitmask(s.matcher_g, self._bitmask, 0)
        if s.matcher_g.is_error():
            raise GenerationError(f"constrained decoding failed: {s.matcher_g.get_error()}")
        row = row.clone()
        lgt.apply_token_bitmask_inplace(row, self._bitmask.to(row.device))
        return row

    # ------------------------------------------------------------------ worker
    def serve_forever(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Step whenever there is work, in the calling thread, until `close()` or `stop()` (checked twice a
        second). `tianying serve` runs this on the main thread and HTTP on another: libgomp throttles the
        spin-wait of its workers once two threads have OpenMP pools on a machine with few cores (measured here:
        the int8 decode step of a 135M model at 2 threads ran 2x slower in a second thread), and the model was
        loaded — its first parallel region run — on the main thread."""
        self._looping = True
        try:
            self._loop(stop)
        finally:
            self._looping = False

    def _loop(self, stop: Callable[[], bool] = lambda: False) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._closed and not self._waiting and not any(self._rows) and not stop():
                        self._cv.wait(0.5)
                    if self._closed or stop():
                        break
                with self._step_lock:
                    self.step()
        for s in self._rows:
            if s is not None:
                self._emit(s.req, Event(s.index, finish_reason="cancelled", error="server shutting down"))
        with self._cv:
            for req in self._waiting:
                for i in range(req.params.n):
                    self._emit(req, Event(i, finish_reason="cancelled", error="server shutting down"))
            self._waiting.clear()
        self._rows = [None] * self.max_batch

    def step(self) -> None:
        """One scheduler iteration: drop cancelled requests, admit waiting ones, prefill one chunk, decode one
        token for every running row."""
        for s in self._rows:
            if s is not None and s.req.cancelled:
                self.cancelled += 1
                self._free(s, store=True)
        self._admit()
        pre = [s for s in self._rows if s is not None and not s.running]
        if pre:
            s = min(pre, key=lambda s: (s.req.submitted, s.index))
            try:
                self._prefill(s)
            except Exception as e:  # noqa: BLE001 - one request's failure must not end the others
                self._fail(s.req, e)
        if any(s is not None and s.running for s in self._rows):
            self._decode()

    def _emit(self, req: Request, ev: Event) -> None:
        try:
            if req.emit is not None:
                req.emit(ev)
        except Exception:  # noqa: BLE001 - the receiving side is gone (e.g. its event loop closed)
            req.cancelled = True

    def _admit(self) -> None:
        with self._cv:
            while self._waiting:
                req = self._waiting[0]
                if req.cancelled:
                    self._waiting.popleft()
                    self.cancelled += 1
                    continue
                free = [i for i, s in enumerate(self._rows) if s is None]
                if len(free) < req.params.n:
                    return  # the head waits for rows (later requests do not overtake it)
                self._waiting.popleft()
                try:
                    seqs = [_Seq(req, i, row, self) for i, row in enumerate(free[:req.params.n])]
                except GenerationError as e:
                    self._fail(req, e, status=400)
                    continue
                # the first choice prefills; the others copy its row when the prompt is in
                head = seqs[0]
                self._rows[head.row] = head
                head.others = seqs[1:]
                for s in head.others:
                    self._rows[s.row] = s
                    s.prefilled = -1  # waiting for the head (not running, not prefilling)
                self._reuse_prefix(head)

    def _reuse_prefix(self, s: _Seq) -> None:
        cache = self.cache
        cache.reset(s.row)
        if s.req.params.prompt_logprobs or self.prefix.max_bytes <= 0:
            return  # scoring every prompt token needs every position's logits
        blocks = self.prefix.lookup(s.tokens, len(s.tokens) - 1)  # the last token is always computed
        for i, (kb, vb) in enumerate(blocks):
            sl = slice(i * BLOCK, (i + 1) * BLOCK)
            cache.k[:, s.row, :, sl] = kb
            cache.v[:, s.row, :, sl] = vb
        n = len(blocks) * BLOCK
        cache.written[s.row] = max(cache.written[s.row], n)
        cache.lengths[s.row] = n
        s.prefilled = s.cached = n
        self.prefix.hits += n

    def _free(self, s: _Seq, store: bool) -> None:
        if self._rows[s.row] is not s:
            return
        if store and s.prefilled > 0:
            self.prefix.insert(s.tokens, self.cache, s.row)
        self.cache.reset(s.row)
        with self._cv:
            self._rows[s.row] = None

    def _fail(self, req: Request, e: BaseException | str, status: int = 500) -> None:
        if isinstance(e, GenerationError):
            status = 400
        msg = e if isinstance(e, str) else f"{type(e).__name__}: {e}" if status == 500 else str(e)
        for s in list(self._rows):
            if s is not None and s.req is req:
                self._free(s, store=False)
        req.cancelled = True
        for i in range(req.open and req.params.n):
            self._emit(req, Event(i, finish_reason="error", error=msg, status=status,
                                  prompt_tokens=len(req.prompt_ids)))
        req.open = 0

    def _prefill(self, s: _Seq) -> None:
        cache = self.cache
        prompt = s.req.prompt_ids
        a = s.prefilled
        b = min(len(prompt), a + self.prefill_chunk)
        want_all = s.req.params.prompt_logprobs
        ids = torch.tensor([prompt[a:b]], dtype=torch.long, device=self.device)
        logits = self.model(ids, cache=cache.view(s.row, s.row + 1), last_only=not want_all)[0].float()
        s.prefilled = b
        if want_all:
            if a == 0:
                s.prompt_lp = [TokenLogprob(prompt[0], None)]
            lp = logits.log_softmax(-1)
            k = s.req.params.logprobs or 0
            for j in range(a + 1, b):  # logits at position j−1 predict prompt[j]
                s.prompt_lp.append(_token_logprob(lp[j - 1 - a], prompt[j], k))
        if b < len(prompt):
            return
        # the prompt is in: its blocks become reusable, the other choices copy this row
        if self.prefix.max_bytes > 0:
            self.prefix.insert(s.tokens, cache, s.row)
        for o in s.others:
            cache.copy_row(s.row, o.row)
            o.prefilled, o.cached = len(prompt), s.cached
        last = logits[-1:]
        for o in [s, *s.others]:
            if s.req.params.max_new_tokens == 0:
                self._finish(o, "", "length")
            else:
                self._sample_rows([o], last)

    def _decode(self) -> None:
        cache = self.cache
        run = [s for s in self._rows if s is not None and s.running]
        hi = max(s.row for s in run) + 1
        ids = torch.zeros((hi, 1), dtype=torch.long)
        for s in run:
            ids[s.row, 0] = s.tokens[-1]
        # idle or prefilling rows in the range ride along inert (see KVCache.view)
        view = cache.view(0, hi, active={s.row for s in run})
        try:
            logits = self.model(ids.to(self.device), cache=view, last_only=True)[:, -1].float()
        except Exception as e:  # noqa: BLE001 - cannot tell whose it is: the rows of this step fail
            for s in run:
                self._fail(s.req, e)
            return
        self.steps += 1
        self._sample_rows(run, logits[[s.row for s in run]])

    def _sample_rows(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """logits [len(seqs), V] → one token per sequence; emits text; frees finished rows."""
        if logits.shape[-1] > self.vocab_limit:  # never sample an id the tokenizer cannot decode
            logits[:, self.vocab_limit:] = float("-inf")
        greedy = [i for i, s in enumerate(seqs) if s.req.params.plain_greedy]
        picked = dict(zip(greedy, logits[greedy].argmax(-1).tolist())) if greedy else {}
        # a row with NaN or nothing finite fails its request (one check for the whole step)
        top = logits.amax(-1)  # (NaN propagates into the max; a finite max: no NaN and something finite)
        ok = torch.isfinite(top)
        if bool((top == float("inf")).any()):
            ok = torch.isfinite(logits).any(-1) & ~torch.isnan(logits).any(-1)
        valid = ok.tolist()
        for i, s in enumerate(seqs):
            if s.req.cancelled and s.req.open == 0:
                continue
            try:
                row = logits[i:i + 1]
                if not valid[i]:
                    raise GenerationError("the model produced NaN/non-finite logits for this request")
                t = picked.get(i)
                if t is None:
                    t = self._sample_one(s, row)
                lp = None
                if s.req.params.logprobs is not None:
                    lp = _token_logprob(row[0].log_softmax(-1), t, s.req.params.logprobs)
                self._accept(s, t, lp)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                self._fail(s.req, e, status=400 if isinstance(e, GenerationError) else 500)

    def _sample_one(self, s: _Seq, row: torch.Tensor) -> int:
        p = s.req.params
        if s.matcher_g is not None:
            row = self._constrain(s, row)
        if s.bias is not None:
            row = row + s.bias
        if s.counts is not None:
            row = row - p.frequency_penalty * s.counts - p.presence_penalty * (s.counts > 0)
        seen = None
        if p.repetition_penalty != 1.0:
            seen = torch.tensor([s.tokens], dtype=torch.long, device=row.device)
        processed = process_logits(row, p, seen, s.generated)
        if p.greedy:
            return int(processed.argmax(-1))
        if not bool(torch.isfinite(processed.softmax(-1)).all()):
            raise GenerationError("sampling has no valid distribution for this request (check temperature, "
                                  "repetition_penalty and the other penalties)")
        return int(sample(processed, p, s.generator)[0])

    def _accept(self, s: _Seq, t: int, lp: TokenLogprob | None) -> None:
        """Takes token `t` for `s`: text for the client, and the end of the choice when it stops."""
        p = s.req.params
        s.generated += 1
        grammar_done = False
        if s.matcher_g is not None:
            if not s.matcher_g.consume_token(t):
                raise GenerationError(f"constrained decoding failed: {s.matcher_g.get_error()}")
            grammar_done = s.matcher_g.is_stopped()
        if s.counts is not None:
            s.counts[t] += 1
        first = s.generated == 1
        extra = {}
        if first:
            extra = {"cached_tokens": s.cached}
            if p.prompt_logprobs:
                extra["prompt_logprobs"] = s.prompt_lp
        if t in p.stop_token_ids:
            tail = ""
            if s.decoder is not None:
                tail = s.matcher.feed(s.decoder.flush()) + s.matcher.flush()
            return self._finish(s, tail, "stop", **extra)
        s.tokens.append(t)  # its keys/values go in at the next decode step
        text = ""
        if s.decoder is not None:
            text = s.matcher.feed(s.decoder.add(t))
            if s.matcher.stopped:
                return self._finish(s, text, "stop", [t], [lp] if lp else [], **extra)
        if grammar_done:  # the output is a complete sentence of the grammar and nothing may follow
            if s.decoder is not None:
                text += s.matcher.feed(s.decoder.flush()) + s.matcher.flush()
            return self._finish(s, text, "stop", [t], [lp] if lp else [], **extra)
        if s.generated >= p.max_new_tokens:
            if s.decoder is not None:
                text += s.matcher.feed(s.decoder.flush()) + s.matcher.flush()
            return self._finish(s, text, "length", [t], [lp] if lp else [], **extra)
        self._emit(s.req, Event(s.index, text, [t], [lp] if lp else [], None, len(s.req.prompt_ids), s.generated,
                                **extra))

    def _finish(self, s: _Seq, text: str, reason: str, tokens: list[int] | None = None,
                lps: list | None = None, **extra) -> None:
        self.finished += 1
        self._free(s, store=True)
        s.req.open -= 1
        if s.req.params.max_new_tokens == 0 and s.req.params.prompt_logprobs:
            extra["prompt_logprobs"] = s.prompt_lp
            extra["cached_tokens"] = s.cached
        self._emit(s.req, Event(s.index, text, tokens or [], lps or [], reason, len(s.req.prompt_ids), s.generated,
                                **extra))


def _token_logprob(lp: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """lp [V] log-probabilities → the entry for `token` with the top k alternatives."""
    top = []
    if k:
        v, i = torch.topk(lp, k)
        top = [(int(a), float(b)) for a, b in zip(i.tolist(), v.tolist())]
    x = float(lp[token])
    return TokenLogprob(int(token), x if math.isfinite(x) else -9999.0, top)
