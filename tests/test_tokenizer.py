"""Tokenizer: encode against two independent GPT-2 BPE references, round trips, streaming, special ids, files.

References (no download): transformers' `GPT2Tokenizer` built from the fixture's vocab.json/merges.txt (in
transformers 5 it wraps a `tokenizers` BPE, so it checks our wiring: regex, prefix space, added tokens), and
transformers' pure-Python GPT-2 BPE (the CLVP tokenizer's `bpe()`, the original GPT-2 algorithm, with its
English normaliser switched off), which shares no code with `tokenizers` and so checks the BPE itself.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tianying.tokenizer import AQUILA_SPECIALS, BYTE_ENCODER, Tokenizer, TokenizerError, train_bpe

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "tokenizer"
DEMO = Path(__file__).parents[1] / "tianying" / "assets" / "demo-tokenizer"
TINY_TEXTS = [json.loads(line)["text"] for line in (DATA / "tiny.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(FIXTURE)


def _with_aquila_specials(t):
    """Add the 8 specials in Aquila's order (so they get base+0..7), then name BOS/EOS/UNK/PAD."""
    t.add_special_tokens({"additional_special_tokens": list(AQUILA_SPECIALS)})
    t.add_special_tokens({"bos_token": "[CLS]", "eos_token": "</s>", "unk_token": "<|endoftext|>",
                          "pad_token": "<|endoftext|>"})
    return t


@pytest.fixture(scope="module")
def hf_gpt2():
    from transformers import GPT2Tokenizer

    return _with_aquila_specials(GPT2Tokenizer(vocab=str(FIXTURE / "vocab.json"), merges=str(FIXTURE / "merges.txt"),
                                               add_prefix_space=False))


@pytest.fixture(scope="module")
def py_gpt2():
    from transformers.models.clvp.tokenization_clvp import ClvpTokenizer

    class PlainGPT2(ClvpTokenizer):
        normalizer = property(lambda self: lambda text: text)  # CLVP lower-cases and spells numbers; GPT-2 doesn't

    return _with_aquila_specials(PlainGPT2(str(FIXTURE / "vocab.json"), str(FIXTURE / "merges.txt"),
                                           unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                                           eos_token="<|endoftext|>", pad_token="<|endoftext|>"))


# ---------------------------------------------------------------------------------------------- special ids
@pytest.mark.parametrize("path,base", [(FIXTURE, 3000), (DEMO, 15992)])
def test_layout_and_special_ids(path, base):
    t = Tokenizer.from_dir(path)
    assert t.vocab_size == base + 8
    assert t.base_vocab_size == base
    assert [t.token_to_id(s) for s in AQUILA_SPECIALS] == list(range(base, base + 8))
    assert (t.bos_id, t.eos_id, t.unk_id, t.pad_id) == (base + 6, base + 7, 0, 0)
    assert t.id_to_token(0) == "<|endoftext|>"
    assert [t.id_to_token(i) for i in range(1, 257)] == list(BYTE_ENCODER.values())
    assert t.special_tokens == {"<|endoftext|>": 0, **{s: base + k for k, s in enumerate(AQUILA_SPECIALS)}}
    # byte symbols sit where the real vocab has them (seed-spec §3.5: "A" -> 33, "B" -> 34, "\n" -> 199)
    assert (t.encode("A"), t.encode("B"), t.encode("\n"), t.encode(" ")) == ([33], [34], [199], [221])


def test_demo_tokenizer_matches_demo_config_vocab():
    from tianying.config import Config

    assert Tokenizer.from_dir(DEMO).vocab_size == Config.from_name("demo").vocab_size


def test_bos_eos_only_when_asked(tok):
    plain = tok.encode("Hello")
    assert tok.encode("Hello", bos=True) == [tok.bos_id, *plain]
    assert tok.encode("Hello", eos=True) == [*plain, tok.eos_id]
    assert tok.bos_id not in plain and tok.eos_id not in plain


def test_special_token_text_is_one_token(tok):
    ids = tok.encode("a[CLS]b</s> <|startofpiece|>x<|endoftext|>")
    assert tok.bos_id in ids and tok.eos_id in ids and 0 in ids and tok.token_to_id("<|startofpiece|>") in ids
    assert len(ids) == 8  # a [CLS] b </s> Ġ <|startofpiece|> x <|endoftext|>


def test_decode_skip_special_tokens(tok):
    ids = tok.encode("你好", bos=True, eos=True) + [tok.pad_id]
    assert tok.decode(ids) == "[CLS]你好</s><|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=True) == "你好"
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([tok.vocab_size])


# ---------------------------------------------------------------------------------------------- references
def test_encode_matches_references_on_tiny_corpus(tok, hf_gpt2, py_gpt2):
    assert len(TINY_TEXTS) > 200
    for text in TINY_TEXTS:
        ours = tok.encode(text)
        assert ours == hf_gpt2.encode(text, add_special_tokens=False)
        assert ours == py_gpt2.encode(text, add_special_tokens=False)
        assert tok.decode(ours) == text


_CJK = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
_EMOJI = st.sampled_from(["😀", "🇨🇳", "👍🏽", "👨‍👩‍👧", "🎉", "❤️", "𝔘", "𠀀"])
_PIECES = st.sampled_from(["[CLS]", "</s>", "<|endoftext|>", "<|startofpiece|>", "[gMASK]", "[CLS", "</", "'s", "'ll",
                           "def f(x):\n    return x\n", "\t", "  ", "\n\n", " \n ", "\r\n", "\u00a0", "\u3000",
                           "，", "。", "？", "1234", "x = {'a': [1, 2]}", "Hello", " world", "ÿ", "\x00"])
TEXTS = st.lists(st.one_of(_PIECES, st.text(_CJK, max_size=6), st.lists(_EMOJI, max_size=3).map("".join),
                           st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8),
                           st.text(st.sampled_from(" \t\n"), min_size=1, max_size=5)),
                 max_size=12).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TEXTS)
def test_encode_matches_references_generated(tok, hf_gpt2, py_gpt2, text):
    ours = tok.encode(text)
    assert ours == hf_gpt2.encode(text, add_special_tokens=False)
    assert ours == py_gpt2.encode(text, add_special_tokens=False)
    assert tok.decode(ours) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TEXTS)
def test_stream_decoder_equals_decode(tok, text):
    ids = tok.encode(text, bos=True, eos=True)
    dec = tok.stream_decoder()
    pieces = [dec.add(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces) or "\ufffd" in text


def test_stream_decoder_holds_back_partial_characters(tok):
    text = "天鹰模型🦅很好用😀，谢谢！𠀀"
    ids = tok.encode(text)
    # precondition that makes this test meaningful: some tokens are pieces of a character
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    dec = tok.stream_decoder()
    pieces = [dec.add(i) for i in ids]
    assert "" in pieces and not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + dec.flush() == text
    # a cut character is flushed as U+FFFD (what decode() gives), never dropped silently
    head = tok.encode("🦅")
    dec = tok.stream_decoder()
    assert [dec.add(i) for i in head[:-1]] == [""] * (len(head) - 1)
    assert dec.flush() == tok.decode(head[:-1]) == "\ufffd"


def test_stream_decoder_skip_special_tokens(tok):
    ids = tok.encode("你好", bos=True, eos=True)
    dec = tok.stream_decoder(skip_special_tokens=True)
    assert "".join(dec.add(i) for i in ids) + dec.flush() == "你好"


# ---------------------------------------------------------------------------------------------- files
def _copy(tmp_path: Path, names: list[str]) -> Path:
    d = tmp_path / "tk"
    d.mkdir()
    for n in names:
        shutil.copy(FIXTURE / n, d / n)
    return d


def test_missing_special_files_warn_and_use_aquila_ids(tmp_path):
    d = _copy(tmp_path, ["vocab.json", "merges.txt"])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        t = Tokenizer.from_dir(d)
    messages = [str(w.message) for w in rec]
    assert any("appending the 8 standard Aquila special tokens" in m for m in messages)
    assert any("no special_tokens_map.json" in m and "bos=[CLS]" in m for m in messages)
    assert t.vocab_size == 3008
    assert (t.bos_id, t.eos_id, t.unk_id, t.pad_id) == (3006, 3007, 0, 0)  # never FlagAI's bos=eos=0
    assert t.encode("x</s>") == [88, 3007]


def test_tokenizer_config_alone_does_not_make_bos_zero(tmp_path):
    """HF Aquila2's tokenizer_config.json says bos/eos <|endoftext|>; without special_tokens_map.json that is 0."""
    d = _copy(tmp_path, ["vocab.json", "merges.txt", "added_tokens.json"])
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}))
    with pytest.warns(UserWarning, match="unk token"):
        t = Tokenizer.from_dir(d)
    assert (t.bos_id, t.eos_id) == (3006, 3007)


def test_v1_modelhub_cls_sep_map_is_read_without_warning(tmp_path):
    d = _copy(tmp_path, ["vocab.json", "merges.txt", "added_tokens.json"])
    (d / "special_tokens_map.json").write_text(json.dumps({"cls_token": "[CLS]", "sep_token": "</s>"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = Tokenizer.from_dir(d)
    assert (t.bos_id, t.eos_id, t.unk_id) == (3006, 3007, 0)


def test_vocab_merges_path_equals_tokenizer_json_path(tmp_path, tok):
    d = _copy(tmp_path, ["vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"])
    t = Tokenizer.from_dir(d)
    for text in TINY_TEXTS[::10]:
        assert t.encode(text) == tok.encode(text)
    assert t.special_tokens == tok.special_tokens


def test_corrupt_tokenizer_json_is_a_one_line_error(tmp_path):
    d = _copy(tmp_path, ["vocab.json", "merges.txt", "tokenizer.json"])
    raw = (d / "tokenizer.json").read_bytes()
    (d / "tokenizer.json").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TokenizerError, match="tokenizer.json") as e:
        Tokenizer.from_dir(d)
    assert "EOF while parsing" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["no-dir", "no-merges", "bad-vocab", "bad-merges", "gap-in-added-ids"])
def test_bad_files_raise_tokenizer_error(tmp_path, case):
    d = _copy(tmp_path, ["vocab.json", "merges.txt"])
    if case == "no-dir":
        d = tmp_path / "missing"
    elif case == "no-merges":
        (d / "merges.txt").unlink()
    elif case == "bad-vocab":
        (d / "vocab.json").write_text('{"a": 0,')
    elif case == "bad-merges":
        (d / "merges.txt").write_text("#version: 0.2\na b c\n")
    else:
        (d / "added_tokens.json").write_text(json.dumps({"[CLS]": 3010}))
    with pytest.raises(TokenizerError):
        Tokenizer.from_dir(d)


def test_save_round_trip_and_transformers_autotokenizer(tmp_path, tok):
    from transformers import AutoTokenizer, GPT2Tokenizer

    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"vocab.json", "merges.txt", "tokenizer.json",
                                                    "special_tokens_map.json", "added_tokens.json",
                                                    "tokenizer_config.json"}
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"
    again = Tokenizer.from_dir(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    gpt2 = GPT2Tokenizer.from_pretrained(tmp_path)
    for ref in (hf, gpt2):
        assert (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, len(ref)) == (3006, 3007, 0, 3008)
    for text in TINY_TEXTS[::7] + ["[CLS]你好</s> x"]:
        ids = tok.encode(text)
        assert again.encode(text) == ids
        assert hf.encode(text) == gpt2.encode(text) == ids  # no BOS/EOS added by default, as in HF Aquila2
        assert hf.decode(ids) == text


# ---------------------------------------------------------------------------------------------- training
def test_train_bpe_reproduces_committed_fixture(tmp_path):
    """The fixture is what tests/data/make_tokenizer.py writes: training is deterministic."""
    t = train_bpe([DATA / "tiny.jsonl"], 3008, tmp_path)
    assert t.vocab_size == 3008
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_text(encoding="utf-8") == (FIXTURE / name).read_text(encoding="utf-8"), name


def test_train_bpe_plain_text_and_layout(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("\n".join(TINY_TEXTS[:40]), encoding="utf-8")
    t = train_bpe([src], 600, tmp_path / "out")
    assert t.vocab_size == 600 and (t.bos_id, t.eos_id) == (598, 599)
    assert Tokenizer.from_dir(tmp_path / "out").encode(TINY_TEXTS[0]) == t.encode(TINY_TEXTS[0])
    vocab = json.loads((tmp_path / "out" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 592 and sorted(vocab.values()) == list(range(592))
    merges = (tmp_path / "out" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) - 1 == 592 - 257


def test_train_bpe_errors(tmp_path):
    with pytest.raises(TokenizerError, match="too small"):
        train_bpe([DATA / "tiny.jsonl"], 100, tmp_path / "a")
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"text": "hello hello"}) + "\n")
    with pytest.raises(TokenizerError, match="training text is too small"):
        train_bpe([small], 5000, tmp_path / "b")
    with pytest.raises(TokenizerError, match="no such file"):
        train_bpe([tmp_path / "nope.jsonl"], 1000, tmp_path / "c")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    with pytest.raises(TokenizerError, match="text"):
        train_bpe([bad], 1000, tmp_path / "d")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_train_and_stats(tmp_path, capsys, monkeypatch):
    import tianying.cli as cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["tokenizer", "train", "--input", str(DATA / "tiny.jsonl"), "--vocab-size", "800",
                     "--output", "tk"]) == 0
    assert Tokenizer.from_dir(tmp_path / "tk").vocab_size == 800
    capsys.readouterr()
    assert cli.main(["tokenizer", "stats", "--tokenizer", "tk", "--compare", str(FIXTURE), "--input",
                     str(DATA / "tiny.jsonl"), "--json", "stats.json"]) == 0
    out = capsys.readouterr().out
    table, last = out.rsplit("\n", 2)[0], out.strip().splitlines()[-1]
    assert "en tok/doc" in table and "zh tok/doc" in table and "code tok/doc" in table
    result = json.loads(last)
    assert result == json.loads((tmp_path / "stats.json").read_text(encoding="utf-8"))
    small, big = result["results"]
    assert (small["vocab_size"], big["vocab_size"]) == (800, 3008)
    assert set(small["tokens_per_doc"]) == {"en", "zh", "code"}
    # a bigger vocabulary compresses the text it was trained on better
    assert big["bytes_per_token"]["all"] > small["bytes_per_token"]["all"] > 1.0
    assert cli.main(["tokenizer", "stats", "--tokenizer", "tk", "--input", str(DATA / "tiny.jsonl"),
                     "--max-docs", "5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"][0]["documents"] == {
        "zh": 5, "en": 5, "code": 5}
    fixture = Tokenizer.from_dir(FIXTURE)
    en = [t for t, line in zip(TINY_TEXTS, (DATA / "tiny.jsonl").read_text().splitlines())
          if json.loads(line)["lang"] == "en"]
    assert big["tokens_per_doc"]["en"] == round(sum(len(fixture.encode(t)) for t in en) / len(en), 2)


def test_cli_errors_are_one_line(tmp_path, capsys):
    import tianying.cli as cli

    assert cli.main(["tokenizer", "stats", "--tokenizer", str(tmp_path / "none"), "--input",
                     str(DATA / "tiny.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tianying tokenizer: error:") and "no such directory" in err[-1]
