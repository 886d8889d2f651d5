"""tianying.compat.flagai and `--flagai-api` on a tiny random checkpoint laid out as FlagAI keeps them.

Expected prompts are written out by hand from FlagAI's conversation registry (seed-spec §4.1), greedy outputs
come from a plain forward loop over the model, and scripted outputs (a patched logits processor that makes the
engine emit chosen tokens) test the cuts FlagAI applies to the text.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import requests
import torch
from helpers import running  # noqa: E402, I001

import tianying.compat.flagai as flagai
import tianying.engine
from tianying.compat.flagai import AutoLoader, FlagAIError, Predictor
from tianying.config import Config
from tianying.errors import TianyingError
from tianying.model import build_model

FIXTURE_TOKENIZER = Path(__file__).parent / "data" / "tokenizer"
S = ("A chat between a curious human and an artificial intelligence assistant. "
     "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """./checkpoints/aquilachat2-7b (HF layout; FlagAI's download folder is the lower-cased model name) and
    ./checkpoints/aquilachat-7b (FlagAI's v1 native layout), the same random weights."""
    from tianying.checkpoint import save_flagai, save_hf
    from tianying.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(FIXTURE_TOKENIZER)
    cfg = Config.from_name("test-gqa").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                                eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                                                initializer_range=0.2, max_position_embeddings=256)
    root = tmp_path_factory.mktemp("checkpoints")
    model = build_model(cfg, seed=0)
    save_hf(model, cfg, root / "aquilachat2-7b", tokenizer_dir=FIXTURE_TOKENIZER)
    save_flagai(model, cfg, root / "aquilachat-7b", tokenizer_dir=FIXTURE_TOKENIZER)
    return root


@pytest.fixture(scope="module")
def loader(model_dir):
    return AutoLoader("aquila2", model_dir=str(model_dir), model_name="AquilaChat2-7B", lora_dir=None,
                      qlora_dir=None, all_devices=False, inference_mode=True)


@pytest.fixture
def captured(monkeypatch):
    """The (prompt ids, params) of each generation, still run for real."""
    calls = []
    real = flagai.run

    def spy(llm, ids, params):
        calls.append((list(ids), params))
        return real(llm, ids, params)

    monkeypatch.setattr(flagai, "run", spy)
    return calls


def script(monkeypatch, tok, text: str, then_eos: bool = True, delay: float = 0.0) -> list[int]:
    """Make the engine emit the plain-text tokens of `text` (then EOS), whatever the model's logits."""
    ids = tok.encode_plain(text) + ([tok.eos_id] if then_eos else [])

    def forced(logits, params, seen=None, n_generated=0):
        time.sleep(delay)
        out = torch.full_like(logits, float("-inf"))
        out[:, ids[min(n_generated, len(ids) - 1)]] = 0.0
        return out

    monkeypatch.setattr(tianying.engine, "process_logits", forced)
    return ids


@torch.no_grad()
def greedy(llm, ids: list[int], n: int, stops: set[int], ban_first: int | None = None) -> list[int]:
    """Argmax decoding by full forwards, no cache: the reference for temperature 0."""
    out = []
    for i in range(n):
        logits = llm.model(torch.tensor([ids + out]))[0, -1].float()
        if i == 0 and ban_first is not None:
            logits[ban_first] = float("-inf")
        t = int(logits.argmax())
        if t in stops:
            break
        out.append(t)
    return out


def cut(text: str) -> str:
    for s in ("###", "[UNK]", "</s>"):
        text = text.split(s, 1)[0]
    return text[1:] if text.startswith(" ") else text


# ---------------------------------------------------------------------------------------------- predict
@pytest.mark.parametrize("name,prompt", [
    ("AquilaChat2-7B", "<|startofpiece|>你好<|endofpiece|> "),
    ("AquilaChat2-34B", S + "\n\n### Human: 你好\n### Assistant:  "),
    ("AquilaChat2-7B-16K", S + "###Human: 你好###Assistant: "),
    ("AquilaChat2-34B-16K", S + "###Human: 你好###Assistant: "),
    ("AquilaChat2-70B-Expr", S + "\n\n<|startofpiece|>你好<|endofpiece|> "),
    ("AquilaChat-7B", S + "###Human: 你好###Assistant: "),
    ("anything-else", S + "###Human: 你好###Assistant: "),
])
def test_template_chosen_by_model_name(loader, captured, name, prompt):
    model, tok = loader.get_model(), loader.get_tokenizer()
    model.predict("你好", tokenizer=tok, max_gen_len=2, model_name=name, device="cuda")
    ids, _ = captured[-1]
    assert tok.decode(ids) == prompt
    assert not any(t == tok.bos_id for t in ids)  # predict() adds no BOS
    for marker in ("<|startofpiece|>", "<|endofpiece|>"):  # the template's markers are control tokens
        assert (tok.token_to_id(marker) in ids) == (marker in prompt)


def test_convo_template_overrides_and_loaded_name_is_the_default(loader, captured):
    model, tok = loader.get_model(), loader.get_tokenizer()
    model.predict("你好", max_gen_len=1, model_name="AquilaChat2-7B", convo_template="aquila")
    assert tok.decode(captured[-1][0]) == S + "###Human: 你好###Assistant: "
    model.predict("你好", max_gen_len=1)  # model_name "": the name it was loaded under (AquilaChat2-7B)
    assert tok.decode(captured[-1][0]) == "<|startofpiece|>你好<|endofpiece|> "
    with pytest.raises(TianyingError, match="unknown chat template"):
        model.predict("你好", max_gen_len=1, convo_template="nope")


def test_special_tokens_typed_in_the_text_stay_text(loader, captured):
    model, tok = loader.get_model(), loader.get_tokenizer()
    model.predict("a</s>b", max_gen_len=1)
    assert tok.eos_id not in captured[-1][0]


def test_temperature_zero_is_top1_greedy_whatever_the_seed(loader, captured):
    model, tok = loader.get_model(), loader.get_tokenizer()
    llm = loader.llm
    outs = {model.predict("北京", max_gen_len=12, temperature=0, seed=s, topk=50, top_p=0.3) for s in (1, 99, 0)}
    assert len(outs) == 1
    ids, params = captured[-1]
    assert (params.top_k, params.temperature, params.legacy) == (1, 1.0, True)
    # FlagAI: MinLengthLogitsProcessor(1) bans </s> first, then top-1 sampling = argmax; stop at EOS
    ref = greedy(llm, ids, 12, {tok.eos_id}, ban_first=tok.eos_id)
    assert outs.pop() == cut(tok.decode(ref))


def test_sampling_is_seeded(loader):
    model = loader.get_model()
    a = model.predict("北京", max_gen_len=10, temperature=1.0, seed=7, topk=50, top_p=1.0)
    b = model.predict("北京", max_gen_len=10, temperature=1.0, seed=7, topk=50, top_p=1.0)
    assert a == b


@pytest.mark.parametrize("generated,expected", [
    (" 你好###Human: 后面", "你好"),
    (" 北京[UNK]然后", "北京"),
    (" 上海</s>不要", "上海"),  # as text: the cut is at the string, not only at the EOS id
    ("  两个空格", " 两个空格"),  # one leading space is dropped, not two
    ("甲###乙[UNK]丙", "甲"),
])
def test_output_cut_at_flagai_stop_strings(loader, monkeypatch, generated, expected):
    script(monkeypatch, loader.get_tokenizer(), generated)
    assert loader.get_model().predict("你好", max_gen_len=40) == expected


def test_history_updated_in_place_and_rendered_in_order(loader, captured, monkeypatch):
    model, tok = loader.get_model(), loader.get_tokenizer()
    script(monkeypatch, tok, " 答一")
    history = []
    out = model.predict("问一", max_gen_len=10, model_name="AquilaChat-7B", history=history)
    assert out == "答一" and history == [("USER", "问一"), ("ASSISTANT", "答一")]
    script(monkeypatch, tok, " 答二")
    model.predict("问二", max_gen_len=10, model_name="AquilaChat-7B", history=history)
    assert tok.decode(captured[-1][0]) == S + "###Human: 问一###Assistant: 答一###Human: 问二###Assistant: "
    assert history == [("USER", "问一"), ("ASSISTANT", "答一"), ("USER", "问二"), ("ASSISTANT", "答二")]
    # too long for the budget: the oldest pair goes, the newest stays
    short = len(tok.encode(S + "###Human: 问二###Assistant: 答二###Human: 问三###Assistant: ")) + 1
    model.predict("问三", max_gen_len=10, model_name="AquilaChat-7B", history=history, max_token=short)
    assert tok.decode(captured[-1][0]) == S + "###Human: 问二###Assistant: 答二###Human: 问三###Assistant: "
    assert len(history) == 6
    with pytest.raises(FlagAIError, match="history"):
        model.predict("x", max_gen_len=1, history=["not a pair"])


def test_sft_false_is_the_raw_prompt(loader, captured):
    model, tok = loader.get_model(), loader.get_tokenizer()
    model.predict("北京是中国的", max_gen_len=2, sft=False)
    assert captured[-1][0] == tok.encode("北京是中国的")


def test_runs_on_cpu_when_the_script_asks_for_cuda(loader):
    model = loader.get_model()
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        assert model.eval().to("cuda:0") is model
    assert loader.llm.device.type == "cpu" and next(model.parameters()).device.type == "cpu"
    assert isinstance(model.predict("你好", max_gen_len=2, device="cuda"), str)


def test_v1_predictor_randomsample(model_dir, monkeypatch):
    loader = AutoLoader("lm", model_name="aquilachat-7b", model_dir=str(model_dir), use_cache=True, fp16=True)
    assert (model_dir / "aquilachat-7b" / "pytorch_model.bin").is_file()
    model, tok = loader.get_model(), loader.get_tokenizer()
    predictor = Predictor(model, tok)
    text = "北京是中国的"
    out = predictor.predict_generate_randomsample(text, out_max_length=10, top_k=30, top_p=1.0, temperature=0,
                                                  repetition_penalty=1.0)
    # v1 aquila_generate: raw text, no BOS, argmax at temperature 0 (no first-token ban), stop at </s> or unk
    ref = greedy(loader.llm, tok.encode(text), 10, {tok.eos_id, tok.unk_id})
    assert out == tok.decode(ref)
    a = predictor.predict_generate_randomsample(text, out_max_length=8, seed=3)
    assert a == predictor.predict_generate_randomsample(text, out_max_length=8, seed=3)
    script(monkeypatch, tok, "一二", then_eos=False)
    monkeypatch.setattr(tok, "unk_id", tok.encode_plain("二")[0])
    assert predictor.predict_generate_randomsample(text, out_max_length=5) == "一"  # the unk id stops it


def test_autoloader_errors(model_dir):
    with pytest.raises(FlagAIError, match="task_name"):
        AutoLoader("glm", model_name="AquilaChat2-7B", model_dir=str(model_dir))
    with pytest.raises(FlagAIError, match="never downloads"):
        AutoLoader("aquila2", model_name="AquilaChat2-34B", model_dir=str(model_dir))
    with pytest.raises(FlagAIError, match="not both"):
        AutoLoader("aquila2", model_name="AquilaChat2-7B", model_dir=str(model_dir), lora_dir="a", qlora_dir="b")


def test_autoloader_lora_dir_matches_peft(model_dir, tmp_path):
    import peft  # the reference (dev dependency)
    from transformers import LlamaForCausalLM

    from tianying.checkpoint import load_model
    from tianying.lora import LoRAConfig, add_lora, lora_layers, save_adapter
    from tianying.nf4 import NF4_DEFAULT_MODULES, NF4Linear, dequantize_nf4, quantize_nf4

    base, _ = load_model(model_dir / "aquilachat2-7b")
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    add_lora(base, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(base).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.3)
    adapter = save_adapter(base, cfg, tmp_path / "adapter")

    ids = torch.tensor([[5, 17, 99, 300, 42, 8]])
    hf = LlamaForCausalLM.from_pretrained(model_dir / "aquilachat2-7b").float().eval()
    with torch.no_grad():
        plain = hf(input_ids=ids).logits
        want = peft.PeftModel.from_pretrained(hf, adapter).eval()(input_ids=ids).logits
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter changes something

    loader = AutoLoader("aquila2", model_dir=str(model_dir), model_name="AquilaChat2-7B", lora_dir=str(adapter))
    with torch.no_grad():
        got = loader.get_model().llm.model(ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert isinstance(loader.get_model().predict("你好", max_gen_len=3), str)

    q = AutoLoader("aquila2", model_dir=str(model_dir), model_name="AquilaChat2-7B", qlora_dir=str(adapter))
    wrapped = lora_layers(q.llm.model)
    assert len(wrapped) == len(lora_layers(base)) and all(isinstance(m.base_layer, NF4Linear)
                                                          for m in wrapped.values())
    # reference: peft over the transformers model whose projections hold their NF4 round trip
    hf = LlamaForCausalLM.from_pretrained(model_dir / "aquilachat2-7b").float().eval()
    with torch.no_grad():
        for name, m in hf.named_modules():
            if name.rsplit(".", 1)[-1] in NF4_DEFAULT_MODULES:
                m.weight.copy_(dequantize_nf4(quantize_nf4(m.weight)))
        want4 = peft.PeftModel.from_pretrained(hf, adapter).eval()(input_ids=ids).logits
        got4 = q.llm.model(ids)
    assert not torch.allclose(want4, want, atol=1e-2)  # the base really is 4-bit
    torch.testing.assert_close(got4, want4, atol=5e-4, rtol=1e-4)
    assert isinstance(q.get_model().predict("你好", max_gen_len=3), str)


# ---------------------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def app(loader):
    from tianying.serve.app import create_app
    from tianying.serve.flagai_api import add_flagai_routes

    app = create_app(loader.llm)
    add_flagai_routes(app, loader.llm)
    return app


@pytest.fixture(scope="module")
def server(app):
    with running(app) as url:
        yield url


def post(url: str, raw: dict, stream: bool = False) -> requests.Response:
    """FlagAI's post_request.py: the body is json.dumps(raw), sent as JSON (a JSON string holding JSON)."""
    return requests.post(url, json=json.dumps(raw), stream=stream, timeout=60)


def test_func_as_flagai_client_sends_it(server, loader, monkeypatch):
    tok = loader.get_tokenizer()
    ids = script(monkeypatch, tok, " 你好啊###后面不要")
    raw = {"prompt": "你好", "top_k_per_token": 100, "sft": True, "max_new_tokens": 20,
           "history": [["USER", "早"], ["ASSISTANT", "早上好"]]}
    r = post(server + "/func", raw)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"completions", "input_length", "model_info"}
    c = body["completions"][0]
    assert set(c) == {"text", "tokens", "logprobs", "top_logprobs_dicts", "model_in"}
    assert c["text"] == "你好啊"
    assert c["model_in"] == S + "###Human: 早###Assistant: 早上好###Human: 你好###Assistant: "
    assert body["input_length"] == 2 and body["model_info"] == "aquilachat2-7b"
    # the tokens that make "你好啊" (the leading space is a token of its own here only if the tokenizer says so)
    n = len(tok.encode_plain(" 你好啊"))
    skip = int(tok.decode(ids[:1]) == " ")
    assert c["tokens"] == [tok.id_to_token(t) for t in ids[skip:n]]
    # FlagAI's "logprobs" are probabilities; ours are the model's, checked by a plain forward
    prompt = tok.encode(c["model_in"])
    with torch.no_grad():
        lp = loader.llm.model(torch.tensor([prompt + ids[:n]]))[0].float().log_softmax(-1)
    want = [math.exp(lp[len(prompt) - 1 + i, ids[i]]) for i in range(skip, n)]
    assert c["logprobs"] == pytest.approx(want, rel=1e-3, abs=1e-6)
    assert c["top_logprobs_dicts"] == [{k: v} for k, v in zip(c["tokens"], c["logprobs"])]


def test_func_takes_a_plain_object_and_sft_false_raw_prompt(server, loader, monkeypatch):
    tok = loader.get_tokenizer()
    script(monkeypatch, tok, "好")
    r = requests.post(server + "/func", json={"prompt": "北京\n\n\n是", "sft": False, "max_new_tokens": 4},
                      timeout=60)
    assert r.status_code == 200, r.text
    c = r.json()["completions"][0]
    assert c["model_in"] == "[CLS]北京\n是"  # FlagAI: BOS + raw prompt with runs of newlines collapsed
    assert c["text"] == "好"


@pytest.mark.parametrize("body,param", [
    ("not json", None),
    (json.dumps("[1, 2]"), None),
    (json.dumps(json.dumps({"top_p": 0.5})), "prompt"),
    (json.dumps(json.dumps({"prompt": "x", "top_p": 2})), "top_p"),
    (json.dumps(json.dumps({"prompt": "x", "max_new_tokens": "9"})), "max_new_tokens"),
    (json.dumps(json.dumps({"prompt": "x", "sft": "yes"})), "sft"),
    (json.dumps(json.dumps({"prompt": "x", "history": {"a": 1}})), "history"),
    (json.dumps(json.dumps({"prompt": "x", "history": [["USER"]]})), None),
    (json.dumps(json.dumps({"prompt": "x", "max_new_tokens": 10_000})), "max_new_tokens"),
])
def test_bad_input_is_one_json_error(server, body, param):
    for route in ("/func", "/stream_func"):
        r = requests.post(server + route, data=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["message"] and "Traceback" not in err["message"]
        if param:
            assert err["param"] == param


def test_stream_func_text_plain_in_pieces(server, loader, monkeypatch):
    tok = loader.get_tokenizer()
    script(monkeypatch, tok, "一二三四五六七八九十甲乙丙丁戊己庚辛壬癸子丑###不要", then_eos=False)
    r = post(server + "/stream_func", {"prompt": "数数", "max_new_tokens": 60}, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    chunks = [c for c in r.iter_content(chunk_size=None) if c]
    text = b"".join(chunks).decode()
    assert text == "一二三四五六七八九十甲乙丙丁戊己庚辛壬癸子丑"  # ends where "###" comes
    assert all(len(c.decode()) >= 10 for c in chunks[:-1])
    # at max_new_tokens the short tail still comes (FlagAI dropped it)
    script(monkeypatch, tok, "一二三", then_eos=False)
    r = post(server + "/stream_func", {"prompt": "数数", "max_new_tokens": len(tok.encode_plain("一二三"))})
    assert r.text == "一二三"


def test_stream_func_client_gone_frees_the_engine(server, app, loader, monkeypatch):
    tok = loader.get_tokenizer()
    script(monkeypatch, tok, "一二三四五六七八九十" * 30, then_eos=False, delay=0.05)  # 150 tokens: 7.5 s
    engine = app.state.engine
    before = engine.stats()["cancelled"]
    with post(server + "/stream_func", {"prompt": "数数", "max_new_tokens": 150}, stream=True) as r:
        assert r.status_code == 200 and next(r.iter_content(chunk_size=None))
    deadline = time.time() + 3
    while engine.stats()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert engine.stats()["running"] == 0 and engine.stats()["cancelled"] == before + 1


def test_cli_flag_registers_the_routes(monkeypatch, model_dir):
    import tianying.cli.serve as cli

    seen = {}
    monkeypatch.setattr("tianying.serve.flagai_api.add_flagai_routes",
                        lambda app, llm, **kw: seen.update(app=app, **kw))

    class Stop(Exception):
        pass

    def no_server(*a, **k):
        raise Stop

    monkeypatch.setattr("uvicorn.Server", no_server)
    import argparse

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve", str(model_dir / "aquilachat2-7b"), "--flagai-api", "--api-key", "k"])
    with pytest.raises(Stop):
        cli.run(args)
    assert seen["api_key"] == "k" and seen["app"] is not None
