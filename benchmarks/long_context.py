"""Long context: what each extension technique buys on a model trained at native length L (issue 8).

For lengths L, 2L, 4L, 8L and each method — none, linear (PI), ntk (static NTK-aware), dynamic (dynamic NTK),
yarn, each of those + LogN, and window attention (W = L, with and without 4 sink tokens) — measures:
- perplexity on held-out text (the corpus' *.valid.jsonl.gz documents, round-robin over files, joined with
  EOS into one stream and cut into sequences of the length), every position of each sequence scored;
- passkey retrieval: a random 5-digit number hidden at a random depth of filler text, asked for at the end;
  a hit means greedy decoding reproduces every token of the key (checked teacher-forced: one forward);
- parity: max |Δlogit| against transformers' LlamaForCausalLM on the same weights, for every scaling kind
  transformers has (ntk loads there as plain RoPE with the NTK base), on one sequence per length;
- decode tokens/s (32 tokens after a prompt of the length) and peak memory (resident-set high-water mark
  in a fresh subprocess, above the loaded model), full KV cache vs the window's ring buffer with chunked prefill.

Scaling factors are matched to the length: f = n/L for linear, ntk, dynamic and yarn (so every method equals
`none` at n = L); max_position_embeddings is set to L for the run, which is what dynamic, yarn and LogN
measure against. Window runs prefill in chunks of L through the ring cache, as generation does.

    .venv/bin/python benchmarks/long_context.py --checkpoint runs/demo/final --native-length 256

Prints a table per measurement, writes a PNG (perplexity vs length per method) and, as its last line, one JSON
document.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "corpus"
SCALINGS = ("none", "linear", "ntk", "dynamic", "yarn")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


# ---------------------------------------------------------------------------------------------- model
def load(checkpoint: str | None, native: int, seed: int = 0):
    """(model fp32 eval, config, tokenizer); a random demo model with the demo tokenizer when no checkpoint."""
    from tianying.config import Config
    from tianying.model import build_model
    from tianying.tokenizer import Tokenizer

    if checkpoint:
        from tianying.checkpoint import load_model

        model, cfg = load_model(checkpoint, dtype=torch.float32)
        tok_dir = checkpoint
    else:
        cfg = Config.from_name("demo")
        model = build_model(cfg, seed=seed)
        tok_dir = ROOT / "tianying" / "assets" / "demo-tokenizer"
    return model.eval(), cfg.replace(max_position_embeddings=native), Tokenizer.from_dir(tok_dir)


def method_config(base, method: str, n: int, native: int):
    """The config for `method` ("ntk+logn", "window", ...) evaluated at length n."""
    f = max(n / native, 1.0)
    kind, _, extra = method.partition("+")
    changes: dict = {"rope_scaling": None, "logn_attention": extra == "logn", "attention_window": None,
                     "attention_sinks": 0}
    if kind in ("linear", "ntk", "dynamic", "yarn") and f > 1:
        changes["rope_scaling"] = {"type": kind, "factor": f}
    if kind == "window":
        changes.update(attention_window=native, attention_sinks=4 if extra == "sinks" else 0,
                       logn_attention=False)
    return base.replace(**changes)


@torch.inference_mode()
def logits_for(model, cfg, ids: torch.Tensor, native: int) -> torch.Tensor:
    """Logits [B, T, V]; window configs go through the ring cache in chunks of `native` tokens."""
    from tianying.model import KVCache, set_config

    set_config(model, cfg)
    if not cfg.attention_window:
        return model(ids)
    cache = KVCache(cfg, ids.shape[0], ids.shape[1], torch.float32, "cpu")  # the window's ring
    return torch.cat([model(ids[:, a:a + native], cache=cache) for a in range(0, ids.shape[1], native)], 1)


# ---------------------------------------------------------------------------------------------- data
def token_stream(tok, need: int, files: list[Path]) -> list[int]:
    """Held-out documents, round-robin over files, joined by EOS, until `need` tokens."""
    readers = [gzip.open(f, "rt", encoding="utf-8") for f in files]
    out: list[int] = []
    try:
        while len(out) < need and readers:
            for r in list(readers):
                line = r.readline()
                if not line:
                    readers.remove(r)
                    continue
                out += tok.encode(json.loads(line)["text"]) + [tok.eos_id]
    finally:
        for r in readers:
            r.close()
    if len(out) < need:
        raise SystemExit(f"only {len(out)} held-out tokens; need {need}")
    return out[:need]


def passkey_prompt(tok, n: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """(prompt ids ending in 'The pass key is', key ids) with the prompt + key exactly n tokens long."""
    key = str(rng.randint(10000, 99999))
    needle = tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = tok.encode(" What is the pass key? The pass key is")
    answer = tok.encode(f" {key}")
    unit = tok.encode(FILLER)
    budget = n - len(needle) - len(question) - len(answer)
    filler = (unit * (budget // len(unit) + 1))[:budget]
    depth = rng.randint(0, budget)
    return filler[:depth] + needle + filler[depth:] + question, answer


# ---------------------------------------------------------------------------------------------- measurements
def perplexity(model, cfg, seqs: torch.Tensor, native: int) -> float:
    nll, count = 0.0, 0
    for row in seqs:
        logits = logits_for(model, cfg, row[None], native)[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
        count += row.numel() - 1
    return math.exp(nll / count)


def passkey(model, cfg, prompts: list[tuple[list[int], list[int]]], native: int) -> tuple[float, float]:
    """(hit rate, mean log-probability per key token)."""
    hits, logp, n_tok = 0, 0.0, 0
    for prompt, key in prompts:
        ids = torch.tensor([prompt + key])
        lp = logits_for(model, cfg, ids, native)[0, len(prompt) - 1:-1].float().log_softmax(-1)
        target = torch.tensor(key)
        hits += bool((lp.argmax(-1) == target).all())
        logp += float(lp.gather(1, target[:, None]).sum())
        n_tok += len(key)
    return hits / len(prompts), logp / n_tok


def parity(model, cfg, ids: torch.Tensor) -> float | None:
    """max |Δlogit| vs transformers on the same weights (None where transformers lacks the method)."""
    import transformers

    from tianying.model import set_config

    if cfg.logn_attention or cfg.attention_window:
        return None
    transformers.logging.set_verbosity_error()
    hf_cfg = {k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).eval()
    hf.load_state_dict(model.state_dict(), strict=False, assign=True)
    set_config(model, cfg)
    with torch.inference_mode():
        return float((model(ids) - hf(input_ids=ids).logits).abs().max())


def decode_worker(a) -> dict:
    """In a fresh process: peak RSS above the loaded model, and decode tokens/s, for one (length, window)."""
    from tianying.engine import Engine, Request
    from tianying.generate import SamplingParams

    torch.set_num_threads(a.threads)
    model, cfg, _ = load(a.checkpoint, a.native_length)
    if a.window:
        cfg = cfg.replace(attention_window=a.native_length)
    from tianying.model import set_config

    set_config(model, cfg)
    prompt = torch.randint(3, cfg.vocab_size - 8, (a.length,), generator=torch.Generator().manual_seed(0)).tolist()
    engine = Engine(model, max_batch=1, max_len=a.length + a.new_tokens + 2, prefix_cache_bytes=0)
    engine.generate_ids([prompt[:8]], SamplingParams(max_new_tokens=4))  # warm-up, lazy inits
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    it = engine.run([Request(prompt, SamplingParams(max_new_tokens=a.new_tokens + 1))])
    next(it)  # prefill + first token
    t = time.perf_counter()
    n = sum(len(ev.tokens) for _, ev in it)
    dt = time.perf_counter() - t
    return {"tok_s": n / dt, "peak_mib": (_status("VmHWM") - base) / 2**20}


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def decode_runs(a, lengths: list[int]) -> dict:
    out: dict = {}
    for n in lengths:
        for window in (False, True):
            cmd = [sys.executable, __file__, "--worker", "--length", str(n), "--native-length", str(a.native_length),
                   "--new-tokens", str(a.new_tokens), "--threads", str(a.threads)]
            cmd += ["--checkpoint", a.checkpoint] if a.checkpoint else []
            cmd += ["--window"] if window else []
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[f"{'window' if window else 'full'}@{n}"] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------------------------------------- report
def table(title: str, rows: dict[str, dict[int, object]], lengths: list[int], fmt) -> str:
    head = f"| {title} | " + " | ".join(f"{n}" for n in lengths) + " |"
    lines = [head, "|" + "---|" * (len(lengths) + 1)]
    for name, vals in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(vals.get(n)) for n in lengths) + " |")
    return "\n".join(lines)


def plot(ppl: dict[str, dict[int, float]], lengths: list[int], native: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab20").colors
    for i, (name, vals) in enumerate(ppl.items()):
        style = "--" if "logn" in name else ":" if "window" in name else "-"
        ax.plot(lengths, [vals[n] for n in lengths], marker="o", linestyle=style, color=colors[i % 20], label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [f"{n // native}L={n}" for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_title(f"Perplexity vs length, native length L={native}")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: a random demo model)")
    p.add_argument("--native-length", type=int, default=256, help="L: the sequence length the model trained at")
    p.add_argument("--multiples", default="1,2,4,8", help="lengths as multiples of L")
    p.add_argument("--seqs", type=int, default=2, help="held-out sequences at the longest length (more when shorter:"
                   " every length scores the same number of tokens)")
    p.add_argument("--passkeys", type=int, default=5, help="passkey trials per length")
    p.add_argument("--new-tokens", type=int, default=32, help="decode tokens per speed run")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-decode", action="store_true", help="skip the decode speed/memory subprocesses")
    p.add_argument("--plot", default="benchmarks/long_context.png", help="PNG output path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--window", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(decode_worker(a)))
        return
    torch.set_num_threads(a.threads)
    L = a.native_length
    lengths = [L * int(m) for m in a.multiples.split(",")]
    model, base, tok = load(a.checkpoint, L, a.seed)
    methods = [*SCALINGS, *(f"{s}+logn" for s in SCALINGS), "window", "window+sinks"]
    files = sorted(CORPUS.glob("*.valid.jsonl.gz"))
    total = max(lengths) * a.seqs
    stream = torch.tensor(token_stream(tok, total, files))
    rng = random.Random(a.seed)
    t0 = time.perf_counter()
    ppl: dict[str, dict[int, float]] = {m: {} for m in methods}
    hit: dict[str, dict[int, float]] = {m: {} for m in methods}
    keylp: dict[str, dict[int, float]] = {m: {} for m in methods}
    par: dict[str, dict[int, float | None]] = {m: {} for m in SCALINGS}
    for n in lengths:
        seqs = stream[: total // n * n].view(-1, n)
        prompts = [passkey_prompt(tok, n, rng) for _ in range(a.passkeys)]
        for m in methods:
            cfg = method_config(base, m, n, L)
            ppl[m][n] = perplexity(model, cfg, seqs, L)
            hit[m][n], keylp[m][n] = passkey(model, cfg, prompts, L)
            if m in SCALINGS:
                par[m][n] = parity(model, cfg, seqs[:1])
        print(f"  length {n}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    decode = {} if a.no_decode else decode_runs(a, lengths)

    print(f"checkpoint: {a.checkpoint or 'random demo model'}; native length L = {L}; "
          f"{total} held-out tokens per length; {a.passkeys} passkeys per length\n")
    print(table("perplexity", ppl, lengths, lambda v: f"{v:.1f}"), "\n")
    print(table("passkey hits", hit, lengths, lambda v: f"{v:.0%}"), "\n")
    print(table("passkey log p/token", keylp, lengths, lambda v: f"{v:.2f}"), "\n")
    print(table("max abs dlogit vs transformers", par, lengths,
                lambda v: "n/a" if v is None else f"{v:.1e}"), "\n")
    if decode:
        rows = {f"{k} {what}": {n: decode[f"{k}@{n}"][key] for n in lengths}
                for k in ("full", "window") for what, key in (("decode tok/s", "tok_s"), ("peak MiB", "peak_mib"))}
        print(table("decode", rows, lengths, lambda v: f"{v:.1f}"), "\n")
    plot(ppl, lengths, L, Path(a.plot))
    print(f"plot: {a.plot}")
    print(json.dumps({"checkpoint": a.checkpoint, "native_length": L, "lengths": lengths, "perplexity": ppl,
                      "passkey_hit_rate": hit, "passkey_logp": keylp, "parity_vs_transformers": par,
                      "decode": decode, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
