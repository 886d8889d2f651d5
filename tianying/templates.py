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
"""

from __future__ import annotations

from dataclasses import dataclass
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


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    """The template called `name` (a ChatTemplate passes through)."""
    if isinstance(name, ChatTemplate):
        return name
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        raise TemplateError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}") from None


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


def render_chat_segments(messages: list[Message], template: str | ChatTemplate = DEFAULT_TEMPLATE,
                         add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces, for SFT label masking.

    `trained` is True exactly for each assistant message's content plus the separator that ends it (the model
    must learn to produce both, the separator being how it stops). Concatenating the pieces gives
    `render_chat(messages, template, add_generation_prompt)`.
    """
    t = get_template(template)
    system, turns = _normalize(messages)
    if add_generation_prompt and turns[-1][0] != "user":
        raise TemplateError("the last message is from the assistant; pass add_generation_prompt=False to render "
                            "a finished conversation")
    out: list[tuple[str, bool]] = []
    head = t.render_system(system)
    for k, (role, content) in enumerate(turns):
        if role == "user":
            out.append((head + t.prefix(role) + content + t.separator(k), False))
            head = ""
        else:
            out.append((t.prefix(role), False))
            out.append((content + t.separator(k), True))
    if add_generation_prompt:
        out.append((t.generation_prompt(), False))
    return [(s, trained) for s, trained in out if s]


def render_chat(messages: list[Message], template: str | ChatTemplate = DEFAULT_TEMPLATE,
                add_generation_prompt: bool = True) -> str:
    """The prompt string for `messages` ([{"role": "system"|"user"|"assistant", "content": str}, ...]).

    With `add_generation_prompt` (the default) the conversation must end with a user turn and the open
    assistant role is appended, ready for the model to continue.
    """
    return "".join(s for s, _ in render_chat_segments(messages, template, add_generation_prompt))
