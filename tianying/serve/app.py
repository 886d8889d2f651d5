"""The HTTP server: OpenAI-compatible routes over one `LLM`, plus the web chat page.

    app = create_app(LLM.load("models/demo"), api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: GET / (chat page), GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions.
Responses and SSE chunks follow OpenAI's JSON shapes so the official client, LangChain and web UIs work
unchanged. Request bodies are parsed by hand (not FastAPI's body injection) so that every failure — a body
over the size limit, invalid JSON, a wrong type, an unknown field — becomes an OpenAI-style error body with
its own status instead of FastAPI's `{"detail": ...}`. Generation itself runs in `Batcher`'s worker thread;
the handlers only await its events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tianying.errors import TianyingError
from tianying.serve.batcher import Batcher, Event
from tianying.serve.batcher import Request as GenRequest

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt that fits a context, small enough to refuse abuse


# ---------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error that becomes `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    # drop union-member tags ("str", "list[TextPart]") so `param` names the field as the client sent it
    loc = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or (p.isidentifier() and p.islower()
                                                                          and p not in _TYPE_TAGS))
    if err["type"] == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request ({err['msg']}).", code="invalid_json")
    if err["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {loc}", param=loc,
                        code="unknown_parameter")
    if err["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{loc}'.", param=loc, code="missing_required_parameter")
    where = f"'{loc}'" if loc else "the request body"
    return APIError(400, f"Invalid value for {where}: {err['msg']}.", param=loc or None, code="invalid_value")


# ---------------------------------------------------------------------------------------------- request bodies
class _Strict(BaseModel):
    # strict: "1" is not a number and true is not an integer; forbid: a misspelt option is an error, not ignored
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by both generation routes (OpenAI's names and ranges; top_k/repetition_penalty extend)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted only at their neutral values, so clients that always send them keep working
    presence_penalty: float | None = Field(None, ge=0.0, le=0.0)
    frequency_penalty: float | None = Field(None, ge=0.0, le=0.0)
    logprobs: bool | None = Field(None, le=False)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool | None = Field(None, le=False)


# ---------------------------------------------------------------------------------------------- app
def create_app(llm, *, model_name: str | None = None, api_key: str | None = None, max_concurrency: int = 8,
               max_body_bytes: int = MAX_BODY_BYTES, max_waiting: int = 1024) -> FastAPI:
    """A FastAPI app serving `llm` (a `tianying.api.LLM`); the batcher thread runs while the app is up."""
    from tianying.templates import get_template

    name = model_name or (llm.path.name if llm.path else llm.config.name)
    template = get_template(llm.template)
    context = int(llm.config.max_position_embeddings)
    batcher = Batcher(llm.model, llm.tokenizer, max_concurrency=max_concurrency, pad_id=llm._pad_id(),
                      max_waiting=max_waiting)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            batcher.close()

    app = FastAPI(title="tianying", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.llm = llm

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return APIError(e.status_code, str(e.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(e).__name__}: {e}").response()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if not auth:
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    # ------------------------------------------------------------------ static routes
    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        page = resources.files("tianying.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, **batcher.stats()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [_model_card(name, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        check_key(request)
        if model_id != name:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return _model_card(name, created)

    # ------------------------------------------------------------------ generation routes
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_key(request)
        body = await _read_body(request, max_body_bytes)
        try:
            req = ChatCompletionRequest.model_validate_json(body)
        except ValidationError as e:
            raise _validation_error(e) from None
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:  # special-token strings in the messages are encoded as text: only the template writes control tokens
            from tianying.templates import encode_chat

            # a long prompt must not stall streams
            ids = await asyncio.to_thread(encode_chat, llm.tokenizer, messages, template)
        except TianyingError as e:
            raise APIError(400, str(e), param="messages", code="invalid_messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        params = _params(llm, req, ids, max_tokens, param, "messages", context, extra_stops=template.stop_strings)
        rid, kind = f"chatcmpl-{uuid.uuid4().hex}", "chat"
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream(request, batcher, [ids], params, rid, name, kind, usage)
        return JSONResponse(await _complete(request, batcher, [ids], params, rid, name, kind))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_key(request)
        body = await _read_body(request, max_body_bytes)
        try:
            req = CompletionRequest.model_validate_json(body)
        except ValidationError as e:
            raise _validation_error(e) from None
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "'prompt' is an empty list.", param="prompt", code="invalid_value")
        if len(prompts) > batcher.slots * 4:
            raise APIError(400, f"at most {batcher.slots * 4} prompts per request", param="prompt")
        all_ids = await asyncio.to_thread(lambda: [_encode(llm, p, "prompt") for p in prompts])
        params = _params(llm, req, max(all_ids, key=len), req.max_tokens, "max_tokens", "prompt", context)
        rid, kind = f"cmpl-{uuid.uuid4().hex}", "text"
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream(request, batcher, all_ids, params, rid, name, kind, usage)
        return JSONResponse(await _complete(request, batcher, all_ids, params, rid, name, kind))

    return app


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "tianying"}


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed `limit` (before reading it all when declared)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"Request body of {declared} bytes exceeds the limit of {limit} bytes.",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _encode(llm, text: str, param: str) -> list[int]:
    ids = llm.tokenizer.encode(text)
    if not ids:
        raise APIError(400, f"'{param}' is empty (it encodes to no tokens).", param=param, code="invalid_value")
    return ids


def _params(llm, req: _Sampling, ids: list[int], max_tokens: int | None, param: str, prompt_param: str,
            context: int, extra_stops: tuple[str, ...] = ()):
    """SamplingParams for a request, with OpenAI's context-length checks and messages."""
    n = len(ids)
    if n >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, your prompt is "
                            f"{n} tokens. Please reduce the length of the {prompt_param}.", param=prompt_param,
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = context - n
    elif max_tokens <= 0:
        raise APIError(400, f"Invalid '{param}': integer below minimum value. Expected a value >= 1, but got "
                            f"{max_tokens} instead.", param=param, code="integer_below_min_value")
    elif n + max_tokens > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion). "
                            f"Please reduce the prompt or '{param}'.", param=param,
                       code="context_length_exceeded")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 16 or any(not s for s in stops):
        raise APIError(400, "'stop' takes up to 16 non-empty strings.", param="stop", code="invalid_value")
    try:
        # OpenAI's defaults: temperature 1, top_p 1 (pass temperature 0 for greedy decoding)
        temperature = 1.0 if req.temperature is None else req.temperature
        return llm.sampling_params(max_new_tokens=max_tokens, temperature=temperature,
                                   top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                                   repetition_penalty=req.repetition_penalty or 1.0,
                                   stop=list(extra_stops) + stops)
    except TianyingError as e:
        raise APIError(400, str(e), code="invalid_value") from None


# ---------------------------------------------------------------------------------------------- running
def _submit(batcher: Batcher, all_ids: list[list[int]], params) -> tuple[asyncio.Queue, list[GenRequest]]:
    """Queue one generation per prompt; their events arrive on one asyncio queue as (index, Event)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    reqs = []
    try:
        for i, ids in enumerate(all_ids):
            def emit(ev: Event, i: int = i) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (i, ev))
            reqs.append(batcher.submit(GenRequest(ids, params, emit)))
    except OverflowError as e:
        _cancel(reqs)
        raise APIError(503, f"The server is overloaded ({e}); retry later.", code="overloaded") from None
    except ValueError as e:
        _cancel(reqs)
        raise APIError(400, str(e), code="context_length_exceeded") from None
    return queue, reqs


def _cancel(reqs: list[GenRequest]) -> None:
    for r in reqs:
        r.cancel()


async def _events(request: Request, queue: asyncio.Queue, count: int) -> AsyncIterator[tuple[int, Event]]:
    """Events until all `count` generations finished; stops early if the client goes away."""
    open_ = count
    while open_:
        try:
            i, ev = await asyncio.wait_for(queue.get(), timeout=1.0)
        except TimeoutError:
            if await request.is_disconnected():
                return
            continue
        if ev.finish_reason is not None:
            open_ -= 1
        yield i, ev


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _complete(request: Request, batcher: Batcher, all_ids, params, rid: str, model: str, kind: str) -> dict:
    queue, reqs = _submit(batcher, all_ids, params)
    texts = [""] * len(all_ids)
    finish: list[str | None] = [None] * len(all_ids)
    counts = [(len(ids), 0) for ids in all_ids]
    try:
        async for i, ev in _events(request, queue, len(all_ids)):
            if ev.error:
                raise APIError(500, f"generation failed: {ev.error}")
            texts[i] += ev.text
            counts[i] = (ev.prompt_tokens, ev.completion_tokens)
            finish[i] = ev.finish_reason or finish[i]
    finally:
        _cancel(reqs)  # no-op for finished requests; frees the slots of a client that left
    usage = _usage(sum(c[0] for c in counts), sum(c[1] for c in counts))
    created = int(time.time())
    if kind == "chat":
        choices = [{"index": 0, "message": {"role": "assistant", "content": texts[0], "refusal": None},
                    "logprobs": None, "finish_reason": finish[0]}]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": usage, "system_fingerprint": None}
    choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": f}
               for i, (t, f) in enumerate(zip(texts, finish))]
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage, "system_fingerprint": None}


def _stream(request: Request, batcher: Batcher, all_ids, params, rid: str, model: str, kind: str,
            include_usage: bool) -> _SSEResponse:
    """A streamed response of OpenAI chunks. Submitting happens here, before any byte is sent, so that a
    rejected request still gets a plain JSON error with its status."""
    queue, reqs = _submit(batcher, all_ids, params)

    async def chunks() -> AsyncIterator[dict]:
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        extra = {"usage": None} if include_usage else {}

        def chunk(i: int, text: str | None, finish: str | None, role: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"text": text or "", "index": i, "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None,
                    "choices": [choice], **extra}

        counts = [(len(ids), 0) for ids in all_ids]
        try:
            if kind == "chat":
                yield chunk(0, None, None, role=True)
            async for i, ev in _events(request, queue, len(all_ids)):
                if ev.error:
                    yield {"error": APIError(500, f"generation failed: {ev.error}").body()["error"]}
                    return
                counts[i] = (ev.prompt_tokens, ev.completion_tokens)
                if ev.text:
                    yield chunk(i, ev.text, None)
                if ev.finish_reason:
                    yield chunk(i, None, ev.finish_reason)
            if include_usage:
                yield {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None,
                       "choices": [], "usage": _usage(sum(c[0] for c in counts), sum(c[1] for c in counts))}
        finally:
            _cancel(reqs)

    return _SSEResponse(chunks(), reqs)


class _SSEResponse(StreamingResponse):
    """Server-sent events (`data: {json}` lines, then `data: [DONE]`) whose generations are cancelled however
    the response ends. Starlette may stop iterating when the client disconnects without closing the
    generator, so the cancel happens here, in `__call__`'s `finally`, not only in the generator's.
    """

    def __init__(self, gen: AsyncIterator[dict], reqs: list[GenRequest]) -> None:
        async def framed():
            async for item in gen:
                yield f"data: {json.dumps(item, ensure_ascii=False)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        super().__init__(framed(), media_type="text/event-stream; charset=utf-8",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._gen, self._reqs = gen, reqs

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _cancel(self._reqs)
            with contextlib.suppress(Exception):
                await self._gen.aclose()
