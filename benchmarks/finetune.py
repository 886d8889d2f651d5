"""The seed's SFT vs LoRA vs Q-LoRA table (seed-spec §8.3: memory and s/iter) on a small model, here.

    .venv/bin/python benchmarks/finetune.py                      # CPU, ~41M-parameter Aquila-shaped model
    .venv/bin/python benchmarks/finetune.py --device cuda --hidden 2048 --layers 16 --seq 2048 --bf16

Each method runs `tianying finetune` in its own process (so one run's peak cannot hide another's) on the same
random-weight base checkpoint and the same packed chat rows, and reports the recipe's memory estimate, the
measured peak (GPU: max allocated; CPU: peak resident set during training above the pre-load baseline) and
seconds per optimizer step (first logged step left out). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED_TABLE = {"full": (43.9, 2.67), "lora": (29.4, 2.04), "qlora": (19.9, 2.14)}  # 7B, A100-80G, GB / s/iter
SFT_DATA = ROOT.parent / "shared" / "data" / "sft"


def make_base(out: Path, hidden: int, layers: int, ffn: int, heads: int) -> None:
    import torch

    from tianying.checkpoint import save_hf
    from tianying.config import Config
    from tianying.model import build_model

    cfg = Config.from_name("demo", hidden_size=hidden, n_layer=layers, intermediate_size=ffn, n_head=heads,
                           n_kv_head=heads, max_position_embeddings=4096)
    tok = ROOT / "tianying" / "assets" / "demo-tokenizer"
    save_hf(build_model(cfg, dtype=torch.float32, seed=0), cfg, out, tokenizer_dir=tok)


def make_data(out: Path, n: int) -> Path:
    src = SFT_DATA / "bilingual_tasks.json"
    if src.is_file():
        recs = json.loads(src.read_text(encoding="utf-8"))[:n]
    else:  # a fresh clone without the shared bundle: synthetic bilingual chats of similar length
        recs = [{"id": f"s{i}", "conversations": [{"from": "human", "value": f"请翻译第{i}句: the quick brown fox"},
                                                 {"from": "gpt", "value": "敏捷的棕色狐狸跳过了懒狗。" * (1 + i % 4)}]}
                for i in range(n)]
    f = out / "sft.json"
    f.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    return f


def run_method(method: str, base: Path, data: Path, out: Path, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "tianying", "finetune", "--method", method, "--data", str(data),
           "--checkpoint", str(base), "--out-dir", str(out), "--pack",
           f"seq_length={a.seq}", f"batch_size={a.batch}", f"max_steps={a.steps}", "log_interval=1",
           f"save_interval={a.steps + 1}", "progress=false", "tensorboard=false", "plot=false", "lr=1e-4",
           "lora_r=8", "lora_alpha=16", "lora_dropout=0.05", "keep_last_k=1"]
    if a.device:
        cmd.append(f"device={a.device}")
    if a.bf16:
        cmd.append("--bf16")
    if a.activation_checkpointing:
        cmd.append("--activation-checkpointing")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)} if a.threads else dict(os.environ)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{method} failed:\n{p.stdout}\n{p.stderr}")
    return json.loads((out / "finetune_summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=1376)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rows", type=int, default=600, help="SFT records to pack")
    ap.add_argument("--device", default=None)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--methods", default="full,lora,qlora")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_base(tmp / "base", a.hidden, a.layers, a.ffn, a.heads)
        data = make_data(tmp, a.rows)
        results = {m: run_method(m, tmp / "base", data, tmp / m, a) for m in a.methods.split(",")}

    from tianying.config import Config

    n = Config.from_name("demo", hidden_size=a.hidden, n_layer=a.layers, intermediate_size=a.ffn,
                         n_head=a.heads, n_kv_head=a.heads).n_params
    mib = 2**20
    print(f"model: {n / 1e6:.1f}M parameters (hidden {a.hidden}, {a.layers} layers, vocab 16000); batch {a.batch} × "
          f"seq {a.seq}; {a.device or 'cpu'}{' bf16' if a.bf16 else ' fp32'}"
          f"{', activation checkpointing' if a.activation_checkpointing else ''}")
    print(f"{'method':<7} {'trainable':>11} {'estimate MiB':>13} {'peak MiB':>9} {'vs full':>8} {'s/iter':>7} "
          f"{'vs full':>8} | seed 7B: {'GB':>5} {'vs full':>8} {'s/iter':>7}")
    full = results.get("full")
    for m, r in results.items():
        mem_ratio = r["peak_bytes"] / full["peak_bytes"] if full else float("nan")
        t_ratio = r["seconds_per_step"] / full["seconds_per_step"] if full else float("nan")
        sg, ss = SEED_TABLE[m]
        print(f"{m:<7} {r['trainable_params']:>11,} {r['estimate_bytes']['total'] / mib:>13.0f} "
              f"{r['peak_bytes'] / mib:>9.0f} {mem_ratio:>8.2f} {r['seconds_per_step']:>7.3f} {t_ratio:>8.2f} | "
              f"{'':>8} {sg:>5.1f} {sg / SEED_TABLE['full'][0]:>8.2f} {ss:>7.2f}")
    print(json.dumps({"benchmark": "finetune", "params": n, "seq": a.seq, "batch": a.batch,
                      "device": a.device or "cpu", "bf16": a.bf16,
                      "activation_checkpointing": a.activation_checkpointing,
                      "results": {m: {"peak_bytes": r["peak_bytes"], "estimate_bytes": r["estimate_bytes"]["total"],
                                      "seconds_per_step": r["seconds_per_step"],
                                      "trainable_params": r["trainable_params"]} for m, r in results.items()},
                      "seed": {m: {"memory_gb": g, "s_per_iter": s} for m, (g, s) in SEED_TABLE.items()}}))


if __name__ == "__main__":
    main()
