"""The five Aquila conversation templates (FlagAI's aquila2 registry, FastChat-derived; spec chat-templates.md).

A conversation renders as: the system text, then one piece per message, then (for generation) the open
assistant role. Two separator styles exist:

- colon: a finished message is `ROLE + ": " + text + SEP`; the open turn is `ROLE + ":"` (no trailing space).
- no-colon: a finished message is `ROLE + text + SEP`; the open turn is just `ROLE`.

"single" templates put SEP after every message; "two" templates alternate SEP (after user turns) and SEP2
(after assistant turns). Colon templates also put SEP right after the system text.

Choices where the original is ambiguous:
- FlagAI's registry defines `aquila-legacy` twice, the second time with an empty SEP2. We keep `</s>`: the
  34B chat model was trained to end turns with it, and it is the stop string the template declares.
- A user-supplied system message replaces the template's system text. `aquila-legacy` and `aquila-v2` put a
  blank line after their system text; a replacement gets the same blank line (and so does one given to
  `aquila-v1`, whose own system text is empty: v2 is v1 plus a system text). An empty system renders nothing.

Both ways with Jinja: `jinja_source(name)` is each Aquila template as a `chat_template` string that
transformers' `apply_chat_template` renders identically; every saver puts it into tokenizer_config.json
(`write_chat_template`). A checkpoint's own `chat_template` becomes a `JinjaTemplate`, rendered in a sandbox
the way transformers renders it; `checkpoint_template` decides which one a checkpoint uses. Both kinds offer
`name`, `render`, `segments` (SFT masks) and `stop_strings`. `encode_chat` turns a conversation into prompt ids
in which special-token strings typed by a user stay text.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from tianying.errors import TianyingError

DEFAULT_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the human's questions.")

Style = Literal["colon-single", "colon-two", "no-colon-two"]


class TemplateError(TianyingError):
    """Unknown template name or a malformed conversation."""


@dataclass(frozen=True)
class ChatTemplate:
    """One conversation format: how system text, roles and separators combine into the prompt string."""

    name: str
    system: str  # default system text (without the separator that follows it)
    user: str  # role markers
    assistant: str
    style: Style
    sep: str
    sep2: str = ""
    system_suffix: str = ""  # what follows the system text in no-colon templates ("\n\n")
    stop_strings: tuple[str, ...] = ()

    @property
    def colon(self) -> bool:
        return self.style.startswith("colon")

    def render_system(self, system: str | None = None) -> str:
        text = self.system if system is None else system
        if not text:
            return ""
        return text + (self.sep if self.colon else self.system_suffix)

    def separator(self, k: int) -> str:
        """Separator after message k (0 = first user turn)."""
        return self.sep if self.style == "colon-single" or k % 2 == 0 else self.sep2

    def prefix(self, role: str) -> str:
        """What precedes the content of a finished message of `role`."""
        marker = self.user if role == "user" else self.assistant
        return marker + ": " if self.colon else marker

    def generation_prompt(self) -> str:
        """The open assistant turn the model continues."""
        return self.assistant + ":" if self.colon else self.assistant

    def segments(self, messages: list[Message], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """See `render_chat_segments`."""
        system, turns = _normalize(messages)
        if add_generation_prompt and turns[-1][0] != "user":
            raise TemplateError("the last message is from the assistant; pass add_generation_prompt=False to "
                                "render a finished conversation")
        out: list[tuple[str, bool]] = []
        head = self.render_system(system)
        for k, (role, content) in enumerate(turns):
            if role == "user":
                out.append((head + self.prefix(role) + content + self.separator(k), False))
                head = ""
            else:
                out.append((self.prefix(role), False))
                out.append((content + self.separator(k), True))
        if add_generation_prompt:
            out.append((self.generation_prompt(), False))
        return [(s, trained) for s, trained in out if s]

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        return "".join(s for s, _ in self.segments(messages, add_generation_prompt))

    def __str__(self) -> str:
        return self.name


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate("aquila-chat", DEFAULT_SYSTEM, "Human", "Assistant", "colon-single", "###",
                     stop_strings=("###", "</s>", "[UNK]")),
        ChatTemplate("aquila", DEFAULT_SYSTEM, "Human", "Assistant", "colon-two", "###", "</s>",
                     stop_strings=("</s>", "[UNK]")),
        ChatTemplate("aquila-v1", "", "<|startofpiece|>", "<|endofpiece|>", "no-colon-two", "", "</s>",
                     system_suffix="\n\n", stop_strings=("</s>", "<|endoftext|>")),
        ChatTemplate("aquila-legacy", DEFAULT_SYSTEM, "### Human: ", "### Assistant: ", "no-colon-two", "\n",
                     "</s>", system_suffix="\n\n", stop_strings=("</s>", "[UNK]")),
        ChatTemplate("aquila-v2", DEFAULT_SYSTEM, "<|startofpiece|>", "<|endofpiece|>", "no-colon-two", "", "</s>",
                     system_suffix="\n\n",
                     stop_strings=("</s>", "<|endoftext|>", "<|startofpiece|>", "<|endofpiece|>")),
    )
}

# FlagAI's `template_map` (exact CamelCase names there); we also accept our lower-case config names
_MODEL_TEMPLATES = {
    "aquilachat2-7b": "aquila-v1",
    "aquilachat2-34b": "aquila-legacy",
    "aquilachat2-70b-expr": "aquila-v2",
    "aquilachat2-7b-16k": "aquila",
    "aquilachat2-34b-16k": "aquila",
}
DEFAULT_TEMPLATE = "aquila-chat"


def get_template(name: str | os.PathLike | Template, variables: dict[str, str] | None = None) -> Template:
    """The template called `name`: an Aquila template name, a Jinja file (`.jinja`, or a tokenizer_config.json
    holding `chat_template`), or a template object (passed through).

    `variables` are the special-token strings (`bos_token`, `eos_token`, ...) a Jinja file may refer to.
    """
    if isinstance(name, (ChatTemplate, JinjaTemplate)):
        return name
    if isinstance(name, str) and name in TEMPLATES:
        return TEMPLATES[name]
    if isinstance(name, (str, os.PathLike)) and name and Path(name).is_file():
        return _template_file(Path(name), variables or {})
    if isinstance(name, (str, os.PathLike)) and (str(name).endswith((".jinja", ".json")) or os.sep in str(name)):
        raise TemplateError(f"chat template file {name} does not exist")
    raise TemplateError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)} (or a .jinja file)")


def template_for_model(model_name: str) -> str:
    """Template name FlagAI's `predict()` picks for a model; `aquila-chat` for anything it does not know.

    Accepts "AquilaChat2-7B", "BAAI/AquilaChat2-7B", a checkpoint path ending in the model name, or our
    config names ("aquilachat2-7b").
    """
    base = str(model_name).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()
    return _MODEL_TEMPLATES.get(base, DEFAULT_TEMPLATE)


Message = dict[str, str]


def _normalize(messages: list[Message]) -> tuple[str | None, list[tuple[str, str]]]:
    """Validate and split off the system message; accepts Aquila SFT's {"from": human|gpt, "value"} form too."""
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise TemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    aliases = {"human": "user", "gpt": "assistant"}
    system: str | None = None
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TemplateError(f"message {i} is a {type(m).__name__}, expected a dict with 'role' and 'content'")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = aliases.get(role, role)
        if role not in ("system", "user", "assistant"):
            raise TemplateError(f"message {i} has role {role!r}; expected 'system', 'user' or 'assistant'")
        if not isinstance(content, str):
            raise TemplateError(f"message {i} ({role}) has no string 'content'")
        if role == "system":
            if i != 0:
                raise TemplateError(f"message {i} is a system message; only the first message may be one")
            system = content
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise TemplateError(f"message {i} is from the {role} but the {expected} was expected: after an "
                                "optional system message, turns must alternate user, assistant, user, ...")
        turns.append((role, content))
    if not turns:
        raise TemplateError("the conversation has no user message")
    return system, turns




def render_chat_segments(messages: list[Message], template: str | Template = DEFAULT_TEMPLATE,
                         add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces, for SFT label masking.

    `trained` is True exactly for each assistant message's content plus the separator that ends it (the model
    must learn to produce both, the separator being how it stops). Concatenating the pieces gives
    `render_chat(messages, template, add_generation_prompt)`.
    """
    return get_template(template).segments(messages, add_generation_prompt)


def render_chat(messages: list[Message], template: str | Template = DEFAULT_TEMPLATE,
                add_generation_prompt: bool = True) -> str:
    """The prompt string for `messages` ([{"role": "system"|"user"|"assistant", "content": str}, ...]).

    With `add_generation_prompt` (the default) the conversation must end with a user turn and the open
    assistant role is appended, ready for the model to continue.
    """
    return get_template(template).render(messages, add_generation_prompt)


# ---------------------------------------------------------------------------------------------- Jinja
# The Aquila templates as Jinja `chat_template`s, so that transformers' apply_chat_template (and vLLM,
# llama.cpp, Ollama, which read the same string) render exactly what `render_chat` renders. Generated from the
# table above rather than written five times by hand; `{%- -%}` everywhere, so no template whitespace leaks.
_JINJA = """{#- tianying chat template "NAME" (FlagAI's aquila2 conversation registry) -#}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system = messages[0]['content'] -%}
{%- set turns = messages[1:] -%}
{%- else -%}
{%- set system = SYSTEM -%}
{%- set turns = messages -%}
{%- endif -%}
{%- if not turns -%}
{{- raise_exception('the conversation has no user message') -}}
{%- endif -%}
{%- if system -%}
{{- system + SYSTEM_SUFFIX -}}
{%- endif -%}
{%- for message in turns -%}
{%- if message['role'] == 'system' -%}
{{- raise_exception('only the first message may be a system message') -}}
{%- elif message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}
{{- raise_exception('after an optional system message, turns must alternate user, assistant, user, ...') -}}
{%- elif message['role'] == 'user' -%}
{{- USER + message['content'] + SEP -}}
{%- else -%}
{{- ASSISTANT + message['content'] + SEP2 -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{%- if turns[-1]['role'] != 'user' -%}
{{- raise_exception('the last message is from the assistant; use add_generation_prompt=False') -}}
{%- endif -%}
{{- GENERATION -}}
{%- endif -%}"""


def jinja_source(name: str | Template) -> str:
    """The Aquila template `name` as a Jinja chat_template string (tokenizer_config.json, GGUF metadata).

    A `JinjaTemplate` gives its own source, so `jinja_source(checkpoint_template(dir))` is what to export.
    """
    t = get_template(name)
    if not isinstance(t, ChatTemplate):
        return t.source
    values = {  # json.dumps gives a Jinja string literal: double quotes, \n and \uXXXX escapes
        "SYSTEM_SUFFIX": t.sep if t.colon else t.system_suffix, "SYSTEM": t.system,
        "USER": t.prefix("user"), "ASSISTANT": t.prefix("assistant"), "SEP2": t.separator(1), "SEP": t.separator(0),
        "GENERATION": t.generation_prompt(),
    }
    out = _JINJA.replace('"NAME"', json.dumps(t.name))
    for key, value in values.items():  # \b: SYSTEM does not match inside SYSTEM_SUFFIX, nor SEP in SEP2
        out = re.sub(rf"\b{key}\b", lambda _, v=value: json.dumps(v), out)
    return out


def _aquila_by_source() -> dict[str, str]:
    return {jinja_source(n): n for n in TEMPLATES}


# markers transformers' `sanitize_control_tokens` uses too: private-use code points no text legitimately has
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"
_PROBE = "\U000f0002"


class JinjaTemplate:
    """A checkpoint's own `chat_template`, rendered in a sandbox the way transformers renders it.

    `name` says where it came from (for messages); `variables` are the special-token strings (`bos_token`,
    `eos_token`, ...) transformers passes to every template.
    """

    def __init__(self, source: str, name: str = "chat_template", variables: dict[str, str] | None = None):
        if not isinstance(source, str) or not source:
            raise TemplateError(f"{name}: the chat template is not a non-empty string")
        self.source = source
        self.name = name
        self.variables = dict(variables or {})
        self._compiled = _compile(source, name)
        self._stops: tuple[str, ...] | None = None

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        import jinja2

        msgs = _plain_messages(messages)
        try:
            return self._compiled.render(**{**self.variables, "messages": msgs, "tools": None, "documents": None,
                                            "add_generation_prompt": add_generation_prompt})
        except jinja2.TemplateError as e:  # raise_exception(), SecurityError, UndefinedError
            raise TemplateError(f"chat template {self.name}: {_one_line(e)}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as e:
            raise TemplateError(f"chat template {self.name}: {type(e).__name__}: {_one_line(e)}") from None

    def segments(self, messages: list[Message], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """Assistant spans found by rendering prefixes (as TRL and axolotl do): the text a conversation gains
        from its generation prompt up to the end of assistant message i is message i plus its end-of-turn."""
        msgs = _plain_messages(messages)
        full = self.render(msgs, add_generation_prompt)
        out: list[tuple[str, bool]] = []
        pos = 0
        for i, m in enumerate(msgs):
            if m.get("role") != "assistant" or i == 0:
                continue
            before = self.render(msgs[:i], add_generation_prompt=True)
            upto = self.render(msgs[:i + 1], add_generation_prompt=False)
            if not (len(before) >= pos and upto.startswith(before) and full.startswith(upto)):
                raise TemplateError(f"chat template {self.name} does not render a conversation as an extension of "
                                    "its first turns, so assistant turns cannot be found for SFT label masking")
            out += [(full[pos:len(before)], False), (upto[len(before):], True)]
            pos = len(upto)
        out.append((full[pos:], False))
        return [(s, trained) for s, trained in out if s]

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """What the template writes after an assistant message (`<|im_end|>`, `<|eot_id|>`, `</s>`)."""
        if self._stops is None:
            try:
                text = self.render([{"role": "user", "content": "u"}, {"role": "assistant", "content": _PROBE}],
                                   add_generation_prompt=False)
            except TemplateError:
                text = ""
            tail = text.split(_PROBE, 1)[1].strip() if _PROBE in text else ""
            self._stops = (tail,) if tail else ()
        return self._stops

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"JinjaTemplate({self.name!r})"


Template = ChatTemplate | JinjaTemplate


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _plain_messages(messages: list[Message]) -> list[dict]:
    """Fresh plain dicts (None values dropped, as transformers does), so a template cannot touch caller objects."""
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise TemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TemplateError(f"message {i} is a {type(m).__name__}, expected a dict with 'role' and 'content'")
        try:
            out.append(json.loads(json.dumps({k: v for k, v in m.items() if v is not None})))
        except (TypeError, ValueError) as e:
            raise TemplateError(f"message {i} holds a value that is not plain JSON data ({_one_line(e)})") from None
    return out


_MAX_REPEAT = 1 << 20  # `'x' * 10**10` in a template must not take the memory of the process


@lru_cache(maxsize=32)
def _compile(source: str, name: str):
    """Compile like transformers: ImmutableSandboxedEnvironment, trim/lstrip blocks, its globals and filters."""
    import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def unsafe_undefined(self, obj, attribute):  # raise at once instead of rendering "" (stricter)
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of a {type(obj).__name__} object is not allowed")

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and right > 64:
                raise jinja2.exceptions.SecurityError("exponent too large")
            if operator == "*":
                seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_REPEAT:
                    raise jinja2.exceptions.SecurityError("the template builds too long a value")
            return super().call_binop(context, operator, left, right)

    class Generation(Extension):  # `{% generation %}...{% endgeneration %}` (assistant masks): render the body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):  # no underscore attributes: nothing to reach CPython internals by
        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for key in attrs:
                Namespace._check(key)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, key, value):
            Namespace._check(key)
            jinja2.utils.Namespace.__setitem__(self, key, value)

        @staticmethod
        def _check(key):
            if isinstance(key, str) and key.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {key!r} is not allowed")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"{name}: invalid Jinja chat template (line {e.lineno}: {e.message})") from None


def _template_file(path: Path, variables: dict[str, str]) -> Template:
    """A `.jinja` file, or a JSON file (tokenizer_config.json) with a `chat_template` entry."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateError(f"{path}: cannot read the chat template ({_one_line(e)})") from None
    if path.suffix == ".json":
        try:
            source = _pick_source(json.loads(text).get("chat_template"), path)
        except (json.JSONDecodeError, AttributeError):
            raise TemplateError(f"{path}: not a JSON object with a 'chat_template'") from None
        if source is None:
            raise TemplateError(f"{path}: has no 'chat_template'")
        text = source
    return template_from_source(text, str(path), variables)


def template_from_source(source: str, name: str, variables: dict[str, str]) -> Template:
    """Our own Aquila Jinja (written by tianying) maps back to the named template; anything else is Jinja."""
    aquila = _aquila_by_source().get(source)
    return TEMPLATES[aquila] if aquila else JinjaTemplate(source, name, variables)


def _pick_source(value: object, where: Path) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or a list of {"name", "template"} (take "default")."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, list) and all(isinstance(v, dict) and "name" in v and "template" in v for v in value):
        named = {v["name"]: v["template"] for v in value}
        if "default" in named:
            return named["default"]
        raise TemplateError(f"{where}: chat_template lists {', '.join(named)} but no 'default'; choose one with "
                            "--chat-template FILE")
    raise TemplateError(f"{where}: chat_template must be a string or a list of {{name, template}} objects")


# ---------------------------------------------------------------------------------------------- checkpoints
def _read_json_object(path: Path, strict: bool = True) -> dict | None:
    """The JSON object in `path` ({} when absent); a broken file raises, or gives None when not `strict`."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if not strict:
            return None
        raise TemplateError(f"{path}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(value, dict):
        if not strict:
            return None
        raise TemplateError(f"{path}: expected a JSON object")
    return value


def token_variables(directory: str | os.PathLike) -> dict[str, str]:
    """`bos_token`, `eos_token`, ... strings from tokenizer_config.json and special_tokens_map.json (the
    variables transformers gives every chat template; special_tokens_map.json wins, as it does there)."""
    d = Path(directory)
    out: dict[str, str] = {}
    for f in ("tokenizer_config.json", "special_tokens_map.json"):  # broken files: the tokenizer loader says so
        for k, v in (_read_json_object(d / f, strict=False) or {}).items():
            v = v.get("content") if isinstance(v, dict) else v
            if k.endswith("_token") and isinstance(v, str):
                out[k] = v
    return out


def own_template(directory: str | os.PathLike) -> JinjaTemplate | ChatTemplate | None:
    """The checkpoint's own chat template: chat_template.jinja (which transformers prefers), else
    tokenizer_config.json's `chat_template`; None when it has neither."""
    d = Path(directory)
    variables = token_variables(d)
    if (d / "chat_template.jinja").is_file():
        return _template_file(d / "chat_template.jinja", variables)
    source = _pick_source(_read_json_object(d / "tokenizer_config.json").get("chat_template"),
                          d / "tokenizer_config.json")
    return template_from_source(source, f"{d / 'tokenizer_config.json'}:chat_template", variables) if source else None


def is_aquila_checkpoint(directory: str | os.PathLike | None, config=None) -> bool:
    """Recognisably an Aquila checkpoint: config.json names an Aquila template or architecture, it is in FlagAI's
    native layout, or the directory / config is called like an Aquila model."""
    names = [getattr(config, "name", None)]
    if directory is not None:
        d = Path(directory)
        raw = (_read_json_object(d / "config.json", strict=False) or {}) if d.is_dir() else {}
        if raw.get("tianying_chat_template") or "dim" in raw and "n_layers" in raw:
            return True
        names += [raw.get("model_type"), *(raw.get("architectures") or []), d.resolve().name]
    return any(isinstance(n, str) and n.lower().startswith("aquila") for n in names)


def checkpoint_template(directory: str | os.PathLike | None, config=None,
                        override: str | os.PathLike | Template | None = None) -> Template:
    """The template chat, serve, SFT and eval use for a checkpoint. In order:

    1. `override` (`--chat-template NAME|FILE`, `template=`);
    2. the Aquila template config.json names (`tianying_chat_template`);
    3. the checkpoint's own `chat_template`, unless the checkpoint is recognisably Aquila (FlagAI's templates
       are what those models were trained with; a third-party template added later does not win);
    4. the Aquila template FlagAI picks for the model name (`aquila-chat` for anything it does not know).
    """
    variables = token_variables(directory) if directory is not None and Path(directory).is_dir() else {}
    if override is not None:
        return get_template(override, variables)
    named = getattr(config, "chat_template", None)
    if config is None and directory is not None and Path(directory).is_dir():
        named = (_read_json_object(Path(directory) / "config.json", strict=False) or {}).get("tianying_chat_template")
    if named:
        return get_template(named)
    if directory is not None and Path(directory).is_dir() and not is_aquila_checkpoint(directory, config):
        own = own_template(directory)
        if own is not None:
            return own
    name = getattr(config, "name", None)
    if name in (None, "custom"):
        name = Path(directory).name if directory is not None else ""
    return TEMPLATES[template_for_model(name)]


def write_chat_template(directory: str | os.PathLike, template: str | Template) -> None:
    """Put `template` into the tokenizer_config.json in `directory` as `chat_template` (what transformers,
    vLLM and llama.cpp's converter read); a chat_template.jinja there is rewritten to match, as transformers
    prefers that file. Savers call this after copying the tokenizer files; without any, nothing is written."""
    d = Path(directory)
    t = get_template(template)
    source = t.source if isinstance(t, JinjaTemplate) else jinja_source(t.name)
    tokenizer_files = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "tokenizer.model")
    if not any((d / f).is_file() for f in tokenizer_files):
        return
    config = _read_json_object(d / "tokenizer_config.json", strict=False)
    if config is None:
        warnings.warn("the tokenizer_config.json being written is not a JSON object; no chat_template added to it",
                      stacklevel=2)
        return
    config["chat_template"] = source
    _write_text(d / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    if (d / "chat_template.jinja").is_file():
        _write_text(d / "chat_template.jinja", source)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- encoding
# Special-token strings inside message content (`</s>`, `[CLS]`, `<|im_start|>`) must be text, or a user can
# end a turn and forge the next one. `tokenizers` matches added tokens even with add_special_tokens=False, so
# the content is marked before rendering (as transformers' sanitize_control_tokens does, same markers) and the
# marked tokens are encoded as plain text; only what the template itself writes becomes a control token.
def _control_tokens(tokenizer) -> tuple[str, ...]:
    return tuple(getattr(tokenizer, "special_tokens", None) or ())


@lru_cache(maxsize=8)
def _patterns(tokens: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    alt = "|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)"
    return re.compile(alt), re.compile(f"{_MARK_START}({alt}){_MARK_END}|[{_MARK_START}{_MARK_END}]")


def mark_content(messages: list[Message], tokenizer) -> list[dict]:
    """`messages` with each control-token string in their values wrapped in markers (others' markers removed)."""
    control, _ = _patterns(_control_tokens(tokenizer))

    def mark(v):
        if isinstance(v, str):
            v = v.replace(_MARK_START, "").replace(_MARK_END, "")
            return control.sub(f"{_MARK_START}\\g<0>{_MARK_END}", v)
        if isinstance(v, dict):
            return {k: mark(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [mark(x) for x in v]
        return v

    return [mark(m) for m in messages]


def unmark(text: str) -> str:
    return text.replace(_MARK_START, "").replace(_MARK_END, "")


def encode_marked(tokenizer, text: str) -> list[int]:
    """Ids of a chat rendered from `mark_content` messages: marked tokens as plain text, the rest as usual
    (a lone marker, left by a template that cut a token apart, still separates the text around it)."""
    _, markers = _patterns(_control_tokens(tokenizer))
    pieces = markers.split(text)
    ids = list(tokenizer.encode(pieces[0])) if pieces[0] else []
    for i, piece in enumerate(pieces[1:], 1):
        if piece:
            ids += tokenizer.encode_plain(piece) if i % 2 else tokenizer.encode(piece)
    return ids


def encode_chat(tokenizer, messages: list[Message], template: str | Template = DEFAULT_TEMPLATE,
                add_generation_prompt: bool = True, suffix: str = "") -> list[int]:
    """Prompt ids for `messages` (+ `suffix` text): control tokens only where the template writes them.

    `tokenizer.decode(ids)` gives back `render_chat(messages, template, add_generation_prompt) + suffix`.
    """
    text = get_template(template).render(mark_content(list(messages), tokenizer), add_generation_prompt)
    return encode_marked(tokenizer, text + suffix)
