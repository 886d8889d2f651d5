"""Finetuning through the shared loop: full/LoRA resume exactness, Q-LoRA learning, CLI, memory report."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from tianying.config import Config

TOKENIZER = Path(__file__).parent / "data" / "tokenizer"
CONFIGS = Path(__file__).parents[1] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide model with the fixture tokenizer and unit-scale random weights (with the 0.02 init the
    frozen head bounds the logits so tightly that no adapter could lower the loss much)."""
    from conftest import randomize_

    from tianying.checkpoint import save_hf
    from tianying.model import build_model

    cfg = Config.from_name("test-mha", vocab_size=3008, hidden_size=32, intermediate_size=64, bos_token_id=3006,
                           eos_token_id=3007, pad_token_id=0, chat_template="aquila-v1")
    out = tmp_path_factory.mktemp("base") / "ckpt"
    model = build_model(cfg, seed=0)
    randomize_(model)
    save_hf(model, cfg, out, tokenizer_dir=TOKENIZER)
    return out


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    words = ["red", "blue", "green", "one", "two", "three", "cat", "dog", "sun", "moon", "tea", "rice"]
    recs = []
    for i in range(24):
        a, b = words[i % 12], words[(i * 5 + 1) % 12]
        conv = [{"from": "human", "value": f"say {a}"}, {"from": "gpt", "value": f"{a} {b} {a}"}]
        if i % 4 == 0:
            conv += [{"from": "human", "value": "again"}, {"from": "gpt", "value": f"{a} {a}"}]
        recs.append({"id": f"t-{i}", "conversations": conv, "instruction": ""})
    f = tmp_path_factory.mktemp("sft") / "train.json"
    f.write_text(json.dumps(recs))
    return f


def _cfg(base: Path, data: Path, out: Path, **kw):
    from tianying.recipes.finetune import FinetuneConfig

    defaults = dict(checkpoint=str(base), data=str(data), out_dir=str(out), seq_length=32, batch_size=4,
                    max_steps=8, save_interval=4, log_interval=1, lr=3e-3, warm_up=0.0, lora_r=4, lora_alpha=8,
                    lora_dropout=0.0, tensorboard=False, progress=False, plot=False, seed=7)
    return FinetuneConfig(**{**defaults, **kw})


def _losses(out: Path) -> list[float]:
    with open(out / "metrics.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    f = path / "adapter_model.safetensors"
    return load_file(str(f if f.is_file() else path / "model.safetensors"))


@pytest.mark.parametrize("method,kw", [("full", {}), ("lora", {"lora_dropout": 0.2, "pack": True})])
def test_resume_is_exact(base, sft_file, tmp_path, method, kw):
    """8 steps straight == 4 steps, (crash), resume, 4 steps — for full finetuning and LoRA with dropout."""
    from tianying.recipes.finetune import run_finetune

    quiet = lambda *a: None  # noqa: E731
    run_finetune(_cfg(base, sft_file, tmp_path / "a", method=method, **kw), log=quiet)
    cfg_b = _cfg(base, sft_file, tmp_path / "b", method=method, **kw)
    run_finetune(cfg_b, log=quiet)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000008")
    shutil.rmtree(tmp_path / "b" / "final")
    torch.manual_seed(12345)
    res = run_finetune(cfg_b, resume=True, log=quiet)
    assert res.train.step == 8
    wa, wb = _tensors(tmp_path / "a" / "final"), _tensors(tmp_path / "b" / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert la == lb and len(la) == 8
    if method == "lora":
        assert all(".lora_" in k for k in wa) and (tmp_path / "a" / "final" / "adapter_config.json").is_file()
    else:
        assert (tmp_path / "a" / "final" / "config.json").is_file() and len(wa) == 2 + 2 * 9 + 1


def test_qlora_trains_on_an_nf4_base_and_reduces_loss(base, sft_file, tmp_path):
    from tianying.nf4 import NF4Linear
    from tianying.recipes.finetune import run_finetune

    lines: list[str] = []
    res = run_finetune(_cfg(base, sft_file, tmp_path / "q", method="qlora", max_steps=24, save_interval=100,
                            lr=3e-2), log=lines.append)
    model = res.train.model
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    losses = _losses(tmp_path / "q")
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    meta = json.loads((tmp_path / "q" / "final" / "tianying_adapter.json").read_text())
    assert meta["base_quantization"]["type"] == "nf4"
    assert any(s.startswith("memory estimate: weights") for s in lines)
    assert any(s.startswith("measured peak memory") for s in lines)


def test_cli_lora_then_chat_and_merge(base, sft_file, tmp_path, capsys):
    from tianying.api import LLM
    from tianying.cli import main

    out = tmp_path / "run"
    rc = main(["finetune", "--method", "lora", "--data", str(sft_file), "--checkpoint", str(base), "--out-dir",
               str(out), "seq_length=32", "batch_size=4", "max_steps=3", "progress=false", "tensorboard=false",
               "plot=false", "lora_target_modules=[q_proj, v_proj]", "lora_r=2"])
    text = capsys.readouterr().out
    assert rc == 0 and "memory estimate" in text and "measured peak memory" in text and "PEFT adapter" in text
    cfg = json.loads((out / "final" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["target_modules"] == ["q_proj", "v_proj"]
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["steps"] == 3 and summary["peak_bytes"] > 0
    llm = LLM.load(base, lora=out / "final")
    reply = llm.chat([{"role": "user", "content": "say red"}], max_new_tokens=4)
    assert isinstance(reply, str)
    assert main(["merge-lora", str(base), str(out / "final"), str(tmp_path / "merged")]) == 0
    merged = LLM.load(tmp_path / "merged")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids), llm.model(ids), atol=1e-5, rtol=1e-5)


def test_cli_malformed_record_is_a_one_line_error(base, sft_file, tmp_path, capsys):
    from tianying.cli import main

    bad = tmp_path / "bad.jsonl"
    good = json.loads(sft_file.read_text())
    bad.write_text("\n".join(json.dumps(r) for r in good[:8]) + "\n" +
                   json.dumps({"id": "oops-7", "conversations": [{"from": "human", "value": "x"}]}) + "\n")
    args = ["finetune", "--data", str(bad), "--checkpoint", str(base), "--out-dir", str(tmp_path / "r"),
            "seq_length=32", "batch_size=4", "max_steps=1", "progress=false", "tensorboard=false", "plot=false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "record oops-7: has no assistant (gpt) turn" in err and "--skip-bad" in err
    assert main([*args, "--skip-bad"]) == 0
    assert "1 malformed skipped" in capsys.readouterr().out
    assert main([*args, "lora_rank=4"]) == 2
    assert "unknown config key(s) 'lora_rank'" in capsys.readouterr().err


def test_memory_estimate_orders_methods_and_levers():
    from tianying.recipes.finetune import estimate_memory

    cfg = Config.from_name("aquila2-7b")
    n_lora = 2 * 32 * 8 * (4096 + 4096)  # r=8 on q_proj, v_proj
    full = estimate_memory(cfg, "full", 4, 2048, "bf16")
    lora = estimate_memory(cfg, "lora", 4, 2048, "bf16", lora_params=n_lora)
    qlora = estimate_memory(cfg, "qlora", 4, 2048, "bf16", lora_params=n_lora)
    assert full.weights == 4 * cfg.n_params and full.optimizer == 8 * cfg.n_params
    assert full.total > lora.total > qlora.total
    assert 4.7e9 < qlora.weights < 5.3e9  # 6.5B projections at 4.13 bits + 0.82B embedding/head in bf16
    ckpt = estimate_memory(cfg, "lora", 4, 2048, "bf16", activation_checkpointing=True, lora_params=n_lora)
    assert ckpt.activations < lora.activations / 4
    assert estimate_memory(cfg, "lora", 1, 2048, "bf16").activations == pytest.approx(lora.activations / 4)


def test_shipped_finetune_configs_load():
    from tianying.recipes.finetune import FinetuneConfig
    from tianying.train.loop import load_config

    files = sorted(CONFIGS.glob("finetune-*.yaml"))
    assert len(files) >= 3
    methods = {load_config(FinetuneConfig, f).method for f in files}
    assert methods == {"full", "lora", "qlora"}


_PEAK_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from tianying.recipes.finetune import FinetuneConfig, run_finetune
cfg = FinetuneConfig(**json.loads(sys.argv[1]))
print(json.dumps({"peak": run_finetune(cfg, log=lambda *a: None).peak_bytes}))
"""


def test_measured_peak_memory_orders_full_lora_qlora(tmp_path):
    """Regression for LoRA/Q-LoRA measuring MORE than full finetuning (glibc keeping freed activations in a
    fragmenting heap, the dropped input kept per LoRA projection, the NF4 base's fp32 file pages left mapped).
    Each method runs in its own process on a model whose projections dominate its weights; the gaps expected
    are ~190 MiB (gradients + AdamW of full; ~95 measured) and ~40 MiB (fp32 → NF4 projections)."""
    import subprocess
    import sys

    from tianying.checkpoint import save_hf
    from tianying.model import build_model

    cfg = Config.from_name("test-mha", vocab_size=3008, hidden_size=512, intermediate_size=1376, n_layer=4,
                           n_head=8, n_kv_head=8, bos_token_id=3006, eos_token_id=3007, pad_token_id=0,
                           chat_template="aquila-v1", max_position_embeddings=512)
    base = tmp_path / "base"
    save_hf(build_model(cfg, seed=0), cfg, base, tokenizer_dir=TOKENIZER)
    words = "red blue green one two three cat dog sun moon tea rice".split()
    recs = [{"id": f"m{i}", "conversations": [
        {"from": "human", "value": " ".join(words[(i + j) % 12] for j in range(20))},
        {"from": "gpt", "value": " ".join(words[(i * j) % 12] for j in range(60))}]} for i in range(48)]
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(recs))
    peaks = {}
    for method in ("full", "lora", "qlora"):
        kw = dict(method=method, checkpoint=str(base), data=str(data), out_dir=str(tmp_path / method), pack=True,
                  seq_length=256, batch_size=2, max_steps=2, save_interval=100, log_interval=1, lora_r=8,
                  lora_alpha=16, lora_dropout=0.05, tensorboard=False, progress=False, plot=False)
        p = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, json.dumps(kw)], capture_output=True, text=True,
                           timeout=600, cwd=Path(__file__).parents[1])
        assert p.returncode == 0, p.stderr[-2000:]
        peaks[method] = json.loads(p.stdout.strip().splitlines()[-1])["peak"] / 2**20
    assert peaks["lora"] < peaks["full"] - 50, peaks  # measured: 387 vs 296 MiB
    assert peaks["qlora"] < peaks["lora"] - 15, peaks  # measured: 296 vs 258 MiB


@pytest.mark.parametrize("pack", [False, True])
def test_data_smaller_than_one_batch_is_one_line_before_training(base, sft_file, tmp_path, capsys, pack):
    from tianying.cli import main

    args = ["finetune", "--data", str(sft_file), "--checkpoint", str(base), "--out-dir", str(tmp_path / "r"),
            "seq_length=32", "batch_size=32", "max_steps=2", "tensorboard=false", "plot=false"]
    assert main(args + (["--pack"] if pack else [])) == 2
    err = capsys.readouterr().err.strip()
    what = r"\d+ packed rows" if pack else "24 conversations"
    assert len(err.splitlines()) == 1, err  # no progress bar, no traceback
    import re

    assert re.search(f"the training data has {what}, fewer than one global batch of 32 \\(batch_size 32", err), err
    assert not (tmp_path / "r").exists()


def test_finetune_refuses_a_used_out_dir_unless_resume_or_overwrite(base, sft_file, tmp_path, capsys):
    from tianying.cli import main

    out = tmp_path / "ft"
    args = ["finetune", "--data", str(sft_file), "--checkpoint", str(base), "--out-dir", str(out),
            "seq_length=32", "batch_size=4", "max_steps=2", "save_interval=1", "progress=false",
            "tensorboard=false", "plot=false"]
    assert main(args) == 0
    capsys.readouterr()
    first = (out / "final" / "adapter_model.safetensors").read_bytes()
    assert main(args + ["lr=1e-2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not empty" in err and "--resume" in err
    assert (out / "final" / "adapter_model.safetensors").read_bytes() == first
    assert main(args + ["lr=1e-2", "--overwrite"]) == 0
    assert (out / "final" / "adapter_model.safetensors").read_bytes() != first
