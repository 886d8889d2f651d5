"""The HTTP server: OpenAI-compatible routes over one `LLM`, plus the web chat page.

    app = create_app(LLM.load("models/demo"), api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: GET / (chat page), GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions.
Responses and SSE chunks follow OpenAI's JSON shapes so the official client, LangChain and web UIs work
unchanged. Request bodies are parsed by hand (not FastAPI's body injection) so that every failure — a body
over the size limit, invalid JSON, a wrong type, an unknown field — becomes an OpenAI-style error body with
its own status instead of FastAPI's `{"detail": ...}`. Generation runs on the LLM's `tianying.engine.Engine`
(its worker thread is started with the app); the handlers only submit requests and await their events.
Fields OpenAI clients commonly send that change nothing here are accepted and named in a `Warning` header;
fields whose meaning we cannot honour get a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tianying.engine import Engine, Event, TokenLogprob
from tianying.engine import Request as GenRequest
from tianying.errors import TianyingError

log = logging.getLogger("tianying.serve")

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt that fits a context, small enough to refuse abuse
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
BODY_TIMEOUT = 30.0  # seconds for a request body to arrive in full


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
# Sent by common clients (openai-python, LangChain, litellm, web UIs) and harmless to ignore here.
IGNORED_FIELDS = {"user", "store", "metadata", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                  "safety_identifier", "stream_options", "verbosity", "reasoning_effort", "modalities",
                  "prediction", "web_search_options", "functions", "function_call"}
# Known to OpenAI but not something we can do; a silent ignore would return something the client did not ask
UNSUPPORTED_FIELDS = {"audio": "audio output", "suffix": "insertion (suffix)", "best_of": "best_of > 1"}


class _Body(BaseModel):
    # strict: "1" is not a number and true is not an integer; extra fields are collected (`extras`) and
    # either ignored with a warning (IGNORED_FIELDS, unknown) or refused (UNSUPPORTED_FIELDS)
    model_config = ConfigDict(extra="allow", strict=True)

    def extras(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by both generation routes (OpenAI's names and ranges; top_k/repetition_penalty extend)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    best_of: int | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=20)


def _unknown_fields(req: _Body) -> list[str]:
    """Fields to name in the Warning header; raises for fields we cannot honour."""
    names = list(req.extras())
    for m in getattr(req, "messages", None) or ():
        names += [f"messages.{x}" for x in m.extras() if x not in ("refusal", "audio")]
    for f in names:
        if f in UNSUPPORTED_FIELDS:
            raise APIError(400, f"'{f}' is not supported by this server ({UNSUPPORTED_FIELDS[f]}).", param=f,
                           code="unsupported_parameter")
    if getattr(req, "best_of", None) not in (None, 1):
        raise APIError(400, "'best_of' > 1 is not supported by this server.", param="best_of",
                       code="unsupported_parameter")
    return [f for f in names if f not in IGNORED_FIELDS] + [f for f in names if f in IGNORED_FIELDS]


# ---------------------------------------------------------------------------------------------- app
def create_app(llm, *, model_name: str | None = None, api_key: str | None = None, max_concurrency: int = 8,
               max_body_bytes: int = MAX_BODY_BYTES, max_waiting: int = 1024,
               prefix_cache_bytes: int = 256 << 20, prefill_chunk: int = 512,
               allowed_hosts: Sequence[str] | None = None, allowed_origins: Sequence[str] = (),
               engine_thread: bool = True) -> FastAPI:
    """A FastAPI app serving `llm` (a `tianying.api.LLM`); the engine's worker thread runs while the app is up.

    `allowed_hosts`: Host header names accepted (None: any); a server bound to a loopback address passes
    LOOPBACK_HOSTS so that a web page cannot reach it through DNS rebinding. `allowed_origins`: origins that
    may read responses from a browser (CORS); none by default. `engine_thread=False`: the caller runs
    `app.state.engine.serve_forever()` itself (`tianying serve` does, on the main thread; see there).
    """
    from tianying.templates import get_template

    name = model_name or (llm.path.name if llm.path else llm.config.name)
    template = get_template(llm.template)
    context = int(llm.config.max_position_embeddings)
    engine = Engine(llm.model, llm.tokenizer, max_batch=max_concurrency, max_waiting=max_waiting,
                    prefix_cache_bytes=prefix_cache_bytes, prefill_chunk=prefill_chunk)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        prev, llm._engine = llm._engine, engine  # LLM.generate in this process shares the running engine
        if engine_thread:
            engine.start()
        try:
            yield
        finally:
            engine.close()
            llm._engine = prev

    app = FastAPI(title="tianying", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(_Guard, hosts=None if allowed_hosts is None else {h.lower() for h in allowed_hosts})
    app.state.engine = engine
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
        log.exception("internal error on %s", request.url.path)  # the detail stays in the server's log
        return APIError(500, "The server had an error while processing your request.").response()

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
        return {"status": "ok", "model": name, **engine.stats()}

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
        req = await _parse(request, ChatCompletionRequest, max_body_bytes)
        warn = _unknown_fields(req)
        from tianying import tools as tl

        try:
            fns = tl.functions(req.tools)
            mode, allowed = tl.chosen(req.tool_choice, fns)
            grammar = tl.response_grammar(req.response_format)
        except tl.ToolError as e:
            param = "tools" if str(e).startswith("tools") else "tool_choice" if "tool_choice" in str(e) \
                else "response_format"
            raise APIError(400, str(e), param=param, code="invalid_value") from None
        parallel = bool(req.parallel_tool_calls)
        if mode == "required":  # the reply is the call itself, decoded under its JSON schema
            grammar = ("json_schema", tl.call_schema(allowed, parallel))
        messages = []
        for i, m in enumerate(req.messages):
            if m.content is None and m.role != "assistant":
                raise APIError(400, f"'messages.{i}.content' may be null only in assistant messages.",
                               param=f"messages.{i}.content", code="invalid_value")
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": m.text(),
                             "tool_calls": m.tool_calls, "tool_call_id": m.tool_call_id, "name": m.name})
        messages = tl.prepare(messages, fns, mode)
        try:
            from tianying.templates import encode_chat

            ids = await asyncio.to_thread(encode_chat, llm.tokenizer, messages, template)  # must not stall streams
        except TianyingError as e:
            raise APIError(400, str(e), param="messages", code="invalid_messages") from None
        if not ids:
            raise APIError(400, "'messages' is empty (it encodes to no tokens).", param="messages",
                           code="invalid_value")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs",
                           code="invalid_value")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = _params(llm, req, len(ids), max_tokens, param, "messages", context,
                         extra_stops=template.stop_strings, logprobs=logprobs, grammar=grammar)
        job = _Job(engine, llm, [ids], params, f"chatcmpl-{uuid.uuid4().hex}", name, "chat", warn,
                   tools=(mode, allowed, mode == "required", parallel) if mode != "none" else None)
        if req.stream:
            return job.stream(request, bool(req.stream_options and req.stream_options.include_usage))
        return await job.complete(request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_key(request)
        req = await _parse(request, CompletionRequest, max_body_bytes)
        warn = _unknown_fields(req)
        p = req.prompt
        if isinstance(p, list) and not p:
            raise APIError(400, "'prompt' is an empty list.", param="prompt", code="invalid_value")
        if isinstance(p, str):
            texts = [p]
        elif isinstance(p[0], int):
            texts = [list(p)]
        else:
            texts = list(p)
        if len(texts) * (req.n or 1) > max(engine.max_batch * 4, 64):
            raise APIError(400, f"at most {max(engine.max_batch * 4, 64)} completions per request",
                           param="prompt")
        if any(isinstance(t, list) and not t for t in texts):
            raise APIError(400, "a token-id prompt is empty.", param="prompt", code="invalid_value")
        all_ids = await asyncio.to_thread(lambda: [t if isinstance(t, list) else _encode(llm, t, "prompt")
                                                   for t in texts])
        for ids in all_ids:
            bad = [t for t in ids if not 0 <= t < llm.config.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} in 'prompt' is outside the vocabulary of "
                                    f"{llm.config.vocab_size}.", param="prompt", code="invalid_value")
        echo = bool(req.echo)
        if req.max_tokens == 0 and not echo:
            raise APIError(400, "'max_tokens': 0 generates nothing; it is meant with 'echo': true (scoring).",
                           param="max_tokens", code="invalid_value")
        params = _params(llm, req, max(map(len, all_ids)), req.max_tokens, "max_tokens", "prompt", context,
                         logprobs=req.logprobs, echo=echo and req.logprobs is not None, allow_zero=echo)
        job = _Job(engine, llm, all_ids, params, f"cmpl-{uuid.uuid4().hex}", name, "text", warn, echo=echo,
                   prompt_texts=[t if isinstance(t, str) else None for t in texts])
        if req.stream:
            return job.stream(request, bool(req.stream_options and req.stream_options.include_usage))
        return await job.complete(request)

    return app


class _Guard:
    """Refuses, before any route runs: a Host not in `hosts` (421; DNS rebinding) and a POST whose body is not
    declared JSON (415; a cross-site form or text/plain fetch sends no preflight). Plain ASGI, not
    BaseHTTPMiddleware, so that handlers still see a client's disconnect."""

    def __init__(self, app, hosts: set[str] | None) -> None:  # noqa: ANN001
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            err = None
            host = headers.get("host", "").lower()
            name = host[:host.find("]") + 1] if host.startswith("[") else host.rsplit(":", 1)[0]
            if self.hosts is not None and name not in self.hosts:
                err = APIError(421, f"Host {host!r} is not served here (allowed: {', '.join(sorted(self.hosts))}).",
                               code="misdirected_request")
            elif scope["method"] == "POST":
                ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
                if ctype != "application/json":
                    err = APIError(415, "Send the request body as JSON with 'Content-Type: application/json'.",
                                   code="unsupported_media_type")
            if err is not None:
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "tianying"}


async def _parse(request: Request, model: type[_Body], limit: int) -> _Body:
    body = await _read_body(request, limit)
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise _validation_error(e) from None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed `limit` (before reading it all when declared)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"Request body of {declared} bytes exceeds the limit of {limit} bytes.",
                       code="request_too_large")
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    deadline = time.monotonic() + BODY_TIMEOUT
    while True:  # a body that trickles in (slowloris on the body) gets 408 instead of holding a connection
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(deadline - time.monotonic(), 0.001))
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise APIError(408, f"The request body did not arrive within {BODY_TIMEOUT:.0f} s.",
                           code="request_timeout") from None
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


def _params(llm, req: _Sampling, n: int, max_tokens: int | None, param: str, prompt_param: str, context: int,
            extra_stops: tuple[str, ...] = (), logprobs: int | None = None, echo: bool = False,
            allow_zero: bool = False, grammar: tuple | None = None):
    """SamplingParams for a request, with OpenAI's context-length checks and messages."""
    if n >= context and not (allow_zero and max_tokens == 0):
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, your prompt is "
                            f"{n} tokens. Please reduce the length of the {prompt_param}.", param=prompt_param,
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = context - n
    elif max_tokens < 0 or (max_tokens == 0 and not allow_zero):
        least = 0 if allow_zero else 1
        raise APIError(400, f"Invalid '{param}': integer below minimum value. Expected a value >= {least}, but got "
                            f"{max_tokens} instead.", param=param, code="integer_below_min_value")
    elif n + max_tokens > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion). "
                            f"Please reduce the prompt or '{param}'.", param=param,
                       code="context_length_exceeded")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 16 or any(not s for s in stops):
        raise APIError(400, "'stop' takes up to 16 non-empty strings.", param="stop", code="invalid_value")
    bias = {}
    for k, v in (req.logit_bias or {}).items():
        if not k.isdigit() or int(k) >= llm.config.vocab_size:
            raise APIError(400, f"Invalid key {k!r} in 'logit_bias': expected a token id below "
                                f"{llm.config.vocab_size}.", param="logit_bias", code="invalid_value")
        bias[int(k)] = float(v)
    try:
        # OpenAI's defaults: temperature 1, top_p 1 (pass temperature 0 for greedy decoding)
        temperature = 1.0 if req.temperature is None else req.temperature
        return llm.sampling_params(max_new_tokens=max_tokens, temperature=temperature,
                                   top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                                   repetition_penalty=req.repetition_penalty or 1.0,
                                   stop=list(extra_stops) + stops, presence_penalty=req.presence_penalty or 0.0,
                                   frequency_penalty=req.frequency_penalty or 0.0, logit_bias=bias,
                                   logprobs=logprobs, prompt_logprobs=echo, n=req.n or 1, grammar=grammar)
    except TianyingError as e:  # SamplingParams' messages start with the field they are about
        field = str(e).split(" ", 1)[0]
        raise APIError(400, str(e), param=field if field in type(req).model_fields else None,
                       code="invalid_value") from None


# ---------------------------------------------------------------------------------------------- running
def _usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class _Job:
    """One HTTP request's generations (one per prompt and choice) on the engine, and their OpenAI shapes."""

    def __init__(self, engine: Engine, llm, all_ids: list[list[int]], params, rid: str, model: str, kind: str,
                 warn: list[str], echo: bool = False, prompt_texts: list[str | None] | None = None,
                 tools: tuple | None = None) -> None:
        self.engine, self.llm, self.all_ids, self.params = engine, llm, all_ids, params
        self.tools = tools  # (mode, functions, constrained, parallel) when the reply may call tools
        self.rid, self.model, self.kind, self.warn, self.echo = rid, model, kind, warn, echo
        self.prompt_texts = prompt_texts or [None] * len(all_ids)
        self.n = params.n
        self.created = int(time.time())
        self._tok_cache: dict[int, str] = {}
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reqs: list[GenRequest] = []
        loop = asyncio.get_running_loop()
        try:
            for i, ids in enumerate(all_ids):
                def emit(ev: Event, i: int = i) -> None:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))
                self.reqs.append(engine.submit(GenRequest(ids, params, emit)))
        except OverflowError as e:
            self.cancel()
            raise APIError(503, f"The server is overloaded ({e}); retry later.", code="overloaded") from None
        except TianyingError as e:
            self.cancel()
            field = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), param=field if field in ("n", "prompt") else None,
                           code="invalid_value") from None

    def cancel(self) -> None:
        for r in self.reqs:
            r.cancel()

    def headers(self) -> dict:
        return {"Warning": f'299 - "ignored fields: {", ".join(self.warn)}"'} if self.warn else {}

    async def events(self, request: Request) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice finished; stops (and cancels) once the client is gone."""
        open_ = len(self.all_ids) * self.n
        checked = time.monotonic()
        while open_:
            try:
                i, ev = await asyncio.wait_for(self.queue.get(), timeout=0.25)
            except TimeoutError:
                i = ev = None
            if time.monotonic() - checked > 0.25 or ev is None:  # also while events keep coming
                checked = time.monotonic()
                if await request.is_disconnected():
                    self.cancel()
                    return
            if ev is None:
                continue
            if ev.finish_reason is not None:
                open_ -= 1
            yield i * self.n + ev.index, ev

    @staticmethod
    def error(ev: Event) -> APIError:
        if ev.status < 500:
            return APIError(ev.status, ev.error or "invalid request", code="invalid_value")
        log.error("generation failed: %s", ev.error)
        return APIError(500, "The server had an error while generating; the request was not completed.")

    # ------------------------------------------------------------------ logprobs in OpenAI's shapes
    def tok(self, t: int) -> str:
        s = self._tok_cache.get(t)
        if s is None:
            b = self.llm.tokenizer.token_bytes(t)
            try:
                s = b.decode("utf-8")
            except UnicodeDecodeError:  # part of a character: OpenAI's "bytes:" form
                s = "bytes:" + "".join(f"\\x{x:02x}" for x in b)
            self._tok_cache[t] = s
        return s

    def chat_logprobs(self, lps: list[TokenLogprob]) -> dict:
        def entry(t: int, lp: float) -> dict:
            return {"token": self.tok(t), "logprob": lp, "bytes": list(self.llm.tokenizer.token_bytes(t))}
        return {"content": [{**entry(x.token, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]}
                            for x in lps], "refusal": None}

    def text_logprobs(self, lps: list[TokenLogprob], start: int) -> dict:
        """Legacy completions shape; `start` is the text offset of the first token."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        dec = self.llm.tokenizer.stream_decoder()
        off = start
        for x in lps:
            out["tokens"].append(self.tok(x.token))
            out["token_logprobs"].append(x.logprob)
            out["top_logprobs"].append({self.tok(t): v for t, v in x.top} if x.logprob is not None else None)
            out["text_offset"].append(off)
            off += len(dec.add(x.token))
        return out

    # ------------------------------------------------------------------ responses
    def message(self, text: str, finish: str | None) -> tuple[dict, str | None]:
        """The assistant message (content or tool calls) of a finished reply, and its finish reason."""
        msg = {"role": "assistant", "content": text, "refusal": None}
        if self.tools is None:
            return msg, finish
        from tianying import tools as tl

        _, fns, constrained, parallel = self.tools
        try:
            content, calls = tl.parse_reply(text, fns, constrained, parallel)
        except tl.ToolError:  # a constrained call cut off by max_tokens: the text as it is
            return msg, finish
        if not calls:
            return msg, finish
        msg.update(content=content, tool_calls=[c.openai() for c in calls])
        return msg, "tool_calls"

    def _prompt_text(self, i: int) -> str:
        t = self.prompt_texts[i]
        return t if t is not None else self.llm.tokenizer.decode(self.all_ids[i])

    async def complete(self, request: Request) -> JSONResponse:
        count = len(self.all_ids) * self.n
        texts, finish = [""] * count, [None] * count
        lps: list[list[TokenLogprob]] = [[] for _ in range(count)]
        plps: list[list[TokenLogprob] | None] = [None] * count
        done = [0] * count
        cached = [0] * len(self.all_ids)
        try:
            async for c, ev in self.events(request):
                if ev.error:
                    raise self.error(ev)
                texts[c] += ev.text
                lps[c] += ev.logprobs
                done[c] = ev.completion_tokens
                finish[c] = ev.finish_reason or finish[c]
                if ev.prompt_logprobs is not None:
                    plps[c] = ev.prompt_logprobs
                if ev.finish_reason or ev.completion_tokens == 1:
                    cached[c // self.n] = max(cached[c // self.n], ev.cached_tokens)
        finally:
            self.cancel()  # no-op for finished requests; frees the rows of a client that left
        usage = _usage(sum(map(len, self.all_ids)), sum(done), sum(cached))
        want = self.params.logprobs is not None
        if self.kind == "chat":
            choices = []
            for c in range(count):
                message, reason = self.message(texts[c], finish[c])
                choices.append({"index": c, "message": message,
                                "logprobs": self.chat_logprobs(lps[c]) if want else None, "finish_reason": reason})
            body = {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model,
                    "choices": choices, "usage": usage, "system_fingerprint": None}
        else:
            choices = []
            for c in range(count):
                prefix = self._prompt_text(c // self.n) if self.echo else ""
                lp = None
                if want:
                    entries = (plps[c] or []) + lps[c] if self.echo else lps[c]
                    lp = self.text_logprobs(entries, 0 if self.echo else 0)
                choices.append({"text": prefix + texts[c], "index": c, "logprobs": lp, "finish_reason": finish[c]})
            body = {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                    "choices": choices, "usage": usage, "system_fingerprint": None}
        return JSONResponse(body, headers=self.headers())

    def stream(self, request: Request, include_usage: bool) -> _SSEResponse:
        """A streamed response of OpenAI chunks. Submission already happened (in __init__), before any byte
        is sent, so a rejected request still gets a plain JSON error with its status."""
        kind, want = self.kind, self.params.logprobs is not None
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        extra = {"usage": None} if include_usage else {}

        def chunk(c: int, text: str | None, finish: str | None, role: bool = False, lp=None) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": c, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"text": text or "", "index": c, "logprobs": lp, "finish_reason": finish}
            return {"id": self.rid, "object": obj, "created": self.created, "model": self.model,
                    "system_fingerprint": None, "choices": [choice], **extra}

        async def chunks() -> AsyncIterator[dict]:
            count = len(self.all_ids) * self.n
            done, cached = [0] * count, [0] * len(self.all_ids)
            try:
                if kind == "chat":
                    for c in range(count):
                        yield chunk(c, None, None, role=True)
                elif self.echo:
                    for c in range(count):
                        yield chunk(c, self._prompt_text(c // self.n), None)
                held = [""] * count  # with tools, a reply is only known to be text or calls once complete
                async for c, ev in self.events(request):
                    if ev.error:
                        yield {"error": self.error(ev).body()["error"]}
                        return
                    if self.tools is not None:
                        held[c] += ev.text
                        done[c] = ev.completion_tokens
                        if ev.finish_reason:
                            msg, reason = self.message(held[c], ev.finish_reason)
                            if msg.get("tool_calls"):
                                ch = chunk(c, None, None)
                                ch["choices"][0]["delta"] = {"tool_calls": [
                                    {"index": i, **tc} for i, tc in enumerate(msg["tool_calls"])]}
                                yield ch
                            if msg.get("content"):
                                yield chunk(c, msg["content"], None)
                            yield chunk(c, None, reason)
                        continue
                    done[c] = ev.completion_tokens
                    cached[c // self.n] = max(cached[c // self.n], ev.cached_tokens)
                    lp = None
                    if want and ev.logprobs:
                        lp = self.chat_logprobs(ev.logprobs) if kind == "chat" else self.text_logprobs(ev.logprobs, 0)
                    if ev.text or lp:
                        yield chunk(c, ev.text, None, lp=lp)
                    if ev.finish_reason:
                        yield chunk(c, None, ev.finish_reason)
                if include_usage:
                    yield {"id": self.rid, "object": obj, "created": self.created, "model": self.model,
                           "system_fingerprint": None, "choices": [],
                           "usage": _usage(sum(map(len, self.all_ids)), sum(done), sum(cached))}
            finally:
                self.cancel()

        return _SSEResponse(chunks(), self.reqs, self.headers())


class _SSEResponse(StreamingResponse):
    """Server-sent events (`data: {json}` lines, then `data: [DONE]`) whose generations are cancelled however
    the response ends. Starlette may stop iterating when the client disconnects without closing the
    generator, so the cancel happens here, in `__call__`'s `finally`, not only in the generator's.
    """

    def __init__(self, gen: AsyncIterator[dict], reqs: list[GenRequest], headers: dict | None = None) -> None:
        async def framed():
            async for item in gen:
                yield f"data: {json.dumps(item, ensure_ascii=False)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        super().__init__(framed(), media_type="text/event-stream; charset=utf-8",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._gen, self._reqs = gen, reqs

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for r in self._reqs:
                r.cancel()
            with contextlib.suppress(Exception):
                await self._gen.aclose()
