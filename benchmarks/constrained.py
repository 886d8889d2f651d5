"""Per-token cost of constrained decoding: the same model and prompt decoded free and under a JSON schema.

Both runs sample (temperature 1, one seed) `--tokens` new tokens at batch 1 on the engine; the schema is an
object with long free-text fields, so the grammar never ends the reply early. Prints a table and one JSON line.

    python benchmarks/constrained.py models/demo-chat --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "string", "maxLength": 4000}, "notes": {"type": "array", "items": {"type": "string"}}},
    "required": ["answer", "notes"], "additionalProperties": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", default=str(Path(__file__).resolve().parents[1] / "models" / "demo-chat"))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from tianying.api import LLM
    from tianying.engine import Engine, Request

    llm = LLM.load(a.checkpoint)
    engine = Engine(llm.model, llm.tokenizer, max_batch=1, prefix_cache_bytes=0)
    ids = llm.encode_prompt("Answer in JSON: what is the capital of France?")
    grammar = ("json_schema", json.dumps(SCHEMA))

    def rate(constrained: bool) -> float:
        params = llm.sampling_params(max_new_tokens=a.tokens, temperature=1.0, seed=0, stop_token_ids=(),
                                     grammar=grammar if constrained else None)
        t = time.perf_counter()
        n = sum(len(ev.tokens) for _, ev in engine.run([Request(ids, params)]))
        return n / (time.perf_counter() - t)

    rate(False), rate(True)  # warm-up: kernels, llguidance's tokenizer (once per engine)
    runs = {"free": [], "json_schema": []}
    for _ in range(a.repeats):  # alternated, so load changes hit both
        runs["free"].append(rate(False))
        runs["json_schema"].append(rate(True))
    med = {k: statistics.median(v) for k, v in runs.items()}
    # the mask itself, timed alone: replay one constrained reply through a fresh matcher
    import llguidance.torch as lgt

    params = llm.sampling_params(max_new_tokens=a.tokens, temperature=1.0, seed=0, stop_token_ids=(), grammar=grammar)
    toks = [t for _, ev in engine.run([Request(ids, params)]) for t in ev.tokens]
    m = engine.grammar_matcher(grammar)
    mask = lgt.allocate_token_bitmask(1, engine._lltok.vocab_size)
    logits = torch.zeros(1, llm.config.vocab_size)
    per = []
    for tok in toks:
        t = time.perf_counter()
        lgt.fill_next_token_bitmask(m, mask, 0)
        lgt.apply_token_bitmask_inplace(logits, mask)
        per.append(time.perf_counter() - t)
        m.consume_token(tok)
    mask_ms = statistics.median(per) * 1000  # the median: the first mask of a grammar also builds its lexer
    overhead_ms = (1 / med["json_schema"] - 1 / med["free"]) * 1000
    print(f"{'decoding':<12} {'tok/s (median of ' + str(a.repeats) + ')':>22}")
    for k, v in med.items():
        print(f"{k:<12} {v:>22.1f}")
    print(f"mask per token, timed alone: {mask_ms:.3f} ms ({mask_ms / (1000 / med['free']) * 100:.1f}% of a free "
          f"step); end-to-end difference {overhead_ms:.2f} ms/token ({med['json_schema'] / med['free']:.2f}x the free "
          "rate, within run-to-run noise when small)")
    print(json.dumps({"benchmark": "constrained", "checkpoint": a.checkpoint, "threads": a.threads,
                      "tokens": a.tokens, "tok_s": med, "runs": runs, "overhead_ms_per_token": round(overhead_ms, 3),
                      "mask_ms_per_token": round(mask_ms, 4)}))


if __name__ == "__main__":
    sys.exit(main())
