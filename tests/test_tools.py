"""Constrained decoding, OpenAI tool calling and structured output, AquilaChat's #tag# tools; against a tiny
random chat checkpoint (whatever it says, constrained output must validate) with the openai client and
LangChain as the clients."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import torch
from helpers import running, tiny_chat_checkpoint  # noqa: E402, I001

from tianying import tools as tl
from tianying.engine import Engine, Request
from tianying.generate import GenerationError, SamplingParams

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "unit"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string", "maxLength": 16}},
                                     "required": ["q"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}
ASK = [{"role": "user", "content": "北京明天天气怎么样？"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tianying.api import LLM

    return LLM.load(tiny_chat_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-chat", context=1024))


def test_named_function_arguments_validate_on_20_seeds(llm):
    params = WEATHER["function"]["parameters"]
    for seed in range(20):
        r = llm.chat(ASK, tools=[WEATHER, SEARCH], max_new_tokens=120, temperature=1.0, seed=seed,
                     tool_choice={"type": "function", "function": {"name": "get_weather"}})
        (call,) = r["tool_calls"]
        assert call.name == "get_weather"
        jsonschema.validate(call.arguments, {**params, "additionalProperties": False})


def test_required_picks_one_of_the_tools(llm):
    names = set()
    for seed in range(8):
        r = llm.chat(ASK, tools=[WEATHER, SEARCH], tool_choice="required", max_new_tokens=120, temperature=1.0,
                     seed=seed)
        (call,) = r["tool_calls"]
        names.add(call.name)
        schema = {"get_weather": WEATHER, "search": SEARCH}[call.name]["function"]["parameters"]
        jsonschema.validate(call.arguments, schema)
    assert names <= {"get_weather", "search"}


def test_json_schema_output_validates_on_20_seeds(llm):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(20):
        text = llm.chat([{"role": "user", "content": "Describe a person as JSON."}], response_format=fmt,
                        max_new_tokens=120, temperature=1.0, seed=seed)
        jsonschema.validate(json.loads(text), PERSON)
    obj = llm.chat(ASK, response_format={"type": "json_object"}, max_new_tokens=120, temperature=1.0, seed=1)
    assert isinstance(json.loads(obj), dict)


def test_unconstrained_requests_in_the_same_batch_are_unchanged(llm):
    prompts = [llm.encode_prompt(p) for p in ("北京是", "The quick brown fox", "床前明月光，")]
    plain = SamplingParams(max_new_tokens=16)
    alone = Engine(llm.model, llm.tokenizer, prefix_cache_bytes=0).generate_ids(prompts, plain)
    engine = Engine(llm.model, llm.tokenizer, prefix_cache_bytes=0)
    constrained = SamplingParams(max_new_tokens=40, temperature=1.0, seed=0,
                                 grammar=("json_schema", json.dumps(PERSON)))
    reqs = [Request(prompts[0], constrained), *(Request(p, plain) for p in prompts)]
    out = {r.id: [] for r in reqs}
    for r, ev in engine.run(reqs):
        out[r.id] += ev.tokens
    assert [out[r.id] for r in reqs[1:]] == alone
    assert json.loads(llm.tokenizer.decode(out[reqs[0].id]))  # and the constrained one is JSON


def test_bad_grammars_are_one_line(llm):
    with pytest.raises(GenerationError, match="invalid regex"):
        llm.generate("x", max_new_tokens=2, grammar=("regex", "[a-"))
    out = llm.generate("x", max_new_tokens=8, temperature=1.0, seed=0, grammar=("regex", "(yes|no)"))
    assert out in ("yes", "no")
    with pytest.raises(tl.ToolError, match="not in tools"):
        llm.chat(ASK, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})


# ---------------------------------------------------------------------------------------------- rendering, parsing
def test_tool_turns_are_rendered_in_the_documented_convention():
    msgs = tl.prepare([{"role": "user", "content": "天气？"},
                       {"role": "assistant", "content": None, "tool_calls": [
                           {"id": "c1", "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "北京", "unit": "C"}'}}]},
                       {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "晴 25°C"},
                       {"role": "tool", "tool_call_id": "c2", "name": "get_weather", "content": "雨"}],
                      tl.functions([WEATHER]), "auto")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("You can call these functions.") and '"get_weather"' in msgs[0]["content"]
    call = '{"name": "get_weather", "arguments": {"city": "北京", "unit": "C"}}'
    assert msgs[2]["content"] == f"<tool_call>{call}</tool_call>"
    assert msgs[3]["content"].count("<tool_response>") == 2 and "晴 25°C" in msgs[3]["content"]


def test_auto_replies_are_parsed_into_calls_or_content():
    fns = tl.functions([WEATHER, SEARCH])
    content, calls = tl.parse_reply('好的。<tool_call>{"name": "search", "arguments": {"q": "北京"}}</tool_call>', fns,
                                    constrained=False)
    assert content == "好的。" and [(c.name, c.arguments) for c in calls] == [("search", {"q": "北京"})]
    # an unknown function or broken JSON is text
    text = '<tool_call>{"name": "rm", "arguments": {}}</tool_call> <tool_call>{broken</tool_call>'
    assert tl.parse_reply(text, fns, constrained=False) == (text, [])


def test_aquilachat_tags_become_tool_calls_and_reach_handlers():
    content, calls = tl.parse_tags("好的，这就为您画。#text2image#一只在长城上的熊猫，水墨画风格")
    assert content == "好的，这就为您画。"
    assert [(c.name, c.arguments) for c in calls] == [("text2image", {"prompt": "一只在长城上的熊猫，水墨画风格"})]
    _, calls = tl.parse_tags("#InstructFace#把头发变成金色 #text2image#a cat")
    assert [(c.name, c.arguments) for c in calls] == [("instruct_face", {"instruction": "把头发变成金色"}),
                                                      ("text2image", {"prompt": "a cat"})]
    assert tl.parse_tags("价格是#100#元") == ("价格是#100#元", [])  # not a registered tag
    seen = []
    tl.register_tag("text2image", "text2image", "prompt", handler=lambda prompt: seen.append(prompt) or "img.png")
    try:
        assert tl.dispatch(calls[1:], {}) == ["img.png"] and seen == ["a cat"]
    finally:
        tl.register_tag("text2image", "text2image", "prompt")
    # offered as an OpenAI tool, a tag in an auto reply comes back as its call
    t2i = {"type": "function", "function": {"name": "text2image", "parameters": {
        "type": "object", "properties": {"prompt": {"type": "string"}}}}}
    _, calls = tl.parse_reply("#text2image#sunset over West Lake", tl.functions([t2i]), constrained=False)
    assert [(c.name, c.arguments) for c in calls] == [("text2image", {"prompt": "sunset over West Lake"})]


# ---------------------------------------------------------------------------------------------- clients
@pytest.fixture(scope="module")
def url(llm):
    from tianying.serve.app import create_app

    with running(create_app(llm)) as u:
        yield u


def test_openai_client_tools_round_trip(url):
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    r = c.chat.completions.create(model="x", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=120,
                                  temperature=1.0, seed=4)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # the call and its result go back into the history; the reply is text again (tool_choice auto)
    follow = ASK + [choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "晴，25°C"}]
    r2 = c.chat.completions.create(model="x", messages=follow, tools=[WEATHER], max_tokens=8, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # streamed: the call arrives as tool-call deltas in OpenAI's shape
    chunks = list(c.chat.completions.create(model="x", messages=ASK, tools=[WEATHER], stream=True, max_tokens=120,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            temperature=1.0, seed=4))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "get_weather" and deltas[0].index == 0
    assert deltas[0].function.arguments == call.function.arguments  # same seed, same call
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # structured output
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r3 = c.chat.completions.create(model="x", messages=ASK, response_format=fmt, max_tokens=120, temperature=1.0,
                                   seed=5)
    jsonschema.validate(json.loads(r3.choices[0].message.content), PERSON)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="x", messages=ASK, response_format={"type": "xml"}, max_tokens=4)


def test_langchain_bind_tools_and_structured_output(url):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=url + "/v1", api_key="x", model="tiny-chat", temperature=1.0, max_tokens=300,
                      seed=6, max_retries=0)
    bound = chat.bind_tools([WEATHER], tool_choice="get_weather")
    msg = bound.invoke([HumanMessage("北京天气？")])
    (call,) = msg.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER["function"]["parameters"])
    again = bound.invoke([HumanMessage("北京天气？"), msg, ToolMessage("晴", tool_call_id=call["id"])])
    assert again.tool_calls or isinstance(again.content, str)
    person = chat.with_structured_output({"title": "person", **PERSON}, method="json_schema").invoke("A person?")
    jsonschema.validate(person, PERSON)
    # LangChain's other structured-output method goes through a forced tool call
    person = chat.with_structured_output({"title": "person", **PERSON}, method="function_calling").invoke("Who?")
    jsonschema.validate(person, PERSON)


def test_constrained_decoding_costs_little_per_token(llm):
    """Not a timing test: the mask is computed once per constrained token (counted), never for plain rows."""
    import llguidance.torch as lgt

    calls = []
    real = lgt.fill_next_token_bitmask
    lgt.fill_next_token_bitmask = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        engine = Engine(llm.model, llm.tokenizer)
        ids = llm.encode_prompt("x")
        g = SamplingParams(max_new_tokens=30, temperature=1.0, seed=0, grammar=("json_schema", json.dumps(PERSON)))
        out = {}
        for r, ev in engine.run([Request(ids, g), Request(ids, SamplingParams(max_new_tokens=30))]):
            out.setdefault(r.id, []).extend(ev.tokens)
        first = min(out)
        assert len(calls) == len(out[first]) or len(calls) == len(out[first]) + 1
    finally:
        lgt.fill_next_token_bitmask = real
    assert torch.is_tensor(engine._bitmask)
