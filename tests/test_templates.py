"""Chat templates: exact strings from chat-templates.md / seed-spec §4.1, segments for SFT masking, errors."""

from __future__ import annotations

import pytest

from tianying.errors import TianyingError
from tianying.templates import (
    DEFAULT_SYSTEM,
    TEMPLATES,
    get_template,
    render_chat,
    render_chat_segments,
    template_for_model,
)

S = DEFAULT_SYSTEM
BILINGUAL = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi!"},
             {"role": "user", "content": "How are you?"}]
ENGLISH = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi!"},
           {"role": "user", "content": "How are you?"}]

# chat-templates.md "Worked examples" (⏎ written as \n)
EXPECTED_BILINGUAL = {
    "aquila-chat": f"{S}###Human: 你好###Assistant: Hi!###Human: How are you?###Assistant:",
    "aquila": f"{S}###Human: 你好###Assistant: Hi!</s>Human: How are you?###Assistant:",
    "aquila-v1": "<|startofpiece|>你好<|endofpiece|>Hi!</s><|startofpiece|>How are you?<|endofpiece|>",
    "aquila-legacy": f"{S}\n\n### Human: 你好\n### Assistant: Hi!</s>### Human: How are you?\n### Assistant: ",
    "aquila-v2": f"{S}\n\n<|startofpiece|>你好<|endofpiece|>Hi!</s><|startofpiece|>How are you?<|endofpiece|>",
}
# seed-spec §4.1 "Rendered example"
EXPECTED_ENGLISH = {
    "aquila-chat": f"{S}###Human: Hello!###Assistant: Hi!###Human: How are you?###Assistant:",
    "aquila": f"{S}###Human: Hello!###Assistant: Hi!</s>Human: How are you?###Assistant:",
    "aquila-legacy": f"{S}\n\n### Human: Hello!\n### Assistant: Hi!</s>### Human: How are you?\n### Assistant: ",
    "aquila-v1": "<|startofpiece|>Hello!<|endofpiece|>Hi!</s><|startofpiece|>How are you?<|endofpiece|>",
    "aquila-v2": f"{S}\n\n<|startofpiece|>Hello!<|endofpiece|>Hi!</s><|startofpiece|>How are you?<|endofpiece|>",
}


def test_system_prompt_is_the_spec_text():
    assert len(S) == 156  # seed-spec §3.5: "the 156-character system prompt S"
    assert S.startswith("A chat between a curious human") and S.endswith("the human's questions.")


def test_five_templates():
    assert set(TEMPLATES) == {"aquila-chat", "aquila", "aquila-v1", "aquila-legacy", "aquila-v2"}


@pytest.mark.parametrize("name", sorted(EXPECTED_BILINGUAL))
def test_bilingual_worked_example(name):
    assert render_chat(BILINGUAL, name) == EXPECTED_BILINGUAL[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_ENGLISH))
def test_spec_english_example(name):
    assert render_chat(ENGLISH, template=get_template(name)) == EXPECTED_ENGLISH[name]


def test_default_template_is_aquila_chat():
    assert render_chat(BILINGUAL) == EXPECTED_BILINGUAL["aquila-chat"]
    assert render_chat([{"role": "user", "content": "北京的十大景点是什么?"}]) == \
        f"{S}###Human: 北京的十大景点是什么?###Assistant:"


@pytest.mark.parametrize("name,stops", [
    ("aquila-chat", ("###", "</s>", "[UNK]")),
    ("aquila", ("</s>", "[UNK]")),
    ("aquila-v1", ("</s>", "<|endoftext|>")),
    ("aquila-legacy", ("</s>", "[UNK]")),
    ("aquila-v2", ("</s>", "<|endoftext|>", "<|startofpiece|>", "<|endofpiece|>")),
])
def test_stop_strings(name, stops):
    assert TEMPLATES[name].stop_strings == stops


@pytest.mark.parametrize("name,expected", [
    ("aquila-chat", "Be brief.###Human: 你好###Assistant:"),
    ("aquila", "Be brief.###Human: 你好###Assistant:"),
    ("aquila-legacy", "Be brief.\n\n### Human: 你好\n### Assistant: "),
    ("aquila-v2", "Be brief.\n\n<|startofpiece|>你好<|endofpiece|>"),
    ("aquila-v1", "Be brief.\n\n<|startofpiece|>你好<|endofpiece|>"),
])
def test_system_message_replaces_template_system(name, expected):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    assert render_chat(msgs, name) == expected
    assert S not in render_chat(msgs, name)


def test_empty_system_message_removes_system_text():
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]
    assert render_chat(msgs, "aquila-chat") == "Human: hi###Assistant:"


def test_finished_conversation_without_generation_prompt():
    msgs = BILINGUAL + [{"role": "assistant", "content": "Fine."}]
    assert render_chat(msgs, "aquila", add_generation_prompt=False) == \
        f"{S}###Human: 你好###Assistant: Hi!</s>Human: How are you?###Assistant: Fine.</s>"
    assert render_chat(msgs, "aquila-legacy", add_generation_prompt=False).endswith("### Assistant: Fine.</s>")


def test_sft_from_value_form_is_accepted():
    msgs = [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "Hi!"},
            {"from": "human", "value": "How are you?"}]
    assert render_chat(msgs, "aquila-v1") == EXPECTED_BILINGUAL["aquila-v1"]


# ---------------------------------------------------------------------------------------------- segments
@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_segments_concatenate_and_mark_assistant_content_and_separator(name, system):
    t = TEMPLATES[name]
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + BILINGUAL + [
        {"role": "assistant", "content": "Fine, 谢谢."}]
    segs = render_chat_segments(msgs, name)
    assert "".join(s for s, _ in segs) == render_chat(msgs, name, add_generation_prompt=False)
    trained = [s for s, flag in segs if flag]
    sep2 = t.sep if t.style == "colon-single" else t.sep2
    assert trained == ["Hi!" + sep2, "Fine, 谢谢." + sep2]
    # with the generation prompt, the open role is an untrained last piece
    open_segs = render_chat_segments(msgs[:-1], name, add_generation_prompt=True)
    assert "".join(s for s, _ in open_segs) == render_chat(msgs[:-1], name)
    assert open_segs[-1] == (t.generation_prompt(), False)


def test_segments_example_aquila_v1():
    msgs = BILINGUAL + [{"role": "assistant", "content": "Good."}]
    assert render_chat_segments(msgs, "aquila-v1") == [
        ("<|startofpiece|>你好", False), ("<|endofpiece|>", False), ("Hi!</s>", True),
        ("<|startofpiece|>How are you?", False), ("<|endofpiece|>", False), ("Good.</s>", True)]


# ---------------------------------------------------------------------------------------------- model map
@pytest.mark.parametrize("model,name", [
    ("AquilaChat2-7B", "aquila-v1"), ("AquilaChat2-34B", "aquila-legacy"), ("AquilaChat2-70B-Expr", "aquila-v2"),
    ("AquilaChat2-7B-16K", "aquila"), ("AquilaChat2-34B-16K", "aquila"), ("AquilaChat-7B", "aquila-chat"),
    ("Aquila2-7B", "aquila-chat"), ("something-else", "aquila-chat"),
    ("aquilachat2-7b", "aquila-v1"), ("aquilachat2-34b-16k", "aquila"), ("BAAI/AquilaChat2-34B", "aquila-legacy"),
    ("/models/AquilaChat2-70B-Expr/", "aquila-v2"),
])
def test_template_for_model(model, name):
    assert template_for_model(model) == name


def test_config_chat_templates_exist():
    from tianying.config import Config

    for cfg_name in ("aquilachat-7b", "aquilachat2-7b", "aquilachat2-34b", "aquilachat2-7b-16k",
                     "aquilachat2-34b-16k", "aquilachat2-70b-expr"):
        cfg = Config.from_name(cfg_name)
        assert cfg.chat_template in TEMPLATES
        if cfg_name != "aquilachat-7b":
            assert template_for_model(cfg_name) == cfg.chat_template


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_template_lists_known_ones():
    with pytest.raises(TianyingError, match="unknown chat template 'vicuna'.*aquila-chat.*aquila-v2"):
        get_template("vicuna")
    with pytest.raises(TianyingError, match="known:"):
        render_chat(BILINGUAL, "llama-2")


@pytest.mark.parametrize("msgs,match", [
    ([], "no user message"),
    ([{"role": "system", "content": "x"}], "no user message"),
    ([{"role": "assistant", "content": "hi"}], "message 0 is from the assistant but the user was expected"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 is from the user"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first message"),
    ([{"role": "bot", "content": "a"}], "role 'bot'"),
    ([{"role": "user", "content": None}], "no string 'content'"),
    (["hello"], "message 0 is a str"),
    ("hello", "list of"),
])
def test_malformed_conversations(msgs, match):
    with pytest.raises(TianyingError, match=match):
        render_chat(msgs, "aquila")


def test_generation_prompt_after_assistant_is_an_error():
    msgs = BILINGUAL[:2]
    with pytest.raises(TianyingError, match="add_generation_prompt=False"):
        render_chat(msgs, "aquila")
    assert render_chat(msgs, "aquila", add_generation_prompt=False).endswith("Hi!</s>")
