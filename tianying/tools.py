"""Tool calling and structured output for chat: OpenAI's `tools` / `tool_choice` / `response_format`, and
AquilaChat's own `#tag#` instructions, on top of the chat templates and the engine's constrained decoding.

How tools reach an Aquila model (its templates have no tool syntax, so the convention is ours, documented):
- the tool list goes into the system message: a short instruction and one JSON line per function;
- an assistant turn that called tools is rendered as its text followed by one
  `<tool_call>{"name": …, "arguments": {…}}</tool_call>` per call;
- tool results become the next user turn, one `<tool_response>{"name": …, "content": …}</tool_response>` each.
A checkpoint's own Jinja template that knows `tools` receives them directly instead.

With `tool_choice` "required" or a named function, the reply is decoded under a JSON schema (the call object
of the allowed functions), so its arguments are valid for the function's parameters whatever the model does.
With "auto", the reply is parsed: `<tool_call>` blocks (and AquilaChat tags registered in `TAGS`) become tool
calls, the rest is content.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tianying.errors import TianyingError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(\{.*?\})\s*" + re.escape(CLOSE), re.S)


class ToolError(TianyingError):
    pass


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        return out if index is None else {"index": index, **out}


# ---------------------------------------------------------------------------------------------- AquilaChat tags
@dataclass
class Tag:
    """AquilaChat's special instruction `#tag#text`: the tool it calls and the argument the text becomes."""

    tool: str
    argument: str
    handler: Callable[..., Any] | None = None


# the two the seed names (seed-spec: AquilaChat calls AltDiffusion and InstructFace through such tags)
TAGS: dict[str, Tag] = {"text2image": Tag("text2image", "prompt"), "InstructFace": Tag("instruct_face", "instruction")}
_TAG = re.compile(r"#([A-Za-z][A-Za-z0-9_]*)#\s*(.+?)(?=\s*#[A-Za-z][A-Za-z0-9_]*#|\Z)", re.S)


def register_tag(tag: str, tool: str, argument: str = "prompt", handler: Callable[..., Any] | None = None) -> None:
    """Make `#tag#text` in a reply a call of `tool` with {argument: text} (and, in Python, of `handler`)."""
    TAGS[tag] = Tag(tool, argument, handler)


def parse_tags(text: str, registry: Mapping[str, Tag] | None = None) -> tuple[str, list[ToolCall]]:
    """(text before the first registered tag, the calls) of an AquilaChat reply."""
    registry = TAGS if registry is None else registry
    calls, first = [], None
    for m in _TAG.finditer(text):
        tag = registry.get(m.group(1))
        if tag is None:
            continue
        first = m.start() if first is None else first
        calls.append(ToolCall(tag.tool, {tag.argument: m.group(2).strip()}))
    return (text if first is None else text[:first].rstrip()), calls


def dispatch(calls: Sequence[ToolCall], handlers: Mapping[str, Callable[..., Any]]) -> list[Any]:
    """Runs each call's handler (by tool name, else a registered tag's handler) with its arguments."""
    by_tool = {t.tool: t.handler for t in TAGS.values() if t.handler is not None}
    out = []
    for c in calls:
        fn = handlers.get(c.name) or by_tool.get(c.name)
        if fn is None:
            raise ToolError(f"no handler for tool {c.name!r}")
        out.append(fn(**c.arguments))
    return out


# ---------------------------------------------------------------------------------------------- OpenAI tools
def functions(tools: Sequence[Mapping] | None) -> list[dict]:
    """The `function` objects of OpenAI `tools` (validated: a name and an object schema each)."""
    out = []
    for i, t in enumerate(tools or ()):
        if not isinstance(t, Mapping) or t.get("type", "function") != "function" or "function" not in t:
            raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        f = dict(t["function"])
        if not isinstance(f.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", f["name"]):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'")
        params = f.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, Mapping) or params.get("type", "object") != "object":
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema of type object")
        f["parameters"] = dict(params)
        out.append(f)
    names = [f["name"] for f in out]
    if len(set(names)) != len(names):
        raise ToolError("tools: function names must be unique")
    return out


def chosen(tool_choice: Any, fns: list[dict]) -> tuple[str, list[dict]]:
    """("none" | "auto" | "required", the functions the reply may call) for an OpenAI `tool_choice`."""
    if tool_choice is None:
        return ("auto" if fns else "none"), fns
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not fns:
            raise ToolError("tool_choice 'required' needs tools")
        return tool_choice, fns
    if isinstance(tool_choice, Mapping):
        name = (tool_choice.get("function") or {}).get("name")
        hit = [f for f in fns if f["name"] == name]
        if not hit:
            raise ToolError(f"tool_choice names function {name!r}, which is not in tools")
        return "required", hit
    raise ToolError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name'}}")


def call_schema(fns: list[dict], parallel: bool = False) -> str:
    """JSON schema of a call of one of `fns` ({"name", "arguments"}), or a non-empty list of them. Arguments
    get no properties their schema does not declare (OpenAI's strict mode; a weak model would otherwise invent
    keys until max_tokens)."""
    one = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                             "arguments": {"additionalProperties": False, **f["parameters"]}},
            "required": ["name", "arguments"], "additionalProperties": False} for f in fns]
    call = one[0] if len(one) == 1 else {"anyOf": one}
    return json.dumps({"type": "array", "items": call, "minItems": 1} if parallel else call)


def system_text(fns: list[dict]) -> str:
    lines = "\n".join(json.dumps({"name": f["name"], "description": f.get("description", ""),
                                  "parameters": f["parameters"]}, ensure_ascii=False) for f in fns)
    return (f"You can call these functions. To call one, reply with only {OPEN}{{\"name\": <function name>, "
            f"\"arguments\": <JSON object>}}{CLOSE} (several calls: one block each).\nFunctions:\n{lines}")


def prepare(messages: Sequence[Mapping], fns: list[dict], mode: str) -> list[dict]:
    """OpenAI messages (with `tool_calls` and `tool` turns) → plain system/user/assistant messages in the
    convention of this module's docstring."""
    out: list[dict] = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            blocks = []
            for c in m["tool_calls"]:
                f = c.get("function") or {}
                args = f.get("arguments") or "{}"
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except json.JSONDecodeError:
                    pass  # shown as the string it was
                blocks.append(OPEN + json.dumps({"name": f.get("name"), "arguments": args}, ensure_ascii=False)
                              + CLOSE)
            out.append({"role": "assistant", "content": (content + "\n" if content else "") + "\n".join(blocks)})
        elif role == "tool":
            block = "<tool_response>" + json.dumps({"name": m.get("name"), "tool_call_id": m.get("tool_call_id"),
                                                    "content": content}, ensure_ascii=False) + "</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        else:
            out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool", None)
    if fns and mode != "none":
        text = system_text(fns)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def parse_reply(text: str, fns: list[dict], constrained: bool,
                parallel: bool = False) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) of a reply. A constrained reply is the call JSON itself; otherwise `<tool_call>`
    blocks naming a known function, and AquilaChat tags whose tool is among `fns`, are calls."""
    names = {f["name"] for f in fns}
    if constrained:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:  # cut off by max_tokens
            raise ToolError(f"the tool call was cut off before it was complete ({e.msg}); raise max_tokens") from None
        objs = obj if isinstance(obj, list) else [obj]
        return None, [ToolCall(o["name"], o["arguments"]) for o in objs]
    calls = []
    for m in _CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("name") in names and isinstance(obj.get("arguments", {}), dict):
            calls.append(ToolCall(obj["name"], obj.get("arguments", {})))
    content = _CALL.sub("", text).strip() if calls else text
    if not calls:
        rest, tagged = parse_tags(text, {k: v for k, v in TAGS.items() if v.tool in names})
        if tagged:
            content, calls = rest, tagged
    return (content or None), (calls if parallel or len(calls) <= 1 else calls[:1])


def response_grammar(response_format: Mapping | None) -> tuple[str, str | None] | None:
    """The engine grammar for an OpenAI `response_format` (None for plain text)."""
    if not response_format or response_format.get("type") == "text":
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return ("json_object", None)
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema")
        if not isinstance(schema, Mapping):
            raise ToolError("response_format.json_schema.schema must be a JSON schema object")
        return ("json_schema", json.dumps(schema))
    raise ToolError(f"response_format type must be text, json_object or json_schema, got {kind!r}")
