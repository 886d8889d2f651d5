"""Evaluation harness: prompt formats, scoring numerics, metrics, task kinds, and the `tianying eval` verb."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from tianying.config import Config
from tianying.eval import harness, sandbox
from tianying.eval.harness import EvalError, EvalLM, evaluate, load_jsonl, load_task
from tianying.eval.metrics import last_number, normalize_number, pass_at_k
from tianying.eval.scoring import naive_loglikelihood, rolling_nll, score_continuations, score_requests
from tianying.model import build_model

SAMPLE = Path(__file__).parent / "data" / "eval"
# HumanEval refuses to run code unisolated; where this machine has no bwrap/unshare, score it without (opt-in)
UNSAFE = not any(sandbox.probe(b) is None for b in sandbox.BACKENDS)
FIXTURE_TOKENIZER = Path(__file__).parent / "data" / "tokenizer"


class ByteTok:
    """Stand-in tokenizer: one token per UTF-8 byte (id = byte + 3), so letters are single tokens."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", "replace")


class MockLM(nn.Module):
    """Fixed logits: zeros (uniform over the vocabulary) plus `bonus` on `prefer` at every position."""

    def __init__(self, vocab: int = 512, prefer: int | None = None, bonus: float = 5.0) -> None:
        super().__init__()
        self.config = Config.from_name("test-mha", vocab_size=vocab)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.prefer, self.bonus, self.calls, self.tokens = prefer, bonus, 0, 0

    def forward(self, ids, cache=None, positions=None, pad_mask=None, last_only=False):
        B, T = ids.shape
        self.calls += 1
        self.tokens += B * T
        logits = torch.zeros(B, 1 if last_only else T, self.config.vocab_size)
        if self.prefer is not None:
            logits[..., self.prefer] = self.bonus
        if cache is not None:
            cache.end(cache.begin(T))
        return logits


def _task_records(lm, task, k, limit=None, data_dir=SAMPLE):
    res = evaluate(lm, [task], data_dir, num_fewshot=k, limit=limit, progress=False)
    return res, {r.get("id", r.get("task_id")): r for r in res["tasks"][task]["samples"]}


# ------------------------------------------------------------------------------------------------ prompt formats
def test_ceval_one_shot_prompt_is_the_spec_format():
    _, recs = _task_records(EvalLM(MockLM(), ByteTok()), "ceval", 1)
    rec = recs["ceval-art_studies-val-0"]
    assert rec["prompt"] == (
        "问题：王利发是老舍戏剧作品____中的主人公。\n"
        "A. 《茶馆》\nB. 《龙须沟》\nC. 《方珍珠》\nD. 《女店员》\n答案：A\n\n"
        "问题：蓝印花布是一种传统的民间纺织印染工艺品。蓝印花布印制方法始于____。\n"
        "A. 汉代\nB. 魏晋时期\nC. 唐代\nD. 宋代\n答案："
    )
    assert rec["choices"] == ["A", "B", "C", "D"]  # no leading space in Chinese


def test_cmmlu_one_shot_prompt_is_the_spec_format():
    _, recs = _task_records(EvalLM(MockLM(), ByteTok()), "cmmlu", 1)
    assert recs["cmmlu-agronomy-test-0"]["prompt"] == (
        "问题：肉牛屠宰后，胴体的哪个部位肉质较好\nA. 胸\nB. 腹\nC. 大腿\nD. 小腿\n答案：C\n\n"
        "问题：在农业生产中被当作极其重要的劳动对象发挥作用，最主要的不可替代的基本生产资料是\n"
        "A. 农业生产工具\nB. 土地\nC. 劳动力\nD. 资金\n答案："
    )


def test_mmlu_one_shot_prompt_is_the_spec_format_leave_one_out():
    _, recs = _task_records(EvalLM(MockLM(), ByteTok()), "mmlu", 1)
    rec = recs["mmlu-world_religions-5607"]
    assert rec["prompt"] == (
        "The following are multiple choice questions (with answers) about world religions.\n\n"
        "Question: Who is the eighth-century CE female poet worshipped throughout many South Indian temples "
        "dedicated to Vishnu?\nA. Andal\nB. Devi\nC. Ganga\nD. Kali\nAnswer: A\n\n"
        "Question: For whom are the Hindu Vedas most significant?\nA. Brahmins\nB. Kshatriyas\nC. Shiva\nD. Yogis\n"
        "Answer:"
    )
    assert rec["choices"] == [" A", " B", " C", " D"]
    # leave-one-out: the first item of the subject gets the second as its shot, never itself
    first = recs["mmlu-world_religions-5533"]["prompt"]
    assert first.count("Who is the eighth-century") == 1 and "Hindu Vedas" in first


class CannedLM(EvalLM):
    """Generation replaced by a table of outputs keyed by a substring of the prompt's last question."""

    def __init__(self, outputs: dict[str, str]) -> None:
        super().__init__(MockLM(), ByteTok())
        self.outputs, self.prompts = outputs, []

    def generate(self, prompts, max_new_tokens, stop, temperature=0.0, seed=None):
        self.prompts += prompts
        last = [p.rsplit("Question: ", 1)[1] for p in prompts]
        return [next((v for k, v in self.outputs.items() if k in q), "no idea") for q in last]


def test_gsm8k_one_shot_prompt_is_the_spec_format():
    lm = CannedLM({})
    evaluate(lm, ["gsm8k"], SAMPLE, num_fewshot=1, limit=1, progress=False)
    assert lm.prompts[0] == (
        "Question: Henry and 3 of his friends order 7 pizzas for lunch. Each pizza is cut into 8 slices. If Henry "
        "and his friends want to share the pizzas equally, how many slices can each of them have?\n"
        "Let's think step by step\nThere are 7*8=56 slices in total.\nThere are 1+3=4 people in total.\n"
        "They can each have 56/4=14 slices.\nTherefore, the correct answer is 14\n\n"
        "Question: Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
        "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per "
        "fresh duck egg. How much in dollars does she make every day at the farmers' market?\n"
        "Let's think step by step\n"
    )


def test_gsm8k_exemplars_are_never_scored_and_default_to_eight_shots():
    lm = CannedLM({})
    res = evaluate(lm, ["gsm8k"], SAMPLE, progress=False)
    ids = [r["id"] for r in res["tasks"]["gsm8k"]["samples"]]
    assert ids == ["gsm8k-test-0", "gsm8k-test-1", "gsm8k-test-2", "gsm8k-test-3"]  # 12 items - 8 shots
    assert lm.prompts[0].count("Therefore, the correct answer is") == 8


# ------------------------------------------------------------------------------------------------ answer extraction
@pytest.mark.parametrize("text, expected", [
    ("She makes 9 * 2 = 18 dollars.\nTherefore, the correct answer is 18", "18"),
    ("Therefore, the correct answer is $1,234.", "1234"),
    ("The total is 3.50 + 1.50 = 5.00", "5"),
    ("He loses 7 - 10 = -3 points, so the answer is -3.", "-3"),
    ("Half of 5 is 2.5", "2.5"),
    ("Therefore, the correct answer is 70000\n\nQuestion: 12 apples", "12"),  # extraction sees what it is given
    ("I do not know.", None),
    ("It takes 2/2=1 bolt\nSo 2+1=3 bolts", "3"),
])
def test_last_number_extraction(text, expected):
    assert last_number(text) == expected


def test_gsm8k_exact_match_cuts_at_stop_strings_before_extracting():
    lm = CannedLM({
        "Janet": "16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\nTherefore, the correct answer is 18\n\nQuestion: 99",
        "robe": "2 + 1 = 3\nTherefore, the correct answer is 4",
        "Josh": "Therefore, the correct answer is 70,000.",
        "James": "He runs 3 * 3 * 60 = 540 meters",
    })
    res = evaluate(lm, ["gsm8k"], SAMPLE, progress=False)
    recs = res["tasks"]["gsm8k"]["samples"]
    assert [r["prediction"] for r in recs] == ["18", "4", "70000", "540"]
    assert [r["correct"] for r in recs] == [True, False, True, True]
    assert res["tasks"]["gsm8k"]["metrics"]["exact_match"]["value"] == 0.75
    assert normalize_number("70,000") == "70000"


# ------------------------------------------------------------------------------------------------ pass@k
@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),              # c / n
    (5, 2, 2, 1 - 3 / 10),       # 1 - C(3,2)/C(5,2)
    (10, 1, 5, 1 - 126 / 252),   # 1 - C(9,5)/C(10,5)
    (10, 0, 3, 0.0),
    (3, 3, 2, 1.0),
    (4, 2, 3, 1.0),              # fewer than k failures: every draw of 3 contains a pass
    (200, 13, 10, 1 - math.comb(187, 10) / math.comb(200, 10)),
])
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)


def test_pass_at_k_needs_k_samples():
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 10)


# ------------------------------------------------------------------------------------------------ scoring numerics
@pytest.mark.parametrize("name", ["test-mha", "test-gqa"])
def test_batched_and_kv_shared_scores_equal_naive_full_forward(name):
    cfg = Config.from_name(name)
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():  # unit-scale weights: differences in the scoring path would show up
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(20)
    rng = random.Random(0)
    reqs = []
    for _ in range(7):
        ctx = [rng.randrange(3, cfg.vocab_size) for _ in range(rng.randrange(2, 40))]
        single = rng.random() < 0.5
        conts = [[rng.randrange(3, cfg.vocab_size) for _ in range(1 if single else rng.randrange(1, 6))]
                 for _ in range(4)]
        reqs.append((ctx, conts))
    got = score_requests(model, reqs, batch_size=3)
    want = [[naive_loglikelihood(model, ctx, c) for c in conts] for ctx, conts in reqs]
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=1e-5)
    assert len({round(s, 3) for s in got[0]}) > 1  # the model is not flat: the comparison means something


def test_continuation_loglikelihood_equals_transformers_on_the_same_weights():
    from conftest import build_reference

    cfg = Config.from_name("test-gqa")
    ref = build_reference(cfg, seed=3)
    model = build_model(cfg, init=False)
    model.load_state_dict(ref.state_dict(), strict=False, assign=True)
    model.eval()
    ctx, cont = [5, 17, 300, 42, 8, 99], [[7, 260, 11], [12], [400, 401]]
    with torch.no_grad():
        ours = score_continuations(model, ctx, cont)
        for c, s in zip(cont, ours):
            logp = ref(input_ids=torch.tensor([ctx + c])).logits.float().log_softmax(-1)[0]
            theirs = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(c))
            assert s == pytest.approx(theirs, abs=1e-4)


def test_mc_scoring_runs_the_prompt_once_per_item():
    m = MockLM()
    ctx = list(range(3, 103))  # 100 prompt tokens
    reqs = [(ctx, [[5], [6], [7], [8]])] * 6
    score_requests(m, reqs, batch_size=8)
    assert (m.calls, m.tokens) == (1, 600)  # six items, one forward, each prompt once
    m = MockLM()
    score_requests(m, [(ctx, [[5, 9, 9], [6, 9], [7], [8, 1, 2, 3]])], batch_size=8)
    assert m.calls == 2 and m.tokens == 100 + 4 * 3  # prompt once, then the four choices on its cache


def test_greedy_flags_mark_continuations_that_are_all_argmax():
    m = MockLM(prefer=9)
    flags: list[bool] = []
    score_continuations(m, [5, 6], [[9, 9, 9], [9, 8], [7], [9]], flags)
    assert flags == [True, False, False, True]


# ------------------------------------------------------------------------------------------------ task kinds
def test_mc_accuracy_follows_the_models_preference(tmp_path):
    prefer_b = MockLM(prefer=ord("B") + 3)
    _, recs = _task_records(EvalLM(prefer_b, ByteTok()), "ceval", 0)
    assert {r["prediction"] for r in recs.values()} == {"B"}
    gold = [json.loads(line)["answer"] for line in (SAMPLE / "ceval_val.jsonl").read_text().splitlines()]
    res, _ = _task_records(EvalLM(prefer_b, ByteTok()), "ceval", 0)
    m = res["tasks"]["ceval"]["metrics"]
    assert m["acc"]["value"] == gold.count("B") / len(gold)
    assert m["acc"]["n"] == len(gold)
    assert set(m) >= {"acc[STEM]", "acc[Social Science]", "acc[Humanities]", "acc[Other]"}
    # a set whose gold is always B scores 1, then always A scores 0; MMLU's " B" (two tokens here) likewise
    rows = [json.loads(line) for line in (SAMPLE / "mmlu_test.jsonl").read_text().splitlines()]
    for letter, acc in (("B", 1.0), ("A", 0.0)):
        (tmp_path / "mmlu_test.jsonl").write_text("".join(json.dumps({**r, "answer": letter}) + "\n" for r in rows))
        res, _ = _task_records(EvalLM(prefer_b, ByteTok()), "mmlu", 2, data_dir=tmp_path)
        assert res["tasks"]["mmlu"]["metrics"]["acc"]["value"] == acc


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    V = 512
    lm = EvalLM(MockLM(vocab=V), ByteTok(), max_length=64)
    res = evaluate(lm, ["perplexity"], SAMPLE, progress=False)
    t = res["tasks"]["perplexity"]
    for lang in ("zh", "en", "code"):
        assert t["metrics"][f"ppl[{lang}]"]["value"] == pytest.approx(V, rel=1e-5)
        d = t["details"][lang]
        assert d["tokens"] == d["bytes"]  # one token per byte here, and every token scored exactly once
        assert t["metrics"][f"bits_per_byte[{lang}]"]["value"] == pytest.approx(math.log2(V), rel=1e-5)


def test_rolling_windows_score_every_token_once_and_match_one_forward_when_it_fits():
    cfg = Config.from_name("test-mha")
    model = build_model(cfg, seed=1).eval()
    ids = [random.Random(2).randrange(3, 512) for _ in range(30)]
    full, n = rolling_nll(model, ids, 2, window=64)
    assert n == 30
    assert full == pytest.approx(-naive_loglikelihood(model, [2], ids), abs=1e-4)
    windowed, n2 = rolling_nll(model, ids, 2, window=8)
    assert n2 == 30 and windowed != pytest.approx(full, abs=1e-6)  # less context, different (finite) number
    assert rolling_nll(model, ids, 2, window=8, batch_size=1)[0] == pytest.approx(windowed, abs=1e-4)
    # overlapping windows (stride < window): each chunk of 4 tokens seen with up to 8 tokens of input
    ref = sum(-naive_loglikelihood(model, ([2] + ids)[max(0, b - 1 - 8):a], ids[a - 1:b - 1])
              for a, b in ((a, min(a + 4, 31)) for a in range(1, 31, 4)))
    assert rolling_nll(model, ids, 2, window=8, stride=4)[0] == pytest.approx(ref, abs=1e-4)


def test_humaneval_samples_file_scores_canonical_and_broken_completions(tmp_path):
    probs = load_jsonl(SAMPLE / "humaneval.jsonl")
    lines = []
    for p in probs:
        lines.append({"task_id": p["task_id"], "completion": p["canonical_solution"]})
        lines.append({"task_id": p["task_id"], "completion": "    return None\n"})
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = evaluate(None, ["humaneval"], SAMPLE, samples_file=str(samples), progress=False, unsafe_exec=UNSAFE)
    m = res["tasks"]["humaneval"]["metrics"]
    assert m["pass@1"]["value"] == 0.5 and m["pass@1"]["n"] == len(probs)
    recs = res["tasks"]["humaneval"]["samples"]
    assert [r["passed"] for r in recs[:2]] == [True, False]
    samples.write_text(json.dumps({"task_id": "HumanEval/9999", "completion": ""}) + "\n")
    with pytest.raises(EvalError, match="HumanEval/9999"):
        evaluate(None, ["humaneval"], SAMPLE, samples_file=str(samples), progress=False, unsafe_exec=UNSAFE)


def test_chat_template_wraps_prompts_and_is_recorded():
    from tianying.templates import render_chat

    lm = EvalLM(MockLM(), ByteTok(), chat_template="aquila-v1")
    res, recs = _task_records(lm, "ceval", 0, limit=1)
    rec = next(iter(recs.values()))
    assert res["chat_template"] == "aquila-v1"
    assert rec["prompt"] == render_chat([{"role": "user", "content": _raw(rec)}], "aquila-v1")
    assert rec["prompt"] != _raw(rec)


def _raw(rec) -> str:
    docs = {d["id"]: d for d in load_jsonl(SAMPLE / "ceval_val.jsonl")}
    return harness.build_prompt(load_task("ceval"), docs[rec["id"]], [])


def test_limit_spreads_over_subjects():
    docs = [{"subject": s, "i": i} for s in "aab" for i in range(3)]
    picked = harness.take(docs, 3, "subject")
    assert {d["subject"] for d in picked} == {"a", "b"}
    assert harness.take(docs, None, "subject") == docs


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(EvalError, match=str(tmp_path / "ceval_val.jsonl")):
        evaluate(EvalLM(MockLM(), ByteTok()), ["ceval"], tmp_path, progress=False)
    monkeypatch.delenv(harness.DATA_ENV, raising=False)
    with pytest.raises(EvalError, match="--data-dir"):
        harness.resolve_data_dir(None)
    monkeypatch.setenv(harness.DATA_ENV, str(tmp_path))
    assert harness.resolve_data_dir(None) == tmp_path
    assert harness.resolve_data_dir(None, sample_data=True) == SAMPLE.resolve()
    with pytest.raises(EvalError, match="unknown task"):
        load_task("nope")


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tianying.checkpoint import save_hf
    from tianying.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(FIXTURE_TOKENIZER)
    cfg = Config.from_name("test-gqa", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                           eos_token_id=tok.eos_id, pad_token_id=0, max_position_embeddings=1024)
    out = tmp_path_factory.mktemp("ckpt")
    save_hf(build_model(cfg, seed=0), cfg, out, tokenizer_dir=FIXTURE_TOKENIZER)
    return out


def test_tianying_eval_end_to_end(tiny_checkpoint, tmp_path, capsys):
    from tianying.cli import main

    out = tmp_path / "results.json"
    rc = main(["eval", str(tiny_checkpoint), "--sample-data", "--limit", "2", "--max-new-tokens", "4",
               "--tasks", "ceval,cmmlu,mmlu,gsm8k,humaneval,poem_mc,perplexity", "--output", str(out),
               "--no-progress"] + ["--unsafe-exec"] * UNSAFE)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "task" in printed and "stderr" in printed and "acc[STEM]" in printed and "pass@1" in printed
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == {"ceval", "cmmlu", "mmlu", "gsm8k", "humaneval", "poem_mc", "perplexity"}
    assert res["chat_template"] is None
    rec = res["tasks"]["ceval"]["samples"][0]
    assert set(rec) >= {"prompt", "choices", "scores", "prediction", "gold"} and len(rec["scores"]) == 4
    assert res["tasks"]["ceval"]["info"]["num_fewshot"] == 5
    for row in res["table"]:
        assert math.isfinite(row["value"]) and row["n"] >= 1
    assert res["tasks"]["humaneval"]["info"]["sandbox"]  # the sandbox reported its layers


def test_tianying_eval_with_the_chat_template_records_it(tiny_checkpoint, tmp_path):
    from tianying.cli import main

    out = tmp_path / "chat.json"
    assert main(["eval", str(tiny_checkpoint), "--sample-data", "--tasks", "ceval", "--limit", "1",
                 "--num-fewshot", "0", "--chat-template", "aquila-v1", "--output", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["chat_template"] == "aquila-v1"
    prompt = res["tasks"]["ceval"]["samples"][0]["prompt"]
    assert prompt.startswith("<|startofpiece|>问题：") and prompt.endswith("答案：<|endofpiece|>")


def test_tianying_eval_reports_user_errors(tiny_checkpoint, tmp_path, capsys):
    from tianying.cli import main

    assert main(["eval", str(tiny_checkpoint), "--tasks", "mmlu", "--data-dir", str(tmp_path)]) == 2
    assert "mmlu_test.jsonl" in capsys.readouterr().err
    assert main(["eval", "--tasks", "ceval", "--sample-data"]) == 2


def test_lm_eval_adapter_scores_like_the_naive_forward(tiny_checkpoint):
    from lm_eval.api.instance import Instance  # a dev dependency (pyproject): missing, the test fails

    from tianying.eval.lm_eval_adapter import TianyingLM

    lm = TianyingLM(pretrained=str(tiny_checkpoint), batch_size=4)
    reqs = [Instance("loglikelihood", {}, ("问题：1+1=?\n答案：", c), i) for i, c in enumerate(["A", "B", "二十"])]
    reqs.append(Instance("loglikelihood", {}, ("Question: x\nAnswer: ", "yes"), 3))  # trailing space moves over
    out = lm.loglikelihood(reqs)
    for r, (score, _) in zip(reqs, out):
        ctx, cont = lm._pair(*r.args)
        assert score == pytest.approx(naive_loglikelihood(lm.lm.model, ctx, cont), abs=1e-4)
    assert lm._pair("Answer: ", "yes")[1] == lm.lm.encode(" yes")
    (roll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("床前明月光",), 0)])
    ids = lm.lm.encode("床前明月光")
    assert roll == pytest.approx(naive_loglikelihood(lm.lm.model, [lm.lm.eos_id], ids), abs=1e-4)
