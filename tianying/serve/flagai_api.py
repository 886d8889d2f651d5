"""FlagAI's Aquila server routes (`tianying serve --flagai-api`): `POST /func` and `POST /stream_func`.

    app = create_app(llm); add_flagai_routes(app, llm)

Clients of FlagAI's `examples/Aquila/Aquila-server/aquila_server.py` keep working: they post
`requests.post(url, json=json.dumps(raw))`, a JSON *string* that holds the JSON object; a plain JSON object is
taken too. Fields (FlagAI's defaults per route): prompt, top_p, max_new_tokens, top_k_per_token, temperature,
history ([[role, text], ...], role "ASSISTANT" or the user's), sft (/func only), seed. Unknown fields are
ignored, as FlagAI did.

- `/func` → `{"completions": [{"text", "tokens", "logprobs", "top_logprobs_dicts", "model_in"}],
  "input_length", "model_info"}`. As in FlagAI: the prompt is the history and the prompt in the aquila-chat
  template plus a trailing space (`sft: false`: the raw prompt after [CLS], runs of newlines collapsed);
  sampling is v1's (temperature → top-k → top-p; temperature 0 = greedy); the text is cut at `###`, `[UNK]`,
  `</s>` with one leading space dropped; `tokens` are vocabulary strings; `logprobs` holds each token's
  *probability* (FlagAI's values, despite the name), here under the model before temperature and top-k;
  `top_logprobs_dicts` is `[{token: probability}]`; `input_length` is the prompt's length in characters.
- `/stream_func` → `text/plain`, the text in pieces of at least 10 characters, ending where a token brings
  `###` or `</`, at max_new_tokens, or after 40 s. Unlike FlagAI, the last piece is sent when generation
  ends at max_new_tokens (FlagAI dropped a final piece shorter than 10 characters).

Bad input gets a 400 with `{"error": {"message", ...}}` (the server's error shape), never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tianying.compat.flagai import FLAGAI_STOPS, drop_leading_space, prompt_ids
from tianying.engine import Event
from tianying.engine import Request as GenRequest
from tianying.errors import TianyingError
from tianying.serve.app import MAX_BODY_BYTES, APIError, _read_body

log = logging.getLogger("tianying.serve.flagai")

STREAM_SECONDS = 40.0  # FlagAI's wall-clock cap on /stream_func
STREAM_PIECE = 10  # characters FlagAI gathered before sending a piece
STREAM_STOPS = ("###", "</")
# FlagAI's defaults, per route
FUNC_DEFAULTS = {"top_p": 0.95, "max_new_tokens": 256, "top_k_per_token": 1000, "temperature": 0.9,
                 "sft": False, "seed": 1234}
STREAM_DEFAULTS = {"top_p": 0.9, "max_new_tokens": 256, "top_k_per_token": 20, "temperature": 0.9, "seed": 1234}


def add_flagai_routes(app: FastAPI, llm, *, api_key: str | None = None, model_name: str | None = None,
                      max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """Adds `/func` and `/stream_func` to `app` (from `tianying.serve.app.create_app(llm)`); they run on the
    app's engine. With `api_key`, they want 'Authorization: Bearer KEY' like the /v1 routes."""
    from tianying.templates import get_template

    template = get_template("aquila-chat")  # FlagAI's v1 server: AquilaChat-7B's conversation
    info = model_name or (llm.path.name if llm.path else llm.config.name)

    def engine(request: Request):  # noqa: ANN202
        return getattr(request.app.state, "engine", None) or llm.engine

    async def parse(request: Request, defaults: dict) -> dict:
        if api_key is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                raise APIError(401, "This server wants 'Authorization: Bearer KEY'.", code="invalid_api_key")
        return _fields(await _read_body(request, max_body_bytes), defaults)

    def build(cfg: dict, sft: bool) -> tuple[list[int], object]:
        context = int(llm.config.max_position_embeddings)
        n = cfg["max_new_tokens"]
        if n >= context:
            raise APIError(400, f"'max_new_tokens' ({n}) must be below the context of {context} tokens.",
                           param="max_new_tokens", code="invalid_value")
        try:
            if sft:
                ids = prompt_ids(llm.tokenizer, cfg["prompt"], cfg["history"], template, context - n)
            else:
                ids = llm.tokenizer.encode(re.sub("\n+", "\n", cfg["prompt"]), bos=True)
            return ids, llm.sampling_params(max_new_tokens=n, temperature=cfg["temperature"],
                                            top_k=cfg["top_k_per_token"] or None, top_p=cfg["top_p"],
                                            seed=cfg["seed"], logprobs=0)
        except TianyingError as e:
            raise APIError(400, str(e), code="invalid_value") from None

    @app.post("/func")
    async def func(request: Request) -> JSONResponse:
        cfg = await parse(request, FUNC_DEFAULTS)
        ids, params = await asyncio.to_thread(build, cfg, bool(cfg["sft"]))
        params.stop = FLAGAI_STOPS
        text, tokens, lps = "", [], []
        async for ev in _events(engine(request), ids, params, request):
            text, tokens, lps = text + ev.text, tokens + ev.tokens, lps + ev.logprobs
        out = drop_leading_space(text)
        tok = llm.tokenizer
        n = _tokens_of(tok, tokens, len(text))
        skip = int(len(out) < len(text) and n > 0 and tok.decode(tokens[:1]) == " ")  # the space FlagAI drops
        names = [_token_name(tok, t) for t in tokens[skip:n]]
        probs = [math.exp(x.logprob) if x.logprob is not None else 0.0 for x in lps[skip:n]]
        return JSONResponse({"completions": [{"text": out, "tokens": names, "logprobs": probs,
                                              "top_logprobs_dicts": [{k: v} for k, v in zip(names, probs)],
                                              "model_in": tok.decode(ids)}],
                             "input_length": len(cfg["prompt"]), "model_info": info})

    @app.post("/stream_func")
    async def stream_func(request: Request) -> StreamingResponse:
        cfg = await parse(request, STREAM_DEFAULTS)
        ids, params = await asyncio.to_thread(build, cfg, True)
        params.stop = STREAM_STOPS
        params.logprobs = None
        events = _events(engine(request), ids, params, request)
        first = await anext(events, None)  # submission errors still get a JSON error with their status

        async def pieces() -> AsyncIterator[bytes]:
            buf, deadline = "", time.monotonic() + STREAM_SECONDS
            ev = first
            try:
                while ev is not None:
                    buf += ev.text
                    if len(buf) >= STREAM_PIECE or ev.finish_reason is not None:
                        if buf:
                            yield buf.encode()
                        buf = ""
                    if time.monotonic() > deadline:
                        return
                    ev = await anext(events, None)
            except APIError as e:  # mid-stream: text/plain has no error channel; the stream just ends
                log.warning("/stream_func ended early: %s", e.message)
            finally:
                await events.aclose()

        return StreamingResponse(pieces(), media_type="text/plain; charset=utf-8")


async def _events(engine, ids: list[int], params, request: Request) -> AsyncIterator[Event]:
    """Events of one generation on the (running) engine; cancels it when the client goes away."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    try:
        req = engine.submit(GenRequest(list(ids), params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)))
    except OverflowError as e:
        raise APIError(503, f"The server is overloaded ({e}); retry later.", code="overloaded") from None
    except TianyingError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    checked = time.monotonic()
    try:
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=0.25)
            except TimeoutError:
                ev = None
            if ev is None or time.monotonic() - checked > 0.25:  # also while events keep coming
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if ev is None:
                continue
            if ev.error:
                if ev.status < 500:
                    raise APIError(ev.status, ev.error, code="invalid_value")
                log.error("generation failed: %s", ev.error)
                raise APIError(500, "The server had an error while generating; the request was not completed.")
            yield ev
            if ev.finish_reason is not None:
                return
    finally:
        req.cancel()


def _tokens_of(tok, tokens: list[int], length: int) -> int:
    """How many of `tokens` make up the first `length` characters of their decoded text (a token that
    completed a stop string and brought nothing before it is not counted)."""
    dec, done = tok.stream_decoder(), 0
    for i, t in enumerate(tokens):
        if done >= length:
            return i
        done += len(dec.add(t))
    return len(tokens)


def _token_name(tok, t: int) -> str:
    """FlagAI's `tokens`: the vocabulary string of each id (`[CLS]` for the BOS)."""
    name = tok.id_to_token(t)
    return name if name is not None else "[unkonwn_token]"


def _fields(body: bytes, defaults: dict) -> dict:
    """FlagAI's request: a JSON string holding a JSON object (or the object itself), checked field by field."""
    try:
        cfg = json.loads(body)
        if isinstance(cfg, str):
            cfg = json.loads(cfg)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"The body is not JSON, nor a JSON string holding JSON ({e}).",
                       code="invalid_json") from None
    if not isinstance(cfg, dict):
        raise APIError(400, f"The body must be a JSON object (or a JSON string of one), got {type(cfg).__name__}.",
                       code="invalid_value")
    out = {**defaults, **{k: v for k, v in cfg.items() if v is not None}}
    prompt = out.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "'prompt' must be a non-empty string.", param="prompt", code="invalid_value")

    def number(name: str, lo: float, hi: float, integer: bool = False, lo_open: bool = False):  # noqa: ANN202
        v = out[name]
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if not ok or isinstance(v, bool) or not (lo < v if lo_open else lo <= v) or v > hi:
            kind = "an integer" if integer else "a number"
            raise APIError(400, f"'{name}' must be {kind} in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}.",
                           param=name, code="invalid_value")
        return v

    number("top_p", 0, 1, lo_open=True)
    number("temperature", 0, 100)
    number("max_new_tokens", 1, 1 << 20, integer=True)
    number("top_k_per_token", 0, 1 << 30, integer=True)
    number("seed", -(2**63), 2**64 - 1, integer=True)
    if "sft" in out and not isinstance(out["sft"], bool):
        raise APIError(400, f"'sft' must be true or false, got {out['sft']!r}.", param="sft", code="invalid_value")
    history = out.get("history") or []
    if not isinstance(history, list):
        raise APIError(400, "'history' must be a list of [role, text] pairs.", param="history",
                       code="invalid_value")
    out["history"] = list(history)  # FlagAI consumed the list it got; we only read it
    return out
