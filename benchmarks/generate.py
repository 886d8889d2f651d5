"""Generation speed: tianying vs transformers on the same random weights, in the same run.

Measures, per size and dtype:
- decode tokens/s at batch 1 and batch 8 (32-token prompt, 128 new tokens, greedy, EOS ignored), end to end
  (prefill of the short prompt included: < 1% of the time);
- prefill tokens/s for one 512-token prompt (time to the first new token);
- peak resident memory (VmHWM) in a fresh subprocess per (size, dtype, implementation) whose high-water mark
  is reset after the model is built, so it shows weights + generation working memory, not init transients;
- the memory-bandwidth bound: bytes read per decode step ÷ read bandwidth measured here (a large tensor sum).
  A step reads every layer weight, the whole LM head, one embedding row per sequence and the KV cache.

tianying and transformers share the same weight tensors and run interleaved (ours, theirs, ours, ...) so that
noise from other processes hits both alike; medians of `--repeats` after `--warmup` runs.

    .venv/bin/python benchmarks/generate.py --sizes demo,tiny,small --dtypes fp32,bf16 --threads 2

With `--llama-cpp DIR` it instead measures tianying against llama.cpp on the same random weights of a shape
(`--shape 135m`: the issues' 135M LLaMA shape): the checkpoint is exported to GGUF by tianying's exporter,
llama-quantize makes BF16, Q8_0 and pure Q4_0 (every matrix, LM head included) files, llama-bench measures
pp512 and tg64 and llama-batched-bench batch-8 decode; tianying loads the same checkpoint as fp32, bf16,
int8 + head and int4 (g64) + head and measures decode at batch 1 and 8 (decode steps only: the time of
1 + N tokens minus that of 1) and a 512-token prefill (the time to the first token), through the engine:

    .venv/bin/python benchmarks/generate.py --llama-cpp /path/to/llama.cpp --shape 135m --threads 2

Prints one table per size and, as its last line, one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("tianying", "transformers")


# ---------------------------------------------------------------------------------------------- measurement
def read_bandwidth(gib: float = 0.5, repeats: int = 7) -> float:
    """Read bandwidth in bytes/s: the median time of summing a tensor far larger than any cache."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times)


def step_bytes(cfg, dtype: torch.dtype, batch: int, context: float) -> float:
    """Bytes one decode step reads: all weights but the input embedding, `batch` embedding rows, the KV cache."""
    esize = torch.finfo(dtype).bits // 8
    embed = cfg.vocab_size * cfg.hidden_size
    weights = cfg.n_params - embed + batch * cfg.hidden_size
    kv = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * context * batch
    return (weights + kv) * esize


def vm_hwm_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (Linux ≥ 4.0)
        f.write("5")


def build_pair(size: str, dtype: torch.dtype, impls: tuple[str, ...]):
    """(config, tianying model or None, transformers model or None) with identical weights."""
    from tianying.config import Config
    from tianying.model import build_model

    cfg = Config.from_name(size)
    ours = build_model(cfg, seed=0).eval().to(dtype)
    hf = None
    if "transformers" in impls:
        import transformers

        transformers.logging.set_verbosity_error()  # demo's bos/eos ids lie outside its 16k vocab: harmless
        hcfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items()
                                           if k not in ("architectures", "model_type", "torch_dtype")})
        hf = transformers.LlamaForCausalLM(hcfg).eval().to(dtype)
        hf.load_state_dict(ours.state_dict(), assign=True)  # shares our tensors: same bytes, no copy
    return cfg, (ours if "tianying" in impls else None), hf


def runners(cfg, ours, hf, prompt_len: int, new_tokens: int, batch: int, prefill: int) -> dict[str, dict]:
    """{workload: {impl: (fn returning generated ids [B, N], tokens produced)}}."""
    from tianying.engine import Engine
    from tianying.generate import SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = {
        "decode_b1": torch.randint(3, cfg.vocab_size, (1, prompt_len), generator=g),
        f"decode_b{batch}": torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=g),
        "prefill": torch.randint(3, cfg.vocab_size, (1, prefill), generator=g),
    }
    out: dict[str, dict] = {}
    for name, ids in prompts.items():
        n = 1 if name == "prefill" else new_tokens
        count = ids.shape[1] if name == "prefill" else ids.shape[0] * n
        fns: dict[str, tuple[Callable, int]] = {}
        if ours is not None:
            engine = Engine(ours, max_batch=max(batch, 1), max_len=prompt_len + new_tokens + max(prefill, 1) + 1,
                            prefill_chunk=max(prefill, prompt_len), prefix_cache_bytes=0)

            def run_ours(ids=ids, n=n, engine=engine):
                return torch.tensor(engine.generate_ids(ids.tolist(), SamplingParams(max_new_tokens=n)))
            fns["tianying"] = (run_ours, count)
        if hf is not None:
            def run_hf(ids=ids, n=n):
                with torch.inference_mode():
                    return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                       min_new_tokens=n, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
            fns["transformers"] = (run_hf, count)
        out[name] = fns
    return out


def worker_timing(a) -> dict:
    dtype = DTYPES[a.dtype]
    cfg, ours, hf = build_pair(a.size, dtype, IMPLS)
    res: dict = {"size": a.size, "dtype": a.dtype, "bandwidth": read_bandwidth(), "tok_s": {}, "match": {}}
    for name, fns in runners(cfg, ours, hf, a.prompt, a.new_tokens, a.batch, a.prefill).items():
        times: dict[str, list[float]] = {k: [] for k in fns}
        outs = {}
        for i in range(a.warmup + a.repeats):
            for impl, (fn, _) in fns.items():
                t = time.perf_counter()
                outs[impl] = fn()
                if i >= a.warmup:
                    times[impl].append(time.perf_counter() - t)
        res["tok_s"][name] = {impl: fns[impl][1] / statistics.median(ts) for impl, ts in times.items()}
        res["match"][name] = bool(torch.equal(outs["tianying"], outs["transformers"]))
    return res


def worker_memory(a) -> dict:
    import gc

    dtype = DTYPES[a.dtype]
    cfg, ours, hf = build_pair(a.size, dtype, (a.impl,))
    model = ours if a.impl == "tianying" else hf
    del ours, hf
    gc.collect()
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    fns = runners(cfg, model if a.impl == "tianying" else None, model if a.impl == "transformers" else None,
                  a.prompt, a.new_tokens, a.batch, a.prefill)
    reset_hwm()
    for workload in fns.values():
        workload[a.impl][0]()
    return {"peak_mb": vm_hwm_mb(), "weights_mb": weights_mb}


# ---------------------------------------------------------------------------------------------- vs llama.cpp
PEER_VARIANTS = [  # tianying (dtype, quantize) and the llama.cpp file of the same weights
    ("fp32", torch.float32, None, "f32"),
    ("bf16", torch.bfloat16, None, "bf16"),
    ("int8 + head", torch.float32, "int8-head", "q8_0-pure"),
    ("int4 g64 + head", torch.float32, {"bits": 4, "group_size": 64, "sym": True, "lm_head": True}, "q4_0-pure"),
]


def ours_rates(ckpt, dtype, quant, threads: int, batch: int, prompt: int, new: int, prefill: int,
               repeats: int) -> dict:
    """tok/s of decode at batch 1 and `batch` (steps only) and of one `prefill`-token prompt, via the engine."""
    from tianying.engine import Engine
    from tianying.generate import SamplingParams
    from tianying.quantize import load

    model, cfg = load(ckpt, dtype=dtype, quantize=quant)
    model.eval()
    g = torch.Generator().manual_seed(0)
    engine = Engine(model, max_batch=batch, max_len=max(prompt + new, prefill) + 2, prefill_chunk=prefill,
                    prefix_cache_bytes=0)

    def timed(ids: list, n: int) -> float:
        best = float("inf")
        for _ in range(repeats + 1):  # the first is a warm-up
            t = time.perf_counter()
            engine.generate_ids(ids, SamplingParams(max_new_tokens=n))
            best = min(best, time.perf_counter() - t)
        return best

    out = {}
    for b in (1, batch):
        ids = torch.randint(3, cfg.vocab_size, (b, prompt), generator=g).tolist()
        out[f"decode_b{b}"] = b * new / max(timed(ids, new + 1) - timed(ids, 1), 1e-9)
    ids = torch.randint(3, cfg.vocab_size, (1, prefill), generator=g).tolist()
    out["prefill"] = prefill / timed(ids, 1)
    out["weights_bytes"] = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
                               if t is not model.model.embed_tokens.weight)
    return out


def peer_rates(bins: dict, gguf, threads: int, batch: int, prompt: int, new: int, prefill: int,
               repeats: int) -> dict:
    """llama-bench pp/tg and llama-batched-bench batch decode on one GGUF file."""
    from llama_cpp import _run

    p = _run([bins["llama-bench"], "-m", gguf, "-p", prefill, "-n", new, "-t", threads, "-r", repeats, "-o", "json"],
             f"llama-bench {gguf.name}")
    rows = json.loads(p.stdout)
    out = {"decode_b1": next(float(r["avg_ts"]) for r in rows if r["n_gen"] == new and r["n_prompt"] == 0),
           "prefill": next(float(r["avg_ts"]) for r in rows if r["n_prompt"] == prefill and r["n_gen"] == 0)}
    bb = bins.get("llama-batched-bench")
    if bb is not None:
        p = _run([bb, "-m", gguf, "-c", (prompt + new) * batch + 64, "-b", 2048, "-ub", 512, "-npp", prompt,
                  "-ntg", new, "-npl", batch, "-t", threads, "--output-format", "jsonl"],
                 f"llama-batched-bench {gguf.name}")
        rec = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
        out[f"decode_b{batch}"] = float(next(r["speed_tg"] for r in rec if int(r["pl"]) == batch))
    return out


def vs_llama_cpp(a) -> None:
    import shutil
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import llama_cpp as lc
    from serve import random_checkpoint

    bins = lc.find_binaries(a.llama_cpp)
    bb = Path(bins["llama-bench"]).with_name("llama-batched-bench")
    if bb.is_file():
        bins["llama-batched-bench"] = bb
    bw = read_bandwidth()
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tianying-vs-llama-") as tmp:
        tmp = Path(tmp)
        ckpt = random_checkpoint(a.shape, tmp / "ckpt")
        f32 = tmp / "model-f32.gguf"
        lc.export_gguf(ckpt, f32)
        for label, dtype, quant, variant in PEER_VARIANTS:
            if a.variants and label.split()[0] not in a.variants.split(","):
                continue
            gguf = f32 if variant == "f32" else lc.quantize(bins, f32, variant, tmp, a.threads)
            theirs, ours = {}, {}
            for rnd in range(a.rounds):  # alternating, best of each: noise on a shared machine hits both sides
                print(f"{label}: llama.cpp {variant} (round {rnd + 1})...", file=sys.stderr, flush=True)
                t = peer_rates(bins, gguf, a.threads, a.batch, a.prompt, a.new_tokens, a.prefill, a.repeats)
                print(f"{label}: tianying (round {rnd + 1})...", file=sys.stderr, flush=True)
                o = ours_rates(ckpt, dtype, quant, a.threads, a.batch, a.prompt, a.new_tokens, a.prefill, a.repeats)
                theirs = {k: max(v, theirs.get(k, 0.0)) for k, v in t.items()}
                ours = {k: max(v, ours.get(k, 0.0)) for k, v in o.items()}
            step = ours["weights_bytes"]
            for m in ("decode_b1", f"decode_b{a.batch}", "prefill"):
                bound = bw / step * (a.batch if m != "decode_b1" else 1) if m != "prefill" else None
                rows.append({"weights": label, "llama_cpp": variant, "measure": m, "tianying": ours[m],
                             "peer": theirs.get(m), "bound": bound, "weights_mb": step / 2**20})
            if gguf != f32:
                gguf.unlink()
        shutil.rmtree(ckpt, ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"\n## tianying vs llama.cpp, random {a.shape} weights, {a.threads} threads; read bandwidth "
          f"{bw / 1e9:.1f} GB/s; load average {load0:.1f} → {load:.1f} on {os.cpu_count()} CPUs")
    print("| weights (llama.cpp file) | measure | tianying | llama.cpp | ratio | bound | tianying % of bound |")
    print("|---|---|---:|---:|---:|---:|---:|")
    names = {"decode_b1": "decode b1 tok/s", f"decode_b{a.batch}": f"decode b{a.batch} tok/s",
             "prefill": f"prefill {a.prefill} tok/s"}
    for r in rows:
        ratio = "-" if not r["peer"] else f"{r['tianying'] / r['peer']:.2f}×"
        pct = "-" if r["bound"] is None or r["measure"] != "decode_b1" else f"{100 * r['tianying'] / r['bound']:.0f}%"
        print(f"| {r['weights']} ({r['llama_cpp']}) | {names[r['measure']]} | {fmt(r['tianying'])} | "
              f"{fmt(r['peer'])} | {ratio} | {fmt(r['bound']) if r['measure'] == 'decode_b1' else '-'} | {pct} |")
    for label in dict.fromkeys(r["weights"] for r in rows):
        rr = {r["measure"]: r["tianying"] for r in rows if r["weights"] == label}
        print(f"{label}: batch-{a.batch} / batch-1 decode tokens/s = {rr[f'decode_b{a.batch}'] / rr['decode_b1']:.2f}×")
    print(json.dumps({"bench": "generate_vs_llama_cpp", "shape": a.shape, "threads": a.threads, "rounds": a.rounds,
                      "bandwidth_gbs": bw / 1e9, "load_average": [load0, load], "batch": a.batch,
                      "prompt": a.prompt, "new_tokens": a.new_tokens, "prefill": a.prefill, "results": rows}))


# ---------------------------------------------------------------------------------------------- driver
def spawn(args: list[str], threads: int) -> dict:
    # a fixed mmap threshold makes glibc return freed tensors to the OS, so VmHWM is the true working set
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="demo,tiny,small", help="comma-separated config names")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    p.add_argument("--prompt", type=int, default=32, help="decode prompt length")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per decode run")
    p.add_argument("--batch", type=int, default=8, help="the larger decode batch")
    p.add_argument("--prefill", type=int, default=512, help="prefill prompt length")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--llama-cpp", metavar="DIR", help="measure against llama.cpp (built in DIR/build/bin) instead")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --llama-cpp: alternate the two programs this many times, best of each")
    p.add_argument("--shape", default="135m", help="with --llama-cpp: a benchmarks/serve.py shape or a config name")
    p.add_argument("--variants", default="", help="with --llama-cpp: comma-separated subset of fp32,bf16,int8,int4")
    p.add_argument("--worker", choices=("timing", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    if a.llama_cpp:
        vs_llama_cpp(a)
        return
    if a.worker:
        out = worker_timing(a) if a.worker == "timing" else worker_memory(a)
        print(json.dumps(out))
        return

    from tianying.config import Config

    common = ["--threads", str(a.threads), "--prompt", str(a.prompt), "--new-tokens", str(a.new_tokens),
              "--batch", str(a.batch), "--prefill", str(a.prefill)]
    rows = []
    bw_seen = []
    load0 = os.getloadavg()[0]  # other processes on the machine skew every number: reported with the table
    b = f"decode_b{a.batch}"
    for size in a.sizes.split(","):
        cfg = Config.from_name(size)
        lines = [f"\n## {size}: hidden {cfg.hidden_size}, {cfg.n_layer} layers, vocab {cfg.vocab_size:,}, "
                 f"{cfg.n_params / 1e6:.0f}M params; {a.threads} threads",
                 "| dtype | measure | tianying | transformers | ratio | bound | tianying % of bound | greedy equal |",
                 "|---|---|---:|---:|---:|---:|---:|---|"]
        for dt in a.dtypes.split(","):
            t = spawn(["--worker", "timing", "--size", size, "--dtype", dt, "--repeats", str(a.repeats),
                       "--warmup", str(a.warmup), *common], a.threads)
            bw = t["bandwidth"]
            bw_seen.append(bw)
            ctx = a.prompt + (a.new_tokens + 1) / 2  # mean cached length over the decode steps
            bounds = {"decode_b1": bw / step_bytes(cfg, DTYPES[dt], 1, ctx),
                      b: a.batch * bw / step_bytes(cfg, DTYPES[dt], a.batch, ctx), "prefill": None}
            for name, label in (("decode_b1", "decode b1 tok/s"), (b, f"decode b{a.batch} tok/s"),
                                ("prefill", f"prefill {a.prefill} tok/s")):
                ours, hf = t["tok_s"][name]["tianying"], t["tok_s"][name]["transformers"]
                bound = bounds[name]
                row = {"size": size, "dtype": dt, "measure": name, "tianying": ours, "transformers": hf,
                       "ratio": ours / hf, "bound": bound, "greedy_equal": t["match"][name],
                       "bandwidth_gbs": bw / 1e9}
                rows.append(row)
                lines.append(f"| {dt} | {label} | {fmt(ours)} | {fmt(hf)} | {ours / hf:.2f}× | {fmt(bound)} | "
                             f"{'-' if bound is None else f'{100 * ours / bound:.0f}%'} | "
                             f"{'yes' if t['match'][name] else 'no'} |")
            if not a.no_memory:
                mem = {impl: spawn(["--worker", "memory", "--size", size, "--dtype", dt, "--impl", impl,
                                    "--repeats", "1", "--warmup", "0", *common], a.threads) for impl in IMPLS}
                ours, hf = mem["tianying"]["peak_mb"], mem["transformers"]["peak_mb"]
                rows.append({"size": size, "dtype": dt, "measure": "peak_mb", "tianying": ours, "transformers": hf,
                             "ratio": ours / hf, "weights_mb": mem["tianying"]["weights_mb"]})
                lines.append(f"| {dt} | peak RSS MB (weights {mem['tianying']['weights_mb']:,.0f}) | {fmt(ours)} | "
                             f"{fmt(hf)} | {ours / hf:.2f}× | - | - | - |")
        print("\n".join(lines), flush=True)
    bw = statistics.median(bw_seen)
    load = os.getloadavg()[0]
    print(f"\nread bandwidth (tensor sum, median over runs): {bw / 1e9:.1f} GB/s; torch {torch.__version__}; "
          f"load average at start {load0:.1f}, at end {load:.1f} on {os.cpu_count()} CPUs")
    import transformers

    print(json.dumps({"bench": "generate", "threads": a.threads, "torch": torch.__version__,
                      "transformers": transformers.__version__, "bandwidth_gbs": bw / 1e9,
                      "load_average": [load0, load], "prompt": a.prompt, "new_tokens": a.new_tokens,
                      "batch": a.batch, "prefill": a.prefill, "results": rows}))


if __name__ == "__main__":
    main()
