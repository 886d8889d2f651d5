"""Quantization benchmark: fp32 / bf16 / int8 / int4 (RTN and GPTQ) on one checkpoint.

For each variant: checkpoint size on disk, peak resident memory of the process (above its state after
imports) for encoding --prompt tokens and generating --generate more, decode tokens/s at batch 1 and 8,
and held-out perplexity on the corpus' *.valid text. Each variant runs in its own subprocess so that peak
RSS (VmHWM) is its own. Prints a table, then one JSON line. `-head` variants quantize the LM head too
(RTN; off by default as in AutoGPTQ), which on a 100k vocabulary is the largest matrix a decode step reads.

    python benchmarks/quantize.py --checkpoint ./demo-model            # a trained HF checkpoint
    python benchmarks/quantize.py --config small --no-ppl               # random weights: size/memory/speed only
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "corpus"
VARIANTS = ["fp32", "bf16", "int8", "int8-head", "int4-rtn", "int4-rtn-head", "int4-gptq"]


def _rss(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def _texts(path: Path, limit_chars: int) -> list[str]:
    out, n = [], 0
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)
            t = t if isinstance(t, str) else t.get("text", "")
            out.append(t)
            n += len(t)
            if n >= limit_chars:
                break
    return out


def _token_stream(tok, files: list[Path], n_tokens: int) -> torch.Tensor:  # noqa: ANN001
    ids: list[int] = []
    for f in files:
        for t in _texts(f, n_tokens * 8):
            ids += tok.encode(t) + ([tok.eos_id] if tok.eos_id is not None else [])
            if len(ids) >= n_tokens * (files.index(f) + 1) // len(files):
                break
    return torch.tensor(ids[:n_tokens])


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int) -> float:  # noqa: ANN001
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        x = ids[s:s + window + 1][None]
        if x.shape[1] < 2:
            break
        logits = model(x[:, :-1]).float()
        nll += float(torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum"))
        count += x.shape[1] - 1
    return math.exp(nll / count)


@torch.no_grad()
def decode_rate(model, cfg, batch: int, prompt: int, new: int, dtype: torch.dtype,  # noqa: ANN001
                sample: bool = True) -> float:
    """Tokens/s of one-token steps after a `prompt`-token prefill; `sample=False` feeds a fixed token instead
    of the argmax, as llama-bench's tg test does (logits are still computed, nothing reads them)."""
    from tianying.model import KVCache

    cache = KVCache(cfg, batch, prompt + new + 1, dtype, "cpu")
    x = torch.randint(3, cfg.vocab_size, (batch, prompt))
    tok = model(x, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    t = time.perf_counter()
    for _ in range(new):
        logits = model(tok, cache=cache)
        if sample:
            tok = logits[:, -1].argmax(-1, keepdim=True)
    return batch * new / (time.perf_counter() - t)


def build_variant(args: argparse.Namespace, variant: str, out: Path) -> Path:
    """Write the variant's checkpoint (fp32/bf16 via save_hf, int via the quantize verb's code)."""
    from tianying.checkpoint import load_model, save_hf
    from tianying.quantize import quantize_model
    from tianying.quantize.format import save_quantized

    model, cfg = load_model(args.checkpoint, dtype=torch.float32)
    if args.group_size is None:  # the default with its fallback (demo: 688 → 16), as `tianying quantize`
        from tianying.quantize.linear import resolve_group_size

        widths = {n: m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        args.group_size = resolve_group_size(4, None, widths)
    head = variant.endswith("-head")
    if variant in ("fp32", "bf16"):
        save_hf(model, cfg, out, tokenizer_dir=args.checkpoint, dtype=torch.float32 if variant == "fp32" else
                torch.bfloat16)
        return out
    if variant == "int4-gptq":
        from tianying.cli.quantize import calibration_samples
        from tianying.quantize.gptq import gptq_quantize
        from tianying.tokenizer import Tokenizer

        samples = calibration_samples(str(args.calibration), Tokenizer.from_dir(args.checkpoint), args.samples,
                                      args.seq_len)
        gptq_quantize(model, samples, bits=4, group_size=args.group_size, act_order=True, progress=False,
                      lm_head=head)
    else:
        int8 = variant.startswith("int8")
        quantize_model(model, bits=8 if int8 else 4, group_size=None if int8 else args.group_size, lm_head=head)
    model.to(torch.float16)
    save_quantized(model, cfg, out, tokenizer_dir=args.checkpoint, method="gptq" if "gptq" in variant else "rtn")
    return out


def run_variant(args: argparse.Namespace, variant: str, path: Path) -> dict:
    """In this (fresh) process: load, measure peak RSS, decode speed and perplexity."""
    from tianying.checkpoint import load_model
    from tianying.quantize import is_quantized_checkpoint
    from tianying.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    from tianying.memory import return_freed_memory

    return_freed_memory()  # as LLM.load does on CPU
    base = _rss("VmRSS:")
    if is_quantized_checkpoint(path):  # its default: fp32 activations on CPU (the native kernels' input)
        from tianying.quantize import load

        model, cfg = load(path)
    else:
        model, cfg = load_model(path, dtype=torch.float32 if variant == "fp32" else torch.bfloat16)
    dtype = model.model.norm.weight.dtype
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    # peak for encoding --prompt tokens and generating --generate more
    decode_rate(model, cfg, 1, args.prompt, args.generate, dtype)
    peak = _rss("VmHWM:") - base
    # decode speed from a short context, median of 3 runs; as llama-bench's tg test (from an empty cache, no
    # sampling) for the comparison, and with greedy argmax sampling included
    rates = {b: statistics.median(decode_rate(model, cfg, b, 16, args.decode, dtype, sample=False)
                                  for _ in range(3)) for b in (1, 8)}
    greedy = statistics.median(decode_rate(model, cfg, 1, 16, args.decode, dtype) for _ in range(3))
    ppl, n_ppl = None, 0
    if args.ppl_tokens:
        ids = _token_stream(Tokenizer.from_dir(path), args.valid, args.ppl_tokens)
        ppl, n_ppl = perplexity(model, ids, args.window), len(ids)
    size = sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")
    return {"variant": variant, "ckpt_bytes": size, "weight_bytes": weights, "peak_rss_bytes": peak,
            "tok_s_b1": rates[1], "tok_s_b8": rates[8], "tok_s_b1_greedy": greedy, "ppl": ppl, "ppl_tokens": n_ppl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="HF checkpoint with tokenizer (default: random "
                                                                   "weights of --config)")
    ap.add_argument("--config", default="demo", help="named config for random weights (default demo; small = ~240M)")
    ap.add_argument("--no-ppl", dest="ppl_tokens", action="store_const", const=0, default=8192,
                    help="skip perplexity (meaningless on random weights)")
    ap.add_argument("--valid", type=Path, nargs="+", default=[CORPUS / "en.valid.jsonl.gz",
                                                              CORPUS / "zh.valid.jsonl.gz"])
    ap.add_argument("--calibration", type=Path, default=CORPUS / "tiny.jsonl")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=None, help="int4 group (default: largest of 128/64/32/16 "
                                                                  "dividing every width)")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=2048, help="tokens encoded for the peak-memory probe")
    ap.add_argument("--generate", type=int, default=512, help="tokens then generated for the peak-memory probe")
    ap.add_argument("--decode", type=int, default=64, help="tokens decoded per rate measurement")
    ap.add_argument("--llama-cpp", metavar="DIR", help="also run benchmarks/llama_cpp.py (llama.cpp source dir with "
                                                       "build/bin) on the same weights, for the same-run ratio")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--_child", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(run_variant(args, args._child[0], Path(args._child[1]))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.checkpoint is None:  # random demo weights and the demo tokenizer: a smoke run
            from tianying.checkpoint import save_hf
            from tianying.config import Config
            from tianying.model import build_model

            cfg = Config.from_name(args.config)
            args.checkpoint = tmp / f"{args.config}-random"
            save_hf(build_model(cfg, seed=0), cfg, args.checkpoint,
                    tokenizer_dir=ROOT / "tianying" / "assets" / "demo-tokenizer")
        rows = []
        for v in args.variants:
            path = build_variant(args, v, tmp / v)
            cmd = [sys.executable, __file__, "--_child", v, str(path), "--threads", str(args.threads),
                   "--ppl-tokens", str(args.ppl_tokens), "--window", str(args.window), "--prompt", str(args.prompt),
                   "--generate", str(args.generate),
                   "--decode", str(args.decode), "--valid", *map(str, args.valid)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                sys.exit(f"{v} failed:\n{out.stderr}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        peer = llama_cpp_rows(args, tmp) if args.llama_cpp else []
    ref = rows[0]["ppl"]
    print(f"checkpoint: {args.checkpoint}  int4 group: {args.group_size}  threads: {args.threads}  "
          f"ppl on {rows[0]['ppl_tokens']} held-out tokens  peak: encode {args.prompt} + generate {args.generate}")
    print(f"{'variant':<13} {'ckpt MiB':>9} {'weights MiB':>11} {'peak MiB':>9} {'tok/s b1':>9} {'greedy b1':>9} "
          f"{'tok/s b8':>9} {'ppl':>9} {'Δppl':>7}")
    for r in rows:
        print(f"{r['variant']:<13} {r['ckpt_bytes'] / 2**20:9.1f} {r['weight_bytes'] / 2**20:11.1f} "
              f"{r['peak_rss_bytes'] / 2**20:9.1f} {r['tok_s_b1']:9.1f} {r['tok_s_b1_greedy']:9.1f} "
              f"{r['tok_s_b8']:9.1f} "
              + (f"{r['ppl']:9.3f} {100 * (r['ppl'] / ref - 1):+6.2f}%" if ref else f"{'-':>9} {'-':>7}"))
    if peer:
        print(f"\nllama.cpp on the same weights (llama-bench tg{args.decode}, median of 3; "
              f"load average {os.getloadavg()[0]:.2f}):")
        ours = {r["variant"]: r["tok_s_b1"] for r in rows}
        for p in peer:
            mine = PEERS.get(p["variant"], [])
            best = max((v for v in mine if v in ours), key=lambda v: ours[v], default=None)
            ratio = f"  ours {best} {ours[best]:.1f} tok/s = {ours[best] / p['tok_s_median']:.2f}×" if best else ""
            print(f"  {p['variant']:<11} ({p['types']}) {p['file_mib']:7.1f} MiB  {p['tok_s_median']:6.1f} tok/s"
                  + ratio)
    print(json.dumps({"benchmark": "quantize", "checkpoint": str(args.checkpoint), "threads": args.threads,
                      "group_size": args.group_size, "results": rows, "llama_cpp": peer}))


# which of our variants answer which llama.cpp type (llama.cpp quantizes embeddings and LM head too)
PEERS = {"f32": ["fp32"], "q8_0": ["int8-head", "int8"], "q4_0": ["int4-rtn-head", "int4-rtn"],
         "q4_0-pure": ["int4-rtn-head", "int4-rtn"]}


def llama_cpp_rows(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """benchmarks/llama_cpp.py on args.checkpoint (exported to GGUF f32, then llama-quantize)."""
    cmd = [sys.executable, str(Path(__file__).with_name("llama_cpp.py")), "--checkpoint", str(args.checkpoint),
           "--llama-cpp", args.llama_cpp, "--threads", str(args.threads), "--tokens", str(args.decode),
           "--variants", "f32,q8_0,q4_0,q4_0-pure"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"llama_cpp.py failed:\n{out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["results"]


if __name__ == "__main__":
    main()
