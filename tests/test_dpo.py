"""Preference training: losses against TRL's DPOTrainer, reply log-probs against transformers, record forms,
a short run that learns a separable preference, exact resume, the CLI."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tianying.config import Config
from tianying.data.sft import IGNORE, SFTDataError, record_messages, record_preference
from tianying.train.preference import (
    PreferenceObjective,
    PreferencePair,
    collate_preference,
    load_preference,
    preference_loss,
    sequence_logps,
)

TOKENIZER = Path(__file__).parent / "data" / "tokenizer"
CFG = dict(vocab_size=3008, hidden_size=32, intermediate_size=64, bos_token_id=3006, eos_token_id=3007,
           pad_token_id=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def _ours(hf) -> torch.nn.Module:  # noqa: ANN001
    """Our model with a transformers model's weights (the names match)."""
    from tianying.model import build_model

    cfg = Config.from_name("test-mha", **CFG)
    m = build_model(cfg, seed=0)
    m.load_state_dict({k: v for k, v in hf.state_dict().items() if k in m.state_dict()}, strict=True)
    return m.eval()


def _pairs_batch(seed: int = 0):
    """2 pairs of different lengths (right-padded), as TRL's inputs and as ours."""
    g = torch.Generator().manual_seed(seed)
    B, T, P = 2, 12, 4  # pairs, padded length, prompt tokens
    ids = torch.randint(1, 3000, (2 * B, T), generator=g)
    ids[B:, :P] = ids[:B, :P]  # a pair shares its prompt
    lengths = [12, 9, 10, 7]  # chosen 0, chosen 1, rejected 0, rejected 1
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    attention = torch.zeros(2 * B, T, dtype=torch.long)
    for r, n in enumerate(lengths):
        completion[r, P:n] = 1
        attention[r, :n] = 1
        ids[r, n:] = 0
    labels = ids.masked_fill(completion == 0, IGNORE)
    ours = {"input_ids": ids[:, :-1].contiguous(), "labels": labels[:, 1:].contiguous()}
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}, ours


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_metrics_equal_trl_dpo_trainer(loss_type, tmp_path):
    """TRL's own DPOTrainer._compute_loss on the same models and batch (policy ≠ reference)."""
    import datasets
    import trl  # noqa: F401 - a dev dependency: missing, the test fails
    from conftest import build_reference
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    cfg = Config.from_name("test-mha", **CFG)
    policy, ref = build_reference(cfg, seed=0), build_reference(cfg, seed=1)
    tok = PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER))
    ds = datasets.Dataset.from_list([{"prompt": "a b", "chosen": " c", "rejected": " d e"}] * 2)
    beta = 0.3
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to="none",
                     use_cpu=True, bf16=False)  # TRL defaults to bf16 autocast
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    trainer.model.eval()
    trl_in, ours = _pairs_batch()
    with torch.no_grad():
        want = float(trainer._compute_loss(trainer.model, trl_in, False))
    m = trainer._metrics["eval"]  # the model is in eval mode (no dropout either way)

    our_policy, our_ref = _ours(policy), _ours(ref)
    obj = PreferenceObjective(loss_type, beta=beta, reference=our_ref)
    with torch.no_grad():
        loss_sum, mets = obj(our_policy, ours)
    B = obj.units(ours)
    assert abs(float(loss_sum) / B - want) < 1e-5
    assert abs(mets["reward_margin"] / B - m["rewards/margins"][-1]) < 1e-5
    assert abs(mets["chosen_reward"] / B - m["rewards/chosen"][-1]) < 1e-5
    assert abs(mets["rejected_reward"] / B - m["rewards/rejected"][-1]) < 1e-5
    assert abs(mets["reward_acc"] / B - m["rewards/accuracies"][-1]) < 1e-6
    assert abs(mets["chosen_logp"] / B - m["logps/chosen"][-1]) < 1e-4  # summed log-probs, ~ -100
    assert abs(mets["rejected_logp"] / B - m["logps/rejected"][-1]) < 1e-4
    assert want > 0.01  # a loss at a non-trivial point (policy and reference differ)


def test_label_smoothing_and_simpo_by_hand():
    pc, pr = torch.tensor([-3.0, -8.0]), torch.tensor([-5.0, -4.0])
    rc, rr = torch.tensor([-4.0, -6.0]), torch.tensor([-4.5, -5.0])
    nc, nr = torch.tensor([3, 4]), torch.tensor([5, 2])
    beta, eps = 0.5, 0.1
    losses, cr, rj = preference_loss(pc, pr, rc, rr, nc, nr, "sigmoid", beta, eps)
    for i in range(2):
        d = (pc[i] - rc[i]) - (pr[i] - rr[i])
        sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
        want = -(1 - eps) * math.log(sig(beta * d)) - eps * math.log(sig(-beta * d))
        assert abs(float(losses[i]) - want) < 1e-6
        assert abs(float(cr[i]) - beta * float(pc[i] - rc[i])) < 1e-6
    losses, cr, rj = preference_loss(pc, pr, None, None, nc, nr, "simpo", beta, 0.0, simpo_gamma=0.4)
    d0 = -3.0 / 3 - (-5.0 / 5) - 0.4 / beta
    assert abs(float(losses[0]) - math.log1p(math.exp(-beta * d0))) < 1e-6
    assert abs(float(cr[1]) - beta * -2.0) < 1e-6 and abs(float(rj[1]) - beta * -2.0) < 1e-6


def test_reply_logps_equal_transformers_and_only_the_last_reply_is_scored(tmp_path):
    from conftest import build_reference

    from tianying.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(TOKENIZER)
    rec = {"id": "p1", "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                  {"role": "user", "content": "two plus two?"}],
           "chosen": "four", "rejected": "it is five, I think"}
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    (pair,), _ = load_preference(f, tok, "aquila-v1", 64)
    trained = tok.decode([i for i, lab in zip(pair.chosen_ids, pair.chosen_labels) if lab != IGNORE])
    assert trained == "four</s>"  # the earlier "yo" reply is prompt, not scored
    trained = tok.decode([i for i, lab in zip(pair.rejected_ids, pair.rejected_labels) if lab != IGNORE])
    assert trained == "it is five, I think</s>"
    hf = build_reference(Config.from_name("test-mha", **CFG), seed=3)
    batch = collate_preference([pair], pad_id=0)
    with torch.no_grad():
        ours, n = sequence_logps(_ours(hf)(batch["input_ids"]), batch["labels"])
    for row, (ids, labels) in enumerate([(pair.chosen_ids, pair.chosen_labels),
                                         (pair.rejected_ids, pair.rejected_labels)]):
        with torch.no_grad():
            logp = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        want = sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if labels[t] != IGNORE)
        assert abs(float(ours[row]) - want) < 1e-4 * max(1.0, abs(want)) / 10
        assert int(n[row]) == sum(1 for x in labels[1:] if x != IGNORE)


# ---------------------------------------------------------------------------------------------- formats
PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
CHOSEN, REJECTED = "4", "Let me think. It is 5."
PREF_FORMS = {
    "trl-text": {"system": "Be brief.", "prompt": "2+2?", "chosen": CHOSEN, "rejected": REJECTED},
    "trl-conversational": {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": CHOSEN}],
                           "rejected": [{"role": "assistant", "content": REJECTED}]},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"}],
                 "chosen": {"from": "gpt", "value": CHOSEN}, "rejected": {"from": "gpt", "value": REJECTED}},
    "sharegpt-system-field": {"system": "Be brief.", "conversations": [{"from": "human", "value": "2+2?"}],
                              "chosen": CHOSEN, "rejected": REJECTED},
    "openai": {"messages": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
    "alpaca": {"system": "Be brief.", "instruction": "2+2?", "input": "", "chosen": CHOSEN, "rejected": REJECTED},
    "hh-full-conversations": {"chosen": PROMPT + [{"role": "assistant", "content": CHOSEN}],
                              "rejected": PROMPT + [{"role": "assistant", "content": REJECTED}]},
}


def test_every_preference_form_parses_to_the_same_pair():
    want = (PROMPT, {"role": "assistant", "content": CHOSEN}, {"role": "assistant", "content": REJECTED})
    for name, rec in PREF_FORMS.items():
        assert record_preference(rec) == want, name


SFT_WANT = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi\nthere"},
            {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "tool says 3"},
            {"role": "assistant", "content": "It is 3"}]
SFT_FORMS = {
    "seed": {"instruction": "S", "conversations": [{"from": "human", "value": "Hi\nthere"},
                                                   {"from": "gpt", "value": "Yo"},
                                                   {"from": "observation", "value": "tool says 3"},
                                                   {"from": "gpt", "value": "It is 3"}]},
    "sharegpt-role-content": {"conversations": [{"role": "system", "content": "S"},
                                                {"role": "user", "content": "Hi\nthere"},
                                                {"role": "assistant", "content": "Yo"},
                                                {"role": "tool", "content": "tool says 3"},
                                                {"role": "assistant", "content": "It is 3"}]},
    "openai-parts": {"messages": [{"role": "system", "content": "S"},
                                  {"role": "user", "content": [{"type": "text", "text": "Hi\n"},
                                                               {"type": "text", "text": "there"}]},
                                  {"role": "assistant", "content": "Yo"}, {"role": "tool", "content": "tool says 3"},
                                  {"role": "assistant", "content": "It is 3"}]},
    "alpaca-history": {"system": "S", "history": [["Hi\nthere", "Yo"]], "instruction": "tool says",
                       "input": "3", "output": "It is 3"},
}


def test_every_sft_form_parses_to_the_same_conversation():
    alpaca = SFT_WANT[:3] + [{"role": "user", "content": "tool says\n3"}, SFT_WANT[4]]  # instruction \n input
    for name, rec in SFT_FORMS.items():
        assert record_messages(rec) == (alpaca if name.startswith("alpaca") else SFT_WANT), name
    assert record_messages({"prompt": "q", "completion": "a"}) == \
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_files_parquet_datasets_dir_and_column_mapping_read_the_same(tmp_path):
    from tianying.data.sft import load_sft
    from tianying.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(TOKENIZER)
    recs = [dict(rec, id=name) for name, rec in SFT_FORMS.items()]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    base = [(e.input_ids, e.labels) for e in load_sft(tmp_path / "a.jsonl", tok, "aquila-v1", 128)[0]]
    assert len(base) == 4 and len({tuple(x) for x, _ in base[:3]}) == 1
    # the same records, renamed columns, as parquet, a `datasets` directory and a folder of files
    import datasets
    import pyarrow  # noqa: F401
    flat = [{"id": f"p{i}", "question": "2+2?", "good": CHOSEN, "bad": REJECTED, "system": "Be brief."}
            for i in range(3)]
    ds = datasets.Dataset.from_list(flat)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.jsonl").write_text("\n".join(json.dumps(r) for r in flat))
    cols = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    got = []
    for src in ("p.parquet", "hf", "folder"):
        pairs, _ = load_preference(tmp_path / src, tok, "aquila-v1", 128, columns=cols)
        got.append([(p.chosen_ids, p.chosen_labels, p.rejected_ids, p.rejected_labels) for p in pairs])
    text = {**PREF_FORMS["trl-text"], "id": "t"}
    (tmp_path / "t.jsonl").write_text(json.dumps(text))
    (ref_pair,), _ = load_preference(tmp_path / "t.jsonl", tok, "aquila-v1", 128)
    want = (ref_pair.chosen_ids, ref_pair.chosen_labels, ref_pair.rejected_ids, ref_pair.rejected_labels)
    assert got == [[want] * 3] * 3


BAD_PREF = [
    ({"id": "b1", "prompt": "q", "chosen": "a"}, "has no 'rejected' reply"),
    ({"id": "b2", "prompt": "q", "chosen": "a", "rejected": "a"}, "are the same reply"),
    ({"id": "b3", "prompt": 5, "chosen": "a", "rejected": "b"}, "'prompt' is a int"),
    ({"id": "b4", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}],
      "chosen": "a", "rejected": "b"}, "must end with a human/user turn"),
    ({"id": "b5", "prompt": "q", "chosen": {"from": "human", "value": "a"}, "rejected": "b"},
     "'chosen' is a 'human' message"),
    ({"id": "b6", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     "must differ only in their last reply"),
    ({"id": "b7", "text": "q", "chosen": "a", "rejected": "b"}, "has no prompt"),
]


@pytest.mark.parametrize("rec,problem", BAD_PREF, ids=[r["id"] for r, _ in BAD_PREF])
def test_malformed_preference_record_is_one_clear_error(tmp_path, rec, problem):
    from tianying.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(TOKENIZER)
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"id": "ok", "prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(rec))
    with pytest.raises(SFTDataError) as e:
        load_preference(f, tok, "aquila-v1", 64)
    assert f"record {rec['id']}: " in str(e.value) and problem in str(e.value) and "--skip-bad" in str(e.value)
    pairs, stats = load_preference(f, tok, "aquila-v1", 64, skip_bad=True)
    assert [p.id for p in pairs] == ["ok"] and stats.skipped_bad == 1


def test_pairs_collate_chosen_first_with_reference_logps():
    p = [PreferencePair("a", [5, 6, 7], [IGNORE, 6, 7], [5, 8], [IGNORE, 8], ref=(-1.0, -2.0)),
         PreferencePair("b", [5, 9], [IGNORE, 9], [5, 9, 9, 9], [IGNORE, 9, 9, 9], ref=(-3.0, -4.0))]
    b = collate_preference(p, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 9, 0], [5, 8, 0], [5, 9, 9]]
    assert b["labels"].tolist() == [[6, 7, IGNORE], [9, IGNORE, IGNORE], [8, IGNORE, IGNORE], [9, 9, 9]]
    assert b["ref_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from conftest import randomize_

    from tianying.checkpoint import save_hf
    from tianying.model import build_model

    cfg = Config.from_name("test-mha", **CFG, chat_template="aquila-v1")
    out = tmp_path_factory.mktemp("base") / "ckpt"
    model = build_model(cfg, seed=0)
    randomize_(model)
    save_hf(model, cfg, out, tokenizer_dir=TOKENIZER)
    return out


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory) -> Path:
    """Separable: the chosen reply repeats the asked word, the rejected one is always the same refusal."""
    words = ["red", "blue", "green", "one", "two", "three", "cat", "dog", "sun", "moon", "tea", "rice"]
    recs = [{"id": f"p{i}", "prompt": f"say {w}", "chosen": f"{w} {w}", "rejected": "no way"}
            for i, w in enumerate(words * 2)]
    f = tmp_path_factory.mktemp("pref") / "pref.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs))
    return f


def _cfg(base: Path, data: Path, out: Path, **kw):
    from tianying.recipes.finetune import FinetuneConfig

    defaults = dict(method="dpo", policy="lora", checkpoint=str(base), data=str(data), out_dir=str(out),
                    seq_length=32, batch_size=4, max_steps=8, save_interval=4, log_interval=1, lr=3e-3,
                    warm_up=0.0, lora_r=4, lora_alpha=8, lora_dropout=0.0, beta=0.5, tensorboard=False,
                    progress=False, plot=False, seed=7)
    return FinetuneConfig(**{**defaults, **kw})


def _rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["loss"]]


@pytest.mark.parametrize("policy", ["lora", "qlora"])
def test_short_dpo_run_learns_a_separable_preference(base, pref_file, tmp_path, policy):
    from tianying.recipes.finetune import run_finetune

    run_finetune(_cfg(base, pref_file, tmp_path / "r", max_steps=12, policy=policy, nf4_blocksize=32),
                 log=lambda *a: None)
    rows = _rows(tmp_path / "r")
    first, last = rows[0], rows[-1]
    assert abs(float(first["reward_margin"])) < 1e-5  # step 1: the policy is the reference (B = 0)
    assert abs(float(first["loss"]) - math.log(2)) < 1e-5
    tail = [float(r["reward_acc"]) for r in rows[-3:]]
    assert min(tail) > 0.5 and float(last["reward_margin"]) > 0.1 and float(last["loss"]) < math.log(2) - 0.05


@pytest.mark.parametrize("policy,kw", [("full", {"precompute_ref": True}), ("full", {}),
                                       ("lora", {"lora_dropout": 0.2, "dpo_loss": "ipo"})])
def test_dpo_resume_is_exact(base, pref_file, tmp_path, policy, kw):
    from tianying.recipes.finetune import run_finetune

    quiet = lambda *a: None  # noqa: E731
    run_finetune(_cfg(base, pref_file, tmp_path / "a", policy=policy, **kw), log=quiet)
    cfg_b = _cfg(base, pref_file, tmp_path / "b", policy=policy, **kw)
    run_finetune(cfg_b, log=quiet)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000008")
    shutil.rmtree(tmp_path / "b" / "final")
    torch.manual_seed(12345)
    res = run_finetune(cfg_b, resume=True, log=quiet)
    assert res.train.step == 8
    from safetensors.torch import load_file

    def tensors(d: Path) -> dict:
        f = d / "adapter_model.safetensors"
        return load_file(str(f if f.is_file() else d / "model.safetensors"))

    wa, wb = tensors(tmp_path / "a" / "final"), tensors(tmp_path / "b" / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert len(ra) == 8 and [(r["loss"], r["reward_margin"]) for r in ra] == \
        [(r["loss"], r["reward_margin"]) for r in rb]


def test_full_precomputed_reference_equals_the_frozen_copy(base, pref_file, tmp_path):
    from tianying.recipes.finetune import run_finetune

    quiet = lambda *a: None  # noqa: E731
    run_finetune(_cfg(base, pref_file, tmp_path / "a", policy="full", max_steps=3), log=quiet)
    run_finetune(_cfg(base, pref_file, tmp_path / "b", policy="full", max_steps=3, precompute_ref=True), log=quiet)
    for ra, rb in zip(_rows(tmp_path / "a"), _rows(tmp_path / "b")):
        assert abs(float(ra["loss"]) - float(rb["loss"])) < 1e-5
        assert abs(float(ra["reward_margin"]) - float(rb["reward_margin"])) < 1e-5


def test_cli_dpo_lora_writes_adapter_and_margin_curve(base, pref_file, tmp_path, capsys):
    from tianying.cli import main

    out = tmp_path / "cli"
    rc = main(["finetune", "--method", "dpo", "--policy", "lora", "--checkpoint", str(base), "--data",
               str(pref_file), "--out-dir", str(out), "--beta", "0.5", "--dpo-loss", "simpo", "seq_length=32",
               "batch_size=4", "max_steps=3", "log_interval=1", "tensorboard=false", "progress=false", "lr=3e-3"])
    text = capsys.readouterr().out
    assert rc == 0 and "PEFT adapter" in text and "reward accuracy" in text
    assert (out / "final" / "adapter_config.json").is_file()
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["method"] == "dpo" and summary["policy"] == "lora" and summary["preference"]["last"]["step"] == 3
    import matplotlib  # noqa: F401
    assert (out / "margins.png").stat().st_size > 1000


def test_sequence_logps_ignores_padding():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[1, 2, IGNORE, IGNORE], [IGNORE, 3, 4, 5]])
    s, n = sequence_logps(logits, labels)
    lp = F.log_softmax(logits, -1)
    assert torch.allclose(s, torch.stack([lp[0, 0, 1] + lp[0, 1, 2], lp[1, 1, 3] + lp[1, 2, 4] + lp[1, 3, 5]]))
    assert n.tolist() == [2, 3]


def test_gradient_accumulation_averages_over_pairs(base, pref_file, tmp_path):
    """batch 4 × 1 and batch 2 × 2 accumulation are the same optimizer steps: the loss is a mean over pairs."""
    from tianying.recipes.finetune import run_finetune

    quiet = lambda *a: None  # noqa: E731
    common = dict(policy="full", precompute_ref=True, max_steps=2, shuffle=False)
    run_finetune(_cfg(base, pref_file, tmp_path / "a", batch_size=4, **common), log=quiet)
    run_finetune(_cfg(base, pref_file, tmp_path / "b", batch_size=2, gradient_accumulation_steps=2, **common),
                 log=quiet)
    ra, rb = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    for x, y in zip(ra, rb):
        for k in ("loss", "reward_margin", "reward_acc", "chosen_logp"):
            assert abs(float(x[k]) - float(y[k])) < 1e-5, k
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert float(ra[1]["reward_margin"]) != 0.0  # the second step really trained on moved weights


def test_shipped_dpo_config_and_sample_load():
    from tianying.recipes.finetune import FinetuneConfig
    from tianying.tokenizer import Tokenizer
    from tianying.train.loop import load_config

    root = Path(__file__).parents[1]
    cfg = load_config(FinetuneConfig, root / "configs" / "dpo-demo.yaml")
    assert cfg.method == "dpo" and cfg.weights == "lora"
    tok = Tokenizer.from_dir(root / "tianying" / "assets" / "demo-tokenizer")
    n = 0
    for f in (cfg.data, cfg.valid_data):
        pairs, stats = load_preference(root / f, tok, "aquila-v1", cfg.seq_length)
        assert stats.truncated == 0 and stats.skipped_bad == 0
        n += len(pairs)
    assert 30 <= n <= 60 and len(pairs) >= 1
