"""DPO (full, LoRA) vs SFT on the same model and data: tokens/s and peak memory.

    .venv/bin/python benchmarks/dpo.py                       # CPU, models/demo-chat, the bundled preference sample
    .venv/bin/python benchmarks/dpo.py --device cuda --batch 16

SFT trains on the chosen conversations (prompt + chosen reply); DPO on the pairs, so a DPO step of B pairs runs
2B rows through the policy, plus a reference forward of 2B rows unless the reference log-probs are precomputed.
Each run is `tianying finetune` in its own process (one run's peak cannot hide another's). Reported: seconds per
optimizer step (first logged step left out), tokens/s = all tokens the policy processes per second (rows ×
their real lengths, no padding), trained (reply) tokens/s from metrics.csv, the recipe's memory estimate and the
measured peak (GPU: max allocated; CPU: peak resident set above the pre-load baseline). Prints a table, then one
JSON line. The CPU numbers come from a shared, noisy machine: compare ratios, not absolutes.
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
PAIRS = ROOT / "tianying" / "assets" / "preference-demo.jsonl"

RUNS = {  # name: (method, extra flags)
    "sft-full": ("full", []),
    "sft-lora": ("lora", []),
    "dpo-full": ("dpo", ["--policy", "full"]),
    "dpo-full-precomputed": ("dpo", ["--policy", "full", "--precompute-ref"]),
    "dpo-lora": ("dpo", ["--policy", "lora"]),
    "dpo-lora-precomputed": ("dpo", ["--policy", "lora", "--precompute-ref"]),
}


def make_data(out: Path, repeat: int) -> tuple[Path, Path]:
    recs = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines() if line.strip()] * repeat
    recs = [dict(r, id=f"{r['id']}-{i}") for i, r in enumerate(recs)]
    pref, sft = out / "pairs.jsonl", out / "chosen.jsonl"
    pref.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs), encoding="utf-8")
    sft.write_text("\n".join(json.dumps({"id": r["id"], "prompt": r["prompt"], "completion": r["chosen"]},
                                        ensure_ascii=False) for r in recs), encoding="utf-8")
    return pref, sft


def processed_tokens_per_step(data: Path, method: str, checkpoint: Path, batch: int) -> float:
    """Mean real (unpadded) tokens the policy sees per optimizer step."""
    from tianying.templates import checkpoint_template
    from tianying.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(checkpoint)
    from tianying import checkpoint as ckpt

    template = checkpoint_template(checkpoint, ckpt.load_config(checkpoint), None)
    if method == "dpo":
        from tianying.train.preference import load_preference

        pairs, _ = load_preference(data, tok, template, 256)
        per_item = sum(len(p.chosen_ids) + len(p.rejected_ids) - 2 for p in pairs) / len(pairs)
    else:
        from tianying.data.sft import load_sft

        ex, _ = load_sft(data, tok, template, 256)
        per_item = sum(len(e) - 1 for e in ex) / len(ex)
    return per_item * batch


def run(name: str, checkpoint: Path, pref: Path, sft: Path, out: Path, a: argparse.Namespace) -> dict:
    method, extra = RUNS[name]
    data = pref if method == "dpo" else sft
    cmd = [sys.executable, "-m", "tianying", "finetune", "--method", method, "--data", str(data),
           "--checkpoint", str(checkpoint), "--out-dir", str(out), *extra, "seq_length=256",
           f"batch_size={a.batch}", f"max_steps={a.steps}", "log_interval=1", f"save_interval={a.steps + 1}",
           "progress=false", "tensorboard=false", "plot=false", "lr=1e-4", "lora_r=16", "lora_alpha=32",
           "lora_dropout=0.0", "keep_last_k=1", "shuffle=false"]
    if a.device:
        cmd.append(f"device={a.device}")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)} if a.threads else dict(os.environ)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{name} failed:\n{p.stdout}\n{p.stderr}")
    summary = json.loads((out / "finetune_summary.json").read_text())
    from tianying.train.log import read_metrics

    rows = [r for r in read_metrics(out / "metrics.csv") if r.get("tokens_per_sec")][1:]
    summary["trained_tokens_per_sec"] = sum(r["tokens_per_sec"] for r in rows) / max(1, len(rows))
    per_step = processed_tokens_per_step(data, method, checkpoint, a.batch)
    summary["tokens_per_sec"] = per_step / summary["seconds_per_step"]
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "models" / "demo-chat"))
    ap.add_argument("--batch", type=int, default=8, help="pairs (DPO) or conversations (SFT) per step")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=2, help="copies of the 40 bundled pairs")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", default=",".join(RUNS))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pref, sft = make_data(tmp, a.repeat)
        results = {n: run(n, Path(a.checkpoint), pref, sft, tmp / n, a) for n in a.runs.split(",")}
    mib = 2**20
    print(f"model: {a.checkpoint}; batch {a.batch} (pairs for DPO, conversations for SFT); {a.device or 'cpu'} fp32")
    print(f"{'run':<22} {'s/step':>7} {'tokens/s':>9} {'trained tok/s':>14} {'estimate MiB':>13} {'peak MiB':>9}")
    for n, r in results.items():
        print(f"{n:<22} {r['seconds_per_step']:>7.3f} {r['tokens_per_sec']:>9.0f} {r['trained_tokens_per_sec']:>14.0f} "
              f"{r['estimate_bytes']['total'] / mib:>13.0f} {r['peak_bytes'] / mib:>9.0f}")
    print(json.dumps({"benchmark": "dpo", "checkpoint": a.checkpoint, "batch": a.batch, "steps": a.steps,
                      "device": a.device or "cpu",
                      "results": {n: {k: r[k] for k in ("seconds_per_step", "tokens_per_sec", "trained_tokens_per_sec",
                                                         "peak_bytes", "trainable_params")}
                                  | {"estimate_bytes": r["estimate_bytes"]["total"]} for n, r in results.items()}}))


if __name__ == "__main__":
    main()
