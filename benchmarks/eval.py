"""Multiple-choice scoring cost: shared-prompt scoring (tianying.eval.scoring) vs the naive per-choice forward.

    .venv/bin/python benchmarks/eval.py [--data-dir DIR] [--items N] [--config demo] [--batch-size B]

Builds a randomly initialised model of `--config` with the demo tokenizer, renders 5-shot C-Eval prompts
(single-token letters) and 0-shot poem_mc prompts (multi-token couplets), and times three ways of getting the
same log-likelihoods: naive (one full forward of prompt + choice per choice), shared per item (batch 1), and
shared batched. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tianying.config import Config
from tianying.eval.harness import EvalLM, build_prompt, load_jsonl, load_task, sample_data_dir, select_shots
from tianying.eval.scoring import naive_loglikelihood, score_continuations, score_requests
from tianying.model import build_model
from tianying.tokenizer import Tokenizer

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "tianying" / "assets" / "demo-tokenizer"


def requests_for(task_name: str, lm: EvalLM, data_dir: Path, n: int) -> list:
    task = load_task(task_name)
    files = task.data_files
    docs = load_jsonl(data_dir / files["test"])[:n]
    pool = load_jsonl(data_dir / files["fewshot"]) if "fewshot" in files else []
    k = int(task.get("num_fewshot", 0))
    out = []
    for d in docs:
        prompt = build_prompt(task, d, select_shots(task, d, pool, k))
        conts = [lm.encode(task.get("target_delimiter", "") + c.format_map(d)) for c in task.get("doc_to_choice")]
        out.append((lm.encode(prompt)[-(lm.max_length - 64):], conts))
    return out


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(sample_data_dir()))
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = Tokenizer.from_dir(DEMO_TOKENIZER)
    cfg = Config.from_name(args.config, vocab_size=max(tok.vocab_size, Config.from_name(args.config).vocab_size))
    model = build_model(cfg, seed=0).eval()
    lm = EvalLM(model, tok, batch_size=args.batch_size)
    rows, record = [], {"config": args.config, "items": args.items, "threads": torch.get_num_threads()}
    with torch.inference_mode():
        for task in ("ceval", "poem_mc"):
            reqs = requests_for(task, lm, Path(args.data_dir), args.items)
            n = len(reqs)
            score_requests(model, reqs[:2], args.batch_size, lm.pad_id)  # warm-up (allocator, RoPE table)
            t_naive, ref = timed(lambda r=reqs: [[naive_loglikelihood(model, c, x) for x in xs] for c, xs in r])
            t_item, per = timed(lambda r=reqs: [score_continuations(model, c, xs) for c, xs in r])
            t_batch, bat = timed(lambda r=reqs: score_requests(model, r, args.batch_size, lm.pad_id))
            err = max(abs(a - b) for r1, r2 in zip(ref, bat) for a, b in zip(r1, r2))
            err = max(err, max(abs(a - b) for r1, r2 in zip(ref, per) for a, b in zip(r1, r2)))
            ptoks = sum(len(c) for c, _ in reqs) / n
            for how, t in (("naive per choice", t_naive), ("shared, per item", t_item), ("shared, batched", t_batch)):
                rows.append((task, how, n / t, t_naive / t))
            record[task] = {"prompt_tokens_mean": round(ptoks, 1), "items_per_s_naive": n / t_naive,
                            "items_per_s_shared": n / t_item, "items_per_s_batched": n / t_batch,
                            "max_abs_diff": err}
    print(f"config {args.config}, {args.items} items per task, {torch.get_num_threads()} threads")
    print(f"{'task':8}  {'method':18}  {'items/s':>8}  {'speedup':>7}")
    for task, how, ips, sp in rows:
        print(f"{task:8}  {how:18}  {ips:8.2f}  {sp:6.2f}x")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
