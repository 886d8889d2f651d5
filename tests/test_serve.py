"""The HTTP server on a tiny saved checkpoint: the official openai client, streaming, concurrency, bad input,
API keys, disconnects; and the engine's scheduler against single-request generation."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fastapi  # noqa: F401 - dev dependencies: a missing one must fail, not skip the serving tests
import httpx
import openai
import pytest
import torch
from helpers import running, tiny_chat_checkpoint  # noqa: E402, I001

from tianying.engine import Engine, Request
from tianying.model import build_model
from tianying.serve.app import create_app

FIXTURE_TOKENIZER = Path(__file__).parent / "data" / "tokenizer"
KEY = "sk-test-key"
CONTEXT = 256
HELLO = [{"role": "user", "content": "你好，介绍一下北京。"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-chat", context=CONTEXT)


@pytest.fixture(scope="module")
def llm(ckpt):
    from tianying.api import LLM

    return LLM.load(ckpt)


@pytest.fixture(scope="module")
def server(llm):
    app = create_app(llm, api_key=KEY, max_concurrency=8, max_body_bytes=64 * 1024)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def auth():
    return {"Authorization": f"Bearer {KEY}"}


def health(url):
    return httpx.get(url + "/health").json()


# ---------------------------------------------------------------------------------------------- openai client
def test_chat_nonstreamed_and_streamed_agree_with_llm_chat(client, llm):
    r = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny-chat"
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    # the server renders the checkpoint's chat template and applies its stop strings, as LLM.chat does
    assert choice.message.content == llm.chat(HELLO, max_new_tokens=24)
    from tianying.templates import render_chat

    assert r.usage.prompt_tokens == len(llm.tokenizer.encode(render_chat(HELLO, "aquila-chat")))
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1, "the reply should arrive in several pieces"
    assert "".join(pieces) == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == []
    u, v = chunks[-1].usage, r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (v.prompt_tokens, v.completion_tokens,
                                                                      v.total_tokens)
    # the same prompt again: its full 16-token blocks come from the prefix cache
    assert u.prompt_tokens_details.cached_tokens == (v.prompt_tokens - 1) // 16 * 16 > 0


def test_sse_wire_format(server):
    url, _ = server
    body = {"messages": HELLO, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth(), timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: {")
        chunk = json.loads(e[len("data: "):])
        assert set(chunk) == {"id", "object", "created", "model", "system_fingerprint", "choices"}
        assert set(chunk["choices"][0]) == {"index", "delta", "logprobs", "finish_reason"}


def test_completions_route_and_stop_strings(client, llm):
    prompt = "床前明月光，"
    r = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=16, temperature=0)
    expected = llm.generate(prompt, max_new_tokens=16)
    assert r.object == "text_completion" and r.choices[0].text == expected
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    streamed = "".join(c.choices[0].text for c in client.completions.create(prompt=prompt, max_tokens=16, temperature=0,
                                                                            model="x", stream=True))
    assert streamed == expected
    # a stop string cuts the text before it and reports "stop"
    stop = expected[len(expected) // 2:len(expected) // 2 + 2]
    assert stop.strip(), f"pick another prompt: {expected!r}"
    cut = client.completions.create(model="x", prompt=prompt, max_tokens=16, stop=[stop], temperature=0)
    assert cut.choices[0].text == expected[:expected.index(stop)] and cut.choices[0].finish_reason == "stop"
    # a list of prompts: one choice each, in order
    two = client.completions.create(model="x", prompt=[prompt, "你好"], max_tokens=6, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[1].text == llm.generate("你好", max_new_tokens=6)


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="x", messages=HELLO, max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=8, **kw).choices[0].message.content
    assert a == b and a != c


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    h = health(server[0])
    assert h["status"] == "ok" and h["rows"] == 8 and {"running", "waiting", "cached_blocks"} <= set(h)


# ---------------------------------------------------------------------------------------------- concurrency
def test_16_concurrent_streams_complete_and_match_solo_runs(client, server):
    prompts = [f"第{i}个问题：{'天' * (i % 5)}你好吗？" for i in range(16)]

    def solo(p):
        return client.chat.completions.create(model="x", messages=[{"role": "user", "content": p}],
                                              max_tokens=20 + len(p) % 7, temperature=0).choices[0].message.content

    expected = [solo(p) for p in prompts]
    steps_before = health(server[0])["steps"]
    barrier = threading.Barrier(16)

    def stream(p):
        barrier.wait()
        out = client.chat.completions.create(model="x", messages=[{"role": "user", "content": p}],
                                             max_tokens=20 + len(p) % 7, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in out if c.choices)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(stream, prompts))
    assert got == expected  # batched rows compute what they compute alone
    h = health(server[0])
    assert h["running"] == 0 and h["waiting"] == 0
    # decoded together, not one after another: far fewer forward steps than tokens
    total = sum(20 + len(p) % 7 for p in prompts)
    assert h["steps"] - steps_before < total / 2


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_its_slot(server, llm, monkeypatch, stream):
    url, app = server
    real_forward = llm.model.forward

    def slow_forward(*a, **kw):  # long enough that the request cannot finish before we hang up
        time.sleep(0.01)
        return real_forward(*a, **kw)

    monkeypatch.setattr(llm.model, "forward", slow_forward)
    before = health(url)
    body = {"messages": HELLO, "max_tokens": 150, "stream": stream}
    if stream:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth(), timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break  # generation is under way: hang up
    else:  # a client that gives up waiting (its read timeout) closes the connection
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body, headers=auth(), timeout=0.5)
    deadline = time.time() + 10
    while (h := health(url))["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert h["running"] == 0 and h["cancelled"] == before["cancelled"] + 1
    assert h["finished"] == before["finished"] and h["steps"] - before["steps"] < 100


# ---------------------------------------------------------------------------------------------- bad input
LONG = "北京 " * 400  # far over the 256-token context


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/chat/completions", b'{"messages": [', 400, None),  # invalid JSON
    ("/v1/chat/completions", b'[1, 2]', 400, None),  # not an object
    ("/v1/chat/completions", {"messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": "8"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": HELLO, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": HELLO, "suffix": "x"}, 400, "suffix"),  # known, cannot honour
    ("/v1/chat/completions", {"messages": HELLO, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": HELLO, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": HELLO, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": HELLO, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": HELLO, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"messages": HELLO, "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": HELLO, "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": HELLO, "seed": 2**80}, 400, "seed"),
    ("/v1/chat/completions", {"messages": HELLO, "n": 9}, 400, "n"),  # more choices than cache rows
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": HELLO, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": HELLO, "stop": ["", "x"]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": HELLO, "stream": True, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),  # 0 only with echo
    ("/v1/completions", {"prompt": [5, 10**9]}, 400, "prompt"),  # token id outside the vocabulary
    ("/v1/completions", {"prompt": [[5], []]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x" * 70_000}, 413, None),  # over the 64 KiB test limit
])
def test_bad_input_gets_openai_error(server, path, body, status, param):
    url, _ = server
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, headers={**auth(), "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert health(url)["status"] == "ok"


def test_body_over_limit_without_content_length_is_413(server):
    url, _ = server

    def chunks():
        for _ in range(100):
            yield b" " * 1024

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={**auth(), "Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_browser_pages_and_foreign_hosts_are_refused(llm):
    """A cross-site text/plain POST (a form or fetch without preflight) is 415; on a loopback server a Host that
    is not a loopback name (DNS rebinding) is 421; CORS headers only for --allowed-origins."""
    from tianying.serve.app import LOOPBACK_HOSTS

    app = create_app(llm, allowed_hosts=LOOPBACK_HOSTS, allowed_origins=["https://ok.example"])
    with running(app) as url:
        body = json.dumps({"prompt": "hi", "max_tokens": 1})
        r = httpx.post(url + "/v1/completions", content=body, headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        r = httpx.post(url + "/v1/completions", content=body,
                       headers={"Content-Type": "application/json", "Host": "evil.example:8000"})
        assert r.status_code == 421
        ok = httpx.post(url + "/v1/completions", content=body,
                        headers={"Content-Type": "application/json", "Origin": "https://ok.example"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ok.example"
        other = httpx.post(url + "/v1/completions", content=body,
                           headers={"Content-Type": "application/json", "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_idle_and_slowloris_connections_are_cut_off(llm):
    """uvicorn alone waits for a request head forever; `tianying serve` closes a connection whose head has not
    arrived in full within --header-timeout, idle or trickling, and still serves everyone else."""
    from tianying.serve.http import config

    app = create_app(llm)
    with running(app, config(app, "127.0.0.1", 0, header_timeout=1.0, log_level="warning")) as base:
        port = int(base.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        slow = socket.create_connection(("127.0.0.1", port))
        t0 = time.time()
        closed_at = None
        for part in [b"POST /v1/completions HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"X-a: 1\r\n"] * 10:
            try:
                slow.sendall(part)
            except OSError:
                closed_at = time.time() - t0
                break
            time.sleep(0.3)
            slow.settimeout(0.01)
            try:
                if slow.recv(1) == b"":
                    closed_at = time.time() - t0
                    break
            except TimeoutError:
                pass
        assert closed_at is not None and closed_at < 3.0, "the slowloris client was not cut off"
        for s in idle:
            s.settimeout(3)
            assert s.recv(1) == b""  # closed by the server, not by us
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 200


def test_unknown_route_is_an_openai_error(server):
    r = httpx.get(server[0] + "/v1/nothing", headers=auth())
    assert r.status_code == 404 and r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- api key
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_api_key_required(server, headers):
    url, _ = server
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")]:
        r = httpx.request(method, url + path, headers=headers, json={"messages": HELLO, "prompt": "x"})
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_api_key_wrong_with_openai_client(server):
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="x", messages=HELLO, max_tokens=2)


def test_page_and_health_need_no_key(server):
    url, _ = server
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<meta charset=\"utf-8\">" in page.text and "/v1/chat/completions" in page.text
    assert httpx.get(url + "/health").status_code == 200


# ---------------------------------------------------------------------------------------------- engine
def _run_threaded(engine, reqs, gap=0.0):
    events = {r.id: [] for r in reqs}
    for r in reqs:
        r.emit = events[r.id].append
    engine.start()
    try:
        for i, r in enumerate(reqs):
            engine.submit(r)
            time.sleep(gap * (i % 3))
        deadline = time.time() + 60
        while any(sum(e.finish_reason is not None for e in events[r.id]) < r.params.n for r in reqs):
            assert time.time() < deadline, "requests did not finish"
            time.sleep(0.01)
    finally:
        engine.close()
    return [events[r.id] for r in reqs]


def test_engine_matches_single_requests_under_churn(llm):
    """Staggered arrivals, more requests than rows, chunked prefill: every request gets exactly the tokens it
    gets alone (greedy, seeded sampling, stop strings, EOS)."""
    prompts = ["北京是", "hello world, this is", "a", "The quick brown fox jumps over the lazy dog and", "你好",
               "x y z", "床前明月光，疑是地上霜。", "1 2 3 4"] * 2
    params = []
    for i in range(len(prompts)):
        kw = dict(max_new_tokens=4 + 5 * i % 23)
        if i % 3 == 1:
            kw.update(temperature=0.9, top_p=0.9, seed=i)
        params.append(llm.sampling_params(**kw))
    ids = [llm.encode_prompt(p) for p in prompts]
    solo = Engine(llm.model, llm.tokenizer, max_batch=1, prefix_cache_bytes=0)
    expected = []
    for x, p in zip(ids, params):
        expected.append("".join(ev.text for _, ev in solo.run([Request(x, p)])))
    # a stop string taken from the middle of one expected text
    k = next(i for i, e in enumerate(expected) if len(e) > 6)
    params[k].stop = (expected[k][3:5],)
    expected[k] = expected[k][:expected[k].index(expected[k][3:5])]

    engine = Engine(llm.model, llm.tokenizer, max_batch=3, prefill_chunk=4)
    events = _run_threaded(engine, [Request(x, p) for x, p in zip(ids, params)], gap=0.002)
    assert ["".join(ev.text for ev in e) for e in events] == expected
    assert events[k][-1].finish_reason == "stop"
    assert engine.stats()["finished"] == len(prompts) and engine.stats()["running"] == 0


def test_engine_rejects_what_cannot_run(llm):
    from tianying.generate import GenerationError

    engine = Engine(llm.model, llm.tokenizer, max_batch=1)
    with pytest.raises(GenerationError, match="context"):
        engine.submit(Request([5] * 200, llm.sampling_params(max_new_tokens=100)))
    with pytest.raises(GenerationError, match="no tokens"):
        engine.submit(Request([], llm.sampling_params(max_new_tokens=1)))
    with pytest.raises(GenerationError, match="cache rows"):
        engine.submit(Request([5], llm.sampling_params(max_new_tokens=1, n=2)))


def test_never_samples_ids_the_tokenizer_cannot_decode(llm):
    """A model whose embedding has more rows than the tokenizer (padded vocabularies) must not crash decoding."""
    cfg = llm.config.replace(vocab_size=llm.tokenizer.vocab_size + 64)
    model = build_model(cfg, seed=1)
    with torch.no_grad():
        model.lm_head.weight[llm.tokenizer.vocab_size:] *= 50  # make the undecodable ids the likeliest
    engine = Engine(model, llm.tokenizer, max_batch=1)
    (events,) = _run_threaded(engine, [Request(llm.encode_prompt("你好"), llm.sampling_params(max_new_tokens=8))])
    assert events[-1].error is None and events[-1].finish_reason in ("stop", "length")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_serve_end_to_end(ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tianying", "serve", str(ckpt), "--port", str(port),
                             "--api-key", "k1", "--max-concurrency", "2"], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health").json()["rows"] == 2:
                    break
            except httpx.TransportError:
                assert time.time() < deadline, "tianying serve did not come up"
                time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0)
        r = c.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=4, temperature=0)
        assert r.choices[0].message.content and r.usage.completion_tokens <= 4
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(20)


def test_cli_serve_rejects_bad_options(ckpt, capsys):
    from tianying.cli import main

    assert main(["serve", str(ckpt), "--max-concurrency", "0"]) == 2
    assert "max-concurrency" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- OpenAI surface
@pytest.fixture(scope="module")
def reference(ckpt):
    """transformers' LlamaForCausalLM on the same files: the logprobs the server reports must be its own."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def _ref_logprobs(reference, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_chat_logprobs_equal_transformers(client, llm, reference):
    from tianying.templates import render_chat

    r = client.chat.completions.create(model="x", messages=HELLO, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=5)
    content = r.choices[0].logprobs.content
    prompt = llm.tokenizer.encode(render_chat(HELLO, "aquila-chat"))
    gen = llm.generate_ids([prompt], llm.sampling_params(max_new_tokens=8))[0]
    assert [bytes(c.bytes) for c in content] == [llm.tokenizer.token_bytes(t) for t in gen]
    ref = _ref_logprobs(reference, prompt + gen)
    for j, (c, t) in enumerate(zip(content, gen)):
        row = ref[len(prompt) - 1 + j]
        assert abs(c.logprob - float(row[t])) < 1e-4
        top = torch.topk(row, 5)
        assert [x.logprob for x in c.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [bytes(x.bytes) for x in c.top_logprobs] == [llm.tokenizer.token_bytes(i) for i in top.indices]


def test_completions_echo_scores_the_prompt_like_transformers(server, llm, reference):
    """What loglikelihood clients send (lm-eval's local-completions): token ids, echo, logprobs=1, max_tokens 0."""
    url, _ = server
    prompts = [llm.tokenizer.encode("床前明月光，疑是地上霜。"), llm.tokenizer.encode("The Lord is my shepherd")]
    body = {"model": "x", "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, headers=auth(), timeout=30)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for c, ids in zip(choices, prompts):
        lp = c["logprobs"]
        assert c["text"] == llm.tokenizer.decode(ids) and len(lp["tokens"]) == len(ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ref = _ref_logprobs(reference, ids)
        want = [float(ref[j - 1, ids[j]]) for j in range(1, len(ids))]
        assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
        assert all(len(t) == 1 and max(t.values()) == pytest.approx(float(ref[j].max()), abs=1e-4)
                   for j, t in enumerate(lp["top_logprobs"][1:]))
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_n_choices_share_the_prompt(client):
    r = client.chat.completions.create(model="x", messages=HELLO, max_tokens=12, temperature=1.0, seed=3, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices) and r.choices[0].message.content != r.choices[1].message.content
    assert 2 <= r.usage.completion_tokens <= 24  # counted over both choices; the prompt once
    s = list(client.chat.completions.create(model="x", messages=HELLO, max_tokens=12, temperature=1.0, seed=3, n=2,
                                            stream=True))
    texts = ["", ""]
    for ch in s:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in r.choices]  # same seed, same choices, streamed


def test_penalties_bias_and_ignored_fields(server, client, llm):
    url, _ = server
    # a +100 bias on one token makes it the only reply token
    (tok,) = llm.tokenizer.encode("好")
    r = client.completions.create(model="x", prompt="你好", max_tokens=4, temperature=0, logit_bias={str(tok): 100})
    assert r.choices[0].text == "好" * 4
    ids = httpx.post(url + "/v1/completions", headers=auth(), timeout=30, json={
        "prompt": "你好", "max_tokens": 4, "temperature": 0, "logit_bias": {str(tok): 100}, "logprobs": 0}).json()
    assert len(set(ids["choices"][0]["logprobs"]["tokens"])) == 1
    # penalties reach the sampler: with equal biases on two tokens, a presence penalty alternates them
    # (the arithmetic is tests/test_generate.py's; here only that the fields are honoured)
    (tok2,) = llm.tokenizer.encode("天")
    r = client.completions.create(model="x", prompt="你好", max_tokens=6, temperature=0, presence_penalty=2.0,
                                  logit_bias={str(tok): 100, str(tok2): 100})
    assert set(r.choices[0].text) == {"好", "天"}
    # fields clients send that change nothing: accepted, named in a Warning header
    resp = httpx.post(url + "/v1/chat/completions", headers=auth(), timeout=30, json={
        "messages": HELLO, "max_tokens": 2, "store": False, "metadata": {"a": "b"}, "bogus_option": 1,
        "messages_extra": None})
    assert resp.status_code == 200 and "bogus_option" in resp.headers["warning"]
    # assistant turns without content (tool-calling clients send them)
    msgs = HELLO + [{"role": "assistant", "content": None}, {"role": "user", "content": "再说一遍"}]
    assert client.chat.completions.create(model="x", messages=msgs, max_tokens=2).choices[0].message.content


def test_a_poisoned_request_fails_alone(client, server, llm):
    """Bad sampling values next to a long stream: the bad request gets an error, the stream is intact."""
    kw = dict(model="x", messages=HELLO, max_tokens=120, temperature=0)
    solo = client.chat.completions.create(**kw).choices[0].message.content
    url, _ = server
    result = {}

    def long():
        out = client.chat.completions.create(stream=True, **kw)
        result["long"] = "".join(c.choices[0].delta.content or "" for c in out if c.choices)

    t = threading.Thread(target=long)
    t.start()
    time.sleep(0.2)
    bad = []
    for extra in ({"repetition_penalty": 1e-308, "temperature": 1.0}, {"seed": 2**80}, {"logit_bias": {"3": 1e9}}):
        r = httpx.post(url + "/v1/chat/completions", headers=auth(), timeout=30,
                       json={"messages": HELLO, "max_tokens": 8, **extra})
        bad.append(r.status_code)
        assert r.json()["error"]["message"] and "Traceback" not in r.text
    t.join(60)
    assert all(400 <= s < 500 for s in bad), bad
    assert result["long"] == solo
    assert health(url)["running"] == 0


def test_lm_eval_local_completions_agrees_with_tianying_eval(server, ckpt, tmp_path, monkeypatch):
    """lm-evaluation-harness talking to `tianying serve` picks the same answer per item as `tianying eval`."""
    import lm_eval
    import lm_eval.models.openai_completions  # noqa: F401 - registers local-completions (the registry is lazy)
    from lm_eval.tasks import TaskManager

    from tianying.cli import main

    url, _ = server
    data = Path(__file__).parent / "data" / "eval" / "poem_mc.jsonl"
    limit = 6
    (tmp_path / "poem_lm.yaml").write_text(f"""task: poem_lm
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{title}}}}\\n唐·{{{{author}}}}\\n{{{{question}}}}"
doc_to_choice: "{{{{[A, B, C, D]}}}}"
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
target_delimiter: "\\n"
metric_list:
  - metric: acc
""", encoding="utf-8")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["poem_lm"], limit=limit, log_samples=True,
        model_args=f"base_url={url}/v1/completions,model=tiny-chat,tokenizer={ckpt},"
                   "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1",
        task_manager=TaskManager(include_path=str(tmp_path)))
    theirs = [max(range(4), key=lambda i: s["resps"][i][0][0]) for s in
              sorted(out["samples"]["poem_lm"], key=lambda s: s["doc_id"])]
    res = tmp_path / "ours.json"
    assert main(["eval", str(ckpt), "--tasks", "poem_mc", "--data-dir", str(data.parent), "--limit", str(limit),
                 "--output", str(res), "--no-progress"]) == 0
    records = json.loads(res.read_text())["tasks"]["poem_mc"]["samples"]
    assert len(records) == limit
    assert ["ABCD".index(r["prediction"]) for r in records] == theirs
